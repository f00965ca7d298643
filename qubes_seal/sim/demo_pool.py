"""The demo's storage-pool step: a qube in the encrypted pool, through qubesd's own code.

qubes-core-admin 4.3.50's ``Storage`` (:mod:`qubes_seal.sim.qubesd`: the vendored copy, not
on PyPI) drives the ``qubes_seal`` pool over a file-reflink pool in the demo's directory,
with the demo's key service.  What needs device-mapper (the mapping itself: data written and
read back through it) is said, not shown, unless this machine can map; tests/vm proves it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import qubesd

QUBE = "vault-work"
SIZE = 64 << 20


def _cryptsetup(*args: str, key: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["cryptsetup", *args], input=key, capture_output=True, timeout=60)


def _opens(path: str, key: bytes) -> bool:
    res = _cryptsetup("open", "--test-passphrase", "--key-file=-", "--keyfile-size=64", path,
                      key=key)  # fmt: skip
    return res.returncode == 0


def _quiet_run(coro: Any) -> None:
    """Run ``coro``; qubesd gathers its volumes' coroutines and leaves the second failure of
    a refused start to asyncio's "never retrieved" log: qubesd's own log, not the demo's."""
    import gc
    import logging

    log = logging.getLogger("asyncio")
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        asyncio.run(coro)
    finally:
        gc.collect()
        log.setLevel(level)


def pool_step(
    sock: Path,
    workdir: Path,
    lock: Callable[[], None],
    expect: Callable[[bool, str], None],
) -> None:
    """Create a qube in the pool, show its key and header, refuse its start once the
    container is locked (``lock``), and crypto-erase it on removal (unlocked again first:
    the removal refuses while the key cannot be destroyed)."""
    why = qubesd.missing() or ("" if os.geteuid() == 0 else "the pool driver is root's "
                               "(qubesd in dom0): run the demo as root")  # fmt: skip
    if why:
        print(f"  (step skipped: {why})")
        return
    try:
        _quiet_run(_pool(sock, workdir / "qubesd", lock, expect))
    except Exception as exc:  # the demo says what broke, never a traceback
        expect(False, f"the pool step: {type(exc).__name__}: {exc}")


async def _pool(
    sock: Path, work: Path, lock: Callable[[], None], expect: Callable[[bool, str], None]
) -> None:
    from ..service import client

    work.mkdir(parents=True, exist_ok=True)
    qubesd.setup(work)
    import qubes.exc

    app = qubesd.new_app(work)
    print(f"$ qvm-pool add inner file-reflink -o dir_path={work / 'inner'}")
    print(f"$ qvm-pool add vault qubes_seal -o inner_pool=inner -o key_socket={sock}")
    await qubesd.add_pools(app, work, sock)
    print(f"$ qvm-create --class TemplateVM -P vault --label red {QUBE}")
    vm = qubesd.add_template(app, QUBE, SIZE)
    await vm.storage.create()
    vol = vm.volumes["private"]
    inner = str(vol.inner._path_clean)
    shown = client.request(sock, {"op": "show", "name": QUBE, "qube_uuid": str(vm.uuid)})
    expect(shown.get("ok") is True,
           f"{QUBE}'s own key made in the keystore (key id {shown.get('domain', {}).get('key_id')}"
           ", bound to its UUID)")  # fmt: skip
    dump = _cryptsetup("luksDump", inner).stdout.decode()
    print(f"$ cryptsetup luksDump {Path(inner).name}   (the inner volume: ciphertext only)")
    for line in dump.splitlines():
        if line.strip().startswith(("Label:", "cipher:", "sector:", "offset:", "PBKDF:")):
            print(f"  {line.strip()}")
    try:
        await vol._check_ours(inner)
        ours = True
    except qubes.exc.StoragePoolException as exc:
        print(f"  {exc}")
        ours = False
    expect(ours, "the header is one qubes-seal writes (AES-XTS, 4096-byte sectors, no tokens)")
    key = client.get_key(sock, QUBE, caller="dom0", qube_uuid=str(vm.uuid))
    try:
        opened = _opens(inner, bytes(key.reveal()))
    finally:
        key.wipe()
    expect(opened, f"the key the service gives dom0 for {QUBE} opens its keyslot "
           "(cryptsetup open --test-passphrase)")  # fmt: skip
    print("  (the dm-crypt mapping itself, the qube's data written through it and read back, "
          "needs device-mapper, which this machine may lack: tests/vm proves it)")  # fmt: skip

    lock()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        st = client.status(sock)
        if st is not None and st.get("locked"):
            break
        time.sleep(0.2)
    print(f"$ qvm-start {QUBE}   (qubesd: Storage.verify, then Storage.start)")
    try:
        await vm.storage.verify()
        await vm.storage.start()
        refused = ""
    except qubes.exc.StoragePoolException as exc:
        refused = str(exc)
        print(f"  qubesd: {refused}")
    expect("unlock the container, then start the qube again" in refused,
           "the start refused while the container is locked, with what to do")  # fmt: skip
    print(f"$ qvm-remove {QUBE}   (still locked)")
    try:
        await vm.storage.remove()
        not_removed = ""
    except qubes.exc.StoragePoolException as exc:
        not_removed = str(exc)
        print(f"  qubesd: {not_removed}")
    expect("not removed" in not_removed and os.path.exists(inner),
           "the removal refused: the key could not be destroyed now, nothing deleted")  # fmt: skip
    _STATE["vm"] = vm
    _STATE["inner"] = inner


#: the qube left for :func:`remove_step` (after the demo unlocked again)
_STATE: dict[str, Any] = {}


def remove_step(sock: Path, workdir: Path, expect: Callable[[bool, str], None]) -> None:
    """After the unlock: ``qvm-remove`` crypto-erases the qube (its key destroyed)."""
    if "vm" not in _STATE:
        return
    try:
        _quiet_run(_remove(sock, workdir, expect))
    except Exception as exc:
        expect(False, f"the removal: {type(exc).__name__}: {exc}")


async def _remove(sock: Path, workdir: Path, expect: Callable[[bool, str], None]) -> None:
    from ..service import client

    vm, inner = _STATE.pop("vm"), _STATE.pop("inner")
    copy = workdir / "stolen-copy-of-vault-work.img"
    shutil.copy(inner, copy)
    print(f"  (a copy of the ciphertext kept aside: {copy.name}, as a thief would)")
    print(f"$ qvm-remove {QUBE}")
    await vm.storage.remove()
    gone = client.request(sock, {"op": "get-key", "caller": "dom0", "domain": QUBE})
    print(f"  key service, asked for {QUBE}'s key: {gone.get('error')}: {gone.get('message')}")
    expect(gone.get("error") == "no-key" and not os.path.exists(inner),
           "removed: the inner volume deleted and the key destroyed")  # fmt: skip
    new = client.request(sock, {"op": "add", "name": QUBE})  # a new qube of the same name
    key = client.get_key(sock, QUBE, caller="dom0")
    refused = not _opens(str(copy), bytes(key.reveal()))
    key.wipe()
    client.request(sock, {"op": "remove", "name": QUBE})
    expect(refused and new.get("ok") is True,
           "crypto-erased: no key the service holds opens the copy (a new qube of the same "
           "name gets a new key; only the destroyed one, which nobody keeps, would)")  # fmt: skip
    copy.unlink()


def pending() -> bool:
    """Whether :func:`pool_step` left a qube for :func:`remove_step`."""
    return "vm" in _STATE
