"""Files that hold sealed blobs and state: a checked private directory, atomic writes, new
files that are never a planted link, and memory-only copies of LUKS headers.

The state directory decides what root does: ``repair`` acts on the journal found there, and
a rotation writes next to it.  So it is trusted only when nobody but root (the effective uid)
can have put anything in it, the way OpenSSH's StrictModes trusts ``~/.ssh``
(:func:`check_private_dir`):

* the directory itself is owned by the effective uid and not writable by its group or by
  others (its mode is then set to 0700);
* every directory above it, and every symbolic link on the way, is owned by root or by the
  effective uid; a directory above it is not writable by group or others unless it is
  sticky (``/tmp``: nobody may rename or remove another's entry there).

Anything else is refused (:class:`UnsafeDirectory`, exit 7) before a file in it is read.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import CorruptState, QubesSealError, UsageError

#: Symbolic links followed while checking one path (Linux's own limit is 40).
MAX_SYMLINKS = 40


class UnsafeDirectory(CorruptState):
    """A state directory (or a directory above it) that someone else could write to."""


def _owner_hint(path: Path, *, parent: bool) -> str:
    who = "root:root" if os.geteuid() == 0 else f"{os.geteuid()}:{os.getegid()}"
    if parent:
        return f"Fix it (as root): chown {who} {path}; chmod go-w {path}"
    return f"Fix it (as root): chown {who} {path}; chmod 0700 {path}"


def _refuse(path: Path, why: str, *, target: Path) -> UnsafeDirectory:
    """Refuse the state directory ``target`` because of ``path`` (itself or above it)."""
    what = "it" if path == target else f"{path} (above it)"
    return UnsafeDirectory(
        f"refusing the state directory {target}: {what} {why}",
        hint=_owner_hint(path, parent=path != target)
        + " (another user could plant files there that root would act on).",
    )


def _check_ancestor(path: Path, st: os.stat_result, target: Path) -> None:
    euid = os.geteuid()
    if st.st_uid not in (0, euid):
        raise _refuse(path, f"is owned by uid {st.st_uid}", target=target)
    if stat.S_ISLNK(st.st_mode):
        return  # a link's own mode means nothing; its target is checked next
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise _refuse(
            path, f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o}, not sticky)",
            target=target,
        )  # fmt: skip


def _resolve_checked(path: Path) -> Path:
    """``path`` made absolute with every symbolic link resolved, each directory traversed and
    each link followed checked as an ancestor (:func:`_check_ancestor`)."""
    target = path
    todo = list(Path(os.path.abspath(path)).parts[1:])
    current = Path("/")
    _check_ancestor(current, os.lstat(current), target)
    links = 0
    while todo:
        name = todo.pop(0)
        if name in ("", "."):
            continue
        if name == "..":
            current = current.parent
            continue
        candidate = current / name
        try:
            st = os.lstat(candidate)
        except FileNotFoundError:
            return Path(current, name, *todo)  # the rest does not exist yet
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_SYMLINKS:
                raise UnsafeDirectory(f"too many symbolic links in {path}")
            _check_ancestor(candidate, st, target)
            link = os.readlink(candidate)
            if link.startswith("/"):
                current = Path("/")
            todo = [p for p in Path(link).parts if p != "/"] + todo
            continue
        if todo:  # a directory above the state directory
            _check_ancestor(candidate, st, target)
        current = candidate
    return current


def check_private_dir(path: Path, *, create: bool = False) -> Path | None:
    """Check (with ``create``: make, then check) the private directory ``path``; its resolved
    path, or None when it does not exist (and ``create`` is false).

    Refused (:class:`UnsafeDirectory`): the directory is not owned by the effective uid, is
    writable by group or others, is not a directory, or a directory or link above it fails
    :func:`_check_ancestor`.  A private directory that is merely readable by others is made
    0700 (it is ours).
    """
    path = Path(path)
    if create:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise QubesSealError(
                f"cannot create the state directory {path}: {exc.strerror}",
                hint="Run as root, or choose another directory with --state-dir.",
            ) from exc
    try:
        real = _resolve_checked(path)
        st = os.lstat(real)
    except FileNotFoundError:
        return None
    except OSError as exc:  # a file where a directory should be, a directory we may not read
        raise UnsafeDirectory(
            f"cannot check the state directory {path}: {exc.strerror}",
            hint="Choose another directory with --state-dir.",
        ) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"the state directory {path} is not a directory")
    if st.st_uid != os.geteuid():
        raise _refuse(
            path, f"is owned by uid {st.st_uid}, not by uid {os.geteuid()} (this process)",
            target=path,
        )  # fmt: skip
    if st.st_mode & 0o022:
        raise _refuse(
            path, f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})",
            target=path,
        )  # fmt: skip
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(real, 0o700)
    return real


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) if needed, check it (:func:`check_private_dir`)."""
    real = check_private_dir(path, create=True)
    assert real is not None
    return real


def _open_dir(directory: Path) -> int:
    return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)


def fsync_dir(directory: Path) -> None:
    dfd = _open_dir(directory)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600, private_dir: bool = True) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync of the directory.

    ``path``'s directory is a checked private directory (:func:`ensure_private_dir`), or,
    with ``private_dir=False`` (a directory the user named, for a file that is not secret:
    the captured TXT event log), an existing directory used as it is.  The
    temporary file is new (``O_EXCL|O_NOFOLLOW``, a random name, ``mode`` from the start) and
    every step names it relative to the directory opened once: a planted link is neither
    followed nor written through.  A crash leaves either the old file or the new one.
    """
    if private_dir:
        directory = ensure_private_dir(path.parent)
    else:
        directory = Path(os.path.realpath(path.parent))
    try:
        dfd = _open_dir(directory)
    except OSError as exc:
        raise QubesSealError(f"cannot write {path}: {directory}: {exc.strerror}") from exc
    try:
        tmp = f".{path.name}.{secrets.token_hex(8)}.tmp"
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                mode, dir_fd=dfd,
            )  # fmt: skip
        except OSError as exc:
            raise QubesSealError(f"cannot write {path}: {exc.strerror}") from exc
        try:
            os.fchmod(fd, mode)  # the umask does not narrow it
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dfd)
            raise QubesSealError(f"cannot write {path}: {exc.strerror}") from exc
        os.fsync(dfd)
    finally:
        os.close(dfd)


# -- files that must be new (recovery key files) and the proof that we made them ------------


@dataclass(frozen=True)
class FileProof:
    """What shows that a file is the one qubes-seal created: its device and inode, and a
    SHA-256 of its content (a file root made, mode 0600: only root could have read it)."""

    dev: int
    ino: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"dev": self.dev, "ino": self.ino, "sha256": self.sha256}


def content_digest(data: bytes | bytearray) -> str:
    """The digest a journal records for a file's content, before the file is written (for a
    recovery key: 192 random bits, so the digest tells nothing about it)."""
    h = hashlib.sha256(b"qubes-seal file\0")
    h.update(data)
    return h.hexdigest()


def write_new_file(path: Path, data: bytes | bytearray, *, mode: int = 0o600) -> FileProof:
    """Create ``path`` (never an existing file, never through a symbolic link: ``O_EXCL|
    O_NOFOLLOW``) with ``mode`` from the start, write ``data``, fsync it and its directory.

    The directory is the user's: its mode and owner are left alone.
    """
    path = Path(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, mode)
    except FileExistsError:
        raise UsageError(
            f"{path} exists (or is a symbolic link): refusing to overwrite it",
            hint="Name a new file, or remove the old one first if it is yours.",
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot create {path}: {exc.strerror}") from exc
    try:
        os.fchmod(fd, mode)
        st = os.fstat(fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except OSError as exc:
        raise QubesSealError(f"cannot write {path}: {exc.strerror}") from exc
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        fsync_dir(path.parent)
    return FileProof(st.st_dev, st.st_ino, content_digest(data))


def remove_if_ours(path: Path, *, sha256: str | None, max_size: int = 4096) -> str | None:
    """Remove ``path`` only if it is the file a journal recorded: a regular file (not a
    link), owned by the effective uid, with one name, mode 0600, at most ``max_size`` bytes,
    whose content has the digest ``sha256``.  None when removed (or already absent);
    otherwise why it was left."""
    if sha256 is None:
        return "the journal does not prove that qubes-seal created it"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        return f"it cannot be opened without following a link ({exc.strerror})"
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return "it is not a regular file"
        if st.st_uid != os.geteuid() or st.st_nlink != 1 or stat.S_IMODE(st.st_mode) != 0o600:
            return "its owner, mode or link count is not the one qubes-seal gave it"
        if st.st_size > max_size:
            return "it is larger than the file qubes-seal wrote"
        data = os.pread(fd, max_size + 1, 0)
    finally:
        os.close(fd)
    if not secrets.compare_digest(content_digest(data), sha256):
        return "its content is not what qubes-seal wrote"
    after = os.lstat(path)
    if (after.st_dev, after.st_ino) != (st.st_dev, st.st_ino):
        return "it was replaced while being checked"
    os.unlink(path)
    return None


def same_file(path: Path, dev: Any, ino: Any) -> bool:
    """``path`` (not followed) is the regular file with device ``dev`` and inode ``ino``,
    owned by the effective uid and with one name."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (
        stat.S_ISREG(st.st_mode)
        and (st.st_dev, st.st_ino) == (dev, ino)
        and st.st_uid == os.geteuid()
        and st.st_nlink == 1
    )


def _key_file_content(key: Any) -> bytearray:
    content = bytearray(key.reveal())
    content += b"\n"
    return content


def key_file_digest(key: Any) -> str:
    """The digest of the recovery key file :func:`write_key_file` writes for ``key`` (a
    :class:`~qubes_seal.secret.Secret`): a journal records it before the file exists."""
    content = _key_file_content(key)
    try:
        return content_digest(content)
    finally:
        content[:] = bytes(len(content))


def write_key_file(path: Path, key: Any) -> FileProof:
    """Write a recovery key to a new file, mode 0600 (:func:`write_new_file`: an existing
    file or a symbolic link is refused; the directory is left as it is)."""
    content = _key_file_content(key)
    try:
        return write_new_file(path, content)
    finally:
        content[:] = bytes(len(content))


def refuse_existing(path: Path) -> None:
    """Refuse early (before anything is created) a key file path that exists or is a link."""
    if os.path.lexists(path):
        raise UsageError(
            f"{path} exists (or is a symbolic link): refusing to overwrite it",
            hint="Name a new file, or remove the old one first if it is yours.",
        )


# -- LUKS header copies in memory ---------------------------------------------------------


class MemoryFile:
    """An anonymous file in RAM (``memfd_create``) that cryptsetup reaches as
    ``/proc/PID/fd/N``: a LUKS header copy with an old keyslot never reaches a disk.

    Closing it overwrites its content with zeros first.  A process that dies loses it with
    its memory (nothing on disk to clean up).  Like any memory of the process, it could be
    swapped out.
    """

    def __init__(self, name: str, data: bytes = b"") -> None:
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        self.path = Path(f"/proc/{os.getpid()}/fd/{self.fd}")
        if data:
            self.write(data)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        offset = 0
        while offset < len(view):
            offset += os.pwrite(self.fd, view[offset:], offset)

    def read(self) -> bytes:
        size = os.fstat(self.fd).st_size
        return os.pread(self.fd, size, 0)

    def close(self) -> None:
        if self.fd < 0:
            return
        try:
            size = os.fstat(self.fd).st_size
            zeros = bytes(1 << 20)
            for offset in range(0, size, len(zeros)):
                os.pwrite(self.fd, zeros[: size - offset], offset)
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> MemoryFile:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
