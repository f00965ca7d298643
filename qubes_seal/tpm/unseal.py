"""The boot-time unseal: five TPM commands, nothing in clear on the bus, every handle flushed.

Sequence (TPM 2.0 Part 3 command names)::

    TPM2_Load            the sealed object under the SRK (SRK auth: empty password)
    TPM2_StartAuthSession  policy session salted with the pinned SRK, AES-128-CFB
    TPM2_PolicyPCR       the sealed PCR selection, current values
    [TPM2_PolicyOR]      when several PCR states are accepted (current + predicted boot)
    [TPM2_PolicyNV]      rollback counter <= the object's bound, when the state has one (the
                         container flows): an object older than the last reseal is refused
    [TPM2_PolicyAuthValue] when the object's authValue comes from the passphrase
    TPM2_Unseal          response parameter encrypted (session attribute ``encrypt``);
                         ``continueSession`` clear, so the TPM flushes the session itself
    TPM2_FlushContext    the sealed object

Under signed policies (``state.signed``; the container's tokens) the PCR values are not in
the object's policy but in signed approvals, and the sequence becomes (9 commands)::

    TPM2_PCR_Read        which accepted state is this boot? (none: refused, with the diff)
    TPM2_Load, TPM2_StartAuthSession, TPM2_PolicyPCR, TPM2_PolicyNV (as above)
    TPM2_PolicyAuthorize the session's digest is the approved one, signed by the key: the
                         ticket stored with the state (TPMT_TK_VERIFIED, made by this TPM's
                         TPM2_VerifySignature when dom0 signed the state)
    TPM2_PolicyAuthValue, TPM2_Unseal, TPM2_FlushContext (as above)

The ticket is ``HMAC(ownerProof, TPM_ST_VERIFIED || H(approvedPolicy || policyRef) ||
keyName)``; PolicyAuthorize recomputes it, and ownerProof never leaves the TPM (it changes
with TPM2_Clear only).  The token is untrusted before the unlock, so the ticket proves nothing
until the TPM accepts it.  A token without a ticket, or a ticket the TPM refuses (forged,
corrupted, from before a TPM2_Clear), costs the signature check (12 commands; after a refusal
the session is flushed and a new one started)::

    TPM2_LoadExternal    the dom0 policy-signing public key (owner hierarchy)
    TPM2_VerifySignature that state's signature -> a validation ticket
    TPM2_FlushContext    the public key

The SRK is not read from the TPM: its public area travels in the sealed state as a serialized
ESYS_TR, recorded at sealing time (the pin).  A different key at 0x81000001 cannot decrypt the
salt nor load the object, so the unseal fails closed; the diagnosis then compares names.

This module runs in the initramfs: it calls Debian's libtss2 through ctypes
(:mod:`qubes_seal.tpm.esys`) and never imports tpm2-pytss, the diagnosis included.
"""

from __future__ import annotations

from ..errors import (
    CorruptState,
    MeasurementMismatch,
    NoMeasuredLaunch,
    QubesSealError,
    RevokedState,
    SRKMismatch,
    TPMUnavailable,
    UsageError,
)
from ..policy import (
    approved_policy,
    authorization_digest,
    counter_bound,
    sealing_policy,
    signed_object_policy,
)
from ..secret import Secret
from ..state import PcrState, SealedState
from . import esys as _esys
from . import marshal, rc
from .esys import ESYS_TR_NONE, TPM2_SE_POLICY, TPMA_SESSION_ENCRYPT, Esys, TssError

DRTM_PCR = 17


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
    except TssError as failed:
        raise _diagnose(state, tcti, failed) from None
    except _NoAcceptedState as refused:
        raise _mismatch(state, refused.current) from None


class _NoAcceptedState(Exception):
    """Signed policies: the current PCRs match no signed state (diagnosed by the caller)."""

    def __init__(self, current: dict[int, bytes]) -> None:
        super().__init__("no accepted state")
        self.current = current


class _Approval:
    """Signed policies: this boot's accepted state (its index), its approved policy, and the
    ticket stored with it when dom0 signed it (None: absent or malformed)."""

    def __init__(self, index: int, approved: bytes, stored: _esys.TPMT_TK_VERIFIED | None):
        self.index = index
        self.approved = approved
        self.stored = stored


def _approve(tpm: Esys, state: SealedState) -> _Approval:
    """Signed policies: which accepted state is this boot (TPM2_PCR_Read), its approved
    policy, and its stored verification ticket if the token has one."""
    signed = state.signed
    if signed is None or state.nv is None:  # hostile input, never an assert
        raise CorruptState(
            "the token's signed policy has no rollback counter: the token was altered",
            hint="Unlock with the recovery key ('qubes-seal recover --reseal') to seal again.",
        )
    expected = signed_object_policy(signed.name, signed.policy_ref, with_auth=state.auth_value)
    if marshal.auth_policy(state.public) != expected:
        raise CorruptState(
            "the sealed object does not accept this signing key and policy reference: the "
            "token was altered or mixed with another one",
            hint="Unlock with the recovery key ('qubes-seal recover --reseal') to seal again.",
        )
    wanted = set(state.pcrs) | ({DRTM_PCR} if state.require_launch else set())
    current = tpm.pcr_read(wanted, state.pcr_bank)
    index = next(
        (
            i
            for i, s in enumerate(state.pcr_states)
            if all(current[p] == v for p, v in s.values.items())
        ),
        None,
    )
    if index is None:
        raise _NoAcceptedState(current)
    approved = approved_policy(
        state.pcr_states[index].values,
        state.pcrs,
        bank=state.pcr_bank,
        nv=(state.nv.name, state.nv.bound),
    )
    stored = None
    if index < len(signed.tickets):
        try:  # untrusted: PolicyAuthorize checks its HMAC; malformed means "no ticket"
            stored = _esys.unmarshal_ticket(signed.tickets[index])
        except ValueError:
            stored = None
    return _Approval(index, approved, stored)


def _verify(tpm: Esys, state: SealedState, approval: _Approval) -> _esys.TPMT_TK_VERIFIED:
    """The TPM's ticket for this state's signature: TPM2_LoadExternal of the public key,
    TPM2_VerifySignature, TPM2_FlushContext."""
    signed = state.signed
    if signed is None:  # _approve checked it; hostile input is never an assert
        raise CorruptState("the token's signed policy is missing")
    try:
        public = _esys.unmarshal_public(signed.public)
        signature = _esys.unmarshal_signature(
            marshal.marshal_signature(signed.signatures[approval.index])
        )
    except ValueError:
        raise CorruptState("the sealed state's signing key or signature is corrupted") from None
    key = tpm.load_external(public)
    try:
        return tpm.verify_signature(
            key, authorization_digest(approval.approved, signed.policy_ref), signature
        )
    finally:
        tpm.flush_context(key)


def _unseal(state: SealedState, *, tcti: str, auth: Secret | None) -> Secret:
    with Esys(tcti) as tpm:
        approval = _approve(tpm, state) if state.signed is not None else None
        # The stored ticket when there is one (no LoadExternal, VerifySignature, FlushContext);
        # otherwise the signature is verified now.
        ticket = None
        if approval is not None:
            ticket = (
                approval.stored if approval.stored is not None else _verify(tpm, state, approval)
            )
        try:
            pub = _esys.unmarshal_public(state.public)
        except ValueError:
            raise CorruptState("the sealed state's public area is corrupted") from None
        try:
            priv = _esys.unmarshal_private(state.private)
        except ValueError:
            raise CorruptState("the sealed state's private area is corrupted") from None
        srk = obj = sess = nv = ESYS_TR_NONE
        session_open = False

        def policy(ticket: _esys.TPMT_TK_VERIFIED | None) -> None:
            """A new policy session through PolicyPCR, PolicyOR or PolicyAuthorize, PolicyNV."""
            nonlocal sess, session_open
            sess = tpm.start_auth_session(srk, TPM2_SE_POLICY)
            session_open = True
            # encrypt: the TPM encrypts the unsealed data; continueSession clear: flushed after
            # use.
            tpm.trsess_set_attributes(sess, TPMA_SESSION_ENCRYPT, 0xFF)
            tpm.policy_pcr(sess, _esys.pcr_selection(state.pcrs, state.pcr_bank))
            if approval is None:
                _, branches = sealing_policy(
                    [s.values for s in state.pcr_states], state.pcrs, bank=state.pcr_bank
                )
                if branches:
                    tpm.policy_or(sess, list(branches))
            if state.nv is not None:
                tpm.policy_nv(sess, nv, counter_bound(state.nv.bound))
            if approval is not None and state.signed is not None and ticket is not None:
                tpm.policy_authorize(
                    sess, approval.approved, state.signed.policy_ref, state.signed.name,
                    ticket,
                )  # fmt: skip

        try:
            try:
                srk = tpm.tr_deserialize(state.srk_esys_tr)
            except TssError:
                raise CorruptState("the sealed state's SRK record is corrupted") from None
            if state.nv is not None:
                try:
                    nv = tpm.tr_deserialize(state.nv.esys_tr)
                except TssError:
                    raise CorruptState("the sealed state's NV counter is corrupted") from None
            obj = tpm.load(srk, priv, pub)
            try:
                policy(ticket)
            except TssError as refused:
                if (
                    approval is None
                    or ticket is not approval.stored
                    or refused.action != "TPM2_PolicyAuthorize"
                ):
                    raise
                # The stored ticket is refused (forged, corrupted, from before a TPM2_Clear):
                # it proves nothing, so verify the signature and start over in a new session.
                tpm.flush_context(sess)
                session_open = False
                policy(_verify(tpm, state, approval))
            if auth is not None:
                tpm.policy_auth_value(sess)
                tpm.tr_set_auth(obj, auth.reveal())
            secret = tpm.unseal(obj, sess)
            session_open = False  # continueSession was clear: the TPM flushed it, ESYS forgot it
            return secret
        finally:
            if obj != ESYS_TR_NONE:
                tpm.flush_context(obj)
            if session_open and sess != ESYS_TR_NONE:
                tpm.flush_context(sess)
            if srk != ESYS_TR_NONE:
                tpm.tr_close(srk)
            if nv != ESYS_TR_NONE:
                tpm.tr_close(nv)


def _diagnose(state: SealedState, tcti: str, failed: TssError) -> QubesSealError:
    """Turn a refused command into the error a user needs, reading the TPM once more."""
    error = rc.to_error(failed.code, action=failed.action, tcti=tcti)
    if isinstance(error, TPMUnavailable):
        return error
    if failed.action in ("TPM2_LoadExternal", "TPM2_VerifySignature", "TPM2_PolicyAuthorize"):
        what = {
            "TPM2_LoadExternal": "the TPM refused the policy-signing key",
            "TPM2_VerifySignature": "the signature of this boot's state does not verify",
            "TPM2_PolicyAuthorize": "the sealed object does not accept this signed state",
        }[failed.action]
        return CorruptState(
            f"{what} ({rc.describe(failed.code)}): the token was altered or mixed with another one",
            hint="Unlock with the recovery key ('qubes-seal recover --reseal') to seal again.",
        )
    if failed.action == "TPM2_PolicyNV":
        # TPM_RC_POLICY: the comparison failed, the counter is past the bound.
        return RevokedState() if rc.base(failed.code) == rc.TPM_RC_POLICY else error
    try:
        with Esys(tcti) as tpm:
            if failed.action in ("TPM2_Load", "TPM2_StartAuthSession"):
                name = tpm.srk_name()
                if name is None or name != state.srk_name:
                    return SRKMismatch(
                        "the TPM's storage root key is not the one the secret was sealed "
                        "under" + (" (no SRK at 0x81000001)" if name is None else "")
                    )
                return error
            if not isinstance(error, MeasurementMismatch) and failed.action != "TPM2_PolicyOR":
                return error
            current = tpm.pcr_read(set(state.pcrs) | {DRTM_PCR}, state.pcr_bank)
    except QubesSealError:
        return error
    return _mismatch(state, current)


def _mismatch(state: SealedState, current: dict[int, bytes]) -> MeasurementMismatch:
    """The refusal for PCRs that match no accepted state: no launch, or the differing PCRs
    (this boot's values kept in :attr:`MeasurementMismatch.current` for the explanation)."""
    error = _mismatch_error(state, current)
    error.current = dict(current)
    return error


def _mismatch_error(state: SealedState, current: dict[int, bytes]) -> MeasurementMismatch:
    if state.require_launch and current[DRTM_PCR] == b"\xff" * len(current[DRTM_PCR]):
        return NoMeasuredLaunch()
    # Compare with the accepted state that differs least, so the diff names the culprit.
    best: PcrState = min(
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
