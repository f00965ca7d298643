#!/usr/bin/env python3
"""The time of each rotation with 10, 100 and 1,000 domain keys in the container.

For each domain count: one swtpm, one container initialised with a cheap Argon2id
(``--kdf-memory 8192 --kdf-time 20``: the KDF is a fixed cost chosen by the user, excluded
from what is compared), one boot and unlock, then the domain keys added through the library
(this boot's hand-over, one keystore write).  Then N runs of each rotation, each a
``qubes-seal`` process as a user runs it (process start to exit, so Python start and
imports are included; the ``domain list`` row is that baseline):

    rotate passphrase          --passphrase-file OLD --new-passphrase-file NEW (alternating)
    rotate master              --passphrase-file CURRENT
    rotate recovery            --recovery-key-file NEW-FILE
    rotate signer              (a new policy-signing key and sealed object)
    domain rotate NAME         then
    domain rotate NAME --commit

and, once per domain count, ``rotate passphrase`` on a second container initialised with the
KDF calibrated as ``qubes-seal init`` does by default (about 1 s, memory as the machine
allows; a passphrase rotation keeps that cost with a new salt).

The keystore lives in the container's data area, in two A/B slots of half the data area
each; the benchmark prints the slot size and the record size at the largest count, and uses
a bigger ``--size`` than the default (16M) only if the keys do not fit.

    .venv/bin/python benchmarks/rotate.py [--sizes 10,100,1000] [--runs 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qubes_seal import chain
from qubes_seal.keystore import KeystoreFull, encode, hmac_key_from_volume_key
from qubes_seal.luks.container import Container
from qubes_seal.luks.payload import UserspacePayload
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import sample_modules, txt_launch

CHEAP_KDF = ["--kdf-memory", "8192", "--kdf-time", "20"]
DEFAULT_SIZE = "16M"
ROWS = [
    "domain list (baseline)",
    "rotate passphrase",
    "rotate master",
    "rotate recovery",
    "rotate signer",
    "domain rotate NAME",
    "domain rotate --commit",
    "rotate passphrase (calibrated KDF)",
]


class Failed(Exception):
    pass


class Machine:
    """One swtpm, state dir and container, unlocked in its current boot."""

    def __init__(self, sw: Swtpm, d: Path) -> None:
        self.sw, self.d = sw, d
        self.container = d / "keys.luks"
        self.pw = [d / "pw-a", d / "pw-b"]
        self.pw[0].write_text("benchmark passphrase one\n")
        self.pw[1].write_text("benchmark passphrase two\n")
        self.current = 0
        self.recovery_files = 0
        self.uuid0 = ""

    def cli(self, *args: str) -> float:
        """Run one qubes-seal command; its wall-clock time in ms (Failed if it fails)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
        env["TSS2_LOG"] = "all+NONE"
        cmd = [sys.executable, "-m", "qubes_seal", "--tpm", self.sw.tcti, "--state-dir",
               str(self.d / "state"), *args, "--container", str(self.container)]  # fmt: skip
        t0 = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
        ms = (time.perf_counter() - t0) * 1000
        if res.returncode != 0:
            raise Failed(f"{' '.join(args)}: exit {res.returncode}: {res.stderr.strip()}")
        return ms

    def init(self, kdf: list[str], size: str) -> None:
        txt_launch(self.sw, sample_modules())
        self.cli("init", "--size", size, "--passphrase-file", str(self.pw[0]),
                 "--recovery-key-file", str(self.d / "rk-0"), *kdf)  # fmt: skip
        self.sw.reboot()
        txt_launch(self.sw, sample_modules())
        self.cli("unlock", "--passphrase-file", str(self.pw[0]))

    def add_domains(self, count: int) -> tuple[int, int]:
        """Add ``count`` domain keys in one keystore write; (record bytes, slot bytes)."""
        unlocked = chain.open_handed_over(self.container)
        if unlocked is None:
            raise Failed("no hand-over after the unlock")
        try:
            ks = unlocked.keystore
            for i in range(count):
                ks.add(f"dom-{i:04d}", qube_uuid=str(uuid.uuid4()))
            self.uuid0 = str(ks.domains["dom-0000"].qube_uuid)
            unlocked.save()  # KeystoreFull if the record does not fit in a slot
            with (
                hmac_key_from_volume_key(unlocked.volume_key) as hkey,
                UserspacePayload(Container(self.container), unlocked.volume_key) as payload,
            ):
                return len(encode(ks, hkey)), payload.size // 2
        finally:
            unlocked.keystore.wipe()
            unlocked.close()

    def rotate(self, row: str, kdf: list[str]) -> float:
        if row == "domain list (baseline)":
            return self.cli("domain", "list")
        if row.startswith("rotate passphrase"):
            old, new = self.pw[self.current], self.pw[1 - self.current]
            ms = self.cli("rotate", "passphrase", "--passphrase-file", str(old),
                          "--new-passphrase-file", str(new), *kdf)  # fmt: skip
            self.current = 1 - self.current
            return ms
        if row == "rotate master":
            return self.cli("rotate", "master", "--passphrase-file", str(self.pw[self.current]))
        if row == "rotate recovery":
            self.recovery_files += 1
            rk = self.d / f"rk-{self.recovery_files}"
            return self.cli("rotate", "recovery", "--recovery-key-file", str(rk))
        if row == "rotate signer":
            return self.cli("rotate", "signer", "--passphrase-file", str(self.pw[self.current]))
        if row == "domain rotate NAME":
            return self.cli("domain", "rotate", "dom-0000", "--uuid", self.uuid0)
        if row == "domain rotate --commit":
            return self.cli("domain", "rotate", "dom-0000", "--uuid", self.uuid0, "--commit")
        raise ValueError(row)


def measure(count: int, runs: int, *, calibrated: bool, size: str) -> dict[str, object]:
    kdf = [] if calibrated else CHEAP_KDF
    rows = ROWS[-1:] if calibrated else ROWS[:-1]
    with tempfile.TemporaryDirectory(prefix="qs-bench-rotate.") as tmp:
        d = Path(tmp)
        with Swtpm(d / "tpm") as sw:
            m = Machine(sw, d)
            try:
                m.init(kdf, size)
                record, slot = m.add_domains(count)
                k = chain.read_token(Container(m.container))[1].kdf
                kdf_text = f"t={k['time_cost']} m={k['memory_kib']} KiB p={k['parallelism']}"
                times: dict[str, list[float]] = {r: [] for r in rows}
                for _ in range(1 if calibrated else runs):
                    for r in rows:
                        times[r].append(m.rotate(r, CHEAP_KDF if r == "rotate passphrase" else []))
            finally:
                if m.container.exists():
                    chain.lock(m.container)  # leave no hand-over in root's keyring
    return {"record_bytes": record, "slot_bytes": slot, "ms": times, "kdf": kdf_text}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="10,100,1000", help="domain counts (default 10,100,1000)")
    ap.add_argument("--runs", type=int, default=3, help="runs of each rotation (default 3)")
    ap.add_argument("--no-calibrated", action="store_true",
                    help="skip the passphrase rotation with the calibrated KDF")  # fmt: skip
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    counts = [int(c) for c in args.sizes.split(",") if c.strip()]
    results: dict[int, dict[str, list[float]]] = {}
    notes: list[str] = []
    for count in counts:
        size = DEFAULT_SIZE
        try:
            cheap = measure(count, args.runs, calibrated=False, size=size)
        except KeystoreFull as exc:
            size = "64M"
            notes.append(f"{count} keys do not fit in --size {DEFAULT_SIZE} ({exc.message}): "
                         f"--size {size}")  # fmt: skip
            cheap = measure(count, args.runs, calibrated=False, size=size)
        except Failed as exc:
            print(f"rotate benchmark: {exc}", file=sys.stderr)
            return 1
        times = dict(cheap["ms"])  # type: ignore[call-overload]
        notes.append(f"{count} keys: keystore record {cheap['record_bytes']} bytes, "
                     f"slot {cheap['slot_bytes']} bytes (--size {size})")  # fmt: skip
        if not args.no_calibrated:
            try:
                cal = measure(count, 1, calibrated=True, size=size)
            except Failed as exc:
                print(f"rotate benchmark: {exc}", file=sys.stderr)
                return 1
            times.update(cal["ms"])  # type: ignore[call-overload]
            notes.append(f"{count} keys, calibrated container: Argon2id {cal['kdf']}")
        results[count] = times
    if args.json:
        print(json.dumps({"runs": args.runs, "notes": notes,
                          "ms": {str(c): t for c, t in results.items()}}, indent=2))  # fmt: skip
        return 0
    print(
        f"median ms of {args.runs} runs per cell (calibrated row: 1 run); each cell is one "
        "qubes-seal process, start to exit; Argon2id cheap (m=8192 KiB, 20 ms) except in "
        "the calibrated row"
    )
    for n in notes:
        print(f"  {n}")
    width = max(len(r) for r in ROWS) + 2
    print(f"{'rotation':<{width}}" + "".join(f"{f'{c} keys':>12}" for c in counts))
    for r in ROWS:
        cells = []
        for c in counts:
            v = results[c].get(r)
            cells.append(f"{statistics.median(v):>12.0f}" if v else f"{'-':>12}")
        print(f"{r:<{width}}" + "".join(cells))
    return 0


if __name__ == "__main__":
    sys.exit(main())
