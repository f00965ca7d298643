"""TEST ONLY: runs in the VM's initramfs after cryptsetup.target (tests/vm/test_vm.py).

Checks what the boot left behind, with the image's own interpreter and qubes_seal modules,
prints ``VMTEST RESULT {json}`` on the console, then powers the VM off (sysrq ``o``).
"""

import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

CONSOLE = "/dev/console"
PLYMOUTH_DEBUG = Path("/run/plymouth-debug.log")  # plymouth-debug.conf (plymouthd --debug-file)


def say(text):
    with open(CONSOLE, "w") as out:
        out.write(f"[vmtest] {text}\n")


def sysfs_dm():
    """{name: dm uuid} of the device-mapper devices present now."""
    found = {}
    for dev in Path("/sys/block").glob("dm-*"):
        with contextlib.suppress(OSError):
            found[(dev / "dm/name").read_text().strip()] = (dev / "dm/uuid").read_text().strip()
    return found


def show(unit, props):
    """{property: value} from ``systemctl show``."""
    out = subprocess.run(["systemctl", "show", "-p", props, unit], capture_output=True, text=True)
    return dict(line.partition("=")[::2] for line in out.stdout.split())


def plymouth():
    """Did Plymouth run, who answered the password requests, what reached it: each request
    in its debug log as "KIND: CLIENT'S COMMAND LINE" (the log names the client's argv)."""
    res = {"running": Path("/run/plymouth/pid").exists()}
    for agent in ("plymouth", "console"):
        unit = show(f"systemd-ask-password-{agent}.service", "ActiveState,Result")
        res[f"{agent}_agent"] = " ".join(f"{k}={v}" for k, v in sorted(unit.items()))
    # plymouthd writes its debug log as it quits: stop it (SIGTERM, as systemd does).
    with contextlib.suppress(OSError, ValueError):
        pid = int(Path("/run/plymouth/pid").read_text().split()[0])
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
    requests, client = [], "?"
    text = PLYMOUTH_DEBUG.read_text("utf-8", "replace") if PLYMOUTH_DEBUG.exists() else ""
    for line in text.splitlines():
        m = re.search(r"connection is from pid \d+ \((.*)", line)
        if m:
            client = m.group(1)[:300]
            continue
        m = re.search(r": got (.*) request$", line)
        if m:
            requests.append(f"{m.group(1)}: {client}")
    res["requests"] = requests
    return res


def check():
    res = {}
    cfg = tomllib.loads(Path("/etc/qubes-seal/boot.toml").read_text())["boot"]
    res["backend"] = cfg.get("backend", "auto")
    from qubes_seal import chain, handover
    from qubes_seal.errors import QubesSealError
    from qubes_seal.luks.container import Container
    from qubes_seal.luks.header import header_digest

    container = Container(Path(cfg["container"]))
    _, token = chain.read_token(container)
    res["root_volume"] = token.root_volume
    unit = show("qubes-seal-unlock.service", "ActiveState,Result,ExecMainStatus")
    res["unlock_unit"] = " ".join(f"{k}={v}" for k, v in sorted(unit.items()))
    times = show(
        "qubes-seal-unlock.service",
        "ExecMainStartTimestampMonotonic,ExecMainExitTimestampMonotonic",
    )
    res["unlock_times"] = {k: int(v or 0) for k, v in times.items()}
    # dom0's root volume: opened by systemd-cryptsetup with the key file our boot wrote.
    present = sysfs_dm()
    res["dm_now"] = present
    if token.root_volume:
        res["root_opened"] = Path("/dev/mapper", token.root_volume).exists()
        res["root_is_dm_crypt"] = present.get(token.root_volume, "").startswith("CRYPT-LUKS2-")
        escaped = token.root_volume.replace("-", "\\x2d")  # systemd-escape
        crypt = show(f"systemd-cryptsetup@{escaped}.service", "ActiveState,Result")
        res["root_unit"] = " ".join(f"{k}={v}" for k, v in sorted(crypt.items()))
        res["root_key_file"] = Path(
            cfg.get("keys_dir", "/run/cryptsetup-keys.d"), f"{token.root_volume}.key"
        ).exists()
    # The container: every dm device seen by udev during the boot (name, table owner).
    log = Path("/run/qubes-seal-vmtest/dm.log")
    seen = log.read_text().splitlines() if log.exists() else []
    res["dm_events"] = seen
    prefix = f"qubes-seal-{container.uuid[:8]}"
    res["container_via_dm_crypt"] = any(
        line.split()[2:3] == [prefix] and " CRYPT-LUKS2-" in line for line in seen
    )
    res["container_mapping_closed"] = prefix not in present
    # The hand-over to the key service: root's user keyring.
    res["handover"] = handover.get(container.uuid) is not None
    res["proc_keys_vk"] = "qubes-seal:vk:" in Path("/proc/keys").read_text()
    res["plymouth"] = plymouth()
    # PCR 13: capped (header digest, then the separator)?
    pcr = bytes.fromhex(Path("/sys/class/tpm/tpm0/pcr-sha256/13").read_text().strip())
    header = chain.pcr13_after_extend(header_digest(container.path))
    capped = hashlib.sha256(header + chain.CAP_DIGEST).digest()
    res["pcr13"] = {bytes(32): "zero", header: "header", capped: "capped"}.get(pcr, "other")
    # An unseal attempted now must fail: the proof of a clean boot is sealed to the same
    # PCRs with no passphrase, so only the PCR policy can refuse it.
    if token.proof is not None:
        from qubes_seal.attest import reveal

        try:
            reveal(token.proof, tcti=cfg.get("tpm", "device:/dev/tpmrm0"))
            res["unseal_after_boot"] = "SUCCEEDED"
        except QubesSealError as exc:
            res["unseal_after_boot"] = f"refused: {type(exc).__name__}: {exc.message}"
    else:
        res["unseal_after_boot"] = "no proof sealed"
    return res


def main():
    try:
        res = check()
    except BaseException as exc:
        try:
            import traceback

            res = {"error": traceback.format_exc()}
        except ImportError:
            res = {"error": repr(exc)}
    try:
        say("RESULT " + json.dumps(res, sort_keys=True))
    finally:
        os.sync()
        time.sleep(0.3)
        Path("/proc/sysrq-trigger").write_text("o")
        time.sleep(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
