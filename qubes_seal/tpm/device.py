"""The TPM connection for everything but the boot-time unseal: SRK, sealing, PCRs, status.

Built on tpm2-pytss's ESAPI.  The TPM is named by a TCTI string, as tpm2-tools name it:
``device:/dev/tpmrm0`` (the default, through the kernel's resource manager) or
``swtpm:host=127.0.0.1,port=2321`` for a software TPM.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from ..errors import QubesSealError, TPMUnavailable
from ..secret import Secret
from ..state import NvBinding
from . import _lib, rc

DEFAULT_TCTI = "device:/dev/tpmrm0"

#: TCG TPM v2.0 Provisioning Guidance, 7.8: the storage root key's persistent handle.
SRK_HANDLE = 0x81000001

BANK_BY_NAME = {"sha1": 0x0004, "sha256": 0x000B, "sha384": 0x000C, "sha512": 0x000D}
DIGEST_SIZE = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}

# TPM 2.0 Part 2, 8.3 (TPMA_OBJECT).
FIXED_TPM = 0x00000002
FIXED_PARENT = 0x00000010
SENSITIVE_DATA_ORIGIN = 0x00000020
USER_WITH_AUTH = 0x00000040
NO_DA = 0x00000400
RESTRICTED = 0x00010000
DECRYPT = 0x00020000

# TPM 2.0 Part 2, 13.4 (TPMA_NV).  The rollback counter: TPM_NT_COUNTER, read and incremented
# with its own (empty) authValue, never counted against the dictionary-attack lockout.
TPMA_NV_AUTHWRITE = 0x00000004
TPMA_NV_COUNTER = 0x00000010  # TPM_NT_COUNTER << 4
TPMA_NV_AUTHREAD = 0x00040000
TPMA_NV_NO_DA = 0x02000000
TPMA_NV_WRITTEN = 0x20000000
NV_COUNTER_ATTRIBUTES = TPMA_NV_AUTHWRITE | TPMA_NV_COUNTER | TPMA_NV_AUTHREAD | TPMA_NV_NO_DA
#: Owner NV indices 0x01800100..0x018001ff: one counter per container (TCG Registry of
#: Reserved TPM 2.0 Handles: 0x01800000-0x01bfffff is the owner's range).
NV_COUNTER_BASE = 0x01800100
NV_COUNTER_SLOTS = 0x100

# TPM 2.0 Part 2, 8.6 (TPMA_PERMANENT), read with TPM2_GetCapability(TPM_PT_PERMANENT).
TPMA_PERMANENT_LOCKOUT_AUTH_SET = 0x00000004  # lockoutAuthSet: the lockoutAuth is not empty
TPMA_PERMANENT_IN_LOCKOUT = 0x00000200  # inLockout
#: The lockoutAuth qubes-seal sets: 32 random bytes (TPM 2.0 Part 1, 19.6.4: an authValue is
#: at most the size of the name algorithm's digest, 32 bytes for SHA-256).
LOCKOUT_AUTH_SIZE = 32

# TPM 2.0 Part 2, 8.4 (TPMA_SESSION).
SESSION_CONTINUE = 0x01
SESSION_DECRYPT = 0x20
SESSION_ENCRYPT = 0x40


@dataclass(frozen=True)
class SrkInfo:
    """The storage root key as this TPM has it."""

    handle: int
    name: bytes
    esys_tr: bytes  # Esys_TR_Serialize of the key: its public part, to salt sessions offline
    created: bool


def parse_tcti(tcti: str) -> tuple[str, str | None]:
    name, _, conf = tcti.partition(":")
    if not name:
        raise QubesSealError(f"invalid TCTI '{tcti}'", hint="Example: device:/dev/tpmrm0")
    return name, conf or None


class Tpm:
    """An open ESAPI connection.  Use as a context manager; every handle it opens it flushes."""

    def __init__(self, tcti: str = DEFAULT_TCTI) -> None:
        _lib.quiet_tss_log()
        self.tcti = tcti
        try:
            from tpm2_pytss import ESAPI, TSS2_Exception
        except ImportError as exc:  # pragma: no cover - installation problem
            raise QubesSealError(f"tpm2-pytss cannot be loaded: {exc}") from exc
        self._tss_exc: type[Exception] = TSS2_Exception
        try:
            self.esys: Any = ESAPI(tcti)
        except TSS2_Exception as exc:
            raise TPMUnavailable(
                f"TPM unavailable through TCTI '{tcti}' ({rc.describe(int(exc.rc))})",
                hint="Is the TPM present and its driver loaded (tpm_tis, tpm_crb)? Choose "
                "another TPM with --tpm or QUBES_SEAL_TPM.",
            ) from exc
        except Exception as exc:  # the TCTI loader raises plain errors for a bad string
            raise TPMUnavailable(f"TPM unavailable through TCTI '{tcti}': {exc}") from exc

    def close(self) -> None:
        self.esys.close()

    def __enter__(self) -> Tpm:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _tss(self, action: str) -> Iterator[None]:
        """Translate a TSS2 failure of ``action`` into the qubes-seal error a user should see."""
        try:
            yield
        except self._tss_exc as exc:
            raise rc.to_error(int(exc.rc), action=action, tcti=self.tcti) from exc  # type: ignore[attr-defined]

    # -- PCRs -----------------------------------------------------------------------------

    def read_pcrs(self, pcrs: Iterable[int], *, bank: str = "sha256") -> dict[int, bytes]:
        """Current values of ``pcrs`` in ``bank`` (TPM2_PCR_Read, 8 PCRs per command)."""
        from tpm2_pytss import TPML_PCR_SELECTION

        wanted = sorted(set(pcrs))
        out: dict[int, bytes] = {}
        while len(out) < len(wanted):
            todo = [p for p in wanted if p not in out]
            sel = TPML_PCR_SELECTION.parse(f"{bank}:" + ",".join(str(p) for p in todo))
            with self._tss("TPM2_PCR_Read"):
                _, got_sel, digests = self.esys.pcr_read(sel)
            got = [
                p
                for s in got_sel
                for p in range(24)
                if s.sizeofSelect and s.pcrSelect[p // 8] & (1 << (p % 8))
            ][: len(digests)]
            if not got:
                raise QubesSealError(f"the TPM has no {bank} PCR bank allocated")
            for p, d in zip(got, digests, strict=True):
                out[p] = bytes(d)
        return out

    def extend_pcr(self, pcr: int, digest: bytes, *, bank: str = "sha256") -> None:
        """TPM2_PCR_Extend of one bank of ``pcr`` with ``digest``."""
        from tpm2_pytss import ESYS_TR, TPML_DIGEST_VALUES, TPMT_HA, TPMU_HA

        if len(digest) != DIGEST_SIZE[bank]:
            raise ValueError(f"a {bank} digest has {DIGEST_SIZE[bank]} bytes, not {len(digest)}")
        ha = TPMT_HA(hashAlg=BANK_BY_NAME[bank], digest=TPMU_HA(**{bank: digest}))
        with self._tss(f"TPM2_PCR_Extend of PCR {pcr}"):
            self.esys.pcr_extend(ESYS_TR.parse(f"PCR{pcr}"), TPML_DIGEST_VALUES([ha]))

    # -- SRK --------------------------------------------------------------------------------

    @staticmethod
    def srk_template() -> Any:
        """The TCG Provisioning Guidance SRK template: ECC NIST P-256, AES-128-CFB, SHA-256."""
        from tpm2_pytss import (
            TPM2_ALG,
            TPM2_ECC,
            TPM2B_PUBLIC,
            TPMS_ECC_PARMS,
            TPMT_ECC_SCHEME,
            TPMT_KDF_SCHEME,
            TPMT_PUBLIC,
            TPMT_SYM_DEF_OBJECT,
            TPMU_PUBLIC_PARMS,
            TPMU_SYM_KEY_BITS,
            TPMU_SYM_MODE,
        )

        return TPM2B_PUBLIC(
            publicArea=TPMT_PUBLIC(
                type=TPM2_ALG.ECC,
                nameAlg=TPM2_ALG.SHA256,
                objectAttributes=FIXED_TPM
                | FIXED_PARENT
                | SENSITIVE_DATA_ORIGIN
                | USER_WITH_AUTH
                | NO_DA
                | RESTRICTED
                | DECRYPT,
                parameters=TPMU_PUBLIC_PARMS(
                    eccDetail=TPMS_ECC_PARMS(
                        symmetric=TPMT_SYM_DEF_OBJECT(
                            algorithm=TPM2_ALG.AES,
                            keyBits=TPMU_SYM_KEY_BITS(aes=128),
                            mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
                        ),
                        scheme=TPMT_ECC_SCHEME(scheme=TPM2_ALG.NULL),
                        curveID=TPM2_ECC.NIST_P256,
                        kdf=TPMT_KDF_SCHEME(scheme=TPM2_ALG.NULL),
                    )
                ),
            )
        )

    def handle_defined(self, handle: int) -> bool:
        """Whether a persistent object or NV index exists at ``handle`` (TPM2_GetCapability)."""
        from tpm2_pytss import TPM2_CAP

        with self._tss("TPM2_GetCapability"):
            _, data = self.esys.get_capability(TPM2_CAP.HANDLES, handle, 1)
        return handle in list(data.data.handles)

    def find_srk(self) -> SrkInfo | None:
        """The persistent SRK at 0x81000001, or None when the handle is empty."""
        if not self.handle_defined(SRK_HANDLE):
            return None
        name, esys_tr = self.pin(SRK_HANDLE, action="TPM2_ReadPublic of the SRK")
        return SrkInfo(handle=SRK_HANDLE, name=name, esys_tr=esys_tr, created=False)

    def pin(self, handle: int, *, action: str) -> tuple[bytes, bytes]:
        """(name, serialized ESYS_TR) of the object or NV index at ``handle``: what a sealed
        state records so that the unseal never has to read the TPM's public area again."""
        with self._tss(action):
            tr = self.esys.tr_from_tpmpublic(handle)
        try:
            with self._tss("Esys_TR_Serialize"):
                return bytes(self.esys.tr_get_name(tr)), bytes(self.esys.tr_serialize(tr))
        finally:
            self.esys.tr_close(tr)

    def ensure_srk(self) -> SrkInfo:
        """Return the SRK, creating and persisting it first if the handle is empty."""
        found = self.find_srk()
        if found is not None:
            return found
        from tpm2_pytss import ESYS_TR

        with self._tss("TPM2_CreatePrimary of the SRK (owner hierarchy)"):
            transient, *_ = self.esys.create_primary(None, self.srk_template(), ESYS_TR.OWNER)
        try:
            with self._tss("TPM2_EvictControl of the SRK"):
                persistent = self.esys.evict_control(ESYS_TR.OWNER, transient, SRK_HANDLE)
            self.esys.tr_close(persistent)
        finally:
            with self._tss("TPM2_FlushContext"):
                self.esys.flush_context(transient)
        found = self.find_srk()
        if found is None:  # pragma: no cover - the TPM just said it persisted it
            raise QubesSealError("the SRK was persisted but cannot be found")
        return SrkInfo(found.handle, found.name, found.esys_tr, created=True)

    # -- sessions -----------------------------------------------------------------------------

    @contextmanager
    def salted_session(self, srk: SrkInfo, *, policy: bool = False) -> Iterator[Any]:
        """An HMAC (or policy) session salted with the SRK, AES-128-CFB parameter encryption.

        The salt is encrypted to the SRK's public key, so only that TPM knows the session key;
        command and response parameters sent with ``decrypt``/``encrypt`` set are unreadable on
        the bus.  The session is flushed on every path.
        """
        from tpm2_pytss import (
            ESYS_TR,
            TPM2_ALG,
            TPM2_SE,
            TPMT_SYM_DEF,
            TPMU_SYM_KEY_BITS,
            TPMU_SYM_MODE,
        )

        key = self.esys.tr_deserialize(srk.esys_tr)
        try:
            sym = TPMT_SYM_DEF(
                algorithm=TPM2_ALG.AES,
                keyBits=TPMU_SYM_KEY_BITS(aes=128),
                mode=TPMU_SYM_MODE(aes=TPM2_ALG.CFB),
            )
            with self._tss("TPM2_StartAuthSession (salted with the SRK)"):
                session = self.esys.start_auth_session(
                    key,
                    ESYS_TR.NONE,
                    TPM2_SE.POLICY if policy else TPM2_SE.HMAC,
                    sym,
                    TPM2_ALG.SHA256,
                )
        finally:
            self.esys.tr_close(key)
        try:
            yield session
        finally:
            # The TPM flushed it already if continueSession was clear.
            with suppress(self._tss_exc):
                self.esys.flush_context(session)

    # -- sealing --------------------------------------------------------------------------------

    def seal(
        self,
        secret: Secret,
        *,
        srk: SrkInfo,
        policy_digest: bytes,
        auth: Secret | None = None,
    ) -> tuple[bytes, bytes]:
        """Seal ``secret`` in a KEYEDHASH object under the SRK, usable only through a policy.

        The object has no USERWITHAUTH: only a policy session satisfying ``policy_digest`` can
        unseal it.  The secret crosses the bus encrypted (TPM2_Create with a salted session and
        the ``decrypt`` attribute).  ``auth`` becomes the object's authValue, required through
        PolicyAuthValue; the object is not noDA, so wrong values count against the TPM's
        dictionary-attack lockout.  Returns the marshalled (TPM2B_PUBLIC, TPM2B_PRIVATE).
        """
        from tpm2_pytss import (
            ESYS_TR,
            TPM2_ALG,
            TPM2B_AUTH,
            TPM2B_DIGEST,
            TPM2B_PUBLIC,
            TPM2B_SENSITIVE_CREATE,
            TPM2B_SENSITIVE_DATA,
            TPMS_KEYEDHASH_PARMS,
            TPMS_SENSITIVE_CREATE,
            TPMT_KEYEDHASH_SCHEME,
            TPMT_PUBLIC,
            TPMU_PUBLIC_PARMS,
        )

        template = TPM2B_PUBLIC(
            publicArea=TPMT_PUBLIC(
                type=TPM2_ALG.KEYEDHASH,
                nameAlg=TPM2_ALG.SHA256,
                objectAttributes=FIXED_TPM | FIXED_PARENT,
                authPolicy=TPM2B_DIGEST(policy_digest),
                parameters=TPMU_PUBLIC_PARMS(
                    keyedHashDetail=TPMS_KEYEDHASH_PARMS(
                        scheme=TPMT_KEYEDHASH_SCHEME(scheme=TPM2_ALG.NULL)
                    )
                ),
            )
        )
        sensitive = TPM2B_SENSITIVE_CREATE(
            sensitive=TPMS_SENSITIVE_CREATE(
                userAuth=TPM2B_AUTH(auth.reveal() if auth is not None else b""),
                data=TPM2B_SENSITIVE_DATA(secret.reveal()),
            )
        )
        parent = self.esys.tr_deserialize(srk.esys_tr)
        try:
            with self.salted_session(srk) as session:
                self.esys.trsess_set_attributes(session, SESSION_CONTINUE | SESSION_DECRYPT, 0xFF)
                with self._tss("TPM2_Create of the sealed object"):
                    priv, pub, *_ = self.esys.create(parent, sensitive, template, session1=session)
        finally:
            self.esys.tr_close(parent)
            del sensitive
        _ = ESYS_TR
        return bytes(pub.marshal()), bytes(priv.marshal())

    def trial_policy_pcr(self, pcrs: Iterable[int], *, bank: str = "sha256") -> bytes:
        """The policy digest a TPM trial session computes for TPM2_PolicyPCR of the current PCRs."""
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPM2_SE, TPML_PCR_SELECTION, TPMT_SYM_DEF

        sel = TPML_PCR_SELECTION.parse(f"{bank}:" + ",".join(str(p) for p in sorted(pcrs)))
        with self._tss("TPM2_StartAuthSession (trial)"):
            session = self.esys.start_auth_session(
                ESYS_TR.NONE,
                ESYS_TR.NONE,
                TPM2_SE.TRIAL,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                TPM2_ALG.SHA256,
            )
        try:
            with self._tss("TPM2_PolicyPCR (trial)"):
                self.esys.policy_pcr(session, b"", sel)
                return bytes(self.esys.policy_get_digest(session))
        finally:
            self.esys.flush_context(session)

    # -- NV counter (rollback protection) ----------------------------------------------------

    def _nv_attributes(self, handle: int) -> tuple[int, int, bytes] | None:
        """(attributes, dataSize, authPolicy) of the NV index at ``handle``; None if undefined."""
        if not self.handle_defined(handle):
            return None
        with self._tss("TPM2_NV_ReadPublic"):
            tr = self.esys.tr_from_tpmpublic(handle)
        try:
            with self._tss("TPM2_NV_ReadPublic"):
                pub, _ = self.esys.nv_read_public(tr)
        finally:
            self.esys.tr_close(tr)
        n = pub.nvPublic
        return int(n.attributes), int(n.dataSize), bytes(n.authPolicy)

    def nv_counter(self, handle: int) -> NvBinding:
        """The (written) counter at ``handle``: its name and serialized ESYS_TR, bound 0."""
        name, esys_tr = self.pin(handle, action="TPM2_NV_ReadPublic")
        return NvBinding(handle=handle, name=name, esys_tr=esys_tr)

    def nv_define_counter(self, preferred: int = 0) -> NvBinding:
        """Define a new rollback counter in the first free owner index from ``preferred`` on.

        TPM_NT_COUNTER, AUTHREAD|AUTHWRITE with an empty authValue, NO_DA, no policy; owner
        hierarchy with empty owner auth (as for the SRK).  It is incremented once, so that it
        is written (a counter's first value is the highest any counter of this TPM had) and
        its name (which covers TPMA_NV_WRITTEN) is final.
        """
        from tpm2_pytss import TPM2_ALG, TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

        for i in range(NV_COUNTER_SLOTS):
            handle = NV_COUNTER_BASE + (preferred + i) % NV_COUNTER_SLOTS
            if self._nv_attributes(handle) is None:
                break
        else:
            raise QubesSealError(
                f"no free NV index in 0x{NV_COUNTER_BASE:08x}..0x"
                f"{NV_COUNTER_BASE + NV_COUNTER_SLOTS - 1:08x} for the rollback counter"
            )
        public = TPM2B_NV_PUBLIC(
            nvPublic=TPMS_NV_PUBLIC(
                nvIndex=handle,
                nameAlg=TPM2_ALG.SHA256,
                attributes=NV_COUNTER_ATTRIBUTES,
                dataSize=8,
            )
        )
        with self._tss("TPM2_NV_DefineSpace of the rollback counter (owner hierarchy)"):
            tr = self.esys.nv_define_space(b"", public)
        try:
            with self._tss("TPM2_NV_Increment"):
                self.esys.nv_increment(tr, auth_handle=tr)
        finally:
            self.esys.tr_close(tr)
        return self.nv_counter(handle)

    def is_our_counter(self, handle: int) -> bool:
        """Whether ``handle`` holds a counter with our attributes (so it can be reused)."""
        found = self._nv_attributes(handle)
        if found is None:
            return False
        attributes, size, policy = found
        return attributes & ~TPMA_NV_WRITTEN == NV_COUNTER_ATTRIBUTES and size == 8 and not policy

    def nv_undefine_counter(self, handle: int) -> bool:
        """Remove our rollback counter at ``handle`` (TPM2_NV_UndefineSpace, owner hierarchy
        with the empty owner authorization).  False when ``handle`` holds no counter of ours:
        an index someone else defined is never removed."""
        from tpm2_pytss import ESYS_TR

        if not self.is_our_counter(handle):
            return False
        with self._tss(f"TPM2_NV_ReadPublic of 0x{handle:08x}"):
            tr = self.esys.tr_from_tpmpublic(handle)
        with self._tss(f"TPM2_NV_UndefineSpace of the rollback counter 0x{handle:08x}"):
            self.esys.nv_undefine_space(tr, ESYS_TR.OWNER)
        return True

    def nv_read_counter(self, nv: NvBinding) -> int:
        """The counter's value (TPM2_NV_Read with its empty authValue)."""
        with self._tss("Esys_TR_Deserialize"):
            tr = self.esys.tr_deserialize(nv.esys_tr)
        try:
            with self._tss(f"TPM2_NV_Read of the rollback counter 0x{nv.handle:08x}"):
                data = self.esys.nv_read(tr, 8, 0, auth_handle=tr)
        finally:
            self.esys.tr_close(tr)
        return int.from_bytes(bytes(data), "big")

    def nv_increment(self, nv: NvBinding) -> int:
        """TPM2_NV_Increment of the counter; returns the new value."""
        with self._tss("Esys_TR_Deserialize"):
            tr = self.esys.tr_deserialize(nv.esys_tr)
        try:
            with self._tss(f"TPM2_NV_Increment of the rollback counter 0x{nv.handle:08x}"):
                self.esys.nv_increment(tr, auth_handle=tr)
        finally:
            self.esys.tr_close(tr)
        return self.nv_read_counter(nv)

    def trial_policy_nv(self, nv: NvBinding, bound: int) -> bytes:
        """A trial session's digest for TPM2_PolicyNV(counter <= ``bound``) from zero."""
        from tpm2_pytss import ESYS_TR, TPM2_ALG, TPM2_EO, TPM2_SE, TPM2B_OPERAND, TPMT_SYM_DEF

        with self._tss("TPM2_StartAuthSession (trial)"):
            session = self.esys.start_auth_session(
                ESYS_TR.NONE,
                ESYS_TR.NONE,
                TPM2_SE.TRIAL,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                TPM2_ALG.SHA256,
            )
        tr = self.esys.tr_deserialize(nv.esys_tr)
        try:
            with self._tss("TPM2_PolicyNV (trial)"):
                self.esys.policy_nv(
                    tr, tr, session, TPM2B_OPERAND(bound.to_bytes(8, "big")),
                    TPM2_EO.UNSIGNED_LE,
                )  # fmt: skip
                return bytes(self.esys.policy_get_digest(session))
        finally:
            self.esys.tr_close(tr)
            self.esys.flush_context(session)

    # -- status -----------------------------------------------------------------------------------

    def da_status(self) -> dict[str, int | bool]:
        """Dictionary-attack state: failed tries, maximum, recovery interval, lockout flag.

        Also the time to recovery, derived from those (the TPM counts its powered-on time
        only): ``all_forgiven_within_seconds`` (failed tries x interval: one failure is
        forgiven every interval) and ``next_try_within_seconds`` (0 unless in lockout; in
        lockout one interval at most, when one failure is forgiven; -1 if the protection
        cannot recover on its own: an interval of 0 or a maximum of 0).
        """
        from tpm2_pytss import TPM2_CAP, TPM2_PT

        with self._tss("TPM2_GetCapability(TPM_PROPERTIES)"):
            _, data = self.esys.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.VAR, 64)
            _, fixed = self.esys.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.MAX_AUTH_FAIL, 3)
        props = {int(p.property): int(p.value) for p in data.data.tpmProperties}
        props.update({int(p.property): int(p.value) for p in fixed.data.tpmProperties})
        permanent = props.get(int(TPM2_PT.PERMANENT), 0)
        failed = props.get(int(TPM2_PT.LOCKOUT_COUNTER), 0)
        maximum = props.get(int(TPM2_PT.MAX_AUTH_FAIL), 0)
        interval = props.get(int(TPM2_PT.LOCKOUT_INTERVAL), 0)
        in_lockout = bool(permanent & TPMA_PERMANENT_IN_LOCKOUT)
        if not in_lockout:
            next_try = 0
        elif interval == 0 or maximum == 0:
            next_try = -1  # no self-healing: only the lockout authorization clears it
        else:
            next_try = interval
        return {
            "failed_tries": failed,
            "max_tries": maximum,
            "recovery_seconds": interval,
            "lockout_recovery_seconds": props.get(int(TPM2_PT.LOCKOUT_RECOVERY), 0),
            "in_lockout": in_lockout,
            "all_forgiven_within_seconds": failed * interval,
            "next_try_within_seconds": next_try,
            # Empty lockoutAuth: anyone who reaches the TPM can reset the counter above.
            "lockout_auth_set": bool(permanent & TPMA_PERMANENT_LOCKOUT_AUTH_SET),
        }

    # -- lockout hierarchy --------------------------------------------------------------------

    def lockout_auth_set(self) -> bool:
        """TPMA_PERMANENT.lockoutAuthSet: whether the lockout authorization is not empty."""
        from tpm2_pytss import TPM2_CAP, TPM2_PT

        with self._tss("TPM2_GetCapability(TPM_PT_PERMANENT)"):
            _, data = self.esys.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.PERMANENT, 1)
        props = {int(p.property): int(p.value) for p in data.data.tpmProperties}
        return bool(props.get(int(TPM2_PT.PERMANENT), 0) & TPMA_PERMANENT_LOCKOUT_AUTH_SET)

    @contextmanager
    def _lockout(self, auth: Secret | None, srk: SrkInfo) -> Iterator[Any]:
        """A salted HMAC session for a command on the lockout hierarchy authorized by
        ``auth`` (None: empty).  The authValue never crosses the bus (HMAC), and the first
        parameter is encrypted (``decrypt``).  The authValue set on ESYS_TR.LOCKOUT is
        cleared again on every path."""
        from tpm2_pytss import ESYS_TR

        self.esys.tr_set_auth(ESYS_TR.LOCKOUT, auth.reveal() if auth is not None else b"")
        try:
            with self.salted_session(srk) as session:
                self.esys.trsess_set_attributes(session, SESSION_CONTINUE | SESSION_DECRYPT, 0xFF)
                yield session
        finally:
            self.esys.tr_set_auth(ESYS_TR.LOCKOUT, b"")

    def change_lockout_auth(self, *, current: Secret | None, new: Secret | None) -> None:
        """TPM2_HierarchyChangeAuth(TPM_RH_LOCKOUT): from ``current`` to ``new`` (None:
        empty).  The new value crosses the bus encrypted (salted session, ``decrypt``).  A
        wrong ``current`` counts against the lockout hierarchy (one failure locks it for
        lockoutRecovery seconds), so callers know which value the TPM holds first
        (:meth:`lockout_auth_set`)."""
        from tpm2_pytss import ESYS_TR, TPM2B_AUTH

        srk = self.ensure_srk()
        with self._lockout(current, srk) as session:
            value = TPM2B_AUTH(new.reveal() if new is not None else b"")
            try:
                with self._tss("TPM2_HierarchyChangeAuth(TPM_RH_LOCKOUT)"):
                    self.esys.hierarchy_change_auth(ESYS_TR.LOCKOUT, value, session1=session)
            finally:
                del value

    def dictionary_attack_lock_reset(self, auth: Secret | None) -> None:
        """TPM2_DictionaryAttackLockReset: forgive every failed try and leave lockout, with
        the lockout authorization ``auth`` (None: empty)."""
        from tpm2_pytss import ESYS_TR

        srk = self.ensure_srk()
        with self._lockout(auth, srk) as session:
            self.esys.trsess_set_attributes(session, SESSION_CONTINUE, 0xFF)  # no parameter
            with self._tss("TPM2_DictionaryAttackLockReset"):
                self.esys.dictionary_attack_lock_reset(ESYS_TR.LOCKOUT, session1=session)
