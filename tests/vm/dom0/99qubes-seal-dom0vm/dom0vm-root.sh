#!/bin/sh
# TEST ONLY (tests/vm/test_dom0.py): the host's root over virtio-9p, read-only, with the
# tmpfs on /sysroot (root=tmpfs) as the overlay's writable layer; then the test's seed.
type getarg > /dev/null 2>&1 || . /lib/dracut-lib.sh

seed=$(getarg dom0vm.seed=)
if [ -n "$seed" ] && ! [ -d /run/dom0vm/lower/proc ]; then
    say() { echo "[dom0vm] $*" > /dev/console; }
    modprobe -q 9pnet_virtio
    modprobe -q overlay
    mkdir -p /run/dom0vm/lower
    if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose \
        hostroot /run/dom0vm/lower; then
        say "ERROR: cannot mount the host's root (9p tag hostroot)"
        echo o > /proc/sysrq-trigger
    fi
    mkdir -p "$NEWROOT/.dom0vm/upper" "$NEWROOT/.dom0vm/work"
    if ! mount -t overlay overlay -o "lowerdir=/run/dom0vm/lower,upperdir=$NEWROOT/.dom0vm/upper,workdir=$NEWROOT/.dom0vm/work" "$NEWROOT"; then
        say "ERROR: cannot mount the overlay on $NEWROOT"
        echo o > /proc/sysrq-trigger
    fi
    # The host's root is a container image: without this, systemd would detect "docker"
    # and ignore the kernel command line (systemd.unit=).  The VM is no container.
    rm -f "$NEWROOT/.dockerenv"
    cp -a "/run/dom0vm/lower$seed/root/." "$NEWROOT/"
    # dom0's qrexec service user, in group qubes (the key service's socket group).
    cat "/run/dom0vm/lower$seed/passwd" >> "$NEWROOT/etc/passwd"
    cat "/run/dom0vm/lower$seed/group" >> "$NEWROOT/etc/group"
    # The container the boot unlocked is a partition labelled qubes-seal (/dev/vda1); dom0's
    # tools and units find it at the package's default path, a symbolic link to it, as
    # docs/INSTALL.md sets it up on a real machine.
    mkdir -p "$NEWROOT/var/lib/qubes-seal"
    chmod 0700 "$NEWROOT/var/lib/qubes-seal"
    ln -s /dev/disk/by-partlabel/qubes-seal "$NEWROOT/var/lib/qubes-seal/keys.luks"
    # The repository under test, where the key service's unit sees it (a clone under /tmp
    # or /root is hidden from it by PrivateTmp=/ProtectHome=).
    src=$(getarg dom0vm.src=)
    if [ -n "$src" ]; then
        mkdir -p "$NEWROOT/opt/qubes-seal-src"
        if ! mount --bind "$NEWROOT$src" "$NEWROOT/opt/qubes-seal-src"; then
            say "ERROR: cannot bind the repository $src"
            echo o > /proc/sysrq-trigger
        fi
    fi
    say "root: host / over 9p (read-only) + tmpfs overlay, seed $seed"
fi
