"""The keystore's record of which key each pool volume opens with (qubes_seal.keystore.volumes):
what lets ``qubes-seal domain rotate --commit`` refuse to destroy a key a volume still needs.
The driver's side, through qubesd's storage code and the key service: tests/test_qubes_pool.py.
"""

from __future__ import annotations

import uuid

import pytest

from qubes_seal import rotate
from qubes_seal.errors import UsageError
from qubes_seal.keystore import volumes
from qubes_seal.keystore.model import DomainKey


class OneEntry:
    """The part of a keystore that :func:`rotate.rotate_domain` and ``commit_domain`` use."""

    def __init__(self) -> None:
        self.entry = DomainKey.new("work")
        self.keys_removed = False

    def get(self, name: str, *, qube_uuid: str | None = None) -> DomainKey:
        assert name == "work"
        return self.entry


def luks() -> str:
    return str(uuid.uuid4())


def test_records_follow_the_volumes_through_a_rotation() -> None:
    ks = OneEntry()
    e = ks.entry
    private, root = luks(), luks()
    assert volumes.note(e, "private", luks_uuid=private, key_id=e.key_id)
    assert volumes.note(e, "root", luks_uuid=root.upper(), key_id=e.key_id)
    assert not volumes.note(e, "root", luks_uuid=root, key_id=e.key_id)  # unchanged: no write
    assert volumes.behind(e) == []
    first = e.key_id

    rotate.rotate_domain(ks, "work")
    assert [r.name for r in volumes.behind(e)] == ["private", "root"]
    with pytest.raises(UsageError, match=r"private \(still on the previous key\), root"):
        rotate.commit_domain(ks, "work")
    assert rotate.PREVIOUS in e.extra and not ks.keys_removed  # nothing changed

    # the rekey command knows a path: the record is found by the header's UUID
    assert volumes.note_by_uuid(e, private, key_id=e.key_id) == ("private", True)
    assert volumes.note_by_uuid(e, luks(), key_id=e.key_id) == (None, False)
    with pytest.raises(UsageError, match=r"re-keyed: root \(still on the previous key\);"):
        rotate.commit_domain(ks, "work")
    # a revert: the key of the reverted revision is not known until the next start
    assert volumes.note(e, "private", luks_uuid=None, key_id=volumes.UNKNOWN)
    assert volumes.records(e)[0].luks_uuid == private  # the UUID kept
    with pytest.raises(UsageError, match=r"private \(its key unknown since a revert\)"):
        rotate.commit_domain(ks, "work")
    volumes.note(e, "private", luks_uuid=private, key_id=e.key_id)
    volumes.note(e, "root", luks_uuid=root, key_id=e.key_id)
    rotate.commit_domain(ks, "work")
    assert rotate.PREVIOUS not in e.extra and ks.keys_removed
    assert [v["on_current_key"] for v in volumes.view(e)] == [True, True]
    # the previous key is gone: a record naming it is refused
    with pytest.raises(UsageError, match="neither the current nor the previous key"):
        volumes.note(e, "root", luks_uuid=root, key_id=first)


def test_force_commits_past_a_volume_that_no_longer_exists() -> None:
    ks = OneEntry()
    volumes.note(ks.entry, "private", luks_uuid=luks(), key_id=ks.entry.key_id)
    rotate.rotate_domain(ks, "work")
    rotate.commit_domain(ks, "work", force=True)
    assert rotate.PREVIOUS not in ks.entry.extra


def test_forget_and_no_record() -> None:
    e = DomainKey.new("work")
    assert not volumes.forget(e, "private")
    assert not volumes.note(e, "private", luks_uuid=None, key_id=volumes.UNKNOWN)  # no record
    assert volumes.VOLUMES not in e.extra
    volumes.note(e, "private", luks_uuid=luks(), key_id=e.key_id)
    assert volumes.forget(e, "private") and volumes.VOLUMES not in e.extra


@pytest.mark.parametrize(
    "record",
    [
        "not an object",
        {"luks_uuid": "x"},  # no key id: a record of a newer version, or damage
        {"luks_uuid": 5, "key_id": ["x"]},
    ],
)
def test_a_malformed_record_blocks_the_commit(record: object) -> None:
    ks = OneEntry()
    ks.entry.extra[volumes.VOLUMES] = {"private": record}
    rotate.rotate_domain(ks, "work")
    [rec] = volumes.behind(ks.entry)
    assert rec.key_id == volumes.UNKNOWN
    with pytest.raises(UsageError, match="private"):
        rotate.commit_domain(ks, "work")


@pytest.mark.parametrize("name", ["", "Private", "../x", "a" * 33, None, 7, "pri vate"])
def test_volume_names_are_checked(name: object) -> None:
    e = DomainKey.new("work")
    with pytest.raises(UsageError, match="invalid volume name"):
        volumes.note(e, name, luks_uuid=luks(), key_id=e.key_id)


def test_luks_uuids_are_checked() -> None:
    e = DomainKey.new("work")
    with pytest.raises(UsageError, match="UUID"):
        volumes.note(e, "private", luks_uuid="not-a-uuid", key_id=e.key_id)
