"""The ``qubes_seal`` storage pool driver (issue 14), driven by qubesd's own storage code.

qubes-core-admin 4.3.50 (../shared/vendor, with its test-packages stubs for libvirt, dbus and
qubesdb) builds the pools from the ``qubes.storage`` entry points, exactly as qubesd does: a
real inner ``file-reflink`` pool (``setup_check=False``) on this test's directory, our pool
over it, a TemplateVM and an AppVM made with ``app.add_new_vm``, and their volumes driven
through ``qubes.storage.Storage`` (create, verify, stop, remove in qubesd's order).  The keys
come from the real key daemon (``qubes-seal serve``, as tests/test_service.py runs it) over a
container unlocked on a swtpm; cryptsetup is the real one, on the inner volumes' files.

This host has no device-mapper: ``cryptsetup open`` cannot map, so the keyslot is proven
with ``cryptsetup open --test-passphrase`` (works on files) and the mapping part of start is
skipped here with its reason (tests/vm proves it).
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from luks_util import rewrite_metadata
from machine import Box
from test_service import Daemon

from qubes_seal.secret import Secret
from qubes_seal.service import client
from qubes_seal.sim import qubesd

ROOT = qubesd.ROOT
if qubesd.missing():
    pytest.skip(qubesd.missing(), allow_module_level=True)
qubesd.add_vendor_path()

import qubes  # noqa: E402
import qubes.config  # noqa: E402
import qubes.exc  # noqa: E402
import qubes.storage  # noqa: E402

from qubes_seal.qubes_pool import EncryptedPool, PoolError  # noqa: E402
from qubes_seal.qubes_pool import pool as pool_mod  # noqa: E402

POOL_CONFIG = """\
[storage-domains]
sys-storage = ["personal"]

[dom0-storage]
domains = ["tpl", "work", "other", "clone", "plain", "back", "vault-test", "vault-test-clone"]

[service]
request-timeout = 1.0
"""


def ours_from_pyproject() -> str:
    """Our ``qubes.storage`` entry point, as pyproject.toml declares it."""
    points = qubesd.ours_from_pyproject()
    assert points == {"qubes_seal": "qubes_seal.qubes_pool:EncryptedPool"}
    return "".join(f"{k} = {v}\n" for k, v in points.items())


@pytest.fixture
def entry_points(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """qubesd's entry points (ours from pyproject.toml or our installed metadata) and its
    state directories in this test's directory (tests/ and the VM check share the code)."""
    ours_from_pyproject()
    qubesd.setup(tmp_path, set_attr=monkeypatch.setattr,
                 prepend_path=monkeypatch.syspath_prepend)  # fmt: skip


@pytest.fixture
def keyd(box: Box, tmp_path: Path) -> Iterator[Daemon]:
    """The key daemon serving dom0's pool for tpl, work and other; unlocked."""
    (tmp_path / "keyd").mkdir()
    d = Daemon(tmp_path / "keyd", box.container, config=POOL_CONFIG)
    box.boot()
    d.start()
    assert box.unlock().code == 0
    yield d
    d.stop()


new_app = qubesd.new_app
add_pools = qubesd.add_pools


def run(coro: Any) -> Any:
    try:
        return asyncio.run(coro)
    except BaseException:
        import traceback

        traceback.print_exc()  # the whole chain, as qubesd would log it
        raise
    finally:
        # qubesd's Storage gathers volume coroutines whose failures are logged when their
        # tasks are collected ("Task exception was never retrieved"): collect them now, not
        # inside a later compile() (CPython 3.11 then raises "AST constructor recursion
        # depth mismatch" in pytest's assertion rewriting)
        gc.collect()


def cryptsetup(*args: str, key: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["cryptsetup", *args], input=key, capture_output=True, timeout=60)


def opens(path: str, key: bytes) -> bool:
    """Whether ``key`` opens a keyslot of the LUKS volume at ``path`` (no device-mapper)."""
    res = cryptsetup("open", "--test-passphrase", "--key-file=-", "--keyfile-size=64", path,
                     key=key)  # fmt: skip
    assert res.returncode in (0, 2), res.stderr
    return res.returncode == 0


def key_of(d: Daemon, vm: Any) -> bytes:
    secret = client.get_key(d.socket, vm.name, caller="dom0", qube_uuid=str(vm.uuid))
    try:
        return secret.reveal()
    finally:
        secret.wipe()


def inner_file(vol: Any) -> str:
    """The inner volume's committed image (file-reflink: VID.img)."""
    return str(vol.inner._path_clean)


def can_map(tmp_path: Path) -> str:
    """Empty when ``cryptsetup open`` can map here, else why not (the capability probe: a
    real open of a throw-away LUKS2 file, closed at once)."""
    img = tmp_path / "probe.img"
    with open(img, "wb") as f:
        f.truncate(32 << 20)
    key = os.urandom(64)
    made = cryptsetup("luksFormat", "--batch-mode", "--type", "luks2", *pool_mod.PBKDF,
                      "--key-file=-", "--keyfile-size=64", str(img), key=key)  # fmt: skip
    assert made.returncode == 0, made.stderr
    name = f"qubes-seal-probe-{os.getpid()}"
    res = cryptsetup("open", "--key-file=-", "--keyfile-size=64", str(img), name, key=key)
    if res.returncode == 0:
        cryptsetup("close", name)
        return ""
    first = res.stderr.decode(errors="replace").strip().splitlines()[:1]
    return f"cryptsetup open cannot map here: {first[0] if first else res.returncode}"


def test_config_carries_every_constructor_argument() -> None:
    import inspect

    pool = EncryptedPool(name="vault", inner_pool="varlibqubes")
    params = set(inspect.signature(EncryptedPool.__init__).parameters) - {"self"}
    assert set(pool.config) == params | {"driver"}
    again = EncryptedPool(**{k: v for k, v in pool.config.items() if k != "driver"})
    assert again.config == pool.config
    assert all(isinstance(v, str) for v in pool.config.values())


def test_bad_options_are_clear_pool_errors(tmp_path: Path, entry_points: None) -> None:
    for options in (
        {},  # no inner pool
        {"inner_pool": "has space"},
        {"inner_pool": "vault"},  # itself
        {"inner_pool": "inner", "revisions_to_keep": "many"},
        {"inner_pool": "inner", "ephemeral_volatile": "perhaps"},
        {"inner_pool": "inner", "key_socket": "relative/keyd.sock"},
    ):
        with pytest.raises(qubes.exc.StoragePoolException) as info:
            EncryptedPool(name="vault", **options)
        assert "pool" in str(info.value), options
    with pytest.raises(PoolError, match="must be a non-empty string"):
        EncryptedPool(name="vault", inner_pool=5)  # an option of the wrong type

    # an unknown inner pool: a clear StoragePoolException when qubesd builds a qube's volumes
    app = new_app(tmp_path)

    async def go() -> None:
        await app.add_pool("vault", driver="qubes_seal", inner_pool="nosuchpool")
        app.default_pool = "vault"
        with pytest.raises(qubes.exc.StoragePoolException, match="unknown inner pool"):
            app.add_new_vm("TemplateVM", name="tpl", label="red", kernel=None)

    run(go())


def test_create_verify_stop_remove_through_qubesd(
    tmp_path: Path, entry_points: None, keyd: Daemon
) -> None:
    app = new_app(tmp_path)

    async def go() -> None:
        await add_pools(app, tmp_path, keyd.socket)
        tpl = app.add_new_vm("TemplateVM", name="tpl", label="red", kernel=None)
        work = app.add_new_vm("AppVM", name="work", label="red", template=tpl, kernel=None)
        for vm in (tpl, work):
            vm.volumes["private"].inner.pool  # noqa: B018 (built through our pool)
            assert isinstance(vm.volumes["private"].pool, EncryptedPool)
        # create, as qubesd does it (vm.create_on_disk: the qube's directory, Storage.create)
        for vm in (tpl, work):
            os.makedirs(vm.dir_path)
        await tpl.storage.create()
        await work.storage.create()

        tpl_key, work_key = key_of(keyd, tpl), key_of(keyd, work)
        assert tpl_key != work_key
        for vm, key in ((tpl, tpl_key), (work, work_key)):
            shown = keyd.request({"op": "show", "name": vm.name, "qube_uuid": str(vm.uuid)})
            assert shown["ok"] is True, shown  # made in the keystore, bound to the qube's UUID
            for name in ("private", "root") if vm is tpl else ("private",):
                path = inner_file(vm.volumes[name])
                assert opens(path, key), (vm.name, name)
                assert not opens(path, Secret.random(64).reveal())
                dump = cryptsetup("luksDump", path).stdout.decode()
                assert "aes-xts-plain64" in dump and "pbkdf2" in dump and "4096" in dump
                assert f"qubes-seal:{vm.name}" in dump
                size = vm.volumes[name].size
                assert os.path.getsize(path) == size + pool_mod.HEADER_BYTES
                assert not opens(path, tpl_key if key == work_key else work_key)
        # work's root is a snapshot of tpl's: its own inner volume, opened with tpl's key
        root = work.volumes["root"]
        assert root.snap_on_start and root.key_name == "tpl"
        assert work.volumes["volatile"].ephemeral is True  # Qubes' own ephemeral key

        # what the driver adds to a start on this host, per volume: the key request plus
        # the keyslot unlock (the dm-crypt mapping itself is timed in the VM)
        times = []
        for _ in range(10):
            t0 = time.perf_counter()
            k = key_of(keyd, tpl)
            assert opens(inner_file(tpl.volumes["private"]), k)
            times.append((time.perf_counter() - t0) * 1000)
        print(
            f"key request + keyslot unlock: median {sorted(times)[5]:.1f} ms, "
            f"max {max(times):.1f} ms per volume (10 runs)"
        )

        # verify (domain-pre-start), then the mapping-free part of start
        await tpl.storage.verify()
        await work.storage.verify()
        vol = tpl.volumes["private"]
        await vol.inner.start()
        await vol._check_ours(vol.inner.block_device().path)  # our header: accepted
        await vol.inner.stop()
        assert tpl.volumes["private"].block_device().path == "/dev/mapper/vm-seal-tpl@private"

        # work's root: the inner pool's snapshot of tpl's ciphertext, opened by tpl's key
        await root.inner.start()
        snap = root.inner.block_device().path
        await root._check_ours(snap)
        assert opens(snap, tpl_key) and not opens(snap, work_key)
        await root.inner.stop()

        # resize (stopped): the inner volume grows by as much; the LUKS2 segment follows
        private = tpl.volumes["private"]
        await tpl.storage.resize("private", private.size + (8 << 20))
        assert os.path.getsize(inner_file(private)) == private.size + pool_mod.HEADER_BYTES
        assert opens(inner_file(private), tpl_key)
        with pytest.raises(qubes.exc.QubesException):
            await tpl.storage.resize("private", private.size - (8 << 20))

        # revert: the inner pool's revisions are ciphertext under the same key (the one
        # kept here is the commit of the mapping-free start/stop above)
        assert len(private.revisions) == 1
        assert on_current(keyd, tpl) == {"private": True, "root": True}
        await private.revert()
        assert opens(inner_file(private), tpl_key)
        await private._check_ours(inner_file(private))
        # an older revision may hold another keyslot: its record says "unknown" (a commit
        # would be refused) until the volume's next start records it again
        shown = keyd.request({"op": "show", "name": "tpl", "qube_uuid": str(tpl.uuid)})
        assert [(v["volume"], v["key_id"]) for v in shown["domain"]["volumes"]] == [
            ("private", "unknown"), ("root", shown["domain"]["key_id"])]  # fmt: skip
        await private.inner.start()  # the mapping-free start: what the driver records
        key, key_id, rekeyed = await private._opening(private.inner.block_device().path)
        key.wipe()
        await private._note(private._luks_uuid, key_id)
        await private.inner.stop()
        assert not rekeyed and on_current(keyd, tpl) == {"private": True, "root": True}

        # stop: idempotent, and it needs no key (qubesd stops every halted qube at its start)
        await work.storage.stop()
        await work.storage.stop()
        keyd.stop()
        await tpl.storage.stop()
        with pytest.raises(qubes.exc.StoragePoolException, match="does not answer"):
            await tpl.storage.verify()
        keyd.start()  # the hand-over stayed: a restarted daemon serves at once
        await tpl.storage.verify()

        # remove (qvm-remove: stop, then remove): inner gone, key destroyed
        work_private = inner_file(work.volumes["private"])
        copy = tmp_path / "stolen-copy.img"
        shutil.copy(work_private, copy)
        await work.storage.remove()
        assert not os.path.exists(work_private)
        gone = keyd.request({"op": "show", "name": "work"})
        assert gone["error"] == "no-key"  # crypto-erased: the copy opens with nothing we keep
        assert opens(str(copy), work_key)  # (the old key, known only to this test, did)
        assert keyd.request({"op": "show", "name": "tpl", "qube_uuid": str(tpl.uuid)})["ok"]

        # a template: its two origin volumes go concurrently, the last one destroys the key
        other = app.add_new_vm("TemplateVM", name="other", label="red", kernel=None)
        os.makedirs(other.dir_path)
        await other.storage.create()
        key_other = key_of(keyd, other)
        await other.storage.remove()
        assert keyd.request({"op": "show", "name": "other"})["error"] == "no-key"
        for name in ("private", "root"):
            assert not os.path.exists(inner_file(other.volumes[name]))
        assert key_other != tpl_key

        # the container locked: verify says what to do, stop still works
        assert keyd.request({"op": "lock"})["ok"] is True
        with pytest.raises(qubes.exc.StoragePoolException) as info:
            await tpl.storage.verify()
        assert "unlock the container, then start the qube again" in str(info.value)
        await tpl.storage.stop()
        # removing it now could not destroy its key: refused before anything is removed
        with pytest.raises(qubes.exc.StoragePoolException, match="not removed"):
            await tpl.storage.remove()  # (qubesd's Storage.remove raises it to qvm-remove)
        for name in ("private", "root"):
            assert os.path.exists(inner_file(tpl.volumes[name]))

    run(go())


def test_refusals(tmp_path: Path, entry_points: None, keyd: Daemon) -> None:
    app = new_app(tmp_path)

    async def go() -> None:
        await add_pools(app, tmp_path, keyd.socket)
        tpl = app.add_new_vm("TemplateVM", name="tpl", label="red", kernel=None)
        # a qube the configuration does not give to dom0's storage: create refused, clearly
        stranger = app.add_new_vm("TemplateVM", name="stranger", label="red", kernel=None)
        with pytest.raises(qubes.exc.StoragePoolException, match=r"dom0-storage"):
            await stranger.storage.create()
        os.makedirs(tpl.dir_path)
        await tpl.storage.create()
        vol = tpl.volumes["private"]

        # a qube name the keystore refuses
        vol.key_name = "x" * 40
        with pytest.raises(qubes.exc.StoragePoolException, match="keystore refuses the name"):
            await vol.verify()
        vol.key_name = "tpl"

        # a LUKS header that is not ours (an evil maid rewrites it, checksums and all): a
        # cipher_null segment (the qube's writes in the clear) while the keyslot still opens
        # with the qube's real key; a cipher_null keyslot (opens with any key)
        path = inner_file(vol)
        key = key_of(keyd, tpl)
        original = Path(path).read_bytes()[: pool_mod.HEADER_BYTES]

        def null_segment(meta: dict[str, Any]) -> dict[str, Any]:
            meta["segments"]["0"]["encryption"] = "cipher_null-ecb"
            return meta

        def null_keyslot(meta: dict[str, Any]) -> dict[str, Any]:
            meta["keyslots"]["0"]["area"]["encryption"] = "cipher_null-ecb"
            return meta

        for edit in (null_segment, null_keyslot):
            with open(path, "r+b") as f:
                f.write(original)
            rewrite_metadata(Path(path), edit)
            if edit is null_segment:
                assert opens(path, key)  # the real key's keyslot still opens: refused anyway
            with pytest.raises(qubes.exc.StoragePoolException, match="not one qubes-seal writes"):
                await vol.start()
            await vol.stop()
            assert not os.path.exists(vol.mapping_path)
        # another cipher, and no LUKS at all (a plaintext volume is never used in the clear)
        for args in (("--cipher", "aes-cbc-essiv:sha256", "--key-size", "256"), None):
            with open(path, "r+b") as f:
                f.write(bytes(1 << 20))
            if args is not None:
                res = cryptsetup("luksFormat", "--batch-mode", "--type", "luks2", *args,
                                 "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000",
                                 "--key-file=-", "--keyfile-size=64", path, key=key)  # fmt: skip
                assert res.returncode == 0, res.stderr
            with pytest.raises(qubes.exc.StoragePoolException, match="qubes-seal"):
                await vol.start()
            await vol.stop()

        # the key destroyed behind the pool's back: verify refuses, with the way forward
        assert keyd.request({"op": "remove", "name": "tpl"})["ok"] is True
        with pytest.raises(qubes.exc.StoragePoolException, match="no qubes-seal key for tpl"):
            await tpl.storage.verify()

    run(go())


def test_start_maps_the_volume(tmp_path: Path, entry_points: None, keyd: Daemon) -> None:
    reason = can_map(tmp_path)
    if reason:
        print(f"skipped: the mapping part of start ({reason}); tests/vm proves it")
        pytest.skip(reason)
    app = new_app(tmp_path)

    async def go() -> None:
        await add_pools(app, tmp_path, keyd.socket)
        tpl = app.add_new_vm("TemplateVM", name="tpl", label="red", kernel=None)
        await tpl.storage.create()
        vol = tpl.volumes["private"]
        await vol.start()
        try:
            assert os.path.exists(vol.block_device().path)
        finally:
            await vol.stop()
        assert not os.path.exists(vol.mapping_path)

    run(go())


def sha(path: str | Path, start: int = 0, size: int = 32 << 20) -> str:
    """The digest of ``size`` bytes from ``start`` (the header and the start of the data)."""
    import hashlib

    with open(path, "rb") as f:
        f.seek(start)
        return hashlib.sha256(f.read(size)).hexdigest()


def leftovers(tmp_path: Path) -> list[str]:
    """Files in the inner pool that an import or export left behind."""
    return sorted(p.name for p in (tmp_path / "inner").rglob("*") if "import" in p.name)


def test_data_paths_up_to_the_mapping(tmp_path: Path, entry_points: None, keyd: Daemon) -> None:
    """export, import_data/import_data_end and import_volume (qvm-clone, -P) in qubesd's
    order, over a real inner pool: everything up to ``cryptsetup open`` happens here (the
    header, the keys, the inner pool's calls); the mapping itself is the VM's (pool_check)."""
    app = new_app(tmp_path)
    no_dm = bool(can_map(tmp_path))

    async def go() -> None:
        await add_pools(app, tmp_path, keyd.socket)
        tpl = app.add_new_vm("TemplateVM", name="tpl", label="red", kernel=None)
        os.makedirs(tpl.dir_path)
        await tpl.storage.create()
        private = tpl.volumes["private"]
        tpl_key = key_of(keyd, tpl)
        clean = inner_file(private)

        # export (qvm-backup: Storage.export, then export_end) of a volume never written
        # since create: zeros, as a plain pool gives, from a sparse file removed at the end
        path = await tpl.storage.export("private")
        assert not path.startswith("/dev/mapper/")
        assert os.path.getsize(path) == private.size and os.stat(path).st_blocks == 0
        await tpl.storage.export_end("private", path)
        assert not os.path.exists(path) and not private._exports
        with pytest.raises(qubes.exc.StoragePoolException, match="not an export"):
            await private.export_end(path)
        with pytest.raises(NotImplementedError):  # a snapshot holds nothing of its own
            await tpl.volumes["volatile"].export()

        # once started, the volume's plaintext is only reachable through a mapping: export
        # asks for one (here: refused with cryptsetup's reason, nothing left behind)
        before = sha(clean)
        assert (await pool_mod.cryptsetup("config", "--subsystem", "", "--", clean))[0] == 0
        if no_dm:
            with pytest.raises(qubes.exc.StoragePoolException, match="cryptsetup open failed"):
                await tpl.storage.export("private")
            assert not private._exports

        # import_data (restore, qvm-volume import): a new LUKS2 volume with the qube's key in
        # the inner pool's import file, then the mapping; without one, import_data_end's
        # discard leaves the committed image as it was
        before = sha(clean)
        if no_dm:
            seen: list[str] = []
            real = private.inner.import_data_end

            async def spy(success: bool) -> Any:
                seen.append(f"inner import_data_end({success})")
                return await qubes.utils.coro_maybe(real(success))

            private.inner.import_data_end = spy
            with pytest.raises(qubes.exc.StoragePoolException, match="cryptsetup open failed"):
                await tpl.storage.import_data("private", 64 << 20)
            assert seen == ["inner import_data_end(False)"]
            del private.inner.import_data_end
            # the end qubesd always calls after a failed begin: nothing to commit
            await tpl.storage.import_data_end("private", False)
            with pytest.raises(qubes.exc.StoragePoolException, match="no import"):
                await tpl.storage.import_data_end("private", True)
        assert sha(clean) == before and leftovers(tmp_path) == []
        assert opens(clean, tpl_key)
        for bad in (0, -1):
            with pytest.raises(qubes.exc.StoragePoolException, match="cannot import"):
                await private.import_data(bad)
        with pytest.raises(NotImplementedError):
            await tpl.volumes["volatile"].import_data(1 << 20)

        # qvm-clone into the pool (admin.vm.volume.CloneTo -> Storage.import_volume): the
        # clone is created first with its own key, then the data copied through mappings
        clone = app.add_new_vm("TemplateVM", name="clone", label="red", kernel=None)
        os.makedirs(clone.dir_path)
        await clone.storage.create()
        clone_key = key_of(keyd, clone)
        assert clone_key != tpl_key
        dst = clone.volumes["private"]
        dst_clean = inner_file(dst)
        if no_dm:
            with pytest.raises(qubes.exc.StoragePoolException, match="cryptsetup open failed"):
                await clone.storage.import_volume(dst, private)
        # the clone's volume opens with its own key only, never the source's
        assert opens(dst_clean, clone_key) and not opens(dst_clean, tpl_key)
        assert leftovers(tmp_path) == [] and not private._exports
        # a volatile or snapshot volume holds nothing to copy: the same volume back
        vol = clone.volumes["volatile"]
        assert await vol.import_volume(tpl.volumes["volatile"]) is vol

        # qvm-clone -P vault of a qube of a plain pool: its plaintext never lands in the
        # clear in the encrypted pool (the copy goes through the mapping only)
        plain = app.add_new_vm("TemplateVM", name="plain", label="red", kernel=None,
                               volume_config={"private": {"pool": "inner"}})  # fmt: skip
        os.makedirs(plain.dir_path)
        await plain.storage.create()
        secret = b"PLAINTEXT-OF-A-QUBE-" * 64
        with open(plain.volumes["private"]._path_clean, "r+b") as f:
            f.write(secret)
        moved = app.add_new_vm("TemplateVM", name="back", label="red", kernel=None)
        os.makedirs(moved.dir_path)
        await moved.storage.create()
        if no_dm:
            with pytest.raises(qubes.exc.StoragePoolException, match="cryptsetup open failed"):
                await moved.storage.import_volume(moved.volumes["private"],
                                                  plain.volumes["private"])  # fmt: skip
        for f in (tmp_path / "inner").rglob("*"):
            if f.is_file() and "plain" not in f.parts:
                with open(f, "rb") as img:
                    assert secret[:40] not in img.read(64 << 20), f

    run(go())


def rekey_cmd(
    d: Daemon, vm: Any, *volumes: str, crash_at: str = ""
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *sys.path])
    if crash_at:
        env["QUBES_SEAL_CRASH_AT"] = crash_at
    args = [a for v in volumes for a in ("--volume", v)]
    return subprocess.run(
        [sys.executable, "-m", "qubes_seal.qubes_pool", "rekey", vm.name, "--uuid",
         str(vm.uuid), "--socket", str(d.socket), *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_domain_rotation_rekeys_pool_volumes(
    tmp_path: Path, entry_points: None, keyd: Daemon, box: Box
) -> None:
    """``qubes-seal domain rotate`` on a pool qube: each origin volume gets a keyslot for the
    new key and loses the old one (at the qube's next start, or with ``python -m
    qubes_seal.qubes_pool rekey`` for a halted qube); the data area is never touched; a
    re-key killed between the add and the kill leaves a volume that opens with either key,
    and running it again completes it; ``--commit`` is refused while a volume is recorded
    on the previous key (it would be lost), and after it the old key opens nothing."""
    app = new_app(tmp_path)

    async def go() -> None:
        await add_pools(app, tmp_path, keyd.socket)
        tpl = app.add_new_vm("TemplateVM", name="tpl", label="red", kernel=None)
        os.makedirs(tpl.dir_path)
        await tpl.storage.create()
        old_key = key_of(keyd, tpl)
        private, root = inner_file(tpl.volumes["private"]), inner_file(tpl.volumes["root"])
        data = {p: sha(p, pool_mod.HEADER_BYTES) for p in (private, root)}
        # create recorded which key each origin volume opens with (the keystore's record)
        assert on_current(keyd, tpl) == {"private": True, "root": True}

        # no rotation pending: nothing to do
        res = rekey_cmd(keyd, tpl, private)
        assert res.returncode == 0 and "nothing to do" in res.stdout, res.stdout + res.stderr

        work = app.add_new_vm("AppVM", name="work", label="red", template=tpl, kernel=None)
        os.makedirs(work.dir_path)
        await work.storage.create()

        keyd.stop()  # 'domain rotate' goes through the keystore itself
        assert box.cli("domain", "rotate", "tpl", "--uuid", str(tpl.uuid)).code == 0
        keyd.start()
        new_key = key_of(keyd, tpl)
        assert new_key != old_key
        await tpl.storage.verify()  # still starts: the previous key is served meanwhile
        assert on_current(keyd, tpl) == {"private": False, "root": False}

        # a commit now would destroy the only key that opens both volumes: refused, and
        # nothing changed (the previous key is still kept and served)
        keyd.stop()
        res = box.cli("domain", "rotate", "tpl", "--uuid", str(tpl.uuid), "--commit")
        assert res.code == 2, res.out + res.err
        assert (
            "not every pool volume was re-keyed: private (still on the previous key), "
            "root (still on the previous key)" in res.err
        )
        assert "qubes_seal.qubes_pool rekey tpl" in res.err and "--force" in res.err
        res = box.cli("domain", "rotate", "tpl", "--uuid", str(tpl.uuid), "--force")
        assert res.code == 2 and "--force goes with --commit only" in res.err
        res = box.cli("domain", "show", "tpl", "--uuid", str(tpl.uuid))
        assert res.code == 0 and "pool volume root (LUKS2 " in res.out
        assert "not re-keyed yet" in res.out and "rotation pending: previous key" in res.out
        keyd.start()
        assert key_of(keyd, tpl) == new_key

        # an AppVM's root (a snapshot of the template's, not re-keyed yet) opens with the
        # template's previous key meanwhile; the copy is thrown away at stop, never re-keyed
        snap = work.volumes["root"]
        await snap.inner.start()
        copy = snap.inner.block_device().path
        chosen = await snap._opening_key(copy)
        assert chosen.reveal() == old_key and opens(copy, old_key) and not opens(copy, new_key)
        chosen.wipe()
        await snap.inner.stop()

        # a halted qube's volume, the re-key killed between luksAddKey and luksKillSlot
        res = rekey_cmd(keyd, tpl, private, crash_at="pool-rekey-added")
        assert res.returncode == -9, res.stdout + res.stderr
        assert opens(private, old_key) and opens(private, new_key)
        res = rekey_cmd(keyd, tpl, private)  # run again: completes
        assert res.returncode == 0, res.stdout + res.stderr
        assert "re-keyed" in res.stdout and "--commit" in res.stdout
        assert "recorded as tpl's volume private, on the current key" in res.stdout
        assert opens(private, new_key) and not opens(private, old_key)
        res = rekey_cmd(keyd, tpl, private)
        assert res.returncode == 0 and "nothing to do" in res.stdout
        assert on_current(keyd, tpl) == {"private": True, "root": False}
        keyd.stop()
        res = box.cli("domain", "rotate", "tpl", "--uuid", str(tpl.uuid), "--commit")
        assert res.code == 2 and "re-keyed: root (still on the previous key);" in res.err
        keyd.start()

        # the other volume at the qube's next start: the driver re-keys before it opens
        vol = tpl.volumes["root"]
        if can_map(tmp_path):
            with pytest.raises(qubes.exc.StoragePoolException, match="cryptsetup open"):
                await vol.start()  # re-keyed, then the mapping refused here (no dm)
            await vol.stop()  # qubesd stops what failed to start: the inner pool commits
        else:
            await vol.start()
            await vol.stop()
        assert opens(root, new_key) and not opens(root, old_key)
        assert on_current(keyd, tpl) == {"private": True, "root": True}  # noted at stop
        await vol._check_ours(root)  # two keyslots on the way, one at the end: still ours
        for p in (private, root):  # keyslots only: no byte of the data area changed
            assert sha(p, pool_mod.HEADER_BYTES) == data[p]

        keyd.stop()
        assert box.cli("domain", "rotate", "tpl", "--uuid", str(tpl.uuid), "--commit").code == 0
        keyd.start()
        await tpl.storage.verify()
        assert key_of(keyd, tpl) == new_key
        with pytest.raises(client.ServiceRefused):
            client.get_key_info(keyd.socket, "tpl", caller="dom0", qube_uuid=str(tpl.uuid),
                                which="previous")  # fmt: skip

    run(go())


def test_volume_records_in_the_key_service(keyd: Daemon, box: Box) -> None:
    """The ``volume`` request (root): what it records, what it refuses, and that the record
    survives a restart (it is in the container's keystore)."""
    import uuid

    added = client.call(keyd.socket, {"op": "add", "name": "work"})["added"]
    luks = str(uuid.uuid4())

    def vol(**doc: Any) -> dict[str, Any]:
        try:
            return client.call(keyd.socket, {"op": "volume", "name": "work", **doc})
        except client.ServiceRefused as exc:
            return {"ok": False, "error": exc.name, "message": exc.message}

    ok = vol(volume="private", luks_uuid=luks, key_id=added["key_id"])
    assert ok == {"ok": True, "volume": "private", "changed": True}
    assert vol(volume="private", luks_uuid=luks, key_id=added["key_id"])["changed"] is False
    assert vol(luks_uuid=luks, key_id=added["key_id"])["volume"] == "private"  # by UUID
    for bad, why in (
        ({"volume": "../x", "luks_uuid": luks, "key_id": added["key_id"]}, "volume name"),
        ({"volume": "root", "luks_uuid": "nope", "key_id": added["key_id"]}, "UUID"),
        ({"volume": "root", "luks_uuid": luks, "key_id": "k-other"}, "neither the current"),
        ({"volume": "root", "luks_uuid": luks}, "needs a key_id"),
        ({"key_id": added["key_id"]}, "a volume or a luks_uuid"),
        ({"volume": 5, "forget": True}, "volume name"),
    ):
        refused = vol(**bad)
        assert refused["error"] == "bad-request" and why in refused["message"], (bad, refused)
    keyd.stop()
    keyd.start()
    shown = client.call(keyd.socket, {"op": "show", "name": "work"})["domain"]
    assert [(v["volume"], v["luks_uuid"], v["on_current_key"]) for v in shown["volumes"]] == [
        ("private", luks, True)
    ]
    assert vol(volume="private", forget=True)["changed"] is True
    assert "volumes" not in client.call(keyd.socket, {"op": "show", "name": "work"})["domain"]
    refused = vol(volume="private", forget=True, name="nobody")
    assert refused["error"] == "no-key"


def on_current(d: Daemon, vm: Any) -> dict[str, bool]:
    """The keystore's record of ``vm``'s pool volumes: on the current key or not."""
    answer = client.call(d.socket, {"op": "show", "name": vm.name, "qube_uuid": str(vm.uuid)})
    return {v["volume"]: v["on_current_key"] for v in answer["domain"].get("volumes", [])}


def test_rekey_refusals(tmp_path: Path) -> None:
    """The re-key never kills the last keyslot, nor one it cannot prove is the previous
    key's; a volume neither key opens is refused with the reason."""
    img = tmp_path / "v.img"
    with open(img, "wb") as f:
        f.truncate(24 << 20)
    a, b, c = (Secret.random(64) for _ in range(3))
    made = cryptsetup("luksFormat", "--batch-mode", "--type", "luks2", *pool_mod.PBKDF,
                      "--key-file=-", "--keyfile-size=64", str(img), key=a.reveal())  # fmt: skip
    assert made.returncode == 0

    async def go() -> None:
        with pytest.raises(PoolError, match="neither the current nor the previous key"):
            await pool_mod.rekey_path(str(img), previous=b, current=c, where="t")
        assert await pool_mod.rekey_path(str(img), previous=a, current=b, where="t") is True
        assert opens(str(img), b.reveal()) and not opens(str(img), a.reveal())
        assert await pool_mod.rekey_path(str(img), previous=a, current=b, where="t") is False
        assert await pool_mod.slot_of(str(img), c) is None

    asyncio.run(go())


def test_vm_pool_check_dry_run(tmp_path: Path, keyd: Daemon) -> None:
    """tests/vm/dom0/pool_check.py (the VM's proof on real dm-crypt) run here up to
    ``cryptsetup open``: the script itself cannot rot, and its one line parses."""
    import json

    script = ROOT / "tests" / "vm" / "dom0" / "pool_check.py"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run(
        [sys.executable, str(script), "--config", str(keyd.config), "--workdir",
         str(tmp_path / "check"), "--socket", str(keyd.socket), "--dry-run"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("[vmcheck] pool ")]
    assert len(lines) == 1, res.stdout + res.stderr
    doc = json.loads(lines[0].removeprefix("[vmcheck] pool "))
    assert doc["ok"] is True and res.returncode == 0, doc
    for fact in ("key_in_keystore", "header_ours", "opened_by_its_key",
                 "export_new_volume_zeros", "key_destroyed"):  # fmt: skip
        assert doc[fact] is True, (fact, doc)
    assert "no qubes-seal key" in doc["start_refused_after_remove"]
    t = doc["timings"]
    print(
        f"pool_check --dry-run: key request {t['key_request_ms']} ms + keyslot unlock "
        f"{t['keyslot_unlock_ms']} ms; inner start alone {t['inner_start_ms']} ms"
    )
    assert t["key_request_ms"] > 0 and t["keyslot_unlock_ms"] > 0


def test_data_path_attacks(tmp_path: Path, entry_points: None, keyd: Daemon) -> None:
    """From the attacker's side: a header rewritten to ``cipher_null`` (the plaintext would
    be read or written in the clear) is refused by export, as by start; an inner pool that
    would import through a pipe (no place for a LUKS2 header: the data would pass in the
    clear) is refused before anything is written; a clone's header is its own (another
    volume key and keyslot), never a copy of the source's."""
    app = new_app(tmp_path)

    async def go() -> None:
        await add_pools(app, tmp_path, keyd.socket)
        tpl = app.add_new_vm("TemplateVM", name="tpl", label="red", kernel=None)
        os.makedirs(tpl.dir_path)
        await tpl.storage.create()
        private = tpl.volumes["private"]
        clean = inner_file(private)

        def null_segment(meta: dict[str, Any]) -> dict[str, Any]:
            meta["segments"]["0"]["encryption"] = "cipher_null-ecb"
            return meta

        original = Path(clean).read_bytes()[: pool_mod.HEADER_BYTES]
        rewrite_metadata(Path(clean), null_segment)
        with pytest.raises(qubes.exc.StoragePoolException, match="not one qubes-seal writes"):
            await tpl.storage.export("private")
        assert not private._exports
        with open(clean, "r+b") as f:
            f.write(original)

        # an inner pool importing through a pipe
        before = sha(clean)
        fifo = tmp_path / "import.fifo"
        os.mkfifo(fifo)
        private.inner.import_data = lambda size: str(fifo)
        with pytest.raises(qubes.exc.StoragePoolException, match="no file or block device"):
            await tpl.storage.import_data("private", 16 << 20)
        del private.inner.import_data
        assert private._importing is None and sha(clean) == before

        # a clone's header: its own volume key digest and keyslot salt
        clone = app.add_new_vm("TemplateVM", name="clone", label="red", kernel=None)
        os.makedirs(clone.dir_path)
        await clone.storage.create()
        from qubes_seal.luks.header import read_header

        src, dst = read_header(Path(clean)), read_header(Path(inner_file(clone.volumes["private"])))
        assert src.uuid != dst.uuid
        assert src.metadata["digests"] != dst.metadata["digests"]
        assert src.keyslots[0]["kdf"]["salt"] != dst.keyslots[0]["kdf"]["salt"]

    run(go())


@pytest.mark.slow
def test_pool_benchmark_runs() -> None:
    """benchmarks/pool.py (one command, its JSON): the figures docs/QUBES-POOL.md quotes."""
    import json

    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
    env["PYTHONPATH"] = str(ROOT)
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "pool.py"), "--runs", "3", "--peer-runs",
         "1", "--json"],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    doc = json.loads(res.stdout)
    assert doc["sector_size"] == 4096 and doc["cipher"] == "aes-xts-plain64"
    assert doc["added_per_volume"]["runs"] == 3
    assert "not measurable" in doc["throughput"]
