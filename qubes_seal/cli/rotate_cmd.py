"""The rotation commands: rotate passphrase|master|recovery, and repair."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UsageError

ROTATE_HELP = """\
Replace one secret of the unlock chain, in a boot that unlocked the container (the
rotation uses this boot's hand-over; without one, the command unlocks first with the
current passphrase). Each rotation adds the new keyslot, reseals the master secret to the
header as it will be (PCR 13), and removes the old keyslot last; a journal in the state
directory lets 'qubes-seal repair' complete or roll back an interrupted one.

  qubes-seal rotate passphrase      new passphrase (asked twice), new Argon2id salt,
                                    new TPM authValue, new keyslot
  qubes-seal rotate master          new master secret (passphrase re-typed), new keyslot
  qubes-seal rotate recovery        new recovery key, shown once (or --recovery-key-file)
  qubes-seal rotate signer          new dom0 policy-signing key (the key that approves
                                    boot states), a new sealed object that trusts it

The other secrets stay valid: a passphrase rotation keeps the recovery key, and so on."""


def register(sub: Any) -> None:
    from .container_cmd import add_unlock_options
    from .main import add_command, add_container_option

    p = add_command(sub, "rotate", "replace the passphrase, master secret or recovery key",
                    ROTATE_HELP)  # fmt: skip
    rsub = p.add_subparsers(dest="rotate_command", metavar="WHAT", required=True)

    rp = add_command(
        rsub, "passphrase", "a new passphrase (and Argon2id salt, authValue, keyslot)",
        "Change the passphrase: the current one is checked against this boot's unlock (no\n"
        "TPM try is spent), the new one gets a new Argon2id salt, so a new TPM authValue\n"
        "and a new LUKS key in a new keyslot; the old keyslot is removed last.\n\n"
        "example:  qubes-seal rotate passphrase --kdf-time 1000",
    )  # fmt: skip
    add_container_option(rp)
    add_unlock_options(rp, kdf=True)
    rp.add_argument(
        "--new-passphrase-file", metavar="FILE", type=Path,
        help="read the new passphrase from FILE instead of asking it twice",
    )  # fmt: skip
    rp.set_defaults(func=cmd_rotate)

    rp = add_command(
        rsub,
        "master",
        "a new master secret sealed in the TPM, a new keyslot",
        "Replace the TPM-sealed master secret: the passphrase is re-typed (it derives the\n"
        "new LUKS key with the new secret), a new keyslot is added, the new secret sealed\n"
        "with the same passphrase authorization, the old keyslot removed, and this boot's\n"
        "reseal hand-over updated.",
    )
    add_container_option(rp)
    add_unlock_options(rp, kdf=False)
    rp.set_defaults(func=cmd_rotate)

    rp = add_command(
        rsub,
        "recovery",
        "a new recovery key; the old one stops working",
        "Create a new recovery key in a new keyslot, show it once (or write it, mode 0600,\n"
        "to a new --recovery-key-file), then remove the old recovery keyslot. The master\n"
        "secret is resealed to the changed header (PCR 13).",
    )
    add_container_option(rp)
    add_unlock_options(rp, kdf=False)
    rp.add_argument(
        "--recovery-key-file", metavar="FILE", type=Path,
        help="write the new recovery key to FILE (created, mode 0600; an existing file or a "
        "symbolic link is refused; FILE's directory is not changed)",
    )  # fmt: skip
    rp.set_defaults(func=cmd_rotate)

    rp = add_command(
        rsub,
        "signer",
        "a new dom0 policy-signing key; the old key's signatures stop working",
        "Replace the key that signs accepted boot states (it lives in the keystore): the\n"
        "master secret (unchanged, from this boot's unlock) is sealed again to a new object\n"
        "that trusts only the new key, the accepted states are signed with it, the old key\n"
        "is forgotten and the rollback counter incremented. No keyslot changes; no\n"
        "passphrase is asked when this boot unlocked the container.",
    )
    add_container_option(rp)
    add_unlock_options(rp, kdf=False)
    rp.set_defaults(func=cmd_rotate)

    p = add_command(
        sub, "revoke", "accept this boot only and revoke every older sealed object",
        "Sign this boot only (the sealed object is unchanged), then increment the TPM's\n"
        "rollback counter (NV index): every other accepted state (a predicted boot that\n"
        "should not happen), every older signature and sealed object, and every older copy\n"
        "of the container (its header and token with an old passphrase, its keystore with\n"
        "removed keys) stops unlocking. Needs this boot's unlock (or unlocks first with the\n"
        "passphrase).\n\n"
        "With --state LABEL (repeatable; the labels 'qubes-seal status --container' lists),\n"
        "only those boot states are revoked; the others stay accepted, signed again.\n\n"
        "examples:\n"
        "  qubes-seal revoke --container /var/lib/qubes-seal/keys.luks\n"
        "  qubes-seal revoke --state predicted     (an update withdrawn before the reboot)",
    )  # fmt: skip
    p.add_argument(
        "--state", metavar="LABEL", action="append", default=[],
        help="revoke only the accepted boot state with this label (repeatable)",
    )  # fmt: skip
    add_container_option(p)
    add_unlock_options(p, kdf=False)
    p.set_defaults(func=cmd_revoke)

    p = add_command(
        sub, "repair", "complete or roll back an interrupted operation",
        "Read the journal in the state directory and finish the operation it names\n"
        "('qubes-seal status' shows a pending one). No secret is needed.\n\n"
        "  rotate passphrase|master|recovery  interrupted before the new secret took\n"
        "        effect: rolled back (new keyslot removed, old token back); after: completed\n"
        "        (old keyslot removed, rollback counter incremented)\n"
        "  init  rolled back unless its recovery key was delivered: the container file it\n"
        "        created, its NV counter and the recovery key file are removed; run init again\n"
        "  reseal, revoke, domain add|remove|rotate  completed: the counter increment, and\n"
        "        after a destroyed key the token re-signed (needs this boot's unlock)\n\n"
        "Only what the journal proves the operation made is removed (a keyslot by its salt,\n"
        "a container by its UUID and inode, a key file by its content digest); anything else\n"
        "is left, and named. The state directory must be root's and writable by nobody else\n"
        "(exit 7 otherwise).\n\n"
        "With no journal and --container, the container's missing counter increment (if\n"
        "any) is made.",
    )  # fmt: skip
    add_container_option(
        p, optional=True, help_="refuse unless the interrupted operation is on this container"
    )
    p.set_defaults(func=cmd_repair)


def _ensure_unlocked(args: argparse.Namespace) -> None:
    """Unlock with the current passphrase when this boot left no hand-over."""
    from .. import chain, handover
    from ..luks.container import Container
    from .container_cmd import _progress, _wipe
    from .prompt import ask

    uuid = Container(args.container).uuid
    rs = handover.get(uuid, keyring=args.keyring, kind="rs")
    if rs is not None:
        rs.wipe()
        return
    vk = handover.get(uuid, keyring=args.keyring)
    if vk is not None:  # unlocked in this boot, PCR 13 capped: no second unlock possible
        vk.wipe()
        raise UsageError(
            "this boot's reseal hand-over has expired: a rotation needs it, and PCR 13, capped "
            "at the unlock, allows no second unlock in this boot",
            hint=f"Reboot and rotate within {handover.RS_LIFETIME // 60} minutes of the unlock "
            f"(the lifetime: {handover.RS_LIFETIME_ENV}, docs/DESIGN.md, 'The hand-over').",
        )
    unlocked = chain.unlock(
        args.container, tcti=args.tpm, keyring=args.keyring, progress=_progress(args),
        passphrase=lambda: ask("current passphrase", path=args.passphrase_file),
    )  # fmt: skip
    _wipe(unlocked)


def cmd_rotate(args: argparse.Namespace) -> int:
    from .. import rotate
    from .container_cmd import _kdf_params, _progress
    from .main import emit
    from .prompt import ask

    what = args.rotate_command
    progress = _progress(args)
    rk_file = args.recovery_key_file if what == "recovery" else None
    if rk_file is not None:
        from ..fsutil import refuse_existing

        refuse_existing(rk_file)
    _ensure_unlocked(args)
    doc: dict[str, Any] = {"rotated": what, "container": str(args.container)}
    lines: list[str] = []
    if what == "recovery":

        def deliver(key: Any) -> None:
            if args.recovery_key_file is not None:
                rotate.write_key_file(args.recovery_key_file, key)
                doc["recovery_key_file"] = str(args.recovery_key_file)
                lines.append(f"new recovery key written to {args.recovery_key_file} (0600)")
            else:
                text = key.reveal().decode()
                doc["recovery_key"] = text
                if not args.json:  # printed now: it must be seen before the old one goes
                    print("NEW RECOVERY KEY (shown once; write it down, keep it away from "
                          f"this machine):\n\n    {text}\n", flush=True)  # fmt: skip

        result = rotate.rotate_recovery(
            args.container, tcti=args.tpm, state_dir=args.state_dir, deliver=deliver,
            key_file=args.recovery_key_file, keyring=args.keyring, progress=progress,
        )  # fmt: skip
        lines.append(f"recovery key rotated: keyslot {result.keyslot} added, keyslot "
                     f"{result.removed_keyslot} (the old recovery key) removed")  # fmt: skip
    elif what == "signer":
        result = rotate.rotate_signer(
            args.container, tcti=args.tpm, state_dir=args.state_dir, keyring=args.keyring,
            progress=progress,
        )  # fmt: skip
        signed = result.token.sealed.signed
        assert signed is not None
        doc["signer_name"] = signed.name.hex()
        lines.append(f"policy-signing key rotated: new key {signed.name.hex()[:20]}...; "
                     f"{len(result.token.sealed.pcr_states)} accepted state(s) signed with it; "
                     "the old key and its signatures are revoked")  # fmt: skip
    else:
        current = ask("current passphrase" if what == "passphrase" else "passphrase",
                      path=args.passphrase_file)  # fmt: skip
        try:
            new = None
            if what == "passphrase":
                new = ask("new passphrase", path=args.new_passphrase_file, confirm=True)
            explicit = getattr(args, "kdf_time", None) or getattr(args, "kdf_memory", None)
            params = _kdf_params(args) if explicit else None
            result = rotate.rotate_tpm_key(
                args.container, tcti=args.tpm, state_dir=args.state_dir, passphrase=current,
                new_passphrase=new, new_master=what == "master", kdf_params=params,
                keyring=args.keyring, progress=progress,
            )  # fmt: skip
        finally:
            current.wipe()
            if new is not None:
                new.wipe()
        lines.append(f"{what} rotated: keyslot {result.keyslot} added, keyslot "
                     f"{result.removed_keyslot} removed; resealed to "
                     f"PCR {','.join(map(str, result.token.sealed.pcrs))}")  # fmt: skip
    doc.update({"keyslot": result.keyslot, "removed_keyslot": result.removed_keyslot})
    emit(args, doc, "\n".join(lines))
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    from .main import emit

    _ensure_unlocked(args)
    if args.state:
        return _revoke_states(args)
    from .main import journalled_reseal

    token = journalled_reseal(args, [])
    sealed = token.sealed
    doc: dict[str, Any] = {"revoked": True, "container": str(args.container),
                           "counter": None if sealed.nv is None else sealed.nv.bound}  # fmt: skip
    if sealed.nv is None:
        text = ("resealed to this boot only; this container has no rollback counter (sealed "
                "before it existed): run 'qubes-seal recover --reseal' to add one")  # fmt: skip
    else:
        text = (
            f"resealed to this boot only; rollback counter 0x{sealed.nv.handle:08x} now at "
            f"{sealed.nv.bound}: every older sealed object and other boot state is revoked"
        )
    emit(args, doc, text)
    return 0


def _revoke_states(args: argparse.Namespace) -> int:
    """``revoke --state LABEL``: the named states dropped, the others signed again."""
    from .. import chain
    from ..journal import Journal
    from .main import emit

    journal = Journal.begin(args.state_dir, "reseal", args.container)
    try:
        token = chain.refresh_token(
            args.container, tcti=args.tpm, keyring=args.keyring, drop=list(args.state)
        )
    finally:  # one atomic token import; 'repair' makes a missing increment
        journal.finish()
    if token is None:
        raise UsageError(
            "this container's token predates signed policies: it has no states to revoke "
            "one by one",
            hint="Run 'qubes-seal reseal' (moves it to signed policies), then revoke.",
        )
    sealed = token.sealed
    assert sealed.nv is not None
    doc: dict[str, Any] = {
        "revoked": sorted(set(args.state)),
        "kept": [s.label for s in sealed.pcr_states],
        "container": str(args.container),
        "counter": sealed.nv.bound,
    }
    text = (
        f"revoked {', '.join(sorted(set(args.state)))}; still accepted: "
        f"{', '.join(doc['kept'])} (signed again); rollback counter 0x{sealed.nv.handle:08x} "
        f"now at {sealed.nv.bound}: every older signature is void"
    )
    emit(args, doc, text)
    return 0


def cmd_repair(args: argparse.Namespace) -> int:
    from .. import rotate
    from ..journal import read
    from .main import emit

    pending = read(args.state_dir)
    given = args.container
    if (
        pending is not None
        and given is not None
        and Path(pending["container"]).resolve() != (given.resolve())
    ):
        raise UsageError(
            f"the interrupted operation is on {pending['container']}, not {args.container}"
        )
    result = rotate.repair(args.state_dir, tcti=args.tpm)
    if result is None:
        counted = False
        if given is not None:  # an interrupted reseal: its increment may be missing
            from ..chain import read_token, settle_counter
            from ..luks.container import Container

            counted = settle_counter(args.tpm, read_token(Container(given))[1].sealed)
        text = "no interrupted operation: nothing to repair"
        if counted:
            text += "\nthe rollback counter was incremented: older sealed objects are revoked"
        emit(args, {"repaired": None, "counter_incremented": counted}, text)
        return 0
    doc = {"repaired": result.op, "step": result.step, "action": result.action,
           "notes": result.notes}  # fmt: skip
    text = "\n".join([f"{result.op} (interrupted after step {result.step}): {result.action}",
                      *(f"  {n}" for n in result.notes)])  # fmt: skip
    emit(args, doc, text)
    return 0
