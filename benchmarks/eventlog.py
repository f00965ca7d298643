"""Event log replay benchmark: ``qubes-seal eventlog replay --json`` against ``tpm2_eventlog``.

Two logs, each read by both tools in the same run:

* the largest real binary log of ../shared/testdata (chosen by size among the files that
  parse as an event log), and
* a synthetic crypto-agile log of 10,000 events (SHA-1 and SHA-256 banks) written with
  :func:`qubes_seal.measure.eventlog.write`: boot-application loads into PCR 4
  (EV_EFI_BOOT_SERVICES_APPLICATION with a UEFI_IMAGE_LOAD_EVENT), GRUB commands into
  PCR 8 and files into PCR 9 (EV_IPL), with the digests tpm2_eventlog checks.  Before any
  timing, ``tpm2_eventlog`` must read it without an error or a warning.

For each log it reports the median wall time of ``--runs`` runs of

(a) our CLI as a process: ``python -m qubes_seal eventlog replay --json FILE``;
(b) ``tpm2_eventlog FILE`` (tpm2-tools) as a process;
(c) our library in this process: :func:`~qubes_seal.measure.eventlog.parse` then
    :func:`~qubes_seal.measure.eventlog.replay` (no interpreter start, no imports);

and whether the target "not slower than tpm2_eventlog" (a against b, median) is met.  The
two tools' final PCRs are compared too: a fast wrong answer is no answer.  Runs of (a) and
(b) are interleaved so a noisy moment of the machine does not fall on one tool only.

Our CLI runs with the byte-code cache in place, as an installed package has it: a
``PYTHONDONTWRITEBYTECODE`` in the environment is dropped for the children and one
untimed warm-up run per tool writes the cache.

    .venv/bin/python benchmarks/eventlog.py [--runs N] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qubes_seal.measure import eventlog as el

ROOT = Path(__file__).resolve().parents[1]
TESTDATA = ROOT.parent / "shared" / "testdata"
DEFAULT_RUNS = 20
QUICK_RUNS = 3
SYNTHETIC_EVENTS = 10_000
TIMEOUT = 120.0
TARGET = "not slower than tpm2_eventlog (median, process against process)"
NOT_LOGS = (".yaml", ".json", ".xz", ".txt", ".md", ".gz")


@dataclass
class Case:
    label: str
    path: Path
    events: int = 0
    ours_ms: list[float] = field(default_factory=list)
    theirs_ms: list[float] = field(default_factory=list)
    library_ms: list[float] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    pcrs_agree: bool | None = None

    def median(self, values: list[float]) -> float | None:
        return statistics.median(values) if values else None


# --- the logs ----------------------------------------------------------------------------


def largest_real_log() -> Path:
    """The largest file of the shared test data that parses as a binary event log."""
    best: tuple[int, Path] | None = None
    for path in sorted(TESTDATA.rglob("*")):
        if not path.is_file() or path.name.endswith(NOT_LOGS):
            continue
        try:
            el.parse(path.read_bytes())
        except el.EventLogError:
            continue
        size = path.stat().st_size
        if best is None or size > best[0]:
            best = (size, path)
    if best is None:
        raise SystemExit(f"no binary event log found under {TESTDATA}")
    return best[1]


def _event(pcr: int, event_type: int, data: bytes, measured: bytes) -> el.Event:
    digests = {"sha1": hashlib.sha1(measured).digest(), "sha256": hashlib.sha256(measured).digest()}
    return el.Event(pcr, event_type, digests, data)


def synthetic_events(count: int) -> list[el.Event]:
    """A boot's worth of realistic events, repeated: what tpm2_eventlog reads without warning.

    * PCR 4, EV_EFI_BOOT_SERVICES_APPLICATION: a UEFI_IMAGE_LOAD_EVENT (location, length,
      link-time address, device path length) with an end-of-path device path node; the
      digest is the image's (tpm2_eventlog cannot check it).
    * PCR 8, EV_IPL: GRUB's ``grub_cmd: ...`` string; the digest is of the command without
      the prefix and the NUL, as GRUB measures it (tpm2_eventlog checks this one).
    * PCR 9, EV_IPL: a file path with its NUL, digest of the string (as GRUB logs files).
    """
    events = []
    for i in range(count):
        kind = i % 3
        if kind == 0:
            end_of_path = b"\x7f\xff\x04\x00"
            data = struct.pack("<QQQQ", 0x7000_0000 + i * 0x1000, 0x10_0000, 0, len(end_of_path))
            events.append(
                _event(4, el.EV_EFI_BOOT_SERVICES_APPLICATION, data + end_of_path, b"img%d" % i)
            )
        elif kind == 1:
            command = b"linux /vmlinuz-6.6.%d root=/dev/mapper/qubes_dom0-root ro" % i
            events.append(_event(8, el.EV_IPL, b"grub_cmd: " + command + b"\x00", command))
        else:
            path = b"(hd0,gpt2)/vmlinuz-6.6.%d\x00" % i
            events.append(_event(9, el.EV_IPL, path, path))
    return events


# --- running the tools ---------------------------------------------------------------------


def child_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def timed(argv: Sequence[str], env: dict[str, str]) -> tuple[float, int]:
    """Wall time (ms) of one process run, output discarded, and its exit status."""
    start = time.perf_counter()
    proc = subprocess.run(
        argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, check=False
    )
    return (time.perf_counter() - start) * 1e3, proc.returncode


def yaml_pcrs(text: str) -> dict[str, dict[str, str]]:
    """The ``pcrs:`` section of tpm2_eventlog's output: bank -> PCR -> lowercase hex."""
    _, _, section = text.partition("\npcrs:\n")
    pcrs: dict[str, dict[str, str]] = {}
    bank = None
    for line in section.splitlines():
        if m := re.fullmatch(r"  (\w+):\s*", line):
            bank = m.group(1)
            pcrs[bank] = {}
        elif (m := re.fullmatch(r"    (\d+)\s*:\s*0x([0-9a-fA-F]+)\s*", line)) and bank:
            pcrs[bank][str(int(m.group(1)))] = m.group(2).lower()
        elif line and not line.startswith(" "):
            break
    return pcrs


def check_tools(case: Case, ours: list[str], theirs: list[str] | None, env: dict[str, str]) -> bool:
    """Untimed warm-up and checks: both read the log, and agree on the PCRs."""
    mine = subprocess.run(ours, capture_output=True, text=True, env=env, timeout=TIMEOUT)
    if mine.returncode != 0:
        case.notes.append(f"qubes-seal failed: {mine.stderr.strip()[-300:]}")
        return False
    our_pcrs = json.loads(mine.stdout)["pcrs"]
    if theirs is None:
        return True
    other = subprocess.run(theirs, capture_output=True, text=True, env=env, timeout=TIMEOUT)
    if other.returncode != 0:
        case.notes.append(f"tpm2_eventlog rejects it (exit {other.returncode})")
    elif other.stderr.strip():
        first = other.stderr.strip().splitlines()[0]
        case.notes.append(f"tpm2_eventlog warns: {first}")
    if other.returncode == 0:
        their_pcrs = yaml_pcrs(other.stdout)
        case.pcrs_agree = their_pcrs == our_pcrs
        if not case.pcrs_agree:
            keys = {(b, p) for b, pcrs in [*our_pcrs.items(), *their_pcrs.items()] for p in pcrs}
            differ = sorted(
                (b, int(p))
                for b, p in keys
                if our_pcrs.get(b, {}).get(p) != their_pcrs.get(b, {}).get(p)
            )
            case.notes.append("they differ on " + ", ".join(f"{b} PCR {p}" for b, p in differ))
            if all(p == 0 for _, p in differ) and any(
                e.event_type == el.EV_EFI_HCRTM_EVENT
                for e in el.parse(case.path.read_bytes()).events
            ):
                case.notes.append(
                    "an H-CRTM log: tpm2_eventlog starts PCR 0 at zero, the TPM (and we) at "
                    "00..04 (tpm2-tss reads 15f4e6ca.. for sha1 PCR 0 from the system)"
                )
    return True


def library_run(raw: bytes) -> float:
    start = time.perf_counter()
    el.replay(el.parse(raw))
    return (time.perf_counter() - start) * 1e3


def run_case(case: Case, runs: int, tpm2_eventlog: str | None, env: dict[str, str]) -> bool:
    raw = case.path.read_bytes()
    case.events = len(el.parse(raw).events)
    ours = [sys.executable, "-m", "qubes_seal", "eventlog", "replay", "--json", str(case.path)]
    theirs = [tpm2_eventlog, str(case.path)] if tpm2_eventlog else None
    if not check_tools(case, ours, theirs, env):
        return False
    tools: list[tuple[list[float], Callable[[], tuple[float, int]]]] = [
        (case.ours_ms, lambda: timed(ours, env))
    ]
    if theirs is not None:
        tools.append((case.theirs_ms, lambda: timed(theirs, env)))
    for _ in range(runs):
        for times, run in tools:
            elapsed, code = run()
            if code == 0:
                times.append(elapsed)
        case.library_ms.append(library_run(raw))
    return bool(case.ours_ms)


# --- report --------------------------------------------------------------------------------


def fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def verdict(case: Case) -> str:
    ours, theirs = case.median(case.ours_ms), case.median(case.theirs_ms)
    if ours is None or theirs is None:
        return "NOT MEASURED"
    return "MET" if ours <= theirs else "NOT MET"


def report(cases: list[Case], runs: int, floor_ms: float) -> str:
    header = (
        f"{'log':<44} {'events':>6} {'ours CLI':>9} {'tpm2_eventlog':>13} {'ratio':>6} "
        f"{'ours lib':>9}  target"
    )
    lines = [f"median wall time in ms of {runs} runs; ratio = tpm2_eventlog / ours CLI", header]
    for case in cases:
        ours, theirs = case.median(case.ours_ms), case.median(case.theirs_ms)
        ratio = f"{theirs / ours:.2f}x" if ours and theirs else "-"
        lines.append(
            f"{case.label:<44} {case.events:>6} {fmt(ours):>9} {fmt(theirs):>13} {ratio:>6} "
            f"{fmt(case.median(case.library_ms)):>9}  {verdict(case)}"
        )
    lines.append("")
    lines.append(f"target: {TARGET}")
    lines.append(
        f"interpreter floor: `python -c pass` (site and the editable-install finder "
        f"included) takes {floor_ms:.1f} ms before any of our code runs"
    )
    for case in cases:
        agree = {None: "not compared", True: "agree", False: "DIFFER"}[case.pcrs_agree]
        lines.append(f"{case.label}: PCRs of both tools {agree}")
        lines += [f"  {note}" for note in case.notes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="timed runs per tool")
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_RUNS} runs (smoke test)")
    parser.add_argument("--json", action="store_true", help="one JSON object, every time kept")
    args = parser.parse_args(argv)
    runs = QUICK_RUNS if args.quick else args.runs
    if runs < 1:
        parser.error("--runs must be at least 1")
    tpm2_eventlog = shutil.which("tpm2_eventlog")
    env = child_env()
    floor = [timed([sys.executable, "-c", "pass"], env)[0] for _ in range(max(runs, 5))]
    with tempfile.TemporaryDirectory(prefix="qubes-seal-eventlog-bench-") as tmp:
        synthetic = Path(tmp) / "synthetic-10000-events.bin"
        synthetic.write_bytes(el.write(synthetic_events(SYNTHETIC_EVENTS), ["sha1", "sha256"]))
        real = largest_real_log()
        cases = [
            Case(f"{real.relative_to(TESTDATA)} ({real.stat().st_size // 1024} KiB)", real),
            Case(f"synthetic crypto-agile ({synthetic.stat().st_size // 1024} KiB)", synthetic),
        ]
        if tpm2_eventlog is None:
            for case in cases:
                case.notes.append("tpm2_eventlog not installed (Debian package tpm2-tools)")
        ok = all([run_case(case, runs, tpm2_eventlog, env) for case in cases])
    if args.json:
        doc: dict[str, Any] = {
            "runs": runs,
            "target": TARGET,
            "python_floor_ms": statistics.median(floor),
            "cases": [
                {
                    "log": c.label,
                    "events": c.events,
                    "ours_cli_ms": c.ours_ms,
                    "tpm2_eventlog_ms": c.theirs_ms,
                    "ours_library_ms": c.library_ms,
                    "target": verdict(c),
                    "pcrs_agree": c.pcrs_agree,
                    "notes": c.notes,
                }
                for c in cases
            ],
        }
        print(json.dumps(doc, indent=2))
    else:
        print(report(cases, runs, statistics.median(floor)))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
