"""ctypes bindings to Debian's libtss2 (ESYS, MU, TCTI loader): the boot path's TPM access.

The boot (initramfs) needs a handful of TPM commands: PCR read and extend, the unseal, and on
a refused unseal the SRK's name for the diagnosis.  tpm2-pytss's compiled module links
libtss2-fapi and through it libcurl and its TLS/Kerberos/LDAP stack (~10 MiB in the image),
and ``import tpm2_pytss`` pulls in ``cryptography.x509``.  So the boot path calls the system
libraries directly::

    libtss2-esys.so.0     Esys_* (links libtss2-sys, libtss2-mu and libcrypto only)
    libtss2-mu.so.0       Tss2_MU_TPM2B_PUBLIC/PRIVATE_Unmarshal, Tss2_MU_TPMT_SIGNATURE_Unmarshal
    libtss2-tctildr.so.0  Tss2_TctiLdr_*: dlopen()s libtss2-tcti-<name>.so.0 at run time

The structures below mirror ``/usr/include/tss2/tss2_tpm2_types.h`` (the test suite compares
every ``sizeof`` with the C compiler's).  TPM2B_PUBLIC is opaque here: only the MU library
fills it and only ESYS reads it.

Everything else (sealing, SRK provisioning, status) uses tpm2-pytss's ESAPI
(:mod:`qubes_seal.tpm.device`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any

from ..errors import QubesSealError, TPMUnavailable
from ..secret import Secret
from . import rc
from ._lib import quiet_tss_log

# -- constants (tss2_tpm2_types.h, tss2_esys.h) ---------------------------------------------------

ESYS_TR_NONE = 0xFFF
ESYS_TR_PASSWORD = 0x0FF
ESYS_TR_PCR0 = 0x000  # ESYS_TR_PCRn == n
ESYS_TR_RH_OWNER = 0x101

TPM2_ALG_SHA1 = 0x0004
TPM2_ALG_AES = 0x0006
TPM2_ALG_SHA256 = 0x000B
TPM2_ALG_SHA384 = 0x000C
TPM2_ALG_SHA512 = 0x000D
TPM2_ALG_NULL = 0x0010
TPM2_ALG_CFB = 0x0043

TPM2_EO_UNSIGNED_LE = 0x0009

TPM2_SE_HMAC = 0x00
TPM2_SE_POLICY = 0x01
TPM2_CAP_HANDLES = 0x00000001

TPMA_SESSION_CONTINUESESSION = 0x01
TPMA_SESSION_DECRYPT = 0x20
TPMA_SESSION_ENCRYPT = 0x40

#: TCG TPM v2.0 Provisioning Guidance, 7.8: the storage root key's persistent handle.
SRK_HANDLE = 0x81000001

TPM2_NUM_PCR_BANKS = 16
TPM2_PCR_SELECT_MAX = 4
TPM2_MAX_CAP_HANDLES = 254
TPM2_MAX_SYM_DATA = 256
#: PC Client platforms implement 24 PCRs: a selection bitmap of 3 bytes.
PCR_SELECT_SIZE = 3
PCRS_PER_READ = 8  # TPML_DIGEST holds 8 digests

BANK_ALG = {
    "sha1": TPM2_ALG_SHA1,
    "sha256": TPM2_ALG_SHA256,
    "sha384": TPM2_ALG_SHA384,
    "sha512": TPM2_ALG_SHA512,
}
DIGEST_SIZE = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64}

LIBRARIES = ("libtss2-esys.so.0", "libtss2-mu.so.0", "libtss2-tctildr.so.0")

# -- structures -----------------------------------------------------------------------------------

u8, u16, u32 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32
ESYS_TR = ctypes.c_uint32
TSS2_RC = ctypes.c_uint32


class TPMU_SYM_KEY_BITS(ctypes.Union):
    _fields_ = [("aes", u16), ("sm4", u16), ("camellia", u16), ("sym", u16),
                ("exclusiveOr", u16)]  # fmt: skip


class TPMU_SYM_MODE(ctypes.Union):
    _fields_ = [("aes", u16), ("sm4", u16), ("camellia", u16), ("sym", u16)]


class TPMT_SYM_DEF(ctypes.Structure):
    _fields_ = [("algorithm", u16), ("keyBits", TPMU_SYM_KEY_BITS), ("mode", TPMU_SYM_MODE)]


class TPMS_PCR_SELECTION(ctypes.Structure):
    _fields_ = [("hash", u16), ("sizeofSelect", u8), ("pcrSelect", u8 * TPM2_PCR_SELECT_MAX)]


class TPML_PCR_SELECTION(ctypes.Structure):
    _fields_ = [("count", u32), ("pcrSelections", TPMS_PCR_SELECTION * TPM2_NUM_PCR_BANKS)]


class TPMU_HA(ctypes.Union):
    _fields_ = [("sha1", u8 * 20), ("sha256", u8 * 32), ("sha384", u8 * 48),
                ("sha512", u8 * 64), ("sm3_256", u8 * 32)]  # fmt: skip


class TPMT_HA(ctypes.Structure):
    _fields_ = [("hashAlg", u16), ("digest", TPMU_HA)]


class TPM2B_DIGEST(ctypes.Structure):
    _fields_ = [("size", u16), ("buffer", u8 * ctypes.sizeof(TPMU_HA))]


TPM2B_AUTH = TPM2B_DIGEST  # typedef TPM2B_DIGEST TPM2B_AUTH
TPM2B_NONCE = TPM2B_DIGEST  # typedef TPM2B_DIGEST TPM2B_NONCE
TPM2B_OPERAND = TPM2B_DIGEST  # typedef TPM2B_DIGEST TPM2B_OPERAND


class TPML_DIGEST(ctypes.Structure):
    _fields_ = [("count", u32), ("digests", TPM2B_DIGEST * 8)]


class TPML_DIGEST_VALUES(ctypes.Structure):
    _fields_ = [("count", u32), ("digests", TPMT_HA * TPM2_NUM_PCR_BANKS)]


class TPM2B_SENSITIVE_DATA(ctypes.Structure):
    _fields_ = [("size", u16), ("buffer", u8 * TPM2_MAX_SYM_DATA)]


class TPMU_NAME(ctypes.Union):
    _fields_ = [("digest", TPMT_HA), ("handle", u32)]


class TPM2B_NAME(ctypes.Structure):
    _fields_ = [("size", u16), ("name", u8 * ctypes.sizeof(TPMU_NAME))]


class TPM2B_PUBLIC(ctypes.Structure):
    """Opaque: ``UINT16 size; TPMT_PUBLIC publicArea`` (616 bytes, 4-byte aligned)."""

    _fields_ = [("_opaque", u32 * 154)]


class TPM2B_PRIVATE(ctypes.Structure):
    _fields_ = [("size", u16), ("buffer", u8 * 1550)]  # sizeof(_PRIVATE)


class TPMT_SIGNATURE(ctypes.Structure):
    """Opaque: ``TPMI_ALG_SIG_SCHEME sigAlg; TPMU_SIGNATURE signature`` (518 bytes, 2-aligned);
    only the MU library fills it."""

    _fields_ = [("_opaque", u16 * 259)]


class TPMT_TK_VERIFIED(ctypes.Structure):
    _fields_ = [("tag", u16), ("hierarchy", u32), ("digest", TPM2B_DIGEST)]


class TPML_HANDLE(ctypes.Structure):
    _fields_ = [("count", u32), ("handle", u32 * TPM2_MAX_CAP_HANDLES)]


class TPMU_CAPABILITIES(ctypes.Union):
    """Only ``handles`` is spelled out; ``_size`` gives the union its C size (1028 bytes)."""

    _fields_ = [("handles", TPML_HANDLE), ("_size", u32 * 257)]


class TPMS_CAPABILITY_DATA(ctypes.Structure):
    _fields_ = [("capability", u32), ("data", TPMU_CAPABILITIES)]


#: Each structure and the size the C compiler gives it (x86-64 and every LP64/ILP32 ABI).
STRUCTS: dict[str, type[ctypes.Structure] | type[ctypes.Union]] = {
    "TPMT_SYM_DEF": TPMT_SYM_DEF,
    "TPMS_PCR_SELECTION": TPMS_PCR_SELECTION,
    "TPML_PCR_SELECTION": TPML_PCR_SELECTION,
    "TPMU_HA": TPMU_HA,
    "TPMT_HA": TPMT_HA,
    "TPM2B_DIGEST": TPM2B_DIGEST,
    "TPM2B_AUTH": TPM2B_AUTH,
    "TPM2B_NONCE": TPM2B_NONCE,
    "TPM2B_OPERAND": TPM2B_OPERAND,
    "TPML_DIGEST": TPML_DIGEST,
    "TPML_DIGEST_VALUES": TPML_DIGEST_VALUES,
    "TPM2B_SENSITIVE_DATA": TPM2B_SENSITIVE_DATA,
    "TPMU_NAME": TPMU_NAME,
    "TPM2B_NAME": TPM2B_NAME,
    "TPM2B_PUBLIC": TPM2B_PUBLIC,
    "TPM2B_PRIVATE": TPM2B_PRIVATE,
    "TPMT_SIGNATURE": TPMT_SIGNATURE,
    "TPMT_TK_VERIFIED": TPMT_TK_VERIFIED,
    "TPML_HANDLE": TPML_HANDLE,
    "TPMU_CAPABILITIES": TPMU_CAPABILITIES,
    "TPMS_CAPABILITY_DATA": TPMS_CAPABILITY_DATA,
}

# -- functions ------------------------------------------------------------------------------------

P = ctypes.POINTER
vp = ctypes.c_void_p
size_t = ctypes.c_size_t
TR3 = (ESYS_TR, ESYS_TR, ESYS_TR)

#: name -> (library index in LIBRARIES, restype, argtypes)
_PROTOTYPES: dict[str, tuple[int, Any, tuple[Any, ...]]] = {
    "Tss2_TctiLdr_Initialize": (2, TSS2_RC, (ctypes.c_char_p, P(vp))),
    "Tss2_TctiLdr_Finalize": (2, None, (P(vp),)),
    "Tss2_MU_TPM2B_PUBLIC_Unmarshal": (
        1, TSS2_RC, (ctypes.c_char_p, size_t, P(size_t), P(TPM2B_PUBLIC)),
    ),
    "Tss2_MU_TPM2B_PRIVATE_Unmarshal": (
        1, TSS2_RC, (ctypes.c_char_p, size_t, P(size_t), P(TPM2B_PRIVATE)),
    ),
    "Tss2_MU_TPMT_SIGNATURE_Unmarshal": (
        1, TSS2_RC, (ctypes.c_char_p, size_t, P(size_t), P(TPMT_SIGNATURE)),
    ),
    "Esys_Initialize": (0, TSS2_RC, (P(vp), vp, vp)),
    "Esys_Finalize": (0, None, (P(vp),)),
    "Esys_Free": (0, None, (vp,)),
    "Esys_TR_Deserialize": (0, TSS2_RC, (vp, ctypes.c_char_p, size_t, P(ESYS_TR))),
    "Esys_TR_FromTPMPublic": (0, TSS2_RC, (vp, u32, *TR3, P(ESYS_TR))),
    "Esys_TR_GetName": (0, TSS2_RC, (vp, ESYS_TR, P(P(TPM2B_NAME)))),
    "Esys_TR_Close": (0, TSS2_RC, (vp, P(ESYS_TR))),
    "Esys_TR_SetAuth": (0, TSS2_RC, (vp, ESYS_TR, P(TPM2B_AUTH))),
    "Esys_TRSess_SetAttributes": (0, TSS2_RC, (vp, ESYS_TR, u8, u8)),
    "Esys_Load": (
        0, TSS2_RC, (vp, ESYS_TR, *TR3, P(TPM2B_PRIVATE), P(TPM2B_PUBLIC), P(ESYS_TR)),
    ),
    "Esys_LoadExternal": (
        0, TSS2_RC, (vp, *TR3, vp, P(TPM2B_PUBLIC), ESYS_TR, P(ESYS_TR)),
    ),
    "Esys_VerifySignature": (
        0, TSS2_RC,
        (vp, ESYS_TR, *TR3, P(TPM2B_DIGEST), P(TPMT_SIGNATURE), P(P(TPMT_TK_VERIFIED))),
    ),
    "Esys_PolicyAuthorize": (
        0, TSS2_RC,
        (vp, ESYS_TR, *TR3, P(TPM2B_DIGEST), P(TPM2B_NONCE), P(TPM2B_NAME), P(TPMT_TK_VERIFIED)),
    ),
    "Esys_StartAuthSession": (
        0, TSS2_RC,
        (vp, ESYS_TR, ESYS_TR, *TR3, P(TPM2B_NONCE), u8, P(TPMT_SYM_DEF), u16, P(ESYS_TR)),
    ),
    "Esys_PolicyPCR": (
        0, TSS2_RC, (vp, ESYS_TR, *TR3, P(TPM2B_DIGEST), P(TPML_PCR_SELECTION)),
    ),
    "Esys_PolicyOR": (0, TSS2_RC, (vp, ESYS_TR, *TR3, P(TPML_DIGEST))),
    "Esys_PolicyAuthValue": (0, TSS2_RC, (vp, ESYS_TR, *TR3)),
    "Esys_PolicyNV": (
        0, TSS2_RC, (vp, ESYS_TR, ESYS_TR, ESYS_TR, *TR3, P(TPM2B_OPERAND), u16, u16),
    ),
    "Esys_Unseal": (0, TSS2_RC, (vp, ESYS_TR, *TR3, P(P(TPM2B_SENSITIVE_DATA)))),
    "Esys_FlushContext": (0, TSS2_RC, (vp, ESYS_TR)),
    "Esys_PCR_Read": (
        0, TSS2_RC,
        (vp, *TR3, P(TPML_PCR_SELECTION), P(u32), P(P(TPML_PCR_SELECTION)), P(P(TPML_DIGEST))),
    ),
    "Esys_PCR_Extend": (0, TSS2_RC, (vp, ESYS_TR, *TR3, P(TPML_DIGEST_VALUES))),
    "Esys_GetCapability": (
        0, TSS2_RC, (vp, *TR3, u32, u32, u32, P(u8), P(P(TPMS_CAPABILITY_DATA))),
    ),
}  # fmt: skip


class _Lib:
    """The C functions, typed; attributes are filled from :data:`_PROTOTYPES`."""

    def __getattr__(self, name: str) -> Any:  # for mypy: every function is an attribute
        raise AttributeError(name)


_LIB: _Lib | None = None


def load() -> _Lib:
    """Load the three libtss2 libraries by soname (once) and type their functions.

    Raises ImportError naming the missing library (Debian: libtss2-esys-3.0.2-0, libtss2-mu-*,
    libtss2-tctildr0).
    """
    global _LIB
    if _LIB is not None:
        return _LIB
    quiet_tss_log()
    libs = []
    for soname in LIBRARIES:
        try:
            libs.append(ctypes.CDLL(soname))
        except OSError as exc:
            raise ImportError(f"cannot load {soname} (libtss2): {exc}") from exc
    lib = _Lib()
    for name, (index, restype, argtypes) in _PROTOTYPES.items():
        try:
            func = getattr(libs[index], name)
        except AttributeError as exc:
            raise ImportError(f"{LIBRARIES[index]} has no {name}: libtss2 too old") from exc
        func.restype = restype
        func.argtypes = argtypes
        lib.__dict__[name] = func
    _LIB = lib
    return lib


class TssError(Exception):
    """A libtss2 call that returned a non-zero TSS2_RC; :func:`rc.to_error` maps it for users."""

    def __init__(self, code: int, action: str) -> None:
        super().__init__(f"{action}: {rc.describe(code)}")
        self.code = code
        self.action = action


def _wipe(obj: ctypes.Structure) -> None:
    ctypes.memset(ctypes.addressof(obj), 0, ctypes.sizeof(obj))


def pcr_selection(pcrs: Iterable[int], bank: str = "sha256") -> TPML_PCR_SELECTION:
    """A one-bank TPML_PCR_SELECTION of ``pcrs`` (3-byte bitmap, PC Client's 24 PCRs)."""
    sel = TPML_PCR_SELECTION()
    sel.count = 1
    sel.pcrSelections[0].hash = BANK_ALG[bank]
    sel.pcrSelections[0].sizeofSelect = PCR_SELECT_SIZE
    for p in pcrs:
        if not 0 <= p < 8 * PCR_SELECT_SIZE:
            raise ValueError(f"PCR index {p} out of range 0..{8 * PCR_SELECT_SIZE - 1}")
        sel.pcrSelections[0].pcrSelect[p // 8] |= 1 << (p % 8)
    return sel


class Esys:
    """A TCTI loader context and an ESYS context on it; finalized on every path.

    Use as a context manager.  The PCR and SRK helpers raise the qubes-seal error a user
    should see (:func:`rc.to_error`); the unseal primitives raise :class:`TssError` so the
    caller can diagnose a refusal.  Handles are plain ints (ESYS_TR).
    """

    def __init__(self, tcti: str) -> None:
        try:
            self.lib = load()
        except ImportError as exc:
            raise TPMUnavailable(
                f"the TPM libraries cannot be loaded: {exc}",
                hint="Install Debian's libtss2-esys, libtss2-mu and libtss2-tctildr packages.",
            ) from exc
        self.tcti = tcti
        self._tcti = vp()
        self._ctx = vp()
        r = self.lib.Tss2_TctiLdr_Initialize(tcti.encode(), ctypes.byref(self._tcti))
        if r != 0:
            raise TPMUnavailable(
                f"TPM unavailable through TCTI '{tcti}' ({rc.describe(r)})",
                hint="Is the TPM present and its driver loaded (tpm_tis, tpm_crb)? Choose "
                "another TPM with --tpm or QUBES_SEAL_TPM.",
            )
        r = self.lib.Esys_Initialize(ctypes.byref(self._ctx), self._tcti, None)
        if r != 0:
            self.lib.Tss2_TctiLdr_Finalize(ctypes.byref(self._tcti))
            raise TPMUnavailable(f"cannot initialise ESYS on '{tcti}' ({rc.describe(r)})")

    @property
    def ctx(self) -> ctypes.c_void_p:
        return self._ctx

    def close(self) -> None:
        if self._ctx.value:
            self.lib.Esys_Finalize(ctypes.byref(self._ctx))
            self._ctx.value = None
        if self._tcti.value:
            self.lib.Tss2_TctiLdr_Finalize(ctypes.byref(self._tcti))
            self._tcti.value = None

    def __enter__(self) -> Esys:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @staticmethod
    def check(r: int, action: str) -> None:
        """Raise :class:`TssError` for a non-zero ``r``."""
        if r != 0:
            raise TssError(r, action)

    @contextmanager
    def _tss(self, action: str) -> Iterator[None]:
        """Translate a :class:`TssError` into the qubes-seal error a user should see."""
        try:
            yield
        except TssError as exc:
            raise rc.to_error(exc.code, action=action, tcti=self.tcti) from None

    # -- PCRs -------------------------------------------------------------------------------

    def pcr_read(self, pcrs: Iterable[int], bank: str = "sha256") -> dict[int, bytes]:
        """Current values of ``pcrs`` in ``bank`` (TPM2_PCR_Read, up to 8 PCRs per command)."""
        wanted = sorted(set(pcrs))
        alg = BANK_ALG[bank]
        out: dict[int, bytes] = {}
        while len(out) < len(wanted):
            todo = [p for p in wanted if p not in out][:PCRS_PER_READ]
            sel = pcr_selection(todo, bank)
            counter = u32()
            got_sel = P(TPML_PCR_SELECTION)()
            values = P(TPML_DIGEST)()
            with self._tss("TPM2_PCR_Read"):
                self.check(
                    self.lib.Esys_PCR_Read(
                        self._ctx, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                        ctypes.byref(sel), ctypes.byref(counter),
                        ctypes.byref(got_sel), ctypes.byref(values),
                    ),
                    "TPM2_PCR_Read",
                )  # fmt: skip
            try:
                s = got_sel.contents
                got = [
                    p
                    for i in range(min(s.count, TPM2_NUM_PCR_BANKS))
                    if s.pcrSelections[i].hash == alg
                    for p in range(8 * min(s.pcrSelections[i].sizeofSelect, TPM2_PCR_SELECT_MAX))
                    if s.pcrSelections[i].pcrSelect[p // 8] & (1 << (p % 8))
                ]
                d = values.contents
                digests = [
                    bytes(d.digests[i].buffer[: d.digests[i].size]) for i in range(min(d.count, 8))
                ]
            finally:
                self.lib.Esys_Free(got_sel)
                self.lib.Esys_Free(values)
            got = got[: len(digests)]
            if not got:
                raise QubesSealError(f"the TPM has no {bank} PCR bank allocated")
            for p, value in zip(got, digests, strict=False):
                out[p] = value
        return {p: out[p] for p in wanted}

    def pcr_extend(self, pcr: int, digest: bytes, bank: str = "sha256") -> None:
        """TPM2_PCR_Extend of one bank of ``pcr`` with ``digest`` (empty password auth)."""
        if len(digest) != DIGEST_SIZE[bank]:
            raise ValueError(f"a {bank} digest has {DIGEST_SIZE[bank]} bytes, not {len(digest)}")
        if not 0 <= pcr < 8 * PCR_SELECT_SIZE:
            raise ValueError(f"PCR index {pcr} out of range")
        values = TPML_DIGEST_VALUES()
        values.count = 1
        values.digests[0].hashAlg = BANK_ALG[bank]
        ctypes.memmove(ctypes.addressof(values.digests[0].digest), digest, len(digest))
        with self._tss(f"TPM2_PCR_Extend of PCR {pcr}"):
            self.check(
                self.lib.Esys_PCR_Extend(
                    self._ctx, ESYS_TR_PCR0 + pcr, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                    ctypes.byref(values),
                ),
                f"TPM2_PCR_Extend of PCR {pcr}",
            )  # fmt: skip

    # The names of :class:`qubes_seal.tpm.device.Tpm`, for code that takes either.
    def read_pcrs(self, pcrs: Iterable[int], *, bank: str = "sha256") -> dict[int, bytes]:
        """Same as :meth:`pcr_read` (the :class:`~qubes_seal.tpm.device.Tpm` spelling)."""
        return self.pcr_read(pcrs, bank)

    def extend_pcr(self, pcr: int, digest: bytes, *, bank: str = "sha256") -> None:
        """Same as :meth:`pcr_extend` (the :class:`~qubes_seal.tpm.device.Tpm` spelling)."""
        self.pcr_extend(pcr, digest, bank)

    # -- SRK --------------------------------------------------------------------------------

    def srk_name(self, handle: int = SRK_HANDLE) -> bytes | None:
        """The TPM name of the persistent key at ``handle``, or None when the handle is empty.

        TPM2_GetCapability(TPM_CAP_HANDLES), then TPM2_ReadPublic (Esys_TR_FromTPMPublic).
        """
        more = u8()
        cap = P(TPMS_CAPABILITY_DATA)()
        with self._tss("TPM2_GetCapability"):
            self.check(
                self.lib.Esys_GetCapability(
                    self._ctx, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                    TPM2_CAP_HANDLES, handle, 1, ctypes.byref(more), ctypes.byref(cap),
                ),
                "TPM2_GetCapability",
            )  # fmt: skip
        try:
            handles = cap.contents.data.handles
            present = handle in handles.handle[: min(handles.count, TPM2_MAX_CAP_HANDLES)]
        finally:
            self.lib.Esys_Free(cap)
        if not present:
            return None
        tr = ESYS_TR(ESYS_TR_NONE)
        with self._tss("TPM2_ReadPublic of the SRK"):
            self.check(
                self.lib.Esys_TR_FromTPMPublic(
                    self._ctx, handle, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ctypes.byref(tr)
                ),
                "TPM2_ReadPublic of the SRK",
            )
        try:
            with self._tss("Esys_TR_GetName"):
                return self.tr_name(int(tr.value))
        finally:
            self.lib.Esys_TR_Close(self._ctx, ctypes.byref(tr))

    def tr_name(self, handle: int) -> bytes:
        """The TPM name ESYS holds for ``handle`` (no TPM command); raises TssError."""
        name = P(TPM2B_NAME)()
        self.check(
            self.lib.Esys_TR_GetName(self._ctx, handle, ctypes.byref(name)), "Esys_TR_GetName"
        )
        try:
            n = name.contents
            return bytes(n.name[: min(n.size, len(n.name))])
        finally:
            self.lib.Esys_Free(name)

    # -- unseal primitives (raise TssError) -----------------------------------------------------

    def tr_deserialize(self, data: bytes) -> int:
        """An ESYS_TR from Esys_TR_Serialize's bytes (no TPM command)."""
        tr = ESYS_TR(ESYS_TR_NONE)
        self.check(
            self.lib.Esys_TR_Deserialize(self._ctx, data, len(data), ctypes.byref(tr)),
            "Esys_TR_Deserialize",
        )
        return int(tr.value)

    def tr_close(self, handle: int) -> None:
        """Forget ``handle`` in ESYS (no TPM command)."""
        tr = ESYS_TR(handle)
        self.lib.Esys_TR_Close(self._ctx, ctypes.byref(tr))

    def tr_set_auth(self, handle: int, value: bytes) -> None:
        """Esys_TR_SetAuth; the copy in our buffer is zeroed afterwards."""
        auth = TPM2B_AUTH()
        if len(value) > len(auth.buffer):
            raise ValueError("an authValue has at most 64 bytes")
        auth.size = len(value)
        ctypes.memmove(ctypes.addressof(auth.buffer), value, len(value))
        try:
            self.check(
                self.lib.Esys_TR_SetAuth(self._ctx, handle, ctypes.byref(auth)), "Esys_TR_SetAuth"
            )
        finally:
            _wipe(auth)

    def load(self, parent: int, private: TPM2B_PRIVATE, public: TPM2B_PUBLIC) -> int:
        """TPM2_Load under ``parent`` (its auth: empty password)."""
        obj = ESYS_TR(ESYS_TR_NONE)
        self.check(
            self.lib.Esys_Load(
                self._ctx, parent, ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE,
                ctypes.byref(private), ctypes.byref(public), ctypes.byref(obj),
            ),
            "TPM2_Load",
        )  # fmt: skip
        return int(obj.value)

    def start_auth_session(
        self, tpm_key: int, session_type: int = TPM2_SE_POLICY, *, aes_cfb_bits: int = 128
    ) -> int:
        """TPM2_StartAuthSession salted with ``tpm_key``, AES-CFB parameter encryption, SHA-256."""
        sym = TPMT_SYM_DEF()
        sym.algorithm = TPM2_ALG_AES
        sym.keyBits.aes = aes_cfb_bits
        sym.mode.aes = TPM2_ALG_CFB
        sess = ESYS_TR(ESYS_TR_NONE)
        self.check(
            self.lib.Esys_StartAuthSession(
                self._ctx, tpm_key, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                None, session_type, ctypes.byref(sym), TPM2_ALG_SHA256, ctypes.byref(sess),
            ),
            "TPM2_StartAuthSession",
        )  # fmt: skip
        return int(sess.value)

    def trsess_set_attributes(self, session: int, flags: int, mask: int = 0xFF) -> None:
        self.check(
            self.lib.Esys_TRSess_SetAttributes(self._ctx, session, flags, mask),
            "Esys_TRSess_SetAttributes",
        )

    def policy_pcr(self, session: int, selection: TPML_PCR_SELECTION) -> None:
        """TPM2_PolicyPCR with an empty pcrDigest: the TPM uses the current values."""
        digest = TPM2B_DIGEST()
        self.check(
            self.lib.Esys_PolicyPCR(
                self._ctx, session, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                ctypes.byref(digest), ctypes.byref(selection),
            ),
            "TPM2_PolicyPCR",
        )  # fmt: skip

    def policy_or(self, session: int, branches: list[bytes]) -> None:
        """TPM2_PolicyOR of 2 to 8 branch digests."""
        if not 2 <= len(branches) <= 8:
            raise ValueError(f"TPM2_PolicyOR takes 2 to 8 branches, not {len(branches)}")
        hashes = TPML_DIGEST()
        hashes.count = len(branches)
        for i, d in enumerate(branches):
            if len(d) > len(hashes.digests[i].buffer):
                raise ValueError("a policy digest has at most 64 bytes")
            hashes.digests[i].size = len(d)
            ctypes.memmove(ctypes.addressof(hashes.digests[i].buffer), d, len(d))
        self.check(
            self.lib.Esys_PolicyOR(
                self._ctx, session, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ctypes.byref(hashes)
            ),
            "TPM2_PolicyOR",
        )

    def policy_auth_value(self, session: int) -> None:
        self.check(
            self.lib.Esys_PolicyAuthValue(
                self._ctx, session, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE
            ),
            "TPM2_PolicyAuthValue",
        )

    def policy_nv(
        self,
        session: int,
        nv_index: int,
        operand_b: bytes,
        *,
        offset: int = 0,
        operation: int = TPM2_EO_UNSIGNED_LE,
    ) -> None:
        """TPM2_PolicyNV: the NV data at ``offset`` ``operation`` ``operand_b``; the index is
        read with its own (empty) authValue, through a password session."""
        operand = TPM2B_OPERAND()
        if len(operand_b) > len(operand.buffer):
            raise ValueError("an operand has at most 64 bytes")
        operand.size = len(operand_b)
        ctypes.memmove(ctypes.addressof(operand.buffer), operand_b, len(operand_b))
        self.check(
            self.lib.Esys_PolicyNV(
                self._ctx, nv_index, nv_index, session, ESYS_TR_PASSWORD, ESYS_TR_NONE,
                ESYS_TR_NONE, ctypes.byref(operand), offset, operation,
            ),
            "TPM2_PolicyNV",
        )  # fmt: skip

    def load_external(self, public: TPM2B_PUBLIC) -> int:
        """TPM2_LoadExternal of a public key alone, in the owner hierarchy (so that the
        tickets of TPM2_VerifySignature are not NULL tickets, which PolicyAuthorize refuses)."""
        obj = ESYS_TR(ESYS_TR_NONE)
        self.check(
            self.lib.Esys_LoadExternal(
                self._ctx, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, None, ctypes.byref(public),
                ESYS_TR_RH_OWNER, ctypes.byref(obj),
            ),
            "TPM2_LoadExternal",
        )  # fmt: skip
        return int(obj.value)

    def verify_signature(
        self, key: int, digest: bytes, signature: TPMT_SIGNATURE
    ) -> TPMT_TK_VERIFIED:
        """TPM2_VerifySignature of ``signature`` over ``digest``: the validation ticket."""
        d = _digest(digest)
        out = P(TPMT_TK_VERIFIED)()
        self.check(
            self.lib.Esys_VerifySignature(
                self._ctx, key, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                ctypes.byref(d), ctypes.byref(signature), ctypes.byref(out),
            ),
            "TPM2_VerifySignature",
        )  # fmt: skip
        try:
            ticket = TPMT_TK_VERIFIED()
            ctypes.memmove(ctypes.addressof(ticket), out, ctypes.sizeof(ticket))
            return ticket
        finally:
            self.lib.Esys_Free(out)

    def policy_authorize(
        self,
        session: int,
        approved: bytes,
        policy_ref: bytes,
        key_name: bytes,
        ticket: TPMT_TK_VERIFIED,
    ) -> None:
        """TPM2_PolicyAuthorize: the session's digest (``approved``) was signed by the key."""
        name = TPM2B_NAME()
        if len(key_name) > len(name.name):
            raise ValueError("a TPM name has at most 68 bytes")
        name.size = len(key_name)
        ctypes.memmove(ctypes.addressof(name.name), key_name, len(key_name))
        a, ref = _digest(approved), _digest(policy_ref)
        self.check(
            self.lib.Esys_PolicyAuthorize(
                self._ctx, session, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                ctypes.byref(a), ctypes.byref(ref), ctypes.byref(name), ctypes.byref(ticket),
            ),
            "TPM2_PolicyAuthorize",
        )  # fmt: skip

    def unseal(self, item: int, session: int) -> Secret:
        """TPM2_Unseal of ``item`` through ``session``; libtss2's copy is zeroed, then freed."""
        out = P(TPM2B_SENSITIVE_DATA)()
        self.check(
            self.lib.Esys_Unseal(
                self._ctx, item, session, ESYS_TR_NONE, ESYS_TR_NONE, ctypes.byref(out)
            ),
            "TPM2_Unseal",
        )
        data = out.contents
        try:
            size = min(data.size, TPM2_MAX_SYM_DATA)
            view = (ctypes.c_char * size).from_address(ctypes.addressof(data.buffer))
            return Secret(memoryview(view).cast("B"))
        finally:
            _wipe(data)
            self.lib.Esys_Free(out)

    def flush_context(self, handle: int) -> int:
        """TPM2_FlushContext; returns the TSS2_RC (callers flush on error paths too)."""
        return int(self.lib.Esys_FlushContext(self._ctx, handle))


def _digest(data: bytes) -> TPM2B_DIGEST:
    out = TPM2B_DIGEST()
    if len(data) > len(out.buffer):
        raise ValueError("a digest has at most 64 bytes")
    out.size = len(data)
    ctypes.memmove(ctypes.addressof(out.buffer), data, len(data))
    return out


TPM2_ST_VERIFIED = 0x8022
TPM2_RH_OWNER = 0x40000001


def marshal_ticket(ticket: TPMT_TK_VERIFIED) -> bytes:
    """A TPMT_TK_VERIFIED in its wire form (TPM 2.0 Part 2): tag, hierarchy, TPM2B_DIGEST."""
    size: int = min(ticket.digest.size, len(ticket.digest.buffer))
    return (
        int(ticket.tag).to_bytes(2, "big")
        + int(ticket.hierarchy).to_bytes(4, "big")
        + size.to_bytes(2, "big")
        + bytes(ticket.digest.buffer[:size])
    )


def unmarshal_ticket(data: bytes) -> TPMT_TK_VERIFIED:
    """A marshalled TPMT_TK_VERIFIED (from the token: untrusted, the TPM checks its HMAC);
    ValueError unless it is a well-formed owner-hierarchy verification ticket."""
    if len(data) < 8:
        raise ValueError("truncated TPMT_TK_VERIFIED")
    tag, hierarchy = int.from_bytes(data[:2], "big"), int.from_bytes(data[2:6], "big")
    size = int.from_bytes(data[6:8], "big")
    if tag != TPM2_ST_VERIFIED or hierarchy != TPM2_RH_OWNER:
        raise ValueError("not an owner-hierarchy TPMT_TK_VERIFIED")
    if size > ctypes.sizeof(TPMU_HA) or len(data) != 8 + size:
        raise ValueError("malformed TPMT_TK_VERIFIED")
    ticket = TPMT_TK_VERIFIED()
    ticket.tag, ticket.hierarchy = tag, hierarchy
    ticket.digest.size = size
    ctypes.memmove(ctypes.addressof(ticket.digest.buffer), data[8:], size)
    return ticket


def unmarshal_signature(data: bytes) -> TPMT_SIGNATURE:
    """A marshalled TPMT_SIGNATURE, parsed by libtss2-mu; ValueError when malformed."""
    lib = load()
    dest = TPMT_SIGNATURE()
    _unmarshal(lib.Tss2_MU_TPMT_SIGNATURE_Unmarshal, data, dest)
    return dest


def unmarshal_public(data: bytes) -> TPM2B_PUBLIC:
    """A marshalled TPM2B_PUBLIC, parsed by libtss2-mu; ValueError when malformed."""
    lib = load()
    dest = TPM2B_PUBLIC()
    _unmarshal(lib.Tss2_MU_TPM2B_PUBLIC_Unmarshal, data, dest)
    return dest


def unmarshal_private(data: bytes) -> TPM2B_PRIVATE:
    """A marshalled TPM2B_PRIVATE, parsed by libtss2-mu; ValueError when malformed."""
    lib = load()
    dest = TPM2B_PRIVATE()
    _unmarshal(lib.Tss2_MU_TPM2B_PRIVATE_Unmarshal, data, dest)
    return dest


def _unmarshal(func: Any, data: bytes, dest: ctypes.Structure) -> None:
    offset = size_t(0)
    r = func(data, len(data), ctypes.byref(offset), ctypes.byref(dest))
    if r != 0 or offset.value != len(data):
        raise ValueError(f"malformed {type(dest).__name__} ({rc.describe(r)})")
