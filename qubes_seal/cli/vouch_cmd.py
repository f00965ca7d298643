"""``qubes-seal vouch``: the digests dom0 records for files it builds itself; and the gate
that ``reseal --predict`` (and ``predict --container``) pass before approving a boot."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import NotVouched, UsageError

if TYPE_CHECKING:
    from ..measure.vouch import Report

VOUCH_HELP = """\
/boot is plaintext: an evil maid can put any Xen, kernel, initramfs or grub.cfg there while
the machine is off. A boot is approved unattended (the reseal path unit) only when dom0's
encrypted root vouches for each of its files: the RPM database holds the file's digest (an
installed package owns it; a kernel vmlinuz-VER also as /lib/modules/VER/vmlinuz), or dom0
recorded the digest here when it built the file (the initramfs, after dracut: the
kernel-install plugin 60-qubes-seal.install runs 'vouch record'). Command lines must be
those /etc/default/grub gives. Anything else needs a typed confirmation at a terminal.

  qubes-seal vouch record /boot/initramfs-6.12.9.img   after 'dracut -f' by hand
  qubes-seal vouch check /boot/xen-4.19.1.gz ...       who vouches for these files
  qubes-seal vouch list                                the recorded digests
  qubes-seal vouch forget /boot/initramfs-6.6.63.img   drop a record

The records are STATE_DIR/vouched.json (mode 0600, atomic writes). Record only files dom0
built in this boot: a record is what lets the path unit approve a file without asking."""

CONFIRM_WORD = "approve"


def add_vouch_options(p: argparse.ArgumentParser, *, cmdlines: bool = True) -> None:
    """Where the encrypted root's word comes from: the RPM database (and /etc/default/grub
    for ``cmdlines``)."""
    from .main import env

    g = p.add_argument_group("vouching (what dom0's encrypted root stands behind)")
    raw = env("QUBES_SEAL_RPM_DBPATH", "")
    g.add_argument(
        "--rpm-dbpath", metavar="DIR", type=Path, default=Path(raw) if raw else None,
        help="the RPM database that vouches for packaged files (default: the system's, "
        "as 'rpm -E %%_dbpath' says) [QUBES_SEAL_RPM_DBPATH]",
    )  # fmt: skip
    if not cmdlines:
        return
    g.add_argument(
        "--etc-default-grub", metavar="FILE", type=Path,
        default=Path(env("QUBES_SEAL_ETC_DEFAULT_GRUB", "/etc/default/grub")),
        help="dom0's GRUB configuration: the only source of vouched command lines "
        "(default /etc/default/grub) [QUBES_SEAL_ETC_DEFAULT_GRUB]",
    )  # fmt: skip


def register(sub: Any) -> None:
    from .main import add_command

    p = add_command(sub, "vouch", "record or check the digests dom0 vouches for", VOUCH_HELP)
    vsub = p.add_subparsers(dest="vouch_command", metavar="ACTION", required=True)

    vp = add_command(
        vsub, "record", "record the digest of files dom0 built (the initramfs)",
        "Record each FILE's SHA-256 digest in STATE_DIR/vouched.json, so that an\n"
        "unattended reseal accepts that file at that path with exactly this content.\n"
        "Refused for a file an installed RPM package owns with another digest (a modified\n"
        "packaged file: reinstall the package instead).\n\n"
        "example (after 'dracut -f'):  qubes-seal vouch record /boot/initramfs-6.12.9.img",
    )  # fmt: skip
    vp.add_argument("files", metavar="FILE", nargs="+", type=Path)
    vp.add_argument("--by", default="qubes-seal vouch record",
                    help="what built the file, kept in the record (kernel-install)")  # fmt: skip
    vp.add_argument("--file-version", metavar="VER", help="the version to show for it")
    add_vouch_options(vp, cmdlines=False)
    vp.set_defaults(func=cmd_record)

    vp = add_command(vsub, "list", "the recorded digests", "List STATE_DIR/vouched.json.")
    vp.set_defaults(func=cmd_list)

    vp = add_command(
        vsub, "check", "who vouches for these files (exit 7 if nobody for one)",
        "For each FILE: its SHA-256, and the RPM package or the record that vouches for it,\n"
        "or why nothing does. Exit 0 when every file is vouched for, 7 otherwise.",
    )  # fmt: skip
    vp.add_argument("files", metavar="FILE", nargs="+", type=Path)
    add_vouch_options(vp, cmdlines=False)
    vp.set_defaults(func=cmd_check)

    vp = add_command(vsub, "forget", "drop the records of these paths",
                     "Remove the records of each FILE (which need not exist any more): "
                     "kernel-install's 'remove' runs it for the initramfs.")  # fmt: skip
    vp.add_argument("files", metavar="FILE", nargs="+", type=Path)
    vp.set_defaults(func=cmd_forget)


def cmd_record(args: argparse.Namespace) -> int:
    from ..measure import vouch
    from .main import emit

    records = vouch.Records(args.state_dir)
    rpm = vouch.RpmDb(args.rpm_dbpath)
    done = []
    for f in args.files:
        real = vouch.canonical(f)
        if not real.is_file():
            raise UsageError(f"{f} is not a regular file")
        digests = vouch.file_digests(real)
        verdict = vouch.rpm_vouch(rpm, real, digests)
        if verdict.contradicted:
            raise NotVouched(
                f"refusing to record {real}: {verdict.reason}",
                hint="A packaged file was modified. Reinstall its package "
                "(dnf reinstall PACKAGE) rather than vouching for another content.",
            )
        version = args.file_version or vouch.version_from_name(real.name)
        done.append(records.record(real, digests["sha256"], by=args.by, version=version))
    records.save()
    emit(args, {"recorded": [{"path": r.path, **r.as_dict()} for r in done],
                "file": str(records.path)},
         "\n".join(f"recorded {r.path}\n  sha256 {r.sha256}" for r in done)
         + f"\nin {records.path}")  # fmt: skip
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from ..measure import vouch
    from .main import emit

    records = vouch.Records(args.state_dir)
    rows = sorted(records.entries.values(), key=lambda r: r.path)
    text = [f"{records.path}: {len(rows)} recorded digest(s)"]
    for r in rows:
        text.append(f"  {r.path}\n    sha256 {r.sha256}\n    version {r.version or 'unknown'}, "
                    f"recorded {r.recorded} by {r.by}")  # fmt: skip
    emit(args, {"file": str(records.path),
                "records": {r.path: r.as_dict() for r in rows}}, "\n".join(text))  # fmt: skip
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from ..measure import vouch
    from .main import emit

    records = vouch.Records(args.state_dir)
    rpm = vouch.RpmDb(args.rpm_dbpath)
    report = vouch.Report([vouch.vouch_file("file", f, rpm=rpm, records=records)
                           for f in args.files])  # fmt: skip
    emit(args, report.as_dict(), "\n".join(report.lines()))
    if not report.vouched:
        raise NotVouched(f"{len(report.not_vouched())} file(s) not vouched for by dom0")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from ..measure import vouch
    from .main import emit

    records = vouch.Records(args.state_dir)
    gone = [str(vouch.canonical(f)) for f in args.files if records.forget(vouch.canonical(f))]
    if gone:
        records.save()
    emit(args, {"forgotten": gone},
         "\n".join(f"forgot {p}" for p in gone) or "nothing recorded for these paths")  # fmt: skip
    return 0


# --- The gate before an approval ----------------------------------------------------------------


def interactive() -> bool:
    """A human at a terminal: stdin and stderr are both terminals."""
    try:
        return sys.stdin.isatty() and os.isatty(sys.stderr.fileno())
    except (OSError, ValueError):
        return False


def gate(report: Report, *, what: str) -> bool:
    """Let an approval go ahead: at once when dom0 vouches for everything, else only after a
    typed confirmation at a terminal; without one, raise :class:`NotVouched` (exit 7).

    Returns whether a human confirmed it (False: everything was vouched for).
    """
    if report.vouched:
        return False
    missing = report.not_vouched()
    if not interactive():
        raise NotVouched(
            f"refusing to {what} unattended: dom0 does not vouch for "
            + ("this" if len(missing) == 1 else f"these {len(missing)}")
            + ":\n" + "\n".join(f"  {m}" for m in missing),
            hint="/boot is not encrypted: only files an installed RPM package or a record "
            "('qubes-seal vouch record', kernel-install) vouches for, with /etc/default/grub's "
            "command lines, are approved without a human. If you installed these yourself, "
            "run the same command on a terminal to confirm, or record the file you built. "
            "Nothing was changed.",
        )  # fmt: skip
    err = sys.stderr
    print(f"About to {what}. The next boot is made of:", file=err)
    for line in report.lines():
        print(line, file=err)
    print(
        "dom0's encrypted root does NOT vouch for all of it (see NOT VOUCHED above). If you did "
        "not install or build these yourself, someone may have written /boot: do not approve.",
        file=err,
    )
    print(f"Type '{CONFIRM_WORD}' to {what} anyway: ", end="", file=err, flush=True)
    answer = sys.stdin.readline().strip()
    if answer != CONFIRM_WORD:
        raise NotVouched(f"not confirmed: nothing was approved (typed {answer[:40]!r})")
    return True
