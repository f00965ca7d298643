"""Two slots on the container's payload, so that a torn write never loses the keystore.

::

    payload (a multiple of 512 bytes, recorded in every record: see :mod:`.geometry`)
    +-----------------------------+-----------------------------+----------+
    | slot A: offset 0            | slot B: offset slot_size    | (unused) |
    | record, zero padding        | record, zero padding        |          |
    +-----------------------------+-----------------------------+----------+

:func:`store` writes generation n+1 into the slot that does *not* hold the newest valid
generation n, so a write torn by a crash or power loss leaves generation n intact in the
other slot; :func:`load` returns the valid slot with the highest generation.  A slot is
valid when its record authenticates (HMAC-SHA256, see :mod:`.codec`): any torn or modified
record fails, since the HMAC covers every byte of it.  Slots are written whole, with zero
padding, so no old key survives in the slack after a record that shrank.

**Finding the slots.**  Slot A is at offset 0.  Slot B is where slot A's record says it is
(its :class:`~.geometry.Geometry`, and during a grow also the target layout's slot B); when
slot A does not authenticate (a torn write), where the payload's current size puts it.  A
record counts only at an offset its own geometry names.  The newest record's geometry must
then match the payload's size (or its grow target): a container grown or shrunk without
``qubes-seal grow`` is refused (:class:`ContainerResized`, exit 7) before anything is read
out or written, never read through a layout that would miss the newest copy.

**Records from before the geometry** (format version 1, :mod:`.codec`) are found where they
always were (slot B at half the current size), and accepted only when that layout is
self-consistent: the other slot holds a record too (valid, or torn: it has the magic).  A
slot B that holds no record at all is what a resize leaves behind (the real one lies
elsewhere), so it is refused like a resize.  The first :func:`store` writes version 2
records with the current layout: the container is migrated by its next write.

**Growing** (:func:`grow_step`, driven by :mod:`qubes_seal.grow` with its journal): the
records first announce the target size (``grow_to``) in both slots of the old layout, then
the device grows, then slot B is written at its new offset (the new layout), then slot A.
At every step the newest generation is complete in a slot the reader finds, and the payload
size is one the newest record accepts.

A payload with no valid slot is an error (:class:`CorruptState`), never an empty keystore:
an empty keystore exists only after :func:`initialise`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..errors import CorruptState, QubesSealError, UsageError
from ..secret import Secret
from .codec import HEADER_SIZE, MAGIC, decode_record, encode, record_length
from .errors import ContainerResized, GrowInterrupted, KeystoreFull, StaleKeystore
from .geometry import SECTOR, Geometry, check_payload_size
from .model import Keystore

SLOT_NAMES = ("A", "B")
GROW_HINT = (
    "Grow the container with 'qubes-seal grow --size SIZE' (a file), or extend the logical "
    "volume and run 'qubes-seal grow' (docs/OPERATIONS.md, 'Growing the container'); or "
    "remove unused keys."
)


class Payload(Protocol):
    """A fixed-size byte area, read and written in whole 512-byte sectors.

    It may be a dm-crypt mapping or a user-space AES-XTS file: the keystore does not care.
    ``write`` must be durable when it returns (the implementation syncs).
    """

    @property
    def size(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes: ...

    def write(self, offset: int, data: bytes) -> None: ...


@dataclass(frozen=True)
class SlotStatus:
    """What one slot holds: its generation if valid, otherwise why not (no secret)."""

    slot: str
    offset: int
    generation: int | None
    problem: str
    has_magic: bool

    @property
    def valid(self) -> bool:
        return self.generation is not None


@dataclass
class _Found:
    """One slot as read: its status and, when valid, its keystore and recorded geometry."""

    index: int
    status: SlotStatus
    ks: Keystore | None = field(default=None, repr=False)
    geometry: Geometry | None = None

    @property
    def generation(self) -> int:
        return self.status.generation or 0


@dataclass
class _Scan:
    """Every slot the reader looked at (by offset), and the newest valid one."""

    size: int
    slots: dict[int, _Found]
    newest: _Found
    geometry: Geometry  # the newest record's (for a version 1 record: the current layout)

    def at(self, offset: int) -> _Found | None:
        return self.slots.get(offset)

    def wipe(self, *, keep: Keystore | None = None) -> None:
        for found in self.slots.values():
            if found.ks is not None and found.ks is not keep:
                found.ks.wipe()


def _round_up(length: int) -> int:
    return -(-length // SECTOR) * SECTOR


def _read(payload: Payload, offset: int, length: int) -> bytes:
    data = payload.read(offset, length)
    if len(data) != length:
        raise QubesSealError(
            f"short read from the keystore payload: {len(data)} of {length} bytes at {offset}"
        )
    return data


def _legacy_b(size: int) -> int:
    """Slot B of a version 1 record: half the current payload (0 when there is no layout)."""
    return size // 2 if size >= 2 * SECTOR and size % (2 * SECTOR) == 0 else 0


def _read_slot(payload: Payload, offset: int, hmac_key: Secret) -> _Found:
    index = 0 if offset == 0 else 1
    name = SLOT_NAMES[index]
    size = payload.size
    if offset + SECTOR > size:
        status = SlotStatus(name, offset, None, "beyond the end of the payload", False)
        return _Found(index, status)
    first = _read(payload, offset, SECTOR)
    has_magic = first[: len(MAGIC)] == MAGIC
    try:
        length = record_length(first[:HEADER_SIZE])
        if length > size - offset:
            raise CorruptState(f"record length {length} runs past the end of the payload")
        data = first if length <= SECTOR else _read(payload, offset, _round_up(length))
        ks, geometry = decode_record(data[:length], hmac_key)
    except CorruptState as exc:
        return _Found(index, SlotStatus(name, offset, None, exc.message, has_magic))
    problem = ""
    if geometry is not None:
        if geometry.offset(index) != offset:
            problem = f"a record of a layout with slot {name} at {geometry.offset(index)}"
        elif length > geometry.slot_size:
            problem = f"record length {length} exceeds the slot size {geometry.slot_size}"
    elif index == 1 and offset != _legacy_b(size):
        problem = "a version 1 record away from half the payload"
    elif length > (_legacy_b(size) or size):
        problem = f"record length {length} exceeds the slot size {_legacy_b(size)}"
    if problem:
        ks.wipe()
        return _Found(index, SlotStatus(name, offset, None, problem, has_magic))
    return _Found(index, SlotStatus(name, offset, ks.generation, "", has_magic), ks, geometry)


def _candidates_b(a: _Found, size: int) -> list[int]:
    """Where slot B may be: named by slot A's authenticated record, else by the size."""
    if a.ks is not None and a.geometry is not None:
        found = [a.geometry.slot_b]
        if a.geometry.grow_to:
            found.append(Geometry.for_size(a.geometry.grow_to).slot_b)
        return found
    if size >= 2 * SECTOR:
        return [size // (2 * SECTOR) * SECTOR]
    return []


def _scan(payload: Payload, hmac_key: Secret) -> _Scan:
    """Read slot A and every place slot B may be; the newest valid record and its layout.

    Raises :class:`CorruptState` when no slot is valid.  Checks nothing about the size: see
    :func:`_accepted`.
    """
    size = payload.size
    a = _read_slot(payload, 0, hmac_key)
    slots = {0: a}
    for offset in _candidates_b(a, size):
        if offset not in slots:
            slots[offset] = _read_slot(payload, offset, hmac_key)
    valid = [f for f in slots.values() if f.ks is not None]
    if not valid:
        statuses = [f.status for f in slots.values()]
        if len(statuses) < 2:
            statuses.append(SlotStatus("B", 0, None, "no layout for this payload size", False))
        if not any(s.has_magic for s in statuses):
            raise CorruptState(
                "the keystore is not initialised: neither slot holds a keystore record",
                hint="If this container is new, initialise its keystore first. If it was "
                "resized, restore its size.",
            )
        details = "; ".join(f"slot {s.slot}: {s.problem}" for s in statuses)
        raise CorruptState(
            f"no valid keystore slot ({details})",
            hint=(
                "Both copies of the keystore fail authentication: the container was "
                "modified or damaged, resized, or opened with the wrong key. Restore its "
                "size if it was changed, else restore the keystore from a backup."
            ),
        )
    newest = max(valid, key=lambda f: (f.generation, -f.index))
    if newest.geometry is not None:
        geometry = newest.geometry
    else:
        try:
            geometry = Geometry.for_size(size)
        except UsageError:
            geometry = Geometry(size, 0, 0, 0)  # no layout: refused by _accepted
    return _Scan(size, slots, newest, geometry)


def _resized(scan: _Scan) -> ContainerResized:
    g = scan.geometry
    if scan.size > g.payload_size:
        change = f"grew to {scan.size} bytes"
        hint = (
            "The container (file or logical volume) was grown without 'qubes-seal grow'. "
            "Run 'qubes-seal grow' to adopt the new size (it moves the keystore's second "
            "slot); until then nothing is read or written."
        )
    else:
        change = f"shrank to {scan.size} bytes"
        hint = (
            f"The container was shrunk: restore its size (a payload of {g.payload_size} "
            "bytes) before anything else; no key was written since. Shrinking is not "
            "supported."
        )
    return ContainerResized(
        f"the keystore was laid out for {g.describe()}, but the container's payload "
        f"{change}: refused, so that no copy of the keystore is missed",
        hint=hint,
    )


def _accepted(scan: _Scan) -> _Scan:
    """``scan`` if its payload size is the one its newest record accepts, else refused."""
    newest = scan.newest
    if newest.geometry is not None:
        if not newest.geometry.accepts(scan.size):
            scan.wipe()
            raise _resized(scan)
        return scan
    # A version 1 record: its layout is the current size's; self-consistent, or refused.
    size = scan.size
    other = scan.at(0 if newest.index == 1 else _legacy_b(size))
    if _legacy_b(size) == 0 or other is None or not other.status.has_magic:
        scan.wipe()
        raise ContainerResized(
            f"the keystore (written before its layout was recorded) has no second slot "
            f"where a {size}-byte payload puts it: the container was probably resized, "
            "refused so that no copy of the keystore is missed",
            hint="Restore the container's former size; then 'qubes-seal grow' can change it "
            "safely.",
        )
    return scan


def slot_status(payload: Payload, hmac_key: Secret) -> list[SlotStatus]:
    """The state of slot A and of slot B where the layout puts it, for diagnostics."""
    size = payload.size
    a = _read_slot(payload, 0, hmac_key)
    offsets = _candidates_b(a, size)
    b = (
        _read_slot(payload, offsets[0], hmac_key)
        if offsets
        else _Found(1, SlotStatus("B", 0, None, "no layout for this payload size", False))
    )
    for found in (a, b):
        if found.ks is not None:
            found.ks.wipe()
    return [a.status, b.status]


def load(payload: Payload, hmac_key: Secret) -> Keystore:
    """The keystore in the valid slot with the highest generation.

    Raises :class:`CorruptState` when neither slot is valid (including a payload that was
    never initialised), and :class:`ContainerResized` (a ``CorruptState``) when the payload
    is not the size the newest record was laid out for.  The other slot (an older
    generation, or a torn write) is ignored; :func:`slot_status` reports it.
    """
    scan = _accepted(_scan(payload, hmac_key))
    chosen = scan.newest.ks
    assert chosen is not None
    scan.wipe(keep=chosen)
    return chosen


def recorded_geometry(payload: Payload, hmac_key: Secret) -> Geometry:
    """The layout the newest record names (its current size's, for a version 1 record)."""
    scan = _scan(payload, hmac_key)
    scan.wipe()
    return scan.geometry


def _write_slot(payload: Payload, offset: int, slot_size: int, record: bytes) -> None:
    buf = bytearray(slot_size)
    buf[: len(record)] = record
    try:
        payload.write(offset, bytes(buf))
    finally:
        buf[:] = bytes(slot_size)


def _record(ks: Keystore, hmac_key: Secret, generation: int, geometry: Geometry) -> bytes:
    record = encode(ks, hmac_key, generation=generation, geometry=geometry)
    if len(record) > geometry.slot_size:
        raise KeystoreFull(
            f"the keystore needs {len(record)} bytes but a slot holds {geometry.slot_size} "
            f"(payload of {geometry.payload_size} bytes, {len(ks.domains)} domains)",
            hint=GROW_HINT,
        )
    return record


def store(
    payload: Payload, ks: Keystore, hmac_key: Secret, *, erase_previous: bool | None = None
) -> None:
    """Write ``ks`` as generation ``ks.generation + 1``; on success raise ``ks.generation``.

    The new record goes into the slot that does not hold the newest valid generation on
    the payload, which must be ``ks.generation`` (else :class:`StaleKeystore`: someone wrote
    in between, and nothing is written).  With ``erase_previous`` the other slot is then
    overwritten too (one more generation), so that the previous generation, and any key it
    held that ``ks`` no longer holds, is gone from the payload.  By default this happens
    when a key was removed from ``ks`` since it was loaded or stored.  Raises
    :class:`KeystoreFull` when the record does not fit in a slot, :class:`ContainerResized`
    when the payload is not the size the keystore was laid out for, and
    :class:`GrowInterrupted` during an unfinished grow: in each case nothing is written.
    """
    scan = _accepted(_scan(payload, hmac_key))
    newest = scan.newest
    on_disk_generation = newest.generation
    scan.wipe()
    if scan.geometry.grow_to:
        raise GrowInterrupted(
            f"the keystore is being moved to a {scan.geometry.grow_to}-byte payload by an "
            "interrupted 'qubes-seal grow': not written",
        )
    if on_disk_generation != ks.generation:
        raise StaleKeystore(
            f"the keystore on disk is at generation {on_disk_generation}, this copy at "
            f"{ks.generation}: not written"
        )
    if erase_previous is None:
        erase_previous = ks.keys_removed
    g = scan.geometry.layout
    target = 1 - newest.index
    record = _record(ks, hmac_key, ks.generation + 1, g)
    _write_slot(payload, g.offset(target), g.slot_size, record)
    ks.generation += 1
    if erase_previous:
        record = _record(ks, hmac_key, ks.generation + 1, g)
        _write_slot(payload, g.offset(newest.index), g.slot_size, record)
        ks.generation += 1
    ks.keys_removed = False


def initialise(payload: Payload, hmac_key: Secret, *, destroy_existing: bool = False) -> Keystore:
    """Write an empty keystore (generation 1, no domains) into slot A and zero slot B.

    The layout is the payload's current size's, recorded in the record.  Refuses
    (:class:`UsageError`) when either slot already holds a keystore record, valid or not (a
    record that fails authentication may be a real keystore opened with the wrong key),
    unless ``destroy_existing`` is set: then every key on the payload is lost.
    """
    check_payload_size(payload.size)
    g = Geometry.for_size(payload.size)
    statuses = slot_status(payload, hmac_key)
    existing = [s for s in statuses if s.has_magic]
    if existing and not destroy_existing:
        found = ", ".join(
            f"slot {s.slot} " + (f"generation {s.generation}" if s.valid else "(invalid)")
            for s in existing
        )
        raise UsageError(
            f"the payload already holds a keystore ({found}): not overwritten",
            hint="Initialising destroys every key in it; ask for that explicitly.",
        )
    ks = Keystore(generation=1)
    record = _record(ks, hmac_key, 1, g)
    _write_slot(payload, g.slot_a, g.slot_size, record)
    _write_slot(payload, g.slot_b, g.slot_size, b"")
    return ks


def _growable(payload: Payload, hmac_key: Secret, target: int) -> _Scan:
    """The scan of ``payload``, if :func:`grow_step` may move it to ``target`` bytes."""
    check_payload_size(target)
    scan = _scan(payload, hmac_key)
    try:
        g = scan.geometry
        if scan.newest.geometry is None:
            _accepted(scan)  # a version 1 record: only from a self-consistent layout
        if scan.size < g.payload_size:
            raise _resized(scan)
        if target < g.payload_size:
            raise UsageError(
                f"the keystore uses {g.describe()}: it cannot shrink to {target} bytes"
            )
        if scan.size > target:
            raise UsageError(
                f"the payload is {scan.size} bytes, larger than the target {target}: grow "
                "to the payload's size"
            )
    except QubesSealError:
        scan.wipe()
        raise
    return scan


def check_growable(payload: Payload, hmac_key: Secret, target: int) -> Geometry:
    """The recorded layout, if the keystore can grow to a ``target``-byte payload; else
    what :func:`grow_step` would refuse (nothing is written)."""
    scan = _growable(payload, hmac_key, target)
    scan.wipe()
    return scan.geometry


#: What :func:`grow_step` did (the journal's step names), or asks for.
STEP_INTENT = "intent-written"
STEP_NEEDS_SPACE = "needs-space"
STEP_SLOT_B = "slot-b-moved"
STEP_SLOT_A = "slot-a-rewritten"
STEP_SETTLED = "settled"


def grow_step(payload: Payload, hmac_key: Secret, target: int) -> str | None:
    """One crash-safe step of moving the keystore to the layout of a ``target``-byte payload.

    Decided from the payload alone (so a crashed grow resumes from whatever it left), each
    step writes one slot whole, never the one holding the only copy of the newest
    generation, and returns its name; None once the keystore is in the target layout in
    both slots.  :data:`STEP_NEEDS_SPACE`: the payload must first become ``target`` bytes
    (the caller extends the file, then calls again).  The steps, from layout G to T:

    1. ``intent-written`` (once or twice): a record of layout G that accepts size T too
       (``grow_to``), until slot A holds the newest such record;
    2. ``needs-space`` until the payload is T bytes;
    3. ``slot-b-moved``: the newest generation, layout T, at T's slot B (past G's slot A;
       slot A's record survives whatever this write tears);
    4. ``slot-a-rewritten``: layout T in slot A (slot B holds the newest meanwhile).

    ``target`` equal to the current layout settles a torn or interrupted state (or cancels
    an announced grow that has not moved slot B yet).  Refuses a ``target`` smaller than
    the recorded layout (:class:`UsageError`) and a payload smaller than it
    (:class:`ContainerResized`).
    """
    scan = _growable(payload, hmac_key, target)
    try:
        newest = scan.newest
        ks = newest.ks
        assert ks is not None
        g = scan.geometry
        generation = newest.generation + 1
        if target == g.payload_size:
            other = scan.at(g.offset(1 - newest.index))
            if (
                g.grow_to == 0
                and newest.geometry is not None
                and other is not None
                and other.geometry == g
            ):
                return None
            layout = g.layout
            record = _record(ks, hmac_key, generation, layout)
            _write_slot(payload, layout.offset(1 - newest.index), layout.slot_size, record)
            return STEP_SLOT_A if newest.index == 1 else STEP_SETTLED
        new = Geometry.for_size(target)
        if newest.index == 0 and g.grow_to == target:
            if scan.size < target:
                return STEP_NEEDS_SPACE
            record = _record(ks, hmac_key, generation, new)
            _write_slot(payload, new.slot_b, new.slot_size, record)
            return STEP_SLOT_B
        # Announce the target in the old layout's slot that does not hold the newest copy.
        announced = g.layout.with_grow_to(target)
        record = _record(ks, hmac_key, generation, announced)
        _write_slot(payload, g.offset(1 - newest.index), g.slot_size, record)
        return STEP_INTENT
    finally:
        scan.wipe()
