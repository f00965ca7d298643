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
MAX_TIME_COST = 2**32 - 1
MIN_KIB_PER_LANE = 8  # RFC 9106 section 3.1: m >= 8 * p KiB
# cryptsetup refuses more than 4 GiB of Argon2 memory (LUKS2 pbkdf limits); so do we, which
# also stops a corrupted state from asking for an absurd allocation.
MAX_MEMORY_KIB = 4 * 1024 * 1024
MAX_PARALLELISM = 2**24 - 1  # RFC 9106 section 3.1: 1 <= p <= 2^24 - 1


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
    if not _int_in(time_cost, MIN_TIME_COST, MAX_TIME_COST):
        return f"time cost must be an integer from {MIN_TIME_COST} to {MAX_TIME_COST}"
    min_memory = MIN_KIB_PER_LANE * parallelism
    if not _int_in(memory_kib, min_memory, MAX_MEMORY_KIB):
        return (
            f"memory must be an integer from {min_memory} KiB (8 KiB per lane) "
            f"to {MAX_MEMORY_KIB} KiB (4 GiB)"
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
        """Parse :meth:`to_json`'s output; anything else raises :class:`CorruptState`."""
        if not isinstance(d, dict):
            raise CorruptState("KDF parameters: expected a JSON object")
        if d.get("type") != ALGORITHM:
            raise CorruptState(
                f"KDF parameters: unknown KDF type {d.get('type')!r} (expected {ALGORITHM!r})"
            )
        if d.get("version") != ARGON2_VERSION:
            raise CorruptState(
                f"KDF parameters: unknown Argon2 version {d.get('version')!r} "
                f"(expected {ARGON2_VERSION})"
            )
        expected = {"type", "version", "time_cost", "memory_kib", "parallelism", "salt"}
        unknown = sorted(set(d) - expected)
        if unknown:
            raise CorruptState(f"KDF parameters: unknown fields {unknown}")
        salt_hex = d.get("salt")
        salt: bytes | None = None
        if isinstance(salt_hex, str) and salt_hex == salt_hex.lower():
            try:
                salt = bytes.fromhex(salt_hex)
            except ValueError:
                salt = None
        if salt is None:
            raise CorruptState("KDF parameters: salt must be lowercase hexadecimal")
        time_cost, memory_kib, parallelism = (
            d.get("time_cost"),
            d.get("memory_kib"),
            d.get("parallelism"),
        )
        problem = _problem(time_cost, memory_kib, parallelism, salt)
        if problem:
            raise CorruptState(f"KDF parameters: {problem}")
        assert isinstance(time_cost, int)
        assert isinstance(memory_kib, int)
        assert isinstance(parallelism, int)
        return cls(time_cost=time_cost, memory_kib=memory_kib, parallelism=parallelism, salt=salt)
