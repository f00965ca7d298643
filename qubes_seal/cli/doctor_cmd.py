"""The ``doctor`` command: is this machine ready for a measured boot, and what is missing."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

DOCTOR_HELP = """\
Check everything a measured boot with qubes-seal needs, and say how to fix what is
missing. Reads only: nothing is written, the TPM is asked for its properties and the
SRK's public part, the TXT registers and heap are read from --mem.

  tpm               a TPM 2.0 answers on --tpm
  tpm-lockout       not in dictionary-attack lockout (every unlock fails then)
  tpm-lockout-auth  the lockout authorization is set (a warning while it is empty)
  srk               the SRK at 0x81000001 is the one the container's token pins
  cpu-smx           /proc/cpuinfo has the 'smx' flag (GETSEC: Intel TXT); not checked
                    under Xen, which hides it from dom0
  txt-enabled       the firmware set TXT up (TXT.HEAP.BASE/SIZE non-zero, and SMX
                    unless Xen hides it)
  txt-launch        this boot's launch: done, or why not (TXT.ERRORCODE decoded as
                    tboot does). Without SMX or with TXT off the registers are garbage
                    (txt-stat may still say "measured launch: TRUE"): never "launched"
  tboot             /boot/tboot.gz (or GRUB_QUBES_SEAL_TBOOT's file) installed
  sinit             a SINIT ACM in /boot whose chipset list holds TXT.DIDVID, or one
                    in the BIOS (heap BiosData); without DIDVID: "present, not matched"
  grub-entry        our tboot entry (id qubes-seal-tboot...) in grub.cfg
  grub-default      it is the default (GRUB_DEFAULT, or saved_entry in grubenv)
  boot-mode         legacy or UEFI (tboot + Xen needs GRUB and multiboot2)
  aem               Qubes anti-evil-maid absent: it uses PCR 13 too (a conflict)
  initramfs         the newest /boot/initramfs-*.img carries our dracut module
  container         /var/lib/qubes-seal/keys.luks (or --container) exists; with a
                    boot.toml, it is the one the initramfs opens, on a partition (a
                    file on dom0's root cannot be opened before that root is), and
                    the units can reach it (another node than the partition labelled
                    qubes-seal: in their drop-ins)
  units             qubes-seal-keyd.service and qubes-seal-reseal.path enabled
  keyd              the key daemon answers on its socket (not under --root)

Verdicts: ok, FIX (something to fix, with how), WARN (fine, but read the note), and
"not checked" (with why: no TPM, no /dev/mem, not as root). Exit 0 when every check
that could run passed (warnings included), 1 otherwise.

  sudo qubes-seal doctor                          this machine
  qubes-seal --tpm swtpm:port=2321 doctor --root /mnt/dom0 --mem mem.img --json
                                                  a dom0 disk mounted elsewhere"""


def register(sub: Any) -> None:
    from .main import add_command, add_container_option, env

    p = add_command(sub, "doctor", "check that this machine is ready, and say what to fix",
                    DOCTOR_HELP)  # fmt: skip
    p.add_argument(
        "--root", metavar="DIR", type=Path, default=Path(env("QUBES_SEAL_ROOT", "/")),
        help="read /proc/cpuinfo, /boot, /etc, /sys/firmware and the installed files under "
        "DIR (a mounted dom0 disk, a test's tree) [QUBES_SEAL_ROOT]",
    )  # fmt: skip
    p.add_argument(
        "--mem", metavar="FILE", default=env("QUBES_SEAL_MEM", "/dev/mem"),
        help="physical memory for the TXT registers and heap: /dev/mem (default; root) or "
        "an image addressed like it, as for 'eventlog capture' [QUBES_SEAL_MEM]",
    )  # fmt: skip
    add_container_option(p, optional=True, help_="the container (default: "
                         "/var/lib/qubes-seal/keys.luks under --root)")  # fmt: skip
    p.set_defaults(func=cmd_doctor)


MARKS = {True: "ok  ", False: "FIX ", None: "--  "}


def cmd_doctor(args: argparse.Namespace) -> int:
    from .. import doctor
    from ..errors import UsageError
    from .main import emit

    if not args.root.is_dir():
        raise UsageError(f"--root {args.root}: not a directory")
    ctx = doctor.Context(root=args.root, mem=args.mem, tcti=args.tpm, container=args.container)
    checks = doctor.run(ctx)
    ok = doctor.all_ok(checks)
    lines: list[str] = []
    for c in checks:
        mark = "WARN" if c.ok is True and c.fix else MARKS[c.ok]
        lines.append(f"{mark} {c.id:<17} {c.summary}")
        if c.fix:
            lines.append(f"     {'':<17} fix: {c.fix}")
    bad = sum(1 for c in checks if c.ok is False)
    lines.append(
        "ready: every check that could run passed"
        if ok
        else f"NOT ready: {bad} check(s) to fix (FIX lines above)"
    )
    emit(args, {"ok": ok, "checks": [c.to_json() for c in checks]}, "\n".join(lines))
    return 0 if ok else 1
