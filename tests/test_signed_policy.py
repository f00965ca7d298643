"""Signed policies on a real TPM: PolicyAuthorize over the dom0 policy-signing key.

The sealed object is created once; boot states are approved by signatures only.  Each test
checks the offline digests against what the TPM computes, then the whole unseal, then each
way it must fail: an unsigned state, a forged or mixed-up signature, a signature voided by
the rollback counter, another signing key.
"""

from __future__ import annotations

import dataclasses
import hashlib

import pytest

from qubes_seal.errors import CorruptState, MeasurementMismatch, RevokedState
from qubes_seal.policy import (
    approved_policy,
    authorization_digest,
    policy_auth_value,
    policy_authorize,
    signed_object_policy,
)
from qubes_seal.secret import Secret
from qubes_seal.signer import PolicySigner
from qubes_seal.sim.proxy import CountingProxy
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.state import PcrState, SealedState
from qubes_seal.tpm import esys as _esys
from qubes_seal.tpm.device import Tpm
from qubes_seal.tpm.esys import Esys
from qubes_seal.tpm.marshal import marshal_signature, name_from_public
from qubes_seal.tpm.seal import resign, seal_to_states
from qubes_seal.tpm.unseal import unseal

PCRS = [16, 23]  # resettable, extendable from locality 0: no launch needed
AUTH = b"a" * 32


def _values(tpm: Tpm) -> dict[int, bytes]:
    return tpm.read_pcrs(PCRS)


def _seal(swtpm: Swtpm, signer: PolicySigner, secret: bytes = b"s" * 32) -> SealedState:
    with Tpm(swtpm.tcti) as tpm:
        nv = tpm.nv_define_counter()
        now = PcrState("current", _values(tpm))
        return seal_to_states(
            tpm, Secret(secret), pcrs=PCRS, states=[now], require_launch=False,
            auth=Secret(AUTH), nv=nv, signer=signer,
        )  # fmt: skip


def _settle(swtpm: Swtpm, state: SealedState) -> None:
    assert state.nv is not None
    with Tpm(swtpm.tcti) as tpm:
        while tpm.nv_read_counter(state.nv) < state.nv.bound:
            tpm.nv_increment(state.nv)


def test_the_tpm_names_the_key_as_we_do(swtpm: Swtpm) -> None:
    with PolicySigner.generate() as signer, Esys(swtpm.tcti) as tpm:
        key = tpm.load_external(_esys.unmarshal_public(signer.public()))
        try:
            assert tpm.tr_name(key) == signer.name() == name_from_public(signer.public())
            digest = hashlib.sha256(b"approved").digest()
            sig = _esys.unmarshal_signature(marshal_signature(signer.sign(digest)))
            ticket = tpm.verify_signature(key, digest, sig)
            assert ticket.hierarchy == 0x40000001  # TPM_RH_OWNER: not a NULL ticket
        finally:
            tpm.flush_context(key)


def test_object_policy_matches_the_tpm(swtpm: Swtpm) -> None:
    """The object's authPolicy (computed offline) is what a real policy session reaches."""
    with PolicySigner.generate() as signer:
        state = _seal(swtpm, signer)
        assert state.signed is not None
        expected = signed_object_policy(signer.name(), state.signed.policy_ref, with_auth=True)
        assert state.policy_digest == expected
        assert expected == policy_auth_value(
            policy_authorize(signer.name(), state.signed.policy_ref)
        )
        _settle(swtpm, state)
        with unseal(state, tcti=swtpm.tcti, auth=Secret(AUTH)) as got:
            assert got.reveal() == b"s" * 32


def test_signed_unseal_commands_and_no_leak(swtpm: Swtpm, swtpm_proxy: CountingProxy) -> None:
    with PolicySigner.generate() as signer:
        state = _seal(swtpm, signer)
        _settle(swtpm, state)
        swtpm_proxy.reset()
        with unseal(state, tcti=swtpm_proxy.tcti, auth=Secret(AUTH)):
            pass
    # libtpms answers TPM_RC_RETRY to the first DA-protected authorization after its start:
    # that one Unseal is resubmitted (see test_auth.py).
    names = [c for i, c in enumerate(swtpm_proxy.commands) if i == 0 or c != "Unseal" or
             swtpm_proxy.commands[i - 1] != "Unseal"]  # fmt: skip
    assert names == [
        "PCR_Read", "LoadExternal", "VerifySignature", "FlushContext", "Load",
        "StartAuthSession", "PolicyPCR", "PolicyNV", "PolicyAuthorize", "PolicyAuthValue",
        "Unseal", "FlushContext",
    ], names  # fmt: skip


def test_a_new_state_needs_a_signature_not_a_new_object(swtpm: Swtpm) -> None:
    with PolicySigner.generate() as signer:
        state = _seal(swtpm, signer)
        _settle(swtpm, state)
        with Tpm(swtpm.tcti) as tpm:
            tpm.extend_pcr(23, hashlib.sha256(b"update").digest())
            new = PcrState("predicted", _values(tpm))
        # The unsigned new state is refused with the diff ...
        with pytest.raises(MeasurementMismatch, match="PCR 23 differs"):
            unseal(state, tcti=swtpm.tcti, auth=Secret(AUTH))
        # ... a signature approves it, on the same object.
        with Tpm(swtpm.tcti) as tpm:
            approved = resign(tpm, state, signer, [state.pcr_states[0], new])
        assert (approved.public, approved.private) == (state.public, state.private)
        _settle(swtpm, approved)
        with unseal(approved, tcti=swtpm.tcti, auth=Secret(AUTH)) as got:
            assert got.reveal() == b"s" * 32
        # The increment voided the old signatures: the old state list is refused.
        with Tpm(swtpm.tcti) as tpm:
            tpm.extend_pcr(16, hashlib.sha256(b"x").digest())
        # (PCR 16 now differs for every state: the refusal names it, not a revocation.)
        with pytest.raises(MeasurementMismatch):
            unseal(approved, tcti=swtpm.tcti, auth=Secret(AUTH))


def test_old_signatures_are_revoked_by_the_counter(swtpm: Swtpm) -> None:
    with PolicySigner.generate() as signer:
        state = _seal(swtpm, signer)
        _settle(swtpm, state)
        with Tpm(swtpm.tcti) as tpm:
            newer = resign(tpm, state, signer, state.pcr_states)
        _settle(swtpm, newer)
        with pytest.raises(RevokedState):
            unseal(state, tcti=swtpm.tcti, auth=Secret(AUTH))
        with unseal(newer, tcti=swtpm.tcti, auth=Secret(AUTH)):
            pass


def test_forged_and_foreign_signatures_are_refused(swtpm: Swtpm) -> None:
    with PolicySigner.generate() as signer, PolicySigner.generate() as other:
        state = _seal(swtpm, signer)
        _settle(swtpm, state)
        assert state.signed is not None and state.nv is not None
        # A flipped bit in the signature: VerifySignature refuses.
        sig = bytearray(state.signed.signatures[0])
        sig[5] ^= 1
        forged = dataclasses.replace(
            state, signed=dataclasses.replace(state.signed, signatures=(bytes(sig),))
        )
        with pytest.raises(CorruptState, match="does not verify"):
            unseal(forged, tcti=swtpm.tcti, auth=Secret(AUTH))
        # Another key signing the same state: the object trusts only its own key.
        approved = approved_policy(
            state.pcr_states[0].values, PCRS, nv=(state.nv.name, state.nv.bound)
        )
        foreign_sig = other.sign(authorization_digest(approved, state.signed.policy_ref))
        foreign = dataclasses.replace(
            state,
            signed=dataclasses.replace(
                state.signed, public=other.public(), name=other.name(), signatures=(foreign_sig,)
            ),
        )
        with pytest.raises(CorruptState, match="does not accept"):
            unseal(foreign, tcti=swtpm.tcti, auth=Secret(AUTH))
        # resign() with another key is refused before anything is signed.
        with Tpm(swtpm.tcti) as tpm, pytest.raises(CorruptState, match="signing key"):
            resign(tpm, state, other, state.pcr_states)


def test_signatures_of_another_object_generation_do_not_apply(swtpm: Swtpm) -> None:
    """Each sealed object has its own policyRef: a newer object's signatures (a rotation)
    do not authorise an older object (its old master secret, its old passphrase)."""
    with PolicySigner.generate() as signer:
        old = _seal(swtpm, signer, b"o" * 32)
        with Tpm(swtpm.tcti) as tpm:
            assert old.nv is not None
            new = seal_to_states(
                tpm, Secret(b"n" * 32), pcrs=PCRS, states=old.pcr_states, require_launch=False,
                auth=Secret(AUTH), nv=old.nv, signer=signer,
            )  # fmt: skip
        _settle(swtpm, new)
        assert new.signed is not None and old.signed is not None
        assert new.signed.policy_ref != old.signed.policy_ref
        mixed = dataclasses.replace(
            old, nv=new.nv, pcr_states=new.pcr_states, signed=new.signed
        )  # the old object with the new signatures
        with pytest.raises(CorruptState):
            unseal(mixed, tcti=swtpm.tcti, auth=Secret(AUTH))
        with unseal(new, tcti=swtpm.tcti, auth=Secret(AUTH)) as got:
            assert got.reveal() == b"n" * 32


def test_state_file_round_trip_keeps_the_signatures(swtpm: Swtpm) -> None:
    with PolicySigner.generate() as signer:
        state = _seal(swtpm, signer)
    again = SealedState.from_json(state.to_json())
    assert again.signed == state.signed
    doc = state.to_dict()
    doc["signed"]["signer_name"] = "000b" + "00" * 32
    with pytest.raises(CorruptState, match="malformed"):
        SealedState.from_dict(doc)
    doc = state.to_dict()
    doc["signed"]["signatures"] = []
    with pytest.raises(CorruptState, match="one signature per"):
        SealedState.from_dict(doc)
