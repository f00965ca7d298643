"""Per-domain disk keys, stored inside the LUKS2 container that the TPM and passphrase open.

Each qube gets a random 64-byte key (aes-xts-plain64, 512-bit) with a random 16-hex-digit
key id, its creation time and a generation (1, then raised by rotations).  The store is
keyed on the qube name *and* UUID: Qubes lets a new qube take a removed qube's name, and
that new qube must never receive the old key (:meth:`Keystore.get` refuses a UUID that
differs from the stored one).  Names follow Qubes' own ``validate_name``.

On the payload (see :mod:`.slots` for the two-slot layout, :mod:`.geometry` for where the
slots lie)::

    slot = record || zero padding
    record = header(64) || body(n) || HMAC-SHA256(hmac_key, header || body)(32)
    header = b"QSKEYSTO" | version u16 (2) | flags u16 (0) | n u32 | generation u64
             | payload size u64 | slot A offset u64 | slot B offset u64 | slot size u64
             | grow target u64 (0)
    body   = UTF-8 JSON {"domains": [{"name", "qube_uuid", "key_id", "created",
                                      "generation", "key" (hex)}, ...]}
    hmac_key = HKDF-SHA256(container volume key, info = b"qubes-seal keystore hmac v1")

The container is encrypted with AES-XTS, which does not detect changes: the HMAC does.

Extending the format: fields that this version does not know, at the top of the body or in
an entry (for example a policy-signing key, or previous keys during a rotation), are kept
as read and written back unchanged, so an older qubes-seal that rewrites the keystore does
not drop them.  A change that an older reader must not ignore raises the header's format
version instead; a reader refuses a version it does not know (:class:`CorruptState`).
:meth:`Keystore.public_view` shows only the known public fields, never an unknown one
(which might hold a secret).

Python cannot zero immutable ``bytes``: the keys live in :class:`~qubes_seal.secret.Secret`
objects and the buffers this package owns are zeroed, but transient copies made while
encoding or decoding JSON are left to the garbage collector.
"""

from __future__ import annotations

from .codec import FORMAT_VERSION, HMAC_KEY_INFO, decode, encode, hmac_key_from_volume_key
from .errors import (
    ContainerResized,
    DomainExists,
    GrowInterrupted,
    KeystoreFull,
    QubeUuidMismatch,
    StaleKeystore,
    UnknownDomain,
)
from .geometry import SECTOR, Geometry
from .model import KEY_SIZE, DomainKey, Keystore
from .names import MAX_NAME_LENGTH, name_problem, normalise_uuid, validate_name
from .slots import (
    Payload,
    SlotStatus,
    grow_step,
    initialise,
    load,
    recorded_geometry,
    slot_status,
    store,
)

__all__ = [
    "FORMAT_VERSION",
    "HMAC_KEY_INFO",
    "KEY_SIZE",
    "MAX_NAME_LENGTH",
    "SECTOR",
    "ContainerResized",
    "DomainExists",
    "DomainKey",
    "Geometry",
    "GrowInterrupted",
    "Keystore",
    "KeystoreFull",
    "Payload",
    "QubeUuidMismatch",
    "SlotStatus",
    "StaleKeystore",
    "UnknownDomain",
    "decode",
    "encode",
    "grow_step",
    "hmac_key_from_volume_key",
    "initialise",
    "load",
    "name_problem",
    "normalise_uuid",
    "recorded_geometry",
    "slot_status",
    "store",
    "validate_name",
]
