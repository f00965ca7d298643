"""The container's data area, read and written as dm-crypt does, in two back-ends.

dm-crypt's ``aes-xts-plain64`` (Documentation/admin-guide/device-mapper/dm-crypt.rst): each
512-byte sector is one XTS data unit, the volume key is the XTS key (two AES keys: 32 bytes for
AES-128-XTS, 64 for AES-256-XTS), and the tweak is the ``plain64`` IV: the sector number
relative to the start of the data area (plus the segment's ``iv_tweak``, 0 in practice) as a
little-endian 64-bit integer, zero-padded to the 16-byte AES block.

* :class:`DmCryptPayload` (production): ``cryptsetup open`` maps the container with dm-crypt,
  and the plaintext is read and written through ``/dev/mapper/NAME``; the kernel holds the key.
* :class:`UserspacePayload`: the same bytes, encrypted in this process with libcrypto's
  AES-XTS, read from and written to the file at the data offset.  For machines without
  device-mapper (containers, CI) and for tests; what it writes, dm-crypt reads, and back.

Both share one interface (:class:`Payload`): ``read(offset, length)``, ``write(offset, data)``,
``size``, ``close()`` and the context manager.  Offsets and lengths need not be sector-aligned:
partial sectors are read, modified and written back.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from ..errors import QubesSealError, UsageError
from ..secret import Secret
from . import cryptsetup
from .container import Container
from .xts import Xts

SUPPORTED_CIPHER = "aes-xts-plain64"
SECTOR = 512
_DM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,126}$")
_U64 = (1 << 64) - 1


class UnsupportedPayload(QubesSealError):
    """The data area uses a cipher or layout this reader does not implement."""


class DmCryptUnavailable(QubesSealError):
    """dm-crypt cannot map the container on this machine."""


class Payload(ABC):
    """The plaintext of the data area, ``size`` bytes, in ``sector_size`` units."""

    size: int
    sector_size: int = SECTOR

    @abstractmethod
    def _read_sectors(self, first: int, count: int) -> bytes: ...

    @abstractmethod
    def _write_sectors(self, first: int, data: bytes) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError(
                f"range [{offset}, {offset + length}) outside the data area of {self.size} bytes"
            )

    def read(self, offset: int, length: int) -> bytes:
        """``length`` plaintext bytes from ``offset`` of the data area."""
        self._check_range(offset, length)
        if length == 0:
            return b""
        ss = self.sector_size
        first = offset // ss
        last = (offset + length - 1) // ss
        data = self._read_sectors(first, last - first + 1)
        start = offset - first * ss
        return data[start : start + length]

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (partial sectors: read, modify, write)."""
        self._check_range(offset, len(data))
        if not data:
            return
        ss = self.sector_size
        first = offset // ss
        end = offset + len(data)
        last = (end - 1) // ss
        start = offset - first * ss
        if start or end % ss:
            buf = bytearray(self._read_sectors(first, last - first + 1))
            buf[start : start + len(data)] = data
            self._write_sectors(first, bytes(buf))
        else:
            self._write_sectors(first, bytes(data))

    def __enter__(self) -> Payload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _check_layout(container: Container) -> tuple[int, int, int, str]:
    """(data_offset, data_size, iv_tweak, cipher) of a data area we can decrypt."""
    header = container.header()
    if header.requirements:
        raise UnsupportedPayload(
            f"the LUKS2 container requires {', '.join(header.requirements)}: "
            "not readable in user space"
        )
    cipher = header.cipher
    if cipher != SUPPORTED_CIPHER:
        raise UnsupportedPayload(
            f"the data area uses {cipher}; the user-space reader implements "
            f"{SUPPORTED_CIPHER} only",
            hint="Open this container with dm-crypt (cryptsetup open).",
        )
    if header.sector_size != SECTOR:
        raise UnsupportedPayload(
            f"the data area uses {header.sector_size}-byte sectors; the user-space reader "
            f"implements {SECTOR}-byte sectors only"
        )
    size = header.data_size
    if size < 0 or size % SECTOR:
        raise UnsupportedPayload(f"the data area size {size} is not a whole number of sectors")
    return header.data_offset, size, header.iv_tweak, cipher


class UserspacePayload(Payload):
    """The data area decrypted in this process (libcrypto's AES-XTS, dm-crypt layout).

    Holds its own copy of ``volume_key``, wiped by :meth:`close`.  Writes are fsynced.
    """

    def __init__(self, container: Container, volume_key: Secret, *, writable: bool = True) -> None:
        self._offset, self.size, self._iv_tweak, _ = _check_layout(container)
        if len(volume_key) not in (32, 64):
            raise UnsupportedPayload(
                f"{SUPPORTED_CIPHER} needs a 32- or 64-byte volume key, not {len(volume_key)}"
            )
        key = volume_key.reveal()
        if key[: len(key) // 2] == key[len(key) // 2 :]:
            # OpenSSL refuses it, and so does the kernel's xts_verify_key in FIPS mode.
            raise UnsupportedPayload("the two halves of the XTS volume key are equal")
        self._key = Secret(key)
        self._writable = writable
        flags = (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC
        try:
            self._fd = os.open(container.path, flags)
        except OSError as exc:
            self._key.wipe()
            raise QubesSealError(f"cannot open {container.path}: {exc.strerror}") from exc

    def _iv(self, sector: int) -> bytes:
        """plain64: the sector number (plus the segment's IV tweak), little-endian, padded."""
        return ((sector + self._iv_tweak) & _U64).to_bytes(8, "little") + bytes(8)

    def _read_sectors(self, first: int, count: int) -> bytes:
        if self._fd < 0:
            raise ValueError("the payload is closed")
        n = count * SECTOR
        raw = os.pread(self._fd, n, self._offset + first * SECTOR)
        if len(raw) != n:
            raise QubesSealError("the container file is shorter than its data area")
        out = bytearray(n)
        with Xts(self._key.reveal(), encrypt=False) as xts:
            for i in range(count):
                xts.sector(raw[i * SECTOR : (i + 1) * SECTOR], self._iv(first + i), out, i * SECTOR)
        return bytes(out)

    def _write_sectors(self, first: int, data: bytes) -> None:
        if self._fd < 0:
            raise ValueError("the payload is closed")
        if not self._writable:
            raise UsageError("the payload was opened read-only")
        out = bytearray(len(data))
        with Xts(self._key.reveal(), encrypt=True) as xts:
            for i in range(len(data) // SECTOR):
                xts.sector(
                    data[i * SECTOR : (i + 1) * SECTOR], self._iv(first + i), out, i * SECTOR
                )
        try:
            written = os.pwrite(self._fd, out, self._offset + first * SECTOR)
            if written != len(out):
                raise OSError(0, "short write")
            os.fsync(self._fd)
        except OSError as exc:
            raise QubesSealError(f"cannot write the data area: {exc.strerror}") from exc

    def close(self) -> None:
        self._key.wipe()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)


def dm_crypt_available() -> tuple[bool, str]:
    """Whether dm-crypt can map a volume here, and why (not).

    Probes what ``cryptsetup open`` needs: the device-mapper control node
    ``/dev/mapper/control`` (a character device we can open read-write, which needs root and
    the dm_mod driver), and the ``crypt`` target (``dmsetup targets``, else the dm_crypt module
    in /sys/module or among the kernel's modules, which the kernel loads on demand).
    """
    control = Path("/dev/mapper/control")
    try:
        st = control.stat()
    except OSError:
        return False, (
            "no /dev/mapper/control: device-mapper is not available (dm_mod not loaded, or "
            "a container without device nodes)"
        )
    if not stat.S_ISCHR(st.st_mode):
        return False, "/dev/mapper/control is not a character device"
    try:
        fd = os.open(control, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        why = {
            errno.EACCES: "root is needed",
            errno.EPERM: "root is needed",
            errno.ENODEV: "no device-mapper driver behind it: dm_mod is not loaded, or this "
            "is a container without access to it",
            errno.ENXIO: "no device-mapper driver behind it",
        }.get(exc.errno or 0, "device-mapper is not usable")
        return False, f"cannot open /dev/mapper/control ({exc.strerror}): {why}"
    os.close(fd)
    if Path("/sys/module/dm_crypt").exists():
        return True, "device-mapper and the dm_crypt target are available"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["dmsetup", "targets"], capture_output=True, timeout=10, check=False
        ).stdout
        if any(line.split()[:1] == [b"crypt"] for line in out.splitlines()):
            return True, "device-mapper and the crypt target are available"
    release = os.uname().release
    modules = Path("/lib/modules") / release / "kernel/drivers/md"
    if any(modules.glob("dm-crypt.ko*")):
        return True, "device-mapper is available; the kernel loads dm_crypt on demand"
    return False, "device-mapper is available but the dm_crypt target is not"


class DmCryptPayload(Payload):
    """Production back-end: the container mapped by dm-crypt as ``/dev/mapper/NAME``.

    ``cryptsetup open --type luks2 --key-file=- PATH NAME`` (key on stdin); :meth:`close`
    closes the device node and runs ``cryptsetup close NAME``, on every path.
    """

    def __init__(
        self,
        container: Container,
        key: Secret,
        name: str,
        *,
        writable: bool = True,
        timeout: float = cryptsetup.DEFAULT_TIMEOUT,
    ) -> None:
        if not _DM_NAME.match(name):
            raise UsageError(f"invalid device-mapper name {name!r}")
        self.name = name
        self._timeout = timeout
        self._fd = -1
        self._mapped = False
        container.header()  # fail closed on a damaged header, as the user-space reader does
        options = ["--type=luks2", "--key-file=-", "--disable-external-tokens"]
        if not writable:
            options.append("--readonly")
        try:
            cryptsetup.run(
                ["open", str(container.path), name], options=options, key=key, timeout=timeout
            )
        except cryptsetup.WrongKey:
            raise
        except cryptsetup.CryptsetupError as exc:
            ok, reason = dm_crypt_available()
            raise DmCryptUnavailable(
                f"dm-crypt cannot map {container.path} as {name}: {exc.stderr or exc.message}",
                hint=("" if ok else f"{reason}. ")
                + "Use the user-space back-end (prefer='userspace') on machines without "
                "device-mapper.",
            ) from exc
        self._mapped = True
        try:
            device = Path("/dev/mapper") / name
            self._fd = os.open(device, (os.O_RDWR if writable else os.O_RDONLY) | os.O_CLOEXEC)
            self.size = os.lseek(self._fd, 0, os.SEEK_END)
        except BaseException:
            self.close()
            raise

    def _read_sectors(self, first: int, count: int) -> bytes:
        data = os.pread(self._fd, count * SECTOR, first * SECTOR)
        if len(data) != count * SECTOR:
            raise QubesSealError(f"short read from /dev/mapper/{self.name}")
        return data

    def _write_sectors(self, first: int, data: bytes) -> None:
        try:
            os.pwrite(self._fd, data, first * SECTOR)
            os.fsync(self._fd)
        except OSError as exc:
            raise QubesSealError(f"cannot write /dev/mapper/{self.name}: {exc.strerror}") from exc

    def close(self) -> None:
        try:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                os.close(fd)
        finally:
            if self._mapped:
                self._mapped = False
                cryptsetup.run(["close", self.name], timeout=self._timeout)


def open_payload(
    container: Container,
    *,
    key: Secret,
    volume_key_fn: Callable[[Secret], Secret] | None = None,
    prefer: Literal["auto", "dm-crypt", "userspace"] = "auto",
    name: str | None = None,
    writable: bool = True,
) -> Payload:
    """Open the data area with dm-crypt, or in user space.

    ``auto`` uses dm-crypt when :func:`dm_crypt_available` says so, user space otherwise.
    The user-space back-end gets the volume key from ``volume_key_fn(key)`` (default:
    :meth:`Container.volume_key`) and wipes the copy it was handed.  ``name`` is the
    device-mapper name (default ``qubes-seal-<first 8 characters of the UUID>``).
    """
    if prefer not in ("auto", "dm-crypt", "userspace"):
        raise UsageError(f"unknown payload back-end {prefer!r}")
    use_dm = prefer == "dm-crypt" or (prefer == "auto" and dm_crypt_available()[0])
    if use_dm:
        return DmCryptPayload(
            container, key, name or f"qubes-seal-{container.uuid[:8]}", writable=writable
        )
    fn = volume_key_fn or container.volume_key
    with fn(key) as volume_key:
        return UserspacePayload(container, volume_key, writable=writable)
