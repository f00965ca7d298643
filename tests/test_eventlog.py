"""Event log parsing, writing, replay and verification.

Real logs in ../shared/testdata (see its MANIFEST.txt) are the outside world's answer: every
one must parse and replay to the values its upstream project states.  Synthetic logs and
hypothesis cover the writer, the replay rules and hostile input.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import struct
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qubes_seal.errors import EXIT_CORRUPT, CorruptState
from qubes_seal.measure import eventlog as el
from qubes_seal.measure.eventlog import Event, EventLog, EventLogError, SpecId

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"


def data_file(relative: str) -> Path:
    """A file of the shared third-party test data; fails (never skips) when it is missing."""
    path = TESTDATA / relative
    if not path.is_file():
        pytest.fail(f"third-party test data missing: {path} (see shared/testdata/MANIFEST.txt)")
    return path


def read_yaml_pcrs(path: Path) -> dict[str, dict[int, bytes]]:
    """The ``pcrs:`` section of a tpm2_eventlog YAML file (bank -> PCR -> value).

    A minimal reader for exactly that section: ``pcrs:`` at column 0, then ``  bank:`` and
    ``    N : 0xHEX`` lines, up to the next line at column 0 or the end.
    """
    pcrs: dict[str, dict[int, bytes]] = {}
    bank: str | None = None
    inside = False
    for line in path.read_text().splitlines():
        if not inside:
            inside = line.rstrip() == "pcrs:"
            continue
        if not line.strip():
            continue
        if not line.startswith(" "):
            break
        bank_match = re.fullmatch(r"  (\w+):\s*", line)
        value_match = re.fullmatch(r"    (\d+)\s*:\s*0x([0-9a-fA-F]+)\s*", line)
        if bank_match:
            bank = bank_match.group(1)
            pcrs[bank] = {}
        elif value_match and bank is not None:
            pcrs[bank][int(value_match.group(1))] = bytes.fromhex(value_match.group(2))
        else:
            pytest.fail(f"{path.name}: unexpected line in pcrs section: {line!r}")
    if not inside:
        pytest.fail(f"{path.name}: no pcrs: section")
    return pcrs


def yaml_event_types(path: Path) -> list[str]:
    """The EventType of every event listed in a tpm2_eventlog YAML file, in order."""
    return re.findall(r"^\s*-?\s*EventType: (\S+)\s*$", path.read_text(), re.MULTILINE)


def hexdump_pcrs(values: dict[str, dict[int, bytes]]) -> dict[str, dict[int, str]]:
    return {bank: {pcr: v.hex() for pcr, v in pcrs.items()} for bank, pcrs in values.items()}


# --- Real logs ------------------------------------------------------------------------------

TPM2_TOOLS_LOGS = [
    "event-gce-ubuntu-2104-log",
    "event-moklisttrusted",
    "event-postcode",
    "event-sd-boot-fedora37",
    "event-uefi-sha1-log",
    "specid-vendordata",
]

ALL_REAL_LOGS = [
    *(f"tpm2-tools/{name}.bin" for name in TPM2_TOOLS_LOGS),
    "tpm2-tss/binary_measurements_hcrtm.bin",
    "tpm2-tss/binary_measurements_pc_client.bin",
    "keylime/binary_bios_measurements",
    "go-attestation/ebs_event_missing_eventlog",
]


def windows_gcp() -> tuple[bytes, dict[str, dict[int, bytes]]]:
    """go-attestation's GCP Shielded VM: the raw SHA-1 log and the TPM-read SHA-1 PCRs."""
    doc = json.loads(data_file("go-attestation/windows_gcp_shielded_vm.json").read_text())
    raw = base64.b64decode(doc["Log"]["Raw"])
    pcrs: dict[int, bytes] = {}
    for entry in doc["Log"]["PCRs"]:
        assert entry["DigestAlg"] == 3  # Go crypto.SHA1
        pcrs[entry["Index"]] = base64.b64decode(entry["Digest"])
    assert sorted(pcrs) == list(range(24))
    return raw, {"sha1": pcrs}


def real_logs() -> list[bytes]:
    return [data_file(name).read_bytes() for name in ALL_REAL_LOGS] + [windows_gcp()[0]]


def test_testdata_directory_is_where_the_tests_expect_it() -> None:
    assert TESTDATA.is_dir(), f"missing {TESTDATA}"
    assert (TESTDATA / "MANIFEST.txt").is_file()


@pytest.mark.parametrize("name", TPM2_TOOLS_LOGS)
def test_tpm2_tools_log_replays_to_its_yaml_pcrs(name: str) -> None:
    log = el.parse(data_file(f"tpm2-tools/{name}.bin").read_bytes())
    yaml = data_file(f"tpm2-tools/{name}.bin.yaml")
    expected = read_yaml_pcrs(yaml)
    replayed = el.replay(log)
    # tpm2_eventlog lists only banks with extended PCRs.
    replayed = {bank: pcrs for bank, pcrs in replayed.items() if pcrs}
    assert hexdump_pcrs(replayed) == hexdump_pcrs(expected)
    # Same events, same names, as tpm2_eventlog printed them.
    assert [e.type_name for e in log.events] == yaml_event_types(yaml)


def test_tpm2_tools_banks_and_formats() -> None:
    def parsed(name: str) -> EventLog:
        return el.parse(data_file(f"tpm2-tools/{name}.bin").read_bytes())

    gce = parsed("event-gce-ubuntu-2104-log")
    assert (gce.format, gce.banks) == ("crypto-agile", ["sha1", "sha256", "sha384"])
    assert parsed("event-sd-boot-fedora37").banks == ["sha256"]
    sha1 = parsed("event-uefi-sha1-log")
    assert (sha1.format, sha1.banks, sha1.spec_id) == ("sha1", ["sha1"], None)


def test_spec_id_with_vendor_info() -> None:
    """tpm2-tools specid-vendordata.bin: eventSize 37 leaves out the 4 vendorInfo bytes."""
    log = el.parse(data_file("tpm2-tools/specid-vendordata.bin").read_bytes())
    assert log.spec_id is not None
    assert log.spec_id.vendor_info == bytes.fromhex("deadbeef")
    assert log.spec_id.algorithms == ((el.ALG_SHA1, 20), (el.ALG_SHA256, 32))
    assert (log.spec_id.spec_version_major, log.spec_id.uintn_size) == (2, 2)
    assert len(log.events) == 1
    assert log.events[0].event_type == el.EV_NO_ACTION
    assert el.replay(log) == {"sha1": {}, "sha256": {}}


def test_hcrtm_log_pcr0_matches_the_value_read_from_the_system() -> None:
    """tpm2-tss check_eventlog_pcr0: SHA-1 PCR 0 = 15f4e6ca… (H-CRTM: PCR 0 starts 00..04)."""
    log = el.parse(data_file("tpm2-tss/binary_measurements_hcrtm.bin").read_bytes())
    assert log.banks == ["sha1", "sha256", "sm3_256"]
    assert log.events[1].event_type == el.EV_EFI_HCRTM_EVENT
    pcr0 = el.replay(log)["sha1"][0]
    assert pcr0.hex() == "15f4e6ca457d1af6bc49511a93ba3500ad69acc5"
    # tpm2-tss's selection of PCR 0-8 lists 111 events (the Spec ID header counted).
    assert sum(1 for e in log.events if e.pcr <= 8) == 111


def test_pc_client_log_parses_with_tpm2_tss_event_counts() -> None:
    """tpm2-tss check_bios_pc_client: 5 events for PCR 0, 17 for PCR 0-2 (Spec ID counted).

    (Upstream passes these counts to check_eventlog, which does not compare them; they are
    the numbers its authors wrote down for this file.)
    """
    log = el.parse(data_file("tpm2-tss/binary_measurements_pc_client.bin").read_bytes())
    assert (log.format, log.banks) == ("crypto-agile", ["sha1", "sha256"])
    assert sum(1 for e in log.events if e.pcr == 0) == 5
    assert sum(1 for e in log.events if e.pcr <= 2) == 17
    assert set(el.replay(log)["sha256"]) == set(range(8))


def test_keylime_log_starts_pcr0_at_locality_3() -> None:
    log = el.parse(data_file("keylime/binary_bios_measurements").read_bytes())
    localities = [
        e.data[16] for e in log.events if e.data.startswith(b"StartupLocality\x00") and e.pcr == 0
    ]
    assert localities == [3]
    replayed = el.replay(log)
    for bank, h in (("sha1", hashlib.sha1), ("sha256", hashlib.sha256)):
        size = h().digest_size
        value = bytes(size - 1) + b"\x03"
        from_zero = bytes(size)
        for event in log.events:
            if event.pcr == 0 and event.event_type != el.EV_NO_ACTION:
                value = h(value + event.digests[bank]).digest()
                from_zero = h(from_zero + event.digests[bank]).digest()
        assert replayed[bank][0] == value
        assert replayed[bank][0] != from_zero


def test_windows_gcp_log_verifies_against_tpm_read_pcrs() -> None:
    raw, tpm = windows_gcp()
    log = el.parse(raw)
    assert log.format == "sha1"
    checks = el.verify(log, tpm)
    assert [(c.bank, c.pcr) for c in checks] == [("sha1", p) for p in range(24)]
    bad = [(c.pcr, c.replayed.hex(), c.tpm.hex() if c.tpm else None) for c in checks if not c.ok]
    assert bad == []
    # No DRTM on this VM: PCR 17-22 are at their 0xFF reset value, not extended.
    assert all(not c.extended and c.replayed == b"\xff" * 20 for c in checks if 17 <= c.pcr <= 22)
    assert {c.pcr for c in checks if c.extended} == {0, 4, 5, 7, 11, 12, 13, 14}


def test_ebs_workaround_log_pcr5() -> None:
    """go-attestation TestEBSVerifyWorkaround: PCR 5 matches once the two missing
    ExitBootServices EV_EFI_ACTION events are added, and not before."""
    expected = "31245808d6d35849bc394f6343f2b3ff908ed5e3"
    log = el.parse(data_file("go-attestation/ebs_event_missing_eventlog").read_bytes())
    assert el.replay(log)["sha1"][5].hex() != expected
    for text in (b"Exit Boot Services Invocation", b"Exit Boot Services Returned with Success"):
        log.events.append(Event(5, el.EV_EFI_ACTION, {"sha1": hashlib.sha1(text).digest()}, text))
    assert el.replay(log)["sha1"][5].hex() == expected


@pytest.mark.parametrize("name", ALL_REAL_LOGS)
def test_real_logs_rewrite_byte_for_byte(name: str) -> None:
    raw = data_file(name).read_bytes()
    log = el.parse(raw)
    if log.format == "sha1":
        out = el.write_sha1(log.events)
    else:
        out = el.write(log.events, log.banks, spec_id=log.spec_id)
    if name.endswith("specid-vendordata.bin"):
        # The one quirk: we write an eventSize that covers the vendorInfo.
        assert out[32:] == raw[32:]
        assert struct.unpack_from("<I", out, 28)[0] == 41
    else:
        assert out == raw[: len(out)]
        assert not raw[len(out) :].strip(b"\x00")
    reparsed = el.parse(out)
    assert reparsed == log


def test_zero_padding_ends_the_log() -> None:
    raw = data_file("tpm2-tools/event-sd-boot-fedora37.bin").read_bytes()
    assert el.parse(raw + bytes(0x2000)) == el.parse(raw)
    sha1 = data_file("tpm2-tools/event-uefi-sha1-log.bin").read_bytes()
    assert el.parse(sha1 + bytes(7)) == el.parse(sha1)


def test_replay_time_of_the_largest_real_log() -> None:
    raw = max(real_logs(), key=len)
    start = time.perf_counter()
    log = el.parse(raw)
    el.replay(log)
    elapsed = time.perf_counter() - start
    print(f"parse+replay of a {len(raw)}-byte, {len(log.events)}-event log: {elapsed * 1e3:.2f} ms")
    assert elapsed < 1.0


# --- Errors ---------------------------------------------------------------------------------


def spec_header(algorithms: list[tuple[int, int]], vendor: bytes = b"") -> bytes:
    data = SpecId(algorithms=tuple(algorithms), vendor_info=vendor).encode()
    return struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(data)) + data


def test_error_type_and_exit_code() -> None:
    with pytest.raises(EventLogError) as info:
        el.parse(b"")
    assert isinstance(info.value, CorruptState)
    assert info.value.exit_code == EXIT_CORRUPT
    assert info.value.diagnostics().startswith("event log is empty")


def test_all_zero_log_is_an_error() -> None:
    with pytest.raises(EventLogError, match="empty"):
        el.parse(bytes(0x2000))


def test_digest_count_above_declared_algorithms() -> None:
    head = spec_header([(el.ALG_SHA256, 32)])
    record = struct.pack("<III", 0, 4, 0xFFFFFFFF)
    with pytest.raises(EventLogError, match=rf"offset {len(head) + 8} .*digest count 4294967295"):
        el.parse(head + record + bytes(64))


def test_event_size_past_the_end() -> None:
    head = spec_header([(el.ALG_SHA256, 32)])
    record = struct.pack("<IIIH", 0, 4, 1, el.ALG_SHA256) + bytes(32) + struct.pack("<I", 10**9)
    with pytest.raises(EventLogError, match=rf"offset {len(head) + 46} .*runs past the end"):
        el.parse(head + record + b"\x01")


def test_undeclared_algorithm_is_an_error() -> None:
    head = spec_header([(el.ALG_SHA256, 32)])
    record = struct.pack("<IIIH", 0, 4, 1, el.ALG_SHA1) + bytes(20) + struct.pack("<I", 0)
    with pytest.raises(EventLogError, match="not declared"):
        el.parse(head + record)


def test_unknown_algorithm_uses_declared_size() -> None:
    alg = 0x0027  # SHA3-256 in the TCG registry; not a bank we know by name
    head = spec_header([(el.ALG_SHA256, 32), (alg, 32)])
    record = (
        struct.pack("<IIIH", 4, 13, 2, el.ALG_SHA256)
        + b"\x11" * 32
        + struct.pack("<H", alg)
        + b"\x22" * 32
        + struct.pack("<I", 3)
        + b"abc"
    )
    log = el.parse(head + record)
    assert log.banks == ["sha256", "alg_0x0027"]
    assert log.events[1].digests == {"sha256": b"\x11" * 32, "alg_0x0027": b"\x22" * 32}
    # The unknown bank cannot be replayed, so it is absent from the replay ...
    assert set(el.replay(log)) == {"sha256"}
    # ... and asking to verify it is an error, never a silent pass.
    with pytest.raises(EventLogError, match="alg_0x0027"):
        el.verify(log, {"alg_0x0027": {4: bytes(32)}})
    assert el.parse(el.write(log.events, log.banks, spec_id=log.spec_id)) == log


@pytest.mark.parametrize(
    ("algorithms", "message"),
    [
        ([], "no algorithm"),
        ([(el.ALG_SHA256, 20)], "digest size 20, not 32"),
        ([(el.ALG_SHA256, 32), (el.ALG_SHA256, 32)], "twice"),
        ([(0x0027, 0)], "digest size 0"),
        ([(0, 20)], "algorithm id 0"),
    ],
)
def test_bad_spec_id_events(algorithms: list[tuple[int, int]], message: str) -> None:
    header = struct.pack("<IBBBBI", 0, 0, 2, 0, 2, len(algorithms))
    body = bytearray(b"Spec ID Event03\x00" + header)
    for alg, size in algorithms:
        body += struct.pack("<HH", alg, size)
    body.append(0)
    raw = struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(body)) + bytes(body)
    with pytest.raises(EventLogError, match=message):
        el.parse(raw)


def test_spec_id_with_huge_algorithm_count() -> None:
    body = b"Spec ID Event03\x00" + struct.pack("<IBBBBI", 0, 0, 2, 0, 2, 0x7FFFFFFF) + bytes(8)
    raw = struct.pack("<II", 0, 3) + bytes(20) + struct.pack("<I", len(body)) + body
    with pytest.raises(EventLogError, match="2147483647 algorithms"):
        el.parse(raw)


def test_spec_id_with_nonzero_digest() -> None:
    raw = bytearray(spec_header([(el.ALG_SHA256, 32)]))
    raw[10] = 1
    with pytest.raises(EventLogError, match="20 zero bytes"):
        el.parse(bytes(raw))


def test_spec_id_size_mismatch() -> None:
    raw = bytearray(spec_header([(el.ALG_SHA256, 32)]))
    struct.pack_into("<I", raw, 28, struct.unpack_from("<I", raw, 28)[0] + 1)
    with pytest.raises(EventLogError, match="does not match its structure"):
        el.parse(bytes(raw) + b"\x01")


def test_duplicate_digest_in_one_event() -> None:
    head = spec_header([(el.ALG_SHA256, 32), (el.ALG_SHA1, 20)])
    record = struct.pack("<IIIH", 0, 4, 2, el.ALG_SHA256) + bytes(32)
    record += struct.pack("<H", el.ALG_SHA256) + bytes(32) + struct.pack("<I", 0)
    with pytest.raises(EventLogError, match="two sha256 digests"):
        el.parse(head + record)


# --- Replay rules ---------------------------------------------------------------------------


def sha256_log(events: list[Event]) -> EventLog:
    return el.parse(el.write(events, ["sha256"]))


def ev(pcr: int, digest: bytes, event_type: int = el.EV_IPL, data: bytes = b"") -> Event:
    return Event(pcr, event_type, {"sha256": digest}, data)


def locality_event(locality: int) -> Event:
    return ev(0, bytes(32), el.EV_NO_ACTION, b"StartupLocality\x00" + bytes([locality]))


def h256(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def test_drtm_pcrs_start_at_zero_or_ff() -> None:
    d = b"\x42" * 32
    log = sha256_log([ev(17, d, el.EVTYPE_TB_MEASUREMENT), ev(23, d), ev(10, d)])
    assert el.replay(log, drtm=True)["sha256"] == {
        17: h256(bytes(32), d),
        23: h256(bytes(32), d),
        10: h256(bytes(32), d),
    }
    assert el.replay(log, drtm=False)["sha256"][17] == h256(b"\xff" * 32, d)


def test_no_action_events_are_not_extended() -> None:
    log = sha256_log([ev(4, b"\x01" * 32, el.EV_NO_ACTION, b"anything")])
    assert el.replay(log) == {"sha256": {}}


@pytest.mark.parametrize("locality", [3, 4])
def test_startup_locality(locality: int) -> None:
    d = b"\x07" * 32
    log = sha256_log([locality_event(locality), ev(0, d)])
    assert el.replay(log)["sha256"][0] == h256(bytes(31) + bytes([locality]), d)


def test_startup_locality_after_pcr0_extend_is_an_error() -> None:
    log = sha256_log([ev(0, bytes(32)), locality_event(3)])
    with pytest.raises(EventLogError, match="after PCR 0"):
        el.replay(log)


def test_second_startup_locality_is_an_error() -> None:
    log = sha256_log([locality_event(3), locality_event(3)])
    with pytest.raises(EventLogError, match="second StartupLocality"):
        el.replay(log)


def test_pcr_beyond_23_is_an_error_in_replay() -> None:
    log = sha256_log([ev(24, bytes(32))])
    with pytest.raises(EventLogError, match="PCR 24"):
        el.replay(log)


def test_verify_reports_per_pcr() -> None:
    d = b"\x05" * 32
    log = sha256_log([locality_event(3), ev(4, d), ev(17, d, el.EVTYPE_TB_MEASUREMENT)])
    good4 = h256(bytes(32), d)
    checks = el.verify(
        log, {"sha256": {4: good4, 17: bytes(32), 0: bytes(31) + b"\x03", 7: b"\x01" * 32}}
    )
    by_pcr = {c.pcr: c for c in checks}
    assert sorted(by_pcr) == [0, 4, 7, 17]
    assert by_pcr[4].ok and by_pcr[4].extended
    assert by_pcr[0].ok and not by_pcr[0].extended  # reset value at locality 3
    assert not by_pcr[7].ok and by_pcr[7].replayed == bytes(32)
    assert not by_pcr[17].ok and by_pcr[17].replayed == h256(b"\xff" * 32, d)
    # With drtm=True PCR 17 starts at zero; a replayed PCR the caller left out never passes.
    checks = el.verify(log, {"sha256": {17: h256(bytes(32), d)}}, drtm=True)
    assert [(c.pcr, c.ok) for c in checks] == [(4, False), (17, True)]
    assert checks[0].tpm is None


def test_verify_refuses_a_bank_the_log_lacks() -> None:
    log = sha256_log([ev(4, bytes(32))])
    with pytest.raises(EventLogError, match="sha1"):
        el.verify(log, {"sha1": {4: bytes(20)}})


def test_event_type_names() -> None:
    assert el.event_type_name(0x3) == "EV_NO_ACTION"
    assert el.event_type_name(0x80000010) == "EV_EFI_HCRTM_EVENT"
    assert el.event_type_name(0x404) == "EVTYPE_MLE_HASH"
    assert el.event_type_name(0x501) == "EVTYPE_TB_MEASUREMENT"
    assert el.event_type_name(0x4FF) == "EVTYPE_CAP_VALUE"
    assert el.event_type_name(0x12) == "EV_OMIT_BOOT_DEVICE_EVENTS"
    assert el.event_type_name(0x1234) == "0x00001234"


def test_bank_names_round_trip() -> None:
    for alg in (el.ALG_SHA1, el.ALG_SHA256, el.ALG_SHA384, el.ALG_SHA512, el.ALG_SM3_256, 0x27):
        assert el.alg_id(el.bank_name(alg)) == alg
    assert el.bank_name(0x12) == "sm3_256"
    assert el.digest_size("sha384") == 48
    with pytest.raises(ValueError, match="unknown"):
        el.alg_id("md5")


# --- Writers --------------------------------------------------------------------------------


def test_write_refuses_bad_events() -> None:
    with pytest.raises(ValueError, match="no digest"):
        el.write([Event(0, 4, {}, b"")], ["sha256"])
    with pytest.raises(ValueError, match="sha1 digest"):
        el.write([Event(0, 4, {"sha1": bytes(20)}, b"")], ["sha256"])
    with pytest.raises(ValueError, match="20 bytes, not 32"):
        el.write([Event(0, 4, {"sha256": bytes(20)}, b"")], ["sha256"])
    with pytest.raises(ValueError, match="not known"):
        el.write([], ["alg_0x0027"])
    with pytest.raises(ValueError, match="all zero"):
        el.write_sha1([Event(0, 0, {"sha1": bytes(20)}, b"")])
    with pytest.raises(ValueError, match="Spec ID"):
        el.write_sha1([Event(0, 3, {"sha1": bytes(20)}, b"Spec ID Event03\x00")])


BANK_SIZES = {"sha1": 20, "sha256": 32, "sha384": 48, "sha512": 64, "sm3_256": 32}
u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)


@st.composite
def agile_logs(draw: st.DrawFn) -> tuple[list[Event], list[str], SpecId]:
    banks = draw(st.lists(st.sampled_from(sorted(BANK_SIZES)), min_size=1, unique=True))
    unknown = draw(st.lists(st.integers(0x20, 0xFFFF), max_size=2, unique=True))
    algorithms = [(el.alg_id(b), BANK_SIZES[b]) for b in banks]
    algorithms += [(a, draw(st.integers(1, 80))) for a in unknown]
    spec = SpecId(
        algorithms=tuple(algorithms),
        platform_class=draw(u32),
        spec_errata=draw(st.integers(0, 255)),
        uintn_size=draw(st.sampled_from([1, 2])),
        vendor_info=draw(st.binary(max_size=255)),
    )
    sizes = spec.digest_sizes()
    names = list(sizes)
    events: list[Event] = []
    for _ in range(draw(st.integers(0, 12))):
        chosen = draw(st.lists(st.sampled_from(names), min_size=1, unique=True))
        digests = {b: draw(st.binary(min_size=sizes[b], max_size=sizes[b])) for b in chosen}
        events.append(Event(draw(u32), draw(u32), digests, draw(st.binary(max_size=64))))
    return events, names, spec


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(agile_logs())
def test_crypto_agile_write_parse_round_trip(case: tuple[list[Event], list[str], SpecId]) -> None:
    events, banks, spec = case
    raw = el.write(events, banks, spec_id=spec)
    log = el.parse(raw)
    assert log.format == "crypto-agile"
    assert log.banks == banks
    assert log.spec_id == spec
    assert log.events[1:] == events
    # And zero padding, as in tboot's TXT heap buffer, changes nothing.
    assert el.parse(raw + bytes(0x2000 - len(raw) % 0x2000)) == log


@settings(max_examples=200)
@given(
    st.lists(
        st.builds(
            Event,
            u32,
            u32,
            st.builds(lambda d: {"sha1": d}, st.binary(min_size=20, max_size=20)),
            st.binary(max_size=64),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_sha1_write_parse_round_trip(events: list[Event]) -> None:
    try:
        raw = el.write_sha1(events)
    except ValueError:
        return  # all-zero records or a Spec ID look-alike: refused, not mis-written
    assert el.parse(raw) == EventLog(events, ["sha1"], "sha1", None)


def test_default_spec_id_from_banks() -> None:
    raw = el.write([ev(4, bytes(32))], ["sha256"])
    log = el.parse(raw)
    assert log.spec_id == SpecId(algorithms=((el.ALG_SHA256, 32),))


# --- Hostile input ----------------------------------------------------------------------------

REAL_LOGS = real_logs()


def parse_and_replay(raw: bytes) -> None:
    """Parse and replay; only EventLogError may escape."""
    try:
        log = el.parse(raw)
        el.replay(log)
        el.replay(log, drtm=True)
    except EventLogError:
        pass


@st.composite
def truncated_logs(draw: st.DrawFn) -> bytes:
    """A real log cut anywhere."""
    raw = draw(st.sampled_from(REAL_LOGS))
    return raw[: draw(st.integers(0, len(raw)))]


@st.composite
def bit_flipped_logs(draw: st.DrawFn) -> bytes:
    """A real log with 1 to 8 bits flipped."""
    raw = bytearray(draw(st.sampled_from(REAL_LOGS)))
    for _ in range(draw(st.integers(1, 8))):
        bit = draw(st.integers(0, len(raw) * 8 - 1))
        raw[bit // 8] ^= 1 << (bit % 8)
    return bytes(raw)


@st.composite
def huge_field_logs(draw: st.DrawFn) -> bytes:
    """A real log with 1 to 3 little-endian words replaced by huge or edge counts/sizes."""
    raw = bytearray(draw(st.sampled_from(REAL_LOGS)))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(raw) - 4))
        value = draw(
            st.sampled_from([0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0x10000, 0xFFFF, 256, 25, 0])
        )
        struct.pack_into("<I", raw, at, value)
    return bytes(raw)


@settings(max_examples=300, deadline=2000)
@given(truncated_logs())
def test_fuzzed_truncations(raw: bytes) -> None:
    parse_and_replay(raw)


@settings(max_examples=300, deadline=2000)
@given(bit_flipped_logs())
def test_fuzzed_bit_flips(raw: bytes) -> None:
    parse_and_replay(raw)


@settings(max_examples=300, deadline=2000)
@given(huge_field_logs())
def test_fuzzed_huge_counts_and_sizes(raw: bytes) -> None:
    parse_and_replay(raw)


@settings(max_examples=300, deadline=2000)
@given(st.binary(max_size=512))
def test_random_bytes(raw: bytes) -> None:
    parse_and_replay(raw)
    parse_and_replay(spec_header([(el.ALG_SHA1, 20), (el.ALG_SHA256, 32)]) + raw)


def test_every_truncation_of_a_small_log() -> None:
    raw = data_file("tpm2-tools/event-sd-boot-fedora37.bin").read_bytes()
    for cut in range(len(raw)):
        parse_and_replay(raw[:cut])


# --- tboot's older TXT log formats -----------------------------------------------------------


def legacy_record(pcr: int, event_type: int, digest: bytes, data: bytes = b"") -> bytes:
    return struct.pack("<II", pcr, event_type) + digest + struct.pack("<I", len(data)) + data


def log_descriptor(digest_id: int, size: int) -> bytes:
    descriptor = b"TCG_LOG_DESCRIPT" + struct.pack("<III", 1, digest_id, size)
    return legacy_record(0, el.EV_NO_ACTION, bytes(20), descriptor)


def test_txt_tpm2_legacy_per_bank_logs() -> None:
    d1, d256 = b"\x01" * 20, b"\x02" * 32
    sha1_log = legacy_record(17, 0x402, d1) + legacy_record(17, 0x501, d1) + bytes(100)
    sha256_log_ = (
        log_descriptor(2, 32) + legacy_record(17, 0x402, d256) + legacy_record(18, 0x501, d256)
    )
    log = el.parse_txt_tpm2_legacy({"sha1": sha1_log, "sha256": sha256_log_})
    assert log.format == "txt-tpm2-legacy"
    assert log.banks == ["sha1", "sha256"]
    assert [(e.pcr, e.event_type, list(e.digests)) for e in log.events] == [
        (17, 0x402, ["sha1"]),
        (17, 0x501, ["sha1"]),
        (0, el.EV_NO_ACTION, ["sha1"]),
        (17, 0x402, ["sha256"]),
        (18, 0x501, ["sha256"]),
    ]
    values = el.replay(log, drtm=True)
    z1 = hashlib.sha1(bytes(20) + d1).digest()
    assert values["sha1"] == {17: hashlib.sha1(z1 + d1).digest()}
    assert values["sha256"] == {17: h256(bytes(32), d256), 18: h256(bytes(32), d256)}


def test_txt_tpm2_legacy_errors() -> None:
    with pytest.raises(EventLogError, match="TCG_LOG_DESCRIPTOR"):
        el.parse_txt_tpm2_legacy({"sha256": legacy_record(17, 0x402, bytes(32))})
    with pytest.raises(EventLogError, match="digest size 20, not 32"):
        el.parse_txt_tpm2_legacy({"sha256": log_descriptor(2, 20)})
    with pytest.raises(EventLogError, match="runs past the end"):
        el.parse_txt_tpm2_legacy({"sha1": struct.pack("<II", 17, 0x402) + bytes(20) + b"\xff" * 4})
    with pytest.raises(EventLogError, match="unknown bank"):
        el.parse_txt_tpm2_legacy({"md5": b""})


def test_txt_event_container() -> None:
    records = legacy_record(17, 0x402, b"\x03" * 20) + legacy_record(17, 0x501, b"\x04" * 20)
    header_size = 20 + 12 + 4 + 12
    size = 0x1000
    header = (
        b"TXT Event Container\x00"
        + bytes(12)
        + bytes([1, 0, 1, 0])
        + struct.pack("<III", size, header_size, header_size + len(records))
    )
    raw = (header + records).ljust(size, b"\x00")
    log = el.parse_txt_event_container(raw)
    assert log.format == "txt-tpm12-container"
    assert [e.event_type for e in log.events] == [0x402, 0x501]
    with pytest.raises(EventLogError, match="do not fit"):
        el.parse_txt_event_container(header[:-4] + struct.pack("<I", size + 1) + records)
    with pytest.raises(EventLogError, match="signature"):
        el.parse_txt_event_container(b"X" + raw[1:])


def test_write_refuses_out_of_range_fields() -> None:
    with pytest.raises(ValueError, match="out of range"):
        el.write([Event(1 << 32, 4, {"sha256": bytes(32)}, b"")], ["sha256"])
    with pytest.raises(ValueError, match="out of range"):
        el.write_sha1([Event(-1, 4, {"sha1": bytes(20)}, b"")])
    with pytest.raises(ValueError, match="out of range"):
        SpecId(algorithms=((0x10000, 20),)).encode()
