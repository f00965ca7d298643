"""``init`` is journalled: a crash at any step boundary is rolled back by ``repair``.

An init is complete only when its recovery key was delivered (shown, or written to its
file).  Before that, ``repair`` removes what the init made: the container file, its
rollback counter (an NV index), the half-delivered key file.  Then ``init`` runs again.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from machine import CHEAP_KDF, PASSPHRASE, Box
from test_rotate import cli, status_of

from qubes_seal import chain
from qubes_seal.luks.container import Container
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import sample_modules, txt_launch
from qubes_seal.tpm.device import NV_COUNTER_BASE, NV_COUNTER_SLOTS, Tpm

STEPS = ["begun", "formatted", "counter-defined", "token-written", "settled", "key-delivered"]


def our_counters(swtpm: Swtpm) -> list[int]:
    with Tpm(swtpm.tcti) as tpm:
        return [
            h
            for h in range(NV_COUNTER_BASE, NV_COUNTER_BASE + NV_COUNTER_SLOTS)
            if tpm.handle_defined(h) and tpm.is_our_counter(h)
        ]


def init(b: Box, crash_at: str | None = None) -> object:
    return cli(b, "init", *CHEAP_KDF, "--recovery-key-file", str(b.rk), "--passphrase-file",
               str(b.pw), crash_at=crash_at)  # fmt: skip


@pytest.mark.parametrize("step", STEPS)
def test_crash_during_init_is_rolled_back_and_init_runs_again(
    swtpm: Swtpm, tmp_path: Path, step: str
) -> None:
    b = Box(swtpm, tmp_path)
    b.pw.write_text(PASSPHRASE + "\n")
    txt_launch(swtpm, sample_modules())
    res = init(b, crash_at=step)
    assert res.code != 0  # type: ignore[attr-defined]
    status = status_of(b)
    assert status["journal"]["op"] == "init"
    assert status["journal"]["step"] == (step if step != "key-delivered" else "settled")
    res = b.cli("repair", "--json")
    assert res.code == 0, res.err
    assert res.json()["action"] == "rolled back"
    assert not b.container.exists()
    assert not b.rk.exists()
    assert our_counters(swtpm) == []  # no stale NV index left behind
    assert status_of(b)["journal"] is None
    # A new init, as if nothing happened.
    res = init(b)
    assert res.code == 0, res.err  # type: ignore[attr-defined]
    assert len(our_counters(swtpm)) == 1
    b.boot()
    assert b.unlock().code == 0
    chain.lock(b.container)


def test_a_clean_failure_leaves_no_journal_and_no_counter(swtpm: Swtpm, tmp_path: Path) -> None:
    b = Box(swtpm, tmp_path)
    b.pw.write_text(PASSPHRASE + "\n")
    txt_launch(swtpm, sample_modules())
    b.container.mkdir()  # formatting a directory fails after the journal began
    res = cli(b, "init", *CHEAP_KDF, "--force", "--passphrase-file", str(b.pw))
    assert res.code != 0
    assert "Traceback" not in res.err
    assert status_of(b)["journal"] is None
    assert our_counters(swtpm) == []
    assert b.container.is_dir()  # what existed before is never removed


def test_init_force_removes_the_replaced_containers_counter(swtpm: Swtpm, tmp_path: Path) -> None:
    b = Box(swtpm, tmp_path)
    b.pw.write_text(PASSPHRASE + "\n")
    txt_launch(swtpm, sample_modules())
    assert init(b).code == 0  # type: ignore[attr-defined]
    first = our_counters(swtpm)
    b.rk.unlink()
    res = cli(b, "init", *CHEAP_KDF, "--force", "--recovery-key-file", str(b.rk),
              "--passphrase-file", str(b.pw))  # fmt: skip
    assert res.code == 0, res.err
    now = our_counters(swtpm)
    assert len(now) == 1
    sealed = chain.read_token(Container(b.container))[1].sealed
    assert sealed.nv is not None and now == [sealed.nv.handle]
    assert len(first) == 1


@pytest.mark.parametrize("step", STEPS[:-1])
def test_tpm_power_cut_during_init(swtpm: Swtpm, tmp_path: Path, step: str) -> None:
    """The TPM alone loses power as soon as the journal reaches ``step``; the command meets a
    dead TPM (no traceback); after power-on, ``repair`` (or the command's own undo) leaves
    nothing behind, or the init completed and its recovery key was delivered."""
    from test_lifecycle import cut_tpm_at

    b = Box(swtpm, tmp_path)
    b.pw.write_text(PASSPHRASE + "\n")
    txt_launch(swtpm, sample_modules())
    args = ["init", *CHEAP_KDF, "--recovery-key-file", str(b.rk), "--passphrase-file", str(b.pw)]
    cut_tpm_at(b, args, step, STEPS[:-1])
    if not swtpm.running:  # power on again, on the saved state
        swtpm.start()
    if status_of(b)["journal"] is not None:
        res = b.cli("repair", "--json")
        assert res.code == 0, res.err
    if b.rk.exists():  # it completed before the cut reached it: a working container
        b.boot()
        assert b.unlock().code == 0
        chain.lock(b.container)
        return
    assert not b.container.exists()
    assert our_counters(swtpm) == []
    txt_launch(swtpm, sample_modules())
    res = init(b)
    assert res.code == 0, res.err  # type: ignore[attr-defined]
