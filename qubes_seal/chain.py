"""The unlock chain: TPM secret + passphrase open a LUKS2 container of per-domain disk keys.

::

    passphrase ──Argon2id──► auth half ──► authValue of the sealed object (PolicyAuthValue):
                                            the TPM rate-limits guesses (DA lockout)
                         └─► mix half ─┐
    TPM (PCR 13, 17, 18 + auth) ──► master secret ─┴─HKDF-SHA256─► LUKS key ─► keyslot
                                                                        │
                                  container: LUKS2, aes-xts-plain64 ◄───┘
                                  payload: keystore (per-domain keys), HMAC-authenticated

Neither the TPM alone (a stolen machine: no passphrase, and guesses are rate-limited by the
TPM) nor the passphrase alone (a copied disk: no master secret) opens the container.  The
recovery key is a second keyslot, a plain passphrase stock cryptsetup accepts.

PCR 13 carries the container's header digest (:func:`qubes_seal.luks.header.header_digest`):
the unlock extends it before unsealing, so a rolled-back header (an old keyslot with an old,
leaked passphrase) changes PCR 13 and the TPM refuses.  After a successful unlock PCR 13 is
capped (extended with a separator) so nothing later in this boot can unseal again.

Everything the unlock needs travels in the container, in a LUKS2 token of type
``qubes-seal`` (``cryptsetup luksDump`` shows it): the sealed object, the PCR selection and
values, the Argon2id parameters, the pinned SRK, the keyslot numbers.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import handover
from .errors import CorruptState, MeasurementMismatch, QubesSealError, RevokedState, UsageError
from .journal import crash_point
from .secret import Secret
from .state import NvBinding, PcrState, SealedState
from .token import (
    TOKEN_TYPE,
    TOKEN_VERSION,
    Token,
    TokenNotAuthentic,
    mac_key,
    read_token,
    store_token,
)

if TYPE_CHECKING:
    from .launch import LaunchPolicy

PCR13 = 13
DEFAULT_PCRS = (13, 17, 18)
#: Extended into PCR 13 after the unlock: from then on, no policy that expects the header
#: digest alone in PCR 13 can be satisfied until the next boot.
CAP_DIGEST = hashlib.sha256(b"qubes-seal: PCR 13 capped after unlock").digest()
LUKS_KEY_CONTEXT = b"container"

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def pcr13_after_extend(header_digest: bytes) -> bytes:
    """PCR 13 (SHA-256) after a boot's unlock extended it once with ``header_digest``."""
    return hashlib.sha256(bytes(32) + header_digest).digest()


def header_pcr(path: Path, pcrs: list[int]) -> dict[int, bytes]:
    """``{13: expected value}`` for the container's current header when PCR 13 is sealed to
    (its value after the unlock's extend, not what the TPM holds now); else ``{}``."""
    from .luks.header import header_digest

    return {PCR13: pcr13_after_extend(header_digest(path))} if PCR13 in pcrs else {}


@dataclass
class Timings:
    """Where an unlock spends its time (seconds)."""

    parts: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.parts[name] = self.parts.get(name, 0.0) + time.perf_counter() - start

    @property
    def total(self) -> float:
        return sum(self.parts.values())


@dataclass
class Unlocked:
    """An open container: its keystore and the volume key that reads and writes it.

    ``token`` is the container's token once :func:`authenticated_token` (or the unlock) has
    verified its MAC under this volume key; None until then, or when it failed (a recovery).
    """

    container: Any
    keystore: Any
    volume_key: Secret
    uuid: str
    timings: Timings
    token: Token | None = None
    token_id: int | None = None
    #: Why the token is not authenticated (after a recovery): shown, never fatal there.
    token_problem: str | None = None

    def save(self) -> None:
        """Write the keystore back (a new generation, crash-safe)."""
        from .keystore import hmac_key_from_volume_key, store
        from .luks.payload import UserspacePayload

        with (
            hmac_key_from_volume_key(self.volume_key) as hkey,
            UserspacePayload(self.container, self.volume_key) as payload,
        ):
            store(payload, self.keystore, hkey)

    def token_key(self) -> Secret:
        """The token's MAC key (the caller wipes it)."""
        return mac_key(self.volume_key)

    def authenticated_token(self) -> tuple[int, Token]:
        """The container's token, its MAC verified under this volume key (else
        :class:`~qubes_seal.token.TokenNotAuthentic`, exit 7)."""
        if self.token is None or self.token_id is None:
            token_id, token = read_token(self.container)
            with self.token_key() as key:
                token.authenticate(key, self.uuid, source=f"{self.container.path}'s token")
            self.token_id, self.token = token_id, token
        return self.token_id, self.token

    def write_token(self, token: Token, *, tcti: str) -> None:
        """Replace the token (with its MAC), then settle the rollback counter."""
        token_id, _ = self.authenticated_token()
        with self.token_key() as key:
            write_token(self.container, token_id, token, tcti=tcti, key=key)
        self.token = token

    def close(self) -> None:
        self.volume_key.wipe()


def ensure_signer(unlocked: Unlocked, *, trusted: bytes | None = None) -> Any:
    """The dom0 policy-signing key (:class:`~qubes_seal.signer.PolicySigner`) from the
    keystore; a keystore written before signed policies gets one (and is saved).

    ``trusted``: the name of the key the token trusts.  It settles an interrupted ``rotate
    signer`` (a second key kept next to the current one): when the token trusts the new key,
    the new key becomes the current one; when it still trusts the current key, the new one is
    dropped.  Either way the keystore is saved and the trusted key returned.
    """
    from .signer import PolicySigner  # not on the boot path

    ks = unlocked.keystore
    if ks.signer_next is not None and trusted is not None:
        nxt = PolicySigner(Secret(bytes(ks.signer_next.reveal())))
        if nxt.name() == trusted:
            if ks.signer is not None:
                ks.signer.wipe()
            ks.signer, ks.signer_next = ks.signer_next, None
            unlocked.save()
            return nxt
        nxt.wipe()
        ks.signer_next.wipe()
        ks.signer_next = None
        unlocked.save()
    if ks.signer is None:
        signer = PolicySigner.generate()
        ks.signer = Secret(bytes(signer.scalar.reveal()))
        unlocked.save()
        return signer
    return PolicySigner(Secret(bytes(ks.signer.reveal())))


def trusted_signer(sealed: SealedState) -> bytes | None:
    """The name of the key ``sealed`` trusts (None before signed policies)."""
    return None if sealed.signed is None else sealed.signed.name


#: The keystore records the rollback counter (authenticated by the keystore's HMAC), so that
#: a recovery whose token is missing or forged still increments the right one.
COUNTER_RECORD = "rollback_counter"


def recorded_counter(keystore: Any) -> tuple[int, bytes] | None:
    """The rollback counter (handle, name) the keystore records, or None."""
    doc = keystore.extra.get(COUNTER_RECORD)
    try:
        return int(doc["handle"], 16), bytes.fromhex(doc["name"])
    except (TypeError, KeyError, ValueError):
        return None


def record_counter(unlocked: Unlocked, nv: NvBinding | None) -> None:
    """Record ``nv`` in the keystore (saved) unless it is recorded already."""
    if nv is None or recorded_counter(unlocked.keystore) == (nv.handle, nv.name):
        return
    record = {"handle": f"0x{nv.handle:08x}", "name": nv.name.hex()}
    unlocked.keystore.extra[COUNTER_RECORD] = record
    unlocked.save()


@dataclass
class Approver:
    """This boot's authority to approve boots: the unlocked container, its token (MAC
    verified before anything else is read from it) and the dom0 policy-signing key."""

    unlocked: Unlocked
    token_id: int
    token: Token
    signer: Any  # signer.PolicySigner
    generation: int

    def write(self, *, tcti: str) -> None:
        self.unlocked.write_token(self.token, tcti=tcti)

    def close(self) -> None:
        self.signer.wipe()
        self.unlocked.keystore.wipe()
        self.unlocked.close()

    def __enter__(self) -> Approver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def approver_for(unlocked: Unlocked) -> Approver:
    """The approver of an open container (closed with it on failure).  The token's MAC is
    checked first; only then does the token name the key to keep (an interrupted ``rotate
    signer``) and the counter the keystore records."""
    try:
        token_id, token = unlocked.authenticated_token()
        signer = ensure_signer(unlocked, trusted=trusted_signer(token.sealed))
        record_counter(unlocked, token.sealed.nv)
        return Approver(unlocked, token_id, token, signer, unlocked.keystore.generation)
    except BaseException:
        unlocked.keystore.wipe()
        unlocked.close()
        raise


def approver(path: Path, *, keyring: str = "user") -> Approver | None:
    """The approver through this boot's hand-over of the volume key; None without one."""
    unlocked = open_handed_over(path, keyring=keyring)
    return None if unlocked is None else approver_for(unlocked)


def approver_from_volume_key(path: Path, vk: Secret) -> Approver:
    """The approver from a volume key (``vk`` is wiped with the approver)."""
    return approver_for(open_with_volume_key(path, vk))


def _no_handover() -> UsageError:
    return UsageError(
        "this boot did not unlock the container: nothing can approve another boot",
        hint="Run this in a boot that unlocked with the TPM and passphrase ('qubes-seal "
        "unlock'), or use 'qubes-seal recover --reseal' with the recovery key.",
    )


# -- init ------------------------------------------------------------------------------------


@dataclass
class InitResult:
    uuid: str
    recovery_key: Secret
    pcrs: list[int]
    states: list[PcrState]
    #: The init's journal (with ``state_dir``): the caller finishes it once the recovery key
    #: is delivered; until then ``repair`` rolls the init back.
    journal: Any = None


def init(
    path: Path,
    *,
    tcti: str,
    passphrase: Secret,
    size_bytes: int | None,
    pcrs: list[int],
    kdf_params: Any,
    recovery_pbkdf: Any,
    policy: LaunchPolicy | None = None,
    force: bool = False,
    root_volume: str | None = None,
    progress: Progress = _quiet,
    state_dir: Path | None = None,
    key_file: Path | None = None,
    keyring: str | None = None,
) -> InitResult:
    """Create the container, its keyslots, its keystore and token, and seal the master secret.

    With ``state_dir`` the init is journalled (steps ``begun``, ``formatted``,
    ``counter-defined``, ``token-written``, ``settled``) and the journal is returned open in
    :attr:`InitResult.journal`: the caller finishes it once the recovery key is delivered
    (shown, or written to ``key_file``).  Until then ``qubes-seal repair`` rolls the init back
    (removes the container file it created, the rollback counter it defined, ``key_file``):
    a container whose recovery key nobody received is not kept.

    With ``keyring`` this boot's hand-over is left in that kernel keyring, as an unlock leaves
    it: the boot that created the container may approve, add domains, set up the proof.
    """
    from . import launch, recovery
    from .kdf import derive, luks_key
    from .keystore import hmac_key_from_volume_key, initialise, store
    from .luks.container import Container
    from .luks.payload import UserspacePayload
    from .signer import PolicySigner  # not on the boot path
    from .tpm.device import Tpm  # not on the boot path
    from .tpm.seal import current_state, seal_to_states  # not on the boot path

    policy = policy or launch.load()
    pcrs = policy.check_selection(pcrs)  # dom0's rules: 17 and 18 unless --unsafe-...
    if PCR13 not in pcrs:
        progress("warning: PCR 13 is not selected: a rolled-back header would not be refused")
    with Tpm(tcti) as tpm:  # fail early: no TPM, no launch -> nothing created
        now = current_state(
            tpm, [p for p in pcrs if p != PCR13], require_launch=policy.require_launch
        )
    stale = _old_counter(path) if force else None
    journal = None
    if state_dir is not None:
        from .journal import Journal

        journal = Journal.begin(
            state_dir, "init", path, existed=path.exists(), uuid=None,
            key_file=None if key_file is None else str(key_file),
        )  # fmt: skip
        crash_point("begun")
    master = Secret.random(32)
    progress("deriving keys from the passphrase (Argon2id)")
    auth, mix = derive(passphrase, kdf_params)
    rkey = recovery.generate()
    signer = PolicySigner.generate()
    tkey: Secret | None = None
    vk_kept: Secret | None = None
    try:
        key = luks_key(master, mix, kdf_params, context=LUKS_KEY_CONTEXT)
        progress("formatting the LUKS2 container (cryptsetup)")
        container = Container.format(
            path,
            size_bytes=size_bytes,
            key=key,
            recovery=rkey,
            recovery_pbkdf=recovery_pbkdf,
            force=force,
        )
        if journal is not None:  # what proves to 'repair' which file and key file are ours
            import os

            from .fsutil import key_file_digest

            st = os.lstat(path)
            journal.mark(
                "formatted", uuid=container.uuid, dev=st.st_dev, ino=st.st_ino,
                key_file_sha256=None if key_file is None else key_file_digest(rkey),
            )  # fmt: skip
        tpm_slot = 0
        recovery_slot = 1
        states = [PcrState("current", {**now.values, **header_pcr(path, pcrs)}, _record(now))]
        policy.check_states(states)
        with Tpm(tcti) as tpm:
            nv = tpm.nv_define_counter(int(container.uuid.replace("-", "")[:8], 16))
        if journal is not None:
            journal.mark("counter-defined", nv_handle=nv.handle)
        progress("writing an empty keystore")
        with (
            container.volume_key(key) as vk,
            hmac_key_from_volume_key(vk) as hkey,
            UserspacePayload(container, vk) as payload,
        ):
            tkey = mac_key(vk)
            vk_kept = Secret(vk.reveal()) if keyring is not None else None
            keystore = initialise(payload, hkey)
            keystore.signer = Secret(bytes(signer.scalar.reveal()))
            keystore.extra[COUNTER_RECORD] = {"handle": f"0x{nv.handle:08x}", "name": nv.name.hex()}
            if root_volume:
                keystore.add("dom0")  # the key of dom0's root volume (never served)
            store(payload, keystore, hkey)
            keystore.wipe()
            generation = keystore.generation
        progress("sealing the master secret in the TPM")
        with Tpm(tcti) as tpm:
            sealed = seal_to_states(
                tpm,
                master,
                pcrs=pcrs,
                states=states,
                require_launch=policy.require_launch,
                auth=auth,
                nv=nv,
                signer=signer,
            )
        token = Token(
            sealed, kdf_params.to_json(), tpm_slot, recovery_slot, root_volume=root_volume,
            keystore_generation=generation,
        )  # fmt: skip
        store_token(container, token, tkey, token_id=None)
        if journal is not None:
            journal.mark("token-written")
        settle_counter(tcti, sealed)
        if journal is not None:
            journal.mark("settled")
        if stale is not None and stale != nv.handle:
            with Tpm(tcti) as tpm:  # the counter of the container this init replaced
                tpm.nv_undefine_counter(stale)
        if vk_kept is not None and keyring is not None:
            handover.put(container.uuid, vk_kept, keyring=keyring)
            copies = Secret(master.reveal()), Secret(auth.reveal())
            with make_bundle(*copies, None) as bundle:
                handover.put(container.uuid, bundle, keyring=keyring, kind="rs")
            copies[1].wipe()
        return InitResult(container.uuid, rkey, sealed.pcrs, states, journal=journal)
    except BaseException as exc:
        rkey.wipe()
        if journal is not None and isinstance(exc, Exception):
            try:  # a clean failure: undo now, leave no journal
                repair_init(journal, tcti=tcti)
                journal.finish()
            except (QubesSealError, OSError):
                pass  # (the TPM is gone, say) the journal stays: 'repair' finishes the undo
        raise
    finally:
        master.wipe()
        auth.wipe()
        mix.wipe()
        signer.wipe()
        for s in (tkey, vk_kept):
            if s is not None:
                s.wipe()


def _old_counter(path: Path) -> int | None:
    """The rollback counter of the qubes-seal container at ``path`` (replaced by ``init
    --force``), or None."""
    from .luks.container import Container

    try:
        sealed = read_token(Container(path))[1].sealed
    except (QubesSealError, OSError):
        return None
    return None if sealed.nv is None else sealed.nv.handle


def repair_init(journal: Any, *, tcti: str | None) -> tuple[str, list[str]]:
    """Roll back an init whose recovery key was never delivered: remove the container file it
    created, the counter it defined and the key file it may have begun.  (action, notes)

    Only what the journal proves the init made is removed: the container file by the LUKS2
    UUID, device and inode recorded once it was formatted (a file that existed before, or
    was not yet recorded, stays), the key file by its content digest, mode and owner
    (:func:`qubes_seal.fsutil.remove_if_ours`)."""
    import os

    from .fsutil import remove_if_ours, same_file
    from .luks.container import Container

    data = journal.data
    path = Path(journal.doc["container"])
    notes: list[str] = []
    uuid = data.get("uuid")
    formatted = False  # the init's container (by its UUID) is at ``path``
    if uuid is not None and os.path.lexists(path):
        try:
            formatted = Container(path).uuid == uuid
        except (QubesSealError, OSError):
            formatted = False
    if data.get("existed"):
        if formatted:
            notes.append(
                f"{path} holds an unfinished container (it existed before, so it is not "
                "removed): run 'qubes-seal init --force' again"
            )
    elif formatted and same_file(path, data.get("dev"), data.get("ino")):
        path.unlink()
        notes.append(f"removed the unfinished container {path}")
    elif os.path.lexists(path):
        notes.append(
            f"left {path}: the journal does not prove this init created it (remove it "
            "yourself if it is the unfinished container)"
        )
    handle = data.get("nv_handle")
    if handle is not None and tcti is not None:
        from .tpm.device import Tpm  # not on the boot path

        with Tpm(tcti) as tpm:
            if tpm.nv_undefine_counter(int(handle)):
                notes.append(f"removed its rollback counter 0x{int(handle):08x}")
    key_file = data.get("key_file")
    if key_file and os.path.lexists(key_file):
        why = remove_if_ours(Path(key_file), sha256=data.get("key_file_sha256"))
        if why is None:
            notes.append(f"removed {key_file}: its recovery key belonged to the removed container")
        else:
            notes.append(f"left {key_file}: {why}")
    notes.append("nothing was kept: run 'qubes-seal init' again")
    return "rolled back", notes


def settle_counter(tcti: str, sealed: SealedState | None) -> bool:
    """Increment the rollback counter up to ``sealed``'s bound, once the token that holds it
    is in the container: every older sealed object (bound lower) stops unsealing.

    Idempotent (crash-safe): nothing happens when the counter reached the bound already, so
    ``repair`` and an interrupted command's next run can call it again.  True if it counted.
    """
    if sealed is None or sealed.nv is None:
        return False
    from .tpm.device import Tpm  # not on the boot path

    with Tpm(tcti) as tpm:
        value = tpm.nv_read_counter(sealed.nv)
        if value >= sealed.nv.bound:
            return False
        tpm.nv_increment(sealed.nv)
        return True


# -- unlock ----------------------------------------------------------------------------------


def measure_header(tpm: Any, digest: bytes) -> None:
    """Extend PCR 13 with the header digest, once per boot; a retry in the same boot is fine."""
    current = tpm.read_pcrs([PCR13])[PCR13]
    if current == bytes(32):
        tpm.extend_pcr(PCR13, digest)
    elif current != pcr13_after_extend(digest):
        raise MeasurementMismatch(
            "measurements do not match: PCR 13 was already extended in this boot (capped "
            "after an unlock, or another header was measured)",
            hint="The container was unlocked once already in this boot, or its header changed. "
            "Reboot to try again; use the recovery key if the header was restored on purpose.",
        )


def cap(tpm: Any) -> None:
    """Extend PCR 13 with the separator: no more unseal in this boot."""
    tpm.extend_pcr(PCR13, CAP_DIGEST)


def unlock(
    path: Path,
    *,
    tcti: str,
    passphrase: Callable[[], Secret],
    backend: str = "auto",
    keyring: str | None = "user",
    progress: Progress = _quiet,
) -> Unlocked:
    """The unlock chain, ending with PCR 13 capped and the volume key handed over.

    ``passphrase`` is called once the TPM side is ready (so a prompt appears only when it can
    succeed).  ``keyring`` names the kernel keyring for the hand-over (None: none).
    ``backend``: ``dm-crypt`` maps the container with the kernel's dm-crypt to read the
    keystore (production), ``userspace`` decrypts the same bytes in Python (machines without
    device-mapper), ``auto`` picks dm-crypt where it is available.
    """
    from .kdf import KdfParams, derive, luks_key
    from .keystore import hmac_key_from_volume_key, load
    from .luks.container import Container
    from .luks.header import header_digest
    from .luks.payload import dm_crypt_available, open_payload
    from .tpm.esys import Esys
    from .tpm.unseal import unseal

    if backend not in ("auto", "dm-crypt", "userspace"):
        raise UsageError(f"unknown back-end {backend!r}: auto, dm-crypt or userspace")
    t = Timings()
    container = Container(path)
    with t.part("token+header"):
        token_id, token = read_token(container)  # not authenticated yet: the TPM decides
        digest = header_digest(path)
        params = KdfParams.from_json(token.kdf)
    sealed = token.sealed
    # PCR 13 is measured and capped whatever the token says: its selection is not trusted.
    with t.part("tpm"), Esys(tcti) as tpm:
        measure_header(tpm, digest)
    secret = passphrase()
    with t.part("argon2id"):
        progress("deriving keys from the passphrase (Argon2id)")
        auth, mix = derive(secret, params)
    secret.wipe()
    master: Secret | None = None
    try:
        with t.part("tpm"):
            master = unseal(sealed, tcti=tcti, auth=auth)
        with t.part("hkdf"):
            key = luks_key(master, mix, params, context=LUKS_KEY_CONTEXT)
        with t.part("cryptsetup"):
            vk = container.volume_key(key)
        with t.part("token"):
            try:  # before anything in the token steers a decision
                with mac_key(vk) as tkey:
                    token.authenticate(tkey, container.uuid, source=f"{path}'s token")
            except TokenNotAuthentic:
                key.wipe()
                vk.wipe()
                raise
        with t.part("keystore"), hmac_key_from_volume_key(vk) as hkey:
            if backend == "userspace" or (backend == "auto" and not dm_crypt_available()[0]):
                ks = _load_keystore(container, vk, hkey, load)
            else:  # production: the kernel's dm-crypt reads the container
                with open_payload(container, key=key, prefer="dm-crypt", writable=False) as pl:
                    ks = load(pl, hkey)
        key.wipe()
        check_keystore_generation(token, ks)
        proof_value = None
        if keyring is not None and token.proof is not None:
            with t.part("tpm"):
                proof_value = unseal(token.proof.sealed, tcti=tcti)
        with t.part("tpm"), Esys(tcti) as tpm:
            cap(tpm)
        if keyring is not None:
            with t.part("handover"):
                handover.put(container.uuid, vk, keyring=keyring)
                with make_bundle(master, auth, proof_value) as bundle:
                    handover.put(container.uuid, bundle, keyring=keyring, kind="rs")
        return Unlocked(container, ks, vk, container.uuid, t, token=token, token_id=token_id)
    finally:
        auth.wipe()
        mix.wipe()
        if master is not None:
            master.wipe()


def check_keystore_generation(token: Token, keystore: Any) -> None:
    """Refuse a keystore older than the token accepts (a restored copy of the data area)."""
    wanted = token.keystore_generation
    if wanted is not None and keystore.generation < wanted:
        keystore.wipe()
        raise RevokedState(
            f"the keystore is older than this container's token accepts (generation "
            f"{keystore.generation} < {wanted}): an old copy of the container's data was "
            "restored; rollback refused"
        )


BUNDLE_VERSION = 1


def make_bundle(master: Secret, auth: Secret, proof: Secret | None) -> Secret:
    """The reseal bundle: version, master secret, authValue, proof value (each wiped after)."""
    try:
        p = proof.reveal() if proof is not None else b""
        data = bytes([BUNDLE_VERSION]) + master.reveal() + auth.reveal()
        return Secret(data + len(p).to_bytes(2, "big") + p)
    finally:
        master.wipe()
        if proof is not None:
            proof.wipe()


def unbundle(bundle: Secret) -> tuple[Secret, Secret, Secret | None]:
    data = bundle.reveal()
    if len(data) < 67 or data[0] != BUNDLE_VERSION:
        raise CorruptState("the reseal hand-over in the kernel keyring is malformed")
    size = int.from_bytes(data[65:67], "big")
    proof = Secret(data[67 : 67 + size]) if size else None
    return Secret(data[1:33]), Secret(data[33:65]), proof


def write_token(container: Any, token_id: int, token: Token, *, tcti: str, key: Secret) -> None:
    """Replace the container's token (with its MAC under ``key``), then increment the rollback
    counter up to the new token's bound: every older object and signature is revoked
    (``repair`` redoes the increment if a crash falls between the two: test hook step
    ``token-written``)."""
    store_token(container, token, key, token_id=token_id)
    crash_point("token-written")
    settle_counter(tcti, token.sealed)


def _refresh_proof(tpm: Any, token: Token, signer: Any, states: list[PcrState]) -> None:
    """The proof of a clean boot follows ``states``: a signed proof is signed again; one
    sealed before signed policies is dropped ('qubes-seal attest setup' seals a new one)."""
    from .attest import Proof
    from .tpm.seal import resign  # not on the boot path

    if token.proof is None:
        return
    if token.proof.sealed.signed is None:
        token.proof = None
        return
    token.proof = Proof(token.proof.kind, resign(tpm, token.proof.sealed, signer, states))


def _record(
    now: PcrState, earlier: list[dict[str, Any] | None] | None = None, *, bank: str = "sha256"
) -> dict[str, Any] | None:
    """What this boot is made of, from the TXT log it captured (None: no log that replays
    to ``now``): kept with the state only to explain a later refusal."""
    from .measure.explain import this_boot_record

    return this_boot_record(now.values, bank=bank, earlier=earlier or ())


def _require_signed(token: Token) -> None:
    if token.sealed.signed is None or token.sealed.nv is None:
        raise CorruptState(
            "the token's sealed object does not use signed policies and a rollback counter",
            hint="Run 'qubes-seal recover --reseal' (recovery key): it seals a new object.",
        )


def reseal_container(
    path: Path,
    *,
    tcti: str,
    predicted: list[dict[int, bytes]] | None = None,
    keyring: str = "user",
    policy: LaunchPolicy | None = None,
    records: list[dict[str, Any] | None] | None = None,
) -> Token:
    """Accept this boot, plus ``predicted`` ones, and nothing else.

    ``records`` (one per prediction, optional): what each predicted boot is made of
    (:mod:`qubes_seal.measure.explain`), kept with its state to explain a later refusal;
    this boot's own record comes from its captured TXT log.

    The accepted states are rebuilt from trusted inputs only: this boot's PCRs (read from the
    TPM) and the explicit ``predicted`` values (PCR 17/18 of the next boot(s)), over dom0's
    launch policy's selection (never the token's); PCR 13 is the expected value for the
    current header.  The token's MAC is checked first (through this boot's hand-over of the
    volume key).  The sealed object stays: the dom0 policy-signing key signs each state.
    Afterwards the rollback counter is incremented: every older signature and object is void.
    """
    from . import launch
    from .tpm.device import Tpm  # not on the boot path
    from .tpm.seal import current_state, resign  # not on the boot path

    policy = policy or launch.load()
    pcrs = policy.selection
    ap = approver(path, keyring=keyring)
    if ap is None:
        raise _no_handover()
    with ap:
        token = ap.token
        _require_signed(token)
        token.keystore_generation = ap.generation
        fixed = header_pcr(path, pcrs)
        with Tpm(tcti) as tpm:
            now = current_state(
                tpm, [p for p in pcrs if p not in fixed], bank=policy.bank,
                require_launch=policy.require_launch,
            )  # fmt: skip
            earlier = [s.record for s in token.sealed.pcr_states]
            states = [
                PcrState(
                    "current", {**now.values, **fixed}, _record(now, earlier, bank=policy.bank)
                )
            ]
            for i, values in enumerate(predicted or []):
                given = records[i] if records is not None and i < len(records) else None
                state = PcrState("predicted", {**values, **fixed}, given)
                if sorted(state.values) != pcrs:
                    raise UsageError("the prediction does not cover the sealed PCRs")
                if state.values != states[0].values:
                    states.append(state)
            policy.check_states(states)
            token.sealed = resign(tpm, token.sealed, ap.signer, states, pcrs=pcrs)
            _refresh_proof(tpm, token, ap.signer, states)
        ap.write(tcti=tcti)
        return token


def approval(
    path: Path, *, tcti: str, values: dict[int, bytes], policy: LaunchPolicy | None = None
) -> dict[str, Any] | None:
    """A preview of what ``reseal --predict`` would sign for one predicted boot state
    (``values``: PCR 17/18; PCR 13 is the current header's): the approved policy and the
    counter bound it would carry.  Nothing is signed (a preview must not hand out a
    signature that a later reseal makes valid) and nothing is written.  None for a token
    without signed policies."""
    from . import launch
    from .luks.container import Container
    from .policy import approved_policy, authorization_digest
    from .tpm.device import Tpm  # not on the boot path

    policy = policy or launch.load()
    pcrs = policy.selection
    sealed = read_token(Container(path))[1].sealed  # shown, never trusted: nothing is signed
    if sealed.signed is None or sealed.nv is None:
        return None
    state = {**values, **header_pcr(path, pcrs)}
    missing = [p for p in pcrs if p not in state]
    if missing:
        raise UsageError(f"the prediction does not cover the sealed PCR(s) {missing}")
    policy.check_states([PcrState("predicted", state)])
    with Tpm(tcti) as tpm:
        bound = tpm.nv_read_counter(sealed.nv) + 1
    approved = approved_policy(
        {p: state[p] for p in pcrs}, pcrs, bank=policy.bank, nv=(sealed.nv.name, bound)
    )
    return {
        "pcrs": {str(p): state[p].hex() for p in pcrs},
        "approved_policy": approved.hex(),
        "authorization_digest": authorization_digest(approved, sealed.signed.policy_ref).hex(),
        "counter_bound": bound,
        "signer_name": sealed.signed.name.hex(),
        "signed": False,
    }


def refresh_token(
    path: Path,
    *,
    tcti: str,
    keyring: str = "user",
    drop: list[str] | None = None,
    policy: LaunchPolicy | None = None,
) -> Token | None:
    """After a keystore change that destroyed key material (``domain remove``, ``domain rotate
    --commit``): the same boot states signed again with the counter's next value, the
    keystore's new generation recorded in the token, then the increment.  Every older copy of
    the container (its token, its keystore with the destroyed key) stops unlocking.

    Only states of the authenticated token are signed again (its MAC is checked first), and
    each must pass dom0's launch policy (its selection; a measured launch).

    ``drop`` (``revoke --state``): the labels of accepted states to leave out, so that they
    are revoked by the same increment (refused if none would remain, or a label is unknown).

    None when there is no hand-over in this boot.
    """
    from . import launch
    from .tpm.device import Tpm  # not on the boot path
    from .tpm.seal import resign  # not on the boot path

    policy = policy or launch.load()
    ap = approver(path, keyring=keyring)
    if ap is None:
        return None
    with ap:
        token = ap.token
        _require_signed(token)
        keep = list(token.sealed.pcr_states)
        if drop:
            labels = [s.label for s in keep]
            unknown = sorted(set(drop) - set(labels))
            if unknown:
                raise UsageError(
                    f"no accepted boot state is labelled {', '.join(map(repr, unknown))}",
                    hint="The accepted states: " + ", ".join(labels) + " ('qubes-seal status').",
                )
            keep = [s for s in keep if s.label not in drop]
            if not keep:
                raise UsageError(
                    "that would revoke every accepted boot state: no boot could unlock any more",
                    hint="Keep one state, or run 'qubes-seal revoke' (this boot only).",
                )
        policy.check_kept_states(token.sealed.pcrs, keep)
        with Tpm(tcti) as tpm:
            token.sealed = resign(tpm, token.sealed, ap.signer, keep)
            _refresh_proof(tpm, token, ap.signer, keep)
        token.keystore_generation = ap.generation
        ap.write(tcti=tcti)
        return token


def _load_keystore(container: Any, vk: Secret, hkey: Secret, load: Any) -> Any:
    from .luks.payload import UserspacePayload

    with UserspacePayload(container, vk) as payload:
        return load(payload, hkey)


def open_with_volume_key(path: Path, vk: Secret) -> Unlocked:
    """The keystore, from a volume key handed over earlier in this boot."""
    from .keystore import hmac_key_from_volume_key, load
    from .luks.container import Container

    container = Container(path)
    with hmac_key_from_volume_key(vk) as hkey:
        ks = _load_keystore(container, vk, hkey, load)
    return Unlocked(container, ks, vk, container.uuid, Timings())


def open_handed_over(path: Path, *, keyring: str = "user") -> Unlocked | None:
    """The keystore through this boot's hand-over, or None when there is none.  The token's
    MAC is checked before the keystore is returned (:class:`TokenNotAuthentic` otherwise):
    no keystore decision follows a rewritten token."""
    from .luks.container import Container

    vk = handover.get(Container(path).uuid, keyring=keyring)
    if vk is None:
        return None
    unlocked = open_with_volume_key(path, vk)
    try:
        unlocked.authenticated_token()
    except BaseException:
        unlocked.keystore.wipe()
        unlocked.close()
        raise
    return unlocked


# -- recovery --------------------------------------------------------------------------------


def _token_or_none(container: Any) -> tuple[int | None, Token | None, str | None]:
    """The token (unauthenticated) or why there is none usable."""
    try:
        token_id, token = read_token(container)
    except CorruptState as exc:
        return None, None, exc.message
    return token_id, token, None


def recover(path: Path, *, recovery_key: Secret, keyring: str | None = "user") -> Unlocked:
    """Open the container with the recovery key (no TPM involved) and hand it over.

    The token is authenticated under the volume key: when it verifies, its keystore
    generation is enforced (an older copy of the data area is refused); when it is missing or
    forged, the container still opens (the recovery key is the owner's authority) and
    :attr:`Unlocked.token_problem` says why the keystore's freshness could not be checked.
    """
    from . import recovery
    from .luks.container import Container

    container = Container(path)
    rkey = recovery.normalise(recovery_key)
    try:
        vk = container.volume_key(rkey)
    finally:
        rkey.wipe()
    unlocked = open_with_volume_key(path, vk)
    try:
        unlocked.authenticated_token()
    except CorruptState as exc:  # missing, malformed or forged: nothing in it is used
        unlocked.token, unlocked.token_id = None, None
        unlocked.token_problem = exc.message
    if unlocked.token is not None:
        try:
            check_keystore_generation(unlocked.token, unlocked.keystore)
        except RevokedState:
            unlocked.close()
            raise
    if keyring is not None:
        handover.put(container.uuid, vk, keyring=keyring)
    return unlocked


def _recovery_slot(container: Any, rkey: Secret, token: Token | None) -> int:
    """The keyslot the recovery key opens: the authenticated token's, else found by trying."""
    if token is not None and container.test_key(rkey, slot=token.recovery_keyslot):
        return token.recovery_keyslot
    for slot in container.slots():
        if container.test_key(rkey, slot=slot):
            return int(slot)
    raise CorruptState("no keyslot of the container opens with this recovery key")


def reseal_with_recovery(
    path: Path,
    *,
    tcti: str,
    recovery_key: Secret,
    passphrase: Secret,
    kdf_params: Any,
    policy: LaunchPolicy | None = None,
    progress: Progress = _quiet,
) -> Token:
    """After a refused unseal: a new master secret sealed to this boot, a new TPM keyslot, a
    new authenticated token.

    Built from trusted inputs only: dom0's launch policy (the selection; a measured launch
    required), this boot's PCRs, the new passphrase, the keystore (its policy-signing key and
    the rollback counter it records).  From the old token only what its MAC vouches for is
    used (the old TPM keyslot to remove, the recovery keyslot, the counter, the root volume);
    a missing or forged token contributes nothing, and the old TPM keyslot is then left in
    place (it is not known which one it is) - its sealed object is revoked all the same.
    The recovery key authorises the new keyslot; the old one is removed last.
    """
    from . import launch, recovery
    from .kdf import derive, luks_key
    from .luks.container import Container
    from .tpm.device import Tpm  # not on the boot path
    from .tpm.seal import current_state, seal_to_states  # not on the boot path

    policy = policy or launch.load()
    pcrs = policy.selection
    container = Container(path)
    rkey = recovery.normalise(recovery_key)
    unlocked = open_with_volume_key(path, container.volume_key(rkey))
    token_id, old, problem = _token_or_none(container)
    if old is not None:
        try:
            with unlocked.token_key() as tkey:
                old.authenticate(tkey, container.uuid)
        except TokenNotAuthentic as exc:
            old, problem = None, exc.message
    if problem is not None:
        progress(f"warning: the old token is not used ({problem})")
    master = Secret.random(32)
    auth, mix = derive(passphrase, kdf_params)
    signer = None
    try:
        trusted = None if old is None else trusted_signer(old.sealed)
        signer = ensure_signer(unlocked, trusted=trusted)
        with Tpm(tcti) as tpm:
            now = current_state(
                tpm, [p for p in pcrs if p != PCR13], require_launch=policy.require_launch
            )
            nv = _counter_for_recovery(tpm, container, unlocked, old)
        record_counter(unlocked, nv)
        generation = unlocked.keystore.generation
        recovery_slot = _recovery_slot(container, rkey, old)
        key = luks_key(master, mix, kdf_params, context=LUKS_KEY_CONTEXT)
        new_slot = container.add_key(rkey, key, slot=None, pbkdf=None)
        if (
            old is not None
            and old.tpm_keyslot not in (new_slot, recovery_slot)
            and old.tpm_keyslot in container.slots()
        ):
            container.kill_slot(old.tpm_keyslot, existing=rkey)
        values = {**now.values, **header_pcr(path, pcrs)}
        earlier = [] if old is None else [s.record for s in old.sealed.pcr_states]
        states = [PcrState("current", values, _record(now, earlier))]
        policy.check_states(states)
        with Tpm(tcti) as tpm:
            sealed = seal_to_states(
                tpm, master, pcrs=pcrs, states=states, require_launch=policy.require_launch,
                auth=auth, nv=nv, signer=signer,
            )  # fmt: skip
        # The proof of a clean boot was sealed to the old header's PCR 13 and cannot be
        # unsealed any more: 'qubes-seal attest setup' must be run again.
        token = Token(
            sealed, kdf_params.to_json(), new_slot, recovery_slot,
            root_volume=None if old is None else old.root_volume,
            keystore_generation=generation,
        )  # fmt: skip
        if token_id is None:
            token_id = int(
                container.import_token({"type": TOKEN_TYPE, "keyslots": [str(new_slot)]})
            )  # a placeholder, replaced at once with the authenticated token
        with unlocked.token_key() as tkey:
            write_token(container, token_id, token, tcti=tcti, key=tkey)
        return token
    finally:
        if signer is not None:
            signer.wipe()
        unlocked.keystore.wipe()
        unlocked.close()
        for s in (rkey, master, auth, mix):
            s.wipe()


def _counter_for_recovery(tpm: Any, container: Any, unlocked: Unlocked, old: Token | None) -> Any:
    """The container's rollback counter: the authenticated token's, else the one the keystore
    records (if the TPM still holds it), else a new one.  Never one a forged token names:
    incrementing another index would leave older copies of this container unrevoked."""
    if old is not None and old.sealed.nv is not None and tpm.is_our_counter(old.sealed.nv.handle):
        return old.sealed.nv
    found = recorded_counter(unlocked.keystore)
    if found is not None and tpm.is_our_counter(found[0]):
        nv = tpm.nv_counter(found[0])
        if nv.name == found[1]:
            return nv
    return tpm.nv_define_counter(int(container.uuid.replace("-", "")[:8], 16))


def lock(path: Path, *, keyring: str = "user") -> bool:
    """Drop this boot's hand-over of the container's volume key."""
    from .luks.container import Container

    return handover.drop(Container(path).uuid, keyring=keyring)


__all__ = [
    "CAP_DIGEST",
    "DEFAULT_PCRS",
    "TOKEN_TYPE",
    "TOKEN_VERSION",
    "Approver",
    "InitResult",
    "QubesSealError",
    "Token",
    "TokenNotAuthentic",
    "Unlocked",
    "UsageError",
    "approver",
    "approver_for",
    "approver_from_volume_key",
    "cap",
    "init",
    "lock",
    "measure_header",
    "open_handed_over",
    "read_token",
    "recover",
    "reseal_with_recovery",
    "unlock",
]
