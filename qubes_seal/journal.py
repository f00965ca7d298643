"""The journal of a multi-step operation: what was started, which steps are done.

One file, ``journal.json`` in the state directory (mode 0600, written atomically: a crash
leaves the previous record or the new one, never a mix).  One record at a time: a second
multi-step operation is refused while a record exists (``qubes-seal repair`` first).

A record holds no secret.  Whatever a crash must not lose (a new keyslot, a new recovery
key) is already in the container before the journal says the step is done; the journal only
names what exists (keyslot numbers, the public token, files), so that ``repair`` can roll the
operation forward or back without asking anything it cannot check.

The record is read only from a checked state directory (owned by the effective uid, nobody
else can write to it or above it: :func:`qubes_seal.fsutil.check_private_dir`).  Even so,
``repair`` removes only what the record *proves* the operation created: a file by its
device, inode and content digest, a container by its LUKS2 UUID and inode, a keyslot by its
KDF salt (see :mod:`qubes_seal.rotate`); anything else is left, and ``repair`` says so.

Fault injection (a test hook): ``QUBES_SEAL_CRASH_AT=STEP`` makes the process kill itself
with SIGKILL at the step boundary named ``STEP`` (:func:`crash_point`), as a power cut would
stop it.  Nothing secret is involved: in production the variable is unset and the hook does
nothing.
"""

from __future__ import annotations

import json
import os
import signal
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import CorruptState, UsageError
from .fsutil import atomic_write, check_private_dir, fsync_dir

JOURNAL_NAME = "journal.json"
FORMAT = "qubes-seal/journal"
VERSION = 1
CRASH_ENV = "QUBES_SEAL_CRASH_AT"


def crash_point(step: str) -> None:
    """Test hook: SIGKILL this process if ``QUBES_SEAL_CRASH_AT`` names ``step``."""
    if os.environ.get(CRASH_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def journal_path(state_dir: Path) -> Path:
    return Path(state_dir) / JOURNAL_NAME


def read(state_dir: Path) -> dict[str, Any] | None:
    """The interrupted operation's record, or None when there is none (nor a state
    directory).  A state directory others could write to is refused first."""
    if check_private_dir(Path(state_dir)) is None:
        return None
    path = journal_path(state_dir)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise CorruptState(f"cannot read the journal {path}: {exc.strerror}") from exc
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptState(
            f"the journal {path} is not valid JSON",
            hint="It is written atomically; a damaged one was edited. Inspect it, then "
            "remove it and check 'qubes-seal status'.",
        ) from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise CorruptState(f"the journal {path} is not a {FORMAT} v{VERSION} record")
    return doc


class Journal:
    """The record of one running operation; every change is written before it returns."""

    def __init__(self, state_dir: Path, doc: dict[str, Any]) -> None:
        self.state_dir = Path(state_dir)
        self.doc = doc

    @classmethod
    def begin(cls, state_dir: Path, op: str, container: Path, **data: Any) -> Journal:
        """Start a record for ``op``; refused while another operation's record exists."""
        existing = read(state_dir)
        if existing is not None:
            raise UsageError(
                f"an interrupted operation is pending: {existing.get('op')} "
                f"(step {existing.get('step')})",
                hint="Run 'qubes-seal repair' to complete it or roll it back first.",
            )
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "op": op,
            "container": str(container),
            "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "pid": os.getpid(),
            "step": "begun",
            "done": ["begun"],
            "data": data,
        }
        j = cls(state_dir, doc)
        j._write()
        return j

    @classmethod
    def resume(cls, state_dir: Path) -> Journal | None:
        doc = read(state_dir)
        return None if doc is None else cls(state_dir, doc)

    @property
    def op(self) -> str:
        return str(self.doc["op"])

    @property
    def step(self) -> str:
        return str(self.doc["step"])

    @property
    def data(self) -> dict[str, Any]:
        d: dict[str, Any] = self.doc["data"]
        return d

    def did(self, step: str) -> bool:
        return step in self.doc["done"]

    def mark(self, step: str, **data: Any) -> None:
        """Record ``step`` as done (with public ``data``), then pass its crash point."""
        self.doc["step"] = step
        if step not in self.doc["done"]:
            self.doc["done"].append(step)
        self.data.update(data)
        self._write()
        crash_point(step)

    def finish(self) -> None:
        """The operation is complete (or rolled back): remove the record."""
        real = check_private_dir(self.state_dir)
        if real is None:
            return
        journal_path(real).unlink(missing_ok=True)
        fsync_dir(real)

    def _write(self) -> None:
        data = json.dumps(self.doc, indent=2, sort_keys=True).encode("utf-8") + b"\n"
        atomic_write(journal_path(self.state_dir), data, mode=0o600)


def summary(state_dir: Path) -> tuple[dict[str, Any] | None, str]:
    """For ``status``: the pending record's public view and one line of text."""
    try:
        doc = read(state_dir)
    except CorruptState as exc:
        return {"error": exc.message}, f"journal:         DAMAGED ({exc.message})"
    if doc is None:
        return None, "journal:         no interrupted operation"
    view = {k: doc.get(k) for k in ("op", "container", "started", "step", "done")}
    return view, (
        f"journal:         INTERRUPTED {doc.get('op')} of {doc.get('container')} "
        f"(started {doc.get('started')}, last step {doc.get('step')}): run 'qubes-seal repair'"
    )
