"""The storage-domain agent against a fake ``qrexec-client-vm`` that runs our service executable
(as dom0's qrexec would: the policy file, then the service looked up in ``qrexec/``, for a caller
the test names), with a ``cryptsetup`` stand-in that records its argv and the bytes it read on
stdin (a real ``cryptsetup open`` cannot map here), or, for ``rekey``, the real cryptsetup on a
LUKS2 image file (``--test-passphrase``, ``luksAddKey`` and ``luksKillSlot`` need no
device-mapper) behind a wrapper that records its argv and environment."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from luks_util import cli_volume_key
from machine import U1, Box
from test_service import (
    SERVICE,
    Daemon,
    cli,
    daemon,
    keybox,
    rotate,
    unlocked_with_keys,
)

__all__ = ["daemon", "keybox"]  # fixtures used here

POLICY = SERVICE.parent / "50-qubes-seal.policy"

# qrexec's policy evaluation, as far as these files need it (qubes-core-qrexec's
# qrexec/policy/parser.py): "SERVICE +ARG|* SOURCE TARGET ACTION", first match wins, no match
# denies; "@anyvm" matches any qube as the source, and any qube but dom0 as the target.
POLICY_EVAL = """
def evaluate(path, service, argument, source, target="@adminvm"):
    for lineno, line in enumerate(open(path), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        svc, arg, src, tgt, action = fields[:5]
        if svc not in ("*", service) or arg not in ("*", "+" + argument):
            continue
        if src not in ("@anyvm", source):
            continue
        if not (tgt == target or (tgt == "@anyvm" and target != "@adminvm")):
            continue
        return action, lineno
    return "deny", None
"""

FAKE_QREXEC = f"""#!{sys.executable} -I
# qrexec-client-vm @adminvm SERVICE+ARG: the policy, then the service in "dom0", found as
# qrexec finds it (SERVICE+ARG, then SERVICE) and run as qrexec runs it.
import os, sys
{POLICY_EVAL}
if len(sys.argv) != 3 or sys.argv[1] != "@adminvm":
    sys.stderr.write("fake qrexec: target must be @adminvm\\n")
    sys.exit(125)
full = sys.argv[2]
service, _, arg = full.partition("+")
caller = os.environ["FAKE_CALLER"]
with open(os.environ["FAKE_QREXEC_LOG"], "a") as log:
    log.write(full + "\\n")
if os.environ.get("FAKE_POLICY_DENY"):
    sys.exit(126)
policy = os.environ.get("FAKE_POLICY")
if policy and evaluate(policy, service, arg, caller)[0] != "allow":
    sys.exit(126)
rpc = os.environ["FAKE_RPC_DIR"]
for name in (full, service):
    path = os.path.join(rpc, name)
    if os.path.isfile(path):
        break
else:
    sys.exit(126)
env = {{"PATH": "/usr/bin:/bin", "QUBES_SEAL_SOCKET": os.environ["QUBES_SEAL_SOCKET"],
       "QREXEC_REMOTE_DOMAIN": caller, "QREXEC_SERVICE_FULL_NAME": full,
       "QREXEC_SERVICE_ARGUMENT": arg, "QREXEC_REQUESTED_TARGET_TYPE": "keyword",
       "QREXEC_REQUESTED_TARGET_KEYWORD": "adminvm"}}
os.execve(path, [path, arg], env)
"""

FAKE_CRYPTSETUP = f"""#!{sys.executable}
import json, os, sys
data = sys.stdin.buffer.read() if "open" in sys.argv[1:2] else b""
with open(os.environ["FAKE_CRYPTSETUP_LOG"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "stdin": data.hex()}}) + "\\n")
sys.exit(int(os.environ.get("FAKE_CRYPTSETUP_EXIT", "0")))
"""

CRYPTSETUP = shutil.which("cryptsetup", path="/usr/sbin:/sbin:/usr/bin:/bin")

# The real cryptsetup, behind a wrapper that records each call (argv and environment) and can
# stop dead instead of running one command (CRASH_AT: a power cut before that step).
REAL_CRYPTSETUP = f"""#!{sys.executable} -I
import json, os, sys
with open(os.environ["FAKE_CRYPTSETUP_LOG"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "env": dict(os.environ)}}) + "\\n")
if sys.argv[1:2] == [os.environ.get("CRASH_AT")]:
    sys.exit(137)
os.execv({CRYPTSETUP!r}, ["cryptsetup", *sys.argv[1:]])
"""

# The new keyslot's PBKDF: cheap (the key is 512 random bits; cryptsetup's default argon2id
# would cost seconds and hundreds of MiB per keyslot).
FAST = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000")

needs_cryptsetup = pytest.mark.skipif(CRYPTSETUP is None, reason="cryptsetup is not installed")


def agent(tmp: Path, d: Daemon, *args: str, caller: str = "sys-storage",
          **env: str) -> subprocess.CompletedProcess[str]:  # fmt: skip
    qrexec, cs = tmp / "qrexec-client-vm", tmp / "cryptsetup"
    for path, text in ((qrexec, FAKE_QREXEC), (cs, FAKE_CRYPTSETUP)):
        path.write_text(text)
        path.chmod(0o755)
    full = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
    real = tmp / "real-cryptsetup"
    real.write_text(REAL_CRYPTSETUP)
    real.chmod(0o755)
    full.update({
        "QUBES_SEAL_QREXEC_CLIENT": str(qrexec), "QUBES_SEAL_CRYPTSETUP": str(cs),
        "QUBES_SEAL_SOCKET": str(d.socket), "FAKE_RPC_DIR": str(SERVICE.parent),
        "FAKE_CALLER": caller, "FAKE_CRYPTSETUP_LOG": str(tmp / "cryptsetup.log"),
        "FAKE_QREXEC_LOG": str(tmp / "qrexec.log"), **env,
    })  # fmt: skip
    if full.get("QUBES_SEAL_CRYPTSETUP") == "real":
        full["QUBES_SEAL_CRYPTSETUP"] = str(real)
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


# -- the policy file -------------------------------------------------------------------------


def policy(service: str, argument: str, source: str) -> tuple[str, int | None]:
    scope: dict[str, Any] = {}
    exec(POLICY_EVAL, scope)
    result: tuple[str, int | None] = scope["evaluate"](POLICY, service, argument, source)
    return result


def test_policy_file_lines() -> None:
    lines = [ln.split() for ln in POLICY.read_text().splitlines() if ln.strip()]
    rules = [f for f in lines if not f[0].startswith("#")]
    services = {"qubes.SealGetDiskKey", "qubes.SealGetPreviousDiskKey"}
    for fields in rules:
        assert len(fields) == 5 and fields[0] in services, fields
        assert fields[1] == "*" or fields[1].startswith("+")
        assert fields[3] == "@adminvm" and fields[4] in ("allow", "deny"), fields
    # The storage domain gets both keys of the domains it serves: the same allow lines.
    allowed = {s: {(f[1], f[2]) for f in rules if f[0] == s and f[4] == "allow"} for s in services}
    assert allowed["qubes.SealGetDiskKey"] == allowed["qubes.SealGetPreviousDiskKey"]
    assert ("+work", "sys-storage") in allowed["qubes.SealGetPreviousDiskKey"]
    # Everyone else is denied by the file's own last lines (explicitly: a later file cannot
    # allow it), not merely by no match; and the deny lines are last.
    deny_lines = {i + 1 for i, ln in enumerate(POLICY.read_text().splitlines())
                  if ln.split()[-1:] == ["deny"]}  # fmt: skip
    for service in sorted(services):
        assert policy(service, "work", "sys-storage")[0] == "allow"
        assert policy(service, "personal", "sys-storage")[0] == "allow"
        for argument, source in (("vault", "sys-storage"), ("work", "red"),
                                 ("work", "sys-backup"), ("", "sys-storage")):  # fmt: skip
            action, lineno = policy(service, argument, source)
            assert action == "deny" and lineno in deny_lines, (service, argument, source)
    assert policy("qubes.Other", "work", "sys-storage") == ("deny", None)
    assert rules[-2:] == [[s, "*", "@anyvm", "@adminvm", "deny"] for s in sorted(services)]


# -- rekey -----------------------------------------------------------------------------------


def luks_volume(path: Path, key: bytes) -> Path:
    """A small LUKS2 image file whose keyslot 0 opens with ``key`` (a cheap PBKDF)."""
    with open(path, "wb") as f:
        f.truncate(24 << 20)
    assert CRYPTSETUP is not None
    subprocess.run([CRYPTSETUP, "luksFormat", "--type", "luks2", "--batch-mode", *FAST,
                    "--key-file=-", "--keyfile-size=64", str(path)],
                   input=key, check=True, capture_output=True)  # fmt: skip
    return path


def opens(path: Path, key: bytes) -> bool:
    assert CRYPTSETUP is not None
    proc = subprocess.run([CRYPTSETUP, "open", "--test-passphrase", "--key-file=-",
                           f"--keyfile-size={len(key)}", str(path)],
                          input=key, capture_output=True)  # fmt: skip
    assert proc.returncode in (0, 2), proc.stderr
    return proc.returncode == 0


def current_key(box: Box, d: Daemon) -> bytes:
    res = cli(box, d, "domain", "show", "work", "--uuid", U1, "--show-key", "--json")
    assert res.code == 0, res.err
    return bytes.fromhex(res.json()["key"])


def qrexec_calls(tmp: Path) -> list[str]:
    log = tmp / "qrexec.log"
    lines = log.read_text().split() if log.exists() else []
    log.unlink(missing_ok=True)
    return lines


def rekey(tmp: Path, d: Daemon, volume: Path, *args: str, caller: str = "sys-storage",
          **env: str) -> subprocess.CompletedProcess[str]:  # fmt: skip
    env = {"QUBES_SEAL_CRYPTSETUP": "real", "FAKE_POLICY": str(POLICY), **env}
    return agent(tmp, d, "rekey", "work", "--volume", str(volume), *FAST, *args, caller=caller,
                 **env)  # fmt: skip


CUR, PREV = "qubes.SealGetDiskKey+work", "qubes.SealGetPreviousDiskKey+work"


@needs_cryptsetup
def test_rekey_a_luks_volume(keybox: Box, daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    old = unlocked_with_keys(keybox, daemon)["work"]
    vol = luks_volume(tmp_path / "work.img", old)
    volume_key = cli_volume_key(vol, old)
    # No rotation pending and the key opens the volume: nothing to do.
    res = rekey(tmp_path, daemon, vol)
    assert res.returncode == 0, res.stderr
    assert "no rotation is pending: nothing to do" in res.stdout
    assert qrexec_calls(tmp_path) == [CUR, PREV]
    # dom0 rotates: the volume still opens with the previous key only.
    rotate(keybox, daemon, "work", "--uuid", U1)
    new = current_key(keybox, daemon)
    assert opens(vol, old) and not opens(vol, new)
    calls(tmp_path)
    res = rekey(tmp_path, daemon, vol)
    assert res.returncode == 0, res.stderr
    assert f"re-keyed {vol}: it opens with the current key of work only" in res.stdout
    assert "next, in dom0: qubes-seal domain rotate work --commit" in res.stdout
    assert opens(vol, new) and not opens(vol, old)
    assert cli_volume_key(vol, new) == volume_key  # a key change: the data's key stays
    # Each key from its own qrexec call, through a pipe: /dev/fd/N in cryptsetup's argv.
    made = qrexec_calls(tmp_path)  # the add's two requests run at once, in either order
    assert made[:2] == [CUR, PREV] and sorted(made[2:4]) == [CUR, PREV]
    assert made[4:] == [CUR, CUR, PREV]
    log = calls(tmp_path)
    assert [c["argv"][0] for c in log] == ["isLuks", "open", "open", "luksAddKey", "open",
                                           "luksKillSlot", "open"]  # fmt: skip
    [add] = [c["argv"] for c in log if c["argv"][0] == "luksAddKey"]
    assert add[1].startswith("--key-file=/dev/fd/") and add[2] == "--keyfile-size=64"
    assert add[3].startswith("--new-keyfile=/dev/fd/") and add[4] == "--new-keyfile-size=64"
    assert add[5:] == ["--pbkdf=pbkdf2", "--pbkdf-force-iterations=1000", str(vol)]
    [kill] = [c["argv"] for c in log if c["argv"][0] == "luksKillSlot"]
    assert kill[1].startswith("--key-file=/dev/fd/") and kill[3:] == [str(vol), "0"]
    # No key in cryptsetup's argv or environment, the agent's output or the daemon's log.
    seen = (json.dumps(log) + res.stdout + res.stderr + daemon.log()).lower()
    assert old.hex() not in seen and new.hex() not in seen
    # Run again: already done, exit 0, and the next step again.
    res = rekey(tmp_path, daemon, vol)
    assert res.returncode == 0, res.stderr
    assert "already opens with the current key of work" in res.stdout
    assert "qubes-seal domain rotate work --commit" in res.stdout
    assert [c["argv"][0] for c in calls(tmp_path)] == ["isLuks", "open", "open"]
    # dom0 commits: the previous key is gone; rekey has nothing to do.
    rotate(keybox, daemon, "work", "--uuid", U1, "--commit")
    res = rekey(tmp_path, daemon, vol)
    assert res.returncode == 0 and "no rotation is pending: nothing to do" in res.stdout
    assert opens(vol, new) and current_key(keybox, daemon) == new


@needs_cryptsetup
def test_rekey_interrupted_then_run_again(keybox: Box, daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    old = unlocked_with_keys(keybox, daemon)["work"]
    vol = luks_volume(tmp_path / "work.img", old)
    # Another keyslot (an administrator's passphrase): rekey leaves it alone.
    other = b"an administrator's recovery passphrase"
    subprocess.run([str(CRYPTSETUP), "luksAddKey", *FAST, "--key-file=-", "--keyfile-size=64",
                    "--new-keyfile", str(_write(tmp_path / "other", other)), str(vol)],
                   input=old, check=True, capture_output=True)  # fmt: skip
    rotate(keybox, daemon, "work", "--uuid", U1)
    new = current_key(keybox, daemon)
    # Cut before the add: nothing changed, the previous key still opens the volume.
    res = rekey(tmp_path, daemon, vol, CRASH_AT="luksAddKey")
    assert res.returncode == 1 and "luksAddKey" in res.stderr, res.stderr
    assert "the previous keyslot 0 is kept" in res.stderr
    assert opens(vol, old) and not opens(vol, new)
    # Cut after the add, before the previous keyslot is wiped: both keys open it.
    res = rekey(tmp_path, daemon, vol, CRASH_AT="luksKillSlot")
    assert res.returncode == 1 and "luksKillSlot" in res.stderr, res.stderr
    assert opens(vol, old) and opens(vol, new)
    calls(tmp_path)
    # Run again: only the previous keyslot goes.
    res = rekey(tmp_path, daemon, vol)
    assert res.returncode == 0, res.stderr
    assert "opens with both keys of work" in res.stdout and "re-keyed" in res.stdout
    assert [c["argv"][0] for c in calls(tmp_path)] == ["isLuks", "open", "open",
                                                       "luksKillSlot", "open"]  # fmt: skip
    assert opens(vol, new) and not opens(vol, old)
    assert opens(vol, other)
    assert "Traceback" not in res.stderr + daemon.log()


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


@needs_cryptsetup
def test_rekey_refusals(keybox: Box, daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    keys = unlocked_with_keys(keybox, daemon)
    vol = luks_volume(tmp_path / "work.img", keys["work"])
    # No rotation pending and the current key does not open the volume (not work's): exit 3.
    strange = luks_volume(tmp_path / "strange.img", keys["personal"])
    res = rekey(tmp_path, daemon, strange)
    assert res.returncode == 3 and "no previous key to re-key it from" in res.stderr
    # A plain dm-crypt volume: refused before any key is fetched, with what to do instead.
    res = rekey(tmp_path, daemon, vol, "--plain")
    assert res.returncode == 2, res.stderr
    assert "cannot be re-keyed in place" in res.stderr and "reencrypt" in res.stderr
    assert "--previous" in res.stderr and "domain rotate work --commit" in res.stderr
    # Not a LUKS volume: refused before any key is fetched.
    zeros = tmp_path / "zeros.img"
    zeros.write_bytes(bytes(1 << 20))
    res = rekey(tmp_path, daemon, zeros)
    assert res.returncode == 2 and "not a LUKS volume" in res.stderr, res.stderr
    assert qrexec_calls(tmp_path) == [CUR, PREV]  # the first case only
    rotate(keybox, daemon, "work", "--uuid", U1)
    # Neither key opens it: exit 1, nothing changed.
    res = rekey(tmp_path, daemon, strange)
    assert res.returncode == 1 and "neither the current nor the previous key" in res.stderr
    # Another storage domain: the policy denies (exit 4); so does the daemon without it.
    res = rekey(tmp_path, daemon, vol, caller="sys-backup")
    assert res.returncode == 4 and "qrexec policy denies" in res.stderr
    res = rekey(tmp_path, daemon, vol, caller="sys-backup", FAKE_POLICY="")
    assert res.returncode == 4 and "does not serve" in res.stderr
    # A policy without the previous-key lines: refused, and the service is named.
    narrow = tmp_path / "narrow.policy"
    narrow.write_text("".join(ln for ln in POLICY.read_text().splitlines(keepends=True)
                              if not ln.startswith("qubes.SealGetPreviousDiskKey  +")))  # fmt: skip
    res = rekey(tmp_path, daemon, vol, FAKE_POLICY=str(narrow))
    assert res.returncode == 4 and "qubes.SealGetPreviousDiskKey+work" in res.stderr
    assert opens(vol, keys["work"]) and not opens(vol, current_key(keybox, daemon))
    # Bad arguments.
    res = rekey(tmp_path, daemon, vol, "--pbkdf-force-iterations", "-5")
    assert res.returncode == 2 and "must be positive" in res.stderr
    res = agent(tmp_path, daemon, "rekey", "_x", "--volume", str(vol))
    assert res.returncode == 2 and "invalid qube name" in res.stderr
    assert "Traceback" not in res.stderr + daemon.log()


def test_open_with_the_previous_key(keybox: Box, daemon: Daemon, tmp_path: Path) -> None:
    daemon.start()
    keys = unlocked_with_keys(keybox, daemon)
    res = agent(tmp_path, daemon, "open", "work", "--volume", "/v", "--plain", "--previous")
    assert res.returncode == 3 and "no previous key for work" in res.stderr, res.stderr
    assert "no rotation is pending" in res.stderr
    assert all(c["stdin"] == "" for c in calls(tmp_path))
    rotate(keybox, daemon, "work", "--uuid", U1)
    res = agent(tmp_path, daemon, "open", "work", "--volume", "/v", "--name", "old-work",
                "--plain", "--previous")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "with the previous key of work" in res.stdout
    [call] = calls(tmp_path)
    assert call["argv"][-2:] == ["/v", "old-work"]
    assert bytes.fromhex(str(call["stdin"])) == keys["work"]
    assert qrexec_calls(tmp_path)[-1] == PREV
    res = agent(tmp_path, daemon, "open", "work", "--volume", "/v")
    assert res.returncode == 0
    assert bytes.fromhex(str(calls(tmp_path)[0]["stdin"])) == current_key(keybox, daemon)
