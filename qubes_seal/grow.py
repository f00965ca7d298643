"""Growing the container: a larger payload, and the keystore moved to its layout.

The keystore's two slots lie where the records say (:mod:`qubes_seal.keystore.geometry`),
so a container that grows without this operation is refused (exit 7). ``qubes-seal grow``
is the supported way, journalled like the rotations (op ``grow``)::

    step              what is on the payload afterwards
    begun             nothing changed yet
    intent-written    the old layout's records announce the target size (one or two writes,
                      until slot A holds the newest such record): the unlock accepts the
                      container at the old size and at the new one
    extended          (a file given --size) the file is at its new size
    slot-b-moved      the newest generation, new layout, at the new slot B
    slot-a-rewritten  the new layout in slot A too: done

Each step writes one slot whole and never the slot that holds the only copy of the newest
generation (:func:`~qubes_seal.keystore.slots.grow_step`), so at every step boundary, and
inside a torn write, the unlock finds every key.  The steps are decided from the payload
itself: an interrupted grow is finished by running ``qubes-seal grow`` again, or by
``qubes-seal repair`` (which needs this boot's hand-over of the volume key: the keystore
is rewritten, and the journal holds no secret).

A file is extended by this command (``--size``), only after the records accept the new
size.  A block device (a logical volume) is extended first by its own tool (``lvextend``);
until ``grow`` adopts the new size the unlock refuses it, so the volume key comes from this
boot's hand-over (extend while unlocked) or the recovery key.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import QubesSealError, UsageError
from .journal import Journal, crash_point
from .journal import read as read_journal
from .keystore.geometry import Geometry
from .secret import Secret

if TYPE_CHECKING:
    from .luks.container import Container

OP = "grow"
STEP_EXTENDED = "extended"


@dataclass
class GrowResult:
    before: Geometry
    after: Geometry
    steps: list[str] = field(default_factory=list)
    resumed: bool = False


def _quiet(_message: str) -> None:
    return None


def target_payload(path: Path, size_bytes: int | None) -> tuple[int, int | None]:
    """(the payload size to grow to, the file size to extend to or None) for ``size_bytes``:
    the container's new total size (a file only), or None to adopt its current size."""
    from .luks.container import Container

    header = Container(path).header()
    current = header.data_size
    if size_bytes is None:
        return current, None
    try:
        st = path.stat()
    except OSError as exc:
        raise QubesSealError(f"cannot inspect {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(
            f"{path} is not a regular file: qubes-seal does not resize devices",
            hint="Extend the logical volume (lvextend), then run 'qubes-seal grow' without "
            "--size to adopt its new size.",
        )
    if size_bytes % 512 or size_bytes <= header.data_offset:
        raise UsageError(
            f"the new size must be a multiple of 512 bytes, larger than the header region "
            f"({header.data_offset} bytes)"
        )
    if size_bytes < st.st_size:
        raise UsageError(
            f"{path} is already {st.st_size} bytes: shrinking is not supported",
            hint="Give a larger --size, or none to adopt the current size.",
        )
    return size_bytes - header.data_offset, size_bytes


def _extend(path: Path, file_size: int) -> None:
    """Extend the file to ``file_size`` bytes (never shorten it), durably."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size < file_size:
                os.ftruncate(fd, file_size)
                os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise QubesSealError(f"cannot extend {path}: {exc.strerror}") from exc


def _pending(state_dir: Path, path: Path) -> Journal | None:
    """The journal of an interrupted grow of ``path``, or None when none is pending.

    Another pending operation is left for :meth:`Journal.begin` to refuse."""
    doc = read_journal(state_dir)
    if doc is None or doc.get("op") != OP:
        return None
    if Path(doc["container"]).resolve() != path.resolve():
        return None
    return Journal.resume(state_dir)


def grow(
    path: Path,
    *,
    volume_key: Secret,
    state_dir: Path,
    size_bytes: int | None = None,
    progress: Callable[[str], None] = _quiet,
) -> GrowResult:
    """Grow the container at ``path`` (to ``size_bytes``, a file) or adopt its current size.

    Resumes an interrupted grow of the same container (its journal names the target; a
    different ``size_bytes`` is refused).  ``volume_key`` is not wiped.
    """
    from .luks.container import Container

    path = Path(path)
    journal = _pending(state_dir, path)
    if journal is not None:
        target = int(journal.data["target_payload"])
        file_size = journal.data.get("file_size")
        if size_bytes is not None and size_bytes != file_size:
            raise UsageError(
                f"an interrupted grow of {path} to a {target}-byte payload is pending",
                hint="Run 'qubes-seal grow' without --size (or 'qubes-seal repair') to "
                "finish it first.",
            )
        result = _run(Container(path), volume_key, journal, target, file_size, progress)
        result.resumed = True
    else:
        target, file_size = target_payload(path, size_bytes)
        container = Container(path)
        _check(container, volume_key, target)
        journal = Journal.begin(
            state_dir, OP, path, uuid=container.uuid, target_payload=target, file_size=file_size
        )
        crash_point("begun")
        try:
            result = _run(container, volume_key, journal, target, file_size, progress)
        except BaseException:
            if journal.step == "begun":
                journal.finish()  # a clean error before any write: nothing to repair
            raise
    journal.finish()
    return result


def _check(container: Container, volume_key: Secret, target: int) -> None:
    """Refuse, before any journal, what ``grow_step`` would refuse (a shrunk container, a
    smaller target, an inconsistent old layout)."""
    from .keystore import hmac_key_from_volume_key
    from .keystore.slots import check_growable
    from .luks.payload import UserspacePayload

    with (
        hmac_key_from_volume_key(volume_key) as hkey,
        UserspacePayload(container, volume_key, writable=False) as payload,
    ):
        check_growable(payload, hkey, target)


def _run(
    container: Container,
    volume_key: Secret,
    journal: Journal,
    target: int,
    file_size: int | None,
    progress: Callable[[str], None],
) -> GrowResult:
    from .keystore import hmac_key_from_volume_key, recorded_geometry
    from .keystore.slots import STEP_NEEDS_SPACE, grow_step
    from .luks.payload import UserspacePayload

    steps: list[str] = []
    with hmac_key_from_volume_key(volume_key) as hkey:
        with UserspacePayload(container, volume_key, writable=False) as payload:
            before = recorded_geometry(payload, hkey)
        for _ in range(16):  # at most 6 steps from any state: a loop would be a bug
            with UserspacePayload(container, volume_key) as payload:
                step = grow_step(payload, hkey, target)
            if step is None:
                break
            if step == STEP_NEEDS_SPACE:
                if file_size is None:
                    raise UsageError(
                        f"the container's payload is smaller than the {target} bytes this grow "
                        "moves the keystore to",
                        hint="Extend the logical volume to the size it had, then run "
                        "'qubes-seal grow' again.",
                    )
                progress(f"extending {container.path} to {file_size} bytes")
                _extend(container.path, file_size)
                step = STEP_EXTENDED
            else:
                progress(f"keystore: {step}")
            steps.append(step)
            journal.mark(step)
        else:
            raise QubesSealError("the keystore grow did not settle")
        with UserspacePayload(container, volume_key, writable=False) as payload:
            after = recorded_geometry(payload, hkey)
    return GrowResult(before, after, steps)


def repair_grow(journal: Journal, *, tcti: str | None) -> tuple[str, list[str]]:
    """``repair`` of an interrupted grow: finished through this boot's hand-over.

    Without a hand-over nothing is done and the journal stays (:class:`UsageError`): the
    keystore stays readable, so an unlock gives one."""
    from . import handover
    from .luks.container import Container

    del tcti
    path = Path(journal.doc["container"])
    container = Container(path)
    if container.uuid != journal.data.get("uuid"):
        raise UsageError(f"{path} is not the container of the interrupted grow")
    vk = handover.get(container.uuid, keyring="user")
    if vk is None:
        raise UsageError(
            "finishing the interrupted grow rewrites the keystore: it needs this boot's "
            "unlock of the container",
            hint="Run 'qubes-seal unlock' (the keystore is readable meanwhile), then "
            "'qubes-seal repair' again.",
        )
    with vk:
        target = int(journal.data["target_payload"])
        result = _run(container, vk, journal, target, journal.data.get("file_size"), _quiet)
    return "completed", [f"the keystore now uses {result.after.describe()}"]
