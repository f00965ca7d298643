"""Rotations: passphrase, master secret, recovery key; each journaled and crash-safe.

Every rotation changes keyslots, and keyslots are covered by the header digest that the
unlock extends into PCR 13.  So that an interruption at any point leaves a working unlock,
the keyslot change is first made on a *copy* of the header (``luksHeaderBackup``, then
``luksAddKey`` on the copy): the digests of the header with the new keyslot (D1) and of the
header once the old keyslot is gone (D2) are then known exactly before the container
changes.  The token is resealed to accept D0 (now), D1 and D2 before the copy is written
back (``luksHeaderRestore``), the old keyslot is removed last, and a final reseal accepts
the final header only::

    step                  container header   token accepts      works after a crash
    begun / staged        D0                 old: D0            old credentials
    keyslot-added         D1 (both slots)    old: D0, D1, (D2)  old (and new recovery key)
    token-replaced        D1                 new: D1, D2        new credentials
    old-keyslot-killed    D2                 new: D1, D2        new credentials
    resealed              D2                 new: D2            new credentials

``qubes-seal repair`` decides from the container itself (which keyslot the token names), not
only from the journal: before the new token is in the container it rolls back (removes the
new keyslot, puts the old token back); after, it rolls forward (removes the old keyslot).
Neither needs a secret; a roll-forward leaves the transitional digest D1 accepted by a token
whose authValue is the new one (harmless; the next ``reseal`` drops it).

The header copies live in memory only (:class:`qubes_seal.fsutil.MemoryFile`, an anonymous
``memfd`` that cryptsetup reaches as ``/proc/PID/fd/N``), zeroed when closed: they hold the
old keyslots, which a copy left on disk (even unlinked) would keep openable by the old
passphrase or recovery key after the rotation.  No step needs them after a crash: ``repair``
reads the container and the journal only.  ``repair`` removes only what the journal proves
the rotation made: the new keyslot (by its KDF salt, recorded at ``staged``), the old one
(by the salt recorded at ``begun``), the new key file (by the digest of its content,
recorded at ``begun``, and its mode and owner); anything else is left and named.
"""

from __future__ import annotations

import dataclasses
import hmac
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import handover
from .chain import (
    LUKS_KEY_CONTEXT,
    PCR13,
    Token,
    approver_from_volume_key,
    ensure_signer,
    make_bundle,
    pcr13_after_extend,
    read_token,
    repair_init,
    settle_counter,
    trusted_signer,
    unbundle,
)
from .errors import AuthorizationError, CorruptState, UsageError
from .fsutil import MemoryFile, key_file_digest, remove_if_ours
from .fsutil import write_key_file as _write_key_file
from .journal import Journal, crash_point
from .keystore import volumes
from .secret import Secret
from .state import PcrState
from .token import store_token

Progress = Callable[[str], None]
#: The names under which older versions kept the header copies in the state directory
#: (removed, zeroed first, by ``repair`` and after each rotation).
LEGACY_COPIES = ("rotate-header.img", "rotate-header-final.img")
OPS = ("rotate-passphrase", "rotate-master", "rotate-recovery")


def _quiet(_: str) -> None:
    pass


# -- helpers -------------------------------------------------------------------------------


def _handed_over(uuid: str, keyring: str) -> tuple[Secret, Secret, Secret, Secret | None]:
    """This boot's volume key, master secret, authValue and proof value."""
    vk = handover.get(uuid, keyring=keyring, kind="vk")
    bundle = handover.get(uuid, keyring=keyring, kind="rs")
    if vk is None or bundle is None:
        for s in (vk, bundle):
            if s is not None:
                s.wipe()
        raise UsageError(
            "this boot did not unlock the container with the TPM and passphrase: a rotation "
            "needs this boot's hand-over",
            hint="Run 'qubes-seal unlock' first (or let the command unlock with "
            "--passphrase-file).",
        )
    try:
        master, auth, proof = unbundle(bundle)
    finally:
        bundle.wipe()
    return vk, master, auth, proof


def copy_token(token: Token) -> Token:
    """An independent copy of an (authenticated) token, to change without touching it."""
    import copy

    return copy.deepcopy(token)


def _copy(secret: Secret) -> Secret:
    return Secret(bytes(secret.reveal()))


def _states(sealed: Any, digests: list[bytes]) -> list[PcrState]:
    """The (authenticated) token's accepted states, each with PCR 13 for every header digest
    in ``digests``; they must pass dom0's launch policy (its selection, a measured launch)."""
    from . import launch

    launch.load().check_kept_states(sealed.pcrs, sealed.pcr_states)
    if PCR13 not in sealed.pcrs:
        return list(sealed.pcr_states)
    out: list[PcrState] = []
    for d in digests:
        for s in sealed.pcr_states:
            state = PcrState(s.label, {**s.values, PCR13: pcr13_after_extend(d)}, s.record)
            if state not in out:
                out.append(state)
    if len(out) > 8:
        raise UsageError(
            f"the token accepts {len(sealed.pcr_states)} boot states: a rotation needs room "
            "for three header states of each (8 at most)",
            hint="Run 'qubes-seal reseal' (this boot only) first, then rotate.",
        )
    return out


def _seal_token(
    token: Token,
    *,
    tcti: str,
    master: Secret,
    auth: Secret,
    proof: Secret | None,
    states: list[PcrState],
    signer: Any,
) -> None:
    """Seal ``master`` (and the proof) to ``states`` in ``token``, signed by ``signer`` (a new
    object, policyRef and signatures); a proof without its value (none handed over) is
    dropped: 'attest setup' must be run again."""
    from .attest import seal_proof
    from .tpm.device import Tpm
    from .tpm.seal import seal_to_states

    old = token.sealed
    with Tpm(tcti) as tpm:
        token.sealed = seal_to_states(
            tpm, master, pcrs=old.pcrs, states=states, bank=old.pcr_bank,
            require_launch=True, auth=auth, nv=old.nv,
            signer=signer if old.nv is not None else None,
        )  # fmt: skip
        if token.proof is not None:
            if proof is None:
                token.proof = None
            else:
                token.proof = seal_proof(
                    tpm, kind=token.proof.kind, value=proof, master=token.sealed, signer=signer
                )


def _header_image(path: Path) -> bytes:
    """What ``cryptsetup luksHeaderBackup`` writes: both header copies and the keyslots area
    (rounded up to 4 KiB), read straight from the container (cryptsetup would only write it
    to a new file)."""
    from .luks.header import read_header

    header = read_header(path)
    size = -(-(2 * header.hdr_size + header.keyslots_size) // 4096) * 4096
    with open(path, "rb") as f:
        data = f.read(size)
    if len(data) != size:
        raise CorruptState(f"{path} is shorter than its LUKS2 header")
    return data


def slot_salt(path: Path, slot: int) -> str | None:
    """The KDF salt of keyslot ``slot`` (random, public, unique): what proves a keyslot."""
    from .luks.header import read_header

    kdf = read_header(path).keyslots.get(slot, {}).get("kdf", {})
    salt = kdf.get("salt") if isinstance(kdf, dict) else None
    return salt if isinstance(salt, str) else None


def _restore_header(path: Path, source: Path) -> None:
    from .luks import cryptsetup

    cryptsetup.run(["luksHeaderRestore", str(path)], options=["--header-backup-file", str(source)])


def kill_slot_unchecked(path: Path, slot: int) -> None:
    """Remove keyslot ``slot`` without a key (repair: the caller checked what remains)."""
    from .luks import cryptsetup
    from .luks.container import Container

    used = Container(path).slots()
    if slot not in used:
        return
    if used == [slot]:
        raise CorruptState(f"keyslot {slot} is the last one: refusing to remove it")
    cryptsetup.run(["luksKillSlot", str(path), str(slot)])


def add_key_with_volume_key(path: Path, vk: Secret, new: Secret, *, pbkdf: Any) -> int:
    """Add ``new`` in the lowest free keyslot, authorised by the volume key itself."""
    from .luks import cryptsetup
    from .luks.container import KEYSLOTS_MAX, Container

    used = set(Container(path).slots())
    free = [s for s in range(KEYSLOTS_MAX) if s not in used]
    if not free:
        raise UsageError("every keyslot is in use")
    cryptsetup.run(
        ["luksAddKey", str(path)],
        options=["--volume-key-file=/dev/stdin", f"--new-key-slot={free[0]}",
                 *pbkdf.options()],
        key=vk,
        new_key=new,
    )  # fmt: skip
    return free[0]


def _stage(
    path: Path,
    state_dir: Path,
    *,
    add: Callable[[Path], int],
    old_slot: int,
    new_key: Secret,
) -> tuple[MemoryFile, int, bytes, bytes]:
    """The header copy (in memory; the caller closes it) with the new keyslot; its digest
    (D1) and the final one (D2)."""
    from .luks.container import Container
    from .luks.header import header_digest

    copy = MemoryFile("qubes-seal-header", _header_image(path))
    try:
        new_slot = add(copy.path)
        d1 = header_digest(copy.path)
        with MemoryFile("qubes-seal-header-final", copy.read()) as final:
            Container(final.path).kill_slot(old_slot, existing=new_key)
            d2 = header_digest(final.path)
    except BaseException:
        copy.close()
        raise
    return copy, new_slot, d1, d2


def _cleanup(state_dir: Path) -> None:
    """Header copies an older version left in the state directory: zeroed, then removed (a
    regular file of ours only; a link is removed, never followed)."""
    for name in LEGACY_COPIES:
        path = Path(state_dir) / name
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            continue
        except OSError:
            path.unlink(missing_ok=True)  # a link (or worse): removed, not followed
            continue
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and st.st_nlink == 1:
                os.pwrite(fd, bytes(st.st_size), 0)
                os.fsync(fd)
        finally:
            os.close(fd)
        path.unlink(missing_ok=True)


# -- passphrase and master secret ------------------------------------------------------------


@dataclasses.dataclass
class RotateResult:
    op: str
    keyslot: int
    removed_keyslot: int
    token: Token


def _retire_old_slot(
    container: Any,
    token: Token,
    token_id: int,
    journal: Any,
    *,
    tcti: str,
    slot: int,
    existing: Secret,
    final_digest: bytes,
    master: Secret,
    auth: Secret,
    proof: Secret | None,
    old_sealed: Any,
    progress: Callable[[str], None],
    what: str,
    signer: Any,
    tkey: Secret,
) -> None:
    """The common end of a rotation, after the new token is in place: revoke the old object,
    kill the old keyslot, then reseal to the final header alone and revoke the transitional
    objects.  Each step is journalled, so `repair` can finish it."""
    from .luks.header import header_digest

    settle_counter(tcti, token.sealed)  # the old object (and its header) is revoked
    progress(f"removing the old {what} {slot}")
    container.kill_slot(slot, existing=existing)
    journal.mark("old-keyslot-killed")
    if header_digest(container.path) != final_digest:
        raise CorruptState("the header changed unexpectedly during the rotation")
    _seal_token(token, tcti=tcti, master=master, auth=auth, proof=proof,
                states=_states(old_sealed, [final_digest]), signer=signer)  # fmt: skip
    store_token(container, token, tkey, token_id=token_id)
    journal.mark("resealed")
    settle_counter(tcti, token.sealed)  # the transitional objects are revoked


def rotate_tpm_key(
    path: Path,
    *,
    tcti: str,
    state_dir: Path,
    passphrase: Secret,
    new_passphrase: Secret | None = None,
    new_master: bool = False,
    kdf_params: Any = None,
    keyring: str = "user",
    progress: Progress = _quiet,
) -> RotateResult:
    """A new passphrase (``new_passphrase``) and/or a new master secret (``new_master``).

    Always a new Argon2id salt (``kdf_params``: new parameters; None keeps the cost), so a new
    authValue and a new LUKS key, in a new keyslot; the old keyslot is removed last.
    ``passphrase`` is the current one, checked against this boot's hand-over (no TPM try).
    """
    from .kdf import KdfParams, derive, luks_key, new_salt
    from .luks.container import Container, PbkdfCost
    from .luks.header import header_digest

    op = "rotate-master" if new_master else "rotate-passphrase"
    container = Container(path)
    vk, master0, auth0, proof = _handed_over(container.uuid, keyring)
    ap = approver_from_volume_key(path, vk)  # the token's MAC checked first; wipes vk at close
    token_id, old, signer = ap.token_id, ap.token, ap.signer
    tkey = ap.unlocked.token_key()
    params0 = KdfParams.from_json(old.kdf)
    params1 = kdf_params or dataclasses.replace(params0, salt=new_salt())
    secrets: list[Secret | None] = [master0, auth0, proof, tkey]
    copy: MemoryFile | None = None
    try:
        progress("checking the current passphrase (Argon2id)")
        a0, mix0 = derive(passphrase, params0)
        secrets += [a0, mix0]
        if not hmac.compare_digest(a0.reveal(), auth0.reveal()):
            raise AuthorizationError(
                "the current passphrase is wrong (or the container was unlocked with "
                "another one in this boot)",
                hint="Give the passphrase this boot was unlocked with.",
            )
        old_key = luks_key(master0, mix0, params0, context=LUKS_KEY_CONTEXT)
        master1 = Secret.random(32) if new_master else _copy(master0)
        progress("deriving the new keys (Argon2id)")
        auth1, mix1 = derive(new_passphrase or passphrase, params1)
        new_key = luks_key(master1, mix1, params1, context=LUKS_KEY_CONTEXT)
        secrets += [old_key, master1, auth1, mix1, new_key]
        journal = Journal.begin(
            state_dir, op, path, uuid=container.uuid, token_id=token_id,
            old_token=old.raw, slots_before=container.slots(), old_slot=old.tpm_keyslot,
            old_slot_salt=slot_salt(path, old.tpm_keyslot),
        )  # fmt: skip
        crash_point("begun")
        progress("adding the new keyslot to a copy of the header")
        d0 = header_digest(path)
        copy, new_slot, d1, d2 = _stage(
            path, state_dir, old_slot=old.tpm_keyslot, new_key=new_key,
            add=lambda h: Container(h).add_key(old_key, new_key, pbkdf=PbkdfCost.minimal()),
        )  # fmt: skip
        progress("resealing the current master secret to the transitional header")
        keep = copy_token(old)
        _seal_token(keep, tcti=tcti, master=master0, auth=auth0, proof=proof,
                    states=_states(old.sealed, [d0, d1]), signer=signer)  # fmt: skip
        store_token(Container(copy.path), keep, tkey, token_id=token_id)
        journal.mark("staged", new_slot=new_slot, new_slot_salt=slot_salt(copy.path, new_slot))
        _restore_header(path, copy.path)
        copy.close()
        journal.mark("keyslot-added")
        progress("sealing the new secret")
        new = Token(
            old.sealed, params1.to_json(), new_slot, old.recovery_keyslot,
            proof=keep.proof, root_volume=old.root_volume,
            keystore_generation=old.keystore_generation,
        )  # fmt: skip
        _seal_token(new, tcti=tcti, master=master1, auth=auth1, proof=proof,
                    states=_states(old.sealed, [d1, d2]), signer=signer)  # fmt: skip
        store_token(container, new, tkey, token_id=token_id)
        journal.mark("token-replaced")
        _retire_old_slot(
            container, new, token_id, journal, tcti=tcti, slot=old.tpm_keyslot,
            existing=new_key, final_digest=d2, master=master1, auth=auth1, proof=proof,
            old_sealed=old.sealed, progress=progress, what="keyslot", signer=signer, tkey=tkey,
        )  # fmt: skip
        proof_copy = None if proof is None else _copy(proof)
        with make_bundle(_copy(master1), auth1, proof_copy) as bundle:
            handover.put(container.uuid, bundle, keyring=keyring, kind="rs")
        journal.finish()
        _cleanup(state_dir)
        return RotateResult(op, new_slot, old.tpm_keyslot, new)
    finally:
        if copy is not None:
            copy.close()
        ap.close()
        for s in secrets:
            if s is not None:
                s.wipe()


# -- recovery key ------------------------------------------------------------------------------


def rotate_recovery(
    path: Path,
    *,
    tcti: str,
    state_dir: Path,
    deliver: Callable[[Secret], None],
    key_file: Path | None = None,
    keyring: str = "user",
    progress: Progress = _quiet,
) -> RotateResult:
    """A new recovery key in a new keyslot; ``deliver`` shows or writes it before the old
    recovery keyslot is removed (it is the commit point: ``repair`` rolls forward after it)."""
    from . import recovery
    from .kdf import KdfParams
    from .luks.container import Container, PbkdfCost
    from .luks.header import header_digest

    container = Container(path)
    vk, master, auth, proof = _handed_over(container.uuid, keyring)
    ap = approver_from_volume_key(path, _copy(vk))  # the token's MAC checked first
    token_id, old, signer = ap.token_id, ap.token, ap.signer
    tkey = ap.unlocked.token_key()
    params = KdfParams.from_json(old.kdf)
    pbkdf = PbkdfCost(
        algorithm="argon2id",
        iterations=max(4, params.time_cost),
        memory_kib=max(32, min(params.memory_kib, 1 << 20)),
        parallelism=max(1, min(4, params.parallelism)),
    )
    rkey = recovery.generate()
    copy: MemoryFile | None = None
    try:
        journal = Journal.begin(
            state_dir, "rotate-recovery", path, uuid=container.uuid, token_id=token_id,
            old_token=old.raw, slots_before=container.slots(),
            old_slot=old.recovery_keyslot, old_slot_salt=slot_salt(path, old.recovery_keyslot),
            key_file=None if key_file is None else str(key_file),
            key_file_sha256=None if key_file is None else key_file_digest(rkey),
        )  # fmt: skip
        crash_point("begun")
        d0 = header_digest(path)
        progress("adding the new recovery keyslot to a copy of the header")
        copy, new_slot, d1, d2 = _stage(
            path, state_dir, old_slot=old.recovery_keyslot, new_key=rkey,
            add=lambda h: add_key_with_volume_key(h, vk, rkey, pbkdf=pbkdf),
        )  # fmt: skip
        token = copy_token(old)
        _seal_token(token, tcti=tcti, master=master, auth=auth, proof=proof,
                    states=_states(old.sealed, [d0, d1, d2]), signer=signer)  # fmt: skip
        store_token(Container(copy.path), token, tkey, token_id=token_id)
        journal.mark("staged", new_slot=new_slot, new_slot_salt=slot_salt(copy.path, new_slot))
        _restore_header(path, copy.path)
        copy.close()
        journal.mark("keyslot-added")
        # The token that names the new recovery keyslot, authenticated now: once the key is
        # delivered, 'repair' rolls forward by importing it (it holds no key to make one).
        token.recovery_keyslot = new_slot
        forward = token.to_signed_json(tkey, container.uuid)
        deliver(rkey)
        journal.mark("key-delivered", forward_token=forward)
        store_token(container, token, tkey, token_id=token_id)
        journal.mark("token-updated")
        _retire_old_slot(
            container, token, token_id, journal, tcti=tcti, slot=old.recovery_keyslot,
            existing=rkey, final_digest=d2, master=master, auth=auth, proof=proof,
            old_sealed=old.sealed, progress=progress, what="recovery keyslot", signer=signer,
            tkey=tkey,
        )  # fmt: skip
        journal.finish()
        _cleanup(state_dir)
        return RotateResult("rotate-recovery", new_slot, old.recovery_keyslot, token)
    finally:
        if copy is not None:
            copy.close()
        ap.close()
        for s in (vk, master, auth, proof, rkey, tkey):
            if s is not None:
                s.wipe()


# -- policy-signing key ------------------------------------------------------------------------

SIGNER_STEPS = ("begun", "key-added", "token-replaced", "key-committed")


def rotate_signer(
    path: Path,
    *,
    tcti: str,
    state_dir: Path,
    keyring: str = "user",
    progress: Progress = _quiet,
) -> RotateResult:
    """A new dom0 policy-signing key: a new sealed object that trusts it (the same master
    secret and authValue, from this boot's hand-over), the accepted states signed with it,
    then the old key forgotten and the counter incremented (the old object and every old
    signature die).

    Crash-safe through the keystore holding both keys meanwhile (``signer_next``): whichever
    key the token trusts is the one kept (:func:`qubes_seal.chain.ensure_signer`), so the
    journal's ``repair`` only has to make the counter increment.
    """
    from .attest import seal_proof
    from .chain import open_with_volume_key
    from .luks.container import Container
    from .signer import PolicySigner
    from .tpm.device import Tpm
    from .tpm.seal import seal_to_states

    container = Container(path)
    vk, master, auth, proof = _handed_over(container.uuid, keyring)
    unlocked = open_with_volume_key(path, vk)  # closing it wipes vk
    new = PolicySigner.generate()
    tkey = unlocked.token_key()
    try:
        token_id, token = unlocked.authenticated_token()  # before anything else: the MAC
        old_sealed = token.sealed
        if old_sealed.nv is None:
            raise UsageError(
                "this container has no rollback counter (sealed before it existed)",
                hint="Run 'qubes-seal recover --reseal' first: it adds the counter.",
            )
        from . import launch

        launch.load().check_kept_states(old_sealed.pcrs, old_sealed.pcr_states)
        old = ensure_signer(unlocked, trusted=trusted_signer(old_sealed))
        old.wipe()
        journal = Journal.begin(
            state_dir, "rotate-signer", path, uuid=container.uuid, token_id=token_id,
            old_token=token.raw, new_signer=new.name().hex(),
        )  # fmt: skip
        crash_point("begun")
        progress("keeping the new policy-signing key next to the current one (keystore)")
        unlocked.keystore.signer_next = Secret(bytes(new.scalar.reveal()))
        unlocked.save()
        journal.mark("key-added")
        progress("sealing the master secret (unchanged) to the new key's signatures")
        with Tpm(tcti) as tpm:
            token.sealed = seal_to_states(
                tpm, master, pcrs=old_sealed.pcrs, states=old_sealed.pcr_states,
                bank=old_sealed.pcr_bank, require_launch=True, auth=auth,
                nv=old_sealed.nv, signer=new,
            )  # fmt: skip
            if token.proof is not None:
                token.proof = None if proof is None else seal_proof(
                    tpm, kind=token.proof.kind, value=proof, master=token.sealed, signer=new
                )  # fmt: skip
        store_token(container, token, tkey, token_id=token_id)
        journal.mark("token-replaced")
        progress("forgetting the old policy-signing key")
        ensure_signer(unlocked, trusted=new.name()).wipe()  # the new key becomes the current one
        journal.mark("key-committed")
        settle_counter(tcti, token.sealed)  # the old object and its signatures die
        journal.finish()
        return RotateResult("rotate-signer", token.tpm_keyslot, token.tpm_keyslot, token)
    finally:
        new.wipe()
        tkey.wipe()
        unlocked.keystore.wipe()
        unlocked.close()
        for s in (master, auth, proof):
            if s is not None:
                s.wipe()


def write_key_file(path: Path, key: Secret) -> None:
    """Write a recovery key to a new file, mode 0600: never an existing file, never through a
    symbolic link; its directory is left as it is (:func:`qubes_seal.fsutil.write_key_file`)."""
    _write_key_file(path, key)


# -- repair ----------------------------------------------------------------------------------


@dataclasses.dataclass
class RepairResult:
    op: str
    step: str
    action: str  # "rolled back", "completed" or "nothing to do"
    notes: list[str]


def _repair_signer(journal: Journal, *, tcti: str | None) -> tuple[str, list[str]]:
    """An interrupted ``rotate signer``: the token decides.  Trusting the new key: completed
    (the counter increment); the old one: rolled back (nothing to undo in the container).
    The keystore keeps both keys until the next command that reads it settles on the one the
    token trusts (:func:`qubes_seal.chain.ensure_signer`): no secret is needed here."""
    from .luks.container import Container

    path = Path(journal.doc["container"])
    _, token = read_token(Container(path))
    signed = token.sealed.signed
    if signed is not None and signed.name.hex() == journal.data.get("new_signer"):
        notes = ["the new policy-signing key is in use (the keystore forgets the old one at "
                 "the next command that signs: reseal, revoke, predict --container)"]  # fmt: skip
        if tcti is not None and settle_counter(tcti, token.sealed):
            notes.append("the rollback counter was incremented: the old object is revoked")
        return "completed", notes
    return "rolled back", ["the old policy-signing key stays in use (the keystore drops the "
                           "unused new one at the next reseal)"]  # fmt: skip


def _repair_simple(journal: Journal, *, tcti: str | None) -> tuple[str, list[str]]:
    """Complete a reseal or a domain operation: its one container write is atomic, so only
    the counter increment (and, after a destroyed key, the token's re-signing) can be
    missing."""
    from .chain import refresh_token
    from .luks.container import Container

    path = Path(journal.doc["container"])
    notes: list[str] = []
    if tcti is None:
        return "completed", ["no TPM given: the rollback counter was not checked"]
    destroyed = journal.op in ("domain-remove", "domain-rotate-commit")
    if destroyed and journal.did("keystore-written") and not journal.did("refreshed"):
        if refresh_token(path, tcti=tcti) is not None:
            notes.append(
                "the token was re-signed and the rollback counter incremented: older "
                "copies of the container (with the destroyed key) are revoked"
            )
        else:
            notes.append(
                "older copies of the container still hold the destroyed key: run "
                "'qubes-seal revoke' in a boot that unlocked the container"
            )
        return "completed", notes
    if settle_counter(tcti, read_token(Container(path))[1].sealed):
        notes.append("the rollback counter was incremented: older sealed objects are revoked")
    else:
        notes.append("nothing was missing")
    return "completed", notes


def repair(state_dir: Path, *, tcti: str | None = None) -> RepairResult | None:
    """Complete or roll back the interrupted operation; None when there is none.

    A completed operation's rollback counter is brought to the token's bound (``tcti``: the
    TPM; None skips it): the increment the interrupted command did not make.  A rolled-back
    one needs none: nothing was incremented before the new token was in the container.
    """
    journal = Journal.resume(state_dir)
    if journal is None:
        return None
    handler: Callable[..., tuple[str, list[str]]]
    if journal.op == "init":
        handler = repair_init
    elif journal.op == "rotate-signer":
        handler = _repair_signer
    elif journal.op == "grow":
        from .grow import repair_grow

        handler = repair_grow
    elif journal.op == "reseal" or journal.op.startswith("domain-"):
        handler = _repair_simple
    elif journal.op in OPS:
        handler = _repair_rotation
    else:
        raise CorruptState(f"the journal names an unknown operation {journal.op!r}")
    step = journal.step
    action, notes = handler(journal, tcti=tcti)
    journal.finish()
    _cleanup(state_dir)
    return RepairResult(journal.op, step, action, notes)


def _resealed_only(current: dict[str, Any], old: Any) -> bool:
    """Whether ``old`` (the journal's old token) differs from ``current`` only as a rotation
    before its commit makes it differ: the sealed object (same rollback counter) and proof."""
    if not isinstance(old, dict) or not isinstance(old.get("sealed"), dict):
        return False

    def rest(t: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in t.items() if k not in ("sealed", "proof", "mac", "keyslots")}

    def counter(t: dict[str, Any]) -> Any:
        return (t["sealed"].get("nv") or {}).get("handle")

    return rest(current) == rest(old) and counter(current) == counter(old)


def _repair_rotation(journal: Journal, *, tcti: str | None) -> tuple[str, list[str]]:
    """A keyslot rotation (passphrase, master, recovery): decided from the container itself
    (which keyslot the token names), rolled forward or back."""
    from .luks.container import Container

    data = journal.data
    path = Path(journal.doc["container"])
    container = Container(path)
    if container.uuid != data["uuid"]:
        raise CorruptState(f"{path} is not the container of the interrupted operation")
    slots_before = [int(s) for s in data["slots_before"]]
    old_slot = int(data["old_slot"])
    token_id = int(data["token_id"])
    new_slot = data.get("new_slot")
    notes: list[str] = []
    _, current = read_token(container)
    if journal.op == "rotate-recovery":
        forward = journal.did("key-delivered")
    else:
        forward = new_slot is not None and current.tpm_keyslot == int(new_slot)
    if forward:
        assert new_slot is not None
        if int(new_slot) not in container.slots():
            raise CorruptState("the new keyslot named by the journal is missing")
        if slot_salt(path, int(new_slot)) != data.get("new_slot_salt"):
            raise CorruptState(
                f"keyslot {new_slot} is not the one the interrupted rotation added (its salt "
                "differs from the journal's): nothing was changed",
                hint="Inspect the container (cryptsetup luksDump) and the journal.",
            )
        forward_doc = data.get("forward_token")
        if journal.op == "rotate-recovery" and current.recovery_keyslot != int(new_slot):
            if not isinstance(forward_doc, dict):
                raise CorruptState("the journal lacks the token that names the new recovery key")
            container.import_token(forward_doc, token_id=token_id, replace=True)
            current = read_token(container)[1]
        if old_slot in container.slots():
            if old_slot in (current.tpm_keyslot, current.recovery_keyslot):
                notes.append(f"left keyslot {old_slot}: the token still names it")
            elif slot_salt(path, old_slot) != data.get("old_slot_salt"):
                notes.append(f"left keyslot {old_slot}: the journal does not prove it is the "
                             "old one (its salt differs)")  # fmt: skip
            else:
                kill_slot_unchecked(path, old_slot)
        if tcti is not None and settle_counter(tcti, current.sealed):
            notes.append("the rollback counter was incremented: older sealed objects are revoked")
        action = "completed"
        if not journal.did("resealed"):
            notes.append("the token still accepts the transitional header state too; the "
                         "next 'qubes-seal reseal' drops it")  # fmt: skip
    else:
        extra = [s for s in container.slots() if s not in slots_before]
        for s in extra:
            salt = data.get("new_slot_salt")
            if new_slot is not None and s == int(new_slot) and salt and slot_salt(path, s) == salt:
                kill_slot_unchecked(path, s)
            else:
                notes.append(f"left keyslot {s}: the journal does not prove this rotation "
                             "added it")  # fmt: skip
        old_doc = data["old_token"]
        if current.raw != old_doc:
            if not isinstance(old_doc, dict) or "mac" not in old_doc:
                notes.append("left the token: the journal's old token carries no MAC (it was "
                             "not recorded by qubes-seal)")  # fmt: skip
            elif _resealed_only(current.raw or {}, old_doc):
                container.import_token(data["old_token"], token_id=token_id, replace=True)
            else:
                notes.append("left the token: the journal's old token differs from it in more "
                             "than its sealed object (the rotation never changes the rest "
                             "before it commits)")  # fmt: skip
        key_file = data.get("key_file")
        if key_file and os.path.lexists(key_file):
            why = remove_if_ours(Path(key_file), sha256=data.get("key_file_sha256"))
            if why is None:
                notes.append(f"removed {key_file}: the new recovery key it held was not kept")
            else:
                notes.append(f"left {key_file}: {why}")
        action = "rolled back" if extra or journal.step != "begun" else "nothing to do"
        if journal.op == "rotate-recovery":
            notes.append("the old recovery key remains valid")
        else:
            notes.append("the old passphrase and keyslot remain valid")
    return action, notes


# -- domain keys ---------------------------------------------------------------------------


PREVIOUS = volumes.PREVIOUS  # the entry's field that keeps the previous key


def rotate_domain(keystore: Any, name: str, *, qube_uuid: str | None = None) -> Any:
    """A new key for ``name``; the previous one is kept in the entry until :func:`commit_domain`.

    Refused while a previous key is still kept (commit first): two rotations in a row would
    otherwise lose the key the volume is still encrypted with.
    """
    from .keystore.model import KEY_SIZE, new_key_id, utc_now

    entry = keystore.get(name, qube_uuid=qube_uuid)
    if PREVIOUS in entry.extra:
        raise UsageError(
            f"{name} has a rotation pending (previous key {entry.extra[PREVIOUS]['key_id']})",
            hint=f"In the storage domain run 'qubes-seal-storage-agent rekey {name} --volume "
            f"PATH', then 'qubes-seal domain rotate {name} --commit'.",
        )
    entry.extra[PREVIOUS] = {
        "key": entry.key.reveal().hex(),
        "key_id": entry.key_id,
        "generation": entry.generation,
        "rotated": utc_now(),
    }
    entry.key.wipe()
    entry.key = Secret.random(KEY_SIZE)
    entry.key_id = new_key_id()
    entry.generation += 1
    return entry


def commit_domain(
    keystore: Any, name: str, *, qube_uuid: str | None = None, force: bool = False
) -> Any:
    """Forget the previous key of ``name`` (the volume was re-encrypted with the new one).

    Refused while a pool volume of the qube is recorded on another key than the current one
    (:mod:`qubes_seal.keystore.volumes`): it would open with no key kept.  ``force`` commits
    anyway (the volume no longer exists, or its loss is accepted)."""
    entry = keystore.get(name, qube_uuid=qube_uuid)
    if PREVIOUS not in entry.extra:
        raise UsageError(f"{name} has no rotation pending: nothing to commit")
    behind = volumes.behind(entry)
    if behind and not force:
        listed = ", ".join(
            f"{rec.name} ("
            + ("its key unknown since a revert" if rec.key_id == volumes.UNKNOWN
               else "still on the previous key") + ")"
            for rec in behind
        )  # fmt: skip
        raise UsageError(
            f"{name}: not every pool volume was re-keyed: {listed}; the commit would destroy "
            "the only key that opens them",
            hint=f"Start the qube once and shut it down (the pool re-keys each volume at start "
            f"and keeps it at stop), or for a halted qube run 'python3 -m qubes_seal.qubes_pool "
            f"rekey {name} --uuid UUID --volume PATH' for each; 'qubes-seal domain show {name}' "
            "lists the volumes.  --force commits anyway (a volume that no longer exists).",
        )
    del entry.extra[PREVIOUS]
    keystore.keys_removed = True  # the next store overwrites both slots: no copy remains
    return entry


def previous_key(entry: Any) -> Secret | None:
    prev = entry.extra.get(PREVIOUS)
    return None if prev is None else Secret(bytes.fromhex(prev["key"]))
