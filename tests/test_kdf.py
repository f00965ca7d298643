"""The passphrase path: Argon2id halves, HKDF LUKS key, parameters and calibration."""

from __future__ import annotations

import hashlib
import hmac
import re
import time
from typing import Any

import pytest
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from machine import Box

from qubes_seal.errors import CorruptState, UsageError
from qubes_seal.kdf import KdfParams, calibrate, derive, luks_key, new_salt, params_for
from qubes_seal.kdf import calibration as calibrate_mod
from qubes_seal.kdf import params as params_mod
from qubes_seal.secret import Secret

SALT = bytes(range(32))
# Cheap parameters: 64 KiB, 1 pass, 1 lane (Argon2's minimum is 8 KiB per lane).
CHEAP = KdfParams(time_cost=1, memory_kib=64, parallelism=1, salt=SALT)

passphrases = st.binary(min_size=1, max_size=64)
salts = st.binary(min_size=32, max_size=32)
masters = st.binary(min_size=32, max_size=32)
fast = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def cheap(salt: bytes = SALT) -> KdfParams:
    return KdfParams(time_cost=1, memory_kib=64, parallelism=1, salt=salt)


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 written out with hmac, independent of ``cryptography``."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


# --- the construction, checked against independent implementations -----------------------


def test_derive_is_argon2id_split_in_halves() -> None:
    params = KdfParams(time_cost=2, memory_kib=64, parallelism=1, salt=SALT)
    auth, mix = derive(Secret(b"correct horse battery staple"), params)
    # pyca/cryptography's Argon2id (OpenSSL), not argon2-cffi: an independent implementation.
    expected = Argon2id(salt=SALT, length=64, iterations=2, lanes=1, memory_cost=64).derive(
        b"correct horse battery staple"
    )
    assert auth.reveal() == expected[:32]
    assert mix.reveal() == expected[32:]
    # Pinned: changing the derivation would lock every user out of their container.
    assert auth.reveal().hex() == (
        "5581b74e10c4e0d896dac22ffca0e41473b6acf5f2efd79fd75f2333bc9284bd"
    )
    assert mix.reveal().hex() == (
        "8001502a469d01ca96d89e706fb8571c639125dabca04b95cd0f112ef78d6f5e"
    )


def test_luks_key_is_hkdf_of_master_and_mix_half() -> None:
    master, mix = Secret(b"\x11" * 32), Secret(b"\x22" * 32)
    key = luks_key(master, mix, CHEAP, context=b"container-uuid")
    expected = hkdf_sha256(
        b"\x11" * 32 + b"\x22" * 32, SALT, b"qubes-seal luks key v1" + b"container-uuid", 32
    )
    assert key.reveal() == expected
    assert len(key) == 32


def test_empty_passphrase_is_refused() -> None:
    with pytest.raises(UsageError, match="empty"):
        derive(Secret(b""), CHEAP)


def test_luks_key_needs_both_inputs() -> None:
    with pytest.raises(UsageError):
        luks_key(Secret(b""), Secret(b"x" * 32), CHEAP)
    with pytest.raises(UsageError):
        luks_key(Secret(b"x" * 32), Secret(b""), CHEAP)


def test_results_are_redacted_secrets() -> None:
    auth, mix = derive(Secret(b"hunter2"), CHEAP)
    for s in (auth, mix, luks_key(Secret(b"m" * 32), mix, CHEAP)):
        assert isinstance(s, Secret)
        assert s.reveal().hex() not in repr(s)
        assert "redacted" in repr(s)


# --- properties ------------------------------------------------------------------------------


@fast
@given(passphrases, salts, masters, st.binary(max_size=32))
def test_deterministic(pw: bytes, salt: bytes, master: bytes, context: bytes) -> None:
    params = cheap(salt)
    a1, m1 = derive(Secret(pw), params)
    a2, m2 = derive(Secret(pw), KdfParams.from_json(params.to_json()))
    assert a1 == a2
    assert m1 == m2
    k1 = luks_key(Secret(master), m1, params, context=context)
    k2 = luks_key(Secret(master), m2, params, context=context)
    assert k1 == k2


@fast
@given(passphrases, passphrases, masters)
def test_different_passphrases_give_different_keys(pw1: bytes, pw2: bytes, master: bytes) -> None:
    if pw1 == pw2:
        return
    a1, m1 = derive(Secret(pw1), CHEAP)
    a2, m2 = derive(Secret(pw2), CHEAP)
    assert a1 != a2
    assert m1 != m2
    assert luks_key(Secret(master), m1, CHEAP) != luks_key(Secret(master), m2, CHEAP)


@fast
@given(passphrases, salts, salts, masters)
def test_different_salts_give_different_keys(
    pw: bytes, s1: bytes, s2: bytes, master: bytes
) -> None:
    if s1 == s2:
        return
    a1, m1 = derive(Secret(pw), cheap(s1))
    a2, m2 = derive(Secret(pw), cheap(s2))
    assert a1 != a2
    assert m1 != m2
    # The salt also enters HKDF: the same mix half under another salt gives another key.
    assert luks_key(Secret(master), m1, cheap(s1)) != luks_key(Secret(master), m1, cheap(s2))


@fast
@given(passphrases, masters, masters, st.binary(max_size=16), st.binary(max_size=16))
def test_different_master_or_context_gives_different_keys(
    pw: bytes, master1: bytes, master2: bytes, ctx1: bytes, ctx2: bytes
) -> None:
    _auth, mix = derive(Secret(pw), CHEAP)
    if master1 != master2:
        assert luks_key(Secret(master1), mix, CHEAP) != luks_key(Secret(master2), mix, CHEAP)
    if ctx1 != ctx2:
        k1 = luks_key(Secret(master1), mix, CHEAP, context=ctx1)
        k2 = luks_key(Secret(master1), mix, CHEAP, context=ctx2)
        assert k1 != k2


@fast
@given(passphrases, masters)
def test_halves_are_independent(pw: bytes, master: bytes) -> None:
    auth, mix = derive(Secret(pw), CHEAP)
    assert len(auth) == len(mix) == 32
    assert auth != mix
    key = luks_key(Secret(master), mix, CHEAP)
    # The TPM sees auth_half only: the LUKS key depends on the mix half, not on auth_half.
    assert key != luks_key(Secret(master), auth, CHEAP)
    assert key.reveal() not in (auth.reveal(), mix.reveal(), master)


# --- KdfParams -------------------------------------------------------------------------------


def test_new_salt() -> None:
    a, b = new_salt(), new_salt()
    assert len(a) == len(b) == 32
    assert a != b


@given(
    st.integers(1, params_mod.MAX_TIME_COST),
    st.integers(1, params_mod.MAX_PARALLELISM),
    st.integers(0, params_mod.MAX_MEMORY_KIB),
    salts,
)
def test_params_json_round_trip(t: int, p: int, m: int, salt: bytes) -> None:
    m = max(m, 8 * p)
    t = max(1, min(t, params_mod.MAX_WORK_KIB // m))  # within the work cap
    params = KdfParams(time_cost=t, memory_kib=m, parallelism=p, salt=salt)
    doc = params.to_json()
    assert doc["type"] == "argon2id"
    assert KdfParams.from_json(doc) == params


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("time_cost", 0),
        ("time_cost", -1),
        ("time_cost", 2**20 + 1),  # past the cap (a hostile token's 2^32-1 hung the boot)
        ("time_cost", 2**32 - 1),
        ("time_cost", 2**32),
        ("time_cost", True),
        ("time_cost", 1.0),
        ("time_cost", "1"),
        ("memory_kib", 7),  # below 8 KiB per lane
        ("memory_kib", 4 * 1024 * 1024 + 1),
        ("parallelism", 0),
        ("parallelism", 17),  # past the cap: argon2 would start that many threads
        ("parallelism", 2**24 - 1),
        ("salt", "00" * 16),  # too short
        ("salt", "00" * 33),  # too long
        ("salt", "00" * 10**6),  # huge: refused on its length, before any decoding
        ("salt", "zz" * 32),
        ("salt", "AA" * 32),
        ("salt", None),
        ("type", "argon2i"),
        ("type", "x" * 10**6),
        ("version", 0x10),
        ("surprise", 1),
        ("hash_len", 2**31),  # the output length is fixed, never read from the token
    ],
)
def test_params_from_json_rejects(field: str, value: Any) -> None:
    doc = cheap().to_json()
    doc[field] = value
    with pytest.raises(CorruptState, match="KDF parameters") as info:
        KdfParams.from_json(doc)
    assert info.value.exit_code == 7
    assert "recovery key" in info.value.diagnostics()
    assert len(info.value.message) < 200  # a huge hostile value is never echoed whole


@pytest.mark.parametrize(
    ("time_cost", "memory_kib", "parallelism", "ok"),
    [
        (params_mod.MAX_TIME_COST, 64, 1, True),  # the pass cap, at its edge
        (params_mod.MAX_TIME_COST + 1, 64, 1, False),
        (1, params_mod.MAX_MEMORY_KIB, 1, True),
        (16, params_mod.MAX_MEMORY_KIB, 4, True),  # exactly the work cap (64 GiB of passes)
        (17, params_mod.MAX_MEMORY_KIB, 4, False),
        (params_mod.MAX_WORK_KIB // 1000, 1000, 1, True),
        (params_mod.MAX_WORK_KIB // 1000 + 1, 1000, 1, False),
        (1, 8 * 16, 16, True),  # the lane cap, with its minimum memory
        (1, 8 * 17, 17, False),
    ],
)
def test_params_caps_boundaries(
    time_cost: int, memory_kib: int, parallelism: int, ok: bool
) -> None:
    doc = {**cheap().to_json(), "time_cost": time_cost, "memory_kib": memory_kib,
           "parallelism": parallelism}  # fmt: skip
    if ok:
        assert KdfParams.from_json(doc).time_cost == time_cost
    else:
        with pytest.raises(CorruptState, match="hostile"):
            KdfParams.from_json(doc)
        with pytest.raises(UsageError):  # init cannot make such parameters either
            KdfParams(time_cost=time_cost, memory_kib=memory_kib, parallelism=parallelism,
                      salt=SALT)  # fmt: skip


@given(
    st.integers(1, 2**40),
    st.integers(8, 2**33),
    st.integers(1, 2**25),
)
@settings(max_examples=300)
def test_params_from_json_accepts_exactly_within_caps(t: int, m: int, p: int) -> None:
    doc = {**cheap().to_json(), "time_cost": t, "memory_kib": m, "parallelism": p}
    within = (
        t <= params_mod.MAX_TIME_COST
        and 8 * p <= m <= params_mod.MAX_MEMORY_KIB
        and p <= params_mod.MAX_PARALLELISM
        and t * m <= params_mod.MAX_WORK_KIB
    )
    if within:
        assert KdfParams.from_json(doc).memory_kib == m
    else:
        with pytest.raises(CorruptState):
            KdfParams.from_json(doc)


def test_calibration_results_stay_within_the_caps() -> None:
    # The most a calibrated derivation asks for (1 GiB, 4 lanes, ~10 passes on a fast
    # machine) and the test suite's explicit tiny memory are far inside the caps.
    assert params_mod.MAX_WORK_KIB >= 4 * 10 * 1024 * 1024  # 4x headroom on 10 x 1 GiB
    fast_tiny = params_for(time_ms=20, memory_kib=16, parallelism=2)
    assert fast_tiny.time_cost < params_mod.MAX_TIME_COST


@given(st.dictionaries(st.text(max_size=12), st.none() | st.integers() | st.text(max_size=8)))
def test_params_from_json_fuzz_raises_only_corrupt_state(doc: dict[str, Any]) -> None:
    with pytest.raises(CorruptState):
        KdfParams.from_json(doc)


@pytest.mark.parametrize("doc", [None, [], "argon2id", 7])
def test_params_from_json_rejects_non_objects(doc: object) -> None:
    with pytest.raises(CorruptState):
        KdfParams.from_json(doc)


def test_params_constructor_validates_with_usage_error() -> None:
    with pytest.raises(UsageError, match="8 KiB per lane"):
        KdfParams(time_cost=1, memory_kib=31, parallelism=4, salt=SALT)
    with pytest.raises(UsageError, match="salt"):
        KdfParams(time_cost=1, memory_kib=64, parallelism=1, salt=b"short")


# --- calibration -----------------------------------------------------------------------------


def test_calibration_small_target_lands_within_factor_two() -> None:
    """What the calibration chose is what it measured within a factor two of the target (or,
    out of budget, a cost moved towards it).  Judged on the calibration's own measurements
    (its progress messages), not on a second timing here: the suite runs on every core
    (pytest-xdist), and a later timing would measure the machine's load of that moment.
    Calibration and unlock times: benchmarks/unlock.py."""
    messages: list[str] = []
    params = calibrate(target_ms=50, memory_kib=8192, progress=messages.append)
    assert params.memory_kib == 8192
    assert params.parallelism == calibrate_mod.default_parallelism()
    assert len(params.salt) == 32
    assert messages
    assert messages[-1].startswith("chose Argon2id")
    runs = [
        (int(cost), float(ms))
        for cost, ms in re.findall(
            r"Argon2id with (\d+) passes over 8192 KiB, \d+ lanes: (\d+) ms", "\n".join(messages)
        )
    ]
    assert 1 <= len(runs) <= calibrate_mod.MAX_VERIFY_RUNS, messages
    cost, measured = runs[-1]
    if cost == params.time_cost:
        assert 25 <= measured <= 100, messages
    else:
        assert (params.time_cost < cost) == (measured > 50), messages


def test_params_for_explicit_memory_may_be_tiny() -> None:
    params = params_for(time_ms=20, memory_kib=16, parallelism=2)
    assert params.memory_kib == 16
    assert params.parallelism == 2
    with pytest.raises(UsageError, match="8 KiB per lane"):
        params_for(time_ms=20, memory_kib=15, parallelism=2)


@pytest.mark.parametrize("bad", [0, -5, True])
def test_calibrate_rejects_bad_target(bad: int) -> None:
    with pytest.raises(UsageError):
        calibrate(target_ms=bad, memory_kib=64)


def test_explicit_memory_above_available_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(calibrate_mod, "available_memory_kib", lambda: 100 * 1024)
    with pytest.raises(UsageError, match="available memory"):
        calibrate(target_ms=10, memory_kib=200 * 1024)


@pytest.mark.parametrize(
    ("available", "expected"),
    [
        (24 * 1024 * 1024, 1024 * 1024),  # plenty: 1 GiB
        (1024 * 1024, 512 * 1024),  # 1 GiB available: half of it
        (1000 * 1024 + 123, 500 * 1024),  # rounded down to whole MiB
        (100 * 1024, 64 * 1024),  # never below 64 MiB
        (None, 1024 * 1024),  # unknown: the default
    ],
)
def test_default_memory(
    monkeypatch: pytest.MonkeyPatch, available: int | None, expected: int
) -> None:
    monkeypatch.setattr(calibrate_mod, "available_memory_kib", lambda: available)
    assert calibrate_mod.default_memory_kib(4) == expected


def test_default_parallelism_is_at_most_four() -> None:
    assert 1 <= calibrate_mod.default_parallelism() <= 4


def test_available_memory_reads_meminfo() -> None:
    available = calibrate_mod.available_memory_kib()
    assert available is None or available > 0


class FakeClock:
    """A cost model in place of real Argon2 runs: ms = overhead + per_kib_pass * t * m."""

    def __init__(self, per_kib_pass_ms: float, overhead_ms: float = 0.0) -> None:
        self.per_kib_pass_ms = per_kib_pass_ms
        self.overhead_ms = overhead_ms
        self.runs: list[KdfParams] = []

    def __call__(self, params: KdfParams, samples: int = 1) -> float:
        self.runs.append(params)
        return self.overhead_ms + self.per_kib_pass_ms * params.time_cost * params.memory_kib


def test_calibration_lowers_memory_to_keep_four_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    # One pass over 1 GiB takes 1 s: 4 passes would take 4 s, so memory goes down to ~256 MiB.
    clock = FakeClock(per_kib_pass_ms=1000 / (1024 * 1024))
    monkeypatch.setattr(calibrate_mod, "_time_ms", clock)
    monkeypatch.setattr(calibrate_mod, "available_memory_kib", lambda: 64 * 1024 * 1024)
    params = calibrate(target_ms=1000, parallelism=4)
    assert params.time_cost == 4
    assert params.memory_kib == 256 * 1024
    assert params.parallelism == 4
    assert len(clock.runs) <= 2 + calibrate_mod.MAX_VERIFY_RUNS


def test_calibration_memory_floor_is_64_mib(monkeypatch: pytest.MonkeyPatch) -> None:
    # A very slow machine: even 4 passes over 64 MiB exceed the target; the floor holds.
    clock = FakeClock(per_kib_pass_ms=1.0)
    monkeypatch.setattr(calibrate_mod, "_time_ms", clock)
    monkeypatch.setattr(calibrate_mod, "available_memory_kib", lambda: 64 * 1024 * 1024)
    params = calibrate(target_ms=1000, parallelism=1)
    assert params.memory_kib == 64 * 1024
    assert params.time_cost == 4


def test_calibration_keeps_full_memory_on_fast_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    # 100 ms per pass over 1 GiB, plus a fixed 30 ms: about 10 passes meet 1 s.
    clock = FakeClock(per_kib_pass_ms=100 / (1024 * 1024), overhead_ms=30)
    monkeypatch.setattr(calibrate_mod, "_time_ms", clock)
    monkeypatch.setattr(calibrate_mod, "available_memory_kib", lambda: 64 * 1024 * 1024)
    params = calibrate(target_ms=1000, parallelism=2)
    assert params.memory_kib == 1024 * 1024
    assert len(clock.runs) <= 2 + calibrate_mod.MAX_VERIFY_RUNS
    assert 900 <= clock(params) <= 1150


def test_explicit_memory_allows_a_single_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(per_kib_pass_ms=1000 / (1024 * 1024))
    monkeypatch.setattr(calibrate_mod, "_time_ms", clock)
    monkeypatch.setattr(calibrate_mod, "available_memory_kib", lambda: 64 * 1024 * 1024)
    params = params_for(time_ms=1000, memory_kib=1024 * 1024, parallelism=4)
    assert params.memory_kib == 1024 * 1024
    assert params.time_cost == 1


def test_a_hostile_tokens_kdf_is_refused_at_unlock_without_deriving(box: Box) -> None:
    # The attack: an evil maid rewrites the token's Argon2id time cost to 2^32-1 (the token
    # is in the LUKS2 header, outside any signature); the boot used to hang in Argon2.
    from qubes_seal import chain
    from qubes_seal.luks.container import Container

    container = Container(box.container)
    token_id, token = chain.read_token(container)
    token.kdf = {**token.kdf, "time_cost": 2**32 - 1}
    forged = {**token.to_json(), "mac": (token.raw or {})["mac"]}  # her copy of the old MAC
    container.import_token(forged, token_id=token_id, replace=True)
    started = time.monotonic()
    res = box.unlock()
    assert res.code == 7, res.err
    assert time.monotonic() - started < 30
    assert "corrupted or hostile" in res.err
    assert "recovery key" in res.err
    from qubes_seal.tpm.device import Tpm

    with Tpm(box.swtpm.tcti) as tpm:  # refused before the TPM: no dictionary-attack try
        assert tpm.da_status()["failed_tries"] == 0
