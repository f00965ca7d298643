"""The LUKS2 container that holds the per-domain disk keys.

* :mod:`.cryptsetup`: run the cryptsetup binary, keys through stdin and pipes only;
* :mod:`.container`: :class:`Container` (format, keyslots, tokens, volume key);
* :mod:`.header`: a pure-Python LUKS2 header parser and the PCR 13 :func:`header_digest`;
* :mod:`.payload`: the data area through dm-crypt or in user space.
"""

from __future__ import annotations

from .container import Container, PbkdfCost
from .cryptsetup import CryptsetupError, WrongKey
from .header import Luks2Header, header_digest, read_header
from .payload import (
    DmCryptPayload,
    DmCryptUnavailable,
    Payload,
    UnsupportedPayload,
    UserspacePayload,
    dm_crypt_available,
    open_payload,
)

__all__ = [
    "Container",
    "CryptsetupError",
    "DmCryptPayload",
    "DmCryptUnavailable",
    "Luks2Header",
    "Payload",
    "PbkdfCost",
    "UnsupportedPayload",
    "UserspacePayload",
    "WrongKey",
    "dm_crypt_available",
    "header_digest",
    "open_payload",
    "read_header",
]
