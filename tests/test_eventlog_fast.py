"""The one-pass replay of crypto-agile logs (``replay_bytes``) against ``parse`` + ``replay``.

The fast path must give exactly what ``replay(parse(data))`` gives (values, bank order, PCR
order) on every real log and on generated ones, and on anything malformed either decline
(and let ``parse``/``replay`` raise their EventLogError) or agree: never another exception,
never a different answer.
"""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_eventlog import (
    ALL_REAL_LOGS,
    BANK_SIZES,
    REAL_LOGS,
    agile_logs,
    bit_flipped_logs,
    data_file,
    huge_field_logs,
    spec_header,
    truncated_logs,
)

from qubes_seal.cli import eventlog_cmd
from qubes_seal.measure import eventlog as el
from qubes_seal.measure.eventlog import Event, EventLogError, SpecId

Outcome = tuple[str, Any]


def reference(raw: bytes, drtm: bool) -> Outcome:
    """parse() + replay(): ("ok", values with orders) or ("error", message)."""
    try:
        values = el.replay(el.parse(raw), drtm=drtm)
    except EventLogError as exc:
        return "error", str(exc)
    return "ok", ordered(values)


def ordered(values: dict[str, dict[int, bytes]]) -> list[tuple[str, list[tuple[int, bytes]]]]:
    """Values with their dict orders made part of the comparison."""
    return [(bank, list(pcrs.items())) for bank, pcrs in values.items()]


def fast_outcome(raw: bytes, drtm: bool) -> Outcome:
    try:
        values = el.replay_bytes(raw, drtm=drtm)
    except EventLogError as exc:
        return "error", str(exc)
    return "ok", ordered(values)


def check_same(raw: bytes) -> None:
    """replay_bytes agrees with parse+replay; the fast walk itself never raises."""
    for drtm in (False, True):
        expected = reference(raw, drtm)
        assert fast_outcome(raw, drtm) == expected
        fast = el._replay_agile_fast(raw, drtm)  # must not raise anything
        if fast is not None:
            assert expected[0] == "ok"
            values, banks, events = fast
            assert ordered(values) == expected[1]
            log = el.parse(raw)
            assert log.format == el.FORMAT_CRYPTO_AGILE
            assert banks == log.banks
            assert events == len(log.events)


# --- Real logs --------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", REAL_LOGS, ids=[*ALL_REAL_LOGS, "windows_gcp"])
def test_real_logs(raw: bytes) -> None:
    check_same(raw)
    if el.parse(raw).format == el.FORMAT_CRYPTO_AGILE:
        # Well-formed crypto-agile logs take the fast path, not the fallback.
        assert el._replay_agile_fast(raw, False) is not None


def test_every_binary_log_of_the_testdata() -> None:
    root = data_file("MANIFEST.txt").parent
    checked = 0
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.suffix not in (".yaml", ".json", ".xz", ".txt", ".md"):
            check_same(path.read_bytes())
            checked += 1
    assert checked >= len(ALL_REAL_LOGS)


def test_sha1_and_txt_logs_take_the_fallback() -> None:
    raw = data_file("tpm2-tools/event-uefi-sha1-log.bin").read_bytes()
    assert el._replay_agile_fast(raw, False) is None
    assert el.replay_bytes(raw) == el.replay(el.parse(raw))
    container = el.TXT_EVENT_CONTAINER_SIGNATURE + bytes(60)
    assert el._replay_agile_fast(container, True) is None


# --- Generated logs -------------------------------------------------------------------------


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(agile_logs(), st.booleans())
def test_generated_logs(case: tuple[list[Event], list[str], SpecId], padded: bool) -> None:
    events, banks, spec = case
    raw = el.write(events, banks, spec_id=spec)
    if padded:
        raw += bytes(0x2000 - len(raw) % 0x2000)
    check_same(raw)


def locality_data(locality: int) -> bytes:
    return el.STARTUP_LOCALITY_SIGNATURE + bytes([locality])


@st.composite
def replayable_logs(draw: st.DrawFn) -> bytes:
    """Logs that exercise the replay rules: PCRs 0-24, StartupLocality, H-CRTM, EV_NO_ACTION,
    events with a subset of the banks or another order, unknown banks."""
    banks = draw(st.lists(st.sampled_from(sorted(BANK_SIZES)), min_size=1, max_size=3, unique=True))
    algorithms = [(el.alg_id(b), BANK_SIZES[b]) for b in banks]
    if draw(st.booleans()):
        algorithms.append((0x7777, draw(st.integers(1, 40))))
    spec = SpecId(algorithms=tuple(algorithms))
    sizes = spec.digest_sizes()
    names = list(sizes)
    events: list[Event] = []
    for _ in range(draw(st.integers(0, 16))):
        pcr = draw(st.sampled_from([0, 0, 0, 4, 7, 17, 18, 22, 23, 24, 0xFFFFFFFF]))
        event_type = draw(
            st.sampled_from(
                [el.EV_NO_ACTION, el.EV_EFI_HCRTM_EVENT, el.EV_IPL, el.EV_SEPARATOR, 0x501]
            )
        )
        data = draw(
            st.one_of(
                st.binary(max_size=8),
                st.builds(locality_data, st.integers(0, 4)),
                st.just(el.STARTUP_LOCALITY_SIGNATURE),
            )
        )
        if draw(st.booleans()):
            chosen = names  # the full layout
        else:
            chosen = draw(st.permutations(names))[: draw(st.integers(1, len(names)))]
        digests = {b: draw(st.binary(min_size=sizes[b], max_size=sizes[b])) for b in chosen}
        events.append(Event(pcr, event_type, digests, data))
    return el.write(events, names, spec_id=spec)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(replayable_logs())
def test_replay_rules(raw: bytes) -> None:
    check_same(raw)


def test_zero_digest_events_and_locality_rules() -> None:
    spec = SpecId(algorithms=((el.ALG_SHA1, 20), (el.ALG_SHA256, 32)))
    header = el.write([], ["sha1", "sha256"], spec_id=spec)

    def record(pcr: int, event_type: int, digests: list[tuple[int, bytes]], data: bytes) -> bytes:
        out = struct.pack("<III", pcr, event_type, len(digests))
        for alg, digest in digests:
            out += struct.pack("<H", alg) + digest
        return out + struct.pack("<I", len(data)) + data

    locality = record(0, el.EV_NO_ACTION, [], locality_data(3))
    empty_pcr0 = record(0, el.EV_IPL, [], b"")
    hcrtm = record(0, el.EV_EFI_HCRTM_EVENT, [(el.ALG_SHA1, bytes(20))], b"")
    ipl = record(0, el.EV_IPL, [(el.ALG_SHA256, bytes(32)), (el.ALG_SHA1, bytes(20))], b"x")
    for body in (
        [locality, ipl],
        [empty_pcr0, locality, ipl],  # no digest: PCR 0 is not extended
        [ipl, locality],  # StartupLocality after PCR 0 was extended
        [locality, locality],
        [hcrtm, ipl],
        [locality, hcrtm],  # H-CRTM but StartupLocality said 3
        [ipl, hcrtm],
        [record(24, el.EV_NO_ACTION, [], b"")],  # EV_NO_ACTION: no PCR range check
        [record(24, el.EV_IPL, [], b"")],
    ):
        check_same(header + b"".join(body))


# --- Malformed input ---------------------------------------------------------------------------


@settings(max_examples=300, deadline=2000)
@given(truncated_logs())
def test_truncations(raw: bytes) -> None:
    check_same(raw)


@settings(max_examples=300, deadline=2000)
@given(bit_flipped_logs())
def test_bit_flips(raw: bytes) -> None:
    check_same(raw)


@settings(max_examples=300, deadline=2000)
@given(huge_field_logs())
def test_huge_counts_and_sizes(raw: bytes) -> None:
    check_same(raw)


@settings(max_examples=300, deadline=2000)
@given(st.binary(max_size=512))
def test_random_bytes(raw: bytes) -> None:
    check_same(raw)
    check_same(spec_header([(el.ALG_SHA1, 20), (el.ALG_SHA256, 32)]) + raw)


def test_every_truncation_of_a_small_agile_log() -> None:
    raw = data_file("tpm2-tools/event-sd-boot-fedora37.bin").read_bytes()
    for cut in range(len(raw) + 1):
        check_same(raw[:cut])


# --- The CLI ---------------------------------------------------------------------------------


def cli_replay(path: Path, capsys: pytest.CaptureFixture[str], *, drtm: bool) -> Any:
    args = argparse.Namespace(
        file=None if drtm else str(path), txt=str(path) if drtm else None, json=True
    )
    assert eventlog_cmd.cmd_replay(args) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("name", ALL_REAL_LOGS)
@pytest.mark.parametrize("drtm", [False, True])
def test_cli_replay_same_document_as_the_parse_path(
    name: str, drtm: bool, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = data_file(name)
    fast = cli_replay(path, capsys, drtm=drtm)
    monkeypatch.setattr(el, "_replay_agile_fast", lambda data, drtm: None)
    slow = cli_replay(path, capsys, drtm=drtm)
    assert fast == slow


def test_cli_replay_error_is_the_parse_paths(tmp_path: Path) -> None:
    raw = data_file("tpm2-tools/event-sd-boot-fedora37.bin").read_bytes()
    path = tmp_path / "cut.bin"
    path.write_bytes(raw[:-3])
    args = argparse.Namespace(file=str(path), txt=None, json=True)
    with pytest.raises(EventLogError) as info:
        eventlog_cmd.cmd_replay(args)
    with pytest.raises(EventLogError) as expected:
        el.parse(raw[:-3])
    assert info.value.message == f"{path}: {expected.value.message}"
