"""``qubes-seal eventlog show|replay|verify``, run as a user runs it: a real subprocess.

The real logs of ../shared/testdata are the outside world's answer: ``replay --json`` must give
the PCRs tpm2_eventlog printed for them (their ``.bin.yaml``).  ``verify`` runs against a
swtpm after a simulated TXT launch, with the TXT log that launch wrote.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cli_util import run
from test_eventlog import ALL_REAL_LOGS, TPM2_TOOLS_LOGS, data_file, read_yaml_pcrs

from qubes_seal.errors import EXIT_CORRUPT, EXIT_MEASUREMENT, EXIT_USAGE
from qubes_seal.measure import eventlog as el
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import sample_modules, txt_launch
from qubes_seal.tpm.device import Tpm

NO_TPM = "swtpm:host=127.0.0.1,port=1"  # never opened by show/replay


def hexed(values: dict[str, dict[int, bytes]]) -> dict[str, dict[str, str]]:
    return {b: {str(p): v.hex() for p, v in pcrs.items()} for b, pcrs in values.items() if pcrs}


@pytest.mark.parametrize("name", TPM2_TOOLS_LOGS)
def test_replay_json_matches_tpm2_eventlog_yaml(name: str, tmp_path: Path) -> None:
    path = data_file(f"tpm2-tools/{name}.bin")
    expected = read_yaml_pcrs(data_file(f"tpm2-tools/{name}.bin.yaml"))
    result = run(NO_TPM, tmp_path, "eventlog", "replay", "--json", str(path))
    assert result.code == 0, result.err
    doc = result.json()
    assert doc["pcrs"] == hexed(expected)
    assert doc["log"]["path"] == str(path)
    assert doc["log"]["kind"] == "firmware"
    assert doc["log"]["drtm"] is False


def test_replay_json_shape(tmp_path: Path) -> None:
    """Bank name -> decimal PCR index string -> lowercase hex, every bank of the log."""
    path = data_file("tpm2-tss/binary_measurements_hcrtm.bin")
    doc = run(NO_TPM, tmp_path, "eventlog", "replay", "--json", str(path)).json()
    assert sorted(doc["pcrs"]) == ["sha1", "sha256", "sm3_256"]
    for bank, pcrs in doc["pcrs"].items():
        size = {"sha1": 20, "sha256": 32, "sm3_256": 32}[bank]
        for index, value in pcrs.items():
            assert index == str(int(index)) and 0 <= int(index) <= 23
            assert value == value.lower() and len(bytes.fromhex(value)) == size
    # tpm2-tss test/unit/fapi-eventlog.c: the value read from the system.
    assert doc["pcrs"]["sha1"]["0"] == "15f4e6ca457d1af6bc49511a93ba3500ad69acc5"


def test_replay_text_names_the_log(tmp_path: Path) -> None:
    path = data_file("keylime/binary_bios_measurements")
    result = run(NO_TPM, tmp_path, "eventlog", "replay", str(path))
    assert result.code == 0, result.err
    assert f"firmware (SRTM) event log {path}" in result.out
    assert "PCR  0: " in result.out


@pytest.mark.parametrize("name", ALL_REAL_LOGS)
def test_show_reads_every_real_log(name: str, tmp_path: Path) -> None:
    path = data_file(name)
    log = el.parse(path.read_bytes())
    result = run(NO_TPM, tmp_path, "eventlog", "show", str(path))
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert str(path) in lines[0]
    events = [line for line in lines if line.lstrip()[:1].isdigit()]
    assert len(events) == len(log.events)
    assert all(
        f"PCR {e.pcr:>2}  {e.type_name}" in line for e, line in zip(log.events, events, strict=True)
    )

    doc = run(NO_TPM, tmp_path, "eventlog", "show", "--json", str(path)).json()
    assert len(doc["events"]) == len(log.events)
    for got, event in zip(doc["events"], log.events, strict=True):
        assert got["pcr"] == event.pcr
        assert got["type_name"] == event.type_name
        assert got["digests"] == {b: d.hex() for b, d in event.digests.items()}
        assert bytes.fromhex(got["data"]) == event.data


def test_show_prints_readable_event_data(tmp_path: Path) -> None:
    path = data_file("tpm2-tools/event-sd-boot-fedora37.bin")
    out = run(NO_TPM, tmp_path, "eventlog", "show", str(path)).out
    assert "'Calling EFI Application from Boot Option'" in out


# --- TXT log against a TPM ------------------------------------------------------------------


@pytest.fixture
def launched(swtpm: Swtpm, tmp_path: Path) -> Path:
    """A swtpm after a simulated TXT launch; returns the TXT event log it wrote."""
    log_path = tmp_path / "txt-event-log.bin"
    txt_launch(swtpm, sample_modules(), log_path=log_path)
    return log_path


def test_txt_replay_starts_drtm_pcrs_at_zero(launched: Path, tmp_path: Path) -> None:
    doc = run(NO_TPM, tmp_path, "eventlog", "replay", "--json", "--txt", str(launched)).json()
    assert doc["log"]["kind"] == "txt" and doc["log"]["drtm"] is True
    expected = el.replay(el.parse(launched.read_bytes()), drtm=True)
    assert doc["pcrs"] == hexed(expected)
    assert sorted(doc["pcrs"]["sha256"]) == ["17", "18"]
    # The same file read as a firmware log starts PCR 17 at 0xFF: a different value.
    fw = run(NO_TPM, tmp_path, "eventlog", "replay", "--json", str(launched)).json()
    assert fw["pcrs"]["sha256"]["17"] != doc["pcrs"]["sha256"]["17"]


def test_verify_txt_log_agrees_with_the_tpm(swtpm: Swtpm, launched: Path, tmp_path: Path) -> None:
    result = run(swtpm.tcti, tmp_path, "eventlog", "verify", "--txt", str(launched))
    assert result.code == 0, result.err
    assert f"TXT event log {launched}" in result.out
    assert "all 2 PCRs agree" in result.out

    doc = run(swtpm.tcti, tmp_path, "eventlog", "verify", "--json", "--txt", str(launched)).json()
    assert doc["agree"] is True
    assert [(c["bank"], c["pcr"], c["agree"]) for c in doc["checks"]] == [
        ("sha256", 17, True),
        ("sha256", 18, True),
    ]


def test_verify_after_an_unlogged_extend_names_pcr_17(
    swtpm: Swtpm, launched: Path, tmp_path: Path
) -> None:
    # Open the TPM first: a new swtpm TCTI resets the locality to 0.
    with Tpm(swtpm.tcti) as tpm, swtpm.at_locality(2):
        tpm.extend_pcr(17, hashlib.sha256(b"unlogged").digest())
    result = run(swtpm.tcti, tmp_path, "eventlog", "verify", "--txt", str(launched))
    assert result.code == EXIT_MEASUREMENT, result.err
    assert "sha256 PCR 17" in result.err
    assert "PCR 18" not in result.err
    assert "DIFFER" in result.out

    doc = run(swtpm.tcti, tmp_path, "eventlog", "verify", "--json", "--txt", str(launched))
    assert doc.code == EXIT_MEASUREMENT
    checks = {c["pcr"]: c["agree"] for c in doc.json()["checks"]}
    assert checks == {17: False, 18: True}


def test_verify_without_a_launch_differs(swtpm: Swtpm, launched: Path, tmp_path: Path) -> None:
    swtpm.reboot()  # PCR 17-22 back to 0xFF: the log no longer describes this boot
    result = run(swtpm.tcti, tmp_path, "eventlog", "verify", "--txt", str(launched))
    assert result.code == EXIT_MEASUREMENT, result.err
    assert "sha256 PCR 17, sha256 PCR 18" in result.err


def test_verify_bank_the_tpm_cannot_check(swtpm: Swtpm, launched: Path, tmp_path: Path) -> None:
    result = run(swtpm.tcti, tmp_path, "eventlog", "verify", "--bank", "sha1", "--txt",
                 str(launched))  # fmt: skip
    assert result.code == EXIT_USAGE
    assert "sha1" in result.err


# --- Errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["show", "replay", "verify"])
def test_missing_file_is_a_usage_error(action: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such.log"
    result = run(NO_TPM, tmp_path, "eventlog", action, str(missing))
    assert result.code == EXIT_USAGE
    assert f"no such event log: {missing}" in result.err
    result = run(NO_TPM, tmp_path, "eventlog", action, "--txt", str(missing))
    assert result.code == EXIT_USAGE
    assert f"no such TXT event log: {missing}" in result.err


@pytest.mark.parametrize("action", ["show", "replay", "verify"])
def test_garbage_file_is_a_corrupt_log(action: str, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x07" * 40 + b"not an event log" * 8)
    result = run(NO_TPM, tmp_path, "eventlog", action, str(garbage))
    assert result.code == EXIT_CORRUPT
    assert str(garbage) in result.err and "corrupt at byte offset" in result.err


def test_empty_file_is_a_corrupt_log(tmp_path: Path) -> None:
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    result = run(NO_TPM, tmp_path, "eventlog", "replay", "--txt", str(empty))
    assert result.code == EXIT_CORRUPT
    assert "empty" in result.err


def test_file_and_txt_together_is_a_usage_error(tmp_path: Path) -> None:
    path = str(data_file("tpm2-tools/event-sd-boot-fedora37.bin"))
    result = run(NO_TPM, tmp_path, "eventlog", "replay", path, "--txt", path)
    assert result.code == EXIT_USAGE


def test_default_firmware_log_missing_explains_why(tmp_path: Path) -> None:
    from qubes_seal.cli.eventlog_cmd import FIRMWARE_LOG

    if Path(FIRMWARE_LOG).exists():
        pytest.skip(f"{FIRMWARE_LOG} exists on this machine")
    result = run(NO_TPM, tmp_path, "eventlog", "show")
    assert result.code != 0
    assert FIRMWARE_LOG in result.err and "securityfs" in result.err
