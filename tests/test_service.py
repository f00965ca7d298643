"""The dom0 key service for real: ``qubes-seal serve`` in a subprocess on a socket in
``tmp_path``, a container initialised and unlocked on a swtpm (the hand-over in root's user
keyring, dropped at the end), and ``qrexec/qubes.SealGetDiskKey`` run exactly as qrexec runs it:
the caller and the argument in the environment, the argument also in argv[1], stdin and stdout
connected to the caller, the key on stdout.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cli_util import Result, run
from machine import CHEAP_KDF, PASSPHRASE, U1, U2, Box

from qubes_seal import chain
from qubes_seal.service import client
from qubes_seal.service.daemon import RECHECK_UNLOCKED
from qubes_seal.service.protocol import MAX_REQUEST, ProtocolError, decode
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import sample_modules, txt_launch

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "qrexec" / "qubes.SealGetDiskKey"
PREVIOUS = ROOT / "qrexec" / "qubes.SealGetPreviousDiskKey"  # a symlink to SERVICE

CONFIG = f"""\
[storage-domains]
sys-storage = ["work", "personal", "vault"]
sys-backup = ["archive"]

[domain-uuids]
work = "{U1}"

[rate-limit]
rate = 1000.0
burst = 100000

[service]
request-timeout = 1.0
"""


class Daemon:
    """``qubes-seal serve`` as a subprocess; its log (stderr) goes to a file the test reads."""

    def __init__(self, dir: Path, container: Path, config: str = CONFIG) -> None:
        self.dir = dir
        self.socket = dir / "run" / "keyd.sock"
        self.config = dir / "config.toml"
        self.config.write_text(config)
        self.container = container
        self.logfile = dir / "keyd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
        with open(self.logfile, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "qubes_seal", "serve", "--socket", str(self.socket),
                 "--config", str(self.config), "--container", str(self.container)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
            )  # fmt: skip
        deadline = time.monotonic() + 20
        while client.status(self.socket, timeout=1) is None:
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, "the daemon did not answer in 20 s"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        return self.logfile.read_text(errors="replace")

    def request(self, doc: dict[str, Any]) -> dict[str, Any]:
        return client.request(self.socket, doc)


def get_key(
    sock: Path, caller: str, argument: str | None, *, service: Path = SERVICE
) -> subprocess.CompletedProcess[bytes]:
    """Run the service executable as qrexec runs it for ``caller`` asking ``argument``:
    ``service`` is the file qrexec found (``qubes.SealGetPreviousDiskKey``: the symlink)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "QREXEC_REMOTE_DOMAIN": caller,
        "QREXEC_SERVICE_FULL_NAME": service.name + (f"+{argument}" if argument else ""),
        "QREXEC_REQUESTED_TARGET_TYPE": "keyword",
        "QREXEC_REQUESTED_TARGET_KEYWORD": "adminvm",
        "QUBES_SEAL_SOCKET": str(sock),
    }
    argv = [str(service)]
    if argument:
        env["QREXEC_SERVICE_ARGUMENT"] = argument
        argv.append(argument)
    return subprocess.run(argv, input=b"", capture_output=True, env=env, timeout=30)


def raw(sock: Path, data: bytes, *, timeout: float = 5.0) -> dict[str, Any]:
    """Send ``data`` as it is; the daemon's answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock))
        s.sendall(data)
        buf = b""
        while b"\n" not in buf:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    doc: dict[str, Any] = json.loads(buf.partition(b"\n")[0])
    return doc


@pytest.fixture
def keybox(swtpm: Swtpm, tmp_path: Path) -> Iterator[Box]:
    """A container initialised on this test's swtpm, rebooted into a measured launch."""
    b = Box(swtpm, tmp_path)
    b.pw.write_text(PASSPHRASE + "\n")
    txt_launch(swtpm, sample_modules())
    res = b.cli("init", *CHEAP_KDF, "--recovery-key-file", str(b.rk), pw=b.pw)
    assert res.code == 0, res.err
    b.boot()
    yield b
    chain.lock(b.container)  # leave no hand-over in root's keyring


@pytest.fixture
def daemon(keybox: Box) -> Iterator[Daemon]:
    d = Daemon(keybox.dir, keybox.container)
    yield d
    d.stop()


def cli(box: Box, d: Daemon, *args: str) -> Result:
    """``qubes-seal ARGS --container C`` with the daemon's socket in QUBES_SEAL_SOCKET."""
    return run(box.swtpm.tcti, box.dir / "state", *args, "--container", str(box.container),
               env={"QUBES_SEAL_SOCKET": str(d.socket)})  # fmt: skip


def unlocked_with_keys(box: Box, d: Daemon) -> dict[str, bytes]:
    """Unlock (hand-over), add work and personal through the daemon; their keys."""
    assert box.unlock().code == 0
    assert cli(box, d, "domain", "add", "work", "--uuid", U1).code == 0
    assert cli(box, d, "domain", "add", "personal").code == 0
    assert cli(box, d, "domain", "add", "red").code == 0
    keys = {}
    for name, extra in (("work", ["--uuid", U1]), ("personal", []), ("red", [])):
        res = cli(box, d, "domain", "show", name, *extra, "--show-key", "--json")
        assert res.code == 0, res.err
        keys[name] = bytes.fromhex(res.json()["key"])
    return keys


def test_locked_then_unlocked_then_restarted(keybox: Box, daemon: Daemon) -> None:
    # Started before the unlock: locked, with a clear error and exit 7.
    daemon.start()
    res = get_key(daemon.socket, "sys-storage", "work")
    assert res.returncode == 7, res.stderr
    assert res.stdout == b""
    assert b"locked" in res.stderr and b"qubes-seal unlock" in res.stderr
    assert daemon.request({"op": "status"})["locked"] is True
    # Unlock in dom0: the daemon follows the keyring; domain commands go through it.
    keys = unlocked_with_keys(keybox, daemon)
    assert "admin add work" in daemon.log()
    res = get_key(daemon.socket, "sys-storage", "work")
    assert res.returncode == 0, res.stderr
    assert res.stdout == keys["work"] and len(res.stdout) == 64
    assert get_key(daemon.socket, "sys-storage", "personal").stdout == keys["personal"]
    # The log names caller, domain, result; never a key.
    log = daemon.log()
    assert "caller=sys-storage domain=work result=ok" in log
    for key in keys.values():
        assert key.hex() not in log and key.hex().upper() not in log
    # Restart: unreachable meanwhile (exit 6), then keys at once (the hand-over stays).
    daemon.stop()
    res = get_key(daemon.socket, "sys-storage", "work")
    assert res.returncode == 6 and res.stdout == b""
    daemon.start()
    assert get_key(daemon.socket, "sys-storage", "work").stdout == keys["work"]
    # The added domains were persisted to the container, not only the daemon's memory.
    daemon.stop()
    listed = keybox.cli("domain", "list", "--json").json()
    assert [d["name"] for d in listed["domains"]] == ["personal", "red", "work"]
    daemon.start()
    # A dropped hand-over (qubes-seal lock) locks the running daemon within RECHECK_UNLOCKED.
    chain.lock(keybox.container)
    time.sleep(RECHECK_UNLOCKED + 0.1)
    res = get_key(daemon.socket, "sys-storage", "work")
    assert res.returncode == 7
    assert "keys wiped from memory" in daemon.log()


def test_refusals_are_clear_logged_and_harmless(keybox: Box, daemon: Daemon) -> None:
    daemon.start()
    keys = unlocked_with_keys(keybox, daemon)
    cases = [
        ("red", "work", 4, b"not the storage domain"),  # another caller
        ("sys-backup", "work", 4, b"not the storage domain"),  # another storage domain
        ("sys-storage", "red", 4, b"not the storage domain"),  # a domain nobody serves
        ("sys-storage", "vault", 3, b"no key"),  # assigned, but no key stored
        ("sys-storage", "_work", 2, b"invalid"),  # qrexec's "_" for a bad byte
        ("sys-storage", "work-dm", 2, b"invalid"),
        ("sys-storage", "Domain-0", 2, b"invalid"),
        ("sys-storage", "w" * 32, 2, b"invalid"),
        ("sys-storage", "", 2, b"invalid"),
        ("sys-storage", "work+x", 2, b"invalid"),
    ]
    for caller, domain, code, message in cases:
        res = get_key(daemon.socket, caller, domain)
        assert res.returncode == code, (caller, domain, res.stderr)
        assert res.stdout == b""
        assert message in res.stderr, res.stderr
        assert get_key(daemon.socket, "sys-storage", "work").stdout == keys["work"]
    log = daemon.log()
    assert "caller=red domain=work result=refused" in log
    assert "caller=sys-storage domain=red result=refused" in log
    assert "caller=sys-storage domain=vault result=no-key" in log
    # The daemon checks names itself (a client that skips the executable's check).
    for bad in ({"caller": "sys-storage", "domain": "../work"},
                {"caller": "sys storage", "domain": "work"},
                {"caller": ["sys-storage"], "domain": "work"},
                {"caller": "sys-storage"}):  # fmt: skip
        answer = daemon.request({"op": "get-key", **bad})
        assert answer["ok"] is False and answer["error"] == "bad-request", answer
    # The configured UUID is enforced: a new "work" qube (other UUID) gets no old key.
    cfg = daemon.config.read_text().replace(U1, U2)
    daemon.config.write_text(cfg)
    assert daemon.request({"op": "reload"})["ok"] is True
    res = get_key(daemon.socket, "sys-storage", "work")
    assert res.returncode == 4 and b"another qube" in res.stderr
    # Garbage and oversized requests: an error answer, logged, still serving.
    assert raw(daemon.socket, b"\x00\xffnot json\n")["error"] == "bad-request"
    assert raw(daemon.socket, b"[1, 2]\n")["error"] == "bad-request"
    assert raw(daemon.socket, b'{"op": "fly"}\n')["error"] == "bad-request"
    answer = raw(daemon.socket, b"{" + b" " * (MAX_REQUEST * 4) + b"}\n")
    assert answer["error"] == "too-large"
    log = daemon.log()
    assert "not a JSON line" in log and f"larger than {MAX_REQUEST} bytes" in log
    assert get_key(daemon.socket, "sys-storage", "personal").stdout == keys["personal"]
    assert daemon.proc is not None and daemon.proc.poll() is None


def rotate(box: Box, d: Daemon, name: str, *args: str) -> None:
    """``qubes-seal domain rotate NAME ARGS`` in dom0: refused while the key service runs, so
    stopped for it and started again."""
    d.stop()
    res = cli(box, d, "domain", "rotate", name, *args)
    assert res.code == 0, res.err
    d.start()


def test_previous_key_while_a_rotation_is_pending(keybox: Box, daemon: Daemon) -> None:
    daemon.start()
    keys = unlocked_with_keys(keybox, daemon)
    # No rotation pending: qubes.SealGetPreviousDiskKey refuses clearly (exit 3).
    res = get_key(daemon.socket, "sys-storage", "work", service=PREVIOUS)
    assert res.returncode == 3 and res.stdout == b"", res.stderr
    assert b"qubes.SealGetPreviousDiskKey: " in res.stderr
    assert b"no rotation is pending" in res.stderr
    res = cli(keybox, daemon, "domain", "show", "work", "--uuid", U1, "--json")
    assert res.json()["domain"]["rotation_pending"] is None
    # domain rotate refuses while the key service runs; stopped, it rotates.
    res = cli(keybox, daemon, "domain", "rotate", "work", "--uuid", U1)
    assert res.code == 2 and "key service is running" in res.err
    rotate(keybox, daemon, "work", "--uuid", U1)
    res = get_key(daemon.socket, "sys-storage", "work")
    new = res.stdout
    assert res.returncode == 0 and len(new) == 64 and new != keys["work"]
    res = get_key(daemon.socket, "sys-storage", "work", service=PREVIOUS)
    assert res.returncode == 0, res.stderr
    assert res.stdout == keys["work"]
    # Run by hand (no QREXEC_SERVICE_FULL_NAME): the name it was run under decides.
    env = {"QREXEC_REMOTE_DOMAIN": "sys-storage", "QUBES_SEAL_SOCKET": str(daemon.socket)}
    for exe, want in ((PREVIOUS, keys["work"]), (SERVICE, new)):
        res = subprocess.run([str(exe), "work"], capture_output=True, env=env, timeout=30)
        assert res.returncode == 0 and res.stdout == want, res.stderr
    # The same caller checks as for the current key.
    cases = [
        ("red", "work", 4, b"not the storage domain"),
        ("sys-backup", "work", 4, b"not the storage domain"),
        ("sys-storage", "personal", 3, b"no rotation is pending"),  # not rotated
        ("sys-storage", "vault", 3, b"no key is stored"),
        ("sys-storage", "_work", 2, b"invalid"),
    ]
    for caller, domain, code, message in cases:
        res = get_key(daemon.socket, caller, domain, service=PREVIOUS)
        assert res.returncode == code, (caller, domain, res.stderr)
        assert res.stdout == b"" and message in res.stderr, res.stderr
    # An unknown service name: refused before asking anything.
    odd = keybox.dir / "qubes.SealGetOtherDiskKey"
    odd.symlink_to(SERVICE)
    res = get_key(daemon.socket, "sys-storage", "work", service=odd)
    assert res.returncode == 2 and b"unknown service name" in res.stderr
    # list and show say a rotation is pending (ids and generations, never a key).
    listed = cli(keybox, daemon, "domain", "list", "--json").json()["domains"]
    by_name = {d["name"]: d for d in listed}
    pending = by_name["work"]["rotation_pending"]
    assert pending["previous_generation"] == 1 and by_name["work"]["generation"] == 2
    assert by_name["personal"]["rotation_pending"] is None
    text = cli(keybox, daemon, "domain", "list").out
    assert f"rotation pending: previous key {pending['previous_key_id']}" in text
    text = cli(keybox, daemon, "domain", "show", "work", "--uuid", U1).out
    assert "rotation pending" in text and "--commit" in text
    # The UUID rule holds for the previous key too.
    daemon.config.write_text(daemon.config.read_text().replace(U1, U2))
    assert daemon.request({"op": "reload"})["ok"] is True
    res = get_key(daemon.socket, "sys-storage", "work", service=PREVIOUS)
    assert res.returncode == 4 and b"another qube" in res.stderr
    daemon.config.write_text(daemon.config.read_text().replace(U2, U1))
    assert daemon.request({"op": "reload"})["ok"] is True
    # The log names the key asked for, never a key.
    log = daemon.log()
    assert "previous key request caller=sys-storage domain=work result=ok" in log
    assert "current key request caller=sys-storage domain=work result=ok" in log
    assert "previous key request caller=red domain=work result=refused" in log
    assert "previous key request caller=sys-storage domain=personal result=no-key (no " in log
    for key in (*keys.values(), new):
        assert key.hex() not in log and key.hex().upper() not in log
    # Committed: the previous key is gone, refused again; the current one stays.
    rotate(keybox, daemon, "work", "--uuid", U1, "--commit")
    res = get_key(daemon.socket, "sys-storage", "work", service=PREVIOUS)
    assert res.returncode == 3 and b"no rotation is pending" in res.stderr
    assert get_key(daemon.socket, "sys-storage", "work").stdout == new
    res = cli(keybox, daemon, "domain", "show", "work", "--uuid", U1, "--json")
    assert res.json()["domain"]["rotation_pending"] is None
    # Locked: exit 7, as for the current key.
    chain.lock(keybox.container)
    time.sleep(RECHECK_UNLOCKED + 0.1)
    assert get_key(daemon.socket, "sys-storage", "work", service=PREVIOUS).returncode == 7


def test_200_concurrent_requests_all_correct(keybox: Box, daemon: Daemon) -> None:
    daemon.start()
    keys = unlocked_with_keys(keybox, daemon)
    want = {"work": keys["work"].hex(), "personal": keys["personal"].hex()}
    barrier = threading.Barrier(200)

    def one(i: int) -> str:
        domain = ("work", "personal")[i % 2]
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(daemon.socket))
            barrier.wait()  # 200 connections open at once, then 200 requests at once
            req = {"op": "get-key", "caller": "sys-storage", "domain": domain}
            s.sendall(json.dumps(req).encode() + b"\n")
            buf = b""
            while b"\n" not in buf:
                chunk = s.recv(4096)
                assert chunk
                buf += chunk
        answer = json.loads(buf)
        assert answer["ok"] is True, answer
        return "ok" if answer["key"] == want[domain] else "WRONG"

    with ThreadPoolExecutor(200) as pool:
        results = list(pool.map(one, range(200)))
    assert results == ["ok"] * 200
    # And through the service executable, 50 at once.
    with ThreadPoolExecutor(50) as pool:
        procs = list(pool.map(lambda i: get_key(daemon.socket, "sys-storage", "work"), range(50)))
    assert all(p.returncode == 0 and p.stdout == keys["work"] for p in procs)
    counts = daemon.request({"op": "status"})["requests"]
    assert counts["keys_served"] >= 250


def test_misbehaving_clients_do_not_stall_others(keybox: Box, daemon: Daemon) -> None:
    daemon.start()
    keys = unlocked_with_keys(keybox, daemon)
    stop = threading.Event()
    held: list[socket.socket] = []

    def connect() -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(daemon.socket))
        return s

    for _ in range(100):  # silent: connect and say nothing
        held.append(connect())

    def slow() -> None:  # one byte every 0.2 s, never finishing in time
        with connect() as s:
            for b in b'{"op": "get-key", "caller": "sys-storage", "domain": "work"}':
                if stop.is_set():
                    return
                try:
                    s.send(bytes([b]))
                except OSError:
                    return
                time.sleep(0.2)

    # The repeating ones pause 10 ms between connections: hundreds of bad connections per
    # second in all, more than qrexec (a dom0 process per call) lets a qube make.
    def garbage() -> None:
        while not stop.wait(0.01):
            with connect() as s:
                s.sendall(os.urandom(512) + b"\n")

    def vanish() -> None:  # disconnect mid-request
        while not stop.wait(0.01):
            with connect() as s:
                s.sendall(b'{"op": "get-key", "caller": "sys-st')

    def flood() -> None:  # oversized, never ending
        while not stop.wait(0.01):
            with connect() as s, contextlib.suppress(OSError):
                s.sendall(b"x" * (MAX_REQUEST * 16))

    workers = [threading.Thread(target=f) for f in [slow] * 20 + [garbage, vanish, flood] * 3]
    for w in workers:
        w.start()
    try:
        time.sleep(0.3)
        latencies = []
        for _ in range(20):
            t0 = time.perf_counter()
            res = get_key(daemon.socket, "sys-storage", "work")
            latencies.append(time.perf_counter() - t0)
            assert res.returncode == 0 and res.stdout == keys["work"], res.stderr
        # A good client never waits for the 1 s request timeout of the bad ones.
        assert max(latencies) < 0.9, latencies
        # The silent ones were dropped after the request timeout, with an answer.
        time.sleep(1.2)
        answer = json.loads(held[0].recv(4096).partition(b"\n")[0])
        assert answer["error"] == "bad-request" and "in time" in answer["message"]
    finally:
        stop.set()
        for w in workers:
            w.join()
        for s in held:
            s.close()
    log = daemon.log()
    assert "no complete request in" in log
    assert "disconnected mid-request" in log
    assert "Traceback" not in log
    assert get_key(daemon.socket, "sys-storage", "personal").stdout == keys["personal"]


def test_rate_limit_takes_refusals_not_authorised_bursts(keybox: Box, tmp_path: Path) -> None:
    # Issue 14: the limit takes refused and malformed requests; an authorised caller is
    # never refused for the size of its burst, even with a bucket of 3.
    d = Daemon(tmp_path, keybox.container, config=CONFIG.replace("burst = 100000", "burst = 3")
               .replace("rate = 1000.0", "rate = 0.01"))  # fmt: skip
    d.start()
    try:
        codes = [get_key(d.socket, "sys-backup", "work").returncode for _ in range(5)]
        assert codes == [4, 4, 4, 5, 5]  # refused, then rate-limited (after retries)
        assert [get_key(d.socket, "sys-storage", "work").returncode for _ in range(6)] == [7] * 6
        assert "result=rate-limited" in d.log()
        bad = [raw(d.socket, b"{not json\n")["error"] for _ in range(5)]
        assert bad[:3] == ["bad-request"] * 3 and bad[3:] == ["rate-limited"] * 2
    finally:
        d.stop()


DOM0_CONFIG = CONFIG.replace("[domain-uuids]", '[dom0-storage]\ndomains = ["vault2", "red"]\n\n'
                             "[domain-uuids]").replace("rate = 1000.0", "rate = 20.0").replace(
    "burst = 100000", "burst = 100")  # fmt: skip


def test_400_valid_requests_at_once_all_get_their_key(keybox: Box, tmp_path: Path) -> None:
    # Issue 14: with the default limits (burst 100, 20/s) 400 requests at once from one
    # storage domain got 292 keys and 108 refusals; now every one gets its key, and so do
    # 400 of dom0's pool driver (root, caller "dom0").
    d = Daemon(tmp_path, keybox.container, config=DOM0_CONFIG)
    d.start()
    try:
        keys = unlocked_with_keys(keybox, d)

        def one(args: tuple[str, str]) -> str:
            caller, domain = args
            answer = d.request({"op": "get-key", "caller": caller, "domain": domain})
            if answer.get("ok") is not True:
                return str(answer.get("error"))
            return "ok" if answer["key"] == keys[domain].hex() else "WRONG"

        for caller, domain in (("sys-storage", "personal"), ("dom0", "red")):
            with ThreadPoolExecutor(100) as pool:
                results = list(pool.map(one, [(caller, domain)] * 400))
            assert results == ["ok"] * 400, Counter(results)
        assert "rate-limited" not in d.log()
    finally:
        d.stop()


def test_dom0_caller_is_root_only_and_for_its_qubes(keybox: Box, tmp_path: Path) -> None:
    d = Daemon(tmp_path, keybox.container, config=DOM0_CONFIG)
    d.start()
    try:
        keys = unlocked_with_keys(keybox, d)
        ok = d.request({"op": "get-key", "caller": "dom0", "domain": "red"})
        assert ok["ok"] is True and ok["key"] == keys["red"].hex()
        # dom0 is not the storage domain of work; sys-storage is not that of red
        for caller, domain in (("dom0", "work"), ("sys-storage", "red")):
            answer = d.request({"op": "get-key", "caller": caller, "domain": domain})
            assert answer["error"] == "refused", answer
        # a qrexec service (or anyone) claiming to be dom0 from a user that is not root
        res = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             os.path.realpath(sys.executable),  # reachable by 65534 wherever the venv is
             "-c", "import json,socket,sys; s=socket.socket(socket.AF_UNIX); "
             f"s.connect({str(d.socket)!r}); s.sendall(json.dumps({{'op':'get-key',"
             "'caller':'dom0','domain':'red'}).encode()+b'\\n'); "
             "sys.stdout.write(s.makefile().readline())"],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        if res.returncode == 0 and res.stdout:  # the socket admits only root and group qubes
            assert json.loads(res.stdout)["ok"] is False
        # the pool driver binds the key to the qube's UUID
        wrong = d.request({"op": "get-key", "caller": "dom0", "domain": "red", "qube_uuid": U2})
        assert wrong["error"] == "refused"
        bad = d.request({"op": "get-key", "caller": "dom0", "domain": "red", "qube_uuid": "x"})
        assert bad["error"] == "refused"
    finally:
        d.stop()


def test_dom0_storage_config_is_checked(tmp_path: Path) -> None:
    from qubes_seal.service import config as cfg

    good = cfg.loads('[storage-domains]\nsys-s = ["a"]\n[dom0-storage]\ndomains = ["b"]\n')
    assert good.served_by("b") == "dom0" and good.served_by("a") == "sys-s"
    for text in (
        '[storage-domains]\ndom0 = ["a"]\n',
        '[storage-domains]\nsys-s = ["a"]\n[dom0-storage]\ndomains = ["a"]\n',
        '[storage-domains]\nsys-s = ["a"]\n[dom0-storage]\ndomains = ["sys-s"]\n',
        '[storage-domains]\nsys-s = ["a"]\n[dom0-storage]\ndomains = "b"\n',
        '[storage-domains]\nsys-s = ["a"]\n[dom0-storage]\nqubes = ["b"]\n',
    ):
        with pytest.raises(cfg.ConfigError):
            cfg.loads(text)


def test_socket_is_root_only(keybox: Box, daemon: Daemon) -> None:
    daemon.start()
    mode = daemon.socket.stat().st_mode & 0o777
    assert mode in (0o600, 0o660)
    assert daemon.socket.parent.stat().st_mode & 0o007 == 0
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client as another user")
    # A copy of the executable that user 65534 may run, wherever this checkout lives (a CI
    # clone may sit in a 0700 directory).
    public = Path(tempfile.mkdtemp(prefix="qs-service-"))
    os.chmod(public, 0o755)
    exe = public / SERVICE.name
    shutil.copy2(SERVICE, exe)
    os.chmod(exe, 0o755)
    try:
        res = subprocess.run([str(exe), "work"], capture_output=True, timeout=30, user=65534,
                         env={"QREXEC_REMOTE_DOMAIN": "sys-storage",
                              "QREXEC_SERVICE_ARGUMENT": "work",
                              "QUBES_SEAL_SOCKET": str(daemon.socket)})  # fmt: skip
    finally:
        shutil.rmtree(public)
    assert res.returncode == 6 and res.stdout == b"", res.stderr
    assert b"Permission denied" in res.stderr


def status(box: Box, d: Daemon, *args: str) -> Result:
    return run(box.swtpm.tcti, box.dir / "state", "status", *args,
               env={"QUBES_SEAL_SOCKET": str(d.socket)})  # fmt: skip


def test_status_shows_the_key_service(keybox: Box, daemon: Daemon) -> None:
    res = status(keybox, daemon, "--json")
    assert res.code == 0, res.err
    assert res.json()["key_service"]["running"] is False
    daemon.start()
    res = status(keybox, daemon)
    assert res.code == 0, res.err
    assert "key service:" in res.out and "LOCKED" in res.out
    assert keybox.unlock().code == 0
    doc = status(keybox, daemon, "--json").json()["key_service"]
    assert doc["locked"] is False
    assert doc["domains_served"]["work"] == "sys-storage"
    text = status(keybox, daemon).out
    assert "sys-storage <- personal, vault, work" in text
    assert "requests:" in text


def test_daemon_refuses_a_bad_config(tmp_path: Path) -> None:
    d = Daemon(tmp_path, tmp_path / "none.luks",
               config='[storage-domains]\na = ["x"]\nb = ["x"]\n')  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
    proc = subprocess.run(
        [sys.executable, "-m", "qubes_seal", "serve", "--socket", str(d.socket),
         "--config", str(d.config), "--container", str(d.container)],
        capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "served by both 'a' and 'b'" in proc.stderr
    assert not d.socket.exists()


# -- attacks on the daemon (issue 13): a member of the service group, from its side ----------


def test_decode_refuses_deep_nesting_without_recursing() -> None:
    # The line of the attack: 3 KB, nested 1,500 deep; json.loads alone raises RecursionError.
    deep = b'{"op":' + b"[" * 1500 + b"]" * 1500 + b"}"
    with pytest.raises(RecursionError):
        json.loads(b"[" * 100_000 + b"]" * 100_000)
    for line in (deep, b'{"a":' * 1500 + b"1" + b"}" * 1500, b"[" * MAX_REQUEST):
        with pytest.raises(ProtocolError, match="nested deeper"):
            decode(line)
    # Brackets inside a string are not nesting; 16 levels are the limit.
    assert decode(b'{"op":"' + b"[{" * 1000 + b'"}')["op"].startswith("[{")
    assert decode(b'{"op":' + b"[" * 15 + b"]" * 15 + b"}")["op"] == [[[[[[[[[[[[[[[]]]]]]]]]]]]]]]
    # Nothing but ProtocolError leaves decode, whatever the bytes.
    for line in (b"\xff\xfe", b'{"op": 1e999999}', b"\x00", b"{" * 17, b'{"a": "\\ud800"}'):
        with contextlib.suppress(ProtocolError):
            decode(line)


def half_sent(sock: Path, data: bytes) -> bytes:
    """Send ``data`` (no newline), close the sending side, return all the daemon sends."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(sock))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := s.recv(4096):
            buf += chunk
    return buf


def test_hostile_requests_cannot_stop_the_daemon(keybox: Box, daemon: Daemon) -> None:
    daemon.start()
    keys = unlocked_with_keys(keybox, daemon)
    assert daemon.proc is not None
    pid = daemon.request({"op": "status"})["pid"]
    deep = b'{"op":' + b"[" * 1500 + b"]" * 1500 + b"}\n"  # 3 KB: it used to kill the daemon
    hostile = [
        (deep, "bad-request", "nested deeper"),
        (b'{"op":"get-key","caller":"sys-storage","domain":' + b"{" * 1200 + b"\n",
         "bad-request", "nested deeper"),
        (b'{"a":' * 800 + b"1" + b"}" * 800 + b"\n", "too-large", "larger than"),
        (b'{"op":[]}\n', "bad-request", "unknown op"),  # unhashable op
        (b'{"op":{"get-key":1}}\n', "bad-request", "unknown op"),
        (b'{"op":"get-key","caller":{"a":[1]},"domain":[[]]}\n', "bad-request", "invalid"),
        (b'{"op":"show","name":[1],"qube_uuid":{}}\n', "bad-request", "invalid"),
        (b'{"op":"get-key","which":[],"caller":"sys-storage","domain":"work"}\n',
         "bad-request", "which"),
        (b"\xff\xfe\x00{\n", "bad-request", "not a JSON line"),
        (os.urandom(3000).replace(b"\n", b"") + b"\n", "bad-request", "malformed"),
        (b"x" * (MAX_REQUEST * 4), "too-large", "larger than"),
    ]  # fmt: skip
    for data, name, message in hostile:
        answer = raw(daemon.socket, data)
        assert answer["ok"] is False and answer["error"] == name, (data[:60], answer)
        assert message in answer["message"], answer
        # The same daemon process answers the next legitimate request at once.
        assert get_key(daemon.socket, "sys-storage", "work").stdout == keys["work"]
    # A half-sent request, the sending side closed: no answer, logged, nothing else.
    assert half_sent(daemon.socket, b'{"op":"get-key","caller":"sys-st') == b""
    # A half-sent request left open: answered when its time is up (request-timeout 1 s).
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(str(daemon.socket))
        s.sendall(b'{"op":"get-key","caller":"sys-storage","domain":"wo')
        assert get_key(daemon.socket, "sys-storage", "personal").stdout == keys["personal"]
        answer = json.loads(s.recv(4096).partition(b"\n")[0])
        assert answer["error"] == "bad-request" and "in time" in answer["message"]
    assert daemon.proc.poll() is None
    assert daemon.request({"op": "status"})["pid"] == pid == daemon.proc.pid
    log = daemon.log()
    assert "Traceback" not in log and "internal error" not in log
    assert "nested deeper than" in log and "disconnected mid-request" in log


HOLDER = """\
import json, resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[1])
    held.append(s)
print("holding", flush=True)
sys.stdin.read()  # until the test is done
busy = 0
for s in held:
    s.setblocking(False)
    try:
        busy += b'"busy"' in s.recv(4096)
    except BlockingIOError:
        pass
print(json.dumps({"busy": busy}), flush=True)
"""


@contextlib.contextmanager
def public_dir() -> Iterator[Path]:
    """A directory user 65534 can reach (a test's tmp_path is in a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="qs-keyd-"))
    os.chmod(path, 0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_idle_connections_of_one_user_starve_nobody(keybox: Box) -> None:
    """1,100 idle connections from uid 65534 (a member of the service group, "nogroup"
    here), held well past any timeout: root and another process of uid 65534 still get
    their keys at once.  Connections are counted per user (SO_PEERCRED uid); over the cap,
    the user's oldest waiting connection is closed for the newcomer."""
    if os.geteuid() != 0:
        pytest.skip("needs root to connect as another user")
    extra = '\ngroup = "nogroup"\n'
    configs = {
        "per-user cap (default 256)": "request-timeout = 60.0" + extra,
        "total cap": "request-timeout = 60.0\nmax-connections = 100\n"
        "max-connections-per-caller = 5000" + extra,
    }
    with public_dir() as pub:
        exe = pub / SERVICE.name
        shutil.copy2(SERVICE, exe)
        os.chmod(exe, 0o755)
        holder = pub / "holder.py"
        holder.write_text(HOLDER)
        for n, (what, service_cfg) in enumerate(configs.items()):
            (pub / str(n)).mkdir(mode=0o755)
            d = Daemon(pub / str(n), keybox.container,
                       config=CONFIG.replace("request-timeout = 1.0", service_cfg))  # fmt: skip
            d.start()
            try:
                if n == 0:
                    assert keybox.unlock().code == 0
                    assert keybox.cli("domain", "add", "personal").code == 0
                want = bytes.fromhex(d.request({"op": "show", "name": "personal",
                                                "show_key": True})["key"])  # fmt: skip
                attacker = subprocess.Popen(
                    # the interpreter behind the venv: user 65534 may not reach the venv
                    [os.path.realpath(sys.executable), "-I", str(holder), str(d.socket),
                     "1100"],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, user=65534, group=65534,
                    extra_groups=[], cwd=pub,
                )  # fmt: skip
                assert attacker.stdout is not None and attacker.stdin is not None
                assert attacker.stdout.readline() == b"holding\n", what
                time.sleep(0.3)
                t0 = time.perf_counter()
                mine = get_key(d.socket, "sys-storage", "personal")  # root
                elapsed = time.perf_counter() - t0
                assert mine.returncode == 0 and mine.stdout == want, (what, mine.stderr)
                assert elapsed < 5, (what, elapsed)
                same_uid = subprocess.run(
                    [str(exe), "personal"], capture_output=True, timeout=30, user=65534,
                    group=65534, extra_groups=[],
                    env={"QREXEC_REMOTE_DOMAIN": "sys-storage", "QUBES_SEAL_SOCKET": str(d.socket)},
                )  # fmt: skip
                assert same_uid.returncode == 0, (what, same_uid.stderr)
                assert same_uid.stdout == want
                out, _ = attacker.communicate(b"", timeout=30)
                busy = json.loads(out)["busy"]
                # Only the newest stay: 256 per user, or 100 in all.
                assert busy >= 1100 - (256 if n == 0 else 100), (what, busy)
                counts = d.request({"op": "status"})["requests"]
                assert counts["busy"] >= busy
                assert "closed to make room (uid 65534" in d.log()
                assert "Traceback" not in d.log()
            finally:
                d.stop()
