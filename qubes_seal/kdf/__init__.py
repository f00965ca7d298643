"""The passphrase path: Argon2id stretches the passphrase, HKDF makes the LUKS key.

Construction::

                 passphrase
                     |
                     |  Argon2id (RFC 9106, v0x13)
                     |  salt, t = time_cost, m = memory_kib, p = parallelism
                     v
        +------------------------------+
        |    64 bytes of Argon2id      |
        +--------------+---------------+
        |  auth_half   |   mix_half    |
        |  bytes 0-31  |  bytes 32-63  |
        +------+-------+-------+-------+
               |               |
               v               |        master_secret (unsealed by the TPM)
        authValue of the       |               |
        sealed TPM object      +-------+-------+
        (PolicyAuthValue: the          |  ikm = master_secret || mix_half
        TPM counts wrong guesses       v
        and locks out)         HKDF-SHA256(ikm, salt = kdf salt,
                                       info = b"qubes-seal luks key v1" || context)
                                       |
                                       v
                               LUKS key (32 bytes)

Why two halves: ``auth_half`` is what the TPM checks, so every passphrase guess has to go
through the TPM's dictionary-attack counter; ``mix_half`` never leaves this process, so the
TPM (or anyone who extracts ``master_secret`` from it) still needs the passphrase, and
anyone who learns the passphrase still needs the TPM.  The halves are independent outputs
of one Argon2id call: knowing one tells nothing about the other.

API: :class:`KdfParams` (stored in the sealed state, ``to_json``/``from_json``),
:func:`new_salt`, :func:`calibrate` and :func:`params_for` (cryptsetup-style benchmark and
overrides), :func:`derive` (the two halves) and :func:`luks_key`.  The 64 MiB memory floor
applies to calibrated parameters only; explicit ``memory_kib`` may go down to Argon2's
minimum of 8 KiB per lane (cheap parameters for tests).

Secrets are returned as :class:`~qubes_seal.secret.Secret`.  Python's ``bytes`` are
immutable, so the copies made inside argon2-cffi and ``cryptography`` cannot be zeroed;
the buffers this package owns are.
"""

from __future__ import annotations

from .calibration import (
    DEFAULT_MEMORY_KIB,
    DEFAULT_TARGET_MS,
    MIN_CALIBRATED_MEMORY_KIB,
    calibrate,
    params_for,
)
from .derivation import LUKS_KEY_INFO, derive, luks_key
from .params import KdfParams, new_salt

__all__ = [
    "DEFAULT_MEMORY_KIB",
    "DEFAULT_TARGET_MS",
    "LUKS_KEY_INFO",
    "MIN_CALIBRATED_MEMORY_KIB",
    "KdfParams",
    "calibrate",
    "derive",
    "luks_key",
    "new_salt",
    "params_for",
]
