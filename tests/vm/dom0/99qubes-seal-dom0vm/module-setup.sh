#!/bin/bash
# TEST ONLY (tests/vm/test_dom0.py): never install this module on a real machine.
#
# After 90qubes-seal has unlocked, the VM switches to a real root: the host's root file
# system, shared read-only by QEMU over virtio-9p (mount tag "hostroot"), with a tmpfs
# overlay on top.  The command line says root=tmpfs, so systemd in the initrd mounts an
# empty tmpfs on /sysroot (no block root to wait for); the pre-pivot hook mounts the 9p
# share and stacks an overlay on /sysroot (upper and work directories in that tmpfs), then
# copies the test's seed tree (dom0vm.seed=PATH on the host) into it: our units where the
# package installs them, /etc/qubes-seal, the qrexec service, the test's units.

check() {
    return 255 # only on request (-m)
}

depends() {
    echo qubes-seal
    return 0
}

installkernel() {
    hostonly='' instmods virtio_pci virtio_blk 9p 9pnet_virtio overlay
}

install() {
    inst_hook pre-pivot 50 "$moddir/dom0vm-root.sh"
    inst_multiple mount umount mkdir cp cat chmod rm
}
