"""The state directory, the journal, key files and header copies, from a local attacker's side.

The attacker is a local user (uid 65534 here: the tests run as root and hand files to it
with ``os.chown``); root runs qubes-seal.  What the attacker tries:

* own (or write to) the state directory or a directory above it, so as to plant a journal
  that root's ``repair`` acts on, or race a symbolic link onto a file root writes there;
* plant a journal naming root's files (``/etc/passwd``-like, a real LUKS container, a
  recovery key file) so that ``repair`` deletes them;
* make ``init --recovery-key-file`` chmod a shared directory (``/tmp``, ``/etc``), or write
  the key through a planted link;
* read the old keyslots from a header copy a rotation left on disk (even unlinked).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import struct
import subprocess
from pathlib import Path

import pytest
from cli_util import run
from machine import CHEAP_KDF, PASSPHRASE, Box
from test_rotate import cli, new_pw, prepare, rotate_args

from qubes_seal import fsutil, journal
from qubes_seal.luks.header import read_header
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import sample_modules, txt_launch

NOBODY = 65534
NO_TPM = "swtpm:host=127.0.0.1,port=1"  # never reached: the state directory is refused first


def plant_journal(state: Path, op: str, container: Path, **data: object) -> None:
    doc = {
        "format": journal.FORMAT, "version": journal.VERSION, "op": op,
        "container": str(container), "started": "2026-01-01T00:00:00+00:00", "pid": 1,
        "step": "begun", "done": ["begun"], "data": data,
    }  # fmt: skip
    (state / journal.JOURNAL_NAME).write_text(json.dumps(doc))


def victim(path: Path, text: str = "root:x:0:0:root:/root:/bin/bash\n", mode: int = 0o644) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


# -- 1. the state directory ------------------------------------------------------------------


def test_a_state_dir_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    passwd = victim(tmp_path / "passwd")
    plant_journal(state, "init", passwd, existed=False, uuid=None, key_file=str(passwd))
    os.chown(state, NOBODY, NOBODY)
    for args in (["repair"], ["status", "--json"]):
        res = run(NO_TPM, state, *args)
        if args[0] == "repair":
            assert res.code == 7, res.err
            assert "owned by uid 65534" in res.err
            assert f"chown root:root {state}; chmod 0700 {state}" in res.err
    assert passwd.read_text().startswith("root:")
    with pytest.raises(fsutil.UnsafeDirectory):
        journal.read(state)
    with pytest.raises(fsutil.UnsafeDirectory):
        fsutil.atomic_write(state / "sealed.json", b"{}")
    assert not (state / "sealed.json").exists()


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o1777])
def test_a_state_dir_writable_by_others_is_refused(tmp_path: Path, mode: int) -> None:
    state = tmp_path / "state"
    state.mkdir()
    state.chmod(mode)
    res = run(NO_TPM, state, "repair")
    assert res.code == 7, res.err
    assert "writable by others" in res.err
    assert state.stat().st_mode & 0o7777 == mode  # not "fixed" behind the user's back


def test_a_directory_above_owned_or_writable_by_another_user_is_refused(tmp_path: Path) -> None:
    top = tmp_path / "top"
    (top / "state").mkdir(parents=True, mode=0o700)
    os.chown(top, NOBODY, NOBODY)  # nobody can rename 'state' away and put its own there
    with pytest.raises(fsutil.UnsafeDirectory, match="above"):
        fsutil.check_private_dir(top / "state")
    os.chown(top, 0, 0)
    top.chmod(0o777)  # writable by all, not sticky
    with pytest.raises(fsutil.UnsafeDirectory, match="writable by others"):
        fsutil.check_private_dir(top / "state")
    top.chmod(0o1777)  # sticky, like /tmp: others cannot touch root's entries
    assert fsutil.check_private_dir(top / "state") == top / "state"


def test_a_link_to_the_state_dir_is_followed_only_if_its_owner_is_trusted(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert fsutil.check_private_dir(link) == real
    os.lchown(link, NOBODY, NOBODY)
    with pytest.raises(fsutil.UnsafeDirectory, match="owned by uid 65534"):
        fsutil.check_private_dir(link)


def test_a_new_state_dir_is_created_private(tmp_path: Path) -> None:
    state = tmp_path / "a" / "b" / "state"
    assert fsutil.ensure_private_dir(state) == state
    assert state.stat().st_mode & 0o777 == 0o700
    readable = tmp_path / "readable"
    readable.mkdir(mode=0o755)
    readable.chmod(0o755)
    fsutil.ensure_private_dir(readable)  # ours, only readable by others: narrowed
    assert readable.stat().st_mode & 0o777 == 0o700


def test_atomic_write_does_not_follow_a_planted_link(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    target = victim(tmp_path / "target")
    (state / "journal.json").symlink_to(target)
    fsutil.atomic_write(state / "journal.json", b"{}")
    assert target.read_text().startswith("root:")  # the link was replaced, not written through
    assert not (state / "journal.json").is_symlink()


# -- 1. repair removes only what its journal proves it created --------------------------------


def luks_file(path: Path) -> str:
    """A small real LUKS2 container (root's, mode 0600); its UUID."""
    subprocess.run(["truncate", "-s", "20M", str(path)], check=True)
    path.chmod(0o600)
    subprocess.run(
        ["cryptsetup", "--batch-mode", "luksFormat", "--type=luks2", "--pbkdf=pbkdf2",
         "--pbkdf-force-iterations=1000", "--key-file=-", str(path)],
        input=b"a passphrase", check=True, capture_output=True,
    )  # fmt: skip
    return read_header(path).uuid


def test_a_planted_init_journal_deletes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    passwd = victim(tmp_path / "passwd")
    shadow = victim(tmp_path / "shadow", "root:$6$secret:19000::::::\n", 0o600)
    readable_key = victim(tmp_path / "readable-key", "not a key\n")  # its digest is public
    real = tmp_path / "keys.luks"
    uuid = luks_file(real)
    st = os.stat(real)
    cases = [
        # no proof at all (as an older journal, or a crash before 'formatted')
        dict(container=passwd, existed=False, uuid=None, key_file=str(shadow)),
        # the real container's UUID, but not the inode the init recorded
        dict(container=real, existed=False, uuid=uuid, dev=st.st_dev, ino=st.st_ino + 1),
        # the right inode, but another UUID
        dict(container=real, existed=False, uuid="0" * 8 + uuid[8:], dev=st.st_dev,
             ino=st.st_ino),
        # a world-readable file's true digest: its mode shows qubes-seal did not write it
        dict(container=passwd, existed=False, uuid=None, key_file=str(readable_key),
             key_file_sha256=fsutil.content_digest(readable_key.read_bytes())),
    ]  # fmt: skip
    for case in cases:
        container = case.pop("container")
        plant_journal(state, "init", Path(str(container)), **case)
        res = run(NO_TPM, state, "repair", "--json")
        assert res.code == 0, res.err
        notes = " ".join(res.json()["notes"])
        assert "removed" not in notes, notes
        assert "left" in notes
    assert passwd.read_text().startswith("root:")
    assert shadow.exists() and readable_key.exists()
    assert read_header(real).uuid == uuid


def test_a_planted_rotation_journal_on_a_non_container_deletes_nothing(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    passwd = victim(tmp_path / "passwd")
    key = victim(tmp_path / "key", "x\n", 0o600)
    plant_journal(state, "rotate-recovery", passwd, uuid="u", token_id=0, old_token={},
                  slots_before=[0], old_slot=1, key_file=str(key))  # fmt: skip
    res = run(NO_TPM, state, "repair")
    assert res.code == 7, res.err  # not a LUKS2 container: refused, nothing touched
    assert passwd.exists() and key.exists()


def test_a_planted_rotation_journal_kills_no_keyslot_of_the_real_container(box: Box) -> None:
    """The attacker knows the container's UUID and token (say, from a backup): a journal that
    calls the recovery keyslot "new" (roll back) or "old" (complete) removes nothing."""
    from qubes_seal import chain
    from qubes_seal.luks.container import Container

    state = box.dir / "state"
    container = Container(box.container)
    token_id, token = chain.read_token(container)
    common = dict(uuid=container.uuid, token_id=token_id, old_token=token.raw)
    plant_journal(state, "rotate-passphrase", box.container, **common, slots_before=[0],
                  old_slot=0, new_slot=1)  # fmt: skip
    res = cli(box, "repair", "--json")
    assert res.code == 0, res.err
    assert "left keyslot 1" in " ".join(res.json()["notes"])
    assert container.slots() == [0, 1]
    plant_journal(state, "rotate-passphrase", box.container, **common, slots_before=[0, 1],
                  old_slot=1, new_slot=0, new_slot_salt="forged")  # fmt: skip
    res = cli(box, "repair")
    assert res.code == 7, res.err  # the "new" keyslot is not the one a rotation added
    assert container.slots() == [0, 1]
    (state / journal.JOURNAL_NAME).unlink()
    # An "old token" that would point the unlock at another keyslot is not put back.
    forged = {**(token.raw or {}), "recovery_keyslot": 0, "tpm_keyslot": 1}
    plant_journal(state, "rotate-passphrase", box.container, **{**common, "old_token": forged},
                  slots_before=[0, 1], old_slot=0, new_slot=2)  # fmt: skip
    res = cli(box, "repair", "--json")
    assert res.code == 0, res.err
    assert "left the token" in " ".join(res.json()["notes"])
    assert chain.read_token(container)[1].to_json() == token.to_json()
    assert cli(box, "recover", "--recovery-key-file", str(box.rk)).code == 0


def test_remove_if_ours_checks_digest_owner_mode_links(tmp_path: Path) -> None:
    ours = tmp_path / "ours"
    proof = fsutil.write_new_file(ours, b"content\n")
    other = tmp_path / "other"
    other.symlink_to(ours)
    assert fsutil.remove_if_ours(other, sha256=proof.sha256) is not None  # a link: left
    assert fsutil.remove_if_ours(ours, sha256=None) is not None
    assert fsutil.remove_if_ours(ours, sha256=fsutil.content_digest(b"other")) is not None
    os.link(ours, tmp_path / "hard")
    assert fsutil.remove_if_ours(ours, sha256=proof.sha256) is not None  # two names: left
    (tmp_path / "hard").unlink()
    os.chown(ours, NOBODY, NOBODY)
    assert fsutil.remove_if_ours(ours, sha256=proof.sha256) is not None
    os.chown(ours, 0, 0)
    assert ours.exists()
    assert fsutil.remove_if_ours(ours, sha256=proof.sha256) is None
    assert not ours.exists()


# -- 2. key files ----------------------------------------------------------------------------


def new_box(swtpm: Swtpm, tmp_path: Path) -> Box:
    b = Box(swtpm, tmp_path)
    b.pw.write_text(PASSPHRASE + "\n")
    txt_launch(swtpm, sample_modules())
    return b


def test_init_key_file_in_a_shared_dir_leaves_the_dir_alone(swtpm: Swtpm, tmp_path: Path) -> None:
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    b = new_box(swtpm, tmp_path)
    rk = shared / "recovery-key"
    res = b.cli("init", *CHEAP_KDF, "--recovery-key-file", str(rk), pw=b.pw)
    assert res.code == 0, res.err
    assert shared.stat().st_mode & 0o7777 == 0o1777  # /tmp stays /tmp
    assert rk.stat().st_mode & 0o777 == 0o600
    assert len(rk.read_text().strip()) == 55


def test_init_key_file_through_a_planted_link_is_refused(swtpm: Swtpm, tmp_path: Path) -> None:
    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)
    b = new_box(swtpm, tmp_path)
    target = victim(tmp_path / "target")
    for planted, to in ((shared / "planted", target), (shared / "dangling", tmp_path / "new")):
        planted.symlink_to(to)
        os.lchown(planted, NOBODY, NOBODY)
        res = b.cli("init", *CHEAP_KDF, "--recovery-key-file", str(planted), pw=b.pw)
        assert res.code == 2, res.err  # refused before anything is made
        assert "symbolic link" in res.err
        assert not b.container.exists()
    assert target.read_text().startswith("root:")
    assert not (tmp_path / "new").exists()


def test_write_key_file_refuses_links_and_existing_files(tmp_path: Path) -> None:
    from qubes_seal.secret import Secret

    target = victim(tmp_path / "target")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "dangling")  # a dangling link: O_CREAT alone would follow it
    for path in (target, link):
        with pytest.raises(Exception, match="refusing to overwrite"):
            fsutil.write_key_file(path, Secret(b"k" * 55))
    assert not (tmp_path / "dangling").exists()
    assert target.read_text().startswith("root:")


# -- 3. header copies ------------------------------------------------------------------------

IN_CREATE = 0x100
IN_MOVED_TO = 0x80
IN_NONBLOCK = 0o4000


class Watch:
    """inotify: every name created in the watched directories (what an attacker polling
    them, or reading the disk later, could find)."""

    def __init__(self, *dirs: Path) -> None:
        self.libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self.libc.inotify_init1(IN_NONBLOCK)
        assert self.fd >= 0
        self.dirs = {}
        for d in dirs:
            wd = self.libc.inotify_add_watch(self.fd, str(d).encode(), IN_CREATE | IN_MOVED_TO)
            assert wd >= 0
            self.dirs[wd] = d

    def created(self) -> list[Path]:
        names: list[Path] = []
        try:
            while True:
                buf = os.read(self.fd, 65536)
                i = 0
                while i < len(buf):
                    wd, _, _, size = struct.unpack_from("iIII", buf, i)
                    name = buf[i + 16 : i + 16 + size].rstrip(b"\0").decode()
                    names.append(self.dirs[wd] / name)
                    i += 16 + size
        except BlockingIOError:
            pass
        os.close(self.fd)
        return names


def keyslot_area(path: Path, slot: int) -> bytes:
    area = read_header(path).keyslots[slot]["area"]
    with open(path, "rb") as f:
        f.seek(int(area["offset"]))
        return f.read(int(area["size"]))


def files_under(top: Path) -> list[Path]:
    return [p for p in top.rglob("*") if p.is_file() and not p.is_symlink()]


@pytest.mark.parametrize("what", ["recovery", "passphrase"])
def test_no_header_copy_ever_reaches_the_disk(box: Box, what: str) -> None:
    prepare(box)
    state = box.dir / "state"
    old_slot = 1 if what == "recovery" else 0
    old_area = keyslot_area(box.container, old_slot)
    # An attacker's links at the names older versions wrote the copies to.
    target = victim(box.dir / "target")
    for name in ("rotate-header.img", "rotate-header-final.img"):
        (state / name).symlink_to(target)
    watch = Watch(state, box.dir)
    if what == "recovery":
        res = cli(box, "rotate", "recovery", "--recovery-key-file", str(box.dir / "rk2"))
    else:
        res = cli(box, *rotate_args("passphrase", box))
    assert res.code == 0, res.err
    created = watch.created()
    unexpected = [
        p for p in created
        if not (p.name.startswith(".journal.json.") or p.name in ("journal.json", "rk2",
                                                                     "new-passphrase"))
    ]  # fmt: skip
    assert unexpected == [], unexpected  # no header copy was ever created on disk
    assert target.read_text().startswith("root:")  # the links were not written through
    assert not any((state / n).is_symlink() for n in ("rotate-header.img",))
    # The old keyslot's material (what the old key opens) is nowhere on disk any more.
    chunk = old_area[:4096]
    assert chunk.strip(b"\0")
    for path in files_under(box.dir):
        if "swtpm" in path.parts:
            continue
        assert chunk not in path.read_bytes(), f"the old keyslot survives in {path}"


def test_a_crash_with_the_copy_in_memory_leaves_no_copy(box: Box) -> None:
    prepare(box)
    res = cli(box, *rotate_args("passphrase", box), crash_at="staged")
    assert res.code == -9
    state = box.dir / "state"
    assert sorted(p.name for p in state.iterdir()) == ["journal.json"]
    res = cli(box, "repair", "--json")
    assert res.code == 0, res.err
    assert res.json()["action"] == "rolled back"
    assert new_pw(box).exists()


def test_a_memory_copy_is_zeroed_before_it_is_released() -> None:
    data = os.urandom(3 << 20)
    copy = fsutil.MemoryFile("test", data)
    assert copy.path.read_bytes() == data  # what cryptsetup reads through /proc/PID/fd/N
    spy = os.dup(copy.fd)  # as if someone kept it open
    copy.close()
    try:
        left = os.pread(spy, len(data), 0)
    finally:
        os.close(spy)
    assert len(left) == len(data) and not left.strip(b"\0")
