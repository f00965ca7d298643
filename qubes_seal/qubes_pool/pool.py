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
it on its stdin (``--key-file=- --keyfile-size=64``) or, two keys at once, on pipes
(``/dev/fd/N``), never argv, the environment or a file.

Data paths (``export``, ``import_data``, ``import_volume``) go through a dm-crypt mapping
only: the inner pool holds ciphertext, a clone gets its own key (decrypt-copy-encrypt).  A
pending rotation of a qube's key (``qubes-seal domain rotate``) re-keys its origin volumes at
their next start (:func:`rekey_path`, crash-safe).  docs/QUBES-POOL.md.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import stat
import uuid as uuid_mod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import qubes.exc
import qubes.storage
import qubes.utils

from ..errors import QubesSealError
from ..journal import crash_point
from ..keystore import volumes
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
#: the LUKS2 header's subsystem while its plaintext was never written (``create``): the first
#: start zeroes the first ZERO_BYTES through the mapping, so the qube sees an empty volume
#: (Qubes' virgin-boot check reads the first 10 MiB of ``private`` for zeros before mkfs)
FRESH = "qubes-seal:fresh"
ZERO_BYTES = 16 << 20
COPY_CHUNK = 1 << 20
CRYPTSETUP_TIMEOUT = 60.0
_POOL_NAME = re.compile(r"\A[A-Za-z0-9_.-]+\Z")

log = logging.getLogger("qubes_seal.qubes_pool")


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


async def cryptsetup(
    *args: str, key: Secret | None = None, pass_fds: Sequence[int] = ()
) -> tuple[int, str, str]:
    """Run ``cryptsetup ARGS`` (``key``: on its stdin); exit status, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        os.environ.get("QUBES_SEAL_CRYPTSETUP", "cryptsetup"),
        *args,
        stdin=asyncio.subprocess.PIPE if key is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "LC_ALL": "C"},
        pass_fds=tuple(pass_fds),
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


async def cryptsetup_keys(
    keys: Sequence[Secret], build: Callable[[list[str]], list[str]]
) -> tuple[int, str, str]:
    """Run cryptsetup with ``keys`` on pipes: ``build`` gets their read ends as ``/dev/fd/N``
    paths and returns cryptsetup's arguments.  Each key is written whole into its pipe (64
    bytes fit any pipe buffer) and the write end closed before cryptsetup starts: never argv,
    the environment or a file."""
    fds: list[int] = []
    try:
        for key in keys:
            r, w = os.pipe()
            fds.append(r)
            try:
                os.write(w, key.reveal())
            finally:
                os.close(w)
        return await cryptsetup(*build([f"/dev/fd/{fd}" for fd in fds]), pass_fds=fds)
    finally:
        for fd in fds:
            os.close(fd)


_SLOT = re.compile(r"^Key slot (\d+) unlocked", re.MULTILINE)


async def slot_of(path: str, key: Secret) -> int | None:
    """The keyslot of the LUKS volume at ``path`` that ``key`` opens, or None (no
    device-mapper needed: ``cryptsetup open --test-passphrase``)."""
    code, out, err = await cryptsetup_keys(
        [key],
        lambda fd: ["open", "--test-passphrase", "--verbose", f"--key-file={fd[0]}",
                    f"--keyfile-size={KEY_BYTES}", "--", path],
    )  # fmt: skip
    if code == 2:
        return None
    m = _SLOT.search(out)
    if code != 0 or m is None:
        raise PoolError(f"{path}: cryptsetup open --test-passphrase failed (exit {code}): "
                        f"{err.strip() or out.strip()}")  # fmt: skip
    return int(m.group(1))


async def rekey_path(
    path: str, *, previous: Secret, current: Secret, where: str, pbkdf: Sequence[str] = PBKDF
) -> bool:
    """Move the LUKS volume at ``path`` from the ``previous`` key to the ``current`` one: a
    keyslot for the current key (``luksAddKey``, authorised by the previous key), then the
    previous key's keyslot killed (``luksKillSlot``, authorised by the current key, which
    cryptsetup checks opens a keyslot that remains).  The volume key and the data stay.

    Every step is decided from the header itself (which keyslot each key opens), so it can be
    run again after an interruption: a volume that opens with both keys (interrupted after the
    add) only loses the previous keyslot; one that opens with the current key alone is left
    as it is.  True when the volume changed."""
    new = await slot_of(path, current)
    old = await slot_of(path, previous)
    if new is None and old is None:
        raise PoolError(
            f"{where}: neither the current nor the previous key opens {path}",
            hint="the volume was re-keyed or replaced; restore the qube from a backup",
        )
    if old is None:
        return False
    if new is None:
        code, _, err = await cryptsetup_keys(
            [previous, current],
            lambda fd: ["luksAddKey", f"--key-file={fd[0]}", f"--keyfile-size={KEY_BYTES}",
                        f"--new-keyfile={fd[1]}", f"--new-keyfile-size={KEY_BYTES}", *pbkdf,
                        "--", path],
        )  # fmt: skip
        if code != 0:
            raise PoolError(f"{where}: luksAddKey failed (exit {code}): {err.strip()}; the "
                            f"previous keyslot {old} is kept")  # fmt: skip
        crash_point("pool-rekey-added")
        new = await slot_of(path, current)
        if new is None:
            raise PoolError(f"{where}: the current key does not open {path} after luksAddKey; "
                            f"the previous keyslot {old} is kept")  # fmt: skip
    for _ in range(32):  # LUKS2 keyslots
        if old is None:
            break
        if old == new:
            raise PoolError(f"{where}: the current and the previous key open the same keyslot "
                            f"{old}: refusing to remove it")  # fmt: skip
        code, _, err = await cryptsetup_keys([current], _kill_slot(path, old))
        if code != 0:
            raise PoolError(f"{where}: luksKillSlot {old} failed (exit {code}): {err.strip()}")
        old = await slot_of(path, previous)
    if old is not None:
        raise PoolError(f"{where}: the previous key still opens {path}")
    return True


def _kill_slot(path: str, slot: int) -> Callable[[list[str]], list[str]]:
    def build(fd: list[str]) -> list[str]:
        return ["luksKillSlot", f"--key-file={fd[0]}", f"--keyfile-size={KEY_BYTES}", "--",
                path, str(slot)]  # fmt: skip

    return build


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
        #: export()'s plaintext path -> (its mapping or zero file, the inner export path)
        self._exports: dict[str, tuple[str, str]] = {}
        #: import_data()'s (mapping name, inner import path, size) until import_data_end
        # an import in progress: its mapping, inner path, size, new LUKS2 UUID and key id
        self._importing: tuple[str, str, int, str, str] | None = None
        # re-keyed at this start: (LUKS2 UUID, key id) recorded at the stop that keeps it
        self._rekeyed: tuple[str | None, str] | None = None
        self._luks_uuid: str | None = None  # read from the header at start

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
        return (await self._key_info())[0]

    async def _key_info(self, which: str = "current") -> tuple[Secret, bool]:
        """``which`` key (current or previous), and whether a rotation is pending."""
        found = await self._key_answer(which)
        return found.key, found.rotation_pending

    async def _key_answer(self, which: str = "current") -> client.KeyAnswer:
        """``which`` key with its id and whether a rotation is pending; clear errors."""
        socket_path = self.pool_typed.key_socket
        try:
            return await asyncio.to_thread(
                client.get_key_answer,
                socket_path,
                self.key_name,
                caller=CALLER,
                qube_uuid=self.key_uuid,
                which=which,
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

    async def _key_or_new(self) -> client.KeyAnswer:
        """The qube's key; made in the keystore (``add``, bound to the qube's UUID) first
        when it has none (one at a time per qube: qubesd creates its volumes concurrently)."""
        lock = self.pool_typed._key_locks.setdefault(self.key_name, asyncio.Lock())
        async with lock:
            try:
                return await self._key_answer()
            except PoolError as exc:
                if "no qubes-seal key" not in exc.message:
                    raise
            await self._admin({"op": "add", "name": self.key_name, "qube_uuid": self.key_uuid})
            return await self._key_answer()

    async def _note(self, luks_uuid: str | None, key_id: str, *, forget: bool = False) -> None:
        """Tell the key service which key this origin volume opens with now (or ``forget``
        it): the record that makes ``domain rotate --commit`` refuse while a volume is not
        re-keyed (:mod:`qubes_seal.keystore.volumes`).  Best effort: a record not written
        leaves the commit refusing (a re-keyed volume still on the previous key's record)
        or the volume recorded at its next start; never a failed start or stop."""
        try:
            await asyncio.to_thread(
                client.note_volume, self.pool_typed.key_socket, self.key_name,
                qube_uuid=self.key_uuid, volume=self.name, luks_uuid=luks_uuid,
                key_id=key_id, forget=forget,
            )  # fmt: skip
        except (client.ServiceRefused, client.ServiceUnreachable) as exc:
            if forget and getattr(exc, "name", None) == "no-key":
                return  # the qube's key is gone, and its records with it
            log.warning("%s:%s: the key service did not record which key the volume opens "
                        "with: %s", self.qube, self.name, exc.message)  # fmt: skip

    # -- cryptsetup --------------------------------------------------------------------------

    async def _check_ours(self, path: str) -> bool:
        """Refuse a header qubes-seal did not write (read in this process, both copies and
        their checksums verified: no cryptsetup process before the key is asked for); True
        when the volume was never written since ``create`` (:data:`FRESH`)."""
        from ..luks.header import read_header

        where = f"{self.qube}:{self.name} ({path})"
        try:
            header = await asyncio.to_thread(read_header, Path(path))
        except QubesSealError as exc:
            raise PoolError(
                f"{where}: not a LUKS2 volume: refusing to use it in the clear ({exc.message})",
                hint="an inner volume of this pool must hold a LUKS2 volume made by qubes-seal",
            ) from None
        metadata = header.metadata
        if not isinstance(metadata, dict):
            raise PoolError(f"{where}: unreadable LUKS2 metadata")
        check_header(metadata, where)
        self._luks_uuid = header.uuid
        return bool(header.primary.subsystem == FRESH)

    async def _format(self, path: str, key: Secret, *, fresh: bool = True) -> str:
        """A new LUKS2 volume (a new random volume key) at ``path``, its keyslot opened by
        ``key``; ``fresh``: marked so that the first start zeroes the start of its plaintext.
        Returns its LUKS2 UUID."""
        luks_uuid = str(uuid_mod.uuid4())
        code, _, err = await cryptsetup(
            "luksFormat", "--batch-mode", "--type", "luks2", "--cipher", CIPHER,
            "--uuid", luks_uuid,
            "--key-size", str(VOLUME_KEY_BITS), "--sector-size", str(SECTOR_SIZE),
            "--offset", str(DATA_OFFSET_SECTORS), *PBKDF,
            "--label", f"{LABEL_PREFIX}{self.key_name}",
            *(("--subsystem", FRESH) if fresh else ()),
            "--key-file=-", f"--keyfile-size={KEY_BYTES}", "--", path,
            key=key,
        )  # fmt: skip
        if code != 0:
            raise PoolError(f"{self.qube}:{self.name}: luksFormat failed: {err.strip()}")
        return luks_uuid

    async def _zero_start(self, mapped: str) -> None:
        """Zeros over the first ZERO_BYTES of the plaintext (through the mapping)."""

        def write() -> None:
            fd = os.open(mapped, os.O_WRONLY | os.O_CLOEXEC)
            try:
                end = min(ZERO_BYTES, os.lseek(fd, 0, os.SEEK_END))
                zeros = bytes(COPY_CHUNK)
                for offset in range(0, end, COPY_CHUNK):
                    os.pwrite(fd, zeros[: end - offset], offset)
                os.fsync(fd)
            finally:
                os.close(fd)

        await asyncio.to_thread(write)

    async def _open(self, path: str, name: str, key: Secret, *, readonly: bool) -> None:
        code, _, err = await cryptsetup(
            "open", "--type", "luks2", "--key-file=-", f"--keyfile-size={KEY_BYTES}",
            *(("--readonly",) if readonly else ()), "--", path, name, key=key,
        )  # fmt: skip
        if code == 2:
            raise PoolError(
                f"{self.qube}:{self.name}: the key of {self.key_name} does not open {path}",
                hint="the volume was re-keyed or replaced; restore the qube from a backup",
            )
        if code != 0:
            raise PoolError(
                f"{self.qube}:{self.name}: cryptsetup open failed (exit {code}): {err.strip()}"
            )

    async def _close(self, name: str) -> None:
        if not os.path.exists(f"/dev/mapper/{name}"):
            return
        code, _, err = await cryptsetup("close", "--", name)
        if code != 0 and os.path.exists(f"/dev/mapper/{name}"):
            raise PoolError(f"{self.qube}:{self.name}: cryptsetup close {name} failed: "
                            f"{err.strip()}")  # fmt: skip

    async def _opening_key(self, path: str) -> Secret:
        """The key that opens ``path`` now (:meth:`_opening`)."""
        return (await self._opening(path))[0]

    async def _opening(self, path: str) -> tuple[Secret, str, bool]:
        """The key that opens ``path`` now, its id, and whether the volume was re-keyed.
        While a rotation of the key is pending, an origin volume (writable) is re-keyed
        first (:func:`rekey_path`: the current key added, the previous one's keyslot killed;
        crash-safe, decided from the header); a snapshot or read-only copy is opened with
        whichever key opens it (its origin is re-keyed when its own qube starts)."""
        current = await self._key_answer()
        key, key_id = current.key, current.key_id
        if not current.rotation_pending:
            return key, key_id, False
        try:
            prev = await self._key_answer("previous")
        except PoolError as exc:
            if "no qubes-seal key" in exc.message:  # committed meanwhile
                return key, key_id, False
            key.wipe()
            raise
        previous = prev.key
        try:
            if self.save_on_stop and self.rw:
                changed = await rekey_path(path, previous=previous, current=key,
                                           where=f"{self.qube}:{self.name}")  # fmt: skip
                return key, key_id, changed
            if await slot_of(path, key) is None and await slot_of(path, previous) is not None:
                key.wipe()
                return Secret(bytes(previous.reveal())), prev.key_id, False
            return key, key_id, False
        except BaseException:
            key.wipe()
            raise
        finally:
            previous.wipe()

    async def _close_mapping(self) -> None:
        await self._close(self.mapping)

    # -- the lifecycle qubesd drives ---------------------------------------------------------

    @qubes.storage.Volume.locked  # type: ignore[untyped-decorator]
    async def create(self) -> EncryptedVolume:
        await qubes.utils.coro_maybe(self.inner.create())
        if self.volatile or self.snap_on_start:
            return self  # Qubes' ephemeral key / the origin's LUKS volume at start
        found = await self._key_or_new()
        try:
            await qubes.utils.coro_maybe(self.inner.start())
            try:
                luks_uuid = await self._format(self.inner.block_device().path, found.key)
            finally:
                await qubes.utils.coro_maybe(self.inner.stop())
        finally:
            found.key.wipe()
        await self._note(luks_uuid, found.key_id)
        return self

    @qubes.storage.Volume.locked  # type: ignore[untyped-decorator]
    async def start(self) -> EncryptedVolume:
        await qubes.utils.coro_maybe(self.inner.start())
        if self.volatile:
            return self
        path = self.inner.block_device().path
        fresh = await self._check_ours(path)
        key, key_id, rekeyed = await self._opening(path)
        if self.save_on_stop and self.rw and rekeyed:
            self._rekeyed = (self._luks_uuid, key_id)  # recorded at the stop that keeps it
        try:
            await self._close_mapping()  # a stale mapping of an unclean stop
            await self._open(path, self.mapping, key, readonly=not self.rw)
        finally:
            key.wipe()
        if self.save_on_stop and self.rw and self._rekeyed is None:
            await self._note(self._luks_uuid, key_id)  # the committed volume opens with it
        if self.rw and fresh:
            # never written since create: the qube must see an empty volume, not the
            # decryption of the inner pool's zeros (Qubes formats an all-zero private)
            try:
                await self._zero_start(self.mapping_path)
                code, _, err = await cryptsetup("config", "--subsystem", "", "--", path)
                if code != 0:
                    raise PoolError(f"{self.qube}:{self.name}: cryptsetup config: {err.strip()}")
            except BaseException:
                await self._close_mapping()
                raise
        return self

    @qubes.storage.Volume.locked  # type: ignore[untyped-decorator]
    async def stop(self) -> EncryptedVolume:
        """Close the mapping (no key needed), then stop the inner volume; idempotent.  Also
        closes an export or import mapping an earlier qubesd left behind (a crash in the
        middle of a backup or restore), never one in use now."""
        if not self.volatile:
            await self._close_mapping()
            await self._close_stale()
        await qubes.utils.coro_maybe(self.inner.stop())
        if self._rekeyed is not None:  # the inner pool kept the re-keyed volume
            (luks_uuid, key_id), self._rekeyed = self._rekeyed, None
            await self._note(luks_uuid, key_id)
        return self

    async def _close_stale(self) -> None:
        active = {entry[0] for entry in self._exports.values()}
        if self._importing is not None:
            active.add(self._importing[0])
        stale = [p.name for p in Path("/dev/mapper").glob(f"{self.mapping}-*")
                 if p.name not in active
                 and (p.name == f"{self.mapping}-import" or "-export-" in p.name)]  # fmt: skip
        for name in stale:
            await self._close(name)

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
        elif self.save_on_stop:  # the qube keeps its key: this volume's record goes
            await self._note(None, "", forget=True)
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
        that ``start`` refuses as not LUKS2, never one used in the clear.)  An older revision
        may hold only the previous key's keyslot of a rotation: the volume's record says
        ``unknown`` until its next start, so a commit meanwhile is refused."""
        await qubes.utils.coro_maybe(self.inner.revert(revision))
        if self.save_on_stop:
            await self._note(None, volumes.UNKNOWN)
        return self

    # -- data paths: plaintext in and out through a mapping, never in the clear on disk ------

    async def export(self) -> str:
        """A path to read the qube's plaintext (qvm-backup, and the source of a clone): the
        inner pool's export (the data from before a running qube's start) mapped read-only
        with the qube's key, ``/dev/mapper/vm-seal-QUBE@VOLUME-export-N``; released by
        :meth:`export_end`.  A volume never written since ``create`` exports as zeros (a
        sparse file), what a plain pool gives."""
        if not self.save_on_stop:
            raise NotImplementedError(f"Cannot export: {self.vid} is not save_on_stop")
        inner_path = await qubes.utils.coro_maybe(self.inner.export())
        try:
            if await self._check_ours(inner_path):
                import tempfile

                fd, zero = tempfile.mkstemp(prefix="qubes-seal-export-", suffix=".img")
                try:
                    os.ftruncate(fd, self.size)
                finally:
                    os.close(fd)
                self._exports[zero] = (zero, inner_path)
                return zero
            name = f"{self.mapping}-export-{next(_EXPORTS)}"
            key = await self._opening_key_readonly(inner_path)
            try:
                await self._close(name)  # left by an earlier qubesd (its numbering restarts)
                await self._open(inner_path, name, key, readonly=True)
            finally:
                key.wipe()
        except BaseException:
            await qubes.utils.coro_maybe(self.inner.export_end(inner_path))
            raise
        path = f"/dev/mapper/{name}"
        self._exports[path] = (name, inner_path)
        return path

    async def _opening_key_readonly(self, path: str) -> Secret:
        """The current key, or while a rotation is pending whichever key opens ``path`` (an
        export reads the committed image, which a running qube's start may have re-keyed
        only in its working copy)."""
        key, pending = await self._key_info()
        if not pending or await slot_of(path, key) is not None:
            return key
        key.wipe()
        return (await self._key_info("previous"))[0]

    async def export_end(self, path: str) -> None:
        """The export's mapping closed (or its zero file removed), then the inner pool's
        ``export_end``."""
        entry = self._exports.pop(path, None)
        if entry is None:
            raise PoolError(f"{self.qube}:{self.name}: {path} is not an export of this volume")
        name, inner_path = entry
        try:
            if name.startswith("/"):
                os.unlink(name)
            else:
                await self._close(name)
        finally:
            await qubes.utils.coro_maybe(self.inner.export_end(inner_path))

    @qubes.storage.Volume.locked  # type: ignore[untyped-decorator]
    async def import_data(self, size: int) -> str:
        """A path to write the new plaintext of ``size`` bytes (restore, ``qvm-volume
        import``, ``Clear``): the inner pool's import volume (``size`` plus the header),
        formatted as a new LUKS2 volume with the qube's key and mapped,
        ``/dev/mapper/vm-seal-QUBE@VOLUME-import``; the first ZERO_BYTES zeroed (an import
        that writes nothing leaves an empty volume).  :meth:`import_data_end` follows."""
        return await self._import_begin(int(size))

    @qubes.storage.Volume.locked  # type: ignore[untyped-decorator]
    async def import_data_end(self, success: bool) -> None:
        """The mapping closed, then the inner pool's ``import_data_end``: committed on
        ``success`` (and a clean close), else discarded."""
        await self._import_end(bool(success))

    async def _import_begin(self, size: int) -> str:
        where = f"{self.qube}:{self.name}"
        if not self.save_on_stop:
            raise NotImplementedError(f"Cannot import_data: {self.vid} is not save_on_stop")
        if size <= 0:
            raise PoolError(f"{where}: cannot import {size} bytes")
        if self._importing is not None:
            raise PoolError(f"{where}: an import into this volume is in progress")
        inner_path = await qubes.utils.coro_maybe(self.inner.import_data(size + HEADER_BYTES))
        name = f"{self.mapping}-import"
        try:
            try:
                mode = os.stat(inner_path).st_mode
            except OSError as exc:
                raise PoolError(f"{where}: the inner pool's import path {inner_path}: "
                                f"{exc.strerror}") from None  # fmt: skip
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise PoolError(
                    f"{where}: the inner pool {self.pool_typed.inner_pool} imports through "
                    f"{inner_path}, which is no file or block device: it cannot hold a LUKS2 "
                    "volume, and nothing is written in the clear",
                    hint="use an inner pool that imports into a file or a block device "
                    "(file-reflink, lvm_thin, zfs)",
                )
            found = await self._key_answer()
            key = found.key
            try:
                luks_uuid = await self._format(inner_path, key, fresh=False)
                await self._close(name)  # a stale mapping of an interrupted import
                await self._open(inner_path, name, key, readonly=False)
            finally:
                key.wipe()
            try:
                await self._zero_start(f"/dev/mapper/{name}")
            except BaseException:
                await self._close(name)
                raise
        except BaseException:
            await qubes.utils.coro_maybe(self.inner.import_data_end(False))
            raise
        self._importing = (name, inner_path, size, luks_uuid, found.key_id)
        return f"/dev/mapper/{name}"

    async def _import_end(self, success: bool) -> None:
        state, self._importing = self._importing, None
        if state is None:
            # import_data failed (and cleaned up) or was never called: nothing to commit
            await qubes.utils.coro_maybe(self.inner.import_data_end(False))
            if success:
                raise PoolError(f"{self.qube}:{self.name}: no import in progress")
            return
        name, _, size, luks_uuid, key_id = state
        closed = False
        try:
            await self._close(name)
            closed = True
        finally:
            await qubes.utils.coro_maybe(self.inner.import_data_end(success and closed))
        if success:
            self._size = size
            await self._note(luks_uuid, key_id)  # the imported volume is a new LUKS2 volume

    @qubes.storage.Volume.locked  # type: ignore[untyped-decorator]
    async def import_volume(self, src_volume: Any) -> EncryptedVolume:
        """``qvm-clone`` (into this pool from any pool, ``-P``): decrypt-copy-encrypt.  The
        source's plaintext (its ``export``: for a volume of this pool, its own mapping) is
        copied through a mapping of this volume, made with *this* qube's key (a clone gets
        its own key, never a copy of the source's); never the inner pool's raw copy, which
        would copy the source's header and so its key.  Returns this volume, as qubesd's
        ``admin.vm.volume.CloneTo`` stores what it returns."""
        if not self.save_on_stop:
            return self  # a snapshot or volatile volume holds nothing of its own to copy
        size = int(src_volume.size)
        src_path = await qubes.utils.coro_maybe(src_volume.export())
        try:
            dst_path = await self._import_begin(size)
            copied = False
            try:
                await asyncio.to_thread(_copy_plain, src_path, dst_path, size)
                copied = True
            finally:
                await self._import_end(copied)
        finally:
            await qubes.utils.coro_maybe(src_volume.export_end(src_path))
        return self


_EXPORTS = itertools.count(1)


def _copy_plain(src: str, dst: str, size: int) -> None:
    """Copy ``size`` bytes (or up to the end of ``src``) from ``src`` to ``dst``, every block
    written (the destination is a mapping: unwritten blocks would read as noise)."""
    with open(src, "rb", buffering=0) as fin, open(dst, "r+b", buffering=0) as fout:
        done = 0
        while done < size:
            chunk = fin.read(min(COPY_CHUNK, size - done))
            if not chunk:
                break
            view = memoryview(chunk)
            while view:
                view = view[fout.write(view) or 0 :]
            done += len(chunk)
        os.fsync(fout.fileno())
