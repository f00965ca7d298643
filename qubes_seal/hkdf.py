"""HKDF-SHA256 (RFC 5869) with the standard library's hmac.

Ten lines that keep the boot path free of the ``cryptography`` wheel (it bundles its own
OpenSSL: 11 MiB in an initramfs).  The tests check it against ``cryptography``'s HKDF and the
RFC's test vectors.
"""

from __future__ import annotations

import hashlib
import hmac

HASH_LEN = 32


def hkdf_sha256(ikm: bytes, *, length: int, salt: bytes | None = None, info: bytes = b"") -> bytes:
    """HKDF-Extract then HKDF-Expand with SHA-256; ``salt`` None means HashLen zero bytes."""
    if not 0 < length <= 255 * HASH_LEN:
        raise ValueError("HKDF-SHA256 output is 1 to 8160 bytes")
    prk = hmac.new(salt if salt is not None else bytes(HASH_LEN), ikm, hashlib.sha256).digest()
    okm, block, counter = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]
