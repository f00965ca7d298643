"""Per-domain keys: names, UUID binding, the authenticated record, the two crash-safe slots."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import struct
import uuid
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qubes_seal.errors import AuthorizationError, CorruptState, QubesSealError, UsageError
from qubes_seal.keystore import (
    DomainExists,
    DomainKey,
    Keystore,
    KeystoreFull,
    QubeUuidMismatch,
    StaleKeystore,
    UnknownDomain,
    decode,
    encode,
    hmac_key_from_volume_key,
    initialise,
    load,
    slot_status,
    store,
    validate_name,
)
from qubes_seal.secret import Secret

HMAC_KEY = hmac_key_from_volume_key(Secret(b"\x01" * 64))
OTHER_KEY = hmac_key_from_volume_key(Secret(b"\x02" * 64))
UUID1 = "6f1c0a52-3b2e-4c4e-9d55-0d1f2f3a4b5c"
UUID2 = "0b8e8f7c-1111-4222-8333-944455556666"
SLOT = 8192


class Crash(Exception):
    """The simulated power loss."""


class MemPayload:
    """An in-memory payload: 512-byte aligned access, and torn writes on request.

    ``crash_after = N`` makes the next write store only its first ``N`` bytes, then raise
    :class:`Crash`, like a power loss in the middle of the write.
    """

    def __init__(self, size: int = 2 * SLOT, fill: bytes = b"\0") -> None:
        self.buf = bytearray(fill * size) if len(fill) == 1 else bytearray(fill)
        assert len(self.buf) == size
        self.crash_after: int | None = None
        self.writes: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return len(self.buf)

    def _check(self, offset: int, length: int) -> None:
        assert offset % 512 == 0, offset
        assert length % 512 == 0, length
        assert offset >= 0 and offset + length <= len(self.buf)

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length)
        return bytes(self.buf[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        self.writes.append((offset, len(data)))
        if self.crash_after is not None:
            n, self.crash_after = self.crash_after, None
            self.buf[offset : offset + n] = data[:n]
            raise Crash(f"power lost after {n} bytes")
        self.buf[offset : offset + len(data)] = data


@pytest.fixture
def payload() -> Iterator[MemPayload]:
    p = MemPayload()
    initialise(p, HMAC_KEY)
    yield p


def raw_record(body: bytes, *, generation: int = 1, version: int = 1, flags: int = 0) -> bytes:
    """A record built by hand (as a newer or hostile writer would), with a valid HMAC."""
    header = b"QSKEYSTO" + struct.pack(">HHIQ", version, flags, len(body), generation)
    tag = hmac.new(HMAC_KEY.reveal(), header + body, hashlib.sha256).digest()
    return header + body + tag


def sample_keystore() -> Keystore:
    ks = Keystore(generation=3)
    ks.add("work", qube_uuid=UUID1)
    ks.add("personal")
    ks.add("sys-usb", qube_uuid=UUID2)
    return ks


def assert_same(a: Keystore, b: Keystore) -> None:
    assert a.generation == b.generation
    assert a.public_view() == b.public_view()
    assert sorted(a.domains) == sorted(b.domains)
    for name in a.domains:
        assert a.domains[name].key == b.domains[name].key
        assert a.domains[name].extra == b.domains[name].extra
    assert a.extra == b.extra


# --- names and UUIDs -------------------------------------------------------------------------

VALID_NAMES = [
    "a",
    "work",
    "sys-net",
    "sys-usb",
    "debian-12-xfce",
    "disp1234",
    "A.b_c-d",
    "x" * 31,
    "dm",
    "vm-dm0",
    "Domain-1",
    "nonee",
    "dom0",
]
INVALID_NAMES = [
    ("", "starts with"),
    ("x" * 32, "at most 31"),
    ("1work", "starts with"),
    ("-work", "starts with"),
    ("_work", "starts with"),
    (".work", "starts with"),
    ("my work", "starts with"),
    ("work\n", "starts with"),  # \Z, not $: a trailing newline is not accepted
    ("wörk", "starts with"),
    ("work+1", "starts with"),
    ("work/../x", "starts with"),
    ("Domain-0", "'Domain-0'"),
    ("none", "'none'"),
    ("default", "'default'"),
    ("work-dm", "-dm"),
    ("a-dm", "-dm"),
]


@pytest.mark.parametrize("name", VALID_NAMES)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name
    Keystore().add(name)


@pytest.mark.parametrize(("name", "rule"), INVALID_NAMES)
def test_invalid_names_state_the_rule(name: str, rule: str) -> None:
    with pytest.raises(UsageError, match="invalid qube name") as info:
        validate_name(name)
    assert rule in info.value.message
    assert info.value.exit_code == 2
    with pytest.raises(UsageError):
        Keystore().add(name)


@pytest.mark.parametrize(
    "bad",
    ["", "not-a-uuid", UUID1.replace("-", ""), "{" + UUID1 + "}", "urn:uuid:" + UUID1, UUID1 + "0"],
)
def test_invalid_uuids(bad: str) -> None:
    with pytest.raises(UsageError, match="UUID"):
        Keystore().add("work", qube_uuid=bad)


def test_uuid_is_normalised_to_lowercase() -> None:
    ks = Keystore()
    entry = ks.add("work", qube_uuid=UUID1.upper())
    assert entry.qube_uuid == UUID1
    assert ks.get("work", qube_uuid=UUID1.upper()) is entry


# --- the Keystore in memory ------------------------------------------------------------------


def test_add_makes_a_fresh_random_key() -> None:
    ks = Keystore()
    a = ks.add("work", qube_uuid=UUID1)
    b = ks.add("personal")
    assert len(a.key) == 64
    assert a.key != b.key
    assert a.generation == 1
    assert len(a.key_id) == 16
    int(a.key_id, 16)
    assert a.key_id != b.key_id
    assert a.key_id not in a.key.reveal().hex()
    assert a.created.endswith("+00:00")


def test_add_refuses_duplicates() -> None:
    ks = Keystore()
    ks.add("work", qube_uuid=UUID1)
    with pytest.raises(DomainExists, match="already has a key"):
        ks.add("work")
    with pytest.raises(DomainExists, match="already has a key"):
        ks.add("work2", qube_uuid=UUID1)
    assert sorted(ks.domains) == ["work"]


def test_uuid_mismatch_is_refused() -> None:
    ks = Keystore()
    old = ks.add("work", qube_uuid=UUID1)
    assert ks.get("work", qube_uuid=UUID1) is old
    with pytest.raises(QubeUuidMismatch, match="refused") as info:
        ks.get("work", qube_uuid=UUID2)
    assert UUID1 in info.value.message
    assert UUID2 in info.value.message
    assert isinstance(info.value, AuthorizationError)
    # Naming no UUID does not skip the check.
    with pytest.raises(QubeUuidMismatch):
        ks.get("work")
    # Nor can a caller pick up a UUID-less key by naming a UUID.
    ks.add("legacy")
    assert ks.get("legacy").name == "legacy"
    with pytest.raises(QubeUuidMismatch):
        ks.get("legacy", qube_uuid=UUID2)


def test_reused_name_never_gets_the_old_key() -> None:
    ks = Keystore()
    old_key = ks.add("work", qube_uuid=UUID1).key.reveal()
    ks.remove("work")
    new = ks.add("work", qube_uuid=UUID2)
    assert new.key.reveal() != old_key
    with pytest.raises(QubeUuidMismatch):
        ks.get("work", qube_uuid=UUID1)


def test_unknown_domain() -> None:
    ks = Keystore()
    with pytest.raises(UnknownDomain, match="no key"):
        ks.get("work")
    with pytest.raises(UnknownDomain):
        ks.remove("work")


def test_remove_wipes_the_key() -> None:
    ks = Keystore()
    entry = ks.add("work")
    removed = ks.remove("work")
    assert removed is entry
    assert removed.key.reveal() == bytes(64)
    assert "work" not in ks.domains


def test_list_is_sorted_and_public_view_has_no_key() -> None:
    ks = sample_keystore()
    assert [e.name for e in ks.list()] == ["personal", "sys-usb", "work"]
    view = ks.public_view()
    assert view["generation"] == 3
    assert [d["name"] for d in view["domains"]] == ["personal", "sys-usb", "work"]
    for d in view["domains"]:
        assert set(d) == {"name", "qube_uuid", "key_id", "created", "generation"}


def test_keys_never_in_repr_str_view_or_errors(payload: MemPayload) -> None:
    ks = load(payload, HMAC_KEY)
    entry = ks.add("work", qube_uuid=UUID1)
    ks.domains["work"].extra["future"] = "public"
    key = entry.key.reveal()
    texts = [repr(ks), str(ks), repr(entry), str(entry), json.dumps(ks.public_view())]
    texts += [repr(ks.list()), json.dumps(entry.public_view()), repr(entry.key)]
    errors: list[QubesSealError] = []
    for call in (
        lambda: ks.add("work"),
        lambda: ks.get("work", qube_uuid=UUID2),
        lambda: ks.get("work"),
        lambda: decode(encode(ks, HMAC_KEY)[:-1] + b"x", HMAC_KEY),
        lambda: decode(encode(ks, HMAC_KEY), OTHER_KEY),
    ):
        with pytest.raises(QubesSealError) as info:
            call()
        errors.append(info.value)
    # A record whose key field is malformed (but authentic): the message must not quote it.
    doc = json.loads(encode(ks, HMAC_KEY)[24:-32])
    doc["domains"][0]["key"] = key.hex()[:-2]
    with pytest.raises(CorruptState) as info:
        decode(raw_record(json.dumps(doc).encode(), generation=4), HMAC_KEY)
    errors.append(info.value)
    texts += [str(e) for e in errors] + [e.diagnostics() for e in errors]
    texts += [repr(e) for e in errors]
    for text in texts:
        assert key.hex()[:16] not in text.lower()
        assert key.hex()[-16:] not in text.lower()
        assert repr(key)[2:20] not in text


def test_keystore_context_manager_wipes_all_keys() -> None:
    with sample_keystore() as ks:
        entries = ks.list()
    assert all(e.key.reveal() == bytes(64) for e in entries)


# --- the record ------------------------------------------------------------------------------


def test_record_round_trip() -> None:
    ks = sample_keystore()
    data = encode(ks, HMAC_KEY)
    assert data[:8] == b"QSKEYSTO"
    assert_same(decode(data, HMAC_KEY), ks)


def test_hmac_key_derivation() -> None:
    assert len(HMAC_KEY) == 32
    assert HMAC_KEY != OTHER_KEY
    assert hmac_key_from_volume_key(Secret(b"\x01" * 64)) == HMAC_KEY
    with pytest.raises(UsageError):
        hmac_key_from_volume_key(Secret(b""))


def test_wrong_hmac_key_is_corrupt_state() -> None:
    data = encode(sample_keystore(), HMAC_KEY)
    with pytest.raises(CorruptState, match="HMAC mismatch") as info:
        decode(data, OTHER_KEY)
    assert info.value.exit_code == 7


def test_every_bit_flip_is_detected() -> None:
    ks = Keystore(generation=2)
    ks.add("work", qube_uuid=UUID1)
    data = bytearray(encode(ks, HMAC_KEY))
    for i in range(len(data) * 8):
        data[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CorruptState):
            decode(data, HMAC_KEY)
        data[i // 8] ^= 1 << (i % 8)
    assert_same(decode(data, HMAC_KEY), ks)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: b"XXXXXXXX" + d[8:], "bad magic"),
        (lambda d: d[:8] + b"\x00\x03" + d[10:], "version 3 is not supported"),
        (lambda d: d[:10] + b"\x00\x01" + d[12:], "unknown flags"),
        (lambda d: d[:-1], "does not match its header"),
        (lambda d: d + b"\0", "does not match its header"),
        (lambda d: d[:10], "too short"),
        (lambda d: b"", "too short"),
    ],
)
def test_bad_header_or_length(mutate: object, message: str) -> None:
    data = encode(sample_keystore(), HMAC_KEY)
    assert callable(mutate)
    with pytest.raises(CorruptState, match=message):
        decode(mutate(data), HMAC_KEY)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff\xfe",
        b"[]",
        b"{}",
        b'{"domains": {}}',
        b'{"domains": [1]}',
        b'{"domains": [], "domains": []}',
        b'{"domains": [{"name": "work"}]}',
    ],
)
def test_authentic_but_malformed_bodies(body: bytes) -> None:
    with pytest.raises(CorruptState):
        decode(raw_record(body), HMAC_KEY)


def _entry(**changes: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "name": "work",
        "qube_uuid": UUID1,
        "key_id": "0123456789abcdef",
        "created": "2026-01-31T12:00:00+00:00",
        "generation": 1,
        "key": "ab" * 64,
    }
    entry.update(changes)
    return entry


@pytest.mark.parametrize(
    "entries",
    [
        [_entry(name="work-dm")],
        [_entry(name=7)],
        [_entry(qube_uuid="nope")],
        [_entry(qube_uuid=UUID1.upper())],
        [_entry(key_id="0123")],
        [_entry(key_id="0123456789ABCDEF")],
        [_entry(created="yesterday")],
        [_entry(created=5)],
        [_entry(generation=0)],
        [_entry(generation=True)],
        [_entry(key="ab" * 32)],
        [_entry(key="AB" * 64)],
        [_entry(key=None)],
        [_entry(), _entry()],
        [_entry(), _entry(name="other")],  # same UUID twice
    ],
)
def test_invalid_entries(entries: list[dict[str, object]]) -> None:
    body = json.dumps({"domains": entries}).encode()
    with pytest.raises(CorruptState):
        decode(raw_record(body), HMAC_KEY)


def test_generation_zero_is_invalid() -> None:
    with pytest.raises(CorruptState, match="generation"):
        decode(raw_record(b'{"domains": []}', generation=0), HMAC_KEY)


def test_unknown_fields_are_preserved() -> None:
    doc = {
        "domains": [_entry(previous_keys=[{"key_id": "feedfacefeedface"}])],
        "policy_signing_key": {"public": "00ff"},
    }
    ks = decode(raw_record(json.dumps(doc).encode(), generation=5), HMAC_KEY)
    assert ks.extra == {"policy_signing_key": {"public": "00ff"}}
    assert ks.domains["work"].extra == {"previous_keys": [{"key_id": "feedfacefeedface"}]}
    # ...kept across a rewrite, and never shown in the public view.
    again = decode(encode(ks, HMAC_KEY), HMAC_KEY)
    assert again.extra == ks.extra
    assert again.domains["work"].extra == ks.domains["work"].extra
    assert "previous_keys" not in json.dumps(again.public_view())
    assert "policy_signing_key" not in json.dumps(again.public_view())


@given(st.binary(max_size=300))
def test_random_bytes_are_corrupt_state(data: bytes) -> None:
    with pytest.raises(CorruptState):
        decode(data, HMAC_KEY)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)


@given(st.dictionaries(st.sampled_from(["domains", "x"]), json_values, max_size=2))
def test_authentic_random_json_fails_only_with_corrupt_state(doc: dict[str, object]) -> None:
    try:
        ks = decode(raw_record(json.dumps(doc).encode()), HMAC_KEY)
    except CorruptState:
        return
    assert ks.domains == {}


names = st.from_regex(r"\A[a-zA-Z][a-zA-Z0-9_.-]{0,30}\Z").filter(
    lambda n: n not in ("Domain-0", "none", "default") and not n.endswith("-dm")
)
keystores = st.builds(
    lambda entries, generation: (entries, generation),
    st.dictionaries(names, st.one_of(st.none(), st.uuids().map(str)), max_size=8),
    st.integers(1, 2**64 - 1),
)


def build(entries: dict[str, str | None], generation: int) -> Keystore:
    ks = Keystore(generation=generation)
    seen: set[str] = set()
    for name, qube_uuid in entries.items():
        if qube_uuid in seen:
            qube_uuid = None
        if qube_uuid is not None:
            seen.add(qube_uuid)
        ks.add(name, qube_uuid=qube_uuid)
    return ks


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(keystores)
def test_random_keystores_round_trip(spec: tuple[dict[str, str | None], int]) -> None:
    ks = build(*spec)
    assert_same(decode(encode(ks, HMAC_KEY), HMAC_KEY), ks)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keystores, st.integers(0, 3))
def test_random_keystores_through_the_slots(
    spec: tuple[dict[str, str | None], int], extra_stores: int
) -> None:
    payload = MemPayload()
    ks = initialise(payload, HMAC_KEY)
    for entry in build(*spec).list():
        ks.add(entry.name, qube_uuid=entry.qube_uuid)
    for _ in range(1 + extra_stores):
        store(payload, ks, HMAC_KEY)
    assert_same(load(payload, HMAC_KEY), ks)


# --- slots and crash safety ------------------------------------------------------------------


def test_fresh_payload_is_not_an_empty_keystore() -> None:
    for p in (MemPayload(), MemPayload(fill=os.urandom(2 * SLOT))):
        with pytest.raises(CorruptState, match="not initialised"):
            load(p, HMAC_KEY)
        with pytest.raises(CorruptState, match="not initialised"):
            store(p, Keystore(generation=0), HMAC_KEY)


def test_initialise_writes_an_empty_generation_one() -> None:
    p = MemPayload(fill=os.urandom(2 * SLOT))
    ks = initialise(p, HMAC_KEY)
    assert ks.generation == 1
    loaded = load(p, HMAC_KEY)
    assert loaded.generation == 1
    assert loaded.domains == {}
    assert p.buf[SLOT:] == bytes(SLOT)  # slot B zeroed


def test_initialise_refuses_an_existing_keystore(payload: MemPayload) -> None:
    ks = load(payload, HMAC_KEY)
    ks.add("work")
    store(payload, ks, HMAC_KEY)
    with pytest.raises(UsageError, match="already holds a keystore"):
        initialise(payload, HMAC_KEY)
    # Even when the key is wrong: that record may be a real keystore.
    with pytest.raises(UsageError, match="invalid"):
        initialise(payload, OTHER_KEY)
    fresh = initialise(payload, HMAC_KEY, destroy_existing=True)
    assert fresh.generation == 1
    assert load(payload, HMAC_KEY).domains == {}
    assert [s.generation for s in slot_status(payload, HMAC_KEY)] == [1, None]


def test_store_increments_and_alternates_slots(payload: MemPayload) -> None:
    ks = load(payload, HMAC_KEY)
    assert ks.generation == 1
    for expected in range(2, 8):
        ks.add(f"q{expected}")
        store(payload, ks, HMAC_KEY)
        assert ks.generation == expected
        statuses = slot_status(payload, HMAC_KEY)
        newest = (expected - 1) % 2  # generation 1 in A, 2 in B, 3 in A...
        assert statuses[newest].generation == expected
        assert statuses[1 - newest].generation == expected - 1
        assert load(payload, HMAC_KEY).generation == expected
    assert sorted(load(payload, HMAC_KEY).domains) == [f"q{i}" for i in range(2, 8)]


def test_slots_are_written_whole_and_aligned(payload: MemPayload) -> None:
    ks = load(payload, HMAC_KEY)
    payload.writes.clear()
    store(payload, ks, HMAC_KEY)
    assert payload.writes == [(SLOT, SLOT)]


@pytest.mark.parametrize("history", [1, 2, 3])
def test_torn_write_at_every_sector_keeps_the_previous_generation(history: int) -> None:
    # history=1: the new record goes to slot B; 2: to A (over generation 1); 3: to B again.
    base = MemPayload()
    ks = initialise(base, HMAC_KEY)
    ks.add("work", qube_uuid=UUID1)
    for i in range(history - 1):
        ks.add(f"extra{i}")
        store(base, ks, HMAC_KEY)
    previous = load(base, HMAC_KEY)
    assert previous.generation == history
    target_offset = SLOT if history % 2 == 1 else 0

    def grow(k: Keystore) -> None:
        k.add("big-new-qube", qube_uuid=UUID2)
        for i in range(6):
            k.add(f"new{i}")

    probe = load(base, HMAC_KEY)
    grow(probe)
    record_len = len(encode(probe, HMAC_KEY, generation=history + 1))
    assert record_len > 3 * 512  # so that several torn writes cut the record itself
    for torn in range(0, SLOT + 1, 512):
        p = MemPayload(fill=bytes(base.buf))
        copy = load(p, HMAC_KEY)
        grow(copy)
        p.crash_after = torn
        with pytest.raises(Crash):
            store(p, copy, HMAC_KEY)
        assert p.writes[-1][0] == target_offset
        assert copy.generation == history  # not raised: the write did not complete
        after = load(p, HMAC_KEY)
        if torn < record_len:
            assert_same(after, previous)
        else:  # the whole record reached the disk, only padding was lost
            assert after.generation == history + 1
            assert "big-new-qube" in after.domains
        # ...and the next store succeeds, over the torn slot.
        after.add("later")
        store(p, after, HMAC_KEY)
        final = load(p, HMAC_KEY)
        assert "later" in final.domains
        assert final.generation == after.generation


def test_a_damaged_newest_slot_falls_back_to_the_previous(payload: MemPayload) -> None:
    ks = load(payload, HMAC_KEY)
    ks.add("work")
    store(payload, ks, HMAC_KEY)  # generation 2 in slot B
    payload.buf[SLOT + 100] ^= 0x40
    fallback = load(payload, HMAC_KEY)
    assert fallback.generation == 1
    statuses = slot_status(payload, HMAC_KEY)
    assert statuses[0].valid
    assert not statuses[1].valid
    assert "HMAC" in statuses[1].problem


def test_both_slots_damaged_is_corrupt_state(payload: MemPayload) -> None:
    ks = load(payload, HMAC_KEY)
    ks.add("work")
    store(payload, ks, HMAC_KEY)
    payload.buf[30] ^= 1
    payload.buf[SLOT + 30] ^= 1
    with pytest.raises(CorruptState, match="no valid keystore slot") as info:
        load(payload, HMAC_KEY)
    assert "slot A" in info.value.message
    assert "slot B" in info.value.message


def test_bit_flips_in_both_slots_anywhere_in_the_records(payload: MemPayload) -> None:
    ks = load(payload, HMAC_KEY)
    ks.add("work")
    store(payload, ks, HMAC_KEY)
    len_a = len(encode(Keystore(generation=1), HMAC_KEY))
    len_b = len(encode(ks, HMAC_KEY))
    for i in range(0, max(len_a, len_b) * 8, 7):  # every 7th bit: fast, still everywhere
        p = MemPayload(fill=bytes(payload.buf))
        p.buf[(i // 8) % len_a] ^= 1 << (i % 8)
        p.buf[SLOT + (i // 8) % len_b] ^= 1 << (i % 8)
        with pytest.raises(CorruptState):
            load(p, HMAC_KEY)


def test_wrong_hmac_key_cannot_load_or_store(payload: MemPayload) -> None:
    with pytest.raises(CorruptState, match="no valid keystore slot"):
        load(payload, OTHER_KEY)
    with pytest.raises(CorruptState):
        store(payload, Keystore(generation=1), OTHER_KEY)


def test_stale_copy_is_refused(payload: MemPayload) -> None:
    first, second = load(payload, HMAC_KEY), load(payload, HMAC_KEY)
    first.add("work")
    store(payload, first, HMAC_KEY)
    second.add("personal")
    before = bytes(payload.buf)
    with pytest.raises(StaleKeystore, match="generation 2"):
        store(payload, second, HMAC_KEY)
    assert bytes(payload.buf) == before


def test_keystore_too_large_for_a_slot() -> None:
    p = MemPayload(size=2048)  # two 1 KiB slots
    ks = initialise(p, HMAC_KEY)
    with pytest.raises(KeystoreFull, match="a slot holds 1024") as info:
        for i in range(20):
            ks.add(f"qube{i}")
            store(p, ks, HMAC_KEY)
    assert "grow" in info.value.diagnostics() or "larger" in info.value.diagnostics()
    loaded = load(p, HMAC_KEY)  # the last record that fitted is intact
    assert loaded.generation == ks.generation
    assert len(loaded.domains) == len(ks.domains) - 1


@pytest.mark.parametrize("size", [0, 512, 1000, 3000])
def test_bad_payload_geometry(size: int) -> None:
    p = MemPayload(size=size)
    with pytest.raises(UsageError, match="multiple of 512 bytes and at least 1024"):
        initialise(p, HMAC_KEY)


def test_an_odd_number_of_sectors_leaves_the_last_one_unused() -> None:
    p = MemPayload(size=1536)
    ks = initialise(p, HMAC_KEY)
    store(p, ks, HMAC_KEY)
    assert p.writes == [(0, 512), (512, 512), (512, 512)]
    assert load(p, HMAC_KEY).generation == 2


def test_removed_key_is_erased_from_both_slots(payload: MemPayload) -> None:
    ks = load(payload, HMAC_KEY)
    key_hex = ks.add("work", qube_uuid=UUID1).key.reveal().hex().encode()
    ks.add("personal")
    store(payload, ks, HMAC_KEY)
    ks.add("vault")
    store(payload, ks, HMAC_KEY)  # now both slots hold the "work" key
    assert bytes(payload.buf).count(key_hex) == 2
    generation = ks.generation
    ks.remove("work")
    store(payload, ks, HMAC_KEY)  # erase_previous by default after a removal
    assert key_hex not in bytes(payload.buf)
    assert ks.generation == generation + 2
    assert [s.generation for s in slot_status(payload, HMAC_KEY)] == [
        generation + 2,
        generation + 1,
    ] or [s.generation for s in slot_status(payload, HMAC_KEY)] == [
        generation + 1,
        generation + 2,
    ]
    # Without removals a store writes one slot only.
    payload.writes.clear()
    store(payload, ks, HMAC_KEY)
    assert len(payload.writes) == 1


def test_shrinking_record_leaves_no_stale_key_in_the_slack(payload: MemPayload) -> None:
    ks = load(payload, HMAC_KEY)
    for name in ("a", "b", "c"):
        ks.add(name)
    store(payload, ks, HMAC_KEY)
    store(payload, ks, HMAC_KEY)
    keys = [ks.get(n).key.reveal().hex().encode() for n in ("a", "b", "c")]
    for name in ("a", "b", "c"):
        ks.remove(name)
    store(payload, ks, HMAC_KEY, erase_previous=True)
    for key in keys:
        assert key not in bytes(payload.buf)


def test_generation_in_memory_matches_disk_after_load(payload: MemPayload) -> None:
    ks = load(payload, HMAC_KEY)
    ks.add("work", qube_uuid=UUID1)
    store(payload, ks, HMAC_KEY)
    again = load(payload, HMAC_KEY)
    assert again.generation == ks.generation == 2
    assert (
        again.get("work", qube_uuid=str(uuid.UUID(UUID1))).key
        == ks.get("work", qube_uuid=UUID1).key
    )


def test_domain_key_dataclass_fields() -> None:
    entry = DomainKey.new("work", qube_uuid=UUID1)
    assert entry.public_view() == {
        "name": "work",
        "qube_uuid": UUID1,
        "key_id": entry.key_id,
        "created": entry.created,
        "generation": 1,
    }
