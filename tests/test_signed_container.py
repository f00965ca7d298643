"""Signed policies in the container flows: updates are signatures, not reseals.

A machine on swtpm: init, an update predicted and *signed* (the sealed object unchanged),
a reboot into it, the old state dropped; the signing key only reachable through an unlocked
container; older copies of the container (token, keystore) refused once the counter moved.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from machine import CHEAP_KDF, PASSPHRASE, Box
from test_predict import write_components

from qubes_seal import chain
from qubes_seal.keystore import hmac_key_from_volume_key, load
from qubes_seal.luks.container import Container
from qubes_seal.luks.payload import UserspacePayload
from qubes_seal.sim.txt_launch import sample_modules, txt_launch
from qubes_seal.tpm.marshal import auth_policy

REVOKED = "rollback refused"


def token(b: Box) -> chain.Token:
    return chain.read_token(Container(b.container))[1]


def whole(b: Box) -> bytes:
    return b.container.read_bytes()


def restore(b: Box, data: bytes) -> None:
    chain.lock(b.container)
    b.container.write_bytes(data)


def boot_with_log(b: Box, **changes: str) -> Path:
    log = b.dir / "txt.log"
    b.swtpm.reboot()
    txt_launch(b.swtpm, sample_modules(**changes), log_path=log)
    return log


def test_init_seals_a_signed_object_and_keeps_the_key_in_the_keystore(box: Box) -> None:
    t = token(box)
    signed = t.sealed.signed
    assert signed is not None and len(signed.signatures) == 1
    assert t.keystore_generation is not None
    box.boot()
    assert box.unlock().code == 0
    unlocked = chain.open_handed_over(box.container)
    assert unlocked is not None
    try:
        assert unlocked.keystore.signer is not None
        assert unlocked.keystore.generation >= t.keystore_generation
    finally:
        unlocked.keystore.wipe()
        unlocked.close()
    res = box.cli("status", "--json")
    assert res.code == 0, res.err
    c = res.json()["container"]
    assert c["signed"]["signer_name"] == signed.name.hex()
    assert c["counter"]["value"] == c["counter"]["bound"]
    assert c["counter"]["revoked"] is False
    assert "policy:        signed" in box.cli("status").out


def test_kernel_update_is_a_signature_on_the_same_object(box: Box) -> None:
    log = boot_with_log(box)
    assert box.unlock().code == 0
    before = token(box)
    new = sample_modules(kernel_version="6.6.99")
    res = box.cli("reseal", "--predict", "--txt-log", str(log),
                  *write_components(new, box.dir / "new"))  # fmt: skip
    assert res.code == 0, res.err
    after = token(box)
    # The same sealed object: only the signatures (and the states) changed.
    assert (after.sealed.public, after.sealed.private) == (before.sealed.public,
                                                           before.sealed.private)  # fmt: skip
    assert after.sealed.signed is not None and before.sealed.signed is not None
    assert after.sealed.signed.policy_ref == before.sealed.signed.policy_ref
    assert [s.label for s in after.sealed.pcr_states] == ["current", "predicted"]
    assert len(after.sealed.signed.signatures) == 2
    assert after.sealed.nv is not None and before.sealed.nv is not None
    assert after.sealed.nv.bound == before.sealed.nv.bound + 1
    chain.lock(box.container)
    box.boot(kernel_version="6.6.99")
    assert box.unlock().code == 0, "the signed prediction unlocks"
    assert box.cli("reseal").code == 0  # drop the old state
    assert [s.label for s in token(box).sealed.pcr_states] == ["current"]
    chain.lock(box.container)
    box.boot()  # the old kernel: no longer signed
    res = box.unlock()
    assert res.code == 3, res.err
    assert "PCR 17 differs" in res.err


def test_predict_with_a_container_previews_the_approval_unsigned(box: Box) -> None:
    """A preview shows the approved policy and never a signature: one that a later reseal
    made valid (the counter reaching its bound) would approve a boot nobody confirmed."""
    log = boot_with_log(box)
    comps = write_components(sample_modules(kernel_version="6.6.99"), box.dir / "new")
    assert box.unlock().code == 0
    res = box.cli("predict", "--txt-log", str(log), *comps, "--json")
    assert res.code == 0, res.err
    approval = res.json()["approval"]
    assert approval["signed"] is False
    assert "signature" not in approval and "signature" not in res.out.lower().replace(
        "never hands out a signature", ""
    )
    t = token(box)
    assert t.sealed.nv is not None and t.sealed.signed is not None
    assert approval["counter_bound"] == t.sealed.nv.bound + 1
    assert approval["pcrs"]["17"] == res.json()["pcrs"]["sha256"]["17"]
    assert approval["signer_name"] == t.sealed.signed.name.hex()
    # reseal --predict stores an approval of the same state (ECDSA is randomised: compare
    # the approved policy, not the signature bytes).
    from qubes_seal.policy import approved_policy

    assert box.cli("reseal", "--predict", "--txt-log", str(log), *comps).code == 0
    after = token(box).sealed
    assert after.nv is not None
    predicted = after.pcr_states[1]
    assert (
        approved_policy(predicted.values, after.pcrs, nv=(after.nv.name, after.nv.bound)).hex()
        == approval["approved_policy"]
    )


def test_signing_needs_an_unlocked_container(box: Box) -> None:
    box.boot()
    res = box.cli("reseal")  # this boot has no hand-over
    assert res.code == 2, res.err
    assert "did not unlock" in res.err
    assert "Traceback" not in res.err


def test_old_signature_is_refused_after_reseal(box: Box) -> None:
    box.boot()
    assert box.unlock().code == 0
    old = whole(box)
    assert box.cli("reseal").code == 0
    restore(box, old)  # the old token: the same object, older signatures
    box.boot()
    status = box.cli("status", "--json").json()["container"]["counter"]
    assert status["revoked"] is True and status["value"] > status["bound"]
    assert "REVOKED" in box.cli("status").out
    res = box.unlock()
    assert res.code == 3, res.err
    assert REVOKED in res.err


def test_old_keystore_copy_is_refused_after_a_domain_removal(box: Box) -> None:
    """The removed key is still in a copy of the data area taken before: a current header
    with that old data area is refused (keystore generation), and the old container as a
    whole is refused (the counter)."""
    box.boot()
    assert box.unlock().code == 0
    assert box.cli("domain", "add", "work").code == 0
    before = whole(box)
    res = box.cli("domain", "remove", "work", "--json")
    assert res.code == 0, res.err
    assert res.json()["older_copies_revoked"] is True
    offset = Container(box.container).data_offset
    now = whole(box)
    # 1. The current header and token with the old data area (the keystore with "work").
    restore(box, now[:offset] + before[offset:])
    box.boot()
    res = box.unlock()
    assert res.code == 3, res.err
    assert "the keystore is older than this container's token accepts" in res.err
    # 2. The whole old container: its token's signatures carry an older bound.
    restore(box, before)
    box.boot()
    res = box.unlock()
    assert res.code == 3, res.err
    assert REVOKED in res.err
    # 3. The current container still unlocks, without the removed key.
    restore(box, now)
    box.boot()
    assert box.unlock().code == 0
    assert box.cli("domain", "show", "work").code != 0


def test_domain_rotate_commit_revokes_copies_with_the_previous_key(box: Box) -> None:
    box.boot()
    assert box.unlock().code == 0
    assert box.cli("domain", "add", "work").code == 0
    assert box.cli("domain", "rotate", "work").code == 0
    before = whole(box)  # holds the previous key
    res = box.cli("domain", "rotate", "work", "--commit")
    assert res.code == 0, res.err
    assert "older copies of the container are revoked" in res.out
    restore(box, before)
    box.boot()
    assert box.unlock().code == 3


def test_a_token_mixed_from_two_containers_is_named(box: Box, tmp_path: Path) -> None:
    """Signatures copied from another container's token do not open this object."""
    other = Box(box.swtpm, tmp_path / "other")
    other.dir.mkdir()
    other.pw.write_text(PASSPHRASE + "\n")
    res = other.cli("init", *CHEAP_KDF, "--recovery-key-file", str(other.rk), pw=other.pw)
    assert res.code == 0, res.err
    mine_id, mine = chain.read_token(Container(box.container))
    theirs = token(other)
    assert auth_policy(mine.sealed.public) != auth_policy(theirs.sealed.public)
    assert theirs.sealed.signed is not None
    mine.sealed.signed = theirs.sealed.signed
    mine.sealed.nv = theirs.sealed.nv
    forged = {**mine.to_json(), "mac": (mine.raw or {})["mac"]}  # the old MAC, now stale
    Container(box.container).import_token(forged, token_id=mine_id, replace=True)
    box.boot()
    res = box.unlock()
    assert res.code == 7, res.err
    assert "mixed with another one" in res.err


def test_keystore_signer_survives_a_round_trip(box: Box) -> None:
    box.boot()
    assert box.unlock().code == 0
    vk = chain.open_handed_over(box.container)
    assert vk is not None
    try:
        scalar = bytes(vk.keystore.signer.reveal())  # type: ignore[union-attr]
        with (
            hmac_key_from_volume_key(vk.volume_key) as hkey,
            UserspacePayload(Container(box.container), vk.volume_key) as payload,
        ):
            again = load(payload, hkey)
        assert again.signer is not None and bytes(again.signer.reveal()) == scalar
        again.wipe()
    finally:
        vk.keystore.wipe()
        vk.close()


def test_crash_after_a_domain_removal_keeps_the_unlock_and_repair_completes(box: Box) -> None:
    from test_rotate import cli

    box.boot()
    assert box.unlock().code == 0
    assert box.cli("domain", "add", "work").code == 0
    before = whole(box)
    res = cli(box, "domain", "remove", "work", crash_at="token-written")
    assert res.code != 0  # killed between the new token and the increment
    t = token(box)
    assert t.sealed.nv is not None
    counter = box.cli("status", "--json").json()["container"]["counter"]
    assert counter["value"] == counter["bound"] - 1  # shown as an increment pending
    assert "increment pending" in box.cli("status").out
    chain.lock(box.container)
    box.boot()
    assert box.unlock().code == 0  # the new signatures accept the counter's old value
    assert box.cli("domain", "show", "work").code != 0  # the key is gone
    from test_rotate import status_of

    assert status_of(box)["journal"]["op"] == "domain-remove"
    res = box.cli("repair", "--json")
    assert res.code == 0, res.err
    doc = res.json()
    assert (doc["repaired"], doc["step"], doc["action"]) == (
        "domain-remove", "keystore-written", "completed",
    )  # fmt: skip
    assert "older copies of the container (with the destroyed key) are revoked" in doc["notes"][0]
    assert status_of(box)["journal"] is None
    restore(box, before)
    box.boot()
    assert box.unlock().code == 3  # the copy with the removed key: refused


def test_revoke_one_boot_state_by_label(box: Box) -> None:
    log = boot_with_log(box)
    assert box.unlock().code == 0
    comps = write_components(sample_modules(xen_version="4.19.1"), box.dir / "new")
    assert box.cli("reseal", "--predict", "--txt-log", str(log), *comps).code == 0
    res = box.cli("revoke", "--state", "nope")
    assert res.code == 2 and "current, predicted" in res.err, res.err
    res = box.cli("revoke", "--state", "current", "--state", "predicted")
    assert res.code == 2 and "every accepted boot state" in res.err, res.err
    before = token(box)
    res = box.cli("revoke", "--state", "predicted", "--json")
    assert res.code == 0, res.err
    doc = res.json()
    assert (doc["revoked"], doc["kept"]) == (["predicted"], ["current"])
    after = token(box)
    assert [s.label for s in after.sealed.pcr_states] == ["current"]
    assert after.sealed.nv is not None and before.sealed.nv is not None
    assert after.sealed.nv.bound == before.sealed.nv.bound + 1
    chain.lock(box.container)
    box.boot(xen_version="4.19.1")  # the withdrawn update
    assert box.unlock().code == 3
    box.boot()
    assert box.unlock().code == 0


def test_rotate_signer(box: Box) -> None:
    box.boot()
    assert box.unlock().code == 0
    before = token(box)
    old_copy = whole(box)
    res = box.cli("rotate", "signer", "--json")
    assert res.code == 0, res.err
    after = token(box)
    assert after.sealed.signed is not None and before.sealed.signed is not None
    assert res.json()["signer_name"] == after.sealed.signed.name.hex()
    assert after.sealed.signed.name != before.sealed.signed.name
    assert after.sealed.signed.policy_ref != before.sealed.signed.policy_ref
    assert after.sealed.public != before.sealed.public  # a new object trusts the new key
    assert after.sealed.pcr_states == before.sealed.pcr_states
    counter = box.cli("status", "--json").json()["container"]["counter"]
    assert counter["value"] == counter["bound"]
    assert box.cli("reseal").code == 0  # signs with the new key, from the keystore
    chain.lock(box.container)
    box.boot()
    assert box.unlock().code == 0
    restore(box, old_copy)  # the old key's object and signatures
    box.boot()
    assert box.unlock().code == 3


@pytest.mark.parametrize("step", ["begun", "key-added", "token-replaced", "key-committed"])
def test_crash_during_rotate_signer(box: Box, step: str) -> None:
    from test_rotate import cli, status_of

    box.boot()
    assert box.unlock().code == 0
    before = token(box)
    res = cli(box, "rotate", "signer", crash_at=step)
    assert res.code != 0
    assert status_of(box)["journal"]["op"] == "rotate-signer"
    chain.lock(box.container)
    box.boot()
    assert box.unlock().code == 0  # the old or the new object: never neither
    res = box.cli("repair", "--json")
    assert res.code == 0, res.err
    replaced = step in ("token-replaced", "key-committed")
    assert res.json()["action"] == ("completed" if replaced else "rolled back")
    assert status_of(box)["journal"] is None
    after = token(box)
    assert after.sealed.signed is not None and before.sealed.signed is not None
    assert (after.sealed.signed.name != before.sealed.signed.name) == replaced
    # The keystore settles on the key the token trusts: signing works, and the next boot.
    assert box.cli("reseal").code == 0
    chain.lock(box.container)
    box.boot()
    assert box.unlock().code == 0
    unlocked = chain.open_handed_over(box.container)
    assert unlocked is not None
    try:
        assert unlocked.keystore.signer_next is None
    finally:
        unlocked.keystore.wipe()
        unlocked.close()
