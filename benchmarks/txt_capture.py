"""TXT log capture benchmark: ``qubes-seal eventlog capture --mem IMAGE`` on a full heap.

The memory image is the harness's (``qubes_seal.sim.txt_launch.write_memory_image``): the
real machine's registers and heap layout (TXT.HEAP.SIZE 0xE0000), with tboot's 0x2000-byte
TCG log buffer filled with SHA-256 events.  Also a heap of the largest size capture accepts
(``txt_heap.MAX_HEAP_SIZE``), read whole.  Reported: the median wall time of

(a) the library in this process: :func:`qubes_seal.measure.txt_heap.capture`;
(b) the CLI as a process: ``python -m qubes_seal eventlog capture --mem IMAGE --out F``.

    .venv/bin/python benchmarks/txt_capture.py [--runs N] [--json]
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from qubes_seal.measure import eventlog as el
from qubes_seal.measure import txt_heap
from qubes_seal.sim import txt_launch as tl


def full_log_events(buffer: int) -> list[el.Event]:
    """As many SHA-256 events as fit tboot's TCG buffer (each 50 bytes, no data)."""
    events: list[el.Event] = []
    while True:
        digest = hashlib.sha256(len(events).to_bytes(4, "little")).digest()
        candidate = [*events, el.Event(17, el.EVTYPE_TB_MEASUREMENT, {"sha256": digest}, b"")]
        if len(el.write(candidate, ["sha256"])) > buffer:
            return events
        events = candidate


def median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, heap_size in (("0xE0000 heap (real)", 0xE0000),
                                 ("64 MiB heap (cap)", txt_heap.MAX_HEAP_SIZE)):  # fmt: skip
            layout = tl.HeapLayout(heap_size=heap_size)
            events = full_log_events(layout.tcg_log_size)
            image = tl.write_memory_image(Path(tmp) / "m.img", events, heap_layout=layout)
            assert txt_heap.capture(str(image.path)).log == image.log
            out = Path(tmp) / "out.log"
            cmd = [sys.executable, "-m", "qubes_seal", "eventlog", "capture",
                   "--mem", str(image.path), "--out", str(out)]  # fmt: skip
            env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
            subprocess.run(cmd, check=True, capture_output=True, env=env)  # warm-up
            lib = median_ms(functools.partial(txt_heap.capture, str(image.path)), args.runs)
            run = functools.partial(subprocess.run, cmd, check=True, capture_output=True, env=env)
            cli = median_ms(run, max(3, args.runs // 4))
            rows.append({"heap": label, "heap_size": heap_size, "events": len(events),
                         "log_bytes": len(image.log), "library_ms": round(lib, 2),
                         "cli_ms": round(cli, 1)})  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'heap':<22} {'events':>6} {'log':>6} {'library':>10} {'CLI process':>12}")
    for r in rows:
        print(f"{r['heap']:<22} {r['events']:>6} {r['log_bytes']:>6} "
              f"{r['library_ms']:>8.2f}ms {r['cli_ms']:>10.1f}ms")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
