"""Choose Argon2id parameters for this machine, the way cryptsetup's PBKDF benchmark does.

cryptsetup (``crypt_pbkdf_perf`` in ``lib/crypto_backend/pbkdf_check.c``) treats the memory
as a maximum, keeps at least 4 passes, lowers the memory when even 4 passes at the maximum
take longer than the target, and then finds the number of passes that lasts the target time.
:func:`calibrate` follows the same plan:

1. memory: 1 GiB by default, lowered to half of ``MemAvailable`` (``/proc/meminfo``), never
   below 64 MiB; parallelism: ``min(4, CPUs)``;
2. probe: one and two passes over ``min(memory, 64 MiB)``, timed, give the cost of a pass
   and of allocating the memory, both extrapolated linearly in memory;
3. if 4 passes at that memory would exceed the target, lower the memory (not below 64 MiB);
4. extrapolate the number of passes, then time the real derivation and correct the number
   of passes (and lower the memory again if 4 passes are still too slow), at most
   :data:`MAX_VERIFY_RUNS` times and within a time budget.

An explicit memory (``memory_kib=``, cryptsetup's ``--pbkdf-memory``) is used as given, and
may be as low as Argon2's minimum of 8 KiB per lane: the 64 MiB floor applies to calibrated
memory only, and explicit small values exist for tests and for machines that know better.
With an explicit memory the minimum number of passes is 1 (RFC 9106's first recommended
setting is one pass over a large memory), not 4.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from ..errors import UsageError
from .derivation import argon2id_raw
from .params import MIN_KIB_PER_LANE, MIN_TIME_COST, KdfParams, new_salt

DEFAULT_TARGET_MS = 1000
DEFAULT_MEMORY_KIB = 1024 * 1024  # 1 GiB, cryptsetup's DEFAULT_LUKS2_MEMORY_KB
MIN_CALIBRATED_MEMORY_KIB = 64 * 1024  # 64 MiB, RFC 9106's second recommended setting
MAX_DEFAULT_PARALLELISM = 4  # cryptsetup's DEFAULT_LUKS2_PARALLEL_THREADS
MIN_CALIBRATED_TIME_COST = 4  # cryptsetup keeps at least 4 Argon2 passes
PROBE_MEMORY_KIB = 64 * 1024
MAX_VERIFY_RUNS = 3
# Below this target each check is timed FAST_SAMPLES times and the fastest run kept
# (cryptsetup: BENCH_MIN_MS 250, BENCH_SAMPLES_FAST 3): short runs are the noisiest.
FAST_TARGET_MS = 250
FAST_SAMPLES = 3
TOLERANCE = (0.90, 1.15)  # accept a measured time within these fractions of the target

Progress = Callable[[str], None]


def available_memory_kib() -> int | None:
    """``MemAvailable`` from ``/proc/meminfo`` in KiB, or the physical memory, or ``None``."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 1024
    except (OSError, ValueError):
        return None


def default_parallelism() -> int:
    """``min(4, number of CPUs this process may run on)``."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(MAX_DEFAULT_PARALLELISM, cpus))


def default_memory_kib(parallelism: int) -> int:
    """1 GiB, or half of the available memory if less, but at least 64 MiB (whole MiB)."""
    memory = DEFAULT_MEMORY_KIB
    available = available_memory_kib()
    if available is not None:
        memory = min(memory, available // 2)
    memory = max(MIN_CALIBRATED_MEMORY_KIB, memory - memory % 1024)
    return max(memory, MIN_KIB_PER_LANE * parallelism)


def _time_ms(params: KdfParams, samples: int = 1) -> float:
    """The fastest of ``samples`` timed derivations, in ms (the least disturbed by others)."""
    best = float("inf")
    for _ in range(samples):
        start = time.perf_counter()
        argon2id_raw(b"qubes-seal calibration", params)
        best = min(best, (time.perf_counter() - start) * 1000.0)
    return best


def calibrate(
    *,
    target_ms: int = DEFAULT_TARGET_MS,
    memory_kib: int | None = None,
    parallelism: int | None = None,
    progress: Progress | None = None,
) -> KdfParams:
    """Argon2id parameters (with a new salt) for which one derivation takes about ``target_ms``.

    ``memory_kib`` and ``parallelism`` default to the calibrated values described in the
    module docstring; given explicitly they are used as given.  ``progress`` receives short
    human-readable messages.  The whole calibration takes the two probes plus at most
    :data:`MAX_VERIFY_RUNS` timed derivations of about ``target_ms`` each (3 samples each
    below 250 ms), and stops early when the next one would exceed a budget of about
    ``4 * target_ms`` after the probes.  Raises :class:`UsageError` for impossible values.
    """

    def say(message: str) -> None:
        if progress is not None:
            progress(message)

    if isinstance(target_ms, bool) or not isinstance(target_ms, int) or target_ms < 1:
        raise UsageError("the KDF target time must be a positive number of milliseconds")
    lanes = default_parallelism() if parallelism is None else parallelism
    if isinstance(lanes, bool) or not isinstance(lanes, int) or lanes < 1:
        raise UsageError("the KDF parallelism must be a positive integer")
    explicit_memory = memory_kib is not None
    memory = default_memory_kib(lanes) if memory_kib is None else memory_kib
    salt = new_salt()
    # KdfParams checks memory >= 8 KiB per lane, <= 4 GiB, and the other Argon2 limits.
    KdfParams(time_cost=1, memory_kib=memory, parallelism=lanes, salt=salt)
    if explicit_memory:
        min_time_cost, floor = MIN_TIME_COST, memory
        available = available_memory_kib()
        if available is not None and memory > available:
            raise UsageError(
                f"the KDF memory ({memory} KiB) is more than the available memory "
                f"({available} KiB)",
                hint="Choose a smaller --pbkdf-memory, or let qubes-seal calibrate it.",
            )
    else:
        min_time_cost, floor = MIN_CALIBRATED_TIME_COST, MIN_CALIBRATED_MEMORY_KIB

    started = time.perf_counter()
    low, high = TOLERANCE

    def with_cost(time_cost: int, memory_kib: int) -> KdfParams:
        return KdfParams(time_cost=time_cost, memory_kib=memory_kib, parallelism=lanes, salt=salt)

    # Cost model: ms = memory * (alloc + passes * per_pass), both per KiB.  Allocating and
    # first touching the memory costs about as much as a pass, so it is measured too: one
    # and two passes over the probe memory.
    probe_memory = min(memory, max(PROBE_MEMORY_KIB, MIN_KIB_PER_LANE * lanes))
    one = max(_time_ms(with_cost(1, probe_memory)), 0.01)
    two = max(_time_ms(with_cost(2, probe_memory)), 0.01)
    pass_ms = two - one if two > one else two / 2
    per_pass = pass_ms / probe_memory
    alloc = max(0.0, one - pass_ms) / probe_memory
    say(f"Argon2id probe over {probe_memory} KiB: 1 pass {one:.0f} ms, 2 passes {two:.0f} ms")

    def mib_floor(kib: float) -> int:
        return max(floor, int(kib) - int(kib) % 1024)

    if not explicit_memory and memory * (alloc + min_time_cost * per_pass) > target_ms:
        lowered = mib_floor(target_ms / (alloc + min_time_cost * per_pass))
        if lowered < memory:
            say(f"lowering memory from {memory} KiB to {lowered} KiB to meet {target_ms} ms")
            memory = lowered
    time_cost = max(min_time_cost, round((target_ms / memory - alloc) / per_pass))
    params = with_cost(time_cost, memory)

    samples = FAST_SAMPLES if target_ms < FAST_TARGET_MS else 1
    budget_end = time.perf_counter() + 4 * samples * target_ms / 1000.0
    for _ in range(MAX_VERIFY_RUNS):
        measured = _time_ms(params, samples)
        say(
            f"Argon2id with {params.time_cost} passes over {params.memory_kib} KiB, "
            f"{lanes} lanes: {measured:.0f} ms (target {target_ms} ms)"
        )
        if low * target_ms <= measured <= high * target_ms:
            break
        # Keep the model's fixed part, rescale the per-pass part to what was measured.
        fixed = min(params.memory_kib * alloc, 0.5 * measured)
        per_pass_ms = (measured - fixed) / params.time_cost
        corrected = round((target_ms - fixed) / per_pass_ms)
        next_params = with_cost(max(min_time_cost, corrected), params.memory_kib)
        if corrected < min_time_cost and not explicit_memory and measured > high * target_ms:
            lowered = mib_floor(params.memory_kib * target_ms / measured)
            if lowered < params.memory_kib:
                say(f"lowering memory from {params.memory_kib} KiB to {lowered} KiB")
                next_params = with_cost(min_time_cost, lowered)
        if next_params == params:
            break
        cost_ratio = (next_params.time_cost * next_params.memory_kib) / (
            params.time_cost * params.memory_kib
        )
        if time.perf_counter() + samples * measured * cost_ratio / 1000 > budget_end:
            # No time left to check it: take the correction only when it makes the derivation
            # cheaper, so that the target stays an upper bound.
            if cost_ratio < 1:
                params = next_params
            break
        params = next_params
    elapsed = time.perf_counter() - started
    say(
        f"chose Argon2id t={params.time_cost}, m={params.memory_kib} KiB, "
        f"p={params.parallelism} (calibration took {elapsed:.1f} s)"
    )
    return params


def params_for(
    *,
    time_ms: int | None = None,
    memory_kib: int | None = None,
    parallelism: int | None = None,
    progress: Progress | None = None,
) -> KdfParams:
    """Parameters from cryptsetup-style overrides: ``--iter-time`` (ms), ``--pbkdf-memory``.

    ``time_ms`` is the target time of one derivation (default :data:`DEFAULT_TARGET_MS`);
    ``memory_kib`` fixes the memory (down to 8 KiB per lane: the 64 MiB floor applies only
    to calibrated memory) and the number of passes is calibrated for it.
    """
    return calibrate(
        target_ms=DEFAULT_TARGET_MS if time_ms is None else time_ms,
        memory_kib=memory_kib,
        parallelism=parallelism,
        progress=progress,
    )
