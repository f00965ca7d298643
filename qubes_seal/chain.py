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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import __version__, handover
from .errors import CorruptState, MeasurementMismatch, QubesSealError, RevokedState, UsageError
from .journal import crash_point
from .secret import Secret
from .state import PcrState, SealedState

TOKEN_TYPE = "qubes-seal"  # noqa: S105 - a LUKS2 token type, not a password
TOKEN_VERSION = 1
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
class Token:
    """Our LUKS2 token: everything the unlock needs, none of it secret."""

    sealed: SealedState
    kdf: dict[str, Any]
    tpm_keyslot: int
    recovery_keyslot: int
    proof: Any = None  # attest.Proof: the sealed proof of a clean boot, if set up
    root_volume: str | None = None  # dom0's root volume, opened with the keystore's "dom0" key
    #: The oldest keystore generation the unlock accepts: an older copy of the container's
    #: data (a removed or rotated domain key still in it) is refused.  Raised with every token
    #: write that follows a keystore change; the counter increment after it voids older tokens.
    keystore_generation: int | None = None
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    tool_version: str = __version__

    def to_json(self) -> dict[str, Any]:
        return {
            "type": TOKEN_TYPE,
            "keyslots": [str(self.tpm_keyslot)],
            "qubes_seal_version": TOKEN_VERSION,
            "tool_version": self.tool_version,
            "created": self.created,
            "tpm_keyslot": self.tpm_keyslot,
            "recovery_keyslot": self.recovery_keyslot,
            "kdf": self.kdf,
            "sealed": self.sealed.to_dict(),
            **({"proof": self.proof.to_json()} if self.proof is not None else {}),
            **({"root_volume": self.root_volume} if self.root_volume else {}),
            **(
                {"keystore_generation": self.keystore_generation}
                if self.keystore_generation is not None
                else {}
            ),
        }

    @classmethod
    def from_json(cls, doc: Any, *, source: str) -> Token:
        if not isinstance(doc, dict) or doc.get("type") != TOKEN_TYPE:
            raise CorruptState(f"{source}: not a {TOKEN_TYPE} token")
        version = doc.get("qubes_seal_version")
        if version != TOKEN_VERSION:
            raise CorruptState(
                f"{source}: token version {version!r}, this qubes-seal reads {TOKEN_VERSION}",
                hint="Use the qubes-seal version that wrote it, or the recovery key.",
            )
        from .attest import Proof

        try:
            proof = doc.get("proof")
            return cls(
                proof=None if proof is None else Proof.from_json(proof, source=f"{source} proof"),
                root_volume=str(doc["root_volume"]) if doc.get("root_volume") else None,
                keystore_generation=(
                    int(doc["keystore_generation"])
                    if doc.get("keystore_generation") is not None
                    else None
                ),
                sealed=SealedState.from_dict(doc["sealed"], source=f"{source} (sealed object)"),
                kdf=dict(doc["kdf"]),
                tpm_keyslot=int(doc["tpm_keyslot"]),
                recovery_keyslot=int(doc["recovery_keyslot"]),
                created=str(doc["created"]),
                tool_version=str(doc["tool_version"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CorruptState(
                f"{source}: malformed token ({type(exc).__name__})",
                hint="Unlock with the recovery key ('qubes-seal recover'), which reseals.",
            ) from exc


def read_token(container: Any) -> tuple[int, Token]:
    """Our token from the container: its id and content; exactly one must exist."""
    found = container.find_tokens(TOKEN_TYPE)
    source = f"{container.path}"
    if not found:
        raise CorruptState(
            f"{source} has no {TOKEN_TYPE} token: not a qubes-seal container, or the token "
            "was removed",
            hint="Unlock with the recovery key ('qubes-seal recover'), which reseals.",
        )
    if len(found) > 1:
        raise CorruptState(f"{source} has {len(found)} {TOKEN_TYPE} tokens: expected one")
    token_id, doc = next(iter(found.items()))
    return token_id, Token.from_json(doc, source=f"{source} token {token_id}")


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
    """An open container: its keystore and the volume key that reads and writes it."""

    container: Any
    keystore: Any
    volume_key: Secret
    uuid: str
    timings: Timings

    def save(self) -> None:
        """Write the keystore back (a new generation, crash-safe)."""
        from .keystore import hmac_key_from_volume_key, store
        from .luks.payload import UserspacePayload

        with (
            hmac_key_from_volume_key(self.volume_key) as hkey,
            UserspacePayload(self.container, self.volume_key) as payload,
        ):
            store(payload, self.keystore, hkey)

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


def handed_over_signer(path: Path, *, keyring: str = "user", trusted: bytes | None = None) -> Any:
    """The policy-signing key through this boot's hand-over of the volume key, or None."""
    found = handed_over_signer_and_generation(path, keyring=keyring, trusted=trusted)
    return None if found is None else found[0]


def handed_over_signer_and_generation(
    path: Path, *, keyring: str = "user", trusted: bytes | None = None
) -> tuple[Any, int] | None:
    """The policy-signing key and the keystore's generation, through this boot's hand-over."""
    unlocked = open_handed_over(path, keyring=keyring)
    return None if unlocked is None else _signer_of(unlocked, trusted)


def signer_from_volume_key(
    path: Path, vk: Secret, *, trusted: bytes | None = None
) -> tuple[Any, int]:
    """The policy-signing key and the keystore's generation, from the keystore the volume
    key ``vk`` opens (``vk`` is wiped)."""
    return _signer_of(open_with_volume_key(path, vk), trusted)


def trusted_signer(sealed: SealedState) -> bytes | None:
    """The name of the key ``sealed`` trusts (None before signed policies)."""
    return None if sealed.signed is None else sealed.signed.name


def _signer_of(unlocked: Unlocked, trusted: bytes | None) -> tuple[Any, int]:
    try:
        signer = ensure_signer(unlocked, trusted=trusted)  # may write the keystore
        return signer, unlocked.keystore.generation
    finally:
        unlocked.keystore.wipe()
        unlocked.close()


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
    size_bytes: int,
    pcrs: list[int],
    kdf_params: Any,
    recovery_pbkdf: Any,
    require_launch: bool = True,
    force: bool = False,
    root_volume: str | None = None,
    progress: Progress = _quiet,
    state_dir: Path | None = None,
    key_file: Path | None = None,
) -> InitResult:
    """Create the container, its keyslots, its keystore and token, and seal the master secret.

    With ``state_dir`` the init is journalled (steps ``begun``, ``formatted``,
    ``counter-defined``, ``token-written``, ``settled``) and the journal is returned open in
    :attr:`InitResult.journal`: the caller finishes it once the recovery key is delivered
    (shown, or written to ``key_file``).  Until then ``qubes-seal repair`` rolls the init back
    (removes the container file it created, the rollback counter it defined, ``key_file``):
    a container whose recovery key nobody received is not kept.
    """
    from . import recovery
    from .kdf import derive, luks_key
    from .keystore import hmac_key_from_volume_key, initialise, store
    from .luks.container import Container
    from .luks.payload import UserspacePayload
    from .signer import PolicySigner  # not on the boot path
    from .tpm.device import Tpm  # not on the boot path
    from .tpm.seal import current_state, seal_to_states  # not on the boot path

    if PCR13 not in pcrs:
        progress("warning: PCR 13 is not selected: a rolled-back header would not be refused")
    with Tpm(tcti) as tpm:  # fail early: no TPM, no launch -> nothing created
        now = current_state(tpm, [p for p in pcrs if p != PCR13], require_launch=require_launch)
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
        progress("writing an empty keystore")
        with (
            container.volume_key(key) as vk,
            hmac_key_from_volume_key(vk) as hkey,
            UserspacePayload(container, vk) as payload,
        ):
            keystore = initialise(payload, hkey)
            keystore.signer = Secret(bytes(signer.scalar.reveal()))
            if root_volume:
                keystore.add("dom0")  # the key of dom0's root volume (never served)
            store(payload, keystore, hkey)
            keystore.wipe()
            generation = keystore.generation
        tpm_slot = 0
        recovery_slot = 1
        states = [PcrState("current", {**now.values, **header_pcr(path, pcrs)})]
        progress("sealing the master secret in the TPM")
        with Tpm(tcti) as tpm:
            nv = tpm.nv_define_counter(int(container.uuid.replace("-", "")[:8], 16))
            if journal is not None:
                journal.mark("counter-defined", nv_handle=nv.handle)
            sealed = seal_to_states(
                tpm,
                master,
                pcrs=pcrs,
                states=states,
                require_launch=require_launch,
                auth=auth,
                nv=nv,
                signer=signer,
            )
        token = Token(
            sealed, kdf_params.to_json(), tpm_slot, recovery_slot, root_volume=root_volume,
            keystore_generation=generation,
        )  # fmt: skip
        container.import_token(token.to_json())
        if journal is not None:
            journal.mark("token-written")
        settle_counter(tcti, sealed)
        if journal is not None:
            journal.mark("settled")
        if stale is not None and stale != nv.handle:
            with Tpm(tcti) as tpm:  # the counter of the container this init replaced
                tpm.nv_undefine_counter(stale)
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
        _, token = read_token(container)
        digest = header_digest(path)
        params = KdfParams.from_json(token.kdf)
    sealed = token.sealed
    if PCR13 in sealed.pcrs:
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
        if PCR13 in sealed.pcrs:
            with t.part("tpm"), Esys(tcti) as tpm:
                cap(tpm)
        if keyring is not None:
            with t.part("handover"):
                handover.put(container.uuid, vk, keyring=keyring)
                with make_bundle(master, auth, proof_value) as bundle:
                    handover.put(container.uuid, bundle, keyring=keyring, kind="rs")
        return Unlocked(container, ks, vk, container.uuid, t)
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


def write_token(container: Any, token_id: int, token: Token, *, tcti: str) -> None:
    """Replace the container's token, then increment the rollback counter up to the new
    token's bound: every older object and signature is revoked (``repair`` redoes the
    increment if a crash falls between the two: test hook step ``token-written``)."""
    container.import_token(token.to_json(), token_id=token_id, replace=True)
    crash_point("token-written")
    settle_counter(tcti, token.sealed)


def _refresh_proof(
    tpm: Any, token: Token, signer: Any, states: list[PcrState], value: Secret | None
) -> None:
    """The proof of a clean boot follows ``states``: a signed proof is signed again; an
    unsigned one is sealed again, signed, when its ``value`` was handed over (else kept)."""
    from .attest import Proof, seal_proof
    from .tpm.seal import resign  # not on the boot path

    if token.proof is None:
        return
    if token.proof.sealed.signed is not None:
        token.proof = Proof(token.proof.kind, resign(tpm, token.proof.sealed, signer, states))
    elif value is not None:
        token.proof = seal_proof(
            tpm, kind=token.proof.kind, value=value, master=token.sealed, signer=signer
        )


def reseal_container(
    path: Path,
    *,
    tcti: str,
    predicted: list[dict[int, bytes]] | None = None,
    keyring: str = "user",
) -> Token:
    """Accept this boot, plus ``predicted`` ones, and nothing else.

    Under signed policies (every token since they exist) the sealed object stays: the dom0
    policy-signing key, read from the keystore through this boot's hand-over of the volume
    key, signs each accepted state.  No unseal, no passphrase, no new object: an update needs a
    signature.  An older token (PolicyPCR/PolicyOR in the object) is sealed once more, signed,
    from this boot's reseal hand-over (so it moves to signed policies).  ``predicted`` gives PCR
    17/18 of the next boot(s); PCR 13 is the expected value for the current header.
    Afterwards the rollback counter is incremented: every older signature and object is void.
    """
    from .luks.container import Container
    from .tpm.device import Tpm  # not on the boot path
    from .tpm.seal import current_state, resign, seal_to_states  # not on the boot path

    container = Container(path)
    token_id, token = read_token(container)
    found = handed_over_signer_and_generation(
        path, keyring=keyring, trusted=trusted_signer(token.sealed)
    )
    if found is None:
        raise UsageError(
            "this boot did not unlock the container: nothing can approve another boot",
            hint="Reseal in a boot that unlocked with the TPM and passphrase, or use "
            "'qubes-seal recover --reseal' with the recovery key.",
        )
    signer, generation = found
    token.keystore_generation = generation
    master = auth = proof_value = None
    bundle = handover.get(container.uuid, keyring=keyring, kind="rs")
    if bundle is not None:
        master, auth, proof_value = unbundle(bundle)
        bundle.wipe()
    old = token.sealed
    try:
        fixed = header_pcr(path, old.pcrs)
        with Tpm(tcti) as tpm:
            now = current_state(
                tpm, [p for p in old.pcrs if p not in fixed], bank=old.pcr_bank,
                require_launch=old.require_launch,
            )  # fmt: skip
            states = [PcrState("current", {**now.values, **fixed})]
            for values in predicted or []:
                state = PcrState("predicted", {**values, **fixed})
                if sorted(state.values) != sorted(old.pcrs):
                    raise UsageError("the prediction does not cover the sealed PCRs")
                if state.values != states[0].values:
                    states.append(state)
            if old.signed is not None and old.nv is not None:
                token.sealed = resign(tpm, old, signer, states)
            elif master is None or auth is None:
                raise UsageError(
                    "this token predates signed policies and this boot has no reseal "
                    "hand-over: it cannot be moved to signed policies now",
                    hint="Unlock with the TPM and passphrase ('qubes-seal unlock'), then reseal.",
                )
            else:
                nv = old.nv if old.nv is not None else tpm.nv_define_counter(
                    int(container.uuid.replace("-", "")[:8], 16)
                )  # fmt: skip
                token.sealed = seal_to_states(
                    tpm, master, pcrs=old.pcrs, states=states, bank=old.pcr_bank,
                    require_launch=old.require_launch, auth=auth, nv=nv, signer=signer,
                )  # fmt: skip
            _refresh_proof(tpm, token, signer, states, proof_value)
        write_token(container, token_id, token, tcti=tcti)
        return token
    finally:
        signer.wipe()
        for s in (master, auth, proof_value):
            if s is not None:
                s.wipe()


def approval(
    path: Path, *, tcti: str, values: dict[int, bytes], keyring: str = "user"
) -> dict[str, Any] | None:
    """The signed approval of one predicted boot state (``values``: PCR 17/18; PCR 13 is the
    current header's), as ``reseal --predict`` stores it: the approved policy, the counter
    bound it carries (the counter's next value), and the signature.  Nothing is written.
    None without this boot's hand-over or for a token before signed policies."""
    from .luks.container import Container
    from .policy import approved_policy, authorization_digest
    from .tpm.device import Tpm  # not on the boot path

    token = read_token(Container(path))[1]
    sealed = token.sealed
    if sealed.signed is None or sealed.nv is None:
        return None
    state = {**values, **header_pcr(path, sealed.pcrs)}
    missing = [p for p in sealed.pcrs if p not in state]
    if missing:
        raise UsageError(f"the prediction does not cover the sealed PCR(s) {missing}")
    found = handed_over_signer_and_generation(path, keyring=keyring, trusted=sealed.signed.name)
    if found is None:
        return None
    signer = found[0]
    try:
        with Tpm(tcti) as tpm:
            bound = tpm.nv_read_counter(sealed.nv) + 1
        approved = approved_policy(
            {p: state[p] for p in sealed.pcrs}, sealed.pcrs, bank=sealed.pcr_bank,
            nv=(sealed.nv.name, bound),
        )  # fmt: skip
        digest = authorization_digest(approved, sealed.signed.policy_ref)
        return {
            "pcrs": {str(p): state[p].hex() for p in sealed.pcrs},
            "approved_policy": approved.hex(),
            "policy_ref": sealed.signed.policy_ref.hex(),
            "counter_bound": bound,
            "signer_name": sealed.signed.name.hex(),
            "signature": signer.sign(digest).hex(),
        }
    finally:
        signer.wipe()


def refresh_token(
    path: Path, *, tcti: str, keyring: str = "user", drop: list[str] | None = None
) -> Token | None:
    """After a keystore change that destroyed key material (``domain remove``, ``domain rotate
    --commit``): the same boot states signed again with the counter's next value, the
    keystore's new generation recorded in the token, then the increment.  Every older copy of
    the container (its token, its keystore with the destroyed key) stops unlocking.

    ``drop`` (``revoke --state``): the labels of accepted states to leave out, so that they
    are revoked by the same increment (refused if none would remain, or a label is unknown).

    None when it cannot run: no hand-over in this boot, or a token from before signed
    policies (``qubes-seal reseal`` moves it, then ``revoke`` does the same).
    """
    from .luks.container import Container
    from .tpm.device import Tpm  # not on the boot path
    from .tpm.seal import resign  # not on the boot path

    container = Container(path)
    token_id, token = read_token(container)
    if token.sealed.signed is None or token.sealed.nv is None:
        return None
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
    found = handed_over_signer_and_generation(
        path, keyring=keyring, trusted=trusted_signer(token.sealed)
    )
    if found is None:
        return None
    signer, generation = found
    try:
        with Tpm(tcti) as tpm:
            token.sealed = resign(tpm, token.sealed, signer, keep)
            _refresh_proof(tpm, token, signer, keep, None)
        token.keystore_generation = generation
        write_token(container, token_id, token, tcti=tcti)
        return token
    finally:
        signer.wipe()


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
    """The keystore through this boot's hand-over, or None when there is none."""
    from .luks.container import Container

    vk = handover.get(Container(path).uuid, keyring=keyring)
    return None if vk is None else open_with_volume_key(path, vk)


# -- recovery --------------------------------------------------------------------------------


def recover(path: Path, *, recovery_key: Secret, keyring: str | None = "user") -> Unlocked:
    """Open the container with the recovery key (no TPM involved) and hand it over."""
    from . import recovery
    from .luks.container import Container

    container = Container(path)
    rkey = recovery.normalise(recovery_key)
    try:
        vk = container.volume_key(rkey)
    finally:
        rkey.wipe()
    unlocked = open_with_volume_key(path, vk)
    if keyring is not None:
        handover.put(container.uuid, vk, keyring=keyring)
    return unlocked


def reseal_with_recovery(
    path: Path,
    *,
    tcti: str,
    recovery_key: Secret,
    passphrase: Secret,
    kdf_params: Any,
    pcrs: list[int] | None = None,
    require_launch: bool = True,
) -> Token:
    """After a refused unseal: a new master secret sealed to this boot, a new TPM keyslot.

    The recovery key authorises the new keyslot; the old TPM keyslot is removed last, so an
    interruption leaves the recovery key working (crash safety proper arrives with rotation).
    """
    from . import recovery
    from .kdf import derive, luks_key
    from .luks.container import Container
    from .tpm.device import Tpm  # not on the boot path
    from .tpm.seal import current_state, seal_to_states  # not on the boot path

    container = Container(path)
    token_id, old = read_token(container)
    pcrs = pcrs or old.sealed.pcrs
    rkey = recovery.normalise(recovery_key)
    signer, generation = signer_from_volume_key(
        path, container.volume_key(rkey), trusted=trusted_signer(old.sealed)
    )
    master = Secret.random(32)
    auth, mix = derive(passphrase, kdf_params)
    try:
        with Tpm(tcti) as tpm:
            now = current_state(tpm, [p for p in pcrs if p != PCR13], require_launch=require_launch)
        key = luks_key(master, mix, kdf_params, context=LUKS_KEY_CONTEXT)
        new_slot = container.add_key(rkey, key, slot=None, pbkdf=None)
        if old.tpm_keyslot != new_slot and old.tpm_keyslot in container.slots():
            container.kill_slot(old.tpm_keyslot, existing=rkey)
        values = {**now.values, **header_pcr(path, pcrs)}
        with Tpm(tcti) as tpm:
            nv = old.sealed.nv
            if nv is None or not tpm.is_our_counter(nv.handle):
                nv = tpm.nv_define_counter(int(container.uuid.replace("-", "")[:8], 16))
            sealed = seal_to_states(
                tpm, master, pcrs=pcrs, states=[PcrState("current", values)],
                require_launch=require_launch, auth=auth, nv=nv, signer=signer,
            )  # fmt: skip
        # The proof of a clean boot was sealed to the old header's PCR 13 and cannot be
        # unsealed any more: 'qubes-seal attest setup' must be run again.
        token = Token(
            sealed, kdf_params.to_json(), new_slot, old.recovery_keyslot,
            root_volume=old.root_volume, keystore_generation=generation,
        )  # fmt: skip
        write_token(container, token_id, token, tcti=tcti)
        return token
    finally:
        signer.wipe()
        for s in (rkey, master, auth, mix):
            s.wipe()


def lock(path: Path, *, keyring: str = "user") -> bool:
    """Drop this boot's hand-over of the container's volume key."""
    from .luks.container import Container

    return handover.drop(Container(path).uuid, keyring=keyring)


__all__ = [
    "CAP_DIGEST",
    "DEFAULT_PCRS",
    "InitResult",
    "QubesSealError",
    "Token",
    "Unlocked",
    "UsageError",
    "cap",
    "init",
    "lock",
    "measure_header",
    "open_handed_over",
    "recover",
    "reseal_with_recovery",
    "unlock",
]
