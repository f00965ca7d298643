"""The boot-time unseal: five TPM commands, nothing in clear on the bus, every handle flushed.

Sequence (TPM 2.0 Part 3 command names)::

    TPM2_Load            the sealed object under the SRK (SRK auth: empty password)
    TPM2_StartAuthSession  policy session salted with the pinned SRK, AES-128-CFB
    TPM2_PolicyPCR       the sealed PCR selection, current values
    [TPM2_PolicyOR]      when several PCR states are accepted (current + predicted boot)
    [TPM2_PolicyAuthValue] when the object's authValue comes from the passphrase
    TPM2_Unseal          response parameter encrypted (session attribute ``encrypt``);
                         ``continueSession`` clear, so the TPM flushes the session itself
    TPM2_FlushContext    the sealed object

The SRK is not read from the TPM: its public area travels in the sealed state as a serialized
ESYS_TR, recorded at sealing time (the pin).  A different key at 0x81000001 cannot decrypt the
salt nor load the object, so the unseal fails closed; the diagnosis then compares names.

This module imports only the compiled bindings (see :mod:`qubes_seal.tpm._lib`), so a boot pays
no Python import cost beyond them.
"""

from __future__ import annotations

from typing import Any

from ..errors import (
    CorruptState,
    MeasurementMismatch,
    NoMeasuredLaunch,
    QubesSealError,
    SRKMismatch,
    TPMUnavailable,
    UsageError,
)
from ..policy import BANK_ALG, PCR_SELECT_SIZE, pcr_select_bitmap, sealing_policy
from ..secret import Secret
from ..state import SealedState
from . import _lib, rc

TPM2_SE_POLICY = 0x01
TPM2_ALG_AES = 0x0006
TPM2_ALG_CFB = 0x0043
TPM2_ALG_SHA256 = 0x000B
ESYS_TR_NONE = 0xFFF
ESYS_TR_PASSWORD = 0x0FF
SESSION_ENCRYPT = 0x40
DRTM_PCR = 17


class _Esys:
    """A raw ESYS context over tpm2-pytss's cffi bindings; closes its TCTI and context."""

    def __init__(self, tcti: str) -> None:
        self.ffi, self.lib = _lib.load()
        self.tcti = tcti
        self._tcti_pp = self.ffi.new("TSS2_TCTI_CONTEXT **")
        self._ctx_pp = self.ffi.new("ESYS_CONTEXT **")
        r = self.lib.Tss2_TctiLdr_Initialize(tcti.encode(), self._tcti_pp)
        if r != 0:
            raise TPMUnavailable(
                f"TPM unavailable through TCTI '{tcti}' ({rc.describe(r)})",
                hint="Is the TPM present and its driver loaded (tpm_tis, tpm_crb)? Choose "
                "another TPM with --tpm or QUBES_SEAL_TPM.",
            )
        r = self.lib.Esys_Initialize(self._ctx_pp, self._tcti_pp[0], self.ffi.NULL)
        if r != 0:
            self.lib.Tss2_TctiLdr_Finalize(self._tcti_pp)
            raise TPMUnavailable(f"cannot initialise ESYS on '{tcti}' ({rc.describe(r)})")
        self.ctx = self._ctx_pp[0]

    def check(self, r: int, action: str) -> None:
        if r != 0:
            raise _Failed(r, action)

    def close(self) -> None:
        if self._ctx_pp[0] != self.ffi.NULL:
            self.lib.Esys_Finalize(self._ctx_pp)
        if self._tcti_pp[0] != self.ffi.NULL:
            self.lib.Tss2_TctiLdr_Finalize(self._tcti_pp)


class _Failed(Exception):
    def __init__(self, code: int, action: str) -> None:
        super().__init__(action)
        self.code = code
        self.action = action


def unseal(state: SealedState, *, tcti: str, auth: Secret | None = None) -> Secret:
    """Unseal the master secret of ``state`` from the TPM at ``tcti``.

    Raises :class:`MeasurementMismatch` (with the differing PCRs) or :class:`NoMeasuredLaunch`
    when the TPM refuses on policy, :class:`SRKMismatch` when the TPM's SRK is not the pinned
    one, :class:`~qubes_seal.errors.AuthorizationError` for a wrong authValue,
    :class:`~qubes_seal.errors.LockoutError`, :class:`TPMUnavailable`.
    """
    if state.auth_value and auth is None:
        raise UsageError("this secret is sealed with a passphrase-derived authValue: give it")
    if auth is not None and not state.auth_value:
        auth = None  # sealed without PolicyAuthValue: nothing to prove
    try:
        return _unseal(state, tcti=tcti, auth=auth)
    except _Failed as failed:
        raise _diagnose(state, tcti, failed) from None


def _unseal(state: SealedState, *, tcti: str, auth: Secret | None) -> Secret:
    esys = _Esys(tcti)
    ffi, lib = esys.ffi, esys.lib
    ctx = esys.ctx
    srk = ffi.new("ESYS_TR *", ESYS_TR_NONE)
    obj = ffi.new("ESYS_TR *", ESYS_TR_NONE)
    sess = ffi.new("ESYS_TR *", ESYS_TR_NONE)
    session_open = False
    try:
        pub = ffi.new("TPM2B_PUBLIC *")
        priv = ffi.new("TPM2B_PRIVATE *")
        _unmarshal(ffi, lib.Tss2_MU_TPM2B_PUBLIC_Unmarshal, state.public, pub, "public area")
        _unmarshal(ffi, lib.Tss2_MU_TPM2B_PRIVATE_Unmarshal, state.private, priv, "private area")
        r = lib.Esys_TR_Deserialize(ctx, state.srk_esys_tr, len(state.srk_esys_tr), srk)
        if r != 0:
            raise CorruptState("the sealed state's SRK record is corrupted")

        esys.check(
            lib.Esys_Load(
                ctx, srk[0], ESYS_TR_PASSWORD, ESYS_TR_NONE, ESYS_TR_NONE, priv, pub, obj
            ),
            "TPM2_Load",
        )
        sym = ffi.new("TPMT_SYM_DEF *")
        sym.algorithm = TPM2_ALG_AES
        sym.keyBits.aes = 128
        sym.mode.aes = TPM2_ALG_CFB
        esys.check(
            lib.Esys_StartAuthSession(
                ctx, srk[0], ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE,
                ffi.NULL, TPM2_SE_POLICY, sym, TPM2_ALG_SHA256, sess,
            ),
            "TPM2_StartAuthSession",
        )  # fmt: skip
        session_open = True
        # encrypt: the TPM encrypts the unsealed data; continueSession clear: flushed after use.
        esys.check(
            lib.Esys_TRSess_SetAttributes(ctx, sess[0], SESSION_ENCRYPT, 0xFF),
            "Esys_TRSess_SetAttributes",
        )
        digest = ffi.new("TPM2B_DIGEST *")
        sel = ffi.new("TPML_PCR_SELECTION *")
        sel.count = 1
        sel.pcrSelections[0].hash = BANK_ALG[state.pcr_bank]
        sel.pcrSelections[0].sizeofSelect = PCR_SELECT_SIZE
        for i, b in enumerate(pcr_select_bitmap(state.pcrs)):
            sel.pcrSelections[0].pcrSelect[i] = b
        esys.check(
            lib.Esys_PolicyPCR(ctx, sess[0], ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, digest, sel),
            "TPM2_PolicyPCR",
        )
        _, branches = sealing_policy(
            [s.values for s in state.pcr_states], state.pcrs, bank=state.pcr_bank
        )
        if branches:
            hashes = ffi.new("TPML_DIGEST *")
            hashes.count = len(branches)
            for i, d in enumerate(branches):
                hashes.digests[i].size = len(d)
                ffi.memmove(hashes.digests[i].buffer, d, len(d))
            esys.check(
                lib.Esys_PolicyOR(ctx, sess[0], ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE, hashes),
                "TPM2_PolicyOR",
            )
        if auth is not None:
            esys.check(
                lib.Esys_PolicyAuthValue(ctx, sess[0], ESYS_TR_NONE, ESYS_TR_NONE, ESYS_TR_NONE),
                "TPM2_PolicyAuthValue",
            )
            value = auth.reveal()
            tpm_auth = ffi.new("TPM2B_AUTH *")
            tpm_auth.size = len(value)
            ffi.memmove(tpm_auth.buffer, value, len(value))
            r = lib.Esys_TR_SetAuth(ctx, obj[0], tpm_auth)
            ffi.memmove(tpm_auth.buffer, bytes(len(value)), len(value))
            esys.check(r, "Esys_TR_SetAuth")
        out = ffi.new("TPM2B_SENSITIVE_DATA **")
        esys.check(
            lib.Esys_Unseal(ctx, obj[0], sess[0], ESYS_TR_NONE, ESYS_TR_NONE, out), "TPM2_Unseal"
        )
        session_open = False  # continueSession was clear: the TPM flushed it, ESYS forgot it
        data = out[0]
        try:
            return Secret(ffi.buffer(data.buffer, data.size))
        finally:
            ffi.memmove(data.buffer, bytes(data.size), data.size)
            lib.Esys_Free(data)
    finally:
        if obj[0] != ESYS_TR_NONE:
            lib.Esys_FlushContext(ctx, obj[0])
        if session_open and sess[0] != ESYS_TR_NONE:
            lib.Esys_FlushContext(ctx, sess[0])
        if srk[0] != ESYS_TR_NONE:
            lib.Esys_TR_Close(ctx, srk)
        esys.close()


def _unmarshal(ffi: Any, func: Any, data: bytes, dest: Any, what: str) -> None:
    offset = ffi.new("size_t *", 0)
    if func(data, len(data), offset, dest) != 0 or offset[0] != len(data):
        raise CorruptState(f"the sealed state's {what} is corrupted")


def _diagnose(state: SealedState, tcti: str, failed: _Failed) -> QubesSealError:
    """Turn a refused command into the error a user needs, reading the TPM once more.

    Runs only on the failure path, so it may use the full tpm2-pytss API.
    """
    error = rc.to_error(failed.code, action=failed.action, tcti=tcti)
    if isinstance(error, TPMUnavailable):
        return error
    from .device import Tpm

    try:
        with Tpm(tcti) as tpm:
            if failed.action in ("TPM2_Load", "TPM2_StartAuthSession"):
                srk = tpm.find_srk()
                if srk is None or srk.name != state.srk_name:
                    return SRKMismatch(
                        "the TPM's storage root key is not the one the secret was sealed "
                        "under" + (" (no SRK at 0x81000001)" if srk is None else "")
                    )
                return error
            if not isinstance(error, MeasurementMismatch) and failed.action != "TPM2_PolicyOR":
                return error
            current = tpm.read_pcrs(set(state.pcrs) | {DRTM_PCR}, bank=state.pcr_bank)
    except QubesSealError:
        return error
    if state.require_launch and current[DRTM_PCR] == b"\xff" * len(current[DRTM_PCR]):
        return NoMeasuredLaunch()
    # Compare with the accepted state that differs least, so the diff names the culprit.
    best = min(
        state.pcr_states,
        key=lambda s: sum(current[p] != v for p, v in s.values.items()),
    )
    diffs = [
        (p, best.values[p].hex(), current[p].hex())
        for p in sorted(state.pcrs)
        if current[p] != best.values[p]
    ]
    if not diffs:  # the PCRs match now: they changed under the unseal, or the state lies
        return MeasurementMismatch("measurements do not match (PCRs changed during the unseal?)")
    names = ", ".join(str(p) for p, _, _ in diffs)
    verb = "differs" if len(diffs) == 1 else "differ"
    label = "PCR" if len(diffs) == 1 else "PCRs"
    return MeasurementMismatch(f"measurements do not match: {label} {names} {verb}", diffs=diffs)
