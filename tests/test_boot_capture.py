"""The boot captures this boot's TXT event log (docs/BOOT.md), and ``status`` shows TXT.

The simulated launch writes the machine's memory image (TXT registers and heap, as SINIT and
tboot leave them) and boot.toml points ``txt_mem`` at it:

* a genuine launch: the log is written to ``txt_log`` and replays to the swtpm's PCR 17/18;
* a corrupted heap (an attacker's, or garbage): the boot still unlocks, one console line,
  no log written;
* the heap of another launch (a log an evil maid planted to make dom0 predict and sign the
  boot she wants): the TPM contradicts it, so it is kept only as ``.unverified`` and the
  name the reseal unit reads is not written (a stale one is removed).

``status --json --mem IMAGE`` carries txt-stat's facts: a good launch, no launch, an error.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cli_util import run
from test_boot import Machine, new_machine, shut_down

from qubes_seal.boot.capture import check_against_tpm, replay_txt
from qubes_seal.boot.sequence import BootConfig
from qubes_seal.errors import UsageError
from qubes_seal.measure import eventlog as el
from qubes_seal.measure import txt_heap
from qubes_seal.sim import txt_launch as tl
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.tpm.device import Tpm

CAPTURE_LINES = ("TXT event log", "the TXT event log")


class CaptureMachine(Machine):
    """test_boot's machine whose launch also writes the memory image boot.toml names."""

    def __init__(self, swtpm: Swtpm, root: Path) -> None:
        super().__init__(swtpm, root)
        self.image = root / "mem.img"
        self.log = root / "run" / "txt-event.log"
        self.log.parent.mkdir()
        self.unverified = Path(f"{self.log}.unverified")

    def config(self, **extra: object) -> Path:
        return super().config(**{"txt_mem": str(self.image), "txt_log": str(self.log), **extra})

    def boot_with(self, write_image: object = None, **changes: str) -> tuple[int, str]:
        """Reboot, launch, write the image (``write_image(events)`` instead, if given), run
        the boot sequence; (exit code, console)."""
        self.swtpm.reboot()
        launch = tl.txt_launch(self.swtpm, tl.sample_modules(**changes))
        if write_image is None:
            tl.write_memory_image(self.image, launch.events)
        else:
            write_image(launch.events)  # type: ignore[operator]
        return self.run_sequence()


@pytest.fixture
def machine(swtpm: Swtpm, tmp_path: Path):  # type: ignore[no-untyped-def]
    new_machine(swtpm, tmp_path)  # init; the CaptureMachine has the same paths
    m = CaptureMachine(swtpm, tmp_path)
    yield m
    shut_down(m)


def capture_lines(console: str) -> list[str]:
    return [line for line in console.splitlines() if any(w in line for w in CAPTURE_LINES)]


def tpm_pcrs(swtpm: Swtpm) -> dict[int, bytes]:
    with Tpm(swtpm.tcti) as tpm:
        return tpm.read_pcrs([17, 18])


def test_genuine_launch_log_captured_and_replays_to_the_tpm(machine: CaptureMachine) -> None:
    code, out = machine.boot_with()
    assert code == 0, out
    assert "RESULT: unlocked with the TPM and passphrase" in out
    lines = capture_lines(out)
    assert len(lines) == 1 and "TXT event log captured" in lines[0], out
    assert "replays to the TPM's PCR 17/18 (sha256)" in lines[0]
    # Captured before the unlock (early), and exactly the launch's log.
    assert out.index("TXT event log captured") < out.index("unlocking the container")
    assert machine.log.stat().st_mode & 0o777 == 0o644
    assert not machine.unverified.exists()
    replayed = replay_txt(machine.log.read_bytes())["sha256"]
    assert {p: replayed[p] for p in (17, 18)} == tpm_pcrs(machine.swtpm)
    # The same file is what `eventlog verify --txt` and `status` accept.
    res = run(machine.swtpm.tcti, machine.root / "state", "eventlog", "verify", "--txt",
              str(machine.log), "--bank", "sha256")  # fmt: skip
    assert res.code == 0, res.err


@pytest.mark.parametrize("damage", ["oversized-table", "pointer-outside", "no-file"])
def test_corrupt_or_missing_memory_never_stops_the_boot(machine: CaptureMachine,
                                                        damage: str) -> None:  # fmt: skip
    def write(events: list[object]) -> None:
        img = tl.write_memory_image(machine.image, events)  # type: ignore[arg-type]
        heap = bytearray(img.heap)
        if damage == "oversized-table":  # BiosData claims more than the heap
            struct.pack_into("<Q", heap, 0, len(heap) * 4)
        elif damage == "pointer-outside":  # the log pointer names memory outside the heap
            at = heap.find(struct.pack("<II", txt_heap.EXT_EVENT_LOG_POINTER2_1, 28))
            struct.pack_into("<Q", heap, at + 8, 0x1000)
        else:
            machine.image.unlink()
            return
        tl.write_image(machine.image, img.registers, bytes(heap))

    machine.log.write_bytes(b"a stale log from an earlier run")
    code, out = machine.boot_with(write)
    assert code == 0, out
    assert "RESULT: unlocked with the TPM and passphrase" in out
    lines = capture_lines(out)
    assert len(lines) == 1 and "TXT event log not captured" in lines[0], out
    assert "Traceback" not in out
    assert not machine.log.exists() and not machine.unverified.exists()


def test_log_of_another_launch_is_kept_unverified(machine: CaptureMachine) -> None:
    """An evil maid's heap: a well-formed log of the boot she wants dom0 to predict and sign.
    The TPM's PCR 17 contradicts it: never written under the name the reseal unit reads."""
    other = tl.launch_events(tl.Platform(), tl.sample_modules(xen_version="4.19.9-evil"))

    def write(_events: object) -> None:
        tl.write_memory_image(machine.image, other)

    machine.log.write_bytes(b"a stale log from an earlier run")
    code, out = machine.boot_with(write)
    assert code == 0, out
    assert "RESULT: unlocked with the TPM and passphrase" in out  # the unlock never used it
    lines = capture_lines(out)
    assert len(lines) == 1 and "does NOT match the TPM" in lines[0], out
    assert "sha256 PCR 17" in lines[0] and "sha256 PCR 18" not in lines[0]
    assert not machine.log.exists()
    assert machine.unverified.read_bytes() == tl.build_heap(other)[1]
    res = run(machine.swtpm.tcti, machine.root / "state", "status", "--json", "--mem",
              str(machine.image), "--txt-log", str(machine.log))  # fmt: skip
    captured = res.json()["txt"]["captured_log"]
    assert captured["exists"] is False and captured["unverified_exists"] is True


def test_capture_disabled_with_an_empty_txt_mem(machine: CaptureMachine) -> None:
    machine.swtpm.reboot()
    tl.txt_launch(machine.swtpm, tl.sample_modules())
    proc = subprocess.run(
        [sys.executable, "-m", "qubes_seal.boot", "--config", str(machine.config(txt_mem=""))],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = machine.console.read_text()
    assert capture_lines(out) == [] and not machine.log.exists()


def test_txt_keys_are_typed(tmp_path: Path) -> None:
    cfg = tmp_path / "boot.toml"
    cfg.write_text('txt_mem = "/tmp/mem.img"\ntxt_log = "/tmp/log"\n')
    loaded = BootConfig.load(cfg)
    assert (loaded.txt_mem, loaded.txt_log) == ("/tmp/mem.img", "/tmp/log")
    assert BootConfig.load(None).txt_mem == "/dev/mem"
    assert BootConfig.load(None).txt_log == "/run/qubes-seal/txt-event.log"
    cfg.write_text("txt_mem = 1\n")
    with pytest.raises(UsageError, match="txt_mem must be a string"):
        BootConfig.load(cfg)


# --- status --------------------------------------------------------------------------------


def status(swtpm: Swtpm, tmp_path: Path, image: Path, log: Path | None = None) -> dict[str, object]:
    res = run(swtpm.tcti, tmp_path / "state", "status", "--json", "--mem", str(image),
              "--txt-log", str(log or tmp_path / "no-log"))  # fmt: skip
    assert res.code == 0, res.err
    txt = res.json()["txt"]
    assert isinstance(txt, dict)
    return txt


def test_status_of_a_good_launch(swtpm: Swtpm, tmp_path: Path) -> None:
    launch = tl.txt_launch(swtpm, tl.sample_modules(), image_path=tmp_path / "mem.img")
    log = tmp_path / "txt-event.log"
    log.write_bytes(launch.log)
    txt = status(swtpm, tmp_path, tmp_path / "mem.img", log)
    assert txt["senter_done"] is True and txt["error_code"] == 0
    assert txt["error"] == "no error" and txt["read_error"] is None
    assert txt["measured_launch"] is True
    regs = txt["registers"]
    assert isinstance(regs, dict)
    assert (regs["heap_base"], regs["heap_size"]) == (0xB9F20000, 0xE0000)
    assert txt["log"] == {
        **txt["log"],  # type: ignore[dict-item]
        "format": "crypto-agile",
        "element_type": 8,
        "phys_addr": tl.HeapLayout().log_phys_addr,
        "size": len(launch.log),
    }
    assert txt["captured_log"] == {
        "path": str(log), "exists": True, "replays": True, "unverified_exists": False,
        "detail": "replays to the TPM's PCR 17/18 (sha256)",
    }  # fmt: skip
    res = run(swtpm.tcti, tmp_path / "state", "status", "--mem", str(tmp_path / "mem.img"),
              "--txt-log", str(log))  # fmt: skip
    assert "SENTER done: yes; ERRORCODE 0x00000000 (no error)" in res.out
    assert "base 0xb9f20000, size 0xe0000" in res.out
    assert f"{log} replays to the TPM" in res.out


def test_status_no_launch_with_an_error_code(swtpm: Swtpm, tmp_path: Path) -> None:
    code = 0xC0001C41  # an ACM error: acm_type 1, progress 0x04, error 0x7
    regs = tl.machine_registers(senter_done=False, errorcode=code)
    tl.write_image(tmp_path / "mem.img", regs)
    txt = status(swtpm, tmp_path, tmp_path / "mem.img")
    assert txt["senter_done"] is False and txt["measured_launch"] is False
    assert txt["error_code"] == code
    assert txt["error"] == txt_heap.decode_errorcode(code)
    assert txt["error"] == "AC module error : acm_type=0x1, progress=0x04, error=0x7"
    assert txt["log"] is None and txt["no_launch_reason"] == "TXT.STS says SENTER was not done"
    assert txt["captured_log"]["exists"] is False  # type: ignore[index]


def test_status_with_unreadable_or_corrupt_memory(swtpm: Swtpm, tmp_path: Path) -> None:
    txt = status(swtpm, tmp_path, tmp_path / "absent.img")
    assert "no such file" in str(txt["read_error"]) and "senter_done" not in txt
    res = run(swtpm.tcti, tmp_path / "state", "status", "--mem", str(tmp_path / "absent.img"))
    assert res.code == 0 and "not readable" in res.out
    regs = tl.machine_registers()
    tl.write_image(tmp_path / "mem.img", regs, b"\xff" * 64)  # garbage heap
    txt = status(swtpm, tmp_path, tmp_path / "mem.img")
    assert "corrupt" in str(txt["read_error"]) and txt["senter_done"] is True


def test_check_against_tpm_needs_a_bank_the_log_extends(swtpm: Swtpm) -> None:
    launch = tl.txt_launch(swtpm, tl.sample_modules())
    with Tpm(swtpm.tcti) as tpm:
        assert check_against_tpm(launch.log, tpm).agree
        sha1_only = tl.build_heap(
            [
                el.Event(
                    pcr=e.pcr, event_type=e.event_type, digests={"sha1": bytes(20)}, data=e.data
                )
                for e in launch.events
            ],
            layout=tl.LAYOUT_TPM12,
        )[1]
        check = check_against_tpm(sha1_only, tpm)
    assert not check.agree and check.banks == ("sha1",)


def test_capture_imports_neither_tpm2_pytss_nor_cryptography(swtpm: Swtpm, tmp_path: Path) -> None:
    """The initramfs holds neither: the capture and its check use the ctypes ESAPI only."""
    tl.txt_launch(swtpm, tl.sample_modules(), image_path=tmp_path / "mem.img")
    code = (
        "import io, sys\n"
        "from qubes_seal.boot.capture import capture_at_boot\n"
        "from qubes_seal.boot.sequence import BootConfig, Console\n"
        f"cfg = BootConfig(tpm={swtpm.tcti!r}, txt_mem={str(tmp_path / 'mem.img')!r},\n"
        f"                 txt_log={str(tmp_path / 'txt.log')!r})\n"
        "out = io.StringIO()\n"
        "capture_at_boot(cfg, Console(out))\n"
        "print(out.getvalue())\n"
        "print(sorted(m for m in sys.modules if m.startswith(('tpm2_pytss', 'cryptography'))))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "TXT event log captured" in proc.stdout, proc.stdout + proc.stderr
    assert proc.stdout.rstrip().endswith("[]"), proc.stdout
