"""The TPM's lockout authorization, from the attacker's side (issue 13).

The attack run: with the default empty lockoutAuth, 9 wrong guesses, a
TPM2_DictionaryAttackLockReset with the empty authorization, and the right guess worked.
Now ``status`` and ``init`` warn while it is empty, ``qubes-seal tpm set-lockout-auth``
sets a random one kept in the keystore (the recovery key gets it back), after which the
attacker's empty-auth reset fails and ours succeeds.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_util import run
from machine import CHEAP_KDF, PASSPHRASE, Box

from qubes_seal import chain
from qubes_seal.errors import AuthorizationError, LockoutError
from qubes_seal.keystore import Keystore, decode, encode
from qubes_seal.keystore.codec import MAC_SIZE
from qubes_seal.secret import Secret
from qubes_seal.sim.swtpm import Swtpm, configure_da
from qubes_seal.sim.txt_launch import sample_modules, txt_launch
from qubes_seal.tpm.device import Tpm


def stored_lockout_auth(box: Box) -> bytes | None:
    """The keystore's lockout authorization, read the way a user gets it back: through the
    recovery key alone (no TPM, no hand-over)."""
    rkey = Secret(box.rk.read_bytes().strip())
    unlocked = chain.recover(box.container, recovery_key=rkey, keyring=None)
    try:
        value = unlocked.keystore.lockout_auth
        return None if value is None else bytes(value.reveal())
    finally:
        unlocked.keystore.wipe()
        unlocked.close()


def lockout_status(box: Box) -> dict[str, object]:
    res = box.cli("status", "--json")
    assert res.code == 0, res.err
    doc: dict[str, object] = res.json()["tpm"]["lockout_auth"]
    return doc


def unlocked(box: Box) -> Box:
    """``box`` after an unlock in this boot: the hand-over the tpm commands read."""
    res = box.unlock()
    assert res.code == 0, res.err
    return box


def set_auth(box: Box, *extra: str) -> None:
    res = box.cli("tpm", "set-lockout-auth", *extra)
    assert res.code == 0, res.err


def test_init_and_status_warn_while_the_lockout_auth_is_empty(swtpm: Swtpm, tmp_path: Path) -> None:
    b = Box(swtpm, tmp_path)
    b.pw.write_text(PASSPHRASE + "\n")
    txt_launch(swtpm, sample_modules())
    res = b.cli("init", *CHEAP_KDF, "--recovery-key-file", str(b.rk), pw=b.pw)
    assert res.code == 0, res.err
    try:
        assert "lockout auth:    EMPTY. WARNING" in res.out
        assert "qubes-seal tpm set-lockout-auth" in res.out
        text = b.cli("status").out
        assert "lockout auth:    EMPTY. WARNING" in text
        assert lockout_status(b) == {"set": False, "fix": "qubes-seal tpm set-lockout-auth"}

        set_auth(unlocked(b))
        text = b.cli("status").out
        assert "WARNING" not in text
        assert "lockout auth:    set" in text
        assert lockout_status(b) == {"set": True, "fix": None}
        res = run(swtpm.tcti, tmp_path / "state", "status", "--json")  # no container named
        assert res.json()["tpm"]["dictionary_attack"]["lockout_auth_set"] is True
    finally:
        chain.lock(b.container)


def test_the_attackers_empty_reset_fails_and_ours_succeeds(box: Box) -> None:
    # lockoutRecovery 0: a failed lockout authorization blocks the lockout hierarchy until
    # the next TPM reset (a boot), so both orders can be tried in one test.
    configure_da(box.swtpm.tcti, max_tries=3, recovery_time=1000, lockout_recovery=0)
    set_auth(unlocked(box))
    box.boot()  # the attacker's boot
    wrong = box.dir / "wrong"
    wrong.write_text("not the passphrase\n")
    for _ in range(3):
        assert box.unlock(pw=wrong).code == 4
    assert box.unlock().code == 5  # locked out: even the right passphrase is refused
    with Tpm(box.swtpm.tcti) as tpm:
        # The attack run's step: reset with the empty lockout authorization.
        with pytest.raises(AuthorizationError):
            tpm.dictionary_attack_lock_reset(None)
        # One wrong lockout authorization locks the lockout hierarchy itself (until the next
        # boot here; lockoutRecovery seconds on a real TPM): no second guess.
        with pytest.raises(LockoutError):
            tpm.dictionary_attack_lock_reset(Secret(bytes(32)))
        assert tpm.da_status()["in_lockout"] is True
    assert box.unlock().code == 5  # still locked out for the attacker

    box.boot()  # lockoutRecovery 0: the failed lockout authorizations are forgotten
    # The TPM is locked out, so the keystore (which holds the lockout authorization) is
    # opened with the recovery key, as the documented way out says.
    assert box.cli("recover", "--recovery-key-file", str(box.rk)).code == 0
    res = box.cli("tpm", "reset-lockout")
    assert res.code == 0, res.err
    assert "every failed try forgiven" in res.out
    with Tpm(box.swtpm.tcti) as tpm:
        da = tpm.da_status()
    assert (da["failed_tries"], da["in_lockout"]) == (0, False)
    assert box.unlock().code == 0


def test_the_value_lives_in_the_keystore_and_the_recovery_key_gets_it(box: Box) -> None:
    unlocked(box)
    assert stored_lockout_auth(box) is None
    res = box.cli("tpm", "set-lockout-auth", "--json")
    assert res.code == 0, res.err
    assert res.json()["replaced"] is False
    first = stored_lockout_auth(box)
    assert first is not None and len(first) == 32 and first != bytes(32)
    # Never printed, in text or JSON, nor in the keystore's public view.
    for out in (res.out, res.err, box.cli("tpm", "reset-lockout", "--json").out):
        assert first.hex() not in out and first.hex().upper() not in out
    # The value from the recovery key alone works on the TPM.
    with Tpm(box.swtpm.tcti) as tpm:
        tpm.dictionary_attack_lock_reset(Secret(first))
    # Set again: replaced (through the empty value), the keystore follows.
    res = box.cli("tpm", "set-lockout-auth", "--json")
    assert res.code == 0, res.err
    assert res.json()["replaced"] is True
    second = stored_lockout_auth(box)
    assert second is not None and second != first
    with Tpm(box.swtpm.tcti) as tpm:
        tpm.dictionary_attack_lock_reset(Secret(second))
    # A rotation of another secret keeps it (the keystore is rewritten as a whole).
    res = box.cli("domain", "add", "work")
    assert res.code == 0, res.err
    assert stored_lockout_auth(box) == second
    # Clear: the TPM is empty again, the keystore holds nothing, status warns.
    res = box.cli("tpm", "clear-lockout-auth")
    assert res.code == 0, res.err
    assert stored_lockout_auth(box) is None
    assert lockout_status(box)["set"] is False
    res = box.cli("tpm", "clear-lockout-auth")
    assert res.code == 0 and "already empty" in res.out


def test_a_crash_between_keystore_and_tpm_leaves_a_known_state(box: Box) -> None:
    unlocked(box)
    res = box.cli("tpm", "set-lockout-auth")
    assert res.code == 0, res.err
    crashed = run(box.swtpm.tcti, box.dir / "state", "tpm", "set-lockout-auth",
                  "--container", str(box.container),
                  env={"QUBES_SEAL_CRASH_AT": "keystore-written"})  # fmt: skip
    assert crashed.code == -9
    # The keystore has the new value, the TPM the empty one (the old value was taken out
    # first): lockoutAuthSet says so, and nothing is guessed.
    assert stored_lockout_auth(box) is not None
    assert lockout_status(box)["set"] is False
    res = box.cli("tpm", "reset-lockout")  # works with the empty value, and warns
    assert res.code == 0, res.err
    assert "WARNING" in res.out
    set_auth(box)  # run again: done
    value = stored_lockout_auth(box)
    assert value is not None and lockout_status(box)["set"] is True
    with Tpm(box.swtpm.tcti) as tpm:
        tpm.dictionary_attack_lock_reset(Secret(value))


def test_a_lockout_auth_set_by_others_is_never_overwritten(box: Box) -> None:
    unlocked(box)
    theirs = Secret(b"the administrator's own value")
    with Tpm(box.swtpm.tcti) as tpm:
        tpm.change_lockout_auth(current=None, new=theirs)
    for what in ("set-lockout-auth", "reset-lockout", "clear-lockout-auth"):
        res = box.cli("tpm", what)
        assert res.code == 2, (what, res.err)
        assert "keystore does not hold it" in res.err
    with Tpm(box.swtpm.tcti) as tpm:  # untouched, and not locked by a guess of ours
        tpm.dictionary_attack_lock_reset(theirs)
        tpm.change_lockout_auth(current=theirs, new=None)


def test_without_this_boots_hand_over_nothing_is_read(box: Box) -> None:
    unlocked(box)
    set_auth(box)
    chain.lock(box.container)  # drop the hand-over: an attacker's shell after a reboot
    for what in ("set-lockout-auth", "reset-lockout", "clear-lockout-auth"):
        res = box.cli("tpm", what)
        assert res.code == 2, (what, res.err)
        assert "no hand-over" in res.err
    assert lockout_status(box)["set"] is True


def test_keystore_field_round_trip_and_malformed_values() -> None:
    hkey = Secret(bytes(range(32)))
    ks = Keystore(generation=1, lockout_auth=Secret(bytes(range(100, 132))))
    assert "lockout" not in repr(ks) and "lockout" not in str(ks.public_view())
    record = encode(ks, hkey)
    back = decode(record, hkey)
    assert back.lockout_auth is not None
    assert back.lockout_auth.reveal() == bytes(range(100, 132))
    back.wipe()
    assert back.lockout_auth.reveal() == bytes(32)  # wiped with the other keys
    assert decode(encode(Keystore(generation=1), hkey), hkey).lockout_auth is None
    # A malformed value (with a valid MAC: written by a buggy or newer writer) is refused.
    import json

    from qubes_seal.errors import CorruptState
    from qubes_seal.keystore.codec import HEADER, LEGACY_HEADER_SIZE, MAGIC, _mac

    for bad in ("00" * 31, "zz" * 32, 7, "00" * 33):
        body = json.dumps({"domains": [], "tpm_lockout_auth": bad}).encode()
        rec = HEADER.pack(MAGIC, 1, 0, len(body), 1) + body
        rec += _mac(hkey, rec)
        assert len(rec) == LEGACY_HEADER_SIZE + len(body) + MAC_SIZE  # a version 1 record
        with pytest.raises(CorruptState, match="TPM lockout authorization is malformed"):
            decode(rec, hkey)
