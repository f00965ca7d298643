"""``EncryptedPool`` and ``EncryptedVolume``: LUKS2 over another pool's volumes.

Volume kinds (``snap_on_start``, ``save_on_stop``), docs/QUBES-POOL.md:

* origin (F, T: a qube's private, a template's or standalone's root): a LUKS2 volume on the
  inner volume, its keyslot opened with the qube's own key (name + UUID, as the keystore keys
  it), made by :meth:`EncryptedVolume.create`;
* snapshot (T, F: an AppVM's root, a DispVM's private): the inner pool's snapshot of the
  origin's ciphertext, opened with the origin's key;
* volatile (F, F): Qubes' own ephemeral encryption (a random key never stored), forced on;
* origin-snapshot (T, T) and read-only volatile volumes: refused (``NotImplementedError``,
  as qubesd expects from ``init_volume``).

cryptsetup runs as an asyncio subprocess (qubesd's event loop keeps running); the key reaches
it on its stdin (``--key-file=- --keyfile-size=64``), never argv, the environment or a file.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import Any

import qubes.exc
import qubes.storage
import qubes.utils

from ..errors import QubesSealError
from ..secret import Secret
from ..service import client
from ..service.protocol import DEFAULT_SOCKET

DRIVER = "qubes_seal"
#: the caller name the key service knows the driver by (root in dom0): [dom0-storage]
CALLER = "dom0"
CIPHER = "aes-xts-plain64"
KEY_BYTES = 64  # the per-domain key: the keyslot's passphrase
VOLUME_KEY_BITS = 512  # AES-256-XTS
SECTOR_SIZE = 4096
#: the LUKS2 header area in front of the data (512-byte sectors: 16 MiB, cryptsetup's
#: default, pinned so the inner volume is exactly this much larger than the qube's volume)
DATA_OFFSET_SECTORS = 32768
HEADER_BYTES = DATA_OFFSET_SECTORS * 512
#: the keyslot's KDF: the passphrase is a random 64-byte key, so no stretching is needed
PBKDF = ("--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", "--hash", "sha256")
LABEL_PREFIX = "qubes-seal:"
CRYPTSETUP_TIMEOUT = 60.0
_POOL_NAME = re.compile(r"\A[A-Za-z0-9_.-]+\Z")


class PoolError(QubesSealError, qubes.exc.StoragePoolException):  # type: ignore[misc]
    """A clear refusal for qubesd (a ``StoragePoolException``: logged, no traceback)."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        QubesSealError.__init__(self, message, hint=hint)
        self.args = (message if not hint else f"{message} ({hint})",)

    def __str__(self) -> str:
        return str(self.args[0])


UNLOCK_HINT = "unlock the container, then start the qube again"


def _text(value: object, option: str) -> str:
    if not isinstance(value, str) or not value:
        raise PoolError(f"pool option {option} must be a non-empty string, not {value!r}")
    return value


def _boolean(value: object, option: str) -> bool:
    try:
        return bool(qubes.utils.parse_bool(value))
    except (ValueError, TypeError):
        raise PoolError(f"pool option {option} must be True or False, not {value!r}") from None


def _count(value: object, option: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise PoolError(f"pool option {option} must be an integer, not {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise PoolError(f"pool option {option} must be an integer, not {value!r}") from None
    if number < -1:
        raise PoolError(f"pool option {option} must be -1 or more, not {number}")
    return number


def _escaped(name: str) -> str:
    """Qubes' one-to-one escape of a qube name for a dm name ('_' -> '_u', '-' -> '_d')."""
    return name.replace("_", "_u").replace("-", "_d")


async def cryptsetup(*args: str, key: Secret | None = None) -> tuple[int, str, str]:
    """Run ``cryptsetup ARGS`` (``key``: on its stdin); exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        os.environ.get("QUBES_SEAL_CRYPTSETUP", "cryptsetup"),
        *args,
        stdin=asyncio.subprocess.PIPE if key is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C"},
    )
    try:
        out, err = await asyncio.wait_for(
            proc.communicate(key.reveal() if key is not None else None), CRYPTSETUP_TIMEOUT
        )
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def check_header(metadata: dict[str, Any], where: str) -> None:
    """Refuse a LUKS2 header this driver did not write: every segment and keyslot must be
    AES-XTS with a 512-bit key (an evil maid's ``cipher_null`` keyslot would open with any
    key, a ``cipher_null`` segment would store the qube's data in the clear)."""
    segments = metadata.get("segments")
    keyslots = metadata.get("keyslots")
    if not isinstance(segments, dict) or not isinstance(keyslots, dict) or not segments:
        raise PoolError(f"{where}: the LUKS2 metadata has no segments or keyslots")
    for sid, seg in segments.items():
        if not (
            isinstance(seg, dict)
            and seg.get("type") == "crypt"
            and seg.get("encryption") == CIPHER
            and seg.get("sector_size") == SECTOR_SIZE
            and seg.get("offset") == str(HEADER_BYTES)
        ):
            raise PoolError(
                f"{where}: LUKS2 segment {sid} is not one qubes-seal writes "
                f"({seg.get('encryption') if isinstance(seg, dict) else seg!r}): refusing to "
                "open it",
                hint="the volume's header was replaced; restore the qube from a backup",
            )
    for kid, slot in keyslots.items():
        area = slot.get("area") if isinstance(slot, dict) else None
        if not (
            isinstance(slot, dict)
            and slot.get("type") == "luks2"
            and slot.get("key_size") == VOLUME_KEY_BITS // 8
            and isinstance(area, dict)
            and area.get("encryption") == CIPHER
        ):
            raise PoolError(
                f"{where}: LUKS2 keyslot {kid} is not one qubes-seal writes: refusing to open it",
                hint="the volume's header was replaced; restore the qube from a backup",
            )
    if metadata.get("tokens"):
        raise PoolError(f"{where}: the LUKS2 header carries tokens: refusing to open it")


class EncryptedPool(qubes.storage.Pool):  # type: ignore[misc]
    """A wrapper pool: ``inner_pool`` keeps the ciphertext, this pool maps it.

    Options (``qvm-pool add NAME qubes_seal -o k=v``, strings): ``inner_pool`` (required),
    ``key_socket`` (the key service's socket), ``revisions_to_keep``, ``ephemeral_volatile``
    (accepted and kept; volatile volumes here are always ephemeral).
    """

    driver = DRIVER

    def __init__(
        self,
        *,
        name: str,
        inner_pool: object = None,
        key_socket: object = DEFAULT_SOCKET,
        revisions_to_keep: object = 1,
        ephemeral_volatile: object = True,
    ) -> None:
        inner = _text(inner_pool, "inner_pool")
        if not _POOL_NAME.match(inner):
            raise PoolError(f"pool option inner_pool: invalid pool name {inner!r}")
        if inner == name:
            raise PoolError(f"pool {name} cannot wrap itself")
        socket_path = _text(key_socket, "key_socket")
        if not os.path.isabs(socket_path):
            raise PoolError(f"pool option key_socket must be an absolute path, not {socket_path!r}")
        super().__init__(
            name=name,
            revisions_to_keep=_count(revisions_to_keep, "revisions_to_keep"),
            ephemeral_volatile=_boolean(ephemeral_volatile, "ephemeral_volatile"),
        )
        self.inner_pool = inner
        self.key_socket = Path(socket_path)
        self._volumes: dict[str, EncryptedVolume] = {}
        self._key_locks: dict[str, asyncio.Lock] = {}

    @property
    def config(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "driver": DRIVER,
            "inner_pool": self.inner_pool,
            "key_socket": str(self.key_socket),
            "revisions_to_keep": str(self.revisions_to_keep),
            "ephemeral_volatile": str(self.ephemeral_volatile),
        }

    async def setup(self) -> None:
        """Nothing on disk: the inner pool holds the volumes (it is looked up by name, with
        the first qube's app, since a pool is built without one)."""

    async def destroy(self) -> None:
        """The inner pool and its volumes stay (qubesd refuses to remove a pool in use)."""

    def inner(self, app: Any) -> Any:
        """The inner pool, by name, from qubesd's ``app``."""
        try:
            pool = app.get_pool(self.inner_pool)
        except (qubes.exc.QubesException, KeyError):
            raise PoolError(
                f"pool {self.name}: unknown inner pool {self.inner_pool!r}",
                hint="qvm-pool list shows the pools; qvm-pool set "
                f"{self.name} -o inner_pool=... names one",
            ) from None
        if isinstance(pool, EncryptedPool) or pool is self:
            raise PoolError(f"pool {self.name}: inner pool {self.inner_pool!r} is encrypted too")
        return pool

    def init_volume(self, vm: Any, volume_config: dict[str, Any]) -> EncryptedVolume:
        snap = _boolean(volume_config.get("snap_on_start", False), "snap_on_start")
        save = _boolean(volume_config.get("save_on_stop", False), "save_on_stop")
        rw = _boolean(volume_config.get("rw", False), "rw")
        if snap and save:
            raise NotImplementedError(
                f"pool {self.name}: origin-snapshot volumes (snap_on_start and save_on_stop) "
                "are not supported"
            )
        if not snap and not save and not rw:
            raise NotImplementedError(f"pool {self.name}: read-only volatile volumes")
        inner = self.inner(vm.app)
        source = volume_config.get("source")
        if snap and not isinstance(source, EncryptedVolume):
            raise PoolError(
                f"pool {self.name}: snapshot volume {volume_config.get('name')} of {vm.name} "
                "needs an origin in this pool"
            )
        size = int(volume_config.get("size", 0) or 0)
        cfg = dict(volume_config)
        cfg.pop("pool", None)
        cfg["revisions_to_keep"] = volume_config.get("revisions_to_keep", self.revisions_to_keep)
        if snap:
            assert isinstance(source, EncryptedVolume)
            cfg["source"] = source.inner
            key_name, key_uuid = source.key_name, source.key_uuid
        else:
            key_name, key_uuid = vm.name, str(vm.uuid)
        volatile = not snap and not save
        if not volatile:
            cfg["size"] = size + HEADER_BYTES if size else 0
        cfg.pop("ephemeral", None)
        inner_vol = inner.init_volume(vm, cfg)
        vol = EncryptedVolume(
            name=volume_config["name"],
            pool=self,
            vid=inner_vol.vid,
            revisions_to_keep=cfg["revisions_to_keep"],
            rw=rw,
            save_on_stop=save,
            snap_on_start=snap,
            source=source if snap else None,
            size=size,
            ephemeral=True if volatile else None,
            inner=inner_vol,
            qube=vm.name,
            key_name=key_name,
            key_uuid=key_uuid,
        )
        self._volumes[vol.vid] = vol
        return vol

    def list_volumes(self) -> list[EncryptedVolume]:
        return list(self._volumes.values())

    def get_volume(self, vid: str) -> EncryptedVolume:
        return self._volumes[vid]

    def included_in(self, app: Any) -> Any:
        return None

    @property
    def size(self) -> Any:
        return None

    @property
    def usage(self) -> Any:
        return None


class EncryptedVolume(qubes.storage.Volume):  # type: ignore[misc]
    """One qube volume: LUKS2 on ``inner`` (an inner pool's volume), mapped at start."""

    def __init__(
        self,
        *,
        inner: Any,
        qube: str,
        key_name: str,
        key_uuid: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.inner = inner
        self.qube = qube
        self.key_name = key_name
        self.key_uuid = key_uuid

    # -- what it is ---------------------------------------------------------------------------

    @property
    def volatile(self) -> bool:
        return not self.snap_on_start and not self.save_on_stop

    @property
    def mapping(self) -> str:
        """The dm-crypt mapping's name."""
        return f"vm-seal-{_escaped(self.qube)}@{self.name}"

    @property
    def mapping_path(self) -> str:
        return f"/dev/mapper/{self.mapping}"

    def block_device(self) -> Any:
        if self.volatile:
            return self.inner.block_device()  # qubesd's start_encrypted maps it
        return qubes.storage.BlockDevice(
            self.mapping_path, self.name, None, self.rw, self.domain, self.devtype
        )

    @property
    def pool_typed(self) -> EncryptedPool:
        assert isinstance(self.pool, EncryptedPool)
        return self.pool

    def is_dirty(self) -> bool:
        return bool(self.inner.is_dirty())

    def is_outdated(self) -> bool:
        return bool(self.inner.is_outdated())

    @property
    def revisions(self) -> Any:
        return self.inner.revisions

    @property
    def usage(self) -> Any:
        return self.inner.usage

    # -- keys --------------------------------------------------------------------------------

    async def _key(self) -> Secret:
        """The key of this volume's keyslot, from the key service; clear errors."""
        socket_path = self.pool_typed.key_socket
        try:
            return await asyncio.to_thread(
                client.get_key,
                socket_path,
                self.key_name,
                caller=CALLER,
                qube_uuid=self.key_uuid,
            )
        except client.ServiceUnreachable as exc:
            raise PoolError(
                f"{self.qube}:{self.name}: the qubes-seal key service does not answer "
                f"({exc.message})",
                hint="start it (systemctl start qubes-seal-keyd), unlock the container, then "
                "start the qube again",
            ) from None
        except client.ServiceRefused as exc:
            raise self._refusal(exc) from None

    def _refusal(self, exc: client.ServiceRefused) -> PoolError:
        where = f"{self.qube}:{self.name}"
        if exc.name == "locked":
            return PoolError(f"{where}: the qubes-seal key service is locked", hint=UNLOCK_HINT)
        if exc.name == "no-key":
            return PoolError(
                f"{where}: no qubes-seal key for {self.key_name}",
                hint=f"its key was destroyed or never made; {UNLOCK_HINT} "
                "(or restore the qube from a backup)",
            )
        if exc.name == "refused":
            return PoolError(
                f"{where}: the key service refused the key of {self.key_name}: {exc.message}",
                hint=f"add {self.key_name} to [dom0-storage] domains in "
                "/etc/qubes-seal/config.toml, then systemctl reload qubes-seal-keyd",
            )
        if exc.name == "bad-request" and "invalid" in exc.message:
            return PoolError(
                f"{where}: the keystore refuses the name {self.key_name!r}: {exc.message}"
            )
        return PoolError(f"{where}: the key service answered {exc.name}: {exc.message}")

    async def _admin(self, doc: dict[str, Any]) -> dict[str, Any]:
        try:
            return await asyncio.to_thread(client.call_retrying, self.pool_typed.key_socket, doc)
        except client.ServiceUnreachable as exc:
            raise PoolError(
                f"{self.qube}:{self.name}: the qubes-seal key service does not answer "
                f"({exc.message})",
                hint="start it (systemctl start qubes-seal-keyd) and unlock the container",
            ) from None
        except client.ServiceRefused as exc:
            raise self._refusal(exc) from None

    async def _key_or_new(self) -> Secret:
        """The qube's key; made in the keystore (``add``, bound to the qube's UUID) first
        when it has none (one at a time per qube: qubesd creates its volumes concurrently)."""
        lock = self.pool_typed._key_locks.setdefault(self.key_name, asyncio.Lock())
        async with lock:
            try:
                return await self._key()
            except PoolError as exc:
                if "no qubes-seal key" not in exc.message:
                    raise
            await self._admin({"op": "add", "name": self.key_name, "qube_uuid": self.key_uuid})
            return await self._key()

    # -- cryptsetup --------------------------------------------------------------------------

    async def _check_ours(self, path: str) -> None:
        code, out, err = await cryptsetup("luksDump", "--dump-json-metadata", "--", path)
        where = f"{self.qube}:{self.name} ({path})"
        if code != 0:
            raise PoolError(
                f"{where}: not a LUKS2 volume: refusing to use it in the clear "
                f"({err.strip() or 'cryptsetup luksDump failed'})",
                hint="an inner volume of this pool must hold a LUKS2 volume made by qubes-seal",
            )
        try:
            metadata = json.loads(out)
        except ValueError:
            raise PoolError(f"{where}: unreadable LUKS2 metadata") from None
        if not isinstance(metadata, dict):
            raise PoolError(f"{where}: unreadable LUKS2 metadata")
        check_header(metadata, where)

    async def _format(self, path: str, key: Secret) -> None:
        code, _, err = await cryptsetup(
            "luksFormat", "--batch-mode", "--type", "luks2", "--cipher", CIPHER,
            "--key-size", str(VOLUME_KEY_BITS), "--sector-size", str(SECTOR_SIZE),
            "--offset", str(DATA_OFFSET_SECTORS), *PBKDF,
            "--label", f"{LABEL_PREFIX}{self.key_name}",
            "--key-file=-", f"--keyfile-size={KEY_BYTES}", "--", path,
            key=key,
        )  # fmt: skip
        if code != 0:
            raise PoolError(f"{self.qube}:{self.name}: luksFormat failed: {err.strip()}")

    async def _close_mapping(self) -> None:
        if not os.path.exists(self.mapping_path):
            return
        code, _, err = await cryptsetup("close", "--", self.mapping)
        if code != 0 and os.path.exists(self.mapping_path):
            raise PoolError(f"{self.qube}:{self.name}: cryptsetup close failed: {err.strip()}")

    # -- the lifecycle qubesd drives ---------------------------------------------------------

    @qubes.storage.Volume.locked  # type: ignore[untyped-decorator]
    async def create(self) -> EncryptedVolume:
        await qubes.utils.coro_maybe(self.inner.create())
        if self.volatile or self.snap_on_start:
            return self  # Qubes' ephemeral key / the origin's LUKS volume at start
        key = await self._key_or_new()
        try:
            await qubes.utils.coro_maybe(self.inner.start())
            try:
                await self._format(self.inner.block_device().path, key)
            finally:
                await qubes.utils.coro_maybe(self.inner.stop())
        finally:
            key.wipe()
        return self

    @qubes.storage.Volume.locked  # type: ignore[untyped-decorator]
    async def start(self) -> EncryptedVolume:
        await qubes.utils.coro_maybe(self.inner.start())
        if self.volatile:
            return self
        path = self.inner.block_device().path
        await self._check_ours(path)
        key = await self._key()
        try:
            await self._close_mapping()  # a stale mapping of an unclean stop
            extra = () if self.rw else ("--readonly",)
            code, _, err = await cryptsetup(
                "open", "--type", "luks2", "--key-file=-", f"--keyfile-size={KEY_BYTES}",
                *extra, "--", path, self.mapping, key=key,
            )  # fmt: skip
        finally:
            key.wipe()
        if code == 2:
            raise PoolError(
                f"{self.qube}:{self.name}: the key of {self.key_name} does not open this volume",
                hint="the volume was re-keyed or replaced; restore the qube from a backup",
            )
        if code != 0:
            raise PoolError(
                f"{self.qube}:{self.name}: cryptsetup open failed (exit {code}): {err.strip()}"
            )
        return self

    @qubes.storage.Volume.locked  # type: ignore[untyped-decorator]
    async def stop(self) -> EncryptedVolume:
        """Close the mapping (no key needed), then stop the inner volume; idempotent."""
        if not self.volatile:
            await self._close_mapping()
        await qubes.utils.coro_maybe(self.inner.stop())
        return self

    @qubes.storage.Volume.locked  # type: ignore[untyped-decorator]
    async def remove(self) -> EncryptedVolume:
        """Mapping closed, inner volume removed; the last origin volume of a qube destroys
        its key (crypto-erase: copies of the ciphertext open no more).  When that key cannot
        be destroyed now (the service locked or down), nothing is removed: a refusal that
        says so, rather than a qube deleted but not erased."""
        pool = self.pool_typed
        if self.save_on_stop:
            await self._can_destroy_key()
        pool._volumes.pop(self.vid, None)
        if not self.volatile:
            await self._close_mapping()
        await qubes.utils.coro_maybe(self.inner.remove())
        # qubesd removes a qube's volumes concurrently: the last origin volume to go under
        # this key destroys it (a second attempt finds no key, which is fine)
        if self.save_on_stop and not any(
            v.save_on_stop and v.key_name == self.key_name for v in pool._volumes.values()
        ):
            try:
                await self._admin({"op": "remove", "name": self.key_name})
            except PoolError as exc:
                if "no qubes-seal key" not in exc.message:
                    raise PoolError(
                        f"{self.qube}:{self.name}: removed, but its key could not be destroyed"
                        f": {exc.message}",
                        hint=f"run 'qubes-seal domain remove {self.key_name}' once unlocked",
                    ) from None
        return self

    async def _can_destroy_key(self) -> None:
        """Refuse (before anything is removed) when the key service could not destroy the
        qube's key now; a qube without a key is fine."""
        try:
            await self._admin({"op": "show", "name": self.key_name, "qube_uuid": self.key_uuid})
        except PoolError as exc:
            if "no qubes-seal key" in exc.message:
                return
            raise PoolError(
                f"{self.qube}:{self.name}: not removed: its key could not be destroyed now "
                f"({exc.message})",
                hint="unlock the container (and start qubes-seal-keyd), then remove the qube "
                "again: a removed qube's key is destroyed with it",
            ) from None

    async def verify(self) -> bool:
        """The inner volume, and the key: a clear error when the service is locked or the
        qube has no key."""
        await qubes.utils.coro_maybe(self.inner.verify())
        if not self.volatile:
            (await self._key()).wipe()
        return True

    @qubes.storage.Volume.locked  # type: ignore[untyped-decorator]
    async def resize(self, size: int) -> EncryptedVolume:
        """Grow (qubesd refuses to shrink): the inner volume by the same amount (its LUKS2
        segment is ``dynamic``, so it follows the device); a running volume's mapping is
        grown too (``cryptsetup resize``, the key on stdin)."""
        size = int(size)
        if size < self.size:
            raise PoolError(f"{self.qube}:{self.name}: shrinking is not supported")
        if self.volatile:
            await qubes.utils.coro_maybe(self.inner.resize(size))
            self._size = size
            return self
        await qubes.utils.coro_maybe(self.inner.resize(size + HEADER_BYTES))
        self._size = size
        if os.path.exists(self.mapping_path):
            key = await self._key()
            try:
                code, _, err = await cryptsetup(
                    "resize", "--key-file=-", f"--keyfile-size={KEY_BYTES}", "--", self.mapping,
                    key=key,
                )  # fmt: skip
            finally:
                key.wipe()
            if code != 0:
                raise PoolError(f"{self.qube}:{self.name}: cryptsetup resize: {err.strip()}")
        return self

    async def revert(self, revision: object = None) -> EncryptedVolume:
        """The inner pool's revert: its revisions are ciphertext under the same key.  (The
        oldest may be the image from before ``luksFormat``: reverting to it gives a volume
        that ``start`` refuses as not LUKS2, never one used in the clear.)"""
        await qubes.utils.coro_maybe(self.inner.revert(revision))
        return self

    async def export(self) -> str:
        raise PoolError(f"{self.qube}:{self.name}: export (backup) is not supported yet")

    async def import_data(self, size: int) -> str:
        raise PoolError(f"{self.qube}:{self.name}: import is not supported by this pool yet")

    async def import_data_end(self, success: bool) -> None:
        raise PoolError(f"{self.qube}:{self.name}: import is not supported by this pool yet")

    async def import_volume(self, src_volume: object) -> None:
        raise PoolError(
            f"{self.qube}:{self.name}: clone into this pool is not supported yet (a raw copy "
            "would copy the source's key)"
        )
