"""The keystore's authenticated binary record: :func:`encode`, :func:`decode`."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import struct
from datetime import datetime
from typing import Any

from ..errors import CorruptState, UsageError
from ..hkdf import hkdf_sha256
from ..secret import Secret
from .geometry import Geometry
from .model import KEY_ID_HEX_CHARS, KEY_SIZE, DomainKey, Keystore
from .names import name_problem, normalise_uuid

MAGIC = b"QSKEYSTO"
#: Version 2 records carry their :class:`~.geometry.Geometry`; version 1 (before it) is read.
FORMAT_VERSION = 2
LEGACY_VERSION = 1
HEADER = struct.Struct(">8sHHIQ")  # magic, version, flags, body length, generation
#: Version 2 only: payload size, slot A offset, slot B offset, slot size, grow target.
GEOMETRY = struct.Struct(">QQQQQ")
LEGACY_HEADER_SIZE = HEADER.size  # 24
HEADER_SIZE = HEADER.size + GEOMETRY.size  # 64
MAC_SIZE = 32
OVERHEAD = HEADER_SIZE + MAC_SIZE
HMAC_KEY_INFO = b"qubes-seal keystore hmac v1"
HMAC_KEY_SIZE = 32
MAX_GENERATION = 2**64 - 1

_KNOWN_TOP = frozenset({"domains", "policy_signer", "policy_signer_next", "tpm_lockout_auth"})
_KNOWN_ENTRY = frozenset({"name", "qube_uuid", "key_id", "created", "generation", "key"})
_KEY_ID = re.compile(rf"\A[0-9a-f]{{{KEY_ID_HEX_CHARS}}}\Z")
_KEY_HEX = re.compile(rf"\A[0-9a-f]{{{2 * KEY_SIZE}}}\Z")


def hmac_key_from_volume_key(vk: Secret) -> Secret:
    """The keystore's HMAC-SHA256 key: HKDF-SHA256(vk, info=b"qubes-seal keystore hmac v1").

    The container is encrypted with AES-XTS, which is malleable (a flipped ciphertext bit
    garbles one 16-byte block, undetected); the HMAC turns any such change into an error.
    """
    if len(vk) == 0:
        raise UsageError("the volume key is empty")
    return Secret(hkdf_sha256(vk.reveal(), length=HMAC_KEY_SIZE, info=HMAC_KEY_INFO))


def _mac(hmac_key: Secret, data: bytes | bytearray | memoryview) -> bytes:
    return hmac.new(hmac_key.reveal(), data, hashlib.sha256).digest()


def _entry_json(entry: DomainKey) -> dict[str, Any]:
    doc = dict(entry.extra)
    doc.update(entry.public_view())
    doc["key"] = entry.key.reveal().hex()
    return doc


def encode(
    ks: Keystore,
    hmac_key: Secret,
    *,
    generation: int | None = None,
    geometry: Geometry | None = None,
) -> bytes:
    """The record of ``ks`` (at ``generation``, by default ``ks.generation``).

    Layout (big-endian), format version 2::

        offset  size  field
        0       8     magic b"QSKEYSTO"
        8       2     format version (2)
        10      2     flags (0; any other value is refused)
        12      4     body length n
        16      8     generation (>= 1)
        24      8     payload size the slots were laid out for
        32      8     slot A offset (0)
        40      8     slot B offset
        48      8     slot size
        56      8     grow target (0, or the payload size an interrupted grow moves to)
        64      n     body: UTF-8 JSON {"domains": [...], ...}
        64+n    32    HMAC-SHA256(hmac_key, bytes 0 .. 64+n)

    Without ``geometry``: a version 1 record (no bytes 24..63), the format written before
    the geometry was recorded; kept so that tests can make the containers of that time.
    """
    gen = ks.generation if generation is None else generation
    if not 1 <= gen <= MAX_GENERATION:
        raise UsageError(f"keystore generation {gen} is out of range (1 to 2^64-1)")
    doc = dict(ks.extra)
    doc["domains"] = [_entry_json(entry) for entry in ks.list()]
    if ks.signer is not None:
        doc["policy_signer"] = ks.signer.reveal().hex()
    if ks.signer_next is not None:
        doc["policy_signer_next"] = ks.signer_next.reveal().hex()
    if ks.lockout_auth is not None:
        doc["tpm_lockout_auth"] = ks.lockout_auth.reveal().hex()
    body = bytearray(json.dumps(doc, sort_keys=True, separators=(",", ":")).encode())
    version = LEGACY_VERSION if geometry is None else FORMAT_VERSION
    record = bytearray(HEADER.pack(MAGIC, version, 0, len(body), gen))
    if geometry is not None:
        g = geometry.validate()
        record += GEOMETRY.pack(g.payload_size, g.slot_a, g.slot_b, g.slot_size, g.grow_to)
    record += body
    record += _mac(hmac_key, record)
    try:
        return bytes(record)
    finally:
        body[:] = bytes(len(body))
        record[:] = bytes(len(record))


def record_length(header: bytes) -> int:
    """The total record length announced by a header; :class:`CorruptState` if not a header."""
    return _header_size(header) + int(HEADER.unpack_from(header)[3]) + MAC_SIZE


def _header_size(header: bytes) -> int:
    if len(header) < LEGACY_HEADER_SIZE:
        raise CorruptState(f"keystore record too short ({len(header)} bytes)")
    magic, version, flags, _body_len, _generation = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise CorruptState("not a qubes-seal keystore (bad magic)")
    if version not in (LEGACY_VERSION, FORMAT_VERSION):
        raise CorruptState(
            f"keystore format version {version} is not supported (this qubes-seal reads "
            f"versions {LEGACY_VERSION} and {FORMAT_VERSION})",
            hint="It was written by another version of qubes-seal: upgrade qubes-seal.",
        )
    if flags != 0:
        raise CorruptState(f"keystore header has unknown flags 0x{flags:04x}")
    size = LEGACY_HEADER_SIZE if version == LEGACY_VERSION else HEADER_SIZE
    if len(header) < size:
        raise CorruptState(f"keystore record too short ({len(header)} bytes)")
    return size


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    doc: dict[str, Any] = {}
    for key, value in pairs:
        if key in doc:
            raise CorruptState(f"keystore body: duplicate field {key!r}")
        doc[key] = value
    return doc


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _entry_from_json(index: int, item: object) -> DomainKey:
    where = f"keystore entry {index}"
    if not isinstance(item, dict):
        raise CorruptState(f"{where}: expected a JSON object")
    missing = sorted(_KNOWN_ENTRY - set(item))
    if missing:
        raise CorruptState(f"{where}: missing fields {missing}")
    name = item["name"]
    problem = name_problem(name)
    if problem:
        raise CorruptState(f"{where}: invalid qube name: {problem}")
    qube_uuid = item["qube_uuid"]
    if qube_uuid is not None:
        try:
            if normalise_uuid(qube_uuid) != qube_uuid:
                raise UsageError("not lowercase")
        except UsageError:
            raise CorruptState(f"{where} ({name}): invalid qube UUID") from None
    key_id = item["key_id"]
    if not isinstance(key_id, str) or _KEY_ID.match(key_id) is None:
        raise CorruptState(f"{where} ({name}): invalid key id")
    created = item["created"]
    try:
        if not isinstance(created, str):
            raise ValueError
        datetime.fromisoformat(created)
    except ValueError:
        raise CorruptState(f"{where} ({name}): invalid creation time") from None
    generation = item["generation"]
    if not _is_int(generation) or not 1 <= generation <= MAX_GENERATION:
        raise CorruptState(f"{where} ({name}): invalid key generation")
    key_hex = item["key"]
    if not isinstance(key_hex, str) or _KEY_HEX.match(key_hex) is None:
        # Never quote the value: it may be (part of) a key.
        raise CorruptState(f"{where} ({name}): the key is not {KEY_SIZE} bytes of hex")
    extra = {k: v for k, v in item.items() if k not in _KNOWN_ENTRY}
    return DomainKey(
        name=name,
        qube_uuid=qube_uuid,
        key_id=key_id,
        created=created,
        generation=generation,
        key=Secret(bytes.fromhex(key_hex)),
        extra=extra,
    )


def decode(data: bytes | bytearray | memoryview, hmac_key: Secret) -> Keystore:
    """Check and parse one record made by :func:`encode`.

    Checks, in order: magic, format version, flags, length (``data`` must be exactly one
    record), HMAC (constant-time comparison), the geometry (version 2), then the body.  Any
    failure raises :class:`CorruptState` with a message that names the failed check and no
    secret.
    """
    return decode_record(data, hmac_key)[0]


def decode_record(
    data: bytes | bytearray | memoryview, hmac_key: Secret
) -> tuple[Keystore, Geometry | None]:
    """:func:`decode`, and the record's geometry (None: a version 1 record, which has none)."""
    data = bytes(data)
    expected = record_length(data)
    if len(data) != expected:
        raise CorruptState(
            f"keystore record length {len(data)} does not match its header ({expected})"
        )
    signed, tag = data[:-MAC_SIZE], data[-MAC_SIZE:]
    if not hmac.compare_digest(_mac(hmac_key, signed), tag):
        raise CorruptState(
            "keystore authentication failed (HMAC mismatch): the keystore was modified or "
            "corrupted, or the key is wrong"
        )
    generation = int(HEADER.unpack_from(data)[4])
    if generation < 1:
        raise CorruptState("keystore generation 0 is invalid")
    header_size = _header_size(data)
    geometry = None
    if header_size == HEADER_SIZE:
        fields = GEOMETRY.unpack_from(data, LEGACY_HEADER_SIZE)
        geometry = Geometry(*(int(f) for f in fields)).validate()
    try:
        doc = json.loads(signed[header_size:].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise CorruptState("keystore body is not valid UTF-8 JSON") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("domains"), list):
        raise CorruptState("keystore body has no list of domains")
    domains: dict[str, DomainKey] = {}
    uuids: set[str] = set()
    try:
        for index, item in enumerate(doc["domains"]):
            entry = _entry_from_json(index, item)
            if entry.name in domains:
                entry.wipe()
                raise CorruptState(f"keystore: qube {entry.name!r} appears twice")
            domains[entry.name] = entry  # kept from here on, so wiped on a later failure
            if entry.qube_uuid is not None:
                if entry.qube_uuid in uuids:
                    raise CorruptState(f"keystore: qube UUID {entry.qube_uuid} appears twice")
                uuids.add(entry.qube_uuid)
    except CorruptState:
        for entry in domains.values():
            entry.wipe()
        raise
    extra = {k: v for k, v in doc.items() if k not in _KNOWN_TOP}
    keys: dict[str, Secret | None] = {}
    for field_name in ("policy_signer", "policy_signer_next", "tpm_lockout_auth"):
        value = doc.get(field_name)
        if value is not None and (
            not isinstance(value, str) or not re.fullmatch(r"[0-9a-f]{64}", value)
        ):
            for entry in domains.values():
                entry.wipe()
            for parsed in keys.values():
                if parsed is not None:
                    parsed.wipe()
            what = "TPM lockout authorization" if field_name[0] == "t" else "policy-signing key"
            raise CorruptState(f"keystore: the {what} is malformed")
        keys[field_name] = None if value is None else Secret(bytes.fromhex(value))
    ks = Keystore(
        domains,
        generation=generation,
        extra=extra,
        signer=keys["policy_signer"],
        signer_next=keys["policy_signer_next"],
        lockout_auth=keys["tpm_lockout_auth"],
    )
    return ks, geometry
