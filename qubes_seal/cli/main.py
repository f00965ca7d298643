"""The ``qubes-seal`` command: a thin layer that parses, calls the library, formats results.

Every flag has an environment default (``QUBES_SEAL_<FLAG>``), booleans parsed strictly.
Errors are printed without a traceback and mapped to the documented exit codes
(:mod:`qubes_seal.errors`).  The unseal path imports only what it needs: keep it so.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import EXIT_USAGE, QubesSealError, UsageError

PROG = "qubes-seal"
DEFAULT_STATE_DIR = "/var/lib/qubes-seal"
DEFAULT_TCTI = "device:/dev/tpmrm0"

EXIT_CODES = """\
exit codes:
  0  success
  1  other error
  2  usage error
  3  measurements do not match, or no measured launch happened
  4  wrong passphrase or authorization
  5  TPM in dictionary-attack lockout
  6  TPM unavailable
  7  corrupted or unknown state, container or keystore
"""

TRUE = {"1", "true", "yes", "on"}
FALSE = {"0", "false", "no", "off", ""}


def env_bool(name: str) -> bool:
    """A boolean environment default, parsed strictly: a typo is an error, not False."""
    raw = os.environ.get(name, "")
    if raw.lower() in TRUE:
        return True
    if raw.lower() in FALSE:
        return False
    raise UsageError(
        f"{name}={raw!r} is not a boolean", hint="Use 1/0, true/false, yes/no, on/off."
    )


def env(name: str, default: str) -> str:
    return os.environ.get(name, default)


class Formatter(argparse.RawDescriptionHelpFormatter):
    pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        formatter_class=Formatter,
        description=(
            "Seal a master secret to the measurements tboot and Intel TXT make of Xen and "
            "dom0,\nand unseal it only when a boot measures exactly the same."
        ),
        epilog=EXIT_CODES
        + "\nenvironment: every option has a QUBES_SEAL_* default, e.g. QUBES_SEAL_TPM,\n"
        "QUBES_SEAL_STATE_DIR, QUBES_SEAL_JSON=1, QUBES_SEAL_PCRS=17,18.\n"
        "\nstart with:  qubes-seal status",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--tpm",
        metavar="TCTI",
        default=env("QUBES_SEAL_TPM", DEFAULT_TCTI),
        help="the TPM, as a TCTI string: device:/dev/tpmrm0 (default), "
        "swtpm:host=127.0.0.1,port=2321 [QUBES_SEAL_TPM]",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        type=Path,
        default=Path(env("QUBES_SEAL_STATE_DIR", DEFAULT_STATE_DIR)),
        help=f"where the sealed state lives (default {DEFAULT_STATE_DIR}) [QUBES_SEAL_STATE_DIR]",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_: str, description: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help_, description=description, formatter_class=Formatter, epilog=EXIT_CODES
        )
        p.add_argument(
            "--json", action="store_true", default=env_bool("QUBES_SEAL_JSON"),
            help="print one JSON object instead of text [QUBES_SEAL_JSON]",
        )  # fmt: skip
        return p

    p = command(
        "seal",
        "create a master secret and seal it to the current measurements",
        "Create a new random 32-byte master secret and seal it in the TPM to the current\n"
        "values of the selected PCRs (SHA-256 bank), under the storage root key (SRK,\n"
        "persistent handle 0x81000001, created if absent and pinned by name).\n\n"
        "Refuses when PCR 17 is all 0xFF: no Intel TXT measured launch happened in this\n"
        "boot, so there is nothing trustworthy to seal to.\n\n"
        "example:  qubes-seal --tpm swtpm:port=2321 seal --pcrs 17,18",
    )
    p.add_argument(
        "--pcrs", metavar="LIST", default=env("QUBES_SEAL_PCRS", "17,18"),
        help="comma-separated PCR indices (default 17,18: tboot's details and authorities "
        "PCRs) [QUBES_SEAL_PCRS]",
    )  # fmt: skip
    p.add_argument(
        "--force", action="store_true", default=env_bool("QUBES_SEAL_FORCE"),
        help="replace an existing sealed state (its secret is lost) [QUBES_SEAL_FORCE]",
    )  # fmt: skip
    p.add_argument(
        "--unsafe-no-measured-launch", action="store_true",
        default=env_bool("QUBES_SEAL_UNSAFE_NO_MEASURED_LAUNCH"),
        help="UNSAFE, for tests: seal even though no TXT launch happened, and do not "
        "require one at unseal [QUBES_SEAL_UNSAFE_NO_MEASURED_LAUNCH]",
    )  # fmt: skip
    p.set_defaults(func=cmd_seal)

    p = command(
        "unseal",
        "unseal the master secret (with --check: only say whether it works)",
        "Ask the TPM for the master secret. The TPM releases it only if the PCRs hold the\n"
        "values it was sealed to; the session is salted with the pinned SRK and the\n"
        "response is encrypted, so the secret never crosses the TPM bus in clear.\n"
        "Five TPM commands: Load, StartAuthSession, PolicyPCR, Unseal, FlushContext.\n\n"
        "example:  qubes-seal unseal --check && echo 'boot is genuine'",
    )
    p.add_argument(
        "--check", action="store_true", default=env_bool("QUBES_SEAL_CHECK"),
        help="unseal, then report success without printing the secret [QUBES_SEAL_CHECK]",
    )  # fmt: skip
    p.set_defaults(func=cmd_unseal)

    p = command(
        "status",
        "the TPM, the SRK, and the sealed PCRs: expected against current",
        "Show whether the TPM answers, whether the SRK is the one pinned at sealing,\n"
        "whether a measured launch happened, and each sealed PCR: expected, current, match.",
    )
    p.set_defaults(func=cmd_status)

    p = command("pcrs", "print the TPM's PCR values", "Print PCR values of one bank.")
    p.add_argument(
        "--pcrs", metavar="LIST", default=env("QUBES_SEAL_PCRS", "0-23"),
        help="comma-separated indices or ranges (default all: 0-23)",
    )  # fmt: skip
    p.add_argument(
        "--bank", default=env("QUBES_SEAL_BANK", "sha256"),
        choices=["sha1", "sha256", "sha384", "sha512"], help="PCR bank (default sha256)",
    )  # fmt: skip
    p.set_defaults(func=cmd_pcrs)
    return parser


# -- commands ----------------------------------------------------------------------------------


def emit(args: argparse.Namespace, doc: dict[str, Any], text: str) -> None:
    if args.json:
        import json

        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(text)


def cmd_seal(args: argparse.Namespace) -> int:
    from .. import state as state_mod
    from ..tpm.device import Tpm
    from ..tpm.seal import parse_pcr_list, seal_new_secret

    pcrs = parse_pcr_list(args.pcrs)
    path = state_mod.state_path(args.state_dir)
    if path.exists() and not args.force:
        raise UsageError(
            f"a sealed state already exists in {args.state_dir}",
            hint="Sealing again creates a new master secret and loses the old one. "
            "Use --force if that is what you want.",
        )
    with Tpm(args.tpm) as tpm:
        sealed, secret = seal_new_secret(
            tpm, pcrs=pcrs, require_launch=not args.unsafe_no_measured_launch
        )
    secret.wipe()
    written = state_mod.save(sealed, args.state_dir)
    values = {str(p): v.hex() for p, v in sealed.pcr_states[0].values.items()}
    text = [f"sealed a new master secret to PCR {','.join(map(str, pcrs))} (sha256)"]
    text += [f"  PCR {p:>2}: {v}" for p, v in values.items()]
    text.append(f"  SRK 0x{sealed.srk_handle:08x} name {sealed.srk_name.hex()}")
    text.append(f"  state: {written}")
    if args.unsafe_no_measured_launch:
        text.append("  WARNING: sealed without requiring a measured launch (unsafe test mode)")
    emit(
        args,
        {
            "sealed": True,
            "pcrs": values,
            "bank": sealed.pcr_bank,
            "srk_name": sealed.srk_name.hex(),
            "state_file": str(written),
            "require_launch": sealed.require_launch,
        },
        "\n".join(text),
    )
    return 0


def cmd_unseal(args: argparse.Namespace) -> int:
    from .. import state as state_mod
    from ..tpm.unseal import unseal

    if not args.check:
        raise UsageError(
            "unseal prints nothing secret: use --check to test that the TPM releases the secret",
            hint="The master secret itself is only used inside qubes-seal (the boot unlock).",
        )
    sealed = state_mod.load(args.state_dir)
    secret = unseal(sealed, tcti=args.tpm)
    secret.wipe()
    emit(args, {"unsealed": True}, "ok: the TPM released the master secret")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .. import state as state_mod
    from ..errors import CorruptState
    from ..tpm.device import SRK_HANDLE, Tpm
    from ..tpm.seal import DRTM_PCR, launch_happened

    sealed: state_mod.SealedState | None
    state_error = None
    try:
        sealed = state_mod.load(args.state_dir)
    except CorruptState as exc:
        sealed, state_error = None, exc.message
    with Tpm(args.tpm) as tpm:
        srk = tpm.find_srk()
        pcrs = set(sealed.pcrs) if sealed else set()
        bank = sealed.pcr_bank if sealed else "sha256"
        current = tpm.read_pcrs(pcrs | {DRTM_PCR}, bank=bank)
        da = tpm.da_status()
    launched = launch_happened(current[DRTM_PCR])
    doc: dict[str, Any] = {
        "tpm": {"tcti": args.tpm, "reachable": True, "dictionary_attack": da},
        "srk": {
            "handle": f"0x{SRK_HANDLE:08x}",
            "present": srk is not None,
            "name": srk.name.hex() if srk else None,
        },
        "measured_launch": launched,
        "state_dir": str(args.state_dir),
        "sealed": None,
    }
    lines = [
        f"TPM:             {args.tpm} (reachable)",
        f"SRK 0x{SRK_HANDLE:08x}: " + (srk.name.hex() if srk else "absent (created at seal)"),
        "measured launch: " + ("yes (PCR 17 was reset by a dynamic launch)" if launched
                               else "NO: PCR 17 is all 0xFF, no TXT launch in this boot"),
        f"dictionary attack: {da['failed_tries']}/{da['max_tries']} failed tries"
        + (", IN LOCKOUT" if da["in_lockout"] else "")
        + f", recovery every {da['recovery_seconds']} s",
    ]  # fmt: skip
    if sealed is None:
        lines.append(f"sealed state:    none ({state_error})")
    else:
        pinned = srk is not None and srk.name == sealed.srk_name
        rows: list[dict[str, Any]] = []
        for p in sealed.pcrs:
            ok = any(s.values[p] == current[p] for s in sealed.pcr_states)
            rows.append(
                {
                    "pcr": p,
                    "expected": [s.values[p].hex() for s in sealed.pcr_states],
                    "current": current[p].hex(),
                    "match": ok,
                }
            )
        will_unseal = pinned and any(
            all(s.values[p] == current[p] for p in sealed.pcrs) for s in sealed.pcr_states
        ) and (launched or not sealed.require_launch)  # fmt: skip
        doc["sealed"] = {
            "created": sealed.created,
            "bank": sealed.pcr_bank,
            "states": [s.label for s in sealed.pcr_states],
            "srk_pinned_matches": pinned,
            "require_launch": sealed.require_launch,
            "pcrs": rows,
            "unseal_expected_to_succeed": will_unseal,
        }
        lines.append(
            f"sealed state:    {args.state_dir} (created {sealed.created}, "
            f"{len(sealed.pcr_states)} accepted state(s): "
            + ", ".join(s.label for s in sealed.pcr_states) + ")"
        )  # fmt: skip
        lines.append(
            "SRK pin:         " + ("matches" if pinned else "DIFFERENT KEY: unseal will fail")
        )
        for row in rows:
            mark = "match" if row["match"] else "DIFFERS"
            lines.append(f"  PCR {row['pcr']:>2} {mark:7} current  {row['current']}")
            for e in row["expected"]:
                lines.append(f"  {'':14} expected {e}")
        lines.append(
            "unseal:          " + ("expected to succeed" if will_unseal else "would be REFUSED")
        )
    emit(args, doc, "\n".join(lines))
    return 0


def parse_ranges(text: str) -> list[int]:
    out: set[int] = set()
    try:
        for part in text.split(","):
            part = part.strip()
            if not part:
                continue
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UsageError(f"invalid PCR list {text!r}", hint="Example: 0-7,17,18") from None
    if not out or min(out) < 0 or max(out) > 23:
        raise UsageError(f"invalid PCR list {text!r}: indices are 0-23")
    return sorted(out)


def cmd_pcrs(args: argparse.Namespace) -> int:
    from ..tpm.device import Tpm

    pcrs = parse_ranges(args.pcrs)
    with Tpm(args.tpm) as tpm:
        values = tpm.read_pcrs(pcrs, bank=args.bank)
    doc = {"pcrs": {args.bank: {str(p): v.hex() for p, v in sorted(values.items())}}}
    emit(args, doc, "\n".join(f"{args.bank}:{p:>2} {v.hex()}" for p, v in sorted(values.items())))
    return 0


# -- entry point ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return func(args)
    except QubesSealError as exc:
        print(f"{PROG}: error: {exc.diagnostics()}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
