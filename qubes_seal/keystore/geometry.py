"""Where the two keystore slots lie on the payload, recorded in every record (format v2).

Before this record existed the slots were found from the payload's *current* size (slot B at
half of it), and the LUKS2 data segment of our containers is ``dynamic``: it follows the file
or logical volume.  Growing or shrinking the container therefore moved slot B, and the reader
silently fell back to the older copy in slot A (the newest keys lost), or a write landed on
top of the real slot B.  Now each record carries the layout it was written for, under the
keystore's HMAC, and the slots are found from that record; the size the LUKS2 header implies
(which an evil maid can rewrite) is only compared with it.

::

    payload_size bytes (a multiple of 512, at least 1024)
    +--------------------------+--------------------------+---------------+
    | slot A: offset 0         | slot B: offset slot_size | unused        |
    | slot_size bytes          | slot_size bytes          | (< 1024 bytes)|
    +--------------------------+--------------------------+---------------+

``slot_size`` is half the payload, rounded down to whole sectors (:meth:`Geometry.for_size`).
``grow_to`` is non-zero only while ``qubes-seal grow`` moves the keystore to a larger payload
(:func:`~qubes_seal.keystore.slots.grow_step`): the records then accept the payload at either
size, so that an interrupted grow still unlocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import CorruptState, UsageError

SECTOR = 512
MIN_PAYLOAD = 2 * SECTOR


def check_payload_size(size: int) -> None:
    """Refuse a payload that cannot hold two slots of whole sectors (:class:`UsageError`)."""
    if size < MIN_PAYLOAD or size % SECTOR:
        raise UsageError(
            f"the keystore payload size ({size} bytes) must be a multiple of {SECTOR} bytes "
            f"and at least {MIN_PAYLOAD} (two slots of whole {SECTOR}-byte sectors)"
        )


@dataclass(frozen=True)
class Geometry:
    """The layout one record was written for: sizes and offsets in bytes, in the payload."""

    payload_size: int
    slot_a: int
    slot_b: int
    slot_size: int
    #: 0, or the payload size an interrupted ``grow`` is moving the keystore to.
    grow_to: int = 0

    @classmethod
    def for_size(cls, payload_size: int) -> Geometry:
        """The layout of a ``payload_size``-byte payload: two equal halves, whole sectors."""
        check_payload_size(payload_size)
        half = payload_size // (2 * SECTOR) * SECTOR
        return cls(payload_size=payload_size, slot_a=0, slot_b=half, slot_size=half)

    def offset(self, index: int) -> int:
        """The offset of slot ``index`` (0: A, 1: B)."""
        return self.slot_a if index == 0 else self.slot_b

    def with_grow_to(self, size: int) -> Geometry:
        return Geometry(self.payload_size, self.slot_a, self.slot_b, self.slot_size, size)

    @property
    def layout(self) -> Geometry:
        """The same layout without a grow in progress."""
        return self.with_grow_to(0)

    def accepts(self, payload_size: int) -> bool:
        """Whether a payload of ``payload_size`` bytes is the one this record was made for
        (or, during a grow, the one it is being moved to)."""
        return payload_size == self.payload_size or (
            self.grow_to != 0 and payload_size == self.grow_to
        )

    def validate(self) -> Geometry:
        """:class:`CorruptState` unless this is a layout :meth:`for_size` makes."""
        try:
            expected = Geometry.for_size(self.payload_size)
        except UsageError:
            raise CorruptState(
                f"keystore geometry: invalid payload size {self.payload_size}"
            ) from None
        if self.layout != expected:
            raise CorruptState(
                f"keystore geometry: slots at {self.slot_a} and {self.slot_b} of "
                f"{self.slot_size} bytes do not fit a {self.payload_size}-byte payload"
            )
        if self.grow_to:
            if self.grow_to <= self.payload_size:
                raise CorruptState("keystore geometry: a grow must go to a larger payload")
            try:
                check_payload_size(self.grow_to)
            except UsageError:
                raise CorruptState(
                    f"keystore geometry: invalid grow target {self.grow_to}"
                ) from None
        return self

    def describe(self) -> str:
        return (
            f"a {self.payload_size}-byte payload (slot A at 0, slot B at {self.slot_b}, "
            f"{self.slot_size} bytes each)"
        )
