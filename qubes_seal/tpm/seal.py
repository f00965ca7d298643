"""Sealing the master secret to the boot's measurements."""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import CorruptState, NoMeasuredLaunch, UsageError
from ..policy import (
    approved_policy,
    authorization_digest,
    launch_happened,
    sealing_policy,
    signed_object_policy,
    validate_pcrs,
)
from ..secret import Secret
from ..state import NvBinding, PcrState, SealedState, SignedPolicy
from .device import Tpm
from .marshal import marshal_signature

if TYPE_CHECKING:
    from ..signer import PolicySigner

#: tboot with a TPM 2.0 uses the details/authorities mapping: PCR 17 (details) and 18
#: (authorities) hold SINIT's and tboot's measurements, Xen and dom0 included (TBOOT-TXT.md).
DEFAULT_PCRS = (17, 18)
DRTM_PCR = 17
MASTER_SECRET_SIZE = 32


def parse_pcr_list(text: str) -> list[int]:
    """``"17,18"`` -> ``[17, 18]``, with a usage error for anything else."""
    try:
        values = [int(x, 10) for x in text.split(",") if x.strip()]
        return validate_pcrs(values)
    except ValueError as exc:
        raise UsageError(
            f"invalid PCR list {text!r}: {exc}",
            hint="Give comma-separated PCR indices 0-23, e.g. --pcrs 17,18.",
        ) from exc


def seal_to_states(
    tpm: Tpm,
    secret: Secret,
    *,
    pcrs: Sequence[int],
    states: Sequence[PcrState],
    bank: str = "sha256",
    require_launch: bool = True,
    auth: Secret | None = None,
    nv: NvBinding | None = None,
    signer: PolicySigner | None = None,
) -> SealedState:
    """Seal ``secret`` so that any one of ``states`` (1 to 8 sets of PCR values) unseals it.

    With ``auth``, the unseal also needs that authValue (PolicyAuthValue last).  With ``nv``
    (a rollback counter), it also needs the counter at most its current value + 1
    (PolicyNV): the object works before and after the increment that follows its sealing,
    and no more after the next one.

    With ``signer`` (signed policies; ``nv`` required), the object's policy is
    PolicyAuthorize over the signer's key with a new random policyRef (then PolicyAuthValue),
    and each state is signed (:func:`sign_states`): later states need a signature only.
    """
    pcrs = validate_pcrs(pcrs)
    if not 1 <= len(states) <= 8:
        raise UsageError(f"{len(states)} accepted PCR states: between 1 and 8 are possible")
    if nv is not None:
        nv = NvBinding(nv.handle, nv.name, nv.esys_tr, bound=tpm.nv_read_counter(nv) + 1)
    signed: SignedPolicy | None = None
    if signer is not None:
        if nv is None:
            raise UsageError("signed policies need the rollback counter")
        from ..signer import POLICY_REF_SIZE  # not on the boot path

        ref = secrets.token_bytes(POLICY_REF_SIZE)
        signed = sign_states(signer, ref, pcrs=pcrs, states=states, bank=bank, nv=nv, tpm=tpm)
        digest = signed_object_policy(signer.name(), ref, with_auth=auth is not None)
    else:
        digest, _ = sealing_policy(
            [s.values for s in states],
            pcrs,
            bank=bank,
            with_auth=auth is not None,
            nv=None if nv is None else (nv.name, nv.bound),
        )
    srk = tpm.ensure_srk()
    public, private = tpm.seal(secret, srk=srk, policy_digest=digest, auth=auth)
    return SealedState(
        srk_handle=srk.handle,
        srk_name=srk.name,
        srk_esys_tr=srk.esys_tr,
        public=public,
        private=private,
        pcr_bank=bank,
        pcrs=pcrs,
        pcr_states=list(states),
        policy_digest=digest,
        require_launch=require_launch,
        auth_value=auth is not None,
        nv=nv,
        signed=signed,
    )


def sign_states(
    signer: PolicySigner,
    policy_ref: bytes,
    *,
    pcrs: Sequence[int],
    states: Sequence[PcrState],
    bank: str,
    nv: NvBinding,
    tpm: Tpm | None = None,
) -> SignedPolicy:
    """The signer's approval of each state: ECDSA over ``H(approvedPolicy || policyRef)``,
    the approved policy being PolicyPCR of the state then PolicyNV (counter <= ``nv.bound``).

    With ``tpm`` (the machine's own TPM), also the TPM's verification ticket of each
    signature (:func:`verification_tickets`), which lets the boot skip TPM2_VerifySignature.
    """
    digests = [
        authorization_digest(
            approved_policy(s.values, pcrs, bank=bank, nv=(nv.name, nv.bound)), policy_ref
        )
        for s in states
    ]
    signatures = tuple(signer.sign(d) for d in digests)
    tickets = () if tpm is None else verification_tickets(tpm, signer.public(), digests, signatures)
    return SignedPolicy(signer.public(), signer.name(), policy_ref, signatures, tickets)


def verification_tickets(
    tpm: Tpm, public: bytes, digests: Sequence[bytes], signatures: Sequence[bytes]
) -> tuple[bytes, ...]:
    """The TPM's TPMT_TK_VERIFIED for each signature over its digest (marshalled).

    TPM2_LoadExternal of the public key in the owner hierarchy, one TPM2_VerifySignature per
    signature, TPM2_FlushContext.  The ticket is ``HMAC(ownerProof, TPM_ST_VERIFIED || digest
    || keyName)``: ownerProof never leaves the TPM and changes only with TPM2_Clear, so the
    ticket stays valid across reboots and nobody else can make one.
    """
    from tpm2_pytss import ESYS_TR, TPM2B_PUBLIC, TPMT_SIGNATURE  # dom0 only

    with tpm._tss("TPM2_LoadExternal of the policy-signing key"):
        key = tpm.esys.load_external(TPM2B_PUBLIC.unmarshal(public)[0], None, ESYS_TR.OWNER)
    done = False
    try:
        tickets = []
        for digest, signature in zip(digests, signatures, strict=True):
            sig = TPMT_SIGNATURE.unmarshal(marshal_signature(signature))[0]
            with tpm._tss("TPM2_VerifySignature of a boot-state signature"):
                got = tpm.esys.verify_signature(key, digest, sig)
            tickets.append(bytes(got.marshal()))  # TPMT_TK_VERIFIED, wire form
        done = True
        return tuple(tickets)
    finally:
        if done:
            with tpm._tss("TPM2_FlushContext of the policy-signing key"):
                tpm.esys.flush_context(key)
        else:  # the error that got here is the one to report (a TPM gone mid-command, say)
            with contextlib.suppress(Exception):
                tpm.esys.flush_context(key)


def resign(
    tpm: Tpm,
    state: SealedState,
    signer: PolicySigner,
    states: Sequence[PcrState],
    *,
    pcrs: Sequence[int] | None = None,
) -> SealedState:
    """The same sealed object, accepting ``states`` instead: new signatures, bound to the
    counter's next value (so the increment that follows voids every older signature).
    ``pcrs``: the selection the states cover (dom0's launch policy; default: unchanged).

    No secret and no new object: this is how an update is approved under signed policies.
    """
    if state.signed is None or state.nv is None:
        raise UsageError("this sealed object does not use signed policies: reseal it")
    if signer.name() != state.signed.name:
        raise CorruptState(
            "the keystore's policy-signing key is not the one this sealed object trusts",
            hint="Reseal with 'qubes-seal recover --reseal' (recovery key) to trust it again.",
        )
    if not 1 <= len(states) <= 8:
        raise UsageError(f"{len(states)} accepted PCR states: between 1 and 8 are possible")
    selection = validate_pcrs(state.pcrs if pcrs is None else pcrs)
    for s in states:
        if sorted(s.values) != selection:
            raise UsageError(f"the boot state {s.label!r} does not cover PCR {selection}")
    nv = dataclasses.replace(state.nv, bound=tpm.nv_read_counter(state.nv) + 1)
    signed = sign_states(
        signer, state.signed.policy_ref, pcrs=selection, states=states, bank=state.pcr_bank,
        nv=nv, tpm=tpm,
    )  # fmt: skip
    return dataclasses.replace(state, pcrs=selection, pcr_states=list(states), nv=nv, signed=signed)


def current_state(
    tpm: Tpm, pcrs: Sequence[int], *, bank: str = "sha256", require_launch: bool = True
) -> PcrState:
    """The current values of ``pcrs``; fails closed when no measured launch happened."""
    current = tpm.read_pcrs(set(pcrs) | {DRTM_PCR}, bank=bank)
    if require_launch and not launch_happened(current[DRTM_PCR]):
        raise NoMeasuredLaunch(
            "refusing to seal: no TXT measured launch happened in this boot (PCR 17 is all 0xFF)"
        )
    return PcrState("current", {p: current[p] for p in pcrs})


def seal_new_secret(
    tpm: Tpm,
    *,
    pcrs: Sequence[int] = DEFAULT_PCRS,
    bank: str = "sha256",
    extra_states: Sequence[PcrState] = (),
    require_launch: bool = True,
) -> tuple[SealedState, Secret]:
    """Create a random master secret and seal it to the current values of ``pcrs``.

    ``extra_states`` adds accepted states (a predicted next boot): the policy becomes a
    PolicyOR of them all.  Refuses (fail closed) when PCR 17 shows no measured launch, unless
    ``require_launch`` is False (an explicitly unsafe test setting).
    """
    pcrs = validate_pcrs(pcrs)
    states = [current_state(tpm, pcrs, bank=bank, require_launch=require_launch), *extra_states]
    secret = Secret.random(MASTER_SECRET_SIZE)
    state = seal_to_states(
        tpm, secret, pcrs=pcrs, states=states, bank=bank, require_launch=require_launch
    )
    return state, secret


def reseal(
    state: SealedState,
    *,
    tcti: str,
    extra_states: Sequence[PcrState] = (),
    auth: Secret | None = None,
    fixed: dict[int, bytes] | None = None,
) -> SealedState:
    """Seal the same master secret again: to this boot, plus ``extra_states`` (predicted).

    No trust on first use: the TPM must first release the secret in this boot, so only an
    already-accepted boot can approve the next one.  Without ``extra_states`` this drops every
    other accepted state (after the first good boot on updated components).  ``auth`` is the
    object's authValue when the state needs one; ``fixed`` gives PCR values that are not read
    but predicted (PCR 13: its value at unlock time, not now).
    """
    from .unseal import unseal

    with unseal(state, tcti=tcti, auth=auth) as secret, Tpm(tcti) as tpm:
        now = current_state(
            tpm,
            [p for p in state.pcrs if p not in (fixed or {})],
            bank=state.pcr_bank,
            require_launch=state.require_launch,
        )
        now = PcrState(now.label, {**now.values, **(fixed or {})})
        extra = [s for s in extra_states if s.values != now.values]
        return seal_to_states(
            tpm,
            secret,
            pcrs=state.pcrs,
            states=[now, *extra],
            bank=state.pcr_bank,
            require_launch=state.require_launch,
            auth=auth,
            nv=state.nv,
        )
