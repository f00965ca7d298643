"""swtpm-fixtures/txt-launch, the launch simulator as a command, against a real swtpm."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

from qubes_seal.measure import eventlog
from qubes_seal.sim.swtpm import Swtpm, free_port_pair
from qubes_seal.sim.txt_launch import Module, Platform, expected_pcrs
from qubes_seal.tpm.device import Tpm

SCRIPT = Path(__file__).resolve().parents[1] / "swtpm-fixtures" / "txt-launch"


def launch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=60
    )


def test_script_measures_files_and_writes_the_log(swtpm: Swtpm, tmp_path: Path) -> None:
    xen = tmp_path / "xen-4.17.gz"
    xen.write_bytes(gzip.compress(b"XEN" * 1000))
    kernel = tmp_path / "vmlinuz"
    kernel.write_bytes(b"KERNEL" * 500)
    initrd = tmp_path / "initramfs.img"
    initrd.write_bytes(b"INITRD" * 700)
    log = tmp_path / "txt.log"
    res = launch(
        "--port", str(swtpm.port), "--xen", str(xen), "--xen-cmdline", "console=none",
        "--kernel", str(kernel), "--kernel-cmdline", "root=/dev/vda ro",
        "--initramfs", str(initrd), "--log", str(log), "--json",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    # Xen is measured decompressed, as GRUB hands it over.
    modules = [
        Module("xen", b"console=none", b"XEN" * 1000),
        Module("kernel", b"root=/dev/vda ro", b"KERNEL" * 500),
        Module("initramfs", b"", b"INITRD" * 700),
    ]
    want = expected_pcrs(Platform(), modules)
    with Tpm(swtpm.tcti) as tpm:
        got = tpm.read_pcrs([17, 18])
    assert got == {17: want[17], 18: want[18]}
    assert out["pcrs"]["sha256"] == {"17": want[17].hex(), "18": want[18].hex()}
    parsed = eventlog.parse(log.read_bytes())
    replayed = eventlog.replay(parsed, drtm=True)["sha256"]
    assert replayed[17] == got[17]
    assert replayed[18] == got[18]


def test_script_errors(tmp_path: Path) -> None:
    port = free_port_pair()
    res = launch("--port", str(port), "--sample")
    assert res.returncode == 6
    assert "no swtpm answers" in res.stderr
    res = launch("--port", str(port), "--xen", "x")
    assert res.returncode == 2
    res = launch("--port", str(port), "--xen", str(tmp_path / "missing"), "--kernel", "k",
                 "--initramfs", "i")  # fmt: skip
    assert res.returncode == 2
    assert "cannot read" in res.stderr
    assert "missing" in res.stderr
