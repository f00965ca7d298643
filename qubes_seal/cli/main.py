"""The ``qubes-seal`` command: a thin layer that parses, calls the library, formats results.

Every flag has an environment default (``QUBES_SEAL_<FLAG>``), booleans parsed strictly.
Errors are printed without a traceback and mapped to the documented exit codes
(:mod:`qubes_seal.errors`).  The unseal path imports only what it needs: keep it so.
"""

from __future__ import annotations

import argparse
import functools
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
  7  corrupted or unknown state, container or keystore; or (reseal --predict,
     predict --container) a boot file or command line dom0 does not vouch for
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


DEFAULT_CONTAINER = "/var/lib/qubes-seal/keys.luks"


def add_container_option(p: Any, *, optional: bool = False, help_: str | None = None) -> None:
    """``--container PATH`` [QUBES_SEAL_CONTAINER], with the default or (optional) none."""
    raw = env("QUBES_SEAL_CONTAINER", "" if optional else DEFAULT_CONTAINER)
    p.add_argument(
        "--container", metavar="PATH", type=Path, default=Path(raw) if raw else None,
        help=(help_ or "the LUKS2 container: a file or a block device (default "
              f"{DEFAULT_CONTAINER})") + " [QUBES_SEAL_CONTAINER]",
    )  # fmt: skip


def add_command(sub: Any, name: str, help_: str, description: str) -> argparse.ArgumentParser:
    """A subcommand with the conventions every command keeps: --json, the exit-code table."""
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help_, description=description, formatter_class=Formatter, epilog=EXIT_CODES
    )
    p.add_argument(
        "--json", action="store_true", default=env_bool("QUBES_SEAL_JSON"),
        help="print one JSON object instead of text [QUBES_SEAL_JSON]",
    )  # fmt: skip
    return p


class _Null:
    """Stands in for the parser of a command that is not being run: every call is a no-op."""

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: self


_NULL = _Null()


class _Only:
    """Subparsers that build only ``name``'s parser: the others cost nothing.

    Building every command's parser takes about 10 ms, as long as a whole unseal's TPM work;
    the command being run needs only its own.  ``--help`` and errors build them all.
    """

    def __init__(self, sub: Any, name: str) -> None:
        self._sub = sub
        self._name = name

    def add_parser(self, name: str, **kwargs: Any) -> Any:
        return self._sub.add_parser(name, **kwargs) if name == self._name else _NULL


GLOBAL_OPTIONS_WITH_VALUE = ("--tpm", "--state-dir")
INLINE_COMMANDS = ("seal", "unseal", "status", "pcrs", "predict", "reseal")
#: The modules that register the other commands (imported only when their command runs).
COMMAND_MODULES = {
    "container_cmd": ("init", "unlock", "recover", "attest", "lock", "domain"),
    "service_cmd": ("serve",),
    "eventlog_cmd": ("eventlog",),
    "rotate_cmd": ("rotate", "revoke", "repair"),
    "vouch_cmd": ("vouch",),
    "tpm_cmd": ("tpm",),
    "grow_cmd": ("grow",),
    "doctor_cmd": ("doctor",),
}
ALL_COMMANDS = frozenset(INLINE_COMMANDS).union(*COMMAND_MODULES.values())


def command_in(argv: Sequence[str]) -> str | None:
    """The command named in ``argv`` (after the global options), or None (help, errors)."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in GLOBAL_OPTIONS_WITH_VALUE:
            i += 2
            continue
        if any(arg.startswith(o + "=") for o in GLOBAL_OPTIONS_WITH_VALUE):
            i += 1
            continue
        return None if arg.startswith("-") else arg
    return None


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
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
        help=f"where the sealed state and the journal live (default {DEFAULT_STATE_DIR}); it "
        "must be owned by root and writable by nobody else, nor may the directories above it "
        "be (exit 7 otherwise) [QUBES_SEAL_STATE_DIR]",
    )
    sub: Any = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    if only is not None:
        sub = _Only(sub, only)

    command = functools.partial(add_command, sub)
    from .vouch_cmd import add_vouch_options

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
        "example:  qubes-seal unseal --check && echo 'boot is genuine'\n\n"
        "A refusal (exit 3) says what differs by component, from this boot's TXT log\n"
        "(--txt-log) and the accepted states' records: a diagnosis, never an authority.",
    )
    p.add_argument(
        "--check", action="store_true", default=env_bool("QUBES_SEAL_CHECK"),
        help="unseal, then report success without printing the secret [QUBES_SEAL_CHECK]",
    )  # fmt: skip
    p.add_argument(
        "--txt-log", metavar="FILE", default=env("QUBES_SEAL_TXT_LOG", ""),
        help="this boot's TXT event log, to explain a refusal (default "
        "/run/qubes-seal/txt-event.log) [QUBES_SEAL_TXT_LOG]",
    )  # fmt: skip
    p.set_defaults(func=cmd_unseal)

    p = command(
        "status",
        "the TPM, the SRK, and the sealed PCRs: expected against current",
        "Show whether the TPM answers, whether the SRK is the one pinned at sealing,\n"
        "whether a measured launch happened, and each sealed PCR: expected, current, match.\n"
        "With a container (--container, or the default one when it exists): its policy\n"
        "(signed or not), its accepted boot states and which one this boot matches, and the\n"
        "rollback counter against the token's bound (settled, increment pending, revoked).\n"
        "Then the hand-over keys in the kernel keyring (QUBES_SEAL_KEYRING, default user):\n"
        "STALE marks another container's or an expired one ('qubes-seal lock --stale').\n"
        "TXT, as tboot's txt-stat reads it from --mem: SENTER done, TXT.ERRORCODE decoded,\n"
        "the heap and its event-log pointer; and whether the log the boot captured\n"
        "(--txt-log) replays to the TPM's PCR 17/18 (an .unverified file: it did not).",
    )
    add_container_option(p, optional=True, help_="also describe this container's token")
    p.add_argument(
        "--mem", metavar="FILE", default=env("QUBES_SEAL_MEM", "/dev/mem"),
        help="read the TXT registers and heap here, as txt-stat does: SENTER done, "
        "TXT.ERRORCODE decoded, heap, event-log pointer (default /dev/mem; a memory image "
        "addressed like it works too; unreadable: one line, not an error) [QUBES_SEAL_MEM]",
    )  # fmt: skip
    p.add_argument(
        "--txt-log", metavar="FILE",
        default=env("QUBES_SEAL_TXT_LOG", "/run/qubes-seal/txt-event.log"),
        help="the TXT event log the boot captured: does it replay to the TPM's PCR 17/18? "
        "(default /run/qubes-seal/txt-event.log) [QUBES_SEAL_TXT_LOG]",
    )  # fmt: skip
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

    p = command(
        "predict",
        "the PCR 17/18 values of the next boot, from the TXT log and new files",
        "Compute what tboot will measure at the next boot: this boot's TXT event log gives\n"
        "SINIT's measurements and tboot's policy; the new Xen, dom0 kernel and initramfs\n"
        "(files, or a GRUB entry) give the modules. No TPM needed.\n\n"
        "A new tboot (the entry's 'multiboot2 /tboot.gz ARGS' line, or --tboot FILE with\n"
        "--tboot-cmdline ARGS) changes SINIT's MLE_HASH: it is recomputed per bank from the\n"
        "image (gunzipped, ELF segments laid out, the MLE header's range with the command\n"
        "line in its buffer), as Debian's lcp2_mlehash computes it, and the OsSinitData\n"
        "capabilities event too when the new MLE header's capabilities differ.\n\n"
        "examples:\n"
        "  qubes-seal predict --txt-log txt.log --xen /boot/xen-4.19.gz \\\n"
        "      --xen-cmdline 'console=none' --kernel /boot/vmlinuz-6.6 \\\n"
        "      --kernel-cmdline 'root=/dev/mapper/dom0-root ro' \\\n"
        "      --initramfs /boot/initramfs-6.6.img\n"
        "  qubes-seal predict --txt-log txt.log --grub-cfg /boot/grub2/grub.cfg \\\n"
        "      --entry 'Qubes, with Xen 4.19 and Linux 6.6 (tboot)'\n"
        "  qubes-seal predict --txt-log txt.log --tboot /boot/tboot.gz \\\n"
        "      --tboot-cmdline 'logging=serial,memory,vga' --xen ... --kernel ... \\\n"
        "      --initramfs ...\n\n"
        "With --container, also a preview of the approval 'reseal --predict' would sign:\n"
        "PolicyPCR of PCR 13 (this header), 17, 18 (dom0's launch policy), then PolicyNV\n"
        "(counter <= its next value). A preview is never signed: a signature shown now would\n"
        "become valid at the next counter increment, approving a boot nobody confirmed.\n"
        "The preview, like the approval, needs every file vouched for by dom0 (see\n"
        "'reseal'), or a typed confirmation at a terminal.",
    )
    add_component_options(p)
    add_vouch_options(p)
    add_container_option(
        p, optional=True, help_="also preview the approval of the predicted state for this "
        "container (the approved policy and counter bound; never a signature)",
    )  # fmt: skip
    p.set_defaults(func=cmd_predict)

    p = command(
        "reseal",
        "accept this boot, and with --predict the next one (signed, for a container)",
        "Accept this boot (and with --predict the predicted next one), nothing else.\n\n"
        "A container (--container) uses signed policies: the sealed object stays as it is\n"
        "and the dom0 policy-signing key, read from the keystore through this boot's\n"
        "unlock, signs each accepted state; then the TPM's rollback counter moves on, so\n"
        "every older signature and token is void. No unseal, no passphrase. The token's MAC\n"
        "is checked first (exit 7 if it was rewritten: 'recover --reseal'), and the states\n"
        "are rebuilt from this boot's PCRs and the prediction, over dom0's launch policy\n"
        "(/etc/qubes-seal/launch.toml: PCR 13, 17, 18), never from the token.\n"
        "The state directory's sealed.json (no container) is sealed again: the TPM must\n"
        "release the secret in this boot first (PolicyOR of the states).\n"
        "No trust on first use either way: only an accepted boot approves another.\n\n"
        "  qubes-seal reseal --predict COMPONENTS   before an update: accept this boot and\n"
        "                                           the predicted one\n"
        "  qubes-seal reseal                        after the first good boot on the new\n"
        "                                           components: accept this boot only\n\n"
        "--predict approves a boot only if dom0's encrypted root vouches for each of its\n"
        "files (tboot, Xen, kernel, initramfs) and command lines: an installed RPM package\n"
        "holds the file's digest, or 'qubes-seal vouch record' recorded it (kernel-install\n"
        "does for the initramfs dracut builds); the command lines are those\n"
        "/etc/default/grub gives (20_qubes_seal_tboot's rules), never grub.cfg's. Otherwise\n"
        "it shows each file (path, version, sha256, who vouches) and asks you to type\n"
        "'approve' on the terminal; without a terminal (the reseal path unit) it refuses,\n"
        "exit 7, and changes nothing. See 'qubes-seal vouch --help'.",
    )
    p.add_argument(
        "--predict", action="store_true",
        help="also accept the boot predicted from the component options below",
    )  # fmt: skip
    add_container_option(
        p, optional=True, help_="reseal the container's token (needs this boot's unlock "
        "hand-over) instead of the state directory's sealed.json",
    )  # fmt: skip
    add_component_options(p, required=False)
    add_vouch_options(p)
    p.set_defaults(func=cmd_reseal)

    import importlib

    for module, names in COMMAND_MODULES.items():
        if only is None or only in names:
            importlib.import_module(f".{module}", __package__).register(sub)
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
    from ..errors import MeasurementMismatch
    from ..tpm.unseal import unseal

    if not args.check:
        raise UsageError(
            "unseal prints nothing secret: use --check to test that the TPM releases the secret",
            hint="The master secret itself is only used inside qubes-seal (the boot unlock).",
        )
    sealed = state_mod.load(args.state_dir)
    try:
        secret = unseal(sealed, tcti=args.tpm)
    except MeasurementMismatch as exc:  # why, by component (a diagnosis: the exit stays 3)
        from . import refusal

        refusal.attach(exc, sealed, args, unsealed=False)
        raise
    secret.wipe()
    emit(args, {"unsealed": True}, "ok: the TPM released the master secret")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from .. import state as state_mod
    from ..errors import CorruptState
    from ..policy import launch_happened
    from ..tpm.device import SRK_HANDLE, Tpm
    from ..tpm.seal import DRTM_PCR

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
        container = args.container
        if container is None and Path(DEFAULT_CONTAINER).exists():
            container = Path(DEFAULT_CONTAINER)
        container_doc: dict[str, Any] | None = None
        container_lines: list[str] = []
        if container is not None:
            from .status_container import summary

            container_doc, container_lines = summary(container, tpm, txt_log=args.txt_log)
        from . import status_txt

        txt_doc, txt_lines = status_txt.summary(args.mem, args.txt_log, tpm)
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
    if da["recovery_seconds"] == 0:
        lines.append("  recovery: none (interval 0): only the lockout authorization clears it")
    else:
        lines.append(
            f"  one try forgiven every {da['recovery_seconds']} s; all forgiven within about "
            f"{da['all_forgiven_within_seconds']} s (TPM powered-on time)"
        )
    if da["in_lockout"]:
        wait = da["next_try_within_seconds"]
        lines.append(
            f"  locked out: next try possible within {wait} s"
            if wait >= 0
            else "  locked out: it does not recover by itself; clear it with the lockout "
            "authorization (tpm2_dictionarylockout --clear-lockout)"
        )
    from ..lockout import FIX, warning_lines

    doc["tpm"]["lockout_auth"] = {
        "set": da["lockout_auth_set"],
        "fix": None if da["lockout_auth_set"] else FIX,
    }
    lines += warning_lines(bool(da["lockout_auth_set"]))
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
    doc["container"] = container_doc
    lines += container_lines
    doc["txt"] = txt_doc
    lines += txt_lines
    from .. import journal

    doc["journal"], journal_line = journal.summary(args.state_dir)
    lines.append(journal_line)
    from .. import handover

    ours = container_doc.get("uuid") if container_doc else None
    doc["handover"], handover_lines = handover.summary(
        ours if isinstance(ours, str) else None, env("QUBES_SEAL_KEYRING", "user")
    )
    lines += handover_lines
    from ..service import client as key_service

    doc["key_service"], service_lines = key_service.summary()
    lines += service_lines
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


def add_component_options(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The options that name the next boot's components: files or a GRUB entry."""
    g = p.add_argument_group(
        "the next boot's components (files, or --grub-cfg with --entry)"
        + ("" if required else ", with --predict")
    )
    g.add_argument(
        "--txt-log",
        metavar="FILE",
        type=Path,
        help="this boot's TXT event log (TCG crypto-agile or tboot legacy)",
    )
    g.add_argument("--xen", metavar="PATH", type=Path, help="Xen image (module 0)")
    g.add_argument(
        "--xen-cmdline",
        metavar="STR",
        default="",
        help="Xen's module string as measured (the words after the path)",
    )
    g.add_argument("--kernel", metavar="PATH", type=Path, help="dom0's kernel")
    g.add_argument("--kernel-cmdline", metavar="STR", default="", help="its module string")
    g.add_argument("--initramfs", metavar="PATH", type=Path, help="dom0's initramfs")
    g.add_argument("--initramfs-cmdline", metavar="STR", default="", help="its module string")
    g.add_argument(
        "--nounzip",
        action="store_true",
        help="files are measured as they are (GRUB --nounzip); by default gzip "
        "and xz files are measured decompressed, as GRUB loads them",
    )
    g.add_argument(
        "--tboot", metavar="FILE", type=Path,
        help="the next boot's tboot (tboot.gz): SINIT's MLE_HASH is recomputed from it "
        "(default: from the --entry's multiboot2 line; else tboot is taken as unchanged)",
    )  # fmt: skip
    g.add_argument(
        "--tboot-cmdline", metavar="STR", default="",
        help="tboot's command line as measured (the words after its path on the multiboot2 "
        "line, e.g. 'logging=serial,memory,vga'); part of the MLE hash",
    )  # fmt: skip
    g.add_argument("--grub-cfg", metavar="FILE", type=Path, help="read the entry from grub.cfg")
    g.add_argument("--entry", metavar="TITLE", help="the menuentry title in --grub-cfg")
    g.add_argument("--boot-dir", metavar="DIR", type=Path, default=Path("/boot"),
                   help="where GRUB's paths point (default /boot)")  # fmt: skip


def read_txt_log(args: argparse.Namespace) -> Any:
    from ..measure import eventlog

    if args.txt_log is None:
        raise UsageError("--txt-log is required: this boot's TXT event log")
    try:
        return eventlog.parse(args.txt_log.read_bytes())
    except OSError as exc:
        raise UsageError(f"cannot read the TXT event log {args.txt_log}: {exc.strerror}") from exc


def next_boot(args: argparse.Namespace) -> tuple[list[Any], list[tuple[str, Path, bytes | None]]]:
    """The next boot's modules as tboot will measure them, and the files they come from:
    ``(role, path, module string)``, tboot's file first (module string None) for an entry."""
    from ..measure import grub, tboot
    from ..measure.predict import Component

    if args.grub_cfg is not None:
        if args.entry is None:
            raise UsageError("--grub-cfg needs --entry TITLE")
        try:
            text = args.grub_cfg.read_text(errors="replace")
        except OSError as exc:
            raise UsageError(f"cannot read {args.grub_cfg}: {exc.strerror}") from exc
        entry = grub.find_entry(text, args.entry)
        components = grub.components_from_entry(entry, boot_dir=args.boot_dir)
        files: list[tuple[str, Path, bytes | None]] = []
        if entry.kernel:  # not measured as a module (SINIT measures it): vouched, if found
            try:
                tboot_path = grub.resolve(entry.kernel, args.boot_dir)
            except UsageError:
                tboot_path = args.boot_dir / Path(entry.kernel).name
            files.append(("tboot", tboot_path, None))
        measured = [
            grub.resolve(m.path, args.boot_dir)
            for m in entry.modules
            if not grub.is_dropped_by_tboot(
                tboot.load_module_image(grub.resolve(m.path, args.boot_dir), nounzip=m.nounzip)
            )
        ]
        files += [(c.name, path, c.cmdline) for c, path in zip(components, measured, strict=True)]
        return components, files
    missing = [o for o in ("xen", "kernel", "initramfs") if getattr(args, o) is None]
    if missing:
        raise UsageError(
            "missing " + ", ".join(f"--{m}" for m in missing),
            hint="Name Xen, dom0's kernel and initramfs, or a GRUB entry (--grub-cfg, --entry).",
        )
    components = [
        Component(
            name,
            getattr(args, f"{name}_cmdline").encode(),
            tboot.load_module_image(getattr(args, name), nounzip=args.nounzip),
        )
        for name in ("xen", "kernel", "initramfs")
    ]
    return components, [(c.name, getattr(args, c.name), c.cmdline) for c in components]


def next_tboot(
    args: argparse.Namespace, files: list[tuple[str, Path, bytes | None]]
) -> tuple[Any, dict[str, Any]]:
    """The next boot's tboot (``NextTboot``, or None: taken as unchanged) and what was
    decided (JSON ``tboot``: ``recomputed``, ``file``, ``cmdline``, ``mle_caps``, ``note``).
    ``--tboot FILE`` wins; else the GRUB entry's multiboot2 line, when its file is a tboot
    image.  The tboot row of ``files`` gets the command line to vouch for."""
    from ..measure import grub
    from ..measure.mle import NotAnMleImage, TbootImage, TbootImageError
    from ..measure.predict import NextTboot
    from ..measure.tboot import ModuleTooLarge

    if args.tboot is not None:
        image = TbootImage.from_file(args.tboot)
        cmdline = args.tboot_cmdline.encode()
        files[:] = [f for f in files if f[0] != "tboot"]
        files.insert(0, ("tboot", args.tboot, cmdline))
    elif args.grub_cfg is not None and files and files[0][0] == "tboot":
        entry = grub.find_entry(args.grub_cfg.read_text(errors="replace"), args.entry)
        if entry.kernel_uses_variables:
            raise UsageError(f"tboot's line in {args.entry!r} uses GRUB variables: its "
                             "command line cannot be known in advance")  # fmt: skip
        path = files[0][1]
        try:
            image = TbootImage.from_file(path)
        except NotAnMleImage:
            return None, kept(f"tboot {path} is not an MLE image")
        except (TbootImageError, ModuleTooLarge):
            raise  # a broken or hostile tboot.gz: exit 7, never "unchanged"
        except UsageError:  # not found or unreadable: as before, tboot taken as unchanged
            return None, kept(f"tboot {path} is not readable")
        cmdline = entry.kernel_cmdline
        files[0] = ("tboot", path, cmdline)
    else:
        return None, kept("no new tboot named (--tboot, or a GRUB entry)")
    caps = image.header.capabilities
    shown = cmdline.decode(errors="replace")
    return NextTboot(image, cmdline), {
        "recomputed": True, "file": image.name, "cmdline": shown, "mle_caps": caps,
        "note": f"tboot {image.name} (MLE header caps {caps:#x}) with command line "
        f"{shown!r}: MLE_HASH recomputed",
    }  # fmt: skip


def kept(why: str) -> dict[str, Any]:
    """JSON ``tboot`` when the prediction keeps this boot's MLE_HASH (tboot unchanged)."""
    note = f"{why}: tboot taken as unchanged, MLE_HASH kept from this boot's log"
    return {"recomputed": False, "file": None, "cmdline": None, "mle_caps": None, "note": note}


def predicted_pcrs(args: argparse.Namespace) -> tuple[dict[int, bytes], Any]:
    """The next boot's PCR 17/18, and the report of who vouches for what it is made of."""
    from ..measure import vouch
    from ..measure.predict import predict_txt

    log = read_txt_log(args)
    components, files = next_boot(args)
    new_tboot, args.tboot_note = next_tboot(args, files)
    values = predict_txt(log, components, tboot=new_tboot)
    args.predicted_record = predicted_record(log, components, files, new_tboot)
    report = vouch.check_boot(
        files,
        rpm=vouch.RpmDb(args.rpm_dbpath),
        records=vouch.Records(args.state_dir),
        etc_default_grub=args.etc_default_grub,
    )
    return values, report


def predicted_record(
    log: Any, components: list[Any], files: list[tuple[str, Path, bytes | None]], new_tboot: Any
) -> dict[str, Any] | None:
    """What the predicted boot is made of (:mod:`qubes_seal.measure.explain`), kept with its
    state to explain a later refusal; None when it cannot be made (never an error)."""
    from ..errors import QubesSealError
    from ..measure import explain
    from ..measure.predict import predict_events

    try:
        events = predict_events(log, components, tboot=new_tboot)
        paths = [f[1] for f in files if f[0] != "tboot"]
        modules = [explain.facts(c.name, p, c.cmdline, c.image)
                   for c, p in zip(components, paths, strict=False)]  # fmt: skip
        tboot_file = next((f[1].name for f in files if f[0] == "tboot"), None)
        return explain.predicted_record(
            events, modules,
            tboot_file=tboot_file if new_tboot is not None else None,
            tboot_cmdline=None if new_tboot is None else new_tboot.cmdline,
        )  # fmt: skip
    except QubesSealError:
        return None


def cmd_predict(args: argparse.Namespace) -> int:
    from .vouch_cmd import gate

    values, report = predicted_pcrs(args)
    doc: dict[str, Any] = {"pcrs": {"sha256": {str(p): v.hex() for p, v in sorted(values.items())}},
                           "vouch": report.as_dict(), "tboot": args.tboot_note}  # fmt: skip
    text = "predicted next boot (sha256):\n" + "\n".join(
        f"  PCR {p}: {v.hex()}" for p, v in sorted(values.items())
    )
    text += f"\n{args.tboot_note['note']}"
    text += "\nmade of:\n" + "\n".join(report.lines())
    if args.container is not None:
        from .. import chain

        gate(report, what="sign the predicted boot")
        approval = chain.approval(args.container, tcti=args.tpm, values=values)
        doc["approval"] = approval
        if approval is None:
            text += "\nno preview: the container's token does not use signed policies"
        else:
            text += (
                f"\npreview of the approval (counter bound {approval['counter_bound']}), "
                "NOT signed:\n"
                f"  approved policy {approval['approved_policy']}\n"
                "'qubes-seal reseal --predict' with the same components signs it (a preview "
                "never hands out a signature)"
            )
    emit(args, doc, text)
    return 0


def journalled_reseal(
    args: argparse.Namespace,
    predicted: list[dict[int, bytes]],
    records: list[dict[str, Any] | None] | None = None,
) -> Any:
    """``chain.reseal_container`` under a journal record (op ``reseal``): killed after the
    token was written, ``repair`` makes the counter increment that did not happen."""
    from .. import chain
    from ..journal import Journal

    journal = Journal.begin(args.state_dir, "reseal", args.container)
    try:
        token = chain.reseal_container(
            args.container, tcti=args.tpm, predicted=predicted, records=records,
            keyring=getattr(args, "keyring", "user") or "user",
        )  # fmt: skip
    finally:  # a clean failure leaves the container consistent (one atomic token import)
        journal.finish()
    return token


def reseal_container(args: argparse.Namespace) -> int:
    from .vouch_cmd import gate

    predicted: list[dict[int, bytes]] = []
    report = None
    if args.predict:
        values, report = predicted_pcrs(args)
        gate(report, what="approve this boot and the predicted one")
        check_log_matches_tpm(args)
        predicted.append(values)
    elif any(getattr(args, o) is not None
             for o in ("xen", "kernel", "initramfs", "grub_cfg", "tboot")):  # fmt: skip
        raise UsageError("component options given without --predict")
    records = [getattr(args, "predicted_record", None)] if predicted else None
    token = journalled_reseal(args, predicted, records)
    new = token.sealed
    if new.signed is not None:
        lines = [f"signed {len(new.pcr_states)} accepted boot state(s) with the dom0 "
                 "policy-signing key (the sealed object is unchanged):"]  # fmt: skip
    else:
        lines = [f"resealed the container's master secret (unchanged) to "
                 f"{len(new.pcr_states)} accepted state(s):"]  # fmt: skip
    for s in new.pcr_states:
        lines.append(f"  {s.label}:")
        lines += [f"    PCR {p:>2}: {v.hex()}" for p, v in sorted(s.values.items())]
    if token.proof is not None:
        lines.append("  the proof of a clean boot follows the same states")
    if new.nv is not None:
        lines.append(
            f"  rollback counter 0x{new.nv.handle:08x} now at {new.nv.bound}: older "
            "signatures and tokens are void"
        )
    doc = {
        "resealed": True,
        "vouch": None if report is None else report.as_dict(),
        "signed": new.signed is not None,
        "counter": None if new.nv is None else new.nv.bound,
        "container": str(args.container),
        "states": [
            {"label": s.label, "pcrs": {str(p): v.hex() for p, v in sorted(s.values.items())}}
            for s in new.pcr_states
        ],
    }
    emit(args, doc, "\n".join(lines))
    return 0


def check_log_matches_tpm(args: argparse.Namespace) -> None:
    """A prediction is only as good as its log: it must replay to this boot's PCR 17/18."""
    from ..errors import MeasurementMismatch
    from ..measure.predict import DRTM_PCRS, current_txt
    from ..tpm.device import Tpm

    replayed = current_txt(read_txt_log(args))
    with Tpm(args.tpm) as tpm:
        now = tpm.read_pcrs(DRTM_PCRS)
    diffs = [(p, replayed.get(p, b"").hex(), now[p].hex()) for p in DRTM_PCRS
             if replayed.get(p) != now[p]]  # fmt: skip
    if diffs:
        raise MeasurementMismatch(
            f"the TXT event log {args.txt_log} does not replay to this boot's PCRs",
            diffs=diffs,
            hint="A prediction needs this boot's own TXT event log (captured at boot). "
            "Nothing was resealed.",
        )


def cmd_reseal(args: argparse.Namespace) -> int:
    from .. import state as state_mod
    from ..state import PcrState
    from ..tpm.seal import reseal

    if args.container is not None:
        return reseal_container(args)
    sealed = state_mod.load(args.state_dir)
    from .vouch_cmd import gate

    extra: list[PcrState] = []
    report = None
    if args.predict:
        predicted, report = predicted_pcrs(args)
        outside = [p for p in sealed.pcrs if p not in predicted]
        if outside:
            raise UsageError(
                f"the prediction covers PCR 17 and 18 only; the sealed selection also has "
                f"{outside}",
                hint="Seal to the DRTM PCRs (--pcrs 17,18) to use prediction.",
            )
        gate(report, what="approve this boot and the predicted one")
        check_log_matches_tpm(args)
        extra = [PcrState("predicted", {p: predicted[p] for p in sealed.pcrs})]
    elif any(getattr(args, o) is not None
             for o in ("xen", "kernel", "initramfs", "grub_cfg", "tboot")):  # fmt: skip
        raise UsageError("component options given without --predict")
    new = reseal(sealed, tcti=args.tpm, extra_states=extra)
    written = state_mod.save(new, args.state_dir)
    labels = [s.label for s in new.pcr_states]
    lines = [f"resealed the master secret (unchanged) to {len(labels)} accepted state(s):"]
    for s in new.pcr_states:
        lines.append(f"  {s.label}:")
        lines += [f"    PCR {p:>2}: {v.hex()}" for p, v in sorted(s.values.items())]
    lines.append(f"  state: {written}")
    doc = {
        "resealed": True,
        "vouch": None if report is None else report.as_dict(),
        "states": [
            {"label": s.label, "pcrs": {str(p): v.hex() for p, v in sorted(s.values.items())}}
            for s in new.pcr_states
        ],
    }
    emit(args, doc, "\n".join(lines))
    return 0


# -- entry point ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    from ..hardening import no_core_dumps

    no_core_dumps()  # before any secret: a crash leaves no core file (issue 13)
    try:
        argv = list(sys.argv[1:] if argv is None else argv)
        name = command_in(argv)
        parser = build_parser(only=name if name in ALL_COMMANDS else None)
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
