"""Argon2id parameters: the dataclass kept in the sealed state, its JSON form, fresh salts."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptState, UsageError

ALGORITHM = "argon2id"
# Argon2 version 1.3 (0x13), the only version argon2-cffi's hash_secret_raw uses by default
# and the one RFC 9106 specifies.  Recorded so that a future change cannot go unnoticed.
ARGON2_VERSION = 0x13

# 32 bytes, and only 32: RFC 9106 recommends 16 or more.  A fixed length also keeps HKDF's
# salt unambiguous (HMAC pads a short key with zeros, so b"\0" * 16 and b"\0" * 17 would
# be the same HKDF salt).
SALT_SIZE = 32

MIN_TIME_COST = 1  # RFC 9106 section 3.1: t >= 1
MIN_KIB_PER_LANE = 8  # RFC 9106 section 3.1: m >= 8 * p KiB

# Caps on what a token may ask for.  The KDF parameters are read from the container's token,
# which anyone who can write the disk can change: without caps a hostile token makes the boot
# hang (time_cost 2^32-1), exhaust memory or start millions of threads, before the TPM or the
# passphrase is even involved.  The caps are what ``init`` and the rotations can produce
# (qubes_seal/kdf/calibration.py), with headroom; docs/BOOT.md, "Limits on what the disk
# may ask for".
#
# Parallelism: calibration uses min(4, CPUs) lanes and no flag sets more; cryptsetup accepts
# at most 16 threads for LUKS2 Argon2 as well.
MAX_PARALLELISM = 16
# Memory: cryptsetup refuses more than 4 GiB of Argon2 memory (LUKS2 pbkdf limits); calibration
# chooses at most 1 GiB, an explicit --kdf-memory up to this cap.
MAX_MEMORY_KIB = 4 * 1024 * 1024
# Passes: calibration keeps 4 or more over >= 64 MiB (about 10 in 1 s on a fast machine); only
# an explicit tiny memory needs many: 1 s over 8 KiB is about 2x10^5 passes (4.6 us each here).
MAX_TIME_COST = 2**20
# Work (passes x KiB): what bounds the time of one derivation.  A calibrated 1 s derivation
# is at most about 8 GiB of passes (4 lanes at 2 GiB/s); the cap is 64 GiB of passes, 8 times
# that: about 40 s at this machine's 1.7 GiB/s per lane, the longest a hostile token can hold
# the boot.  A --kdf-time that needs more is refused at init.
MAX_WORK_KIB = 2**26
# The salt is exactly SALT_SIZE bytes; the Argon2 output length is not read from the token
# (fixed: 64 bytes, qubes_seal/kdf/derivation.py), nor is anything the fields below do not name.
HOSTILE_HINT = (
    "The container's token is corrupted or was written by someone else (a hostile token): do "
    "not retry. Open the container with the recovery key ('qubes-seal recover'), then seal "
    "again in a boot you trust ('qubes-seal recover --reseal')."
)


def new_salt() -> bytes:
    """A fresh random salt of :data:`SALT_SIZE` (32) bytes from the OS CSPRNG."""
    return secrets.token_bytes(SALT_SIZE)


def _int_in(value: object, low: int, high: int) -> bool:
    """``value`` is an int (not a bool) with ``low <= value <= high``."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _problem(time_cost: object, memory_kib: object, parallelism: object, salt: object) -> str:
    """Why these values are not usable Argon2id parameters, or ``""`` when they are."""
    if not isinstance(parallelism, int) or not _int_in(parallelism, 1, MAX_PARALLELISM):
        return f"parallelism must be an integer from 1 to {MAX_PARALLELISM}"
    if not isinstance(time_cost, int) or not _int_in(time_cost, MIN_TIME_COST, MAX_TIME_COST):
        return f"time cost must be an integer from {MIN_TIME_COST} to {MAX_TIME_COST}"
    min_memory = MIN_KIB_PER_LANE * parallelism
    if not isinstance(memory_kib, int) or not _int_in(memory_kib, min_memory, MAX_MEMORY_KIB):
        return (
            f"memory must be an integer from {min_memory} KiB (8 KiB per lane) "
            f"to {MAX_MEMORY_KIB} KiB (4 GiB)"
        )
    if time_cost * memory_kib > MAX_WORK_KIB:
        return (
            f"time cost x memory ({time_cost} x {memory_kib} KiB) must be at most "
            f"{MAX_WORK_KIB} KiB (64 GiB of passes, tens of seconds per derivation)"
        )
    if not isinstance(salt, bytes) or len(salt) != SALT_SIZE:
        return f"salt must be {SALT_SIZE} bytes"
    return ""


@dataclass(frozen=True)
class KdfParams:
    """The public inputs of the Argon2id derivation, stored beside the sealed object.

    ``memory_kib`` is in KiB and ``time_cost`` is a number of passes, the units of
    cryptsetup's ``--pbkdf-memory`` and of LUKS2's ``"time"`` field.  None of these values is
    secret.  Construction validates them and raises :class:`UsageError`; :meth:`from_json`
    raises :class:`CorruptState` instead, since there the values come from a file.
    """

    time_cost: int
    memory_kib: int
    parallelism: int
    salt: bytes

    def __post_init__(self) -> None:
        problem = _problem(self.time_cost, self.memory_kib, self.parallelism, self.salt)
        if problem:
            raise UsageError(f"invalid Argon2id parameters: {problem}")

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"type", "version", "time_cost", "memory_kib", ...}``."""
        return {
            "type": ALGORITHM,
            "version": ARGON2_VERSION,
            "time_cost": self.time_cost,
            "memory_kib": self.memory_kib,
            "parallelism": self.parallelism,
            "salt": self.salt.hex(),
        }

    @classmethod
    def from_json(cls, d: object) -> KdfParams:
        """Parse :meth:`to_json`'s output; anything else, a value past a cap included, raises
        :class:`CorruptState` (the token is corrupted or hostile; the recovery key opens)."""

        def corrupt(problem: str) -> CorruptState:
            return CorruptState(
                f"KDF parameters: {problem} (the token is corrupted or hostile)",
                hint=HOSTILE_HINT,
            )

        if not isinstance(d, dict):
            raise corrupt("expected a JSON object")
        if d.get("type") != ALGORITHM:
            raise corrupt(f"unknown KDF type {_short(d.get('type'))} (expected {ALGORITHM!r})")
        if d.get("version") != ARGON2_VERSION:
            raise corrupt(
                f"unknown Argon2 version {_short(d.get('version'))} (expected {ARGON2_VERSION})"
            )
        expected = {"type", "version", "time_cost", "memory_kib", "parallelism", "salt"}
        unknown = sorted(set(d) - expected)
        if unknown:
            raise corrupt(f"unknown fields {_short(unknown)}")
        salt_hex = d.get("salt")
        salt: bytes | None = None
        if (
            isinstance(salt_hex, str)
            and len(salt_hex) == 2 * SALT_SIZE
            and salt_hex == salt_hex.lower()
        ):
            try:
                salt = bytes.fromhex(salt_hex)
            except ValueError:
                salt = None
        if salt is None:
            raise corrupt(f"salt must be {SALT_SIZE} bytes of lowercase hexadecimal")
        time_cost, memory_kib, parallelism = (
            d.get("time_cost"),
            d.get("memory_kib"),
            d.get("parallelism"),
        )
        problem = _problem(time_cost, memory_kib, parallelism, salt)
        if problem:
            raise corrupt(problem)
        assert isinstance(time_cost, int)
        assert isinstance(memory_kib, int)
        assert isinstance(parallelism, int)
        return cls(time_cost=time_cost, memory_kib=memory_kib, parallelism=parallelism, salt=salt)


def _short(value: object) -> str:
    """``repr(value)``, cut to 40 characters: a hostile token may hold megabytes."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
