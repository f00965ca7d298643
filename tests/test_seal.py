"""Sealing to the DRTM PCRs and unsealing, on a real software TPM (swtpm)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from cli_util import run

from qubes_seal import policy, state
from qubes_seal.errors import MeasurementMismatch, NoMeasuredLaunch, SRKMismatch
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import Module, Platform, sample_modules, txt_launch
from qubes_seal.tpm.device import SRK_HANDLE, Tpm
from qubes_seal.tpm.seal import seal_new_secret
from qubes_seal.tpm.unseal import unseal

pytestmark = pytest.mark.swtpm


def replace(modules: list[Module], index: int, **changes: bytes) -> list[Module]:
    out = list(modules)
    m = out[index]
    out[index] = Module(m.name, changes.get("cmdline", m.cmdline), changes.get("image", m.image))
    return out


def test_policy_digest_offline_equals_tpm_trial_session(swtpm: Swtpm) -> None:
    txt_launch(swtpm, sample_modules())
    with Tpm(swtpm.tcti) as tpm:
        for pcrs in ([17, 18], [17], [0, 7, 17, 18, 23], [13, 17, 18]):
            values = tpm.read_pcrs(pcrs)
            assert policy.policy_pcr(values, pcrs) == tpm.trial_policy_pcr(pcrs)


def test_launch_matches_model_and_unseal_after_reboot(swtpm: Swtpm, tmp_path: Path) -> None:
    modules = sample_modules()
    result = txt_launch(swtpm, modules)
    with Tpm(swtpm.tcti) as tpm:
        assert tpm.read_pcrs(range(17, 23)) == result.expected
        sealed, secret = seal_new_secret(tpm)
    swtpm.reboot()
    txt_launch(swtpm, modules)
    got = unseal(sealed, tcti=swtpm.tcti)
    assert got == secret


@pytest.mark.parametrize(
    ("index", "field", "pcr"),
    [
        (0, "image", 17),  # Xen
        (0, "cmdline", 17),
        (1, "image", 17),  # dom0 kernel
        (1, "cmdline", 17),
        (2, "image", 17),  # initramfs
        (2, "cmdline", 17),
    ],
)
def test_changed_component_is_refused_naming_the_pcr(
    swtpm: Swtpm, tmp_path: Path, index: int, field: str, pcr: int
) -> None:
    modules = sample_modules()
    txt_launch(swtpm, modules)
    assert run(swtpm.tcti, tmp_path, "seal").code == 0
    swtpm.reboot()
    m = modules[index]
    tampered = replace(modules, index, **{field: getattr(m, field) + b" evil"})
    txt_launch(swtpm, tampered)
    res = run(swtpm.tcti, tmp_path, "unseal", "--check")
    assert res.code == 3, res.err
    assert f"PCR {pcr}" in res.err
    assert "measurements do not match" in res.err


def test_changed_sinit_changes_both_drtm_pcrs(swtpm: Swtpm, tmp_path: Path) -> None:
    txt_launch(swtpm, sample_modules())
    with Tpm(swtpm.tcti) as tpm:
        sealed, _ = seal_new_secret(tpm)
    swtpm.reboot()
    txt_launch(swtpm, sample_modules(), platform=Platform(sinit_pubkey=b"another key"))
    with pytest.raises(MeasurementMismatch) as info:
        unseal(sealed, tcti=swtpm.tcti)
    assert [d[0] for d in info.value.diffs] == [18]


def test_no_measured_launch_is_refused(swtpm: Swtpm, tmp_path: Path) -> None:
    txt_launch(swtpm, sample_modules())
    assert run(swtpm.tcti, tmp_path, "seal").code == 0
    swtpm.reboot()  # no launch this time: PCR 17 stays all 0xFF
    res = run(swtpm.tcti, tmp_path, "unseal", "--check")
    assert res.code == 3
    assert "no TXT measured launch" in res.err
    with pytest.raises(NoMeasuredLaunch):
        unseal(state.load(tmp_path), tcti=swtpm.tcti)


def test_seal_refuses_without_measured_launch(swtpm: Swtpm, tmp_path: Path) -> None:
    res = run(swtpm.tcti, tmp_path, "seal")
    assert res.code == 3
    assert "no TXT measured launch" in res.err
    assert not (tmp_path / "sealed.json").exists()
    res = run(swtpm.tcti, tmp_path, "seal", "--unsafe-no-measured-launch", "--pcrs", "16,23")
    assert res.code == 0, res.err
    assert "unsafe" in res.out
    assert run(swtpm.tcti, tmp_path, "unseal", "--check").code == 0


def test_replaced_srk_is_refused(swtpm: Swtpm, tmp_path: Path) -> None:
    txt_launch(swtpm, sample_modules())
    with Tpm(swtpm.tcti) as tpm:
        sealed, _ = seal_new_secret(tpm)
        # An attacker (or a TPM clear) puts another key at the SRK handle.
        from tpm2_pytss import ESYS_TR

        persistent = tpm.esys.tr_from_tpmpublic(SRK_HANDLE)
        tpm.esys.evict_control(ESYS_TR.OWNER, persistent, SRK_HANDLE)
        template = Tpm.srk_template()
        template.publicArea.unique.ecc.x = b"\x01" * 32  # a different primary key
        other, *_ = tpm.esys.create_primary(None, template, ESYS_TR.OWNER)
        tpm.esys.evict_control(ESYS_TR.OWNER, other, SRK_HANDLE)
        tpm.esys.flush_context(other)
    with pytest.raises(SRKMismatch):
        unseal(sealed, tcti=swtpm.tcti)
    state.save(sealed, tmp_path)
    res = run(swtpm.tcti, tmp_path, "unseal", "--check")
    assert res.code == 7
    assert "storage root key" in res.err


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: b"{not json",
        lambda d: d.replace(b'"version": 1', b'"version": 99'),
        lambda d: d.replace(b'"private": "', b'"private": "AAAA'),
        lambda d: d[: len(d) // 2],
        lambda d: b"",
    ],
)
def test_corrupted_state_exits_7(swtpm: Swtpm, tmp_path: Path, damage: object) -> None:
    txt_launch(swtpm, sample_modules())
    assert run(swtpm.tcti, tmp_path, "seal").code == 0
    path = tmp_path / "sealed.json"
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    res = run(swtpm.tcti, tmp_path, "unseal", "--check")
    assert res.code == 7, res.err


def test_state_file_modes_and_format(swtpm: Swtpm, tmp_path: Path) -> None:
    txt_launch(swtpm, sample_modules())
    sdir = tmp_path / "state"
    res = run(swtpm.tcti, sdir, "seal", "--json")
    assert res.code == 0, res.err
    assert stat.S_IMODE(os.stat(sdir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(sdir / "sealed.json").st_mode) == 0o600
    doc = json.loads((sdir / "sealed.json").read_text())
    assert doc["format"] == "qubes-seal/sealed-state"
    assert doc["version"] == 1
    assert doc["pcrs"] == [17, 18]
    assert sorted(doc["pcr_states"][0]["values"]) == ["17", "18"]
    # Sealing again without --force keeps the existing secret.
    before = (sdir / "sealed.json").read_bytes()
    assert run(swtpm.tcti, sdir, "seal").code == 2
    assert (sdir / "sealed.json").read_bytes() == before


def test_tpm_not_running_exits_6(tmp_path: Path) -> None:
    from qubes_seal.sim.swtpm import free_port_pair

    port = free_port_pair()
    tcti = f"swtpm:host=127.0.0.1,port={port}"
    for args in (["status"], ["pcrs"], ["seal"]):
        res = run(tcti, tmp_path, *args)
        assert res.code == 6, (args, res.err)
        assert tcti in res.err
    res = run("device:/dev/nonexistent-tpm", tmp_path, "pcrs")
    assert res.code == 6
    assert "/dev/nonexistent-tpm" in res.err


def test_status_and_pcrs_json(swtpm: Swtpm, tmp_path: Path) -> None:
    res = run(swtpm.tcti, tmp_path, "status", "--json")
    assert res.code == 0, res.err
    doc = res.json()
    assert doc["measured_launch"] is False
    assert doc["sealed"] is None
    txt_launch(swtpm, sample_modules())
    assert run(swtpm.tcti, tmp_path, "seal").code == 0
    doc = run(swtpm.tcti, tmp_path, "status", "--json").json()
    assert doc["measured_launch"] is True
    assert doc["sealed"]["srk_pinned_matches"] is True
    assert doc["sealed"]["unseal_expected_to_succeed"] is True
    assert [r["match"] for r in doc["sealed"]["pcrs"]] == [True, True]
    pcrs = run(swtpm.tcti, tmp_path, "pcrs", "--pcrs", "17,18", "--json").json()
    assert set(pcrs["pcrs"]["sha256"]) == {"17", "18"}


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    tcti = "swtpm:host=127.0.0.1,port=1"
    assert run(tcti, tmp_path, "seal", "--pcrs", "17,99").code == 2
    assert run(tcti, tmp_path, "seal", "--pcrs", "").code == 2
    assert run(tcti, tmp_path, "nonsense").code == 2
    assert run(tcti, tmp_path, "unseal").code == 2
    res = run(tcti, tmp_path, "status", env={"QUBES_SEAL_JSON": "maybe"})
    assert res.code == 2
    assert "QUBES_SEAL_JSON" in res.err


def test_lazy_parser_knows_every_command() -> None:
    """The CLI builds only the running command's parser: its table must list them all."""
    from qubes_seal.cli import main as cli_main

    full = cli_main.build_parser()
    names = set(full._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert names == set(cli_main.ALL_COMMANDS)
    for name in names:
        assert cli_main.build_parser(only=name).format_usage()
    assert cli_main.command_in(["--tpm", "x", "--state-dir=/s", "unseal", "--check"]) == "unseal"
    assert cli_main.command_in(["--help"]) is None
