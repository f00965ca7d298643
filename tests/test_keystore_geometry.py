"""The keystore's recorded geometry, from the attacker's (and the careless admin's) side.

The container's LUKS2 data segment is ``dynamic``: the payload follows the file or logical
volume.  Before the geometry was recorded, slot B sat at half the *current* size, so growing
the container (what the "keystore full" hint said to do) or shrinking it moved slot B: the
unlock fell back to the older slot A and the newest keys were silently lost, and a write
after a truncation landed on the real slot B.  Now the records say where the slots are; a
resized payload is refused (exit 7) and nothing is read out or written; ``qubes-seal grow``
moves the keystore crash-safely (SIGKILL at every step, torn writes at every sector).
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from machine import U1, U2, Box
from test_keystore import HMAC_KEY, SLOT, Crash, MemPayload, assert_same
from test_rotate import cli, status_of

from qubes_seal import chain, handover
from qubes_seal.errors import CorruptState, UsageError
from qubes_seal.keystore import (
    ContainerResized,
    Geometry,
    GrowInterrupted,
    Keystore,
    KeystoreFull,
    encode,
    grow_step,
    initialise,
    load,
    recorded_geometry,
    slot_status,
    store,
)
from qubes_seal.keystore.codec import HEADER, decode_record
from qubes_seal.luks.container import Container
from qubes_seal.luks.payload import UserspacePayload

MIB = 1 << 20
GROW_STEPS = ["begun", "intent-written", "extended", "slot-b-moved", "slot-a-rewritten"]


# --- the payload, in memory -----------------------------------------------------------------


def resize(p: MemPayload, size: int) -> None:
    """What truncate(1) or lvextend/lvreduce do to the payload (new space: random bytes)."""
    if size > len(p.buf):
        p.buf += os.urandom(size - len(p.buf))
    else:
        del p.buf[size:]


def filled(p: MemPayload, names: list[str]) -> Keystore:
    """The keystore of ``p`` with a key added and stored for each of ``names``."""
    ks = load(p, HMAC_KEY)
    for name in names:
        ks.add(name)
        store(p, ks, HMAC_KEY)
    return ks


def newest_slot(p: MemPayload) -> int:
    statuses = slot_status(p, HMAC_KEY)
    return max(range(2), key=lambda i: statuses[i].generation or 0)


@pytest.mark.parametrize("n_keys", [1, 2])  # the newest copy in slot A, then in slot B
def test_a_grown_payload_is_refused_and_nothing_is_written(n_keys: int) -> None:
    p = MemPayload()
    initialise(p, HMAC_KEY)
    ks = filled(p, [f"q{i}" for i in range(n_keys)])
    assert newest_slot(p) == n_keys % 2
    before = bytes(p.buf)
    resize(p, len(p.buf) + 4096)
    with pytest.raises(ContainerResized, match="grew to 20480 bytes") as info:
        load(p, HMAC_KEY)
    assert info.value.exit_code == 7
    assert "qubes-seal grow" in info.value.diagnostics()
    ks.add("lost-before")
    with pytest.raises(ContainerResized):
        store(p, ks, HMAC_KEY)
    assert bytes(p.buf[: len(before)]) == before  # not one byte written
    resize(p, len(before))
    assert "lost-before" not in load(p, HMAC_KEY).domains
    assert sorted(load(p, HMAC_KEY).domains) == [f"q{i}" for i in range(n_keys)]


@pytest.mark.parametrize("cut", [512, 4096, SLOT])
def test_a_shrunk_payload_is_refused_and_nothing_is_written(cut: int) -> None:
    p = MemPayload()
    initialise(p, HMAC_KEY)
    ks = filled(p, ["work", "personal", "vault"])
    kept = bytes(p.buf)
    resize(p, len(p.buf) - cut)
    with pytest.raises(ContainerResized) as info:
        load(p, HMAC_KEY)
    assert info.value.exit_code == 7
    with pytest.raises(CorruptState):
        store(p, ks, HMAC_KEY)
    assert bytes(p.buf) == kept[: len(p.buf)]
    assert "shrank" in info.value.message and "restore its size" in info.value.diagnostics()
    p.buf += kept[len(p.buf) :]  # the size (and what the truncation cut) restored
    assert_same(load(p, HMAC_KEY), ks)


def test_the_geometry_is_in_the_authenticated_header() -> None:
    p = MemPayload()
    initialise(p, HMAC_KEY)
    record = bytes(p.buf[:512])
    version = HEADER.unpack_from(record)[1]
    assert version == 2
    assert struct.unpack_from(">QQQQQ", record, 24) == (2 * SLOT, 0, SLOT, SLOT, 0)
    assert recorded_geometry(p, HMAC_KEY) == Geometry.for_size(2 * SLOT)
    # An evil maid cannot move slot B by editing the geometry: the HMAC covers it.
    for offset in range(24, 64):
        q = MemPayload(fill=bytes(p.buf))
        q.buf[offset] ^= 0x10
        with pytest.raises(CorruptState):
            load(q, HMAC_KEY)


def test_a_record_counts_only_at_the_offset_its_geometry_names() -> None:
    p = MemPayload(size=4 * SLOT)
    initialise(p, HMAC_KEY)
    ks = filled(p, ["work", "vault"])  # generation 3 in slot A, 2 in slot B (at 2 * SLOT)
    # An evil maid copies the newest record where slot B of a half-size payload lies,
    # destroys slot A and shrinks the payload: that copy is not taken for slot B.
    p.buf[SLOT : SLOT + 1024] = p.buf[:1024]
    p.buf[:512] = bytes(512)
    resize(p, 2 * SLOT)
    statuses = slot_status(p, HMAC_KEY)
    assert statuses[1].offset == SLOT and not statuses[1].valid
    assert "a layout with slot B at 16384" in statuses[1].problem
    with pytest.raises(CorruptState, match="no valid keystore slot"):
        load(p, HMAC_KEY)
    with pytest.raises(CorruptState):
        store(p, ks, HMAC_KEY)


def test_keystore_full_names_the_grow_command() -> None:
    p = MemPayload(size=2048)
    ks = initialise(p, HMAC_KEY)
    with pytest.raises(KeystoreFull) as info:
        for i in range(20):
            ks.add(f"qube{i}")
            store(p, ks, HMAC_KEY)
    assert "qubes-seal grow --size" in info.value.diagnostics()


# --- containers from before the geometry (format version 1) ---------------------------------


def legacy(p: MemPayload, names: list[str]) -> Keystore:
    """``p`` as the code before the geometry wrote it: two version 1 records at 0 and size/2."""
    ks = Keystore(generation=1)
    half = len(p.buf) // 2
    for index, name in enumerate(names):
        ks.add(name)
        record = encode(ks, HMAC_KEY, generation=index + 1)
        offset = 0 if index % 2 == 0 else half
        p.buf[offset : offset + half] = record + bytes(half - len(record))
    ks.generation = len(names)
    return ks


def test_a_legacy_keystore_reads_and_its_next_write_records_the_geometry() -> None:
    p = MemPayload()
    ks = legacy(p, ["work", "vault", "personal"])
    assert_same(load(p, HMAC_KEY), ks)
    assert recorded_geometry(p, HMAC_KEY) == Geometry.for_size(2 * SLOT)
    ks.add("new")
    store(p, ks, HMAC_KEY)  # into slot B (the older one): version 2 there
    versions = [HEADER.unpack_from(p.buf, off)[1] for off in (0, SLOT)]
    assert versions == [1, 2]
    store(p, ks, HMAC_KEY)
    assert [HEADER.unpack_from(p.buf, off)[1] for off in (0, SLOT)] == [2, 2]
    assert_same(load(p, HMAC_KEY), ks)


def test_a_resized_legacy_keystore_is_refused_not_read_through_slot_a() -> None:
    p = MemPayload()
    legacy(p, ["work", "vault"])  # the newest ("vault") in slot B at size/2
    resize(p, len(p.buf) + 2048)
    with pytest.raises(ContainerResized, match="no second slot"):
        load(p, HMAC_KEY)
    with pytest.raises(ContainerResized):
        store(p, Keystore(generation=1), HMAC_KEY)


def test_a_torn_legacy_slot_is_still_a_torn_write() -> None:
    p = MemPayload()
    ks = legacy(p, ["work", "vault"])
    p.buf[SLOT + 100] ^= 1  # slot B torn: its record fails, its magic is there
    loaded = load(p, HMAC_KEY)
    assert loaded.generation == 1
    ks.wipe()


# --- growing, one step at a time, torn anywhere ---------------------------------------------


def grow_all(p: MemPayload, target: int) -> list[str]:
    steps = []
    while (step := grow_step(p, HMAC_KEY, target)) is not None:
        if step == "needs-space":
            resize(p, target)
        steps.append(step)
        assert len(steps) < 10
    return steps


def assert_layout(p: MemPayload, size: int) -> None:
    g = Geometry.for_size(size)
    for offset in (g.slot_a, g.slot_b):
        raw = bytes(p.buf[offset : offset + g.slot_size])
        length = HEADER.unpack_from(raw)[3] + 64 + 32
        assert decode_record(raw[:length], HMAC_KEY)[1] == g


@pytest.mark.parametrize("start", ["A", "B", "legacy"])
def test_grow_moves_both_slots_and_keeps_every_key(start: str) -> None:
    p = MemPayload()
    if start == "legacy":
        ks = legacy(p, ["work", "vault", "personal"])
    else:
        initialise(p, HMAC_KEY)
        ks = filled(p, ["work", "vault"] if start == "A" else ["work"])
    steps = grow_all(p, 5 * SLOT)
    assert steps[-2:] == ["slot-b-moved", "slot-a-rewritten"]
    assert "needs-space" in steps
    assert_layout(p, 5 * SLOT)
    loaded = load(p, HMAC_KEY)
    assert loaded.public_view()["domains"] == ks.public_view()["domains"]
    for name in ks.domains:
        assert loaded.domains[name].key == ks.domains[name].key
    assert grow_step(p, HMAC_KEY, 5 * SLOT) is None  # nothing left to do
    for i in range(40):  # what did not fit in 8 KiB slots now does
        loaded.add(f"more{i}")
    store(p, loaded, HMAC_KEY)
    assert len(load(p, HMAC_KEY).domains) == len(ks.domains) + 40


def test_grow_refuses_to_shrink_and_a_shrunk_payload() -> None:
    p = MemPayload()
    initialise(p, HMAC_KEY)
    with pytest.raises(UsageError, match="cannot shrink"):
        grow_step(p, HMAC_KEY, SLOT)
    resize(p, SLOT + 4096)
    with pytest.raises(ContainerResized):
        grow_step(p, HMAC_KEY, 4 * SLOT)


def test_a_write_during_an_unfinished_grow_is_refused() -> None:
    p = MemPayload()
    initialise(p, HMAC_KEY)
    ks = filled(p, ["work"])
    assert grow_step(p, HMAC_KEY, 4 * SLOT) == "intent-written"
    assert_same(load(p, HMAC_KEY), Keystore(ks.domains, generation=ks.generation + 1))
    with pytest.raises(GrowInterrupted):
        store(p, load(p, HMAC_KEY), HMAC_KEY)
    # grow_step to the current size cancels the announcement: writes work again.
    assert grow_all(p, 2 * SLOT)
    store(p, load(p, HMAC_KEY), HMAC_KEY)


@pytest.mark.parametrize("start", ["A", "B"])
def test_a_grow_torn_at_every_sector_of_every_write_loses_nothing(start: str) -> None:
    target = 3 * SLOT  # the new slot B (12 KiB) overlaps the old one (8 KiB..16 KiB)
    base = MemPayload()
    initialise(base, HMAC_KEY)
    ks = filled(base, ["work", "vault"] if start == "A" else ["work"])
    for i in range(6):
        ks.add(f"big-{i}")
    store(base, ks, HMAC_KEY)
    assert len(encode(ks, HMAC_KEY)) > 3 * 512  # so that torn writes cut records
    expected = {name: ks.domains[name].key for name in ks.domains}
    # Walk the grow; at each write, tear it at every sector and check the survivors.
    walk = MemPayload(fill=bytes(base.buf))
    tested = 0
    while True:
        snapshot = bytes(walk.buf)
        probe = MemPayload(size=len(snapshot), fill=snapshot)
        step = grow_step(probe, HMAC_KEY, target)
        if step is None:
            break
        if step == "needs-space":
            resize(walk, target)
            continue
        _, length = probe.writes[-1]
        for torn in range(0, length, 512):
            p = MemPayload(size=len(snapshot), fill=snapshot)
            p.crash_after = torn
            with pytest.raises(Crash):
                grow_step(p, HMAC_KEY, target)
            after = load(p, HMAC_KEY)  # the unlock: every key, at this size
            assert {n: after.domains[n].key for n in after.domains} == expected
            after.wipe()
            grow_all(p, target)  # ... and the grow finishes from there
            assert_layout(p, target)
            tested += 1
        walk = probe
    assert_layout(walk, target)
    assert tested > 50


# --- the real container, through the CLI ----------------------------------------------------


def keys(b: Box) -> dict[str, str]:
    listed = b.cli("domain", "list", "--json")
    assert listed.code == 0, listed.err
    out = {}
    for d in listed.json()["domains"]:
        args = ["--uuid", d["qube_uuid"]] if d["qube_uuid"] else []
        shown = b.cli("domain", "show", d["name"], *args, "--show-key", "--json")
        assert shown.code == 0, shown.err
        out[d["name"]] = shown.json()["key"]
    return out


def prepared(b: Box) -> dict[str, str]:
    """Boot, unlock, three keys (the newest generation in slot A): their keys."""
    b.boot()
    assert b.unlock().code == 0
    for name, extra in (("work", ["--uuid", U1]), ("personal", []), ("vault", ["--uuid", U2])):
        res = b.cli("domain", "add", name, *extra)
        assert res.code == 0, res.err
    return keys(b)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def reboot_and_unlock(b: Box) -> None:
    chain.lock(b.container)
    b.boot()
    res = b.unlock()
    assert res.code == 0, res.err


@pytest.mark.parametrize("change", ["+1M", "-1M"])
def test_a_resized_container_is_refused_with_exit_7_and_loses_nothing(
    box: Box, change: str
) -> None:
    before = prepared(box)
    size = box.container.stat().st_size
    os.truncate(box.container, size + (MIB if change == "+1M" else -MIB))
    data = digest(box.container)
    what = "grew" if change == "+1M" else "shrank"
    # With this boot's hand-over (the key service's path, and domain add/list's) ...
    for args in (["domain", "list"], ["domain", "add", "later"], ["grow"] if what == "shrank"
                 else ["domain", "show", "work", "--uuid", U1]):  # fmt: skip
        res = box.cli(*args)
        assert res.code == 7, (args, res.err)
        assert what in res.err
    # ... and at the next boot's unlock.
    chain.lock(box.container)
    box.boot()
    res = box.unlock()
    assert res.code == 7, res.err
    assert ("qubes-seal grow" if what == "grew" else "restore its size") in res.err
    res = box.cli("domain", "add", "later", pw=box.pw)
    assert res.code != 0
    assert digest(box.container) == data  # nothing written
    os.truncate(box.container, size)
    reboot_and_unlock(box)
    assert keys(box) == before


@pytest.mark.parametrize("delta", [-MIB, 512, MIB])
def test_a_header_that_lies_about_the_data_size_is_refused(box: Box, delta: int) -> None:
    """The evil maid's variant: the file keeps its size, the LUKS2 segment gets a fixed one."""
    from luks_util import rewrite_metadata

    before = prepared(box)
    size = Container(box.container).data_size

    def fixed(meta: dict[str, Any]) -> dict[str, Any]:
        meta["segments"]["0"]["size"] = str(size + delta)
        return meta

    rewrite_metadata(box.container, fixed)
    data = digest(box.container)
    for args in (["domain", "list"], ["domain", "add", "later"]):
        res = box.cli(*args)  # this boot's hand-over: no PCR 13 in the way
        assert res.code == 7, (args, res.err)
        assert ("shrank" if delta < 0 else "grew") in res.err
    assert digest(box.container) == data
    rewrite_metadata(box.container, lambda meta: {**meta, "segments": {
        "0": {**meta["segments"]["0"], "size": "dynamic"}}})  # fmt: skip
    assert keys(box) == before


def test_grow_a_file_then_every_key_is_there_and_more_fit(box: Box) -> None:
    before = prepared(box)
    res = box.cli("grow", "--size", "24M", "--json")
    assert res.code == 0, res.err
    doc = res.json()
    assert doc["steps"][-2:] == ["slot-b-moved", "slot-a-rewritten"]
    assert "extended" in doc["steps"]
    data_offset = Container(box.container).data_offset
    assert doc["after"]["payload_size"] == 24 * MIB - data_offset
    assert doc["after"]["slot_size"] > doc["before"]["slot_size"]
    assert box.container.stat().st_size == 24 * MIB
    assert box.cli("grow", "--size", "24M", "--json").json()["steps"] == []
    reboot_and_unlock(box)
    assert box.cli("domain", "add", "later").code == 0
    after = keys(box)
    assert {k: after[k] for k in before} == before and "later" in after
    res = box.cli("grow", "--size", "16M")
    assert res.code == 2 and "shrinking is not supported" in res.err


def test_grow_adopts_a_size_changed_behind_its_back(box: Box) -> None:
    before = prepared(box)
    os.truncate(box.container, box.container.stat().st_size + 3 * MIB)  # "lvextend"
    assert box.cli("domain", "list").code == 7
    res = box.cli("grow", "--json")  # this boot's hand-over
    assert res.code == 0, res.err
    assert res.json()["after"]["payload_size"] == Container(box.container).data_size
    reboot_and_unlock(box)
    assert keys(box) == before


def test_grow_after_a_refused_boot_with_the_recovery_key(box: Box) -> None:
    before = prepared(box)
    os.truncate(box.container, box.container.stat().st_size + MIB)  # before the boot
    chain.lock(box.container)
    box.boot()
    res = box.cli("grow", pw=box.pw)  # no hand-over; the passphrase unlock is refused
    assert res.code == 7 and "--recovery-key-file" in res.err
    res = box.cli("grow", "--recovery-key-file", str(box.rk))
    assert res.code == 0, res.err
    reboot_and_unlock(box)
    assert keys(box) == before


@pytest.mark.parametrize("step", GROW_STEPS)
def test_grow_killed_at_each_step_unlocks_with_every_key_and_repair_finishes(
    box: Box, step: str
) -> None:
    before = prepared(box)
    res = cli(box, "grow", "--size", "20M", crash_at=step)
    assert res.code != 0
    assert status_of(box)["journal"]["op"] == "grow"
    res = box.cli("domain", "add", "meanwhile")  # one operation at a time
    assert res.code == 2 and "repair" in res.err
    reboot_and_unlock(box)  # the power cut: the next boot unlocks ...
    assert keys(box) == before  # ... with every key
    res = box.cli("repair", "--json")
    assert res.code == 0, res.err
    assert (res.json()["repaired"], res.json()["action"]) == ("grow", "completed")
    assert status_of(box)["journal"] is None
    assert box.container.stat().st_size == 20 * MIB
    assert box.cli("domain", "add", "later").code == 0
    reboot_and_unlock(box)
    after = keys(box)
    assert {k: after[k] for k in before} == before and "later" in after
    vk = handover.get(Container(box.container).uuid)
    assert vk is not None
    with vk, UserspacePayload(Container(box.container), vk) as payload:
        from qubes_seal.keystore import hmac_key_from_volume_key

        with hmac_key_from_volume_key(vk) as hkey:
            assert recorded_geometry(payload, hkey) == Geometry.for_size(payload.size)
            assert all(s.valid for s in slot_status(payload, hkey))


def test_an_interrupted_grow_is_finished_by_running_grow_again(box: Box) -> None:
    before = prepared(box)
    assert cli(box, "grow", "--size", "20M", crash_at="extended").code != 0
    res = box.cli("grow", "--size", "24M")
    assert res.code == 2 and "pending" in res.err
    res = box.cli("grow", "--json")
    assert res.code == 0, res.err
    assert res.json()["resumed"] is True
    reboot_and_unlock(box)
    assert keys(box) == before


def test_a_container_from_before_the_geometry_unlocks_and_migrates(box: Box) -> None:
    before = prepared(box)
    container = Container(box.container)
    vk = handover.get(container.uuid)
    assert vk is not None
    from qubes_seal.keystore import hmac_key_from_volume_key

    with vk, hmac_key_from_volume_key(vk) as hkey, UserspacePayload(container, vk) as payload:
        ks = load(payload, hkey)  # rewritten as the code before this change wrote it
        half = payload.size // 2
        for offset, generation in ((0, ks.generation), (half, ks.generation - 1)):
            record = encode(ks, hkey, generation=generation)
            payload.write(offset, record + bytes(-len(record) % 512))
        ks.wipe()
    reboot_and_unlock(box)
    assert keys(box) == before
    assert box.cli("domain", "add", "later").code == 0  # the first write migrates
    res = box.cli("grow", "--json")  # and grow without a size finishes the migration
    assert res.code == 0, res.err
    reboot_and_unlock(box)
    assert set(keys(box)) == {*before, "later"}
