"""The two derivations of the passphrase path: Argon2id halves, then the HKDF LUKS key."""

from __future__ import annotations

from argon2.exceptions import HashingError
from argon2.low_level import Type, hash_secret_raw

from ..errors import QubesSealError, UsageError
from ..hkdf import hkdf_sha256
from ..secret import Secret
from .params import ARGON2_VERSION, KdfParams

HALF_SIZE = 32
ARGON2_OUTPUT_SIZE = 2 * HALF_SIZE
LUKS_KEY_SIZE = 32
LUKS_KEY_INFO = b"qubes-seal luks key v1"


def argon2id_raw(secret: bytes, params: KdfParams) -> bytes:
    """Argon2id (RFC 9106, version 0x13) of ``secret``: 64 raw bytes.

    Internal building block of :func:`derive` and of the calibration; callers outside this
    package use :func:`derive`, which keeps the result in :class:`Secret` objects.
    """
    try:
        return hash_secret_raw(
            secret=secret,
            salt=params.salt,
            time_cost=params.time_cost,
            memory_cost=params.memory_kib,
            parallelism=params.parallelism,
            hash_len=ARGON2_OUTPUT_SIZE,
            type=Type.ID,
            version=ARGON2_VERSION,
        )
    except HashingError as exc:  # in practice: the memory could not be allocated
        raise QubesSealError(
            f"Argon2id failed with {params.memory_kib} KiB of memory: {exc}",
            hint="Free some memory, or use KDF parameters with less memory.",
        ) from exc


def derive(passphrase: Secret, params: KdfParams) -> tuple[Secret, Secret]:
    """Stretch ``passphrase`` with Argon2id into ``(auth_half, mix_half)``, 32 bytes each.

    ``auth_half`` becomes the sealed object's authValue (the TPM checks it under
    PolicyAuthValue and rate-limits wrong guesses); ``mix_half`` goes into :func:`luks_key`
    and never reaches the TPM.  An empty passphrase is refused (:class:`UsageError`): it
    would leave the sealed object with an empty authValue.
    """
    if len(passphrase) == 0:
        raise UsageError("the passphrase is empty")
    raw = bytearray(argon2id_raw(passphrase.reveal(), params))
    try:
        return Secret(raw[:HALF_SIZE]), Secret(raw[HALF_SIZE:])
    finally:
        raw[:] = bytes(len(raw))


def luks_key(
    master: Secret, mix_half: Secret, params: KdfParams, *, context: bytes = b""
) -> Secret:
    """The 32-byte LUKS key: HKDF-SHA256(master || mix_half, salt=params.salt, info).

    ``info`` is ``b"qubes-seal luks key v1" + context``: the fixed prefix separates this use
    from every other HKDF in qubes-seal, and ``context`` (for example a container UUID) gives
    each container its own key from the same secrets.  Both inputs are required: the TPM's
    ``master`` alone, or the passphrase's ``mix_half`` alone, yields nothing.
    """
    if len(master) == 0 or len(mix_half) == 0:
        raise UsageError("luks_key needs both the master secret and the passphrase half")
    ikm = bytearray(master.reveal())
    ikm += mix_half.reveal()
    try:
        return Secret(
            hkdf_sha256(
                bytes(ikm), length=LUKS_KEY_SIZE, salt=params.salt, info=LUKS_KEY_INFO + context
            )
        )
    finally:
        ikm[:] = bytes(len(ikm))
