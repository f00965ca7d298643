"""The container commands: init, unlock, recover, lock, domain add|list|show|remove."""

from __future__ import annotations

import argparse
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

from ..errors import QubesSealError, UsageError

SIZE_RE = re.compile(r"^(\d+)([KMG]?)i?B?$", re.IGNORECASE)
DEFAULT_SIZE = "16M"


def parse_size(text: str) -> int:
    m = SIZE_RE.match(text.strip())
    if not m:
        raise UsageError(f"invalid size {text!r}", hint="Examples: 16M, 32MiB, 1G, 4194304.")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[m.group(2).upper()]
    return int(m.group(1)) * scale


def add_unlock_options(p: argparse.ArgumentParser, *, kdf: bool) -> None:
    """--passphrase-file, --keyring (and --kdf-time/--kdf-memory) for the rotate commands."""
    from .main import env

    default = env("QUBES_SEAL_PASSPHRASE_FILE", "")
    p.add_argument(
        "--passphrase-file", metavar="FILE", type=Path,
        default=Path(default) if default else None,
        help="read the current passphrase from FILE ('-': stdin) instead of the terminal "
        "[QUBES_SEAL_PASSPHRASE_FILE]",
    )  # fmt: skip
    p.add_argument(
        "--keyring", choices=["user", "session"], default=env("QUBES_SEAL_KEYRING", "user"),
        help="kernel keyring of this boot's hand-over (default: root's user keyring) "
        "[QUBES_SEAL_KEYRING]",
    )  # fmt: skip
    if kdf:
        t, m = env("QUBES_SEAL_KDF_TIME", ""), env("QUBES_SEAL_KDF_MEMORY", "")
        p.add_argument(
            "--kdf-time", metavar="MS", type=int, default=int(t) if t else None,
            help="new Argon2id target time (default: keep the current cost, new salt) "
            "[QUBES_SEAL_KDF_TIME]",
        )  # fmt: skip
        p.add_argument(
            "--kdf-memory", metavar="KIB", type=int, default=int(m) if m else None,
            help="new Argon2id memory in KiB (default: keep the current cost) "
            "[QUBES_SEAL_KDF_MEMORY]",
        )  # fmt: skip


def register(sub: Any) -> None:
    from .main import add_command, add_container_option, env, env_bool

    container_opt = add_container_option

    def unsafe_opt(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument(
            "--unsafe-no-measured-launch", action="store_true",
            default=env_bool("QUBES_SEAL_UNSAFE_NO_MEASURED_LAUNCH"),
            help=f"UNSAFE, for tests: {what} [QUBES_SEAL_UNSAFE_NO_MEASURED_LAUNCH]",
        )  # fmt: skip

    def unsafe_pcr_opt(p: argparse.ArgumentParser, what: str) -> None:
        p.add_argument(
            "--unsafe-pcr-selection", action="store_true",
            default=env_bool("QUBES_SEAL_UNSAFE_PCR_SELECTION"),
            help=f"UNSAFE, for tests: {what} [QUBES_SEAL_UNSAFE_PCR_SELECTION]",
        )  # fmt: skip

    def passphrase_opt(p: argparse.ArgumentParser) -> None:
        default = env("QUBES_SEAL_PASSPHRASE_FILE", "")
        p.add_argument(
            "--passphrase-file", metavar="FILE", type=Path,
            default=Path(default) if default else None,
            help="read the passphrase from FILE ('-': stdin) instead of the terminal "
            "[QUBES_SEAL_PASSPHRASE_FILE]",
        )  # fmt: skip

    def keyring_opt(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--keyring", choices=["user", "session", "none"],
            default=env("QUBES_SEAL_KEYRING", "user"),
            help="kernel keyring for the hand-over to the key service (default: root's user "
            "keyring) [QUBES_SEAL_KEYRING]",
        )  # fmt: skip

    def kdf_opts(p: argparse.ArgumentParser) -> None:
        t, m = env("QUBES_SEAL_KDF_TIME", ""), env("QUBES_SEAL_KDF_MEMORY", "")
        p.add_argument(
            "--kdf-time", metavar="MS", type=int, default=int(t) if t else None,
            help="Argon2id target time per derivation (default: calibrated to 1000 ms) "
            "[QUBES_SEAL_KDF_TIME]",
        )  # fmt: skip
        p.add_argument(
            "--kdf-memory", metavar="KIB", type=int, default=int(m) if m else None,
            help="Argon2id memory in KiB (default 1048576, lowered to what the machine can "
            "spare, never below 65536 when calibrated) [QUBES_SEAL_KDF_MEMORY]",
        )  # fmt: skip

    p = add_command(
        sub,
        "init",
        "create the container of per-domain keys and seal its master secret",
        "Create a LUKS2 container (aes-xts-plain64) holding an empty keystore, with two\n"
        "keyslots: one for the key derived from the TPM's master secret and your passphrase,\n"
        "one for a recovery key (shown once). Seal the master secret to PCR 13 (the\n"
        "container's header), 17 and 18 (tboot's measurements), with the passphrase's\n"
        "Argon2id half as the TPM object's authorization. The accepted boot is signed by a\n"
        "new dom0 policy-signing key kept in the keystore (signed policies: later updates\n"
        "are signatures, see 'reseal'), and bound to a new TPM NV rollback counter.\n"
        "Journalled: interrupted before the recovery key was delivered, 'qubes-seal repair'\n"
        "removes what it made.\n\n"
        "example:  qubes-seal init --container /var/lib/qubes-seal/keys.luks",
    )
    container_opt(p)
    passphrase_opt(p)
    kdf_opts(p)
    p.add_argument("--size", default=env("QUBES_SEAL_SIZE", ""),
                   help=f"container size (default {DEFAULT_SIZE} for a file; a partition or "
                   "other block device: its own size)")  # fmt: skip
    p.add_argument(
        "--pcrs", metavar="LIST", default=env("QUBES_SEAL_PCRS", ""),
        help="PCRs every accepted boot is signed over (default: dom0's launch policy, "
        "/etc/qubes-seal/launch.toml, else 13,17,18; 17 and 18 are required) "
        "[QUBES_SEAL_PCRS]",
    )  # fmt: skip
    unsafe_pcr_opt(p, "accept a selection without PCR 17 and 18")
    p.add_argument(
        "--recovery-key-file", metavar="FILE", type=Path,
        help="write the recovery key to FILE instead of showing it: a new file, mode 0600 "
        "(an existing file or a symbolic link is refused; FILE's directory is not changed)",
    )  # fmt: skip
    p.add_argument("--force", action="store_true", default=env_bool("QUBES_SEAL_FORCE"),
                   help="overwrite an existing container (its keys are lost)")  # fmt: skip
    p.add_argument(
        "--dom0-root-volume", metavar="NAME",
        default=env("QUBES_SEAL_DOM0_ROOT_VOLUME", "") or None,
        help="also keep a key for dom0's root LUKS volume NAME (as in /etc/crypttab): the "
        "boot hands it to systemd-cryptsetup, so one passphrase opens everything",
    )  # fmt: skip
    keyring_opt(p)
    unsafe_opt(p, "do not require a TXT measured launch")
    p.set_defaults(func=cmd_init)

    p = add_command(
        sub,
        "unlock",
        "open the container: TPM + passphrase, then hand the keys over",
        "The unlock chain: measure the container's header into PCR 13, ask the passphrase,\n"
        "unseal the master secret (the TPM checks PCR 13, 17, 18 and the passphrase's\n"
        "half), derive the LUKS key, open the container, read the keystore, cap PCR 13,\n"
        "and leave the volume key in the kernel keyring for the key service.\n\n"
        "A refusal (exit 3) says what differs by component: this boot's TXT log (--txt-log)\n"
        "against the events each accepted boot state was approved from (Xen, dom0's kernel\n"
        "and its command line, initramfs, tboot, SINIT/BIOS, the header). It is a\n"
        "diagnosis from unauthenticated data; the TPM's refusal stands either way.",
    )
    container_opt(p)
    passphrase_opt(p)
    keyring_opt(p)
    p.add_argument(
        "--txt-log", metavar="FILE", default=env("QUBES_SEAL_TXT_LOG", ""),
        help="this boot's TXT event log, to explain a refusal (default "
        "/run/qubes-seal/txt-event.log, as the boot captured it) [QUBES_SEAL_TXT_LOG]",
    )  # fmt: skip
    p.add_argument(
        "--backend", choices=["auto", "dm-crypt", "userspace"],
        default=env("QUBES_SEAL_BACKEND", "auto"),
        help="read the container through dm-crypt (production) or in user space (no "
        "device-mapper); auto: dm-crypt where available [QUBES_SEAL_BACKEND]",
    )  # fmt: skip
    p.set_defaults(func=cmd_unlock)

    p = add_command(
        sub,
        "recover",
        "open the container with the recovery key when the TPM says no",
        "Open the container with the recovery key (no TPM involved) and hand it over.\n"
        "With --reseal (or answering yes on a terminal), seal a new master secret to this\n"
        "boot: a new passphrase keyslot replaces the old one.\n\n"
        "The token is checked with the container's key: when it is authentic, its keystore\n"
        "generation is enforced (an older copy of the keys is refused, exit 3); when it is\n"
        "missing or was rewritten (exit 7 at unlock), the container still opens and says\n"
        "that the keys' freshness could not be checked. --reseal then writes a new,\n"
        "authenticated token from trusted inputs only: this boot's PCRs, dom0's launch\n"
        "policy (/etc/qubes-seal/launch.toml: PCR 13, 17, 18; a measured launch required),\n"
        "the keystore's signing key and the rollback counter the keystore records.",
    )
    container_opt(p)
    keyring_opt(p)
    passphrase_opt(p)
    kdf_opts(p)
    p.add_argument("--recovery-key-file", metavar="FILE", type=Path,
                   help="read the recovery key from FILE instead of the terminal")  # fmt: skip
    p.add_argument("--reseal", action="store_true", default=env_bool("QUBES_SEAL_RESEAL"),
                   help="seal a new master secret to this boot (asks the passphrase)")  # fmt: skip
    unsafe_opt(p, "reseal without a TXT measured launch")
    p.set_defaults(func=cmd_recover)

    p = add_command(
        sub,
        "attest",
        "proof of a clean boot: a text or TOTP code shown before the passphrase",
        "Seal a text you choose, or a TOTP seed, to the boot measurements alone (no\n"
        "passphrase). At every boot the text, or the current 6-digit code, is shown before\n"
        "the passphrase prompt: if it is missing or wrong, the boot is not genuine and you\n"
        "must not type your passphrase.\n\n"
        "  qubes-seal attest setup --text 'blue heron over the lake'\n"
        "  qubes-seal attest setup --totp      (shows the seed once: scan it with a phone)\n"
        "  qubes-seal attest show              (what the boot would show, if this boot can)",
    )
    asub = p.add_subparsers(dest="attest_command", metavar="ACTION", required=True)
    ap = add_command(asub, "setup", "seal the proof", "Seal a text or a TOTP seed.")
    container_opt(ap)
    which = ap.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--text", help="the text to show at boot (visible to other local users while the "
        "command runs, and kept in shell history: prefer --text-file)",
    )  # fmt: skip
    which.add_argument("--text-file", type=Path, help="read the text from FILE")
    which.add_argument("--totp", action="store_true", help="a TOTP seed (RFC 6238, 6 digits)")
    ap.set_defaults(func=cmd_attest)
    ap = add_command(asub, "show", "show the proof now", "Unseal and show the proof.")
    container_opt(ap)
    ap.set_defaults(func=cmd_attest)

    p = add_command(sub, "lock", "drop this boot's hand-over of the container's key",
                    "Unlink the volume key and the reseal bundle from the kernel keyring: the\n"
                    "key service locks (and wipes the keys from its memory). They cannot be\n"
                    "handed over again in this boot without the recovery key.\n\n"
                    "--stale keeps this container's hand-over and drops the others: another\n"
                    "container's (an older or re-initialised one, a test's) and expired ones,\n"
                    "as 'qubes-seal status' lists them.")  # fmt: skip
    container_opt(p)
    keyring_opt(p)
    p.add_argument("--stale", action="store_true",
                   help="drop only the stale hand-over keys, keep this container's")  # fmt: skip
    p.set_defaults(func=cmd_lock)

    p = add_command(
        sub,
        "domain",
        "per-domain disk keys: add, list, show, remove, rotate",
        "Work on the keystore: through this boot's hand-over when the container was\n"
        "unlocked, else by unlocking it (passphrase).\n\n"
        "examples:\n  qubes-seal domain add work --uuid 6f1b...\n  qubes-seal domain list --json\n"
        "  qubes-seal domain rotate work --uuid 6f1b...   (new key; the previous one is kept\n"
        "         and served to the storage domain, for 'qubes-seal-storage-agent rekey work')\n"
        "  qubes-seal domain rotate work --uuid 6f1b... --commit   (after the rekey: the\n"
        "                                                 previous key is destroyed)\n\n"
        "A qube of the qubes_seal pool: its volumes are re-keyed at its next start (kept at\n"
        "its stop); the commit is refused while one is recorded on the previous key\n"
        "('domain show' lists them; docs/QUBES-POOL.md).",
    )
    dsub = p.add_subparsers(dest="domain_command", metavar="ACTION", required=True)
    for name, help_ in (
        ("add", "create a new 512-bit key for a domain"),
        ("list", "list the domains (never their keys)"),
        ("show", "one domain's details (its key only with --show-key)"),
        ("remove", "destroy a domain's key"),
        ("rotate", "a new key; the previous one kept, and served for the rekey, until --commit"),
    ):
        dp = add_command(dsub, name, help_, help_)
        container_opt(dp)
        passphrase_opt(dp)
        keyring_opt(dp)
        if name != "list":
            dp.add_argument("name", metavar="NAME", help="the qube's name")
        if name in ("add", "show", "rotate"):
            dp.add_argument("--uuid", help="the qube's UUID (recommended: a reused name with "
                            "another UUID never gets this key)")  # fmt: skip
        if name == "show":
            dp.add_argument("--show-key", action="store_true",
                            help="print the key (hex): only where you mean it")  # fmt: skip
        if name == "rotate":
            dp.add_argument(
                "--commit", action="store_true",
                help="the volume now uses the new key (qubes-seal-storage-agent rekey; a pool "
                "qube: started and shut down once): destroy the previous one; refused while a "
                "pool volume of the qube is recorded on the previous key",
            )  # fmt: skip
            dp.add_argument(
                "--force", action="store_true",
                help="with --commit: commit even though pool volumes are not re-keyed (they "
                "are lost: only for volumes that no longer exist)",
            )  # fmt: skip
        if name in ("remove", "rotate"):
            # Both re-sign the accepted states afterwards (older copies revoked): the same
            # launch policy as 'reseal', weakened only by these flags (test machines).
            unsafe_opt(dp, "re-sign states of a boot without a TXT measured launch")
            unsafe_pcr_opt(dp, "re-sign states whose selection lacks PCR 17 and 18")
        dp.set_defaults(func=cmd_domain)


def _lockout_lines(args: argparse.Namespace, doc: dict[str, Any]) -> list[str]:
    """``init``'s word on the TPM's lockout authorization (a warning when it is empty).
    Never fails: the recovery key is delivered whatever the TPM answers here."""
    from ..errors import QubesSealError
    from ..lockout import FIX, warning_lines
    from ..tpm.device import Tpm

    try:
        with Tpm(args.tpm) as tpm:
            is_set = tpm.lockout_auth_set()
    except QubesSealError as exc:
        doc["tpm_lockout_auth"] = None
        return [f"lockout auth:    unknown ({exc.message})"]
    doc["tpm_lockout_auth"] = {"set": is_set, "fix": None if is_set else FIX}
    return warning_lines(is_set)


def _keyring(args: argparse.Namespace) -> str | None:
    return None if args.keyring == "none" else str(args.keyring)


def _kdf_params(args: argparse.Namespace) -> Any:
    from .. import kdf

    progress = _progress(args)
    if args.kdf_time is None and args.kdf_memory is None:
        progress("calibrating Argon2id for about 1 s on this machine")
        return kdf.calibrate(progress=progress)
    return kdf.params_for(time_ms=args.kdf_time, memory_kib=args.kdf_memory)


def _progress(args: argparse.Namespace) -> Any:
    def say(message: str) -> None:
        if not getattr(args, "json", False) or sys.stderr.isatty():
            print(f"qubes-seal: {message}...", file=sys.stderr, flush=True)

    return say


def cmd_init(args: argparse.Namespace) -> int:
    from .. import chain, launch
    from ..fsutil import refuse_existing, write_key_file
    from ..tpm.seal import parse_pcr_list
    from .main import emit
    from .prompt import ask

    policy = launch.load(
        unsafe_no_measured_launch=args.unsafe_no_measured_launch,
        unsafe_pcr_selection=args.unsafe_pcr_selection,
    )
    pcrs = parse_pcr_list(args.pcrs) if args.pcrs else list(policy.pcrs)
    # A block device (the container's partition, docs/INSTALL.md) is used whole, whatever
    # its size, unless --size says which size it must have.
    is_block = stat.S_ISBLK(os.stat(args.container).st_mode) if os.path.exists(
        args.container) else False  # fmt: skip
    size = parse_size(args.size) if args.size else (None if is_block else parse_size(DEFAULT_SIZE))
    if args.recovery_key_file is not None:
        refuse_existing(args.recovery_key_file)
    passphrase = ask("passphrase", path=args.passphrase_file, confirm=True)
    params = _kdf_params(args)
    from ..luks.container import PbkdfCost

    result = chain.init(
        args.container,
        tcti=args.tpm,
        passphrase=passphrase,
        size_bytes=size,
        pcrs=pcrs,
        kdf_params=params,
        # The recovery key carries 192 random bits: the PBKDF adds nothing against guessing,
        # so its slot costs what one passphrase derivation costs, no more.
        recovery_pbkdf=PbkdfCost(
            algorithm="argon2id",
            iterations=max(4, params.time_cost),
            memory_kib=max(32, min(params.memory_kib, 1 << 20)),
            parallelism=max(1, min(4, params.parallelism)),
        ),
        policy=policy,
        force=args.force,
        root_volume=args.dom0_root_volume,
        progress=_progress(args),
        state_dir=args.state_dir,
        key_file=args.recovery_key_file,
        keyring=_keyring(args),
    )
    passphrase.wipe()
    doc: dict[str, Any] = {
        "initialised": True,
        "container": str(args.container),
        "uuid": result.uuid,
        "pcrs": result.pcrs,
    }
    lines = [
        f"initialised {args.container} (LUKS2 UUID {result.uuid})",
        f"  master secret sealed to PCR {','.join(map(str, result.pcrs))} with your passphrase",
        "  this boot is signed by the new dom0 policy-signing key (kept in the keystore):",
        "  an update is approved with 'qubes-seal reseal --predict', not a new seal",
    ]
    with result.recovery_key as rkey:
        if args.recovery_key_file is not None:
            write_key_file(args.recovery_key_file, rkey)  # new, mode 0600; the dir untouched
            doc["recovery_key_file"] = str(args.recovery_key_file)
            lines.append(f"  recovery key written to {args.recovery_key_file} (mode 0600)")
        else:
            text = rkey.reveal().decode()
            doc["recovery_key"] = text
            lines += [
                "",
                "  RECOVERY KEY (shown once; write it down and keep it away from this machine):",
                "",
                f"      {text}",
                "",
                "  It opens the container with 'qubes-seal recover', or with stock cryptsetup.",
            ]
        lines += ["", *_lockout_lines(args, doc)]
        emit(args, doc, "\n".join(lines))
        sys.stdout.flush()
    from ..journal import crash_point

    crash_point("key-delivered")
    if result.journal is not None:
        result.journal.finish()  # the recovery key is delivered: the init is complete
    return 0


def _wipe(unlocked: Any) -> None:
    """Wipe what an open container left in this process: every key of its keystore and its
    volume key (a core file or a memory read after this finds zeros)."""
    try:
        unlocked.keystore.wipe()
    finally:
        unlocked.close()


def cmd_unlock(args: argparse.Namespace) -> int:
    from .. import chain
    from ..errors import MeasurementMismatch
    from .main import emit
    from .prompt import ask

    try:
        unlocked = chain.unlock(
            args.container,
            tcti=args.tpm,
            passphrase=lambda: ask("passphrase", path=args.passphrase_file),
            keyring=_keyring(args),
            backend=args.backend,
            progress=_progress(args),
        )
    except MeasurementMismatch as exc:  # why, by component (a diagnosis: the exit stays 3)
        from . import refusal

        refusal.attach(exc, refusal.token_state(args.container), args, unlocked=False)
        raise
    try:
        n = len(unlocked.keystore.list())
        ms = {k: round(v * 1000, 1) for k, v in unlocked.timings.parts.items()}
        doc = {
            "unlocked": True,
            "uuid": unlocked.uuid,
            "domains": n,
            "pcr13_capped": True,
            "handover": _keyring(args),
            "timings_ms": ms,
        }
        text = (
            f"unlocked {args.container}: {n} domain key(s); PCR 13 capped"
            + (f"; handed over to the kernel {args.keyring} keyring" if _keyring(args) else "")
            + "\n  time: " + ", ".join(f"{k} {v} ms" for k, v in ms.items())
        )  # fmt: skip
        emit(args, doc, text)
    finally:
        _wipe(unlocked)
    return 0


def cmd_recover(args: argparse.Namespace) -> int:
    from .. import chain, launch
    from .main import emit
    from .prompt import ask

    policy = launch.load(unsafe_no_measured_launch=args.unsafe_no_measured_launch)
    rkey = ask("recovery key", path=args.recovery_key_file)
    unlocked = chain.recover(args.container, recovery_key=rkey, keyring=_keyring(args))
    try:
        n = len(unlocked.keystore.list())
        problem = unlocked.token_problem
        generation = unlocked.keystore.generation
    finally:
        _wipe(unlocked)
    doc: dict[str, Any] = {"recovered": True, "domains": n, "resealed": False,
                           "token_authentic": problem is None,
                           "keystore_generation": generation}  # fmt: skip
    lines = [f"opened {args.container} with the recovery key: {n} domain key(s) intact"]
    if problem is not None:
        doc["token_problem"] = problem
        lines += [
            f"WARNING: the container's token is not used: {problem}.",
            f"  Its keystore (generation {generation}) could not be checked for freshness: if "
            "you did not expect this, someone may have tampered with the disk, and an older "
            "copy of the keys may have been restored. 'recover --reseal' writes a new token.",
        ]
    reseal = args.reseal
    if not reseal and sys.stdin.isatty() and not args.json:
        answer = input("Seal a new master secret to this boot? [y/N] ").strip().lower()
        reseal = answer in ("y", "yes")
    if reseal:
        passphrase = ask("passphrase", path=args.passphrase_file, confirm=True)
        token = chain.reseal_with_recovery(
            args.container,
            tcti=args.tpm,
            recovery_key=rkey,
            passphrase=passphrase,
            kdf_params=_kdf_params(args),
            policy=policy,
            progress=_progress(args),
        )
        passphrase.wipe()
        doc["resealed"] = True
        lines.append(f"resealed: new master secret in keyslot {token.tpm_keyslot}, sealed to "
                     f"PCR {','.join(map(str, token.sealed.pcrs))} of this boot")  # fmt: skip
    else:
        lines.append("not resealed: the next boot will need the recovery key again "
                     "(run 'qubes-seal recover --reseal' in a boot you trust)")  # fmt: skip
    rkey.wipe()
    emit(args, doc, "\n".join(lines))
    return 0


def cmd_attest(args: argparse.Namespace) -> int:
    from .. import attest, chain
    from ..luks.container import Container
    from ..tpm.device import Tpm
    from .main import emit
    from .prompt import read_secret_file

    container = Container(args.container)
    _, token = chain.read_token(container)  # 'show': the TPM decides, nothing is trusted
    if args.attest_command == "show":
        if token.proof is None:
            raise UsageError("no proof of a clean boot is set up: 'qubes-seal attest setup'")
        if chain.PCR13 in token.proof.sealed.pcrs:
            from ..luks.header import header_digest

            with Tpm(args.tpm) as tpm:  # as the boot does: the header is measured first
                chain.measure_header(tpm, header_digest(args.container))
        shown = attest.reveal(token.proof, tcti=args.tpm)
        emit(args, {"kind": token.proof.kind, "proof": shown},
             f"proof of a clean boot ({token.proof.kind}): {shown}")  # fmt: skip
        return 0
    if args.totp:
        kind, value = "totp", attest.new_value("totp", None)
    elif args.text_file is not None:
        text = read_secret_file(args.text_file, "text").reveal().decode("utf-8", "replace")
        kind, value = "text", attest.new_value("text", text)
    else:
        kind, value = "text", attest.new_value("text", args.text)
    keyring = getattr(args, "keyring", "user")
    approver = None if keyring == "none" else chain.approver(args.container, keyring=keyring)
    if approver is None:
        raise UsageError(
            "this boot did not unlock the container: the proof of a clean boot is signed by "
            "the dom0 policy-signing key, and the token is authenticated, from the keystore",
            hint="Run 'qubes-seal unlock' first (or set it up right after the boot's unlock).",
        )
    with approver, value, Tpm(args.tpm) as tpm:
        token = approver.token  # authenticated: its states are the ones the proof follows
        token.proof = attest.seal_proof(
            tpm, kind=kind, value=value, master=token.sealed, signer=approver.signer
        )
        approver.write(tcti=args.tpm)
        doc: dict[str, Any] = {"kind": kind}
        lines = [f"sealed a {kind} proof of a clean boot to PCR "
                 + ",".join(map(str, token.sealed.pcrs))]  # fmt: skip
        if kind == "totp":
            uri = attest.otpauth_uri(value.reveal())
            doc["otpauth_uri"] = uri
            lines += ["", "Add this to an authenticator app now (shown once):", "", f"  {uri}"]
            qr = attest.qr_code(uri)
            if qr:
                lines += ["", qr]
    emit(args, doc, "\n".join(lines))
    return 0


def cmd_lock(args: argparse.Namespace) -> int:
    from .. import chain
    from .main import emit

    keyring = args.keyring if args.keyring != "none" else "user"
    if args.stale:
        return _lock_stale(args, keyring)
    dropped = chain.lock(args.container, keyring=keyring)
    emit(args, {"dropped": dropped},
         "dropped the hand-over" if dropped else "no hand-over in this boot")  # fmt: skip
    return 0


def _lock_stale(args: argparse.Namespace, keyring: str) -> int:
    from .. import handover
    from ..luks.container import Container
    from .main import emit

    try:
        uuid = Container(args.container).uuid
    except QubesSealError as exc:  # a typo must not drop the real hand-over: refuse
        raise UsageError(
            f"cannot read the UUID of {args.container}: {exc.message}",
            hint="Name the container whose hand-over stays (--container); 'qubes-seal status' "
            "lists the keys.",
        ) from None
    dropped = handover.drop_stale(uuid, keyring=keyring)
    emit(args, {"dropped": [k.describe() for k in dropped], "kept_uuid": uuid},
         "\n".join([f"dropped {k.describe()}" for k in dropped]
                   or ["no stale hand-over key"]))  # fmt: skip
    return 0


def _pending_text(view: dict[str, Any]) -> str:
    pending = view.get("rotation_pending")
    if not pending:
        return ""
    return (f"  (rotation pending: previous key {pending['previous_key_id']}, generation "
            f"{pending['previous_generation']})")  # fmt: skip


def cmd_domain(args: argparse.Namespace) -> int:
    """``domain``: the writing actions (add, remove, rotate) are journalled: a crash after the
    keystore write leaves a record that ``repair`` completes (re-signs the token and
    increments the counter when a key was destroyed)."""
    action = args.domain_command
    if action not in ("add", "remove", "rotate"):
        return _cmd_domain(args, None)
    from ..journal import Journal

    op = f"domain-{action}" + ("-commit" if action == "rotate" and args.commit else "")
    journal = Journal.begin(args.state_dir, op, args.container, name=args.name)
    try:
        code = _cmd_domain(args, journal)
    except BaseException:
        if not journal.did("keystore-written"):
            journal.finish()  # nothing changed: no record to repair
        raise
    journal.finish()
    return code


def _cmd_domain(args: argparse.Namespace, journal: Any) -> int:
    from .. import chain
    from ..service import client
    from ..service.daemon import domain_view
    from .main import emit
    from .prompt import ask

    action = args.domain_command
    name = getattr(args, "name", None)
    qube_uuid = getattr(args, "uuid", None)
    show_key = bool(getattr(args, "show_key", False))
    doc: dict[str, Any]
    # A running, unlocked key service for this container: go through it, so that its memory
    # and the container change together (docs/KEYSERVICE.md); else the direct path.
    service = client.daemon_for(args.container)
    if service is not None and action == "rotate":
        raise UsageError(
            "the key service is running: 'domain rotate' goes through the keystore directly",
            hint="Stop the key service (systemctl stop qubes-seal-keyd), rotate, start it.",
        )
    if service is not None:
        request = {"op": action, "name": name, "qube_uuid": qube_uuid, "show_key": show_key}
        answer = client.admin(service, request)
        if journal is not None:
            journal.mark("keystore-written")
        doc = {k: v for k, v in answer.items() if k in ("domains", "added", "removed",
                                                         "domain", "key")}  # fmt: skip
    else:
        keyring = _keyring(args)
        unlocked = chain.open_handed_over(args.container, keyring=keyring) if keyring else None
        if unlocked is None:
            unlocked = chain.unlock(
                args.container,
                tcti=args.tpm,
                passphrase=lambda: ask("passphrase", path=args.passphrase_file),
                keyring=keyring,
                progress=_progress(args),
            )
        try:
            ks = unlocked.keystore
            if action == "list":
                doc = {"domains": [domain_view(d) for d in ks.list()]}
            elif action == "add":
                doc = {"added": domain_view(ks.add(name, qube_uuid=qube_uuid))}
                unlocked.save()
                journal.mark("keystore-written")
            elif action == "remove":
                ks.remove(name)
                unlocked.save()
                journal.mark("keystore-written")
                doc = {"removed": name}
            elif action == "rotate":
                from .. import rotate

                if args.force and not args.commit:
                    raise UsageError("--force goes with --commit only")
                if args.commit:
                    entry = rotate.commit_domain(ks, str(name), qube_uuid=qube_uuid,
                                                 force=args.force)  # fmt: skip
                else:
                    entry = rotate.rotate_domain(ks, str(name), qube_uuid=qube_uuid)
                unlocked.save()
                journal.mark("keystore-written")
                doc = {"rotated": {**entry.public_view(),
                                   "previous_kept": rotate.PREVIOUS in entry.extra,
                                   "committed": bool(args.commit)}}  # fmt: skip
            else:
                d = ks.get(name, qube_uuid=qube_uuid)
                doc = {"domain": domain_view(d)}
                if show_key:
                    doc["key"] = d.key.reveal().hex()
        finally:
            _wipe(unlocked)
    revoke_note = ""
    if action == "remove" or (action == "rotate" and args.commit):
        # The destroyed key is still in older copies of the container: void them.
        keyring = _keyring(args)
        from .. import launch

        policy = launch.load(
            unsafe_no_measured_launch=args.unsafe_no_measured_launch,
            unsafe_pcr_selection=args.unsafe_pcr_selection,
        )
        token = chain.refresh_token(
            args.container, tcti=args.tpm, keyring=keyring, policy=policy
        ) if keyring is not None else None  # fmt: skip
        doc["older_copies_revoked"] = token is not None
        if token is not None:
            journal.mark("refreshed")
        if token is not None and token.sealed.nv is not None:
            revoke_note = (
                f"; older copies of the container are revoked (rollback counter "
                f"0x{token.sealed.nv.handle:08x} now at {token.sealed.nv.bound})"
            )
        else:
            revoke_note = (
                "; older copies of the container still hold it until the next 'qubes-seal "
                "revoke' (no hand-over in this boot, or a token before signed policies)"
            )
    if action == "list":
        rows = [f"{r['name']:<32} key {r['key_id']}  generation {r['generation']}"
                + _pending_text(r) for r in doc["domains"]]  # fmt: skip
        text = "\n".join(rows) or "no domain keys"
    elif action == "add":
        text = f"added a key for {doc['added']['name']} (key id {doc['added']['key_id']})"
    elif action == "remove":
        text = f"removed the key of {name}: it is destroyed" + revoke_note
    elif action == "rotate":
        r = doc["rotated"]
        text = (
            f"committed the rotation of {name}: the previous key is destroyed; key id "
            f"{r['key_id']} (generation {r['generation']}) remains" + revoke_note
            if r["committed"]
            else f"new key for {name}: key id {r['key_id']} (generation {r['generation']}); "
            "the previous key is kept, and served to the storage domain, until the volume is "
            f"re-keyed: start the key service, run 'qubes-seal-storage-agent rekey {name} "
            f"--volume PATH' in the storage domain (a qube of the qubes_seal pool: start it "
            "once, the pool re-keys its volumes; docs/QUBES-POOL.md), then 'qubes-seal "
            f"domain rotate {name} --commit' here"
        )
    else:
        shown = {k: v for k, v in doc["domain"].items()
                 if k not in ("rotation_pending", "volumes")}  # fmt: skip
        text = "\n".join(f"{k}: {v}" for k, v in shown.items())
        for vol in doc["domain"].get("volumes", []):
            state = (
                "on the current key"
                if vol["on_current_key"]
                else f"on key {vol['key_id']}, not the current one: not re-keyed yet"
            )
            text += f"\npool volume {vol['volume']} (LUKS2 {vol['luks_uuid']}): {state}"
        pending = doc["domain"].get("rotation_pending")
        text += "\nrotation pending: " + (
            "no"
            if not pending
            else f"previous key {pending['previous_key_id']} (generation "
            f"{pending['previous_generation']}, rotated {pending['rotated']}): re-key the "
            f"volume in the storage domain, then 'qubes-seal domain rotate {name} --commit'"
        )
        if show_key:
            text += f"\nkey: {doc['key']}"
    emit(args, doc, text)
    return 0
