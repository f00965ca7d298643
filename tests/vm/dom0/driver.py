"""TEST ONLY: runs in the VM as dom0vm-driver.service, after switch-root (tests/vm/test_dom0.py).

systemd is PID 1 of a dom0 made of the host's root (9p, read-only) and a tmpfs overlay, with
our units installed where the RPM installs them.  This drives them as dom0 would and prints
``[dom0vm] SERVING {json}`` as soon as the key service serves a key, then one
``[dom0vm] RESULT {json}`` line, then powers the VM off (``systemctl poweroff``): the
orderly shutdown that dom0vm-stopcheck.service watches.

Standard library only, run by the host's /usr/bin/python3 -I; the qubes-seal command is
/usr/bin/qubes-seal (the test's interpreter and repository).  argv: REPO PYTHON.
"""

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

CONSOLE = "/dev/console"
RPC = "/etc/qubes-rpc/qubes.SealGetDiskKey"
CONFIG = Path("/etc/qubes-seal/config.toml")
SOCKET = Path("/run/qubes-seal/keyd.sock")
STATE = Path("/var/lib/qubes-seal")
CONTAINER = STATE / "keys.luks"
SERVICE_USER = "user"  # dom0's qrexec service user (group qubes), made by the test
KEYD = "qubes-seal-keyd.service"
RESEAL = "qubes-seal-reseal.service"
HARDENING = (
    "ProtectSystem,ProtectHome,PrivateTmp,PrivateNetwork,PrivateDevices,PrivateIPC,"
    "NoNewPrivileges,ProtectKernelTunables,ProtectKernelModules,ProtectKernelLogs,"
    "ProtectControlGroups,ProtectClock,ProtectHostname,ProtectProc,ProcSubset,"
    "RestrictAddressFamilies,RestrictNamespaces,RestrictRealtime,RestrictSUIDSGID,"
    "LockPersonality,MemoryDenyWriteExecute,RemoveIPC,SystemCallArchitectures,"
    "SystemCallFilter,SystemCallErrorNumber,CapabilityBoundingSet,AmbientCapabilities,"
    "DevicePolicy,KeyringMode,UMask,ReadWritePaths,LimitCORE,LimitNOFILE,User,"
    "RuntimeDirectory,RuntimeDirectoryMode"
)
CONFIG_BEFORE = """\
# TEST ONLY (tests/vm/test_dom0.py)
[storage-domains]
sys-storage = ["work"]

[dom0-storage]
domains = [{dom0}]
"""
CONFIG_AFTER = """\
# TEST ONLY (tests/vm/test_dom0.py): after the reload, work moved to sys-storage2
[storage-domains]
sys-storage = []
sys-storage2 = ["work"]

[dom0-storage]
domains = [{dom0}]
"""
DOM0_QUBES = ["vault-test", "vault-test1", "vault-test2", "vault-test3", "vault-test-clone"]


def say(text):
    with open(CONSOLE, "w") as out:
        out.write(f"[dom0vm] {text}\n")


def mono():
    """CLOCK_MONOTONIC in microseconds: systemd's *TimestampMonotonic clock."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def show(unit, props=None):
    """{property: value} from ``systemctl show`` (the manager's with unit None)."""
    cmd = ["systemctl", "show"] + (["-p", props] if props else []) + ([unit] if unit else [])
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    return dict(line.partition("=")[::2] for line in out.splitlines() if "=" in line)


def journal(unit):
    out = subprocess.run(["journalctl", "-b", "-o", "cat", "--no-pager", "-u", unit],
                         capture_output=True, text=True, timeout=30)  # fmt: skip
    return out.stdout.strip().splitlines()


def cli(*args, timeout=120):
    """The qubes-seal command as installed (/usr/bin/qubes-seal), --json: (code, doc, err)."""
    proc = subprocess.run(["/usr/bin/qubes-seal", *args, "--json"], capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        doc = json.loads(proc.stdout) if proc.stdout.strip() else None
    except ValueError:
        doc = proc.stdout[-2000:]
    return proc.returncode, doc, proc.stderr[-2000:]


def qrexec_call(caller, domain, *, user=SERVICE_USER, service="qubes.SealGetDiskKey"):
    """The service executable as qrexec-daemon runs it in dom0: as dom0's service user, with
    the QREXEC_* variables of the call; returns (exit, sha256 of stdout, len, stderr)."""
    env = {
        "PATH": "/usr/bin:/bin",
        "QREXEC_REMOTE_DOMAIN": caller,
        "QREXEC_SERVICE_ARGUMENT": domain,
        "QREXEC_SERVICE_FULL_NAME": f"{service}+{domain}",
        "QREXEC_REQUESTED_TARGET_TYPE": "keyword",
        "QREXEC_REQUESTED_TARGET": "@adminvm",
    }
    proc = subprocess.run(
        ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", "--", RPC]
        if user != "nobody"
        else ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", RPC],
        env=env, capture_output=True, timeout=30, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return {
        "exit": proc.returncode,
        "sha256": hashlib.sha256(proc.stdout).hexdigest() if proc.stdout else None,
        "bytes": len(proc.stdout),
        "stderr": proc.stderr.decode(errors="replace").strip()[-300:],
    }


def daemon_status():
    """The daemon's status (root's admin request on its socket), or None."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(SOCKET))
            sock.sendall(b'{"op": "status"}\n')
            buf = b""
            while b"\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
        return json.loads(buf.partition(b"\n")[0])
    except (OSError, ValueError):
        return None


def wait_for(what, check, deadline, pause=0.1):
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(pause)


def key_service(res):
    """keyd under its hardening; serves the qrexec service executable."""
    deadline = time.monotonic() + 120
    res["config_before"] = CONFIG.read_text()

    def unlocked():
        answer = daemon_status()
        return answer if answer and answer.get("ok") and answer.get("locked") is False else None

    res["daemon_status"] = wait_for("the key service, unlocked", unlocked, deadline, 0.2)
    res["unlocked_monotonic_us"] = mono()
    say("UNLOCKED " + json.dumps({"monotonic_us": res["unlocked_monotonic_us"]}))
    # dom0 adds a qube's key through the daemon (root, the admin path): written to the
    # container by the daemon, under ProtectSystem=strict + ReadWritePaths.
    # Under TCG, on a busy host, the daemon's write of the container can outlast the CLI's
    # 10 s: the daemon still finishes the add; then the key is there (asked again below).
    attempts = []
    for _ in range(3):
        code, doc, err = cli("domain", "add", "work", "--container", str(CONTAINER))
        attempts.append({"exit": code, "doc": doc, "stderr": err})
        if code == 0 or not (code == 6 and "timed out" in err):
            break
        wait_for("the key service, answering", unlocked, time.monotonic() + 60, 0.5)
        if cli("domain", "show", "work", "--container", str(CONTAINER))[0] == 0:
            break
    res["domain_add"] = attempts
    code, doc, err = cli("domain", "show", "work", "--show-key", "--container", str(CONTAINER))
    res["work_key_sha256"] = (
        hashlib.sha256(bytes.fromhex(doc["key"])).hexdigest() if code == 0 else err
    )
    t0 = mono()
    served = qrexec_call("sys-storage", "work")
    res["serving_monotonic_us"] = t0
    say("SERVING " + json.dumps({"monotonic_us": t0, "exit": served["exit"]}))
    res["qrexec_allowed"] = served
    # Refused: a qube that serves nothing; a storage domain asking for a qube it does not
    # serve; a local user outside group qubes (the socket is 0660 root:qubes).
    res["qrexec_other_caller"] = qrexec_call("sys-usb", "work")
    res["qrexec_other_domain"] = qrexec_call("sys-storage", "personal")
    res["qrexec_not_in_group"] = qrexec_call("sys-storage", "work", user="nobody")
    res["keyd"] = show(KEYD, HARDENING + ",ActiveState,SubState,MainPID,NRestarts,"
                       "ExecMainStartTimestampMonotonic")  # fmt: skip
    pid = res["keyd"].get("MainPID", "0")
    status = Path(f"/proc/{pid}/status").read_text() if pid != "0" else ""
    res["keyd_proc"] = {k: v.strip() for k, _, v in (line.partition(":") for line in
                        status.splitlines()) if k in ("Seccomp", "NoNewPrivs", "CapBnd",
                                                      "CapEff", "Uid")}  # fmt: skip
    sock = os.stat(SOCKET)
    res["socket"] = {"mode": oct(sock.st_mode & 0o777), "uid": sock.st_uid,
                     "gid": sock.st_gid, "group_qubes": _gid("qubes")}  # fmt: skip


def _gid(name):
    for line in Path("/etc/group").read_text().splitlines():
        parts = line.split(":")
        if parts[0] == name:
            return int(parts[2])
    return None


def restart(res):
    """A restart (an RPM update's, or a stop for 'domain rotate'): the daemon resumes from the
    hand-over, and the boot's TXT event log in /run/qubes-seal survives it (the reseal needs
    it).  QEMU has no TXT: a stand-in file where the boot writes the log."""
    txt_log = SOCKET.parent / "txt-event.log"
    if not txt_log.exists():
        txt_log.write_text("stand-in: the boot's TXT event log (the VM has no TXT)\n")
        txt_log.chmod(0o644)
    pid_before = show(KEYD, "MainPID")["MainPID"]
    proc = subprocess.run(["systemctl", "restart", KEYD], capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    res["restart_exit"] = proc.returncode
    res["restart_new_pid"] = show(KEYD, "MainPID")["MainPID"] != pid_before
    res["txt_log_survives_restart"] = txt_log.exists()
    res["after_restart"] = wait_for(
        "a key after the restart",
        lambda: (r := qrexec_call("sys-storage", "work"))["exit"] == 0 and r,
        time.monotonic() + 60, pause=0.3,
    )  # fmt: skip


def reload(res):
    """systemctl reload: the new configuration is taken, by the same process."""
    pid_before = show(KEYD, "MainPID")["MainPID"]
    dom0 = ", ".join(f'"{q}"' for q in DOM0_QUBES)
    CONFIG.write_text(CONFIG_AFTER.format(dom0=dom0))
    proc = subprocess.run(["systemctl", "reload", KEYD], capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    res["reload_exit"] = proc.returncode
    deadline = time.monotonic() + 60
    last = {}

    def served():
        last.update(qrexec_call("sys-storage2", "work"))
        return dict(last) if last["exit"] == 0 else None

    try:
        res["after_reload_new_server"] = wait_for("sys-storage2 served after the reload",
                                                  served, deadline, pause=0.3)  # fmt: skip
    finally:
        res["after_reload_last_call"] = dict(last)
        res["after_reload_status"] = daemon_status()
    res["after_reload_old_server"] = qrexec_call("sys-storage", "work")
    sock = os.stat(SOCKET)
    res["socket_after_reload"] = {"mode": oct(sock.st_mode & 0o777), "gid": sock.st_gid}
    res["reload_same_pid"] = show(KEYD, "MainPID")["MainPID"] == pid_before
    res["reload_journal"] = [line for line in journal(KEYD) if "reload" in line.lower()][-3:]


GRUB_CFG = """\
# TEST ONLY (tests/vm/test_dom0.py): an entry as /etc/grub.d/20_qubes_seal_tboot writes it
menuentry 'Qubes, with tboot (qubes-seal)' --id qubes-seal-tboot {{
    multiboot2 /tboot.gz logging=serial,memory
    module2 /xen-dom0vm.gz placeholder console=none
    module2 /vmlinuz-{kver} placeholder root=/dev/mapper/luks-dom0root ro
    module2 /initramfs-dom0vm.img
}}
"""


def reseal(res):
    """A vouched initramfs in /boot: the path unit fires; what the reseal can do here."""
    before = hashlib.sha256(CONTAINER.read_bytes()).hexdigest()
    starts_before = int(show(RESEAL, "NRestarts").get("NRestarts", "0") or 0)
    res["reseal_path_unit"] = show("qubes-seal-reseal.path", "ActiveState,SubState")
    kver = os.uname().release
    t0 = mono()  # the first change below may start the service already
    Path("/boot/grub").mkdir(parents=True, exist_ok=True)
    Path("/boot/grub/grub.cfg").write_text(GRUB_CFG.format(kver=kver))
    image = Path("/boot/initramfs-dom0vm.img")
    image.write_bytes(os.urandom(4096))  # stands for an initramfs dom0 built itself
    code, _, err = cli("vouch", "record", str(image))
    res["vouch_record"] = {"exit": code, "stderr": err}

    def finished():
        s = show(RESEAL, "ActiveState,Result,ExecMainStatus,ExecMainStartTimestampMonotonic,"
                 "ExecMainExitTimestampMonotonic,InvocationID")  # fmt: skip
        started = int(s.get("ExecMainStartTimestampMonotonic") or 0)
        done = int(s.get("ExecMainExitTimestampMonotonic") or 0)
        ran = started >= t0 and done >= started and s["ActiveState"] != "activating"
        return s if ran else None

    s = wait_for("qubes-seal-reseal.service to run", finished, time.monotonic() + 120, 0.5)
    res["reseal_service"] = s
    res["reseal_starts_before"] = starts_before
    res["reseal_log"] = journal(RESEAL)[-12:]
    res["reseal_hardening"] = show(RESEAL, "ProtectSystem,DevicePolicy,CapabilityBoundingSet,"
                                   "KeyringMode,SystemCallFilter,NoNewPrivileges")  # fmt: skip
    res["container_unchanged_by_refusal"] = (
        hashlib.sha256(CONTAINER.read_bytes()).hexdigest() == before
    )


def pool(res, repo, python):
    """tests/vm/dom0/pool_check.py, when the repository has it: the storage pool driver on
    real dm-crypt, as root, with the key service of this boot."""
    script = Path(repo, "tests/vm/dom0/pool_check.py")
    if not script.exists():
        res["pool"] = None
        return
    work = Path("/run/dom0vm-pool")
    work.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "ext4", "/dev/vdc", str(work)],
                             capture_output=True, text=True, timeout=60)  # fmt: skip
    if mounted.returncode != 0:
        res["pool"] = {"ok": False, "error": "mount /dev/vdc: " + mounted.stderr}
        return
    (work / "work").mkdir(exist_ok=True)
    # The container is sealed to PCR 13 only (no TXT in QEMU): the rotation's re-signing
    # needs the test's launch policy and the explicitly unsafe flags, in this process only.
    launch_toml = work / "launch.toml"
    launch_toml.write_text("# TEST ONLY (tests/vm/test_dom0.py): no TXT in QEMU\npcrs = [13]\n")
    env = dict(os.environ, PYTHONPATH=repo, QUBES_SEAL_LAUNCH_CONFIG=str(launch_toml),
               QUBES_SEAL_UNSAFE_PCR_SELECTION="1",
               QUBES_SEAL_UNSAFE_NO_MEASURED_LAUNCH="1")  # fmt: skip
    t0 = time.monotonic()
    proc = subprocess.run(
        [python, str(script), "--config", str(CONFIG), "--workdir", str(work / "work")],
        env=env, capture_output=True, text=True, timeout=400,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    res["pool_seconds"] = round(time.monotonic() - t0, 2)
    found = re.findall(r"^\[vmcheck\] pool (\{.*\})$", proc.stdout, re.M)
    if len(found) == 1:
        res["pool"] = json.loads(found[0])
    else:
        res["pool"] = {"ok": False, "exit": proc.returncode, "stdout": proc.stdout[-1500:],
                       "stderr": proc.stderr[-1500:]}  # fmt: skip
    subprocess.run(["umount", str(work)], capture_output=True, timeout=60)


def main():
    repo, python = sys.argv[1], sys.argv[2]
    res = {}
    try:
        res["manager"] = {k: int(v or 0) for k, v in show(None, (
            "InitRDTimestampMonotonic,UserspaceTimestampMonotonic,"
            "FinishTimestampMonotonic")).items()}  # fmt: skip
        res["driver_start_monotonic_us"] = mono()
        key_service(res)
        restart(res)
        reload(res)
        reseal(res)
        pool(res, repo, python)
        res["pid1"] = Path("/proc/1/comm").read_text().strip()
        res["root_fs"] = [line for line in Path("/proc/mounts").read_text().splitlines()
                          if line.split()[1] == "/"]  # fmt: skip
    except BaseException:
        res["error"] = traceback.format_exc()[-3000:]
        res["keyd_journal"] = journal(KEYD)[-30:]
    try:
        say("RESULT " + json.dumps(res, sort_keys=True))
    finally:
        subprocess.run(["systemctl", "--no-block", "poweroff"], timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
