"""Unseal benchmark: ``qubes-seal unseal --check`` against clevis and systemd-creds.

One run, one swtpm: a simulated Intel TXT launch sets PCR 17 and 18, then each tool seals a
secret to the same PCRs (SHA-256 bank, PCR 17+18) and unseals it ``--runs`` times.  For each
tool it reports

* the TPM commands of one unseal, counted on the wire by a :class:`CountingProxy` placed
  between the tool and swtpm (one separate, untimed run);
* the wall time of the whole command, process start to secret (``time.perf_counter`` around
  ``subprocess.run``), median and minimum over the timed runs;
* whether the tool left TPM handles loaded: swtpm has no resource manager, so a tool that
  exits without flushing fills the TPM's session or object slots for the next run.  The
  benchmark looks after every run (untimed) and flushes what it finds, as ANCHORS.md asks.

Runs are interleaved (ours, clevis, systemd-creds, ours, ...) so that a slow patch of the
machine does not land on one tool only.  A peer that cannot run here gets a row saying why;
the exit status is non-zero only when qubes-seal itself fails.

    .venv/bin/python benchmarks/unseal.py [--runs N] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# libtss2 prints ERROR lines on stderr for refused commands; quiet for us and every child.
os.environ.setdefault("TSS2_LOG", "all+NONE")

from qubes_seal.errors import QubesSealError
from qubes_seal.sim.proxy import CountingProxy
from qubes_seal.sim.swtpm import Swtpm, leaked_handles
from qubes_seal.sim.txt_launch import sample_modules, txt_launch

BANK = "sha256"
PCRS = (17, 18)
DEFAULT_RUNS = 20
QUICK_RUNS = 3
TIMEOUT = 120.0
STDERR_TAIL = 300

TARGET_COMMANDS = "fewer TPM commands than both clevis and systemd-creds"
TARGET_TIME = "unseal --check faster than clevis decrypt (median)"

IMPORT_CODE = (
    "import time; t = time.perf_counter(); "
    "import qubes_seal.cli.main, qubes_seal.tpm.unseal; "
    "print(time.perf_counter() - t)"
)


class BenchError(Exception):
    """A step of one tool failed; the message says which and why."""


# -- running commands --------------------------------------------------------------------------


@dataclass
class Command:
    """One command line with its environment; ``stdin`` is a file, ``expect`` the stdout."""

    argv: list[str]
    env: dict[str, str]
    stdin: Path | None = None
    expect: bytes | None = None

    def shell(self, extra_env: Sequence[str] = ()) -> str:
        """The command as a user would type it (for the report)."""
        words = [f"{k}={self.env[k]!r}" for k in extra_env if k in self.env]
        words += [a if a and " " not in a and '"' not in a else repr(a) for a in self.argv]
        text = " ".join(words)
        return f"{text} < {self.stdin.name}" if self.stdin else text


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a tool: ours minus any QUBES_SEAL_*/TPM choice, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("QUBES_SEAL_", "TPM2TOOLS_", "SYSTEMD_TPM2"))
    }
    env.update(extra)
    return env


def tail(data: bytes) -> str:
    text = data.decode(errors="replace").strip().replace("\n", " | ")
    return text[-STDERR_TAIL:] or "(nothing on stderr)"


def spawn(
    argv: list[str], env: dict[str, str], stdin: Any = None, data: bytes | None = None
) -> tuple[int, bytes, bytes]:
    """Run ``argv`` to completion and return (exit status, stdout, stderr).

    No ``timeout=`` argument: with one, ``subprocess`` waits for the child in a sleep loop
    (up to 50 ms per step), which would add milliseconds to the times measured.  A timer
    kills a child that hangs instead.
    """
    proc = subprocess.Popen(
        argv,
        env=env,
        stdin=subprocess.PIPE if data is not None else stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    watchdog = threading.Timer(TIMEOUT, proc.kill)
    watchdog.start()
    try:
        out, err = proc.communicate(data)
    finally:
        watchdog.cancel()
    return proc.returncode, out, err


def run(cmd: Command, *, what: str, data: bytes | None = None) -> tuple[float, bytes]:
    """Run ``cmd`` to completion; return (seconds, stdout).  Raise BenchError on failure."""
    stdin_file = cmd.stdin.open("rb") if cmd.stdin is not None else None
    try:
        began = time.perf_counter()
        code, out, err = spawn(cmd.argv, cmd.env, stdin_file, data)
        seconds = time.perf_counter() - began
    except OSError as exc:
        raise BenchError(f"{what}: {exc}") from exc
    finally:
        if stdin_file is not None:
            stdin_file.close()
    if code != 0:
        raise BenchError(f"{what} exited with {code}: {tail(err)}")
    if cmd.expect is not None and out != cmd.expect:
        raise BenchError(f"{what} printed something else than the sealed secret")
    return seconds, out


# -- the tools ---------------------------------------------------------------------------------


class Tool:
    """A sealing tool: how to seal once, and the command line of one unseal."""

    key = ""
    label = ""
    #: environment variables worth showing in the report's command lines
    shown_env: Sequence[str] = ()

    def __init__(self, work: Path, secret: bytes) -> None:
        self.work = work
        self.secret = secret

    def missing(self) -> str | None:
        """Why this tool cannot run on this machine, or None."""
        return None

    def seal_command(self, tcti: str) -> tuple[Command, bytes | None]:
        raise NotImplementedError

    def unseal_command(self, tcti: str) -> Command:
        raise NotImplementedError

    def seal(self, tcti: str) -> None:
        cmd, data = self.seal_command(tcti)
        run(cmd, what=f"{self.key} seal", data=data)


def ours_argv() -> list[str]:
    """The installed ``qubes-seal`` console script next to this Python, else ``-m``."""
    script = Path(sys.executable).parent / "qubes-seal"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "qubes_seal"]


class Ours(Tool):
    key = "qubes-seal"
    label = "qubes-seal unseal --check"

    @property
    def state_dir(self) -> Path:
        return self.work / "qubes-seal-state"

    def _argv(self, tcti: str, *args: str) -> list[str]:
        return [*ours_argv(), "--tpm", tcti, "--state-dir", str(self.state_dir), *args]

    def seal_command(self, tcti: str) -> tuple[Command, bytes | None]:
        pcrs = ",".join(map(str, PCRS))
        return Command(self._argv(tcti, "seal", "--pcrs", pcrs), child_env()), None

    def unseal_command(self, tcti: str) -> Command:
        return Command(self._argv(tcti, "unseal", "--check"), child_env())


class Clevis(Tool):
    """clevis 19's tpm2 pin: a bash script running tpm2-tools, which read TPM2TOOLS_TCTI.

    ``clevis-{en,de}crypt-tpm2`` only look for /dev/tpmrm? when TPM2TOOLS_TCTI is empty, so
    setting it to the swtpm TCTI is enough: no system file is touched.
    """

    key = "clevis"
    label = "clevis decrypt (tpm2 pin)"
    shown_env = ("TPM2TOOLS_TCTI",)

    @property
    def jwe(self) -> Path:
        return self.work / "clevis.jwe"

    def missing(self) -> str | None:
        for binary, package in (
            ("clevis", "clevis"),
            ("clevis-decrypt-tpm2", "clevis-tpm2"),
            ("jose", "jose"),
            ("tpm2_unseal", "tpm2-tools"),
        ):
            if shutil.which(binary) is None:
                return f"{binary} not found (Debian package {package})"
        return None

    def seal_command(self, tcti: str) -> tuple[Command, bytes | None]:
        config = json.dumps({"pcr_bank": BANK, "pcr_ids": ",".join(map(str, PCRS))})
        env = child_env(TPM2TOOLS_TCTI=tcti)
        return Command(["clevis", "encrypt", "tpm2", config], env), self.secret

    def seal(self, tcti: str) -> None:
        cmd, data = self.seal_command(tcti)
        _, jwe = run(cmd, what="clevis encrypt", data=data)
        self.jwe.write_bytes(jwe)

    def unseal_command(self, tcti: str) -> Command:
        env = child_env(TPM2TOOLS_TCTI=tcti)
        return Command(["clevis", "decrypt"], env, stdin=self.jwe, expect=self.secret)


class SystemdCreds(Tool):
    """systemd-creds (systemd 252): ``--tpm2-device=DRIVER:CONF`` loads libtss2-tcti-DRIVER.

    systemd's ``tpm2_context_init`` splits the device string at the first ':' and dlopens
    ``libtss2-tcti-<driver>.so.0`` with the rest as its configuration, so the swtpm TCTI string
    works as is.  It picks the SHA-256 bank by itself when the TPM has one.
    """

    key = "systemd-creds"
    label = "systemd-creds decrypt"

    @property
    def cred(self) -> Path:
        # The credential's embedded name is the file name: decrypt checks it against IN.
        return self.work / "bench.cred"

    def missing(self) -> str | None:
        if shutil.which("systemd-creds") is None:
            return "systemd-creds not found (Debian package systemd)"
        try:
            version = subprocess.run(
                ["systemd-creds", "--version"], capture_output=True, text=True, timeout=10
            ).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"systemd-creds --version failed: {exc}"
        if "+TPM2" not in version:
            return "this systemd was built without TPM2 support"
        return None

    def seal_command(self, tcti: str) -> tuple[Command, bytes | None]:
        argv = [
            "systemd-creds",
            "encrypt",
            "--with-key=tpm2",
            f"--tpm2-device={tcti}",
            f"--tpm2-pcrs={'+'.join(map(str, PCRS))}",
            "-",
            str(self.cred),
        ]
        return Command(argv, child_env()), self.secret

    def unseal_command(self, tcti: str) -> Command:
        argv = ["systemd-creds", "decrypt", f"--tpm2-device={tcti}", str(self.cred), "-"]
        return Command(argv, child_env(), expect=self.secret)


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Row:
    """What one tool did."""

    key: str
    label: str
    ours: bool
    status: str = "ok"  # ok | failed | unavailable
    reason: str = ""
    seal_cmdline: str = ""
    unseal_cmdline: str = ""
    commands: list[str] = field(default_factory=list)
    times_ms: list[float] = field(default_factory=list)
    seal_leaked: list[str] = field(default_factory=list)
    unseal_leaked: list[str] = field(default_factory=list)
    leaky_runs: int = 0

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.times_ms) if self.ok and self.times_ms else None

    @property
    def min_ms(self) -> float | None:
        return min(self.times_ms) if self.ok and self.times_ms else None

    def fail(self, exc: Exception) -> None:
        self.status, self.reason = "failed", str(exc)

    def as_json(self) -> dict[str, Any]:
        return {
            "tool": self.key,
            "label": self.label,
            "status": self.status,
            "reason": self.reason or None,
            "seal_command": self.seal_cmdline,
            "unseal_command": self.unseal_cmdline,
            "tpm_commands": len(self.commands) if self.ok else None,
            "tpm_command_names": self.commands,
            "median_ms": self.median_ms,
            "min_ms": self.min_ms,
            "times_ms": self.times_ms,
            "leaked_by_seal": self.seal_leaked,
            "leaked_by_one_unseal": self.unseal_leaked,
            "runs_that_leaked": self.leaky_runs,
        }


def flush_everything(tcti: str) -> None:
    """``tpm2_flushcontext -t -l -s``: flush transient objects, loaded and saved sessions."""
    if shutil.which("tpm2_flushcontext") is None:
        raise BenchError("handles leaked and tpm2_flushcontext (tpm2-tools) is not installed")
    cmd = Command(["tpm2_flushcontext", "-t", "-l", "-s"], child_env(TPM2TOOLS_TCTI=tcti))
    run(cmd, what="tpm2_flushcontext")


def sweep(tcti: str) -> list[str]:
    """The handles left in the TPM (flushed before returning); [] when it was clean."""
    leaked = leaked_handles(tcti)
    if leaked:
        flush_everything(tcti)
        left = leaked_handles(tcti)
        if left:
            raise BenchError(f"could not flush leaked handles: {', '.join(left)}")
    return leaked


def measure(tools: list[Tool], swtpm: Swtpm, proxy: CountingProxy, runs: int) -> list[Row]:
    rows: list[Row] = []
    active: list[tuple[Tool, Row, Command]] = []
    for tool in tools:
        row = Row(tool.key, tool.label, isinstance(tool, Ours))
        rows.append(row)
        seal_cmd, _ = tool.seal_command(swtpm.tcti)
        unseal_cmd = tool.unseal_command(swtpm.tcti)
        row.seal_cmdline = seal_cmd.shell(tool.shown_env)
        row.unseal_cmdline = unseal_cmd.shell(tool.shown_env)
        reason = tool.missing()
        if reason is not None:
            row.status, row.reason = "unavailable", reason
            continue
        try:
            tool.seal(swtpm.tcti)
            row.seal_leaked = sweep(swtpm.tcti)
            # One counted unseal through the proxy (also the warm-up run).
            proxy.reset()
            run(tool.unseal_command(proxy.tcti), what=f"{tool.key} unseal (counted)")
            row.commands = proxy.commands
            row.unseal_leaked = sweep(swtpm.tcti)
        except BenchError as exc:
            row.fail(exc)
            continue
        active.append((tool, row, unseal_cmd))
    for i in range(runs):
        for tool, row, cmd in active:
            if not row.ok:
                continue
            try:
                seconds, _ = run(cmd, what=f"{tool.key} unseal (run {i + 1})")
                row.times_ms.append(seconds * 1000.0)
                if sweep(swtpm.tcti):
                    row.leaky_runs += 1
            except BenchError as exc:
                row.fail(exc)
    return rows


def import_time(runs: int) -> dict[str, float]:
    """Median import time of the unseal path in a fresh interpreter, and its start time."""
    env = child_env()
    imports: list[float] = []
    starts: list[float] = []
    for _ in range(runs):
        began = time.perf_counter()
        code, _, err = spawn([sys.executable, "-c", "pass"], env)
        starts.append((time.perf_counter() - began) * 1000.0)
        code2, out, err2 = spawn([sys.executable, "-c", IMPORT_CODE], env)
        if code or code2:
            raise BenchError(f"the import-time probe failed: {tail(err + err2)}")
        imports.append(float(out) * 1000.0)
    return {
        "import_ms_median": statistics.median(imports),
        "import_ms_min": min(imports),
        "interpreter_start_ms_median": statistics.median(starts),
    }


def versions() -> dict[str, str]:
    """Debian package versions of the tools compared, when dpkg-query is there."""
    found: dict[str, str] = {}
    if shutil.which("dpkg-query") is None:
        return found
    for package in ("swtpm", "libtpms0", "tpm2-tools", "clevis", "clevis-tpm2", "systemd"):
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", package],
            capture_output=True,
            text=True,
            check=False,
        )
        if proc.returncode == 0 and proc.stdout:
            found[package] = proc.stdout
    return found


# -- verdicts and output -----------------------------------------------------------------------


def targets(rows: list[Row]) -> dict[str, dict[str, Any]]:
    ours = rows[0]
    peers = {r.key: r for r in rows[1:]}
    out: dict[str, dict[str, Any]] = {}

    def verdict(name: str, needed: list[Row], test: bool, detail: str) -> None:
        missing = [r.key for r in needed if not r.ok]
        if missing:
            out[name] = {"status": "not measured", "detail": f"no figure for {', '.join(missing)}"}
        else:
            out[name] = {"status": "met" if test else "not met", "detail": detail}

    both = [ours, *peers.values()]
    n = len(ours.commands)
    verdict(
        TARGET_COMMANDS,
        both,
        all(n < len(p.commands) for p in peers.values()),
        ", ".join(f"{n} vs {len(p.commands)} ({p.key})" for p in peers.values()),
    )
    clevis = peers["clevis"]
    om, cm = ours.median_ms, clevis.median_ms
    verdict(
        TARGET_TIME,
        [ours, clevis],
        om is not None and cm is not None and om < cm,
        f"{om or 0:.1f} ms vs {cm or 0:.1f} ms",
    )
    return out


def ratio(value: float | None, base: float | None) -> str:
    if value is None or not base:
        return "-"
    return f"{value / base:.1f}x"


def leak_note(row: Row, runs: int) -> str:
    """What the tool left loaded in the TPM, for the table's notes column."""
    if row.unseal_leaked or row.leaky_runs:
        what = ", ".join(row.unseal_leaked) or "handles"
        note = f"LEAKS {what} per unseal ({row.leaky_runs}/{runs} runs; flushed between runs)"
    else:
        note = "unseal leaks nothing"
    if row.seal_leaked:
        note += f"; its seal leaked {', '.join(row.seal_leaked)} (flushed)"
    return note


def compress(names: list[str]) -> str:
    """``A, B, B, B, C`` -> ``A, B x3, C``."""
    out: list[str] = []
    for name in names:
        if out and out[-1].split(" x")[0] == name:
            head, _, count = out[-1].partition(" x")
            out[-1] = f"{head} x{int(count or 1) + 1}"
        else:
            out.append(name)
    return ", ".join(out)


def table(rows: list[Row], runs: int) -> Iterator[str]:
    ours = rows[0]
    head = ("tool", "TPM cmds", "median ms", "min ms", "cmds vs ours", "time vs ours", "notes")
    body: list[tuple[str, ...]] = []
    for r in rows:
        if not r.ok:
            body.append((r.label, "-", "-", "-", "-", "-", f"{r.status.upper()}: {r.reason}"))
            continue
        body.append(
            (
                r.label,
                str(len(r.commands)),
                f"{r.median_ms:.1f}",
                f"{r.min_ms:.1f}",
                ratio(len(r.commands), len(ours.commands) if ours.ok else None),
                ratio(r.median_ms, ours.median_ms),
                leak_note(r, runs),
            )
        )
    widths = [max(len(line[i]) for line in (head, *body)) for i in range(len(head) - 1)]
    for line in (head, *body):
        cells = [
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line[:-1], widths, strict=True))
        ]
        yield "  ".join([*cells, line[-1]]).rstrip()


def report(doc: dict[str, Any], rows: list[Row]) -> str:
    runs = doc["runs"]
    lines = [
        f"unseal benchmark: one swtpm, simulated TXT launch, secret sealed to {BANK} PCR "
        f"{'+'.join(map(str, PCRS))} by each tool; {runs} timed runs per tool (interleaved), "
        "wall time = process start to secret",
        "versions: " + (", ".join(f"{k} {v}" for k, v in doc["versions"].items()) or "unknown"),
        "",
        *table(rows, runs),
        "",
        "targets:",
    ]
    width = max(len(name) for name in doc["targets"])
    for name, t in doc["targets"].items():
        lines.append(f"  {name.ljust(width)}  {t['status'].upper()}  ({t['detail']})")
    imp = doc["import_time"]
    if imp:
        lines += [
            "",
            "side figure: import of the unseal path (qubes_seal.cli.main, qubes_seal.tpm.unseal) "
            f"in a fresh interpreter: {imp['import_ms_median']:.1f} ms median "
            f"({imp['import_ms_min']:.1f} min); interpreter start (python -c pass): "
            f"{imp['interpreter_start_ms_median']:.1f} ms",
        ]
    lines += ["", "TPM commands of one unseal, counted on the wire:"]
    for r in rows:
        if r.ok:
            lines.append(f"  {r.key}: {compress(r.commands)}")
    lines += ["", "command lines (TCTI of the swtpm; the counted run used the proxy's):"]
    for r in rows:
        lines.append(f"  {r.key} seal:   {r.seal_cmdline}")
        lines.append(f"  {r.key} unseal: {r.unseal_cmdline}")
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Compare qubes-seal's unseal with clevis and systemd-creds on one swtpm."
    )
    parser.add_argument(
        "--runs", type=int, default=None, help=f"timed unseals per tool (default {DEFAULT_RUNS})"
    )
    parser.add_argument(
        "--quick", action="store_true", help=f"smoke test: {QUICK_RUNS} runs per tool"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = QUICK_RUNS if args.quick else DEFAULT_RUNS
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if shutil.which("swtpm") is None:
        print("unseal benchmark: swtpm not found (Debian package swtpm)", file=sys.stderr)
        return 1
    secret = secrets.token_hex(32).encode()
    try:
        with tempfile.TemporaryDirectory(prefix="qubes-seal-bench-") as tmp:
            work = Path(tmp)
            tools: list[Tool] = [
                Ours(work, secret),
                Clevis(work, secret),
                SystemdCreds(work, secret),
            ]
            with Swtpm(work / "swtpm") as swtpm, CountingProxy(swtpm.port) as proxy:
                txt_launch(swtpm, sample_modules())
                rows = measure(tools, swtpm, proxy, args.runs)
        imports = import_time(min(args.runs, 10)) if rows[0].ok else {}
    except (QubesSealError, BenchError) as exc:
        message = exc.diagnostics() if isinstance(exc, QubesSealError) else str(exc)
        print(f"unseal benchmark: cannot run: {message}", file=sys.stderr)
        return 1
    doc: dict[str, Any] = {
        "runs": args.runs,
        "bank": BANK,
        "pcrs": list(PCRS),
        "versions": versions(),
        "tools": [r.as_json() for r in rows],
        "targets": targets(rows),
        "import_time": imports,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(report(doc, rows))
    if not rows[0].ok:
        print(f"unseal benchmark: qubes-seal failed: {rows[0].reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
