"""Two slots on the container's payload, so that a torn write never loses the keystore.

::

    payload (size bytes, a multiple of 1024)
    +-----------------------------+-----------------------------+
    | slot A: offset 0            | slot B: offset size/2       |
    | record, zero padding        | record, zero padding        |
    +-----------------------------+-----------------------------+

:func:`store` writes generation n+1 into the slot that does *not* hold the newest valid
generation n, so a write torn by a crash or power loss leaves generation n intact in the
other slot; :func:`load` returns the valid slot with the highest generation.  A slot is
valid when its record authenticates (HMAC-SHA256, see :mod:`.codec`): any torn or modified
record fails, since the HMAC covers every byte of it.  Slots are written whole, with zero
padding, so no old key survives in the slack after a record that shrank.

A payload with no valid slot is an error (:class:`CorruptState`), never an empty keystore:
an empty keystore exists only after :func:`initialise`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from ..errors import CorruptState, QubesSealError, UsageError
from ..secret import Secret
from .codec import HEADER_SIZE, MAGIC, decode, encode, record_length
from .errors import KeystoreFull, StaleKeystore
from .model import Keystore

SECTOR = 512
SLOT_NAMES = ("A", "B")


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


def _slot_size(payload: Payload) -> int:
    size = payload.size
    if size < 2 * SECTOR or size % (2 * SECTOR):
        raise UsageError(
            f"the keystore payload size ({size} bytes) must be a positive multiple of "
            f"{2 * SECTOR} bytes (two slots of whole {SECTOR}-byte sectors)"
        )
    return size // 2


def _round_up(length: int) -> int:
    return -(-length // SECTOR) * SECTOR


def _read(payload: Payload, offset: int, length: int) -> bytes:
    data = payload.read(offset, length)
    if len(data) != length:
        raise QubesSealError(
            f"short read from the keystore payload: {len(data)} of {length} bytes at {offset}"
        )
    return data


def _read_slot(
    payload: Payload, index: int, hmac_key: Secret
) -> tuple[SlotStatus, Keystore | None]:
    slot_size = _slot_size(payload)
    offset = index * slot_size
    name = SLOT_NAMES[index]
    first = _read(payload, offset, SECTOR)
    has_magic = first[: len(MAGIC)] == MAGIC
    try:
        length = record_length(first[:HEADER_SIZE])
        if length > slot_size:
            raise CorruptState(f"record length {length} exceeds the slot size {slot_size}")
        data = first if length <= SECTOR else _read(payload, offset, _round_up(length))
        ks = decode(data[:length], hmac_key)
    except CorruptState as exc:
        return SlotStatus(name, offset, None, exc.message, has_magic), None
    return SlotStatus(name, offset, ks.generation, "", has_magic), ks


def slot_status(payload: Payload, hmac_key: Secret) -> list[SlotStatus]:
    """The state of both slots, for diagnostics (``status`` commands, logs after a crash)."""
    result = []
    for index in range(2):
        status, ks = _read_slot(payload, index, hmac_key)
        if ks is not None:
            ks.wipe()
        result.append(status)
    return result


def _newest(payload: Payload, hmac_key: Secret) -> tuple[list[SlotStatus], int, Keystore]:
    """Both slots' status, the index of the newest valid slot and its keystore."""
    statuses: list[SlotStatus] = []
    stores: list[Keystore | None] = []
    for index in range(2):
        status, ks = _read_slot(payload, index, hmac_key)
        statuses.append(status)
        stores.append(ks)
    valid = [i for i in range(2) if stores[i] is not None]
    if not valid:
        if not any(s.has_magic for s in statuses):
            raise CorruptState(
                "the keystore is not initialised: neither slot holds a keystore record",
                hint="If this container is new, initialise its keystore first.",
            )
        details = "; ".join(f"slot {s.slot}: {s.problem}" for s in statuses)
        raise CorruptState(
            f"no valid keystore slot ({details})",
            hint=(
                "Both copies of the keystore fail authentication: the container was "
                "modified or damaged, or it was opened with the wrong key. Restore the "
                "keystore from a backup."
            ),
        )
    best = max(valid, key=lambda i: (statuses[i].generation or 0, -i))
    for i in valid:
        other = stores[i]
        if i != best and other is not None:
            other.wipe()
    chosen = stores[best]
    assert chosen is not None
    return statuses, best, chosen


def load(payload: Payload, hmac_key: Secret) -> Keystore:
    """The keystore in the valid slot with the highest generation.

    Raises :class:`CorruptState` when neither slot is valid (including a payload that was
    never initialised).  The other slot (an older generation, or a torn write) is ignored;
    :func:`slot_status` reports it.
    """
    return _newest(payload, hmac_key)[2]


def _write_slot(payload: Payload, index: int, record: bytes) -> None:
    slot_size = _slot_size(payload)
    buf = bytearray(slot_size)
    buf[: len(record)] = record
    try:
        payload.write(index * slot_size, bytes(buf))
    finally:
        buf[:] = bytes(slot_size)


def _record(ks: Keystore, hmac_key: Secret, generation: int, slot_size: int) -> bytes:
    record = encode(ks, hmac_key, generation=generation)
    if len(record) > slot_size:
        raise KeystoreFull(
            f"the keystore needs {len(record)} bytes but a slot holds {slot_size} "
            f"(payload of {2 * slot_size} bytes, {len(ks.domains)} domains)",
            hint="Make the container's keystore payload larger, or remove unused keys.",
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
    :class:`KeystoreFull` when the record does not fit in a slot (nothing is written).
    """
    slot_size = _slot_size(payload)
    _statuses, newest, on_disk = _newest(payload, hmac_key)
    on_disk_generation = on_disk.generation
    on_disk.wipe()
    if on_disk_generation != ks.generation:
        raise StaleKeystore(
            f"the keystore on disk is at generation {on_disk_generation}, this copy at "
            f"{ks.generation}: not written"
        )
    if erase_previous is None:
        erase_previous = ks.keys_removed
    target = 1 - newest
    record = _record(ks, hmac_key, ks.generation + 1, slot_size)
    _write_slot(payload, target, record)
    ks.generation += 1
    if erase_previous:
        record = _record(ks, hmac_key, ks.generation + 1, slot_size)
        _write_slot(payload, newest, record)
        ks.generation += 1
    ks.keys_removed = False


def initialise(payload: Payload, hmac_key: Secret, *, destroy_existing: bool = False) -> Keystore:
    """Write an empty keystore (generation 1, no domains) into slot A and zero slot B.

    Refuses (:class:`UsageError`) when either slot already holds a keystore record, valid
    or not (a record that fails authentication may be a real keystore opened with the
    wrong key), unless ``destroy_existing`` is set: then every key on the payload is lost.
    """
    slot_size = _slot_size(payload)
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
    record = _record(ks, hmac_key, 1, slot_size)
    _write_slot(payload, 0, record)
    _write_slot(payload, 1, b"")
    return ks
