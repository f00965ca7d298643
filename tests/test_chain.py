"""The unlock chain end to end: swtpm, real cryptsetup, the real CLI in subprocesses."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from machine import CHEAP_KDF, PASSPHRASE, U1, U2, Box

from qubes_seal import chain
from qubes_seal.luks.container import Container
from qubes_seal.sim.swtpm import Swtpm, configure_da
from qubes_seal.sim.txt_launch import sample_modules, txt_launch
from qubes_seal.tpm.device import Tpm


def test_init_reboot_unlock_and_domain_keys(box: Box) -> None:
    assert os.stat(box.rk).st_mode & 0o777 == 0o600
    box.boot()
    res = box.unlock()
    assert res.code == 0, res.err
    doc = res.json()
    assert doc["pcr13_capped"] is True
    assert set(doc["timings_ms"]) >= {"tpm", "argon2id", "cryptsetup", "keystore"}
    # Domain keys through this boot's hand-over (no passphrase needed now).
    assert box.cli("domain", "add", "work", "--uuid", U1).code == 0
    assert box.cli("domain", "add", "personal").code == 0
    listed = box.cli("domain", "list", "--json").json()
    assert [d["name"] for d in listed["domains"]] == ["personal", "work"]
    assert all({"name", "key_id", "generation"} <= set(d) for d in listed["domains"])
    assert "key" not in json.dumps(listed).replace("key_id", "")
    key1 = box.cli("domain", "show", "work", "--uuid", U1, "--show-key", "--json").json()["key"]
    assert len(bytes.fromhex(key1)) == 64
    res = box.cli("domain", "show", "work", "--uuid", U2)  # another qube, same name
    assert res.code != 0
    assert "refused" in res.err
    # Next boot: the same keys come back.
    chain.lock(box.container)
    box.boot()
    assert box.unlock().code == 0
    key2 = box.cli("domain", "show", "work", "--uuid", U1, "--show-key", "--json").json()["key"]
    assert key1 == key2
    assert box.cli("domain", "remove", "personal").code == 0
    assert [d["name"] for d in box.cli("domain", "list", "--json").json()["domains"]] == ["work"]


def test_second_unlock_in_one_boot_meets_the_cap(box: Box) -> None:
    box.boot()
    assert box.unlock().code == 0
    chain.lock(box.container)
    res = box.unlock()
    assert res.code == 3
    assert "PCR 13" in res.err


def test_wrong_passphrase_counts_and_locks_out(box: Box) -> None:
    configure_da(box.swtpm.tcti, max_tries=2, recovery_time=1000, lockout_recovery=1000)
    box.boot()
    wrong = box.dir / "wrong"
    wrong.write_text("incorrect horse\n")
    for tries in (1, 2):
        res = box.unlock(pw=wrong)
        assert res.code == 4, res.err
        assert "passphrase" in res.err or "authorization" in res.err
        with Tpm(box.swtpm.tcti) as tpm:
            assert tpm.da_status()["failed_tries"] == tries
    res = box.unlock()
    assert res.code == 5, res.err
    assert "lockout" in res.err


def test_tampered_launch_refused_with_the_right_passphrase(box: Box) -> None:
    box.boot(xen_version="evil")
    res = box.unlock()
    assert res.code == 3
    assert "PCR 17" in res.err
    with Tpm(box.swtpm.tcti) as tpm:
        assert tpm.da_status()["failed_tries"] == 0


def test_no_measured_launch_refused(box: Box) -> None:
    box.swtpm.reboot()
    res = box.unlock()
    assert res.code == 3
    assert "no TXT measured launch" in res.err


def test_recovery_when_the_tpm_refuses_then_reseal(box: Box) -> None:
    box.boot(kernel_version="6.12-unpredicted")
    assert box.unlock().code == 3
    # Stock cryptsetup accepts the recovery key as a plain passphrase.
    proc = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file=-", str(box.container)],
        input=box.rk.read_bytes().strip(),
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr
    res = box.cli("recover", "--recovery-key-file", str(box.rk), "--reseal", *CHEAP_KDF,
                  pw=box.pw)  # fmt: skip
    assert res.code == 0, res.err
    assert "resealed" in res.out
    chain.lock(box.container)
    box.boot(kernel_version="6.12-unpredicted")
    assert box.unlock().code == 0
    # The recovery key still works after the reseal.
    assert box.cli("recover", "--recovery-key-file", str(box.rk), "--keyring", "none").code == 0


def test_header_rollback_is_refused(box: Box) -> None:
    """Old keyslots under the current token change PCR 13: the TPM refuses.

    The attacker restores an old copy of the header (its keyslots: an old, leaked passphrase)
    and puts the current qubes-seal token back into it, so that the current sealed object is
    used.  (Restoring the old token too, a complete rollback, is stopped by the TPM NV counter,
    not by PCR 13: tests/test_rollback.py, docs/PCR13.md.)
    """
    c = Container(box.container)
    size = c.data_offset
    old_header = box.container.read_bytes()[:size]
    # Rotate the passphrase keyslot through a recovery + reseal: new keyslot, old one killed.
    res = box.cli("recover", "--recovery-key-file", str(box.rk), "--reseal", "--keyring",
                  "none", *CHEAP_KDF, pw=box.pw)  # fmt: skip
    assert res.code == 0, res.err
    (token_id,) = c.find_tokens("qubes-seal")
    current_token = c.export_token(token_id)
    box.boot()
    assert box.unlock().code == 0
    chain.lock(box.container)
    # The attacker writes the old header back, with the current token in it.
    with open(box.container, "r+b") as f:
        f.write(old_header)
    current_token["keyslots"] = ["0"]  # cryptsetup wants the token's keyslots to exist
    Container(box.container).import_token(current_token, token_id=token_id, replace=True)
    box.boot()
    res = box.unlock()
    assert res.code == 3, res.err
    assert "PCR 13" in res.err


def test_corrupted_token_exits_7_and_recovery_still_works(box: Box) -> None:
    c = Container(box.container)
    (token_id,) = c.find_tokens("qubes-seal")
    doc = c.export_token(token_id)
    doc["sealed"]["object"]["private"] = "AAAA"
    c.import_token(doc, token_id=token_id, replace=True)
    box.boot()
    res = box.unlock()
    assert res.code == 7, res.err
    assert box.cli("recover", "--recovery-key-file", str(box.rk), "--keyring", "none").code == 0


def test_corrupted_header_exits_7(box: Box) -> None:
    with open(box.container, "r+b") as f:
        f.seek(4096 + 10)  # inside the primary header's JSON area
        byte = f.read(1)
        f.seek(4096 + 10)
        f.write(bytes([byte[0] ^ 0x20]))
    box.boot()
    res = box.unlock()
    assert res.code == 7, res.err
    # libcryptsetup still has the secondary header copy: the recovery key opens it.
    proc = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file=-", str(box.container)],
        input=box.rk.read_bytes().strip(),
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr


def test_corrupted_keystore_exits_7(box: Box) -> None:
    c = Container(box.container)
    with open(box.container, "r+b") as f:  # both keystore slots
        for slot in (0, c.data_size // 2):
            f.seek(c.data_offset + slot)
            f.write(os.urandom(512))
    box.boot()
    res = box.unlock()
    assert res.code == 7, res.err
    assert "keystore" in res.err


def test_no_secret_in_argv_environ_or_files(box: Box) -> None:
    """Watch /proc while the CLI and its cryptsetup children run."""
    secrets = [PASSPHRASE.encode(), box.rk.read_bytes().strip()]
    seen: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        me = os.getpid()
        while not stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or int(pid) == me:
                    continue
                for name in ("cmdline", "environ"):
                    try:
                        data = Path(f"/proc/{pid}/{name}").read_bytes()
                    except OSError:
                        continue
                    for s in secrets:
                        if s in data or s.hex().encode() in data:
                            seen.append(f"{pid}/{name}")

    t = threading.Thread(target=watch)
    t.start()
    try:
        box.boot()
        assert box.unlock().code == 0
        assert box.cli("domain", "add", "work").code == 0
        res = box.cli("recover", "--recovery-key-file", str(box.rk), "--reseal", "--keyring",
                      "none", *CHEAP_KDF, pw=box.pw)  # fmt: skip
        assert res.code == 0, res.err
    finally:
        stop.set()
        t.join()
    assert seen == []
    for path in (box.dir / "state").rglob("*") if (box.dir / "state").exists() else []:
        for s in secrets:
            assert s not in path.read_bytes()
    header = box.container.read_bytes()[: Container(box.container).data_offset]
    for s in secrets:
        assert s not in header


def test_update_predicted_while_running_unlocks_next_boot(box: Box) -> None:
    """After the cap, this boot can still approve the next one, from its hand-over alone."""
    from test_predict import write_components

    assert box.cli("attest", "setup", "--text", "heron").code == 0
    log = box.dir / "txt.log"
    box.swtpm.reboot()
    txt_launch(box.swtpm, sample_modules(), log_path=log)
    assert box.unlock().code == 0  # PCR 13 is capped from here on
    new = sample_modules(xen_version="4.19.1", kernel_version="6.12.9")
    res = box.cli("reseal", "--predict", "--txt-log", str(log),
                  *write_components(new, box.dir / "new"))  # fmt: skip
    assert res.code == 0, res.err
    token = chain.read_token(Container(box.container))[1]
    assert [s.label for s in token.sealed.pcr_states] == ["current", "predicted"]
    chain.lock(box.container)
    # The update is installed and the machine reboots on it: no reseal in between.
    box.swtpm.reboot()
    txt_launch(box.swtpm, new, log_path=log)
    assert box.cli("attest", "show").out.strip().endswith("heron")
    assert box.unlock().code == 0
    # First good boot on the new components: accept it alone from now on.
    assert box.cli("reseal").code == 0
    token = chain.read_token(Container(box.container))[1]
    assert [s.label for s in token.sealed.pcr_states] == ["current"]
    chain.lock(box.container)
    box.boot()  # the old components
    assert box.unlock().code == 3


def test_reseal_needs_this_boots_unlock(box: Box) -> None:
    box.boot()
    res = box.cli("reseal")
    assert res.code == 2
    assert "did not unlock" in res.err


def test_dm_crypt_backend_is_refused_clearly_without_device_mapper(box: Box) -> None:
    from qubes_seal.luks.payload import dm_crypt_available

    ok, _ = dm_crypt_available()
    if ok:
        pytest.skip("device-mapper present: the positive path runs in the VM test")
    box.boot()
    res = box.cli("unlock", "--backend", "dm-crypt", pw=box.pw)
    assert res.code != 0
    assert "dm-crypt" in res.err or "device-mapper" in res.err
    chain.lock(box.container)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    """A block device standing in for the container's partition (docs/INSTALL.md): a loop
    device over a file of 20 MiB + 4 KiB (not the default size: init must use it whole)."""
    if os.geteuid() != 0 or shutil.which("losetup") is None:
        pytest.skip("a loop device needs root and losetup (util-linux)")
    backing = tmp_path / "partition.img"
    with open(backing, "wb") as f:
        f.truncate((20 << 20) + 4096)
    made = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    if made.returncode != 0:
        pytest.skip(f"no loop device here: {made.stderr.strip()}")
    device = Path(made.stdout.strip())
    try:
        yield device
    finally:
        subprocess.run(["losetup", "--detach", str(device)], capture_output=True, timeout=30)


def test_a_container_on_a_partition_through_a_symbolic_link(
    swtpm: Swtpm, tmp_path: Path, loop_device: Path
) -> None:
    """The real machine's layout (docs/INSTALL.md, step 4): the container on a partition,
    dom0's default path a symbolic link to it.  ``init`` formats the device whole (a --size
    that does not match it is refused, nothing written); boot, unlock and the domain keys
    work through the link."""
    b = Box(swtpm, tmp_path / "machine")
    b.dir.mkdir()
    b.container.symlink_to(loop_device)
    b.pw.write_text(PASSPHRASE + "\n")
    txt_launch(swtpm, sample_modules())
    res = b.cli("init", *CHEAP_KDF, "--size", "16M", "--recovery-key-file", str(b.rk), pw=b.pw)
    assert res.code == 2 and f"is a block device of {(20 << 20) + 4096} bytes" in res.err
    with open(loop_device, "rb") as dev:
        assert dev.read(4096) == bytes(4096)  # nothing written
    assert not b.rk.exists()
    res = b.cli("init", *CHEAP_KDF, "--recovery-key-file", str(b.rk), pw=b.pw)
    assert res.code == 0, res.err
    try:
        assert b.container.is_symlink()  # still the link; the device holds the container
        with open(loop_device, "rb") as dev:
            assert dev.read(6) == b"LUKS\xba\xbe"
        b.boot()
        assert b.unlock().code == 0
        assert b.cli("domain", "add", "work", "--uuid", U1).code == 0
        b.boot()
        assert b.unlock().code == 0
        shown = b.cli("domain", "show", "work", "--uuid", U1, "--json")
        assert shown.code == 0 and shown.json()["domain"]["generation"] == 1
    finally:
        chain.lock(b.container)
