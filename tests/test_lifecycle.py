"""The life of a machine on swtpm: boots, updates, rotations, power cuts, lockout.

One machine (a swtpm, a state dir, a container) goes through init, ten boots, a Xen update
and a kernel update (each predicted, resealed, rebooted into, unlocked, resealed), a
passphrase change, a master and a recovery rotation and domain rotations; after each step
the domain keys, read through this boot's hand-over, are unchanged except the rotated one.

Power cuts: every rotation is cut at every step boundary twice over: (1) the process dies
at the boundary (the QUBES_SEAL_CRASH_AT hook) and the TPM loses power with it
(``Swtpm.kill()``); (2) the TPM alone loses power (``Swtpm.kill()``) as soon as the
journal reaches the step, while the command runs on and meets a dead TPM.  A domain rotation
(one keystore write, not journaled) is cut by killing the process and the TPM after a delay.
After each cut: the TPM is powered on again on the same state (``Swtpm.start()``), the
kernel keyring's hand-over is dropped (RAM is lost too), the old or the new credentials
unlock (never neither), no domain key is lost, ``repair`` leaves a clean container, and the
credentials it kept unlock.

Updates are signatures (signed policies): the sealed object stays the same through both
updates.  At the end, a revoked boot state (a signed prediction withdrawn with ``revoke``) and
rollback attempts (a copy of the whole container taken before the master rotation: its old
token, old sealed blob, old signatures and old keystore) are refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_util import run
from machine import PASSPHRASE, U1, U2, Box, initialised
from test_predict import write_components
from test_rotate import (
    NEW_PASSPHRASE,
    RECOVERY_STEPS,
    TPM_STEPS,
    cli,
    new_pw,
    prepare,
    rotate_args,
    status_of,
    work_key,
)
from test_rotate import unlock_with as opens

from qubes_seal import chain, journal
from qubes_seal.luks.container import Container
from qubes_seal.sim.swtpm import Swtpm, configure_da
from qubes_seal.sim.txt_launch import sample_modules, txt_launch

pytestmark = pytest.mark.slow

#: Reported: the power-cut points the tests below exercise (each step boundary of each
#: rotation, cut in two ways, plus the timed cuts of a domain rotation).
DOMAIN_CUT_DELAYS = [0.05, 0.15, 0.3, 0.6]
POWER_CUT_POINTS = 2 * (2 * len(TPM_STEPS) + len(RECOVERY_STEPS)) + len(DOMAIN_CUT_DELAYS)


@pytest.fixture
def machine(swtpm: Swtpm, tmp_path: Path) -> Iterator[Box]:
    """A machine initialised on swtpm with a cheap KDF, the work and personal qubes' keys.

    swtpm allows 3 failed authorizations by default.  A power cut alone is not counted
    (measured in tests/test_auth.py), but a cut in the middle of a DA-protected authorization
    might be (TPM 2.0 part 1, non-orderly shutdown): the limit is raised as a precaution, so
    that a lockout never hides what a power cut did.
    """
    configure_da(swtpm.tcti, max_tries=1000, recovery_time=1000, lockout_recovery=1000)
    b = initialised(swtpm, tmp_path)
    yield b
    if b.container.exists():
        chain.lock(b.container)  # leave no hand-over in root's keyring


def keys(b: Box) -> dict[str, str]:
    """The domain keys (hex), through this boot's hand-over."""
    out = {}
    for name, uuid in (("work", U1), ("personal", U2)):
        res = b.cli("domain", "show", name, "--uuid", uuid, "--show-key", "--json")
        assert res.code == 0, res.err
        out[name] = str(res.json()["key"])
    return out


def boot(b: Box, log: Path, **changes: str) -> None:
    chain.lock(b.container)
    b.swtpm.reboot()
    txt_launch(b.swtpm, sample_modules(**changes), log_path=log)


def sealed_object(b: Box) -> tuple[bytes, bytes]:
    sealed = chain.read_token(Container(b.container))[1].sealed
    assert sealed.signed is not None
    return sealed.public, sealed.private


def update(b: Box, log: Path, before: dict[str, str], after: dict[str, str],
           expect: dict[str, str]) -> None:  # fmt: skip
    """Predict, reseal --predict, reboot into the update, unlock, reseal (this boot only)."""
    comps = write_components(sample_modules(**after), b.dir / "update")
    res = run(b.swtpm.tcti, b.dir / "state", "predict", "--txt-log", str(log), *comps, "--json")
    assert res.code == 0, res.err
    obj = sealed_object(b)
    res = b.cli("reseal", "--predict", "--txt-log", str(log), *comps)
    assert res.code == 0, res.err
    assert sealed_object(b) == obj  # a signature, not a new sealed object
    boot(b, log, **after)
    assert b.unlock().code == 0
    assert keys(b) == expect
    assert b.cli("reseal").code == 0
    # The old components are refused from now on.
    boot(b, log, **before)
    assert b.unlock().code == 3
    boot(b, log, **after)
    assert b.unlock().code == 0
    assert keys(b) == expect


def test_life_of_a_machine(machine: Box) -> None:
    b = machine
    log = b.dir / "txt.log"
    boot(b, log)
    assert b.unlock().code == 0
    assert b.cli("domain", "add", "work", "--uuid", U1).code == 0
    assert b.cli("domain", "add", "personal", "--uuid", U2).code == 0
    expect = keys(b)
    for _ in range(10):
        boot(b, log)
        res = b.unlock()
        assert res.code == 0, res.err
        assert keys(b) == expect
    xen = {"xen_version": "4.19.1"}
    update(b, log, {}, xen, expect)
    both = {**xen, "kernel_version": "6.12.9-1.qubes"}
    update(b, log, xen, both, expect)
    before_rotations = b.container.read_bytes()

    # A passphrase change: the old one is refused from the next boot on.
    res = b.cli("rotate", "passphrase", "--passphrase-file", str(b.pw),
                "--new-passphrase-file", str(new_pw(b)))  # fmt: skip
    assert res.code == 0, res.err
    assert keys(b) == expect
    boot(b, log, **both)
    assert b.unlock().code == 4
    boot(b, log, **both)
    assert b.unlock(pw=new_pw(b)).code == 0
    assert keys(b) == expect
    b.pw.write_text(NEW_PASSPHRASE + "\n")

    for what in ("master", "recovery"):
        extra = ["--recovery-key-file", str(b.dir / "rk2")] if what == "recovery" else []
        res = b.cli("rotate", what, *extra, pw=b.pw)
        assert res.code == 0, res.err
        assert keys(b) == expect
        boot(b, log, **both)
        assert b.unlock().code == 0
        assert keys(b) == expect
    chain.lock(b.container)
    assert b.cli("recover", "--recovery-key-file", str(b.rk)).code != 0
    assert b.cli("recover", "--recovery-key-file", str(b.dir / "rk2")).code == 0
    assert keys(b) == expect

    # Domain rotations: only the rotated domain's key changes, at the rotation.
    for name, uuid in (("work", U1), ("personal", U2)):
        assert b.cli("domain", "rotate", name, "--uuid", uuid).code == 0
        now = keys(b)
        assert now[name] != expect[name]
        assert {k: v for k, v in now.items() if k != name} == {
            k: v for k, v in expect.items() if k != name
        }
        expect = now
        assert b.cli("domain", "rotate", name, "--uuid", uuid, "--commit").code == 0
        assert keys(b) == expect
        boot(b, log, **both)
        assert b.unlock().code == 0
        assert keys(b) == expect

    # A revoked boot state: an update signed, then withdrawn before the reboot.
    bad = {**both, "kernel_version": "6.12.10-withdrawn"}
    comps = write_components(sample_modules(**bad), b.dir / "withdrawn")
    assert b.cli("reseal", "--predict", "--txt-log", str(log), *comps).code == 0
    withdrawn_copy = b.container.read_bytes()
    assert b.cli("revoke").code == 0
    boot(b, log, **bad)
    assert b.unlock().code == 3  # no longer signed
    # Rollback attempts: the copy that still signed it, and a copy from before the rotations
    # (old token, old sealed blob, old signatures, old keystore): the counter refuses both.
    current = b.container.read_bytes()
    first_pw = b.dir / "first-passphrase"
    first_pw.write_text(PASSPHRASE + "\n")  # the passphrase of the copy before the rotations
    for old_copy, kwargs, pw in ((withdrawn_copy, bad, b.pw), (before_rotations, both, first_pw)):
        chain.lock(b.container)
        b.container.write_bytes(old_copy)
        boot(b, log, **kwargs)
        res = b.unlock(pw=pw)
        assert res.code == 3, res.err
        assert "rollback refused" in res.err
    chain.lock(b.container)
    b.container.write_bytes(current)
    boot(b, log, **both)
    assert b.unlock().code == 0
    assert keys(b) == expect
    assert status_of(b)["journal"] is None


# -- power cuts ------------------------------------------------------------------------------


def power_on(b: Box) -> None:
    """After a power cut: the TPM starts on its saved state; RAM (the keyring) is lost."""
    if not b.swtpm.running:
        b.swtpm.start()
    chain.lock(b.container)


def repaired(b: Box) -> chain.Token:
    """``repair`` after a cut: no journal left, exactly the token's two keyslots."""
    res = cli(b, "repair", "--json")
    assert res.code == 0, res.err
    assert journal.read(b.dir / "state") is None
    container = Container(b.container)
    _, token = chain.read_token(container)
    assert container.slots() == sorted([token.tpm_keyslot, token.recovery_keyslot])
    return token


def cut_tpm_at(b: Box, args: list[str], step: str, steps: list[str]) -> None:
    """Run the command; kill swtpm as soon as the journal reaches ``step`` (or the command
    ends first); the command runs on against a dead TPM.  No traceback, whatever it meets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
    cmd = [sys.executable, "-m", "qubes_seal", "--tpm", b.swtpm.tcti, "--state-dir",
           str(b.dir / "state"), *args, "--container", str(b.container)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)  # fmt: skip
    target = steps.index(step)
    deadline = time.monotonic() + 60
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            doc = journal.read(b.dir / "state")
        except Exception:  # a record being replaced: read again
            doc = None
        if doc is not None and doc.get("step") in steps and steps.index(doc["step"]) >= target:
            break
        time.sleep(0.002)
    b.swtpm.kill()
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err


@pytest.mark.parametrize("how", ["crash-at", "tpm-killed"])
@pytest.mark.parametrize("what", ["passphrase", "master"])
@pytest.mark.parametrize("step", TPM_STEPS)
def test_power_cut_during_tpm_rotation(machine: Box, what: str, step: str, how: str) -> None:
    b = machine
    key = prepare(b)
    if how == "crash-at":
        assert cli(b, *rotate_args(what, b), crash_at=step).code == -9
        b.swtpm.kill()
    else:
        cut_tpm_at(b, rotate_args(what, b), step, TPM_STEPS)
    power_on(b)
    new = new_pw(b) if what == "passphrase" else b.pw
    assert opens(b, b.pw) or opens(b, new), f"neither credential unlocks ({how} at {step})"
    assert work_key(b) == key
    token = repaired(b)
    assert opens(b, new if token.tpm_keyslot == 2 else b.pw)
    assert work_key(b) == key


@pytest.mark.parametrize("how", ["crash-at", "tpm-killed"])
@pytest.mark.parametrize("step", RECOVERY_STEPS)
def test_power_cut_during_recovery_rotation(machine: Box, step: str, how: str) -> None:
    b = machine
    key = prepare(b)
    rk2 = b.dir / "rk2"
    args = ["rotate", "recovery", "--recovery-key-file", str(rk2)]
    if how == "crash-at":
        assert cli(b, *args, crash_at=step).code == -9
        b.swtpm.kill()
    else:
        cut_tpm_at(b, args, step, RECOVERY_STEPS)
    power_on(b)
    opened = 0
    for rk in (b.rk, rk2):
        chain.lock(b.container)
        if rk.exists() and cli(b, "recover", "--recovery-key-file", str(rk)).code == 0:
            opened += 1
            assert work_key(b) == key
    assert opened >= 1, f"neither recovery key opens ({how} at {step})"
    assert opens(b, b.pw)  # the passphrase keeps working through it all
    assert work_key(b) == key
    token = repaired(b)
    chain.lock(b.container)
    kept = rk2 if token.recovery_keyslot == 2 else b.rk
    assert cli(b, "recover", "--recovery-key-file", str(kept)).code == 0
    assert work_key(b) == key
    assert opens(b, b.pw)


@pytest.mark.parametrize("delay", DOMAIN_CUT_DELAYS)
def test_power_cut_during_domain_rotation(machine: Box, delay: float) -> None:
    b = machine
    key = prepare(b)
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "qubes_seal", "--tpm", b.swtpm.tcti, "--state-dir",
         str(b.dir / "state"), "domain", "rotate", "work", "--uuid", U1, "--container",
         str(b.container)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(delay)
    proc.kill()  # power cut: the process and the TPM stop together
    b.swtpm.kill()
    proc.wait()
    power_on(b)
    assert opens(b, b.pw)
    now = work_key(b)  # the old key (write lost) or the new one (previous kept): never none
    assert cli(b, "repair").code == 0  # an interrupted record (if any) first
    assert status_of(b)["journal"] is None
    if now != key:
        res = b.cli("domain", "rotate", "work", "--uuid", U1, "--commit")
        assert res.code == 0, res.err
    assert opens(b, b.pw)
    assert work_key(b) == now


# -- dictionary attack -----------------------------------------------------------------------


def test_status_shows_the_time_to_recovery(machine: Box) -> None:
    b = machine
    configure_da(b.swtpm.tcti, max_tries=3, recovery_time=7, lockout_recovery=20)
    b.boot()
    wrong = b.dir / "wrong"
    wrong.write_text("incorrect horse\n")
    da = status_of(b)["tpm"]["dictionary_attack"]
    assert (da["failed_tries"], da["max_tries"], da["in_lockout"]) == (0, 3, False)
    for _ in range(2):
        assert b.unlock(pw=wrong).code == 4
    res = run(b.swtpm.tcti, b.dir / "state", "status")
    assert "dictionary attack: 2/3 failed tries, recovery every 7 s" in res.out
    assert "one try forgiven every 7 s; all forgiven within about 14 s" in res.out
    assert "locked out" not in res.out
    da = status_of(b)["tpm"]["dictionary_attack"]
    assert da["failed_tries"] == 2
    assert da["all_forgiven_within_seconds"] == 14
    assert da["next_try_within_seconds"] == 0
    assert da["lockout_recovery_seconds"] == 20
    assert b.unlock(pw=wrong).code == 4
    da = status_of(b)["tpm"]["dictionary_attack"]
    assert da["in_lockout"] is True
    assert da["next_try_within_seconds"] == 7
    assert da["all_forgiven_within_seconds"] == 21
    res = run(b.swtpm.tcti, b.dir / "state", "status")
    assert "IN LOCKOUT" in res.out
    assert "locked out: next try possible within 7 s" in res.out
    assert b.unlock().code == 5  # the right passphrase waits too
    # One interval forgives one failure: the right passphrase then opens.
    time.sleep(8)
    assert status_of(b)["tpm"]["dictionary_attack"]["in_lockout"] is False
    assert b.unlock().code == 0


def test_power_cut_count() -> None:
    assert POWER_CUT_POINTS == 42
