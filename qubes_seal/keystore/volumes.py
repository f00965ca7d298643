"""Which key each pool volume of a qube opens with, recorded in the qube's keystore entry.

A qube of the ``qubes_seal`` pool (docs/QUBES-POOL.md) has one key in the keystore and one
LUKS2 volume per origin volume (a template's ``root`` and ``private``, an AppVM's
``private``).  ``qubes-seal domain rotate`` makes a new key and keeps the previous one; the
pool driver moves each volume to the new key at the qube's next start (kept at its stop),
or ``python3 -m qubes_seal.qubes_pool rekey`` does it for a halted qube; ``domain rotate
--commit`` then destroys the previous key.  A commit before every volume moved would leave
a volume that no kept key opens: its data lost.

So the driver tells the key service, for each origin volume, which key it now opens with
(the ``volume`` request, root only): at ``create`` and ``import`` (a new LUKS2 volume), at a
``start`` that needed no re-key, at the ``stop`` that keeps a re-keyed volume, and from the
``rekey`` command.  The record is in the entry's ``extra["volumes"]``, inside the
authenticated, encrypted keystore (never read from a volume's header, which anyone with the
disk can rewrite): ``{NAME: {"luks_uuid": ..., "key_id": ..., "noted": ...}}``.  The
commit (:func:`qubes_seal.rotate.commit_domain`) refuses while a recorded volume is not on
the current key (:func:`behind`).

A volume created before this record existed is recorded at its first start; a revert marks
its volume ``unknown`` (an older revision may hold only the previous key's keyslot) until
the next start records it again.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ..errors import UsageError
from .model import utc_now
from .names import normalise_uuid

#: the entry's ``extra`` field that holds the records
VOLUMES = "volumes"
#: the entry's ``extra`` field that keeps the previous key while a rotation is pending (the
#: one definition: :mod:`qubes_seal.rotate` writes it, the key service serves from it)
PREVIOUS = "previous"
#: the key a volume opens with is not known (after a revert): never counts as current
UNKNOWN = "unknown"

#: a Qubes volume name: root, private, kernel... (qubesd's names are short and lowercase)
_VOLUME_NAME = re.compile(r"\A[a-z0-9][a-z0-9_-]{0,31}\Z")


@dataclass(frozen=True)
class VolumeRecord:
    """One origin volume of a qube: its LUKS2 UUID and the id of the key it opens with."""

    name: str
    luks_uuid: str
    key_id: str
    noted: str

    def view(self, current_key_id: str) -> dict[str, Any]:
        return {
            "volume": self.name,
            "luks_uuid": self.luks_uuid,
            "key_id": self.key_id,
            "on_current_key": self.key_id == current_key_id,
            "noted": self.noted,
        }


def volume_name(value: object) -> str:
    """``value`` as a volume name; :class:`UsageError` when it is not one."""
    if not isinstance(value, str) or not _VOLUME_NAME.match(value):
        shown = repr(value)[:40]
        raise UsageError(f"invalid volume name {shown}: lowercase letters, digits, - and _")
    return value


def records(entry: Any) -> list[VolumeRecord]:
    """The records of ``entry``, by name.  A malformed record (a newer version's, or damage)
    is kept as ``unknown``: it blocks a commit rather than being ignored."""
    raw = entry.extra.get(VOLUMES)
    if not isinstance(raw, dict):
        return []
    found = []
    for name, rec in sorted(raw.items(), key=lambda item: str(item[0])):
        fields = rec if isinstance(rec, dict) else {}

        def text(key: str, missing: str = "?", fields: dict[str, Any] = fields) -> str:
            value = fields.get(key)
            return value if isinstance(value, str) else missing

        found.append(VolumeRecord(str(name), text("luks_uuid"), text("key_id", UNKNOWN),
                                  text("noted")))  # fmt: skip
    return found


def _known_key_ids(entry: Any) -> set[str]:
    ids = {entry.key_id, UNKNOWN}
    prev = entry.extra.get(PREVIOUS)
    if isinstance(prev, dict) and isinstance(prev.get("key_id"), str):
        ids.add(prev["key_id"])
    return ids


def note(entry: Any, volume: object, *, luks_uuid: str | None, key_id: str) -> bool:
    """Record that ``volume`` (LUKS2 UUID ``luks_uuid``) opens with the key ``key_id`` (the
    entry's current or previous key, or :data:`UNKNOWN`); True when the record changed.
    ``luks_uuid`` None (a revert: the driver has no header at hand) keeps the recorded
    UUID, and changes nothing for a volume without a record."""
    volume = volume_name(volume)
    if key_id not in _known_key_ids(entry):
        raise UsageError(f"key id {key_id!r} is neither the current nor the previous key of "
                         f"{entry.name}")  # fmt: skip
    raw = entry.extra.get(VOLUMES)
    if not isinstance(raw, dict):
        raw = {}
    old = raw.get(volume)
    if luks_uuid is None:
        if not isinstance(old, dict) or not isinstance(old.get("luks_uuid"), str):
            return False
        luks_uuid = str(old["luks_uuid"])
    else:
        luks_uuid = normalise_uuid(luks_uuid)
    entry.extra[VOLUMES] = raw
    if isinstance(old, dict) and old.get("luks_uuid") == luks_uuid and old.get("key_id") == key_id:
        return False
    raw[volume] = {"luks_uuid": luks_uuid, "key_id": key_id, "noted": utc_now()}
    return True


def note_by_uuid(entry: Any, luks_uuid: str, *, key_id: str) -> tuple[str | None, bool]:
    """:func:`note` for the recorded volume whose LUKS2 UUID is ``luks_uuid`` (the ``rekey``
    command knows a path, not a volume name): its name (None when no record has that UUID)
    and whether the record changed."""
    luks_uuid = normalise_uuid(luks_uuid)
    for rec in records(entry):
        if rec.luks_uuid == luks_uuid:
            return rec.name, note(entry, rec.name, luks_uuid=luks_uuid, key_id=key_id)
    return None, False


def forget(entry: Any, volume: object) -> bool:
    """Drop the record of ``volume`` (the volume was removed); True when there was one."""
    name = volume_name(volume)
    raw = entry.extra.get(VOLUMES)
    if not isinstance(raw, dict) or name not in raw:
        return False
    del raw[name]
    if not raw:
        del entry.extra[VOLUMES]
    return True


def behind(entry: Any) -> list[VolumeRecord]:
    """The recorded volumes that do not open with the entry's current key: a commit now
    would lose them."""
    return [rec for rec in records(entry) if rec.key_id != entry.key_id]


def view(entry: Any) -> list[dict[str, Any]]:
    """The records as shown by ``domain show`` and the key service (no secret in them)."""
    return [rec.view(entry.key_id) for rec in records(entry)]
