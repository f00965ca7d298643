"""Rotations and crash safety: swtpm, real cryptsetup, the real CLI in subprocesses.

Each rotation is killed (SIGKILL, through the QUBES_SEAL_CRASH_AT test hook) at every step
boundary in turn.  After each crash: the next boot unlocks with the old or the new
credentials (never neither), no domain key is lost, and ``repair`` leaves a clean container
(no journal, exactly the expected keyslots, a token that names them).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from cli_util import Result, run
from machine import U1, Box

from qubes_seal import chain, journal
from qubes_seal.luks.container import Container

NEW_PASSPHRASE = "a brand new passphrase for the test"
TPM_STEPS = ["begun", "staged", "keyslot-added", "token-replaced", "old-keyslot-killed",
             "resealed"]  # fmt: skip
RECOVERY_STEPS = ["begun", "staged", "keyslot-added", "key-delivered", "token-updated",
                  "old-keyslot-killed", "resealed"]  # fmt: skip
#: Reported: every crash point the parametrised tests below exercise.
CRASH_POINTS = 2 * len(TPM_STEPS) + len(RECOVERY_STEPS)


def cli(b: Box, *args: str, crash_at: str | None = None) -> Result:
    env = {"QUBES_SEAL_CRASH_AT": crash_at} if crash_at else None
    return run(b.swtpm.tcti, b.dir / "state", *args, "--container", str(b.container), env=env)


def status_of(b: Box) -> Any:
    res = run(b.swtpm.tcti, b.dir / "state", "status", "--json")
    assert res.code == 0, res.err
    return res.json()


def new_pw(b: Box) -> Path:
    p = b.dir / "new-passphrase"
    p.write_text(NEW_PASSPHRASE + "\n")
    return p


def prepare(b: Box) -> str:
    """Boot, unlock, add a domain; its key (hex)."""
    b.boot()
    assert b.unlock().code == 0
    assert b.cli("domain", "add", "work", "--uuid", U1).code == 0
    shown = b.cli("domain", "show", "work", "--uuid", U1, "--show-key", "--json").json()
    return str(shown["key"])


def work_key(b: Box) -> str:
    shown = b.cli("domain", "show", "work", "--uuid", U1, "--show-key", "--json")
    assert shown.code == 0, shown.err
    return str(shown.json()["key"])


def unlock_with(b: Box, pw: Path) -> bool:
    chain.lock(b.container)
    b.boot()
    res = b.unlock(pw=pw)
    assert res.code in (0, 3, 4), res.err
    return res.code == 0


def assert_clean(b: Box, slots: list[int]) -> None:
    assert journal.read(b.dir / "state") is None
    container = Container(b.container)
    assert container.slots() == slots
    _, token = chain.read_token(container)
    assert sorted([token.tpm_keyslot, token.recovery_keyslot]) == slots
    assert not (b.dir / "state" / "rotate-header.img").exists()


def rotate_args(what: str, b: Box) -> list[str]:
    if what == "passphrase":
        return ["rotate", "passphrase", "--passphrase-file", str(b.pw),
                "--new-passphrase-file", str(new_pw(b))]  # fmt: skip
    return ["rotate", "master", "--passphrase-file", str(b.pw)]


def test_rotate_passphrase_then_unlock(box: Box) -> None:
    key = prepare(box)
    res = cli(box, *rotate_args("passphrase", box), "--json")
    assert res.code == 0, res.err
    assert res.json()["keyslot"] == 2
    assert_clean(box, [1, 2])
    # This boot's hand-over follows: a reseal still works without a new unlock.
    assert cli(box, "reseal").code == 0
    assert not unlock_with(box, box.pw)  # the old passphrase is refused ...
    assert unlock_with(box, new_pw(box))  # ... the new one opens
    assert work_key(box) == key


def test_rotate_passphrase_wrong_current(box: Box) -> None:
    prepare(box)
    wrong = box.dir / "wrong"
    wrong.write_text("not it\n")
    res = cli(box, "rotate", "passphrase", "--passphrase-file", str(wrong),
              "--new-passphrase-file", str(new_pw(box)))  # fmt: skip
    assert res.code == 4, res.err
    assert journal.read(box.dir / "state") is None
    assert Container(box.container).slots() == [0, 1]


def test_rotate_master_and_recovery(box: Box) -> None:
    key = prepare(box)
    assert cli(box, *rotate_args("master", box)).code == 0
    assert_clean(box, [1, 2])
    rk2 = box.dir / "rk2"
    res = cli(box, "rotate", "recovery", "--recovery-key-file", str(rk2), "--json")
    assert res.code == 0, res.err
    assert_clean(box, [0, 2])
    assert (rk2.stat().st_mode & 0o777) == 0o600
    assert cli(box, "rotate", "recovery", "--recovery-key-file", str(rk2)).code == 2
    assert unlock_with(box, box.pw)
    assert work_key(box) == key
    chain.lock(box.container)
    assert cli(box, "recover", "--recovery-key-file", str(box.rk)).code != 0
    assert cli(box, "recover", "--recovery-key-file", str(rk2)).code == 0
    assert work_key(box) == key


def test_rotate_without_handover_unlocks_first(box: Box) -> None:
    box.boot()
    res = cli(box, *rotate_args("passphrase", box))
    assert res.code == 0, res.err
    assert unlock_with(box, new_pw(box))


@pytest.mark.parametrize("what", ["passphrase", "master"])
@pytest.mark.parametrize("step", TPM_STEPS)
def test_crash_during_tpm_rotation(box: Box, what: str, step: str) -> None:
    key = prepare(box)
    res = cli(box, *rotate_args(what, box), crash_at=step)
    assert res.code == -9, (res.code, res.err)
    status = status_of(box)
    assert status["journal"]["op"] == f"rotate-{what}"
    assert status["journal"]["step"] == step
    new = new_pw(box) if what == "passphrase" else box.pw
    # Never neither: the old or the new credentials open the container after a power cut.
    opened = unlock_with(box, box.pw) or unlock_with(box, new)
    assert opened, f"neither credential unlocks after a crash at {step}"
    assert work_key(box) == key
    res = cli(box, "repair", "--json")
    assert res.code == 0, res.err
    forward = res.json()["action"] == "completed"
    assert forward == (TPM_STEPS.index(step) >= TPM_STEPS.index("token-replaced"))
    assert_clean(box, [1, 2] if forward else [0, 1])
    expected = new if forward else box.pw
    assert unlock_with(box, expected)
    assert work_key(box) == key
    assert cli(box, "repair").code == 0  # nothing left to do


@pytest.mark.parametrize("step", RECOVERY_STEPS)
def test_crash_during_recovery_rotation(box: Box, step: str) -> None:
    key = prepare(box)
    rk2 = box.dir / "rk2"
    res = cli(box, "rotate", "recovery", "--recovery-key-file", str(rk2), crash_at=step)
    assert res.code == -9, (res.code, res.err)
    assert status_of(box)["journal"]["op"] == "rotate-recovery"
    # Never neither: the old recovery key or the new one opens the container.
    opened = 0
    for rk in (box.rk, rk2):
        chain.lock(box.container)
        if rk.exists() and cli(box, "recover", "--recovery-key-file", str(rk)).code == 0:
            opened += 1
            assert work_key(box) == key
    assert opened >= 1
    # The passphrase keeps working through the whole rotation.
    assert unlock_with(box, box.pw)
    res = cli(box, "repair", "--json")
    assert res.code == 0, res.err
    forward = res.json()["action"] == "completed"
    assert forward == (RECOVERY_STEPS.index(step) >= RECOVERY_STEPS.index("key-delivered"))
    assert_clean(box, [0, 2] if forward else [0, 1])
    assert rk2.exists() == forward
    chain.lock(box.container)
    assert cli(box, "recover", "--recovery-key-file", str(rk2 if forward else box.rk)).code == 0
    assert work_key(box) == key
    assert unlock_with(box, box.pw)


def test_domain_rotate_and_commit(box: Box) -> None:
    key = prepare(box)
    res = box.cli("domain", "rotate", "work", "--uuid", U1, "--json")
    assert res.code == 0, res.err
    doc = res.json()["rotated"]
    assert doc["previous_kept"] is True and doc["generation"] == 2
    assert "key" not in json.dumps(doc).replace("key_id", "").replace("previous_kept", "")
    new = work_key(box)
    assert new != key
    assert box.cli("domain", "rotate", "work", "--uuid", U1).code == 2  # commit first
    res = box.cli("domain", "rotate", "work", "--uuid", U1, "--commit", "--json")
    assert res.code == 0, res.err
    assert res.json()["rotated"]["previous_kept"] is False
    assert unlock_with(box, box.pw)
    assert work_key(box) == new


def test_repair_without_journal(box: Box) -> None:
    res = cli(box, "repair")
    assert res.code == 0
    assert "nothing to repair" in res.out
