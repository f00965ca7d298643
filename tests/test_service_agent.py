"""The storage-domain agent against a fake ``qrexec-client-vm`` that runs our service executable
(as dom0's qrexec would, for a caller the test names) and a ``cryptsetup`` stand-in that records
its argv and the bytes it read on stdin (a real ``cryptsetup open`` cannot map here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_chain import Box
from test_service import SERVICE, Daemon, daemon, keybox, unlocked_with_keys

__all__ = ["daemon", "keybox"]  # fixtures used here

FAKE_QREXEC = """#!/bin/sh
# qrexec-client-vm @adminvm SERVICE+ARG: the policy, then the service in "dom0".
[ "$1" = "@adminvm" ] || { echo "fake qrexec: target must be @adminvm" >&2; exit 125; }
service="${2%%+*}"
arg="${2#*+}"
[ "$service" = "qubes.SealGetDiskKey" ] || exit 126
[ -n "$FAKE_POLICY_DENY" ] && exit 126
export QREXEC_REMOTE_DOMAIN="$FAKE_CALLER" QREXEC_SERVICE_ARGUMENT="$arg"
export QREXEC_SERVICE_FULL_NAME="$2" QREXEC_REQUESTED_TARGET_KEYWORD=adminvm
exec "$FAKE_SERVICE" "$arg"
"""

FAKE_CRYPTSETUP = f"""#!{sys.executable}
import json, os, sys
data = sys.stdin.buffer.read() if "open" in sys.argv[1:2] else b""
with open(os.environ["FAKE_CRYPTSETUP_LOG"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "stdin": data.hex()}}) + "\\n")
sys.exit(int(os.environ.get("FAKE_CRYPTSETUP_EXIT", "0")))
"""


def agent(tmp: Path, d: Daemon, *args: str, caller: str = "sys-storage",
          **env: str) -> subprocess.CompletedProcess[str]:  # fmt: skip
    qrexec, cs = tmp / "qrexec-client-vm", tmp / "cryptsetup"
    for path, text in ((qrexec, FAKE_QREXEC), (cs, FAKE_CRYPTSETUP)):
        path.write_text(text)
        path.chmod(0o755)
    full = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
    full.update({
        "QUBES_SEAL_QREXEC_CLIENT": str(qrexec), "QUBES_SEAL_CRYPTSETUP": str(cs),
        "QUBES_SEAL_SOCKET": str(d.socket), "FAKE_SERVICE": str(SERVICE),
        "FAKE_CALLER": caller, "FAKE_CRYPTSETUP_LOG": str(tmp / "cryptsetup.log"), **env,
    })  # fmt: skip
    exe = Path(sys.executable).parent / "qubes-seal-storage-agent"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "qubes_seal.service.agent"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, env=full, timeout=60)


def calls(tmp: Path) -> list[dict[str, object]]:
    log = tmp / "cryptsetup.log"
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return [json.loads(line) for line in lines]


def test_agent_opens_with_the_key_through_a_pipe(keybox: Box, daemon: Daemon,
                                                 tmp_path: Path) -> None:  # fmt: skip
    daemon.start()
    # Locked first: exit 7, cryptsetup saw no key.
    res = agent(tmp_path, daemon, "open", "work", "--volume", "/dev/vg/work")
    assert res.returncode == 7, res.stderr
    assert "locked" in res.stderr
    assert all(c["stdin"] == "" for c in calls(tmp_path))
    keys = unlocked_with_keys(keybox, daemon)
    res = agent(tmp_path, daemon, "open", "work", "--volume", "/dev/vg/work")
    assert res.returncode == 0, res.stderr
    assert "/dev/mapper/qubes-seal-work" in res.stdout
    [call] = calls(tmp_path)
    assert call["argv"] == ["open", "--key-file=-", "--keyfile-size=64", "/dev/vg/work",
                            "qubes-seal-work"]  # fmt: skip
    assert bytes.fromhex(str(call["stdin"])) == keys["work"]
    assert keys["work"].hex() not in res.stdout + res.stderr
    # --plain and --name
    res = agent(tmp_path, daemon, "open", "personal", "--volume", "/v", "--name", "p", "--plain")
    assert res.returncode == 0, res.stderr
    [call] = calls(tmp_path)
    assert call["argv"][-6:] == ["--cipher", "aes-xts-plain64", "--key-size", "512", "/v", "p"]
    assert bytes.fromhex(str(call["stdin"])) == keys["personal"]
    # close
    res = agent(tmp_path, daemon, "close", "work")
    assert res.returncode == 0
    assert calls(tmp_path)[0]["argv"] == ["close", "qubes-seal-work"]


@pytest.mark.parametrize(
    ("caller", "domain", "env", "code", "message"),
    [
        ("red", "work", {}, 4, "does not serve"),
        ("sys-storage", "work", {"FAKE_POLICY_DENY": "1"}, 4, "qrexec policy denies"),
        ("sys-storage", "vault", {}, 3, "no key is stored"),
        ("sys-storage", "work", {"FAKE_CRYPTSETUP_EXIT": "2"}, 1, "cryptsetup open"),
    ],
)
def test_agent_refusals(keybox: Box, daemon: Daemon, tmp_path: Path, caller: str, domain: str,
                        env: dict[str, str], code: int, message: str) -> None:  # fmt: skip
    daemon.start()
    unlocked_with_keys(keybox, daemon)
    res = agent(tmp_path, daemon, "open", domain, "--volume", "/v", caller=caller, **env)
    assert res.returncode == code, res.stderr
    assert message in res.stderr


def test_agent_checks_names_and_reports_a_missing_daemon(tmp_path: Path) -> None:
    d = Daemon(tmp_path, tmp_path / "none.luks")  # never started
    res = agent(tmp_path, d, "open", "_bad", "--volume", "/v")
    assert res.returncode == 2 and "invalid qube name" in res.stderr
    res = agent(tmp_path, d, "open", "work", "--volume", "/v")
    assert res.returncode == 6 and "unreachable" in res.stderr
