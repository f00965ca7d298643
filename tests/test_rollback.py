"""Rollback protection by the TPM NV counter (TPM2_PolicyNV in the sealed object's policy).

A complete rollback of the container's header (its keyslots with an old passphrase, and its
old qubes-seal token, so the old sealed object) passes PolicyPCR, since PCR 13 then measures
the old header the old object expects.  Every reseal, rotation and revoke increments the
counter after the new token is written: the old object's PolicyNV (counter <= its bound)
fails, and the unlock reports the rollback (exit 3).
"""

from __future__ import annotations

import pytest
from machine import CHEAP_KDF, Box
from test_rotate import cli, new_pw

from qubes_seal import chain
from qubes_seal.luks.container import Container
from qubes_seal.policy import counter_bound, policy_nv, sealing_policy
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import sample_modules, txt_launch
from qubes_seal.tpm.device import NV_COUNTER_ATTRIBUTES, TPMA_NV_WRITTEN, Tpm

REVOKED = "this sealed object was revoked (a newer one exists): rollback refused"


def header_region(b: Box) -> bytes:
    return b.container.read_bytes()[: Container(b.container).data_offset]


def restore(b: Box, region: bytes) -> None:
    chain.lock(b.container)
    with open(b.container, "r+b") as f:
        f.write(region)


def counter(b: Box) -> tuple[int, int]:
    """(the counter's value, the token's bound)."""
    sealed = chain.read_token(Container(b.container))[1].sealed
    assert sealed.nv is not None
    with Tpm(b.swtpm.tcti) as tpm:
        return tpm.nv_read_counter(sealed.nv), sealed.nv.bound


def test_policy_nv_digest_matches_a_trial_session(swtpm: Swtpm) -> None:
    with Tpm(swtpm.tcti) as tpm:
        nv = tpm.nv_define_counter()
        assert tpm.is_our_counter(nv.handle)
        for bound in (0, 1, 7, 2**40 + 3):
            expected = policy_nv(bytes(32), nv.name, counter_bound(bound))
            assert tpm.trial_policy_nv(nv, bound) == expected
        assert tpm.nv_increment(nv) == tpm.nv_read_counter(nv)
    # The NV part sits between PolicyPCR/PolicyOR and PolicyAuthValue.
    state = {17: bytes(32)}
    plain, _ = sealing_policy([state], [17])
    bound, _ = sealing_policy([state], [17], nv=(nv.name, 3))
    assert bound == policy_nv(plain, nv.name, counter_bound(3))
    assert NV_COUNTER_ATTRIBUTES & TPMA_NV_WRITTEN == 0


def test_init_binds_the_token_to_a_written_counter(box: Box) -> None:
    value, bound = counter(box)
    assert value == bound  # settled: no older object accepted
    box.boot()
    assert box.unlock().code == 0


def test_rotate_passphrase_then_full_header_rollback_is_refused(box: Box) -> None:
    box.boot()
    assert box.unlock().code == 0
    old = header_region(box)
    res = cli(box, "rotate", "passphrase", "--passphrase-file", str(box.pw),
              "--new-passphrase-file", str(new_pw(box)))  # fmt: skip
    assert res.code == 0, res.err
    value, bound = counter(box)
    assert value == bound
    restore(box, old)
    box.boot()
    res = box.unlock()  # the old passphrase, the old keyslot, the old token: all consistent
    assert res.code == 3, res.err
    assert REVOKED in res.err


def test_recover_reseal_then_full_header_rollback_is_refused(box: Box) -> None:
    old = header_region(box)
    res = box.cli("recover", "--recovery-key-file", str(box.rk), "--reseal", "--keyring",
                  "none", *CHEAP_KDF, pw=box.pw)  # fmt: skip
    assert res.code == 0, res.err
    box.boot()
    assert box.unlock().code == 0
    restore(box, old)
    box.boot()
    res = box.unlock()
    assert res.code == 3, res.err
    assert REVOKED in res.err


def test_revoke_drops_a_predicted_state_and_older_objects(box: Box) -> None:
    from test_predict import write_components

    log = box.dir / "txt.log"
    box.swtpm.reboot()
    txt_launch(box.swtpm, sample_modules(), log_path=log)
    assert box.unlock().code == 0
    new = sample_modules(xen_version="4.19.1")
    res = box.cli("reseal", "--predict", "--txt-log", str(log),
                  *write_components(new, box.dir / "new"))  # fmt: skip
    assert res.code == 0, res.err
    with_prediction = header_region(box)
    res = box.cli("revoke", "--json")
    assert res.code == 0, res.err
    value, bound = counter(box)
    assert res.json()["counter"] == bound == value
    token = chain.read_token(Container(box.container))[1]
    assert [s.label for s in token.sealed.pcr_states] == ["current"]
    chain.lock(box.container)
    box.boot(xen_version="4.19.1")  # the revoked prediction
    res = box.unlock()
    assert res.code == 3, res.err
    assert REVOKED not in res.err  # the current token: PolicyPCR refuses
    restore(box, with_prediction)
    box.boot(xen_version="4.19.1")
    res = box.unlock()  # the token that accepted it, restored: the counter refuses
    assert res.code == 3, res.err
    assert REVOKED in res.err


def test_crash_between_token_write_and_increment_still_unlocks(box: Box) -> None:
    box.boot()
    assert box.unlock().code == 0
    old = header_region(box)
    res = cli(box, "reseal", crash_at="token-written")
    assert res.code != 0
    value, bound = counter(box)
    assert bound == value + 1  # the increment did not happen
    chain.lock(box.container)
    box.boot()
    assert box.unlock().code == 0  # the new object accepts the old value
    from test_rotate import status_of

    assert status_of(box)["journal"]["op"] == "reseal"  # the interruption is shown
    res = box.cli("repair", "--json")
    assert res.code == 0, res.err
    doc = res.json()
    assert (doc["repaired"], doc["action"]) == ("reseal", "completed")
    assert "the rollback counter was incremented" in doc["notes"][0]
    value, bound = counter(box)
    assert value == bound
    restore(box, old)
    box.boot()
    res = box.unlock()
    assert res.code == 3, res.err
    assert REVOKED in res.err


@pytest.mark.parametrize("action", [("add", "personal"), ("rotate", "work")])
def test_a_crash_after_a_domain_write_is_shown_and_repaired(
    box: Box, action: tuple[str, str]
) -> None:
    from test_rotate import status_of

    box.boot()
    assert box.unlock().code == 0
    assert box.cli("domain", "add", "work").code == 0
    res = cli(box, "domain", *action, crash_at="keystore-written")
    assert res.code != 0
    assert status_of(box)["journal"]["op"] == f"domain-{action[0]}"
    res = box.cli("domain", "add", "other")  # one operation at a time
    assert res.code == 2 and "repair" in res.err
    res = box.cli("repair", "--json")
    assert res.code == 0, res.err
    assert res.json()["action"] == "completed"
    assert status_of(box)["journal"] is None
    listed = box.cli("domain", "list", "--json").json()["domains"]
    assert action[1] in [d["name"] for d in listed]  # the write itself was complete
