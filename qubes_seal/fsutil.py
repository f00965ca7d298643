"""Files that hold sealed blobs and state: private directories, atomic writes."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import QubesSealError


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and parents) if needed and make it mode 0700."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as exc:
        raise QubesSealError(
            f"cannot create the state directory {path}: {exc.strerror}",
            hint="Run as root, or choose another directory with --state-dir.",
        ) from exc


def atomic_write(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync of the directory.

    A crash leaves either the old file or the new one, never a mix.  The file is created with
    ``mode`` from the start, so its content is never readable by others, even for a moment.
    """
    directory = path.parent
    ensure_private_dir(directory)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise QubesSealError(f"cannot write {path}: {exc.strerror}") from exc
    dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
