"""``qubes-seal eventlog capture``: this boot's TXT event log, read from the TXT registers and
heap in a memory image addressed like /dev/mem.

* The harness's launch writes the machine's memory as SINIT and tboot leave it; the capture
  returns exactly the log the launch built, and its replay equals the swtpm's PCR 17/18.
* The real txt-stat dump of ../shared/testdata/real-drtm (a TPM 2.0 tboot launch) is the
  outside world's answer: the heap writer lays the tables where that machine had them, the
  log rebuilt from the dump's events has the size its pointer gave, and its replay gives the
  values the README computed.  The failed launches' error codes decode as tboot printed them.
* A hostile or garbage heap is refused with a clear error (exit 7), never a read outside
  the heap, a loop or a traceback; no launch is exit 3; unreadable memory exit 1.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from cli_util import run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qubes_seal.errors import EXIT_CORRUPT, EXIT_ERROR, EXIT_MEASUREMENT
from qubes_seal.measure import eventlog as el
from qubes_seal.measure import txt_heap
from qubes_seal.sim import txt_launch as tl
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.tpm.device import Tpm

NO_TPM = "swtpm:host=127.0.0.1,port=1"  # capture never opens the TPM
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "real-drtm"
DUMP = REAL / "tbootdevel_2021-08-26_skylake-0x506e3_tboot-1.10.2_tpm2-tcg-log_txt-stat.txt"

needs_real = pytest.mark.skipif(not DUMP.exists(), reason=f"no real-drtm test data at {REAL}")


def launch_events() -> list[el.Event]:
    return tl.launch_events(tl.Platform(), tl.sample_modules())


def capture_cli(tmp_path: Path, image: Path, *extra: str) -> tuple[int, str, str, Path]:
    out = tmp_path / "out" / "txt-event.log"
    out.parent.mkdir(exist_ok=True)
    r = run(NO_TPM, tmp_path, "eventlog", "capture", "--mem", str(image), "--out", str(out),
            *extra)  # fmt: skip
    return r.code, r.out, r.err, out


# --- The harness's launch, end to end ---------------------------------------------------------


def test_capture_of_the_launch_replays_to_the_swtpm_pcrs(swtpm: Swtpm, tmp_path: Path) -> None:
    image = tmp_path / "machine.img"
    result = tl.txt_launch(swtpm, tl.sample_modules(), image_path=image)
    code, out, err, log = capture_cli(tmp_path, image, "--json")
    assert code == 0, err
    assert log.read_bytes() == result.log
    doc = json.loads(out)
    assert doc["senter_done"] is True and doc["error_code"] == 0
    assert doc["log"]["format"] == "crypto-agile"
    assert doc["log"]["phys_addr"] == 0xB9F30176
    assert doc["log"]["size"] == len(result.log)
    assert doc["out"] == str(log)
    assert stat.S_IMODE(log.stat().st_mode) == 0o644
    # The captured file replays (eventlog replay --txt) to the TPM's PCR 17 and 18.
    replayed = run(NO_TPM, tmp_path, "eventlog", "replay", "--json", "--txt", str(log)).json()
    with Tpm(swtpm.tcti) as tpm:
        actual = tpm.read_pcrs([17, 18], bank="sha256")
    assert replayed["pcrs"]["sha256"]["17"] == actual[17].hex() == result.expected[17].hex()
    assert replayed["pcrs"]["sha256"]["18"] == actual[18].hex() == result.expected[18].hex()
    verify = run(swtpm.tcti, tmp_path, "eventlog", "verify", "--txt", str(log))
    assert verify.code == 0, verify.err


def test_the_txt_launch_command_writes_the_image(swtpm: Swtpm, tmp_path: Path) -> None:
    script = Path(__file__).resolve().parents[1] / "swtpm-fixtures" / "txt-launch"
    image = tmp_path / "machine.img"
    res = subprocess.run(
        [sys.executable, str(script), "--port", str(swtpm.port), "--sample", "--mem-image",
         str(image), "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    pcrs = json.loads(res.stdout)["pcrs"]["sha256"]
    code, _, err, log = capture_cli(tmp_path, image)
    assert code == 0, err
    replayed = run(NO_TPM, tmp_path, "eventlog", "replay", "--json", "--txt", str(log)).json()
    assert replayed["pcrs"]["sha256"] == pcrs


def test_txt_launch_without_image_is_unchanged(swtpm: Swtpm) -> None:
    result = tl.txt_launch(swtpm, tl.sample_modules())
    assert result.image is None
    assert result.log == el.write(result.events, ["sha256"])


def sha1_events() -> list[el.Event]:
    """A TPM 1.2 launch's events: SHA-1 digests of the sim's synthetic measurements."""
    return [
        el.Event(e.pcr, e.event_type, {"sha1": hashlib.sha1(e.digests["sha256"]).digest()}, e.data)
        for e in launch_events()
    ]


def two_bank_events() -> list[el.Event]:
    out = []
    for e in launch_events():
        digests = dict(e.digests)
        if e.event_type != el.EVTYPE_TB_MEASUREMENT:  # tboot extpol=sha256: SINIT logs both
            digests = {"sha1": hashlib.sha1(e.digests["sha256"]).digest(), **digests}
        out.append(el.Event(e.pcr, e.event_type, digests, e.data))
    return out


@pytest.mark.parametrize(
    ("layout", "events", "element", "fmt"),
    [
        (tl.LAYOUT_CRYPTO_AGILE, launch_events, 8, "crypto-agile"),
        (tl.LAYOUT_CRYPTO_AGILE, two_bank_events, 8, "crypto-agile"),
        (tl.LAYOUT_TPM2_LEGACY, launch_events, 7, "txt-tpm2-legacy"),
        (tl.LAYOUT_TPM2_LEGACY, two_bank_events, 7, "txt-tpm2-legacy"),
        (tl.LAYOUT_TPM12, sha1_events, 5, "txt-tpm12-container"),
    ],
)
def test_every_layout_captures_and_replays(tmp_path: Path, layout: str, events: object,
                                           element: int, fmt: str) -> None:  # fmt: skip
    evs = events()  # type: ignore[operator]
    image = tl.write_memory_image(tmp_path / "m.img", evs, layout=layout)
    code, out, err, log = capture_cli(tmp_path, image.path, "--json")
    assert code == 0, err
    assert log.read_bytes() == image.log
    doc = json.loads(out)
    assert doc["log"]["format"] == fmt
    assert doc["log"]["element_type"] == element
    # Whatever the layout, each bank replays to what the events imply.
    expected: dict[str, dict[int, bytes]] = {}
    for e in evs:
        for bank, digest in e.digests.items():
            pcrs = expected.setdefault(bank, {})
            old = pcrs.get(e.pcr, bytes(len(digest)))
            pcrs[e.pcr] = hashlib.new(bank, old + digest).digest()
    replayed = run(NO_TPM, tmp_path, "eventlog", "replay", "--json", "--txt", str(log)).json()
    assert replayed["pcrs"] == {
        b: {str(p): v.hex() for p, v in sorted(pcrs.items())} for b, pcrs in expected.items()
    }


def test_capture_text_output_and_existing_directory_left_alone(tmp_path: Path) -> None:
    image = tl.write_memory_image(tmp_path / "m.img", launch_events())
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    os.chmod(shared, 0o755)
    r = run(NO_TPM, tmp_path, "eventlog", "capture", "--mem", str(image.path), "--out",
            str(shared / "log"))  # fmt: skip
    assert r.code == 0, r.err
    assert "os_sinit_data @0xb9f3517e, size 0x88, version 7" in r.out
    assert "crypto-agile (element type 8) at 0xb9f30176" in r.out
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # a directory the user named
    assert (shared / "log").read_bytes() == image.log


def test_out_in_a_missing_directory_is_a_clear_error(tmp_path: Path) -> None:
    image = tl.write_memory_image(tmp_path / "m.img", launch_events())
    r = run(NO_TPM, tmp_path, "eventlog", "capture", "--mem", str(image.path), "--out",
            str(tmp_path / "missing" / "log"))  # fmt: skip
    assert r.code == EXIT_ERROR and "cannot write" in r.err


def test_help_teaches_what_dev_mem_needs(tmp_path: Path) -> None:
    r = run(NO_TPM, tmp_path, "eventlog", "capture", "--help")
    assert r.code == 0
    text = " ".join(r.out.split())
    for needed in ("root", "CAP_SYS_RAWIO", "lockdown", "CONFIG_STRICT_DEVMEM", "0xFED30000",
                   "exit 3", "replay --txt", "0644", "/run/qubes-seal/txt-event.log"):  # fmt: skip
        assert needed in text, needed


# --- The real machine -----------------------------------------------------------------------


def _dump_events(lines: list[str]) -> list[el.Event]:
    """The TCG events txt-stat printed (pcr_index, event_type, SHA1/SHA256, event_data)."""
    events: list[el.Event] = []
    current: dict[str, object] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if (m := re.search(r"pcr_index: (\d+)", line)) and "TCG Event:" in lines[i - 1]:
            current = {"pcr": int(m.group(1)), "digests": {}}
        elif current is not None and (m := re.search(r"event_type: (0x[0-9a-f]+)", line)):
            current["type"] = int(m.group(1), 16)
        elif current is not None and (m := re.match(r"TBOOT: (SHA1|SHA256): $", line)):
            digests = current["digests"]
            assert isinstance(digests, dict)
            digests[m.group(1).lower()] = bytes.fromhex(lines[i + 1].removeprefix("TBOOT: "))
            i += 1
        elif current is not None and (m := re.search(r"event_data: (\d+) bytes", line)):
            size, data = int(m.group(1)), b""
            while len(data) < size:
                i += 1
                data += bytes.fromhex(lines[i].strip())
            pcr, etype, digests = current["pcr"], current["type"], current["digests"]
            assert isinstance(pcr, int) and isinstance(etype, int) and isinstance(digests, dict)
            events.append(el.Event(pcr, etype, digests, data))
            current = None
        i += 1
    return events


def _dump() -> dict[str, object]:
    text = DUMP.read_text()
    lines = text.splitlines()
    regs = {}
    for name, key in [("STS", "sts"), ("ESTS", "ests"), ("E2STS", "e2sts"),
                      ("ERRORCODE", "errorcode"), ("DIDVID", "didvid"), ("FSBIF", "ver_fsbif"),
                      ("QPIIF", "ver_qpiif"), ("SINIT.BASE", "sinit_base"),
                      ("HEAP.BASE", "heap_base"), ("DPR", "dpr")]:  # fmt: skip
        m = re.search(rf"^\t{re.escape(name)}: (0x[0-9a-f]+)$", text, re.M)
        assert m, name
        regs[key] = int(m.group(1), 16)
    for name, key in [("SINIT.SIZE", "sinit_size"), ("HEAP.SIZE", "heap_size")]:
        m = re.search(rf"^\t{re.escape(name)}: \d+B \((0x[0-9a-f]+)\)$", text, re.M)
        assert m, name
        regs[key] = int(m.group(1), 16)
    launched = text.index("measured launch succeeded")
    tables = {
        m.group(1): (int(m.group(2), 16), int(m.group(3), 16))
        for m in re.finditer(
            r"TBOOT: (\w+_data) \(@(0x[0-9a-f]+), (0x[0-9a-f]+)\):", text[launched:]
        )
    }
    versions = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"TBOOT: (\w+_data) \(@.*\n.*version: (\d+)", text[launched:])
    }
    start = next(i for i, line in enumerate(lines) if "EventsOffset: [0,1510]" in line)
    end = next(i for i, line in enumerate(lines) if "sinit_mle_data (@" in line and i > start)
    vl = next(i for i, line in enumerate(lines) if "VL measurements" in line)
    phys = re.search(r"phys_addr = 0x([0-9A-F]+)", text)
    assert phys
    return {
        "registers": txt_heap.TxtRegisters(**regs),
        "tables": tables,
        "versions": versions,
        "sinit_events": _dump_events(lines[start:end]),
        "tboot_events": _dump_events(lines[vl : vl + 60]),
        "phys_addr": int(phys.group(1), 16),
    }


#: Spec ID Event03 as the dump prints it: class 0, spec 2.0 errata 0, uintn_size 1, SHA-1
#: and SHA-256, no vendor info.
REAL_SPEC = el.SpecId(algorithms=((el.ALG_SHA1, 20), (el.ALG_SHA256, 32)), uintn_size=1)


@needs_real
def test_real_dump_heap_layout_log_size_and_registers(tmp_path: Path) -> None:
    dump = _dump()
    regs = dump["registers"]
    assert isinstance(regs, txt_heap.TxtRegisters)
    sinit = dump["sinit_events"]
    assert isinstance(sinit, list) and len(sinit) == 16
    layout = tl.HeapLayout(heap_base=regs.heap_base, heap_size=regs.heap_size)
    image = tl.write_memory_image(tmp_path / "real.img", sinit, registers=regs,
                                  heap_layout=layout, spec_id=REAL_SPEC)  # fmt: skip
    state = txt_heap.capture(str(image.path))
    # The log rebuilt from the printed events has exactly the size SINIT's pointer gave:
    # "EventsOffset: [0,1510]", "allcoated_event_container_size: 8192", phys 0xB9F30176.
    assert len(state.log) == 1510
    assert state.pointer is not None
    assert (state.pointer.first_record_offset, state.pointer.next_record_offset) == (0, 1510)
    assert state.pointer.allocated == 8192
    assert state.pointer.phys_addr == dump["phys_addr"] == 0xB9F30176
    assert state.pointer.element_type == 8
    # Every table where tboot printed it, with its size and version.
    tables = dump["tables"]
    versions = dump["versions"]
    assert isinstance(tables, dict) and isinstance(versions, dict)
    assert {t.name: (t.phys_addr, t.size) for t in state.tables} == tables
    assert {t.name: t.version for t in state.tables} == versions
    assert [e.size for e in state.elements] == [28, 8]  # "TCG EVENT_LOG_PTR ... size: 28"
    # The registers decoded as txt-stat decoded them.
    r = state.registers
    assert (r.senter_done, r.sexit_done, r.private_open, r.secrets) == (True, False, True, True)
    assert (r.vendor_id, r.device_id, r.revision_id) == (0x8086, 0xB006, 0x1)
    assert txt_heap.decode_errorcode(r.errorcode) == "no error"
    # Our parser agrees with the events txt-stat printed.
    assert el.parse(state.log).events[1:] == sinit


@needs_real
def test_real_dump_captured_log_replays_to_the_readme_values(tmp_path: Path) -> None:
    """With tboot's four events appended (as in the heap once tboot ran), the capture
    replays to README section F.3's values, PCR-mapping event on "PCR 255" included."""
    dump = _dump()
    regs = dump["registers"]
    sinit, tboot = dump["sinit_events"], dump["tboot_events"]
    assert isinstance(regs, txt_heap.TxtRegisters)
    assert isinstance(sinit, list) and isinstance(tboot, list) and len(tboot) == 4
    layout = tl.HeapLayout(heap_base=regs.heap_base, heap_size=regs.heap_size)
    image = tl.write_memory_image(tmp_path / "real.img", sinit + tboot, registers=regs,
                                  heap_layout=layout, spec_id=REAL_SPEC)  # fmt: skip
    code, _, err, log = capture_cli(tmp_path, image.path)
    assert code == 0, err
    assert len(log.read_bytes()) == 1710
    doc = run(NO_TPM, tmp_path, "eventlog", "replay", "--json", "--txt", str(log)).json()
    assert doc["pcrs"] == {
        "sha1": {
            "17": "a3da3aa9d80e8f1d6b6b34f67d1a89c6998d42fa",
            "18": "4e1da12b44ae40745028103454de03a2901235e9",
        },
        "sha256": {
            "17": "17db83cfefb5204226a1cbd8ea62e675dabdcea737c2bc499dd51f0e3a0eee3a",
            "18": "add552b58f6ed3595ebbea5f4f59d077e0ed4c8601de1898a5559fe95fa86fcc",
        },
    }


T460P = REAL / "tbootdevel_2022-01-31_lenovo-t460p_tboot-1.10.3_tpm12_txt-stat.txt"


def _container_events(lines: list[str]) -> list[el.Event]:
    """The TXT Event Container events tboot printed (PCRIndex, Type, Digest, Data)."""
    events: list[el.Event] = []
    i = 0
    while i < len(lines):
        if not lines[i].endswith("\t Event:"):
            i += 1
            continue
        pcr = int(lines[i + 1].split(":")[-1])
        etype = int(lines[i + 2].split(":")[-1], 16)
        digest = bytes.fromhex(lines[i + 3].split("Digest:")[1])
        m = re.search(r"Data: (\d+) bytes", lines[i + 4])
        assert m
        size, data, i = int(m.group(1)), b"", i + 4
        while len(data) < size:
            i += 1
            data += bytes.fromhex(lines[i].strip())
        events.append(el.Event(pcr, etype, {"sha1": digest}, data))
        i += 1
    return events


@pytest.mark.skipif(not T460P.exists(), reason=f"no {T460P}")
def test_real_tpm12_container_layout_and_size(tmp_path: Path) -> None:
    """The T460p (TPM 1.2): type 5 pointer to a TXT Event Container, "EventsOffset:
    [48,296]", the tables where tboot printed them (SinitMleData version 8 there)."""
    text = T460P.read_text()
    lines = text.splitlines()
    start = lines.index("TBOOT: \t\t\t  EventsOffset: [48,296]")
    end = next(i for i in range(start, len(lines)) if "sinit_mle_data (@" in lines[i])
    events = _container_events(lines[start:end])
    assert [e.event_type for e in events] == [0x402, 0x401, 0x403, 0x404]
    launched = text.index("measured launch succeeded")
    tables = {
        m.group(1): (int(m.group(2), 16), int(m.group(3), 16))
        for m in re.finditer(
            r"TBOOT: (\w+_data) \(@(0x[0-9a-f]+), (0x[0-9a-f]+)\):", text[launched:]
        )
    }
    versions = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"TBOOT: (\w+_data) \(@.*\n.*version: (\d+)", text[launched:])
    }
    layout = tl.HeapLayout(heap_base=0xB8F20000, sinit_mle_version=8)
    image = tl.write_memory_image(tmp_path / "t460p.img", events, layout=tl.LAYOUT_TPM12,
                                  heap_layout=layout)  # fmt: skip
    state = txt_heap.capture(str(image.path))
    p = state.pointer
    assert p is not None and p.element_type == 5 and p.format == "txt-tpm12-container"
    assert (p.phys_addr, p.allocated) == (0xB8F30176, 20480)  # elog_addr, "Size: 20480"
    assert (p.first_record_offset, p.next_record_offset) == (48, 296)
    assert {t.name: (t.phys_addr, t.size) for t in state.tables} == tables
    assert {t.name: t.version for t in state.tables} == versions
    assert [e.size for e in state.elements] == [16, 8]  # "EVENT_LOG_POINTER: size: 16"
    assert el.parse_txt_event_container(state.log).events == events
    code, _, err, log = capture_cli(tmp_path, image.path)
    assert code == 0, err
    doc = run(NO_TPM, tmp_path, "eventlog", "replay", "--json", "--txt", str(log)).json()
    assert sorted(doc["pcrs"]["sha1"]) == ["17", "18"]  # the mapping event on 255 skipped


FAILED = [
    # file, error code, tboot's decoding as the file prints it
    ("tbootdevel_2020-01-15_dell-poweredge-r730_tpm2_SENTER-failed-0xc0033451_tboot-log.txt",
     0xC0033451, "AC module error : acm_type=0x1, progress=0x05, error=0xd"),
    ("tbootdevel_2019-09-10_cpu-0x806ea_tboot-1.9.10_tpm2_SENTER-failed-0xc0007051_tboot-log.txt",
     0xC0007051, "AC module error : acm_type=0x1, progress=0x05, error=0x1c"),
    (DUMP.name, 0x80000007, "processor error 0x7"),
    (DUMP.name, 0xC0000001, "AC module error : acm_type=0x1, progress=0x00, error=0x0"),
]  # fmt: skip


@needs_real
@pytest.mark.parametrize(("name", "code", "words"), FAILED)
def test_errorcode_decoded_as_tboot_printed_it(name: str, code: int, words: str) -> None:
    lines = (REAL / name).read_text().splitlines()
    at = lines.index(f"TBOOT: TXT.ERRORCODE: 0x{code:08x}")
    # The outside world's answer: the line tboot printed right after the code.
    assert lines[at + 1].removeprefix("TBOOT:").strip() == words
    assert txt_heap.decode_errorcode(code) == words


REGISTER_DUMPS = [
    # A failed SENTER: STS 0x12, ERRORCODE 0xc0003c11, txt-stat "measured launch: FALSE".
    "tbootdevel_2020-04-08_dell-latitude-e5470_SENTER-failed_txt-stat.txt",
    # No SMX / TXT disabled: txt-stat says TRUE (STS bit 0 set) with a zero heap.
    "tbootdevel_2021-03-18_nuc8i7hvk_no-SMX_txt-stat-false-TRUE.txt",
    "tbootdevel_2020-01-23_icelake-495-pch_txt-disabled_txt-stat-false-TRUE.txt",
    "tbootdevel_2025-01-08_protectli-vp6670_tboot-1.11.9_launch-failed_txt-info.txt",
]


@needs_real
@pytest.mark.parametrize("name", REGISTER_DUMPS)
def test_real_failed_or_disabled_launches_are_no_launch(tmp_path: Path, name: str) -> None:
    text = (REAL / name).read_text()

    def reg(label: str) -> int:
        m = re.search(rf"^\s*{re.escape(label)}: (?:\d+B \()?(0x[0-9a-f]+)", text, re.M)
        assert m, label
        return int(m.group(1), 16)

    regs = txt_heap.TxtRegisters(
        sts=reg("STS"), errorcode=reg("ERRORCODE"), e2sts=reg("E2STS"), didvid=reg("DIDVID"),
        heap_base=reg("HEAP.BASE"), heap_size=reg("HEAP.SIZE"),
    )  # fmt: skip
    image = tmp_path / "m.img"
    tl.write_image(image, regs)
    code, out, err, log = capture_cli(tmp_path, image, "--json")
    assert code == EXIT_MEASUREMENT, err
    assert "no TXT measured launch" in err
    doc = json.loads(out)
    assert doc["error_code"] == regs.errorcode
    assert doc["senter_done"] == regs.senter_done
    assert doc["log"] is None and doc["measured_launch"] is False
    assert not log.exists()


# --- No launch, unreadable memory -------------------------------------------------------------


def test_senter_not_done_is_exit_3(tmp_path: Path) -> None:
    regs = tl.machine_registers(senter_done=False, errorcode=0xC0003C11)
    image = tl.write_memory_image(tmp_path / "m.img", launch_events(), registers=regs)
    code, out, err, log = capture_cli(tmp_path, image.path, "--json")
    assert code == EXIT_MEASUREMENT
    assert "SENTER was not done" in err and "0xc0003c11" in err
    doc = json.loads(out)
    assert doc["senter_done"] is False and doc["error_code"] == 0xC0003C11
    assert not log.exists()


def test_pre_launch_heap_with_an_empty_log_is_exit_3(tmp_path: Path) -> None:
    """SENTER done but the pointer holds no records ("EventsOffset: [0,0]")."""
    heap, _ = tl.build_heap(launch_events())
    h = tl.HeapLayout()
    heap = bytearray(heap)
    ptr = h.bios_data_size + h.os_mle_size + 8 + txt_heap.OS_SINIT_FIXED_V5.size + 8
    struct.pack_into("<II", heap, ptr + 12, 0, 0)  # first, next record offsets
    tl.write_image(tmp_path / "m.img", tl.machine_registers(), bytes(heap))
    code, _, err, log = capture_cli(tmp_path, tmp_path / "m.img")
    assert code == EXIT_MEASUREMENT and "holds no records" in err
    assert not log.exists()


def test_unreadable_memory_is_exit_1_with_the_reason(tmp_path: Path) -> None:
    code, _, err, _ = capture_cli(tmp_path, tmp_path / "missing.img")
    assert code == EXIT_ERROR and "no such file" in err
    short = tmp_path / "short.img"
    short.write_bytes(b"\x00" * 4096)
    code, _, err, _ = capture_cli(tmp_path, short)
    assert code == EXIT_ERROR and "the file ends at" in err and "0xFED30000" in err
    # The heap where TXT.HEAP.BASE points is not in the image.
    regs = replace(tl.machine_registers(), heap_base=0x1_0000_0000)
    tl.write_image(tmp_path / "nohp.img", regs)
    code, _, err, _ = capture_cli(tmp_path, tmp_path / "nohp.img")
    assert code == EXIT_ERROR and "the TXT heap" in err


@pytest.mark.parametrize(
    ("err", "words"),
    [
        (errno.EACCES, "not root"),
        (errno.EPERM, "CAP_SYS_RAWIO"),
        (errno.ENOENT, "CONFIG_DEVMEM"),
    ],
)
def test_dev_mem_errors_say_why(err: int, words: str) -> None:
    exc = (FileNotFoundError if err == errno.ENOENT else OSError)(err, os.strerror(err))
    message = txt_heap._memory_error(txt_heap.DEV_MEM, exc, "open").diagnostics()
    assert words in message
    if err == errno.EPERM:
        assert "CONFIG_STRICT_DEVMEM" in message or "locked down" in message


# --- Hostile heaps ----------------------------------------------------------------------------

H = tl.HeapLayout()
OS_SINIT = H.bios_data_size + H.os_mle_size  # heap offset of OsSinitData's size field
ELEMENTS = OS_SINIT + 8 + txt_heap.OS_SINIT_FIXED_V5.size  # its first extended element
GOOD_HEAP, GOOD_LOG = tl.build_heap(launch_events())


def parse(heap: bytes, registers: txt_heap.TxtRegisters | None = None) -> txt_heap.TxtState:
    state = txt_heap.TxtState("test", registers or tl.machine_registers())
    txt_heap.parse_heap(state, heap)
    return state


def patched(offset: int, fmt: str, *values: int | bytes, heap: bytes = GOOD_HEAP) -> bytes:
    out = bytearray(heap)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


def test_the_good_heap_parses() -> None:
    state = parse(GOOD_HEAP)
    assert state.log == GOOD_LOG and not state.no_launch


POINTER = GOOD_HEAP[ELEMENTS : ELEMENTS + 28]  # the type 8 element as the launch wrote it
END = struct.pack("<II", 0, 8)
SINIT_MLE = GOOD_HEAP[OS_SINIT + 0x88 : OS_SINIT + 0x88 + 0x2FC]


def with_os_sinit(body: bytes, *, size: int | None = None) -> bytes:
    """The good heap with OsSinitData's table replaced by its fixed part + ``body``."""
    table = GOOD_HEAP[OS_SINIT + 8 : ELEMENTS] + body
    heap = GOOD_HEAP[:OS_SINIT] + struct.pack("<Q", size or 8 + len(table)) + table
    heap = heap[: OS_SINIT + (size or 8 + len(table))] + SINIT_MLE
    return heap + bytes(len(GOOD_HEAP) - len(heap))


SHA1_RECORD = struct.pack("<II", 17, 0x402) + bytes(20) + struct.pack("<I", 0)

# name: (heap, what the error must say)
HOSTILE: dict[str, tuple[bytes, str]] = {
    "table size zero (loops on itself)": (patched(0, "<Q", 0), "bios_data .* claims 0x0 bytes"),
    "table size past the heap": (patched(0, "<Q", H.heap_size + 1), "claims 0xe0001 bytes"),
    "os_sinit_data size past the heap": (
        patched(OS_SINIT, "<Q", 1 << 40), "os_sinit_data .* claims 0x10000000000 bytes"),
    "os_sinit_data too small for its version": (
        with_os_sinit(b"", size=40), "os_sinit_data version 7 needs 92 bytes; it has 32"),
    "element size zero (loops on itself)": (
        patched(ELEMENTS + 4, "<I", 0), "element type 8 .* has size 0 "),
    "element size 4": (patched(ELEMENTS + 4, "<I", 4), "has size 4 "),
    "element size past the table": (
        patched(ELEMENTS + 4, "<I", 0xFFFFFFF0), "has size 4294967280 .36 bytes remain"),
    "no END element": (with_os_sinit(POINTER + struct.pack("<II", 1, 8)), "no END element"),
    "elements run to the table's end": (with_os_sinit(POINTER), "no END element"),
    "two log pointers": (
        with_os_sinit(POINTER + struct.pack("<IIQ", 5, 16, H.log_phys_addr) + END),
        "more than one event-log pointer"),
    "pointer element too small": (
        with_os_sinit(struct.pack("<II", 8, 12) + bytes(4) + END),
        "EVENT_LOG_POINTER2_1 element of 12 bytes is too small"),
    "log pointer below the heap": (
        patched(ELEMENTS + 8, "<Q", 0x1000), r"\[0x1000, 0x3000\) lies outside the heap"),
    "log pointer above the heap": (
        patched(ELEMENTS + 8, "<Q", H.heap_base + H.heap_size - 16), "lies outside the heap"),
    "log pointer at 2^64 - 1": (patched(ELEMENTS + 8, "<Q", (1 << 64) - 1), "outside the heap"),
    "oversized allocation": (patched(ELEMENTS + 16, "<I", 0xFFFFFFFF), "outside the heap"),
    "next record offset past the allocation": (
        patched(ELEMENTS + 24, "<I", 0x2001), r"record offsets \[0, 8193\) do not fit"),
    "first after next": (patched(ELEMENTS + 20, "<II", 100, 50), r"\[100, 50\) do not fit"),
    "log truncated mid-record": (
        patched(ELEMENTS + 24, "<I", len(GOOD_LOG) - 7), "TXT event log in the heap is corrupt"),
    "log not crypto-agile": (
        patched(ELEMENTS + 24, "<I", len(SHA1_RECORD),
                heap=patched(H.log_phys_addr - H.heap_base, f"<{len(SHA1_RECORD)}s",
                             SHA1_RECORD)),
        "does not start with a Spec ID Event03 header"),
    "heap truncated inside the tables": (GOOD_HEAP[: OS_SINIT + 40], "claims 0x88 bytes; 0x28"),
    "all 0xFF": (b"\xff" * 0x1000, "claims 0xffffffffffffffff bytes"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_heap_is_a_clear_error(name: str) -> None:
    heap, words = HOSTILE[name]
    with pytest.raises(txt_heap.TxtHeapError, match=words):
        parse(heap)


@pytest.mark.parametrize(
    "name",
    [
        "element size zero (loops on itself)",
        "log pointer below the heap",
        "oversized allocation",
        "log truncated mid-record",
    ],
)
def test_hostile_heap_through_the_cli_is_exit_7(tmp_path: Path, name: str) -> None:
    heap = HOSTILE[name][0]
    regs = replace(tl.machine_registers(), heap_size=len(heap))
    tl.write_image(tmp_path / "m.img", regs, heap)
    code, _, err, log = capture_cli(tmp_path, tmp_path / "m.img")
    assert code == EXIT_CORRUPT, err
    assert "corrupt" in err and not log.exists()


def test_implausible_heap_size_is_refused_before_any_read(tmp_path: Path) -> None:
    regs = replace(tl.machine_registers(), heap_size=1 << 40)
    tl.write_image(tmp_path / "m.img", regs)
    code, _, err, _ = capture_cli(tmp_path, tmp_path / "m.img")
    assert code == EXIT_CORRUPT and "plausible" in err


def test_legacy_pointer_with_a_huge_count(tmp_path: Path) -> None:
    heap, _ = tl.build_heap(launch_events(), layout=tl.LAYOUT_TPM2_LEGACY)
    with pytest.raises(txt_heap.TxtHeapError, match="claims 4294967295 bank logs"):
        parse(patched(ELEMENTS + 8, "<I", 0xFFFFFFFF, heap=heap))
    with pytest.raises(txt_heap.TxtHeapError, match="unknown algorithm"):
        parse(patched(ELEMENTS + 12, "<H", 0x99, heap=heap))


def test_container_pointer_outside_and_bad_signature() -> None:
    heap, _ = tl.build_heap(sha1_events(), layout=tl.LAYOUT_TPM12)
    assert parse(heap).log
    with pytest.raises(txt_heap.TxtHeapError, match="outside the heap"):
        parse(patched(ELEMENTS + 8, "<Q", 0xFED30000, heap=heap))
    with pytest.raises(txt_heap.TxtHeapError, match="signature"):
        parse(patched(H.log_phys_addr - H.heap_base, "<I", 0, heap=heap))
    with pytest.raises(txt_heap.TxtHeapError, match="record offsets"):
        parse(patched(H.log_phys_addr - H.heap_base + 36, "<I", 0x10, heap=heap))


def _outcome(heap: bytes) -> None:
    """Parsing returns, says no launch, or raises TxtHeapError; nothing else."""
    try:
        state = parse(heap)
    except txt_heap.TxtHeapError:
        return
    assert len(state.log) <= len(heap)
    if state.log:
        assert state.pointer is not None
        # What is captured lies inside the heap.
        p = state.pointer
        assert H.heap_base <= p.phys_addr < H.heap_base + len(heap)
        if p.element_type != txt_heap.EXT_EVENT_LOG_POINTER2:  # type 7 is rewritten
            assert state.log in heap


STRUCTURE = [0, 8, OS_SINIT, OS_SINIT + 8, ELEMENTS, ELEMENTS + 4, ELEMENTS + 8, ELEMENTS + 16,
             ELEMENTS + 20, ELEMENTS + 24, ELEMENTS + 28, ELEMENTS + 32,
             H.log_phys_addr - H.heap_base]  # fmt: skip


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(
    layout=st.sampled_from([tl.LAYOUT_CRYPTO_AGILE, tl.LAYOUT_TPM2_LEGACY, tl.LAYOUT_TPM12]),
    writes=st.lists(
        st.tuples(
            st.one_of(st.sampled_from(STRUCTURE), st.integers(0, OS_SINIT + 0x100)),
            st.integers(-8, 8),
            st.sampled_from(["<I", "<Q", "<B"]),
            st.integers(0, (1 << 64) - 1),
        ),
        min_size=1,
        max_size=4,
    ),
    cut=st.one_of(st.none(), st.integers(0, OS_SINIT + 0x400)),
)
def test_mutated_heaps_never_escape(layout: str, writes: list[tuple[int, int, str, int]],
                                    cut: int | None) -> None:  # fmt: skip
    evs = sha1_events() if layout == tl.LAYOUT_TPM12 else launch_events()
    heap = bytearray(tl.build_heap(evs, layout=layout)[0])
    for base, delta, fmt, value in writes:
        at = max(0, base + delta)
        size = struct.calcsize(fmt)
        if at + size <= len(heap):
            struct.pack_into(fmt, heap, at, value & ((1 << (8 * size)) - 1))
    _outcome(bytes(heap[:cut] if cut is not None else heap))


@settings(max_examples=200, deadline=2000)
@given(st.binary(min_size=0, max_size=4096))
def test_garbage_heaps_never_escape(garbage: bytes) -> None:
    _outcome(garbage)


@settings(max_examples=200, deadline=2000)
@given(st.lists(st.tuples(st.integers(0, 12), st.integers(0, 64)), max_size=64))
def test_element_lists_end_or_fail(elements: list[tuple[int, int]]) -> None:
    """Any element list after OsSinitData's fixed part: END found, or a clear error."""
    body = b"".join(struct.pack("<II", t, s) + bytes(max(s - 8, 0)) for t, s in elements)
    os_sinit = bytes(GOOD_HEAP[OS_SINIT + 8 : ELEMENTS]) + body
    heap = GOOD_HEAP[:OS_SINIT] + struct.pack("<Q", 8 + len(os_sinit)) + os_sinit
    heap += struct.pack("<QI", 12, 9)  # SinitMleData
    heap += bytes(64)
    _outcome(heap)


def test_only_sinits_pcr_mapping_event_may_name_pcr_255() -> None:
    """0x401 on "PCR 255" extends nothing; any other event beyond PCR 23 is still refused."""
    digests = {"sha256": bytes(32)}
    mapping = el.Event(255, el.EVTYPE_PCRMAPPING, digests, b"\x01\x00\x00\x00")
    start = el.Event(17, el.EVTYPE_HASH_START, {"sha256": b"\x11" * 32}, b"")
    values = el.replay(el.parse(el.write([start, mapping], ["sha256"])), drtm=True)
    assert set(values["sha256"]) == {17}
    for event in (el.Event(255, 0x402, digests, b""), el.Event(24, el.EVTYPE_PCRMAPPING, digests,
                                                               b"")):  # fmt: skip
        with pytest.raises(el.EventLogError, match="beyond PCR 23"):
            el.replay(el.parse(el.write([start, event], ["sha256"])), drtm=True)
