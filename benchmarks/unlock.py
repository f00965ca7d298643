#!/usr/bin/env python3
"""The unlock chain's time, split into its parts: TPM, Argon2id, cryptsetup, keystore.

One swtpm, one container initialised with the KDF calibrated as `qubes-seal init` does
(target 1 s, memory as the machine allows) unless --kdf-time/--kdf-memory say otherwise;
then N reboots, each followed by `qubes-seal unlock --json` (a process, as a user runs it),
whose per-part timings are collected.  Prints a table of medians.

    .venv/bin/python benchmarks/unlock.py [--runs 5] [--kdf-time MS --kdf-memory KIB]
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from qubes_seal import chain
from qubes_seal.luks.container import Container
from qubes_seal.sim.proxy import CountingProxy
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import sample_modules, txt_launch

PARTS = ["tpm", "argon2id", "cryptsetup", "token", "keystore", "token+header", "hkdf", "handover"]


def cli(tcti: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
    env["TSS2_LOG"] = "all+NONE"
    return subprocess.run(
        [sys.executable, "-m", "qubes_seal", "--tpm", tcti, *args],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--kdf-time", type=int, help="Argon2id target ms (default: calibrated, 1000)")
    ap.add_argument("--kdf-memory", type=int, help="Argon2id KiB (default: calibrated)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="qs-bench-unlock.") as tmp:
        d = Path(tmp)
        pw = d / "pw"
        pw.write_text("benchmark passphrase\n")
        container = d / "keys.luks"
        kdf = []
        if args.kdf_time is not None:
            kdf += ["--kdf-time", str(args.kdf_time)]
        if args.kdf_memory is not None:
            kdf += ["--kdf-memory", str(args.kdf_memory)]
        with Swtpm(d / "tpm") as sw:
            txt_launch(sw, sample_modules())
            t0 = time.perf_counter()
            res = cli(sw.tcti, "--state-dir", str(d / "s"), "init", "--container", str(container),
                      "--passphrase-file", str(pw), "--recovery-key-file", str(d / "rk"),
                      "--json", *kdf)  # fmt: skip
            init_s = time.perf_counter() - t0
            if res.returncode != 0:
                print(res.stderr, file=sys.stderr)
                return 1
            token = chain.read_token(Container(container))[1]
            samples: dict[str, list[float]] = {p: [] for p in PARTS}
            totals: list[float] = []
            commands: list[str] = []
            for _ in range(args.runs):
                chain.lock(container)  # a reboot: the keyring starts empty
                sw.reboot()
                txt_launch(sw, sample_modules())
                with CountingProxy(sw.port) as proxy:  # the TPM commands of one unlock
                    t0 = time.perf_counter()
                    res = cli(proxy.tcti, "unlock", "--container", str(container),
                              "--passphrase-file", str(pw), "--json")  # fmt: skip
                    totals.append((time.perf_counter() - t0) * 1000)
                    commands = proxy.commands
                if res.returncode != 0:
                    print(res.stderr, file=sys.stderr)
                    return 1
                for part, ms in json.loads(res.stdout)["timings_ms"].items():
                    samples.setdefault(part, []).append(ms)
                chain.lock(container)
    med = {p: statistics.median(v) for p, v in samples.items() if v}
    measured = sum(med.values())
    doc = {
        "kdf": token.kdf,
        "init_seconds": round(init_s, 2),
        "runs": args.runs,
        "median_ms": {k: round(v, 1) for k, v in med.items()},
        "process_total_ms": round(statistics.median(totals), 1),
        "tpm_commands": len(commands),
        "tpm_command_names": commands,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    k = token.kdf
    print(f"Argon2id: t={k['time_cost']} m={k['memory_kib']} KiB p={k['parallelism']};"
          f" init took {init_s:.1f} s (calibration included); {args.runs} unlocks")  # fmt: skip
    print(f"{'part':<16}{'median ms':>10}{'share':>8}")
    for p, v in sorted(med.items(), key=lambda kv: -kv[1]):
        print(f"{p:<16}{v:>10.1f}{v / measured:>8.0%}")
    print(f"{'sum of parts':<16}{measured:>10.1f}")
    other = statistics.median(totals) - measured
    print(f"{'process + imports':<16}{other:>10.1f}")
    print(f"{'unlock command':<16}{statistics.median(totals):>10.1f}   (process start to exit)")
    print(f"TPM commands per unlock: {len(commands)} ({', '.join(commands)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
