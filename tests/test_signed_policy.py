"""Signed policies on a real TPM: PolicyAuthorize over the dom0 policy-signing key.

The sealed object is created once; boot states are approved by signatures only.  Each test
checks the offline digests against what the TPM computes, then the whole unseal, then each
way it must fail: an unsigned state, a forged or mixed-up signature, a signature voided by
the rollback counter, another signing key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from pathlib import Path

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
from qubes_seal.tpm.seal import resign, seal_to_states, verification_tickets
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


#: The boot with the ticket stored in the token: no LoadExternal, VerifySignature, FlushContext.
TICKET_PATH = [
    "PCR_Read", "Load", "StartAuthSession", "PolicyPCR", "PolicyNV", "PolicyAuthorize",
    "PolicyAuthValue", "Unseal", "FlushContext",
]  # fmt: skip
#: A token without a ticket (older tokens, a malformed ticket): the signature is verified.
SIGNATURE_PATH = [
    "PCR_Read", "LoadExternal", "VerifySignature", "FlushContext", "Load",
    "StartAuthSession", "PolicyPCR", "PolicyNV", "PolicyAuthorize", "PolicyAuthValue",
    "Unseal", "FlushContext",
]  # fmt: skip
#: A ticket the TPM refuses: that session is flushed, the signature verified, a new session.
FALLBACK_PATH = [
    "PCR_Read", "Load", "StartAuthSession", "PolicyPCR", "PolicyNV", "PolicyAuthorize",
    "FlushContext", "LoadExternal", "VerifySignature", "FlushContext",
    "StartAuthSession", "PolicyPCR", "PolicyNV", "PolicyAuthorize", "PolicyAuthValue",
    "Unseal", "FlushContext",
]  # fmt: skip


def _commands(proxy: CountingProxy) -> list[str]:
    # libtpms answers TPM_RC_RETRY to the first DA-protected authorization after its start:
    # that one Unseal is resubmitted (see test_auth.py).
    c = proxy.commands
    return [x for i, x in enumerate(c) if i == 0 or x != "Unseal" or c[i - 1] != "Unseal"]


def _with_tickets(state: SealedState, tickets: tuple[bytes, ...]) -> SealedState:
    assert state.signed is not None
    return dataclasses.replace(state, signed=dataclasses.replace(state.signed, tickets=tickets))


def _unseal_counted(state: SealedState, proxy: CountingProxy) -> list[str]:
    proxy.reset()
    with unseal(state, tcti=proxy.tcti, auth=Secret(AUTH)) as got:
        assert got.reveal() == b"s" * 32
    return _commands(proxy)


def test_signed_unseal_commands_and_no_leak(swtpm: Swtpm, swtpm_proxy: CountingProxy) -> None:
    """With the ticket stored when dom0 signed: 9 commands, counted on the wire."""
    with PolicySigner.generate() as signer:
        state = _seal(swtpm, signer)
        _settle(swtpm, state)
        assert state.signed is not None and len(state.signed.tickets) == 1
        assert _unseal_counted(state, swtpm_proxy) == TICKET_PATH
        # An older token, without tickets: the signature is verified at boot.
        assert _unseal_counted(_with_tickets(state, ()), swtpm_proxy) == SIGNATURE_PATH


def test_the_ticket_survives_a_reboot(swtpm: Swtpm) -> None:
    """libtpms: an owner-hierarchy TPMT_TK_VERIFIED is an HMAC under ownerProof, which is in
    NV: a ticket from before the reboot is accepted by PolicyAuthorize after it."""
    with PolicySigner.generate() as signer:
        state = _seal(swtpm, signer)
        _settle(swtpm, state)
        swtpm.reboot()  # PCR 16 and 23 come back to the values they were sealed to (zeros)
        with CountingProxy(swtpm.port) as proxy:
            assert _unseal_counted(state, proxy) == TICKET_PATH
        swtpm.reboot(orderly=False)  # a power cut: the same
        with CountingProxy(swtpm.port) as proxy:
            assert _unseal_counted(state, proxy) == TICKET_PATH


def test_a_refused_ticket_falls_back_to_the_signature(
    swtpm: Swtpm, swtpm_proxy: CountingProxy, tmp_path: Path
) -> None:
    with PolicySigner.generate() as signer:
        state = _seal(swtpm, signer)
        _settle(swtpm, state)
        assert state.signed is not None and state.nv is not None
        ticket = state.signed.tickets[0]
        # A flipped bit in the HMAC: PolicyAuthorize refuses it, the signature still verifies.
        corrupted = ticket[:-1] + bytes([ticket[-1] ^ 1])
        assert _unseal_counted(_with_tickets(state, (corrupted,)), swtpm_proxy) == FALLBACK_PATH
        # A ticket of another TPM (another ownerProof: what a TPM2_Clear leaves behind).
        approved = approved_policy(
            state.pcr_states[0].values, PCRS, nv=(state.nv.name, state.nv.bound)
        )
        digest = authorization_digest(approved, state.signed.policy_ref)
        with Swtpm(tmp_path / "other") as other, Tpm(other.tcti) as tpm:
            (foreign,) = verification_tickets(
                tpm, signer.public(), [digest], state.signed.signatures
            )
        assert foreign != ticket and foreign[:8] == ticket[:8]
        assert _unseal_counted(_with_tickets(state, (foreign,)), swtpm_proxy) == FALLBACK_PATH
        # A genuine ticket of this TPM, but for another digest (another state's approval).
        with Tpm(swtpm.tcti) as tpm:
            other_digest = hashlib.sha256(b"another approval").digest()
            (misplaced,) = verification_tickets(
                tpm, signer.public(), [other_digest], [signer.sign(other_digest)]
            )
        assert _unseal_counted(_with_tickets(state, (misplaced,)), swtpm_proxy) == FALLBACK_PATH
        # Malformed, or not an owner ticket (a NULL ticket, which proves nothing): not even
        # sent to the TPM; the signature is verified.
        null = struct.pack(">HIH", 0x8022, 0x40000007, 0)
        for bad in (b"", ticket[:7], ticket + b"\0", b"\0" * 100, null):
            assert _unseal_counted(_with_tickets(state, (bad,)), swtpm_proxy) == SIGNATURE_PATH


def test_a_forged_ticket_with_a_forged_signature_unseals_nothing(
    swtpm: Swtpm, swtpm_proxy: CountingProxy
) -> None:
    """The evil maid writes the whole token: a new PCR state, a made-up signature and a
    made-up ticket for it.  PolicyAuthorize refuses the ticket, VerifySignature the
    signature: the refusal is the same as without the ticket."""
    with PolicySigner.generate() as signer, PolicySigner.generate() as maid:
        state = _seal(swtpm, signer)
        _settle(swtpm, state)
        assert state.signed is not None and state.nv is not None
        with Tpm(swtpm.tcti) as tpm:
            tpm.extend_pcr(23, hashlib.sha256(b"evil").digest())
            evil = PcrState("evil", _values(tpm))
            approved = approved_policy(evil.values, PCRS, nv=(state.nv.name, state.nv.bound))
            digest = authorization_digest(approved, state.signed.policy_ref)
            # A genuine ticket of this TPM for the digest, but under the maid's key: the
            # ticket binds the key's name, and the object names the dom0 key.
            (maids,) = verification_tickets(tpm, maid.public(), [digest], [maid.sign(digest)])
        for forged_ticket in (
            struct.pack(">HIH", 0x8022, 0x40000001, 32) + hashlib.sha256(digest).digest(),
            maids,
        ):
            forged = dataclasses.replace(
                state,
                pcr_states=[evil],
                signed=dataclasses.replace(
                    state.signed, signatures=(maid.sign(digest),), tickets=(forged_ticket,)
                ),
            )
            swtpm_proxy.reset()
            with pytest.raises(CorruptState, match="does not verify"):
                unseal(forged, tcti=swtpm_proxy.tcti, auth=Secret(AUTH))
            assert "Unseal" not in swtpm_proxy.commands
            assert _commands(swtpm_proxy)[:7] == FALLBACK_PATH[:7]


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
        # A flipped bit in the signature, without the ticket: VerifySignature refuses.  (With
        # this TPM's genuine ticket the unseal goes on: the ticket is the TPM's own record that
        # it verified the genuine signature of this very approval, and the bytes of the
        # signature are no longer needed.)
        sig = bytearray(state.signed.signatures[0])
        sig[5] ^= 1
        forged = dataclasses.replace(
            state,
            signed=dataclasses.replace(state.signed, signatures=(bytes(sig),), tickets=()),
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


def test_state_file_round_trip_keeps_the_tickets(swtpm: Swtpm) -> None:
    with PolicySigner.generate() as signer:
        state = _seal(swtpm, signer)
    assert state.signed is not None and state.signed.tickets
    again = SealedState.from_json(state.to_json())
    assert again.signed == state.signed
    # Older tokens have no "tickets": they load, with none.
    doc = state.to_dict()
    del doc["signed"]["tickets"]
    old = SealedState.from_dict(doc)
    assert old.signed is not None and old.signed.tickets == ()
    assert "tickets" not in old.to_dict()["signed"]
    # Tickets prove nothing by themselves (the TPM checks them at boot): a state with none,
    # or a surplus one, loads; only what is not hex at all is a malformed token.
    for fine in ([], ["00", "00"], ["00" * 100]):
        doc = state.to_dict()
        doc["signed"]["tickets"] = fine
        assert SealedState.from_dict(doc).signed is not None
    for bad in (["zz"], "0", [None]):
        doc = state.to_dict()
        doc["signed"]["tickets"] = bad
        with pytest.raises(CorruptState, match="malformed"):
            SealedState.from_dict(doc)


def test_tpm2_clear_voids_the_ticket(swtpm: Swtpm) -> None:
    """TPM 2.0 Part 3, PolicyAuthorize: the ticket is HMAC(ownerProof, ...), and TPM2_Clear
    draws a new ownerProof.  A ticket from before the clear is refused after it (as after a
    reboot it is accepted: test_the_ticket_survives_a_reboot); a new one is accepted."""
    from tpm2_pytss import (
        ESYS_TR,
        TPM2_ALG,
        TPM2_SE,
        TPML_PCR_SELECTION,
        TPMT_SYM_DEF,
        TPMT_TK_VERIFIED,
        TSS2_Exception,
    )

    ref = b"r" * 16
    with PolicySigner.generate() as signer, Tpm(swtpm.tcti) as tpm:
        esys = tpm.esys

        def session_at_approved() -> tuple[object, bytes]:
            sess = esys.start_auth_session(
                ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256,
            )  # fmt: skip
            esys.policy_pcr(sess, b"", TPML_PCR_SELECTION.parse("sha256:16,23"))
            return sess, bytes(esys.policy_get_digest(sess))

        def ticket_now(approved: bytes) -> TPMT_TK_VERIFIED:
            digest = authorization_digest(approved, ref)
            (t,) = verification_tickets(tpm, signer.public(), [digest], [signer.sign(digest)])
            return TPMT_TK_VERIFIED.unmarshal(t)[0]

        sess, approved = session_at_approved()
        esys.flush_context(sess)
        before = ticket_now(approved)
        esys.clear(ESYS_TR.RH_PLATFORM)
        sess, again = session_at_approved()
        try:
            assert again == approved
            with pytest.raises(TSS2_Exception) as refused:
                esys.policy_authorize(sess, approved, signer.name(), before, ref)
            # TPM_RC_VALUE on parameter 4, checkTicket: the HMAC, not anything else
            assert int(refused.value.rc) & 0xFFF == 0x084 | 0x040 | 0x400, hex(refused.value.rc)
            after = ticket_now(approved)
            assert bytes(after.digest) != bytes(before.digest)
            esys.policy_authorize(sess, approved, signer.name(), after, ref)
        finally:
            esys.flush_context(sess)
