"""The TPM administration commands: ``qubes-seal tpm set-lockout-auth | reset-lockout |
clear-lockout-auth`` (the lockout authorization, see :mod:`qubes_seal.lockout`)."""

from __future__ import annotations

import argparse
from typing import Any

TPM_HELP = """\
The TPM's lockout authorization guards its dictionary-attack protection: whoever holds it
can forgive every wrong passphrase at once (TPM2_DictionaryAttackLockReset). A new or
cleared TPM has an empty one, so anyone who can reach the TPM can reset the counter and
guess passphrases without limit; 'qubes-seal status' warns about it.

  qubes-seal tpm set-lockout-auth     give the TPM a random lockout authorization, kept in
                                      the keystore inside the container (the recovery key
                                      gets it back); never shown
  qubes-seal tpm reset-lockout        leave a dictionary-attack lockout with it (after
                                      'qubes-seal recover' when the TPM is locked out)
  qubes-seal tpm clear-lockout-auth   set it back to empty (before clearing the TPM, or
                                      handing it to other tools)

Each needs this boot's hand-over of the container (a boot that unlocked it, or
'qubes-seal recover'); set and clear refuse while the key service runs. See
docs/OPERATIONS.md, "TPM lockout authorization"."""


def register(sub: Any) -> None:
    from .main import add_command, add_container_option, env

    p = add_command(sub, "tpm", "the TPM's lockout authorization: set, use, clear", TPM_HELP)
    tsub = p.add_subparsers(dest="tpm_command", metavar="WHAT", required=True)

    def common(q: argparse.ArgumentParser) -> None:
        add_container_option(q)
        q.add_argument(
            "--keyring", choices=["user", "session"], default=env("QUBES_SEAL_KEYRING", "user"),
            help="kernel keyring of this boot's hand-over (default: root's user keyring) "
            "[QUBES_SEAL_KEYRING]",
        )  # fmt: skip
        q.set_defaults(func=cmd_tpm)

    common(add_command(
        tsub, "set-lockout-auth", "a random lockout authorization, kept in the keystore",
        "Generate 32 random bytes, write them into the keystore inside the container, then\n"
        "make them the TPM's lockout authorization (TPM2_HierarchyChangeAuth, encrypted on\n"
        "the bus). Run again to replace a value qubes-seal set. A value set by other tools\n"
        "is refused (set it back to empty first). Crash-safe: see docs/OPERATIONS.md.\n\n"
        "example:  qubes-seal tpm set-lockout-auth --container /var/lib/qubes-seal/keys.luks",
    ))  # fmt: skip
    common(add_command(
        tsub, "reset-lockout", "leave a dictionary-attack lockout (TPM2_DictionaryAttackLockReset)",
        "Forgive every failed try and leave lockout, with the lockout authorization kept in\n"
        "the keystore (or the empty one, when the TPM has none). When the TPM is locked\n"
        "out, first open the container with the recovery key:\n\n"
        "  qubes-seal recover && qubes-seal tpm reset-lockout",
    ))  # fmt: skip
    common(add_command(
        tsub, "clear-lockout-auth", "set the lockout authorization back to empty",
        "Set the TPM's lockout authorization back to empty with the value kept in the\n"
        "keystore, then drop it from the keystore. 'qubes-seal status' warns afterwards.",
    ))  # fmt: skip


def cmd_tpm(args: argparse.Namespace) -> int:
    from .. import lockout
    from .main import emit

    what = args.tpm_command
    doc: dict[str, Any] = {"container": str(args.container)}
    if what == "set-lockout-auth":
        replaced = lockout.set_lockout_auth(args.container, tcti=args.tpm, keyring=args.keyring)
        doc.update({"lockout_auth_set": True, "replaced": replaced})
        text = (
            ("replaced the" if replaced else "set a new random")
            + " TPM lockout authorization (32 bytes, never shown); it is kept in the keystore of "
            f"{args.container}, which the recovery key opens.\n"
            "To leave a dictionary-attack lockout: qubes-seal tpm reset-lockout"
        )
    elif what == "reset-lockout":
        was_set = lockout.reset_lockout(args.container, tcti=args.tpm, keyring=args.keyring)
        doc.update({"reset": True, "lockout_auth_set": was_set})
        text = "dictionary-attack lockout reset: every failed try forgiven"
        if not was_set:
            text += "\n" + "\n".join(lockout.warning_lines(False))
    else:
        was_set = lockout.clear_lockout_auth(args.container, tcti=args.tpm, keyring=args.keyring)
        doc.update({"lockout_auth_set": False, "cleared": was_set})
        text = (
            "the TPM's lockout authorization is empty again"
            if was_set
            else "the TPM's lockout authorization was already empty"
        ) + f" (nothing kept in {args.container} any more)"
    emit(args, doc, text)
    return 0
