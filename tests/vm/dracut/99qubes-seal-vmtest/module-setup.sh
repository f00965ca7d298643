#!/bin/bash
# TEST ONLY (tests/vm/test_vm.py): never install this module on a real machine.
#
# Adds to an image built with 90qubes-seal what the VM test needs around it:
#   * the kernel modules of QEMU's virtio disks (the TPM's TIS driver is built into Debian's
#     kernel; dm_crypt comes from 90qubes-seal and 90crypt);
#   * a udev rule that records every device-mapper device with its table's owner (dm/uuid:
#     CRYPT-LUKS2-... for a dm-crypt mapping made by cryptsetup) in /run/qubes-seal-vmtest/;
#   * qubes-seal-vmtest.service: after cryptsetup.target, checks what the boot left behind,
#     prints one "VMTEST RESULT {json}" line on the console and powers the VM off;
#   * with dracut's plymouth module: plymouthd started with its debug log in /run (a drop-in
#     for plymouth-start.service), where the check reads which client asked what.
# The boot configuration comes from 90qubes-seal itself (QUBES_SEAL_BOOT_CONFIG at build time).

check() {
    return 255 # only on request (-m)
}

depends() {
    echo qubes-seal
    return 0
}

installkernel() {
    hostonly='' instmods virtio_pci virtio_blk
}

install() {
    inst_simple "$moddir/qubes-seal-vmtest-check.py" /usr/lib/qubes-seal-vmtest/check.py
    inst_rules "$moddir/90-qubes-seal-vmtest.rules"
    inst_multiple sh mkdir sync
    inst_simple "$moddir/qubes-seal-vmtest.service" "$systemdsystemunitdir/qubes-seal-vmtest.service"
    $SYSTEMCTL -q --root "$initdir" add-wants initrd.target qubes-seal-vmtest.service
    # Plymouth in the image (test_vm.py's boots 2 and 3): its debug log, for the check unit.
    if dracut_module_included "plymouth"; then
        inst_simple "$moddir/plymouth-debug.conf" \
            "$systemdsystemunitdir/plymouth-start.service.d/qubes-seal-vmtest-debug.conf"
    fi
}
