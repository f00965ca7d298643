#!/usr/bin/env python3
"""The ``qubes_seal`` pool on real dm-crypt, inside the dom0 VM (tests/vm/test_dom0.py).

    python tests/vm/dom0/pool_check.py --config /etc/qubes-seal/config.toml --workdir DIR
    python tests/vm/dom0/pool_check.py ... --dry-run    # no device-mapper: stops before
                                                        # cryptsetup open (tests/test_qubes_pool)

Run as root next to the key daemon (unlocked, ``[dom0-storage]`` naming ``vault-test`` and
``vault-test-clone``, or any two names starting with ``vault-test``).  It drives qubes-core-admin
4.3.50's own ``Storage``/``Pool`` (``qubes_seal.sim.qubesd``: the vendored stack, shared with
the host tests) over a file-reflink inner pool in DIR, and proves, each as a fact:

* create: the qube's key made in the keystore, the header ours, opened by that key only;
* start: a ``/dev/mapper`` block device, ``block_device()`` naming it, the plaintext of a new
  volume starting with zeros; bytes written through it absent from the inner volume in the
  clear; stop: the mapping gone; start again: the same plaintext;
* export (qvm-backup): the plaintext, through a read-only mapping closed by export_end;
* import_data (restore): written through a mapping, only ciphertext in the inner pool;
* clone (qvm-clone, admin.vm.volume.CloneTo): its own key, the same plaintext;
* rotation (``qubes-seal domain rotate``, the daemon stopped and started around it by
  systemctl): the driver re-keys at start, the data stays; ``--commit`` refused while the
  template's root is not re-keyed; the ``rekey`` command re-keys and records it; the old key
  opens nothing after ``--commit``;
* the keystore's record (what the commit checks): an import's and a clone's new LUKS2 UUID;
* remove: the key destroyed, a copy of the ciphertext then opens with nothing served, the
  start refused;
* timings: per volume, the driver's start (key request + ``cryptsetup open``) against the
  inner pool's start alone.

Prints exactly one line ``[vmcheck] pool {json}`` ("ok", the facts, the timings); exit 0
when ok.  ``--dry-run`` does everything up to ``cryptsetup open`` (create, key, header,
verify, key request + keyslot unlock timings, export of a new volume, remove), so the
script is exercised on any host.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from qubes_seal.luks.header import read_header  # noqa: E402
from qubes_seal.secret import Secret  # noqa: E402
from qubes_seal.service import client  # noqa: E402
from qubes_seal.service import config as config_mod  # noqa: E402
from qubes_seal.service.protocol import DEFAULT_SOCKET  # noqa: E402
from qubes_seal.sim import qubesd  # noqa: E402

MIB = 1 << 20
SIZE = 64 * MIB  # each volume's size: small, the VM is TCG
TAG = b"QUBES-SEAL-POOL-CHECK-PLAINTEXT:"
RUNS = 5


def ms(t0: float) -> float:
    return round((time.perf_counter() - t0) * 1000, 2)


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2] if xs else -1.0


def pattern(n: int) -> bytes:
    return (TAG + str(n).encode() + b"|") * (MIB // (len(TAG) + 8))


def contains(path: str, needle: bytes) -> bool:
    """Whether ``needle`` is anywhere in the file (read in overlapping 8 MiB blocks)."""
    with open(path, "rb") as f:
        tail = b""
        while True:
            block = f.read(8 * MIB)
            if not block:
                return False
            if needle in tail + block:
                return True
            tail = block[-len(needle) :]


def write_at(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_at(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def is_block(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def opens(path: str, key: Secret) -> bool:
    res = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file=-", "--keyfile-size=64", path],
        input=key.reveal(), capture_output=True, timeout=60,
    )  # fmt: skip
    return res.returncode == 0


class Check:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.socket = args.socket
        self.facts: dict[str, Any] = {"dry_run": args.dry_run}
        self.timings: dict[str, Any] = {}
        self.failed: list[str] = []

    def fact(self, name: str, value: Any, ok: bool = True) -> None:
        self.facts[name] = value
        if not ok:
            self.failed.append(name)

    def recorded(self, vm: Any, path: str) -> bool:
        """The keystore's record of ``vm``'s private volume: the header's LUKS2 UUID, on the
        current key (what ``domain rotate --commit`` checks)."""
        shown = client.request(self.socket, {"op": "show", "name": vm.name,
                                             "qube_uuid": str(vm.uuid)})  # fmt: skip
        recs = {v["volume"]: v for v in shown.get("domain", {}).get("volumes", [])}
        rec = recs.get("private", {})
        return rec.get("luks_uuid") == read_header(Path(path)).uuid and rec.get("on_current_key")

    def key(self, vm: Any) -> Secret:
        return client.get_key(self.socket, vm.name, caller="dom0", qube_uuid=str(vm.uuid))

    def qubes(self) -> tuple[str, str]:
        cfg = config_mod.load(self.args.config)
        names = sorted(d for d in cfg.dom0_domains if d.startswith("vault-test"))
        if "vault-test" in names and "vault-test-clone" in names:
            return "vault-test", "vault-test-clone"
        if len(names) < 2:
            raise SystemExit(f"{self.args.config}: [dom0-storage] domains must name two qubes "
                             f"starting with vault-test (has {names})")  # fmt: skip
        return names[0], names[1]

    async def run(self) -> None:
        work = self.args.workdir
        qubesd.setup(work)  # the vendored stack on sys.path first
        import qubes.exc

        from qubes_seal.qubes_pool import pool as pool_mod

        app = qubesd.new_app(work)
        await qubesd.add_pools(app, work, self.socket)
        origin_name, clone_name = self.qubes()
        for name in (origin_name, clone_name):  # left over from an earlier run
            with contextlib.suppress(client.ServiceRefused):
                client.call(self.socket, {"op": "remove", "name": name})
        vm = qubesd.add_template(app, origin_name, SIZE)
        t0 = time.perf_counter()
        await vm.storage.create()
        self.timings["create_ms"] = ms(t0)
        vol = vm.volumes["private"]
        clean = vol.inner._path_clean
        key = self.key(vm)
        shown = client.request(self.socket, {"op": "show", "name": vm.name,
                                             "qube_uuid": str(vm.uuid)})  # fmt: skip
        self.fact("key_in_keystore", shown.get("ok") is True, shown.get("ok") is True)
        try:
            await vol._check_ours(clean)
            self.fact("header_ours", True)
        except qubes.exc.StoragePoolException as exc:
            self.fact("header_ours", str(exc), False)
        self.fact("opened_by_its_key", opens(clean, key), opens(clean, key))
        self.fact("size", vol.size, vol.size == SIZE)
        await vm.storage.verify()

        # timings: per volume, the inner pool's start alone against the driver's
        inner, key_req, unlock = [], [], []
        for _ in range(RUNS):
            t0 = time.perf_counter()
            await vol.inner.start()
            inner.append(ms(t0))
            await vol.inner.stop()
            t0 = time.perf_counter()
            k = self.key(vm)
            key_req.append(ms(t0))
            t0 = time.perf_counter()
            opens(clean, k)
            unlock.append(ms(t0))
            k.wipe()
        self.timings.update({"inner_start_ms": median(inner), "key_request_ms": median(key_req),
                             "keyslot_unlock_ms": median(unlock), "runs": RUNS})  # fmt: skip

        if self.args.dry_run:
            path = await vm.storage.export("private")  # a new volume exports as zeros
            self.fact("export_new_volume_zeros", read_at(path, 0, MIB) == bytes(MIB))
            await vm.storage.export_end("private", path)
            self.fact("export_end_cleaned", not os.path.exists(path), not os.path.exists(path))
        else:
            await self.mapped(app, vm, vol, key, pool_mod)
        key.wipe()

        # remove: the key destroyed; a copy of the ciphertext opens with nothing served
        stolen = str(work / "stolen-copy.img")
        shutil.copy(clean, stolen)
        await vm.storage.remove()
        try:
            await vol._key()
            self.fact("start_refused_after_remove", "the key is still served", False)
        except qubes.exc.StoragePoolException as exc:
            refused = "no qubes-seal key" in str(exc)
            self.fact("start_refused_after_remove", str(exc), refused)
        gone = client.request(self.socket, {"op": "show", "name": vm.name})
        self.fact("key_destroyed", gone.get("error") == "no-key", gone.get("error") == "no-key")
        os.unlink(stolen)

    async def mapped(self, app: Any, vm: Any, vol: Any, key: Secret, pool_mod: Any) -> None:
        """The part that needs device-mapper."""
        dev = vol.block_device().path
        # start: a mapping; a new volume reads as zeros at its start
        starts = []
        t0 = time.perf_counter()
        await vol.start()
        starts.append(ms(t0))
        self.fact("mapping_is_block_device", dev, is_block(dev))
        self.fact("new_volume_starts_with_zeros",
                  read_at(dev, 0, pool_mod.ZERO_BYTES) == bytes(pool_mod.ZERO_BYTES))  # fmt: skip
        one = pattern(1)
        write_at(dev, MIB, one)
        dirty = vol.inner.path
        self.fact("plaintext_not_in_inner", not contains(dirty, TAG), not contains(dirty, TAG))
        await vol.stop()
        self.fact("stop_removes_mapping", not os.path.exists(dev), not os.path.exists(dev))
        clean = vol.inner._path_clean
        self.fact("plaintext_not_in_committed", not contains(clean, TAG),
                  not contains(clean, TAG))  # fmt: skip
        for _ in range(RUNS - 1):
            t0 = time.perf_counter()
            await vol.start()
            starts.append(ms(t0))
            same = read_at(dev, MIB, len(one)) == one
            await vol.stop()
        self.fact("same_plaintext_after_restart", same, same)
        self.timings["driver_start_ms"] = median(starts)
        self.timings["added_per_volume_ms"] = round(
            median(starts) - self.timings["inner_start_ms"], 2
        )
        t0 = time.perf_counter()
        await vol.start()
        self.timings["start_after_stop_ms"] = ms(t0)
        await vol.stop()

        # export: the plaintext through a read-only mapping
        path = await vm.storage.export("private")
        ok = path.startswith("/dev/mapper/") and read_at(path, MIB, len(one)) == one
        self.fact("export_gives_plaintext", path, ok)
        await vm.storage.export_end("private", path)
        self.fact("export_end_closes", not os.path.exists(path), not os.path.exists(path))

        # import_data (restore): written through a mapping, ciphertext only in the pool
        two = pattern(2)
        path = await vm.storage.import_data("private", SIZE)
        write_at(path, MIB, two)
        importing = vol.inner._path_import
        self.fact("import_not_in_clear", not contains(importing, TAG),
                  not contains(importing, TAG))  # fmt: skip
        await vm.storage.import_data_end("private", True)
        ok = self.recorded(vm, clean)  # a new LUKS2 volume: its UUID on record
        self.fact("import_recorded", ok, ok)
        await vol.start()
        ok = read_at(dev, MIB, len(two)) == two and not contains(vol.inner.path, TAG)
        await vol.stop()
        self.fact("import_then_start_same_plaintext", ok, ok)

        # clone: its own key, the same plaintext
        clone = qubesd.add_template(app, self.qubes()[1], SIZE)
        await clone.storage.create()
        dst = clone.volumes["private"]
        t0 = time.perf_counter()
        got = await clone.storage.import_volume(dst, vol)
        self.timings["clone_64MiB_ms"] = ms(t0)
        ckey = self.key(clone)
        cclean = dst.inner._path_clean
        own = ckey.reveal() != key.reveal() and opens(cclean, ckey) and not opens(cclean, key)
        self.fact("clone_own_key", own, own and got is dst)
        await dst.start()
        ok = read_at(dst.block_device().path, MIB, len(two)) == two
        await dst.stop()
        self.fact("clone_same_plaintext", ok, ok and not contains(cclean, TAG))
        ok = self.recorded(clone, cclean)
        self.fact("clone_recorded", ok, ok)
        await clone.storage.remove()

        # rotation: qubes-seal domain rotate (the daemon stopped around it), re-keyed at start
        self.facts["rotation"] = await self.rotation(vm, vol, key, two)
        if self.facts["rotation"].get("ok") is not True:
            self.failed.append("rotation")

    async def rotation(self, vm: Any, vol: Any, old: Secret, data: bytes) -> dict[str, Any]:
        out: dict[str, Any] = {}

        def qs(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "qubes_seal", *args],
                                  capture_output=True, text=True, timeout=120)  # fmt: skip

        def daemon(action: str) -> None:
            subprocess.run(["systemctl", action, "qubes-seal-keyd"], check=True, timeout=60)
            if action == "start":
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    st = client.status(self.socket)
                    if st is not None and not st.get("locked", True):
                        return
                    time.sleep(0.1)

        try:
            daemon("stop")
            res = qs("domain", "rotate", vm.name, "--uuid", str(vm.uuid))
            daemon("start")
            if res.returncode != 0:
                return {"ok": False, "error": "domain rotate: " + (res.stderr or res.stdout)}
            new = self.key(vm)
            await vol.start()  # the driver re-keys before it opens
            dev = vol.block_device().path
            out["data_kept"] = read_at(dev, MIB, len(data)) == data
            await vol.stop()
            clean = vol.inner._path_clean
            out["new_key_opens"] = opens(clean, new)
            out["old_key_refused"] = not opens(clean, old)
            # the template's root was not started: a commit now would lose it, refused
            daemon("stop")
            res = qs("domain", "rotate", vm.name, "--uuid", str(vm.uuid), "--commit")
            daemon("start")
            out["commit_refused_root_not_rekeyed"] = (
                res.returncode == 2 and "root (still on the previous key)" in res.stderr
            )
            # the halted qube's root re-keyed by the command, which records it
            rekey = subprocess.run(
                [sys.executable, "-m", "qubes_seal.qubes_pool", "rekey", vm.name, "--uuid",
                 str(vm.uuid), "--socket", str(self.socket), "--volume",
                 vm.volumes["root"].inner._path_clean],
                capture_output=True, text=True, timeout=120,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},  # qubesd's stack
            )  # fmt: skip
            out["root_rekeyed_and_recorded"] = rekey.returncode == 0 and (
                f"recorded as {vm.name}'s volume root, on the current key" in rekey.stdout
            )
            if not out["root_rekeyed_and_recorded"]:
                out["rekey_output"] = (rekey.stdout + rekey.stderr)[-1500:]
            daemon("stop")
            res = qs("domain", "rotate", vm.name, "--uuid", str(vm.uuid), "--commit")
            daemon("start")
            out["committed"] = res.returncode == 0
            await vol.start()
            out["starts_after_commit"] = read_at(dev, MIB, len(data)) == data
            await vol.stop()
            new.wipe()
        except Exception as exc:  # reported, never a traceback instead of the line
            out["error"] = f"{type(exc).__name__}: {exc}"
        out["ok"] = all(out.get(k) is True for k in (
            "data_kept", "new_key_opens", "old_key_refused", "commit_refused_root_not_rekeyed",
            "root_rekeyed_and_recorded", "committed", "starts_after_commit"))  # fmt: skip
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--socket", type=Path, default=Path(DEFAULT_SOCKET))
    parser.add_argument("--dry-run", action="store_true",
                        help="stop before cryptsetup open (no device-mapper)")  # fmt: skip
    args = parser.parse_args(argv)
    args.workdir.mkdir(parents=True, exist_ok=True)
    why = qubesd.missing()
    check = Check(args)
    t0 = time.perf_counter()
    if why:
        check.fact("error", why, False)
    else:
        try:
            asyncio.run(check.run())
        except BaseException as exc:  # one line whatever happens
            check.fact("error", "".join(traceback.format_exception(exc))[-2000:], False)
        # mappings a failed step left open (this check's qubes only)
        mapper = Path("/dev/mapper")
        left = (
            sorted(p.name for p in mapper.glob("vm-seal-vault_dtest*")) if mapper.is_dir() else []
        )
        for name in left:
            subprocess.run(["cryptsetup", "close", "--", name], capture_output=True, timeout=60)
        if left:
            check.fact("mappings_left_open", left, False)
    check.timings["total_ms"] = ms(t0)
    ok = not check.failed
    doc = {"ok": ok, "failed": check.failed, **check.facts, "timings": check.timings}
    print("[vmcheck] pool " + json.dumps(doc, sort_keys=True, default=str), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
