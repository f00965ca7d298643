"""A LUKS2 header parser in pure Python, and the header digest extended into PCR 13.

The on-disk format is the one of the LUKS2 specification (Milan Broz, "LUKS2 On-Disk Format
Specification", version 1.1.x, section 2) and of cryptsetup's ``lib/luks2/luks2.h``
(``struct luks2_hdr_disk``).  A LUKS2 header exists in two copies, each a 4096-byte binary
header followed by a JSON area, ``hdr_size`` bytes in all:

======  =====  ==================================================================
offset  size   field (integers big-endian)
======  =====  ==================================================================
0       6      magic: ``LUKS\\xba\\xbe`` (primary) or ``SKUL\\xba\\xbe`` (secondary)
6       2      version: 2
8       8      hdr_size: binary header + JSON area (16 KiB ... 4 MiB)
16      8      seqid: incremented on every metadata write
24      48     label (NUL-padded)
72      32     checksum_alg (``sha256``)
104     64     salt
168     40     uuid (text)
208     48     subsystem
256     8      hdr_offset: 0 (primary) or hdr_size (secondary)
448     64     checksum over the ``hdr_size`` bytes with this field zeroed
======  =====  ==================================================================

The primary copy is at offset 0, the secondary at ``hdr_size``.  :func:`read_header` checks
both and fails closed (:class:`~qubes_seal.errors.CorruptState`, exit code 7) when a copy is
damaged or when the two disagree: cryptsetup would silently repair from the other copy, but
the unlock must measure exactly one, unambiguous header.  ``cryptsetup repair`` restores the
agreement.

The header digest
-----------------
:func:`header_digest` (defined precisely in its docstring and in docs/PCR13.md) is what the
unlock extends into PCR 13 before unsealing: a TPM object sealed to the current header's
digest cannot be unsealed once an older header (one with an old, perhaps leaked passphrase) is
written back.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CorruptState

MAGIC_PRIMARY = b"LUKS\xba\xbe"
MAGIC_SECONDARY = b"SKUL\xba\xbe"
BINARY_HEADER_SIZE = 4096
#: The sizes the specification allows for one header copy (binary header + JSON area).
VALID_HDR_SIZES = frozenset(16384 << i for i in range(9))  # 16 KiB ... 4 MiB
_CHECKSUM_OFFSET = 448
_CHECKSUM_SIZE = 64
_CHECKSUM_ALGS = frozenset({"sha1", "sha256", "sha384", "sha512"})
_BINARY = struct.Struct(">6sHQQ48s32s64s40s48sQ")

#: The ``type`` of our own LUKS2 token (it holds the TPM-sealed object).
QUBES_SEAL_TYPE = "qubes-seal"

#: Domain separation tag of :func:`header_digest` (version 1 of the definition).
DIGEST_TAG = b"qubes-seal/luks2-header-digest/v1\x00"

_REPAIR_HINT = (
    "The LUKS2 header is damaged or its two copies disagree. Do not write to the container. "
    "Restore a header backup (cryptsetup luksHeaderRestore) or run `cryptsetup repair` and "
    "check the result with `cryptsetup luksDump`."
)


def _text(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", errors="replace")


@dataclass(frozen=True)
class HeaderCopy:
    """One verified copy of the header: the binary fields and the JSON metadata."""

    magic: bytes
    version: int
    hdr_size: int
    seqid: int
    label: str
    checksum_alg: str
    salt: bytes
    uuid: str
    subsystem: str
    hdr_offset: int
    checksum: bytes
    metadata: dict[str, Any]
    json_text: bytes


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for name, value in pairs:
        if name in result:
            raise ValueError(f"duplicate JSON key {name!r}")
        result[name] = value
    return result


def parse_copy(data: bytes, *, where: str = "primary") -> HeaderCopy:
    """Parse and verify one header copy from ``data`` (at least its ``hdr_size`` bytes).

    Raises :class:`CorruptState` on a bad magic, version, size, checksum or JSON.
    """
    if len(data) < BINARY_HEADER_SIZE:
        raise CorruptState(f"{where} LUKS2 header: truncated", hint=_REPAIR_HINT)
    fields = _BINARY.unpack_from(data, 0)
    magic, version, hdr_size, seqid, label, alg, salt, uuid, subsystem, hdr_offset = fields
    expected_magic = MAGIC_PRIMARY if where == "primary" else MAGIC_SECONDARY
    if magic != expected_magic:
        raise CorruptState(f"{where} LUKS2 header: bad magic (not a LUKS2 header)")
    if version != 2:
        raise CorruptState(f"{where} LUKS header: version {version}, only LUKS2 is supported")
    if hdr_size not in VALID_HDR_SIZES:
        raise CorruptState(f"{where} LUKS2 header: invalid header size {hdr_size}")
    if len(data) < hdr_size:
        raise CorruptState(f"{where} LUKS2 header: truncated", hint=_REPAIR_HINT)
    checksum_alg = _text(alg)
    if checksum_alg not in _CHECKSUM_ALGS:
        raise CorruptState(f"{where} LUKS2 header: unsupported checksum {checksum_alg!r}")
    stored = data[_CHECKSUM_OFFSET : _CHECKSUM_OFFSET + _CHECKSUM_SIZE]
    h = hashlib.new(checksum_alg)
    h.update(data[:_CHECKSUM_OFFSET])
    h.update(bytes(_CHECKSUM_SIZE))
    h.update(data[_CHECKSUM_OFFSET + _CHECKSUM_SIZE : hdr_size])
    digest = h.digest()
    if stored[: len(digest)] != digest:
        raise CorruptState(f"{where} LUKS2 header: checksum mismatch", hint=_REPAIR_HINT)
    json_text = data[BINARY_HEADER_SIZE:hdr_size].split(b"\x00", 1)[0]
    try:
        metadata = json.loads(json_text.decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptState(
            f"{where} LUKS2 header: invalid JSON metadata ({exc})", hint=_REPAIR_HINT
        ) from exc
    if not isinstance(metadata, dict) or not all(
        isinstance(metadata.get(k), dict)
        for k in ("keyslots", "tokens", "segments", "digests", "config")
    ):
        raise CorruptState(f"{where} LUKS2 header: JSON metadata lacks a required section")
    return HeaderCopy(
        magic=magic,
        version=version,
        hdr_size=hdr_size,
        seqid=seqid,
        label=_text(label),
        checksum_alg=checksum_alg,
        salt=salt,
        uuid=_text(uuid),
        subsystem=_text(subsystem),
        hdr_offset=hdr_offset,
        checksum=stored[: len(digest)],
        metadata=metadata,
        json_text=json_text,
    )


def _int(value: object, what: str) -> int:
    """A LUKS2 JSON integer: a decimal string (uint64) or, for small ones, a JSON number."""
    if isinstance(value, bool):
        raise CorruptState(f"LUKS2 metadata: {what} is not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    raise CorruptState(f"LUKS2 metadata: {what} is not an integer")


@dataclass(frozen=True)
class Luks2Header:
    """Both copies of a LUKS2 header, verified and in agreement."""

    primary: HeaderCopy
    secondary: HeaderCopy
    device_size: int

    @property
    def metadata(self) -> dict[str, Any]:
        return self.primary.metadata

    @property
    def uuid(self) -> str:
        return self.primary.uuid

    @property
    def label(self) -> str:
        return self.primary.label

    @property
    def hdr_size(self) -> int:
        return self.primary.hdr_size

    @property
    def seqid(self) -> int:
        return self.primary.seqid

    @property
    def keyslots_size(self) -> int:
        return _int(self.metadata["config"].get("keyslots_size"), "config.keyslots_size")

    @property
    def keyslots(self) -> dict[int, dict[str, Any]]:
        return {_int(k, "keyslot id"): v for k, v in self.metadata["keyslots"].items()}

    @property
    def tokens(self) -> dict[int, dict[str, Any]]:
        return {_int(k, "token id"): v for k, v in self.metadata["tokens"].items()}

    def segment(self) -> dict[str, Any]:
        """The one data segment (several exist only during a reencryption)."""
        segments = self.metadata["segments"]
        if len(segments) != 1 or "0" not in segments:
            raise CorruptState(
                f"LUKS2 header has {len(segments)} data segments: a reencryption is in "
                "progress or was interrupted",
                hint="Finish it with `cryptsetup reencrypt --resume-only`.",
            )
        seg = segments["0"]
        if not isinstance(seg, dict) or seg.get("type") != "crypt":
            raise CorruptState("LUKS2 data segment 0 is not of type crypt")
        return seg

    @property
    def data_offset(self) -> int:
        return _int(self.segment().get("offset"), "segment offset")

    @property
    def sector_size(self) -> int:
        return _int(self.segment().get("sector_size"), "segment sector_size")

    @property
    def cipher(self) -> str:
        cipher = self.segment().get("encryption")
        if not isinstance(cipher, str):
            raise CorruptState("LUKS2 data segment has no cipher")
        return cipher

    @property
    def iv_tweak(self) -> int:
        return _int(self.segment().get("iv_tweak", "0"), "segment iv_tweak")

    @property
    def data_size(self) -> int:
        size = self.segment().get("size")
        if size == "dynamic":
            return self.device_size - self.data_offset
        return _int(size, "segment size")

    @property
    def requirements(self) -> list[str]:
        req = self.metadata["config"].get("requirements", {})
        mandatory = req.get("mandatory", []) if isinstance(req, dict) else []
        return [str(r) for r in mandatory]


def _device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def read_header(path: Path) -> Luks2Header:
    """Read and verify both header copies of the LUKS2 container at ``path``.

    Raises :class:`CorruptState` when either copy is damaged, or when the copies disagree
    (different seqid or metadata): fail closed rather than guess which one cryptsetup will use.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise CorruptState(f"cannot read the LUKS2 header of {path}: {exc.strerror}") from exc
    try:
        size = _device_size(fd)
        first = os.pread(fd, BINARY_HEADER_SIZE, 0)
        if len(first) < BINARY_HEADER_SIZE or first[:6] != MAGIC_PRIMARY:
            raise CorruptState(
                f"{path} has no LUKS2 header (bad magic)", hint="Check the container path."
            )
        hdr_size = struct.unpack_from(">Q", first, 8)[0]
        if hdr_size not in VALID_HDR_SIZES:
            raise CorruptState(f"{path}: invalid LUKS2 header size {hdr_size}", hint=_REPAIR_HINT)
        primary = parse_copy(os.pread(fd, hdr_size, 0), where="primary")
        secondary = parse_copy(os.pread(fd, hdr_size, hdr_size), where="secondary")
    finally:
        os.close(fd)
    if primary.hdr_offset != 0 or secondary.hdr_offset != hdr_size:
        raise CorruptState(f"{path}: LUKS2 header copy at a wrong offset", hint=_REPAIR_HINT)
    if (
        primary.seqid != secondary.seqid
        or primary.json_text != secondary.json_text
        or primary.uuid != secondary.uuid
    ):
        raise CorruptState(
            f"{path}: the two LUKS2 header copies disagree (seqid {primary.seqid} and "
            f"{secondary.seqid})",
            hint=_REPAIR_HINT,
        )
    return Luks2Header(primary=primary, secondary=secondary, device_size=size)


def canonical_json(value: Any) -> bytes:
    """The canonical serialisation the header digest uses (sorted keys, no spaces, UTF-8)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode(
        "utf-8"
    )


def metadata_without_tokens(metadata: Mapping[str, Any], token_type: str | None) -> dict[str, Any]:
    """A copy of ``metadata`` without the tokens of type ``token_type`` (None: keep all)."""
    result = dict(metadata)
    tokens = metadata.get("tokens", {})
    result["tokens"] = {
        k: v
        for k, v in tokens.items()
        if token_type is None or not (isinstance(v, dict) and v.get("type") == token_type)
    }
    return result


def header_digest(path: Path, *, exclude_token_type: str | None = QUBES_SEAL_TYPE) -> bytes:
    """The SHA-256 digest of the LUKS2 header of ``path`` that the unlock extends into PCR 13.

    Definition (version 1; docs/PCR13.md gives the rationale)::

        D = SHA-256( "qubes-seal/luks2-header-digest/v1" || 0x00
                   || u64(len(U)) || U
                   || u64(len(J)) || J
                   || u64(n)
                   || for each keyslot, in ascending numeric id:
                        u64(id) || u64(area.offset) || u64(area.size)
                        || SHA-256(the area.size bytes at area.offset) )

    where ``u64`` is a big-endian 64-bit integer, ``U`` the UUID of the binary header (ASCII,
    without NUL padding), ``J`` the JSON metadata with every token whose ``type`` is
    ``exclude_token_type`` removed, serialised canonically (``json.dumps(sort_keys=True,
    separators=(",", ":"), ensure_ascii=False)``, UTF-8), and ``n`` the number of keyslots.

    Not covered: the seqid (it changes on every metadata write, token updates included), the
    checksums, the salt of the binary header, the label and subsystem, and the secondary copy
    (which :func:`read_header` requires to agree with the primary).  Our own token is not
    covered because it holds the object sealed to this digest: covering it would be circular.

    Raises :class:`CorruptState` if the header is damaged or a keyslot area lies outside the
    keyslots area or the device.
    """
    header = read_header(path)
    hdr_size = header.hdr_size
    area_start = 2 * hdr_size
    area_end = area_start + header.keyslots_size
    keyslots = header.keyslots
    h = hashlib.sha256()
    h.update(DIGEST_TAG)
    uuid = header.uuid.encode("utf-8")
    h.update(struct.pack(">Q", len(uuid)) + uuid)
    j = canonical_json(metadata_without_tokens(header.metadata, exclude_token_type))
    h.update(struct.pack(">Q", len(j)) + j)
    h.update(struct.pack(">Q", len(keyslots)))
    with open(path, "rb") as f:
        for slot in sorted(keyslots):
            ks = keyslots[slot]
            area = ks.get("area") if isinstance(ks, dict) else None
            if not isinstance(area, dict):
                raise CorruptState(f"LUKS2 keyslot {slot} has no area")
            offset = _int(area.get("offset"), f"keyslot {slot} area offset")
            size = _int(area.get("size"), f"keyslot {slot} area size")
            if offset < area_start or offset + size > min(area_end, header.device_size):
                raise CorruptState(
                    f"LUKS2 keyslot {slot}: area [{offset}, {offset + size}) lies outside the "
                    "keyslots area",
                    hint=_REPAIR_HINT,
                )
            f.seek(offset)
            area_hash = hashlib.sha256()
            remaining = size
            while remaining:
                chunk = f.read(min(remaining, 1 << 20))
                if not chunk:
                    raise CorruptState(f"LUKS2 keyslot {slot}: area truncated")
                area_hash.update(chunk)
                remaining -= len(chunk)
            h.update(struct.pack(">QQQ", slot, offset, size) + area_hash.digest())
    return h.digest()
