"""TCG PC Client event logs: parse, write, replay and verify against a TPM.

Formats read here (all little-endian):

* the crypto-agile log of TCG_PCR_EVENT2 records (TCG PC Client Platform Firmware Profile,
  section 10.2.2), whose first record is a TPM 1.2-style TCG_PCClientPCREvent holding the
  ``Spec ID Event03`` structure (TCG_EfiSpecIDEvent) that lists the hash algorithms and
  their digest sizes.  Firmware logs (``binary_bios_measurements``) and the TXT event log that
  current SINIT modules and tboot keep in the TXT heap use it;
* the legacy SHA-1 log of TCG_PCClientPCREvent records (TPM 1.2, or a TPM 2.0 firmware that
  logs in the 1.2 format);
* tboot's older TXT formats: the per-bank "legacy TPM2" logs
  (``HEAP_EVENT_LOG_POINTER_ELEMENT2``, tboot ``tboot/include/txt/heap.h``
  ``heap_event_log_descr_t``) and the TPM 1.2 "TXT Event Container".

Every count and size read from a log is checked against the bytes that remain before it is
used, so hostile input raises :class:`EventLogError` (with the byte offset) instead of
hanging or allocating without bound.  Zero padding after the last record (firmware buffers,
tboot's 0x2000-byte TXT heap buffer) ends a log cleanly.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from qubes_seal.errors import CorruptState

__all__ = [
    "ALG_SHA1",
    "ALG_SHA256",
    "ALG_SHA384",
    "ALG_SHA512",
    "ALG_SM3_256",
    "EVTYPE_TB_MEASUREMENT",
    "EV_NO_ACTION",
    "FORMAT_CRYPTO_AGILE",
    "FORMAT_SHA1",
    "FORMAT_TXT_TPM2_LEGACY",
    "FORMAT_TXT_TPM12_CONTAINER",
    "Event",
    "EventLog",
    "EventLogError",
    "PcrCheck",
    "SpecId",
    "alg_id",
    "bank_name",
    "digest_size",
    "event_type_name",
    "initial_pcr_value",
    "parse",
    "parse_txt_event_container",
    "parse_txt_tpm2_legacy",
    "replay",
    "replay_bytes",
    "verify",
    "write",
    "write_sha1",
]


class EventLogError(CorruptState):
    """An event log that is truncated, corrupted, or not in a format we can read."""

    hint = (
        "The event log could not be read. If it came from a file, check that the file is the "
        "complete binary log (for the firmware log, a copy of "
        "/sys/kernel/security/tpm0/binary_bios_measurements; for the TXT log, the capture "
        "made from the TXT heap) and not a text rendering of it."
    )


# --- Hash algorithms (TCG Algorithm Registry, TPM_ALG_ID) ----------------------------------

ALG_SHA1 = 0x0004
ALG_SHA256 = 0x000B
ALG_SHA384 = 0x000C
ALG_SHA512 = 0x000D
ALG_SM3_256 = 0x0012

_KNOWN_BANKS: dict[str, tuple[int, int, str]] = {
    # bank name: (TPM_ALG_ID, digest size, hashlib name)
    "sha1": (ALG_SHA1, 20, "sha1"),
    "sha256": (ALG_SHA256, 32, "sha256"),
    "sha384": (ALG_SHA384, 48, "sha384"),
    "sha512": (ALG_SHA512, 64, "sha512"),
    "sm3_256": (ALG_SM3_256, 32, "sm3"),
}
_ALG_TO_BANK: dict[int, str] = {alg: name for name, (alg, _, _) in _KNOWN_BANKS.items()}
_UNKNOWN_PREFIX = "alg_0x"


def bank_name(alg: int) -> str:
    """The bank name of a TPM_ALG_ID: ``sha1``, ``sha256`` ... or ``alg_0x00XX`` if unknown."""
    if not 0 <= alg <= 0xFFFF:
        raise ValueError(f"TPM_ALG_ID out of range: {alg:#x}")
    return _ALG_TO_BANK.get(alg, f"{_UNKNOWN_PREFIX}{alg:04x}")


def alg_id(bank: str) -> int:
    """The TPM_ALG_ID of a bank name (the inverse of :func:`bank_name`)."""
    known = _KNOWN_BANKS.get(bank)
    if known is not None:
        return known[0]
    if bank.startswith(_UNKNOWN_PREFIX) and len(bank) == len(_UNKNOWN_PREFIX) + 4:
        try:
            return int(bank[len(_UNKNOWN_PREFIX) :], 16)
        except ValueError:
            pass
    raise ValueError(f"unknown PCR bank name {bank!r}")


def digest_size(bank: str) -> int:
    """The digest size in bytes of a known bank (``ValueError`` for an unknown one)."""
    known = _KNOWN_BANKS.get(bank)
    if known is None:
        raise ValueError(f"digest size of PCR bank {bank!r} is not known")
    return known[1]


def _hash_constructor(bank: str) -> Callable[[bytes], Any] | None:
    """A bank's hash object constructor (``ctor(data).digest()``), or None when hashlib
    does not provide it.  The named constructors (``hashlib.sha256``) are used where they
    exist: they cost half of ``hashlib.new`` per call, which a replay makes per digest.
    """
    known = _KNOWN_BANKS.get(bank)
    if known is None:
        return None
    name = known[2]
    try:
        hashlib.new(name)
    except ValueError:
        return None
    named: Callable[[bytes], Any] | None = getattr(hashlib, name, None)
    if named is not None:
        return named
    return lambda data: hashlib.new(name, data)


# --- Event types ---------------------------------------------------------------------------
# TCG PC Client Platform Firmware Profile, section 10.4.1 (Event Types).
EV_PREBOOT_CERT = 0x00000000
EV_POST_CODE = 0x00000001
EV_UNUSED = 0x00000002
EV_NO_ACTION = 0x00000003
EV_SEPARATOR = 0x00000004
EV_ACTION = 0x00000005
EV_EVENT_TAG = 0x00000006
EV_S_CRTM_CONTENTS = 0x00000007
EV_S_CRTM_VERSION = 0x00000008
EV_CPU_MICROCODE = 0x00000009
EV_PLATFORM_CONFIG_FLAGS = 0x0000000A
EV_TABLE_OF_DEVICES = 0x0000000B
EV_COMPACT_HASH = 0x0000000C
EV_IPL = 0x0000000D
EV_IPL_PARTITION_DATA = 0x0000000E
EV_NONHOST_CODE = 0x0000000F
EV_NONHOST_CONFIG = 0x00000010
EV_NONHOST_INFO = 0x00000011
EV_OMIT_BOOT_DEVICE_EVENTS = 0x00000012
EV_POST_CODE2 = 0x00000013

EV_EFI_EVENT_BASE = 0x80000000
EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
EV_EFI_VARIABLE_BOOT = 0x80000002
EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
EV_EFI_RUNTIME_SERVICES_DRIVER = 0x80000005
EV_EFI_GPT_EVENT = 0x80000006
EV_EFI_ACTION = 0x80000007
EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
EV_EFI_HANDOFF_TABLES = 0x80000009
EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
EV_EFI_HANDOFF_TABLES2 = 0x8000000B
EV_EFI_VARIABLE_BOOT2 = 0x8000000C
EV_EFI_GPT_EVENT2 = 0x8000000D
EV_EFI_HCRTM_EVENT = 0x80000010
EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
EV_EFI_SPDM_FIRMWARE_BLOB = 0x800000E1
EV_EFI_SPDM_FIRMWARE_CONFIG = 0x800000E2
EV_EFI_SPDM_DEVICE_POLICY = 0x800000E3
EV_EFI_SPDM_DEVICE_AUTHORITY = 0x800000E4

# Intel TXT event types logged by SINIT (Intel TXT Software Development Guide, appendix
# "Event Log"; tboot prints them by these names), and tboot's own measurements
# (tboot/common/integrity.c: EVTTYPE_TB_MEASUREMENT = 0x400 + 0x101).
EVTYPE_BASE = 0x400
EVTYPE_PCRMAPPING = 0x401
EVTYPE_HASH_START = 0x402
EVTYPE_COMBINED_HASH = 0x403
EVTYPE_MLE_HASH = 0x404
EVTYPE_BIOSAC_REG_DATA = 0x40A
EVTYPE_CPU_SCRTM_STAT = 0x40B
EVTYPE_LCP_CONTROL_HASH = 0x40C
EVTYPE_ELEMENTS_HASH = 0x40D
EVTYPE_STM_HASH = 0x40E
EVTYPE_OSSINITDATA_CAP_HASH = 0x40F
EVTYPE_SINIT_PUBKEY_HASH = 0x410
EVTYPE_LCP_HASH = 0x411
EVTYPE_LCP_DETAILS_HASH = 0x412
EVTYPE_LCP_AUTHORITIES_HASH = 0x413
EVTYPE_NV_INFO_HASH = 0x414
EVTYPE_CAP_VALUE = 0x4FF
EVTYPE_TB_MEASUREMENT = 0x501

EVENT_TYPE_NAMES: Mapping[int, str] = {
    value: name
    for name, value in dict(globals()).items()
    if (name.startswith(("EV_", "EVTYPE_"))) and isinstance(value, int)
}


def event_type_name(event_type: int) -> str:
    """The TCG (or Intel TXT / tboot) name of an event type; unknown types as ``0x…`` hex."""
    name = EVENT_TYPE_NAMES.get(event_type)
    return name if name is not None else f"{event_type:#010x}"


def _pack(fmt: str, *values: int) -> bytes:
    """struct.pack, with out-of-range values reported as ValueError."""
    try:
        return struct.pack(fmt, *values)
    except struct.error as exc:
        raise ValueError(f"value out of range for a log field: {values}") from exc


# --- Data model ----------------------------------------------------------------------------

FORMAT_CRYPTO_AGILE = "crypto-agile"
FORMAT_SHA1 = "sha1"
FORMAT_TXT_TPM2_LEGACY = "txt-tpm2-legacy"
FORMAT_TXT_TPM12_CONTAINER = "txt-tpm12-container"

SPEC_ID_SIGNATURE = b"Spec ID Event03\x00"
STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\x00"


class _Record:
    """Equality, repr and pickling by fields: what ``@dataclass`` generates, written out.

    The classes of this module are read on the CLI's start (``qubes-seal eventlog``), and
    importing :mod:`dataclasses` (it pulls in :mod:`inspect`) costs more than parsing a
    firmware log, so they do without it.  Same behaviour: fields as ``__init__``
    arguments in order, ``==`` between instances of the same class by field values, a
    ``Name(field=value, ...)`` repr; frozen classes refuse assignment and hash by value.
    """

    __slots__ = ()
    _fields: ClassVar[tuple[str, ...]] = ()

    def _values(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name in self._fields)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _Record) or other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self._fields)
        return f"{self.__class__.__qualname__}({fields})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.__class__, self._values())


class _Frozen(_Record):
    """A :class:`_Record` whose fields cannot be assigned (``@dataclass(frozen=True)``)."""

    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"cannot assign to field {name!r} of a frozen {type(self).__name__}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"cannot delete field {name!r} of a frozen {type(self).__name__}")

    def __hash__(self) -> int:
        return hash(self._values())


_set = object.__setattr__


class Event(_Frozen):
    """One event: the PCR it extends, its type, its digest per bank name, and its data.

    For the Spec ID event of a crypto-agile log, ``digests`` is ``{"sha1": 20 zero bytes}``
    (the TPM 1.2-style header record) and ``data`` the TCG_EfiSpecIDEvent structure.
    """

    __slots__ = _fields = ("pcr", "event_type", "digests", "data")
    pcr: int
    event_type: int
    digests: dict[str, bytes]
    data: bytes

    def __init__(self, pcr: int, event_type: int, digests: dict[str, bytes], data: bytes) -> None:
        _set(self, "pcr", pcr)
        _set(self, "event_type", event_type)
        _set(self, "digests", digests)
        _set(self, "data", data)

    @property
    def type_name(self) -> str:
        """The event type's name (see :func:`event_type_name`)."""
        return event_type_name(self.event_type)


class SpecId(_Frozen):
    """The TCG_EfiSpecIDEvent (``Spec ID Event03``) heading a crypto-agile log."""

    __slots__ = _fields = (
        "algorithms",
        "platform_class",
        "spec_version_minor",
        "spec_version_major",
        "spec_errata",
        "uintn_size",
        "vendor_info",
    )
    algorithms: tuple[tuple[int, int], ...]
    """(TPM_ALG_ID, digest size) per bank, in the log's order."""
    platform_class: int
    spec_version_minor: int
    spec_version_major: int
    spec_errata: int
    uintn_size: int
    """1 for UINT32, 2 for UINT64 firmware."""
    vendor_info: bytes

    def __init__(
        self,
        algorithms: tuple[tuple[int, int], ...],
        platform_class: int = 0,
        spec_version_minor: int = 0,
        spec_version_major: int = 2,
        spec_errata: int = 0,
        uintn_size: int = 2,
        vendor_info: bytes = b"",
    ) -> None:
        _set(self, "algorithms", algorithms)
        _set(self, "platform_class", platform_class)
        _set(self, "spec_version_minor", spec_version_minor)
        _set(self, "spec_version_major", spec_version_major)
        _set(self, "spec_errata", spec_errata)
        _set(self, "uintn_size", uintn_size)
        _set(self, "vendor_info", vendor_info)

    @property
    def banks(self) -> list[str]:
        """The bank names of :attr:`algorithms`, in order."""
        return [bank_name(alg) for alg, _ in self.algorithms]

    def encode(self) -> bytes:
        """The TCG_EfiSpecIDEvent structure as it appears as the first event's data."""
        if not self.algorithms:
            raise ValueError("a Spec ID event lists at least one algorithm")
        if len(self.vendor_info) > 0xFF:
            raise ValueError("vendorInfo is at most 255 bytes")
        out = bytearray(SPEC_ID_SIGNATURE)
        out += _pack(
            "<IBBBBI",
            self.platform_class,
            self.spec_version_minor,
            self.spec_version_major,
            self.spec_errata,
            self.uintn_size,
            len(self.algorithms),
        )
        for alg, size in self.algorithms:
            out += _pack("<HH", alg, size)
        out.append(len(self.vendor_info))
        out += self.vendor_info
        return bytes(out)

    def digest_sizes(self) -> dict[str, int]:
        """Digest size per bank name."""
        return {bank_name(alg): size for alg, size in self.algorithms}


class EventLog(_Record):
    """A parsed event log.

    ``format`` is one of ``"crypto-agile"``, ``"sha1"``, ``"txt-tpm2-legacy"`` (tboot's
    per-bank TPM 2.0 log: each event then carries the digest of one bank only) or
    ``"txt-tpm12-container"``.  ``banks`` lists the banks the log declares, in order;
    ``spec_id`` is set for crypto-agile logs, whose Spec ID event is ``events[0]``.
    """

    __slots__ = _fields = ("events", "banks", "format", "spec_id")
    events: list[Event]
    banks: list[str]
    format: str
    spec_id: SpecId | None

    def __init__(
        self, events: list[Event], banks: list[str], format: str, spec_id: SpecId | None = None
    ) -> None:
        self.events = events
        self.banks = banks
        self.format = format
        self.spec_id = spec_id


class PcrCheck(_Frozen):
    """The result of comparing one replayed PCR with the value the TPM reports."""

    __slots__ = _fields = ("bank", "pcr", "replayed", "tpm", "extended")
    bank: str
    pcr: int
    replayed: bytes
    """The value the log implies (the reset value if the log does not extend this PCR)."""
    tpm: bytes | None
    """The value read from the TPM, or None if the caller gave none for this PCR."""
    extended: bool
    """Whether the log extends this PCR at all."""

    def __init__(
        self, bank: str, pcr: int, replayed: bytes, tpm: bytes | None, extended: bool
    ) -> None:
        _set(self, "bank", bank)
        _set(self, "pcr", pcr)
        _set(self, "replayed", replayed)
        _set(self, "tpm", tpm)
        _set(self, "extended", extended)

    @property
    def ok(self) -> bool:
        """True when the TPM value is known and equals the replayed one."""
        return self.tpm is not None and hmac.compare_digest(self.replayed, self.tpm)


# --- Parsing -------------------------------------------------------------------------------


class _Reader:
    """Bounds-checked little-endian reads over a bytes buffer."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def fail(self, what: str, at: int | None = None) -> EventLogError:
        offset = self.pos if at is None else at
        return EventLogError(f"event log corrupt at byte offset {offset} ({offset:#x}): {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise self.fail(f"{what} needs {n} bytes but only {self.remaining} remain")

    def u8(self, what: str) -> int:
        self.need(1, what)
        value = self.data[self.pos]
        self.pos += 1
        return value

    def u16(self, what: str) -> int:
        self.need(2, what)
        (value,) = struct.unpack_from("<H", self.data, self.pos)
        self.pos += 2
        return int(value)

    def u32(self, what: str) -> int:
        self.need(4, what)
        (value,) = struct.unpack_from("<I", self.data, self.pos)
        self.pos += 4
        return int(value)

    def take(self, n: int, what: str) -> bytes:
        self.need(n, what)
        value = self.data[self.pos : self.pos + n]
        self.pos += n
        return value


def _data_end(data: bytes, start: int, end: int) -> int:
    """Offset after the last non-zero byte of data[start:end] (start if all zero)."""
    stripped = len(data[start:end].rstrip(b"\x00"))
    return start + stripped


def _parse_spec_id(r: _Reader, event_start: int, event_size: int) -> tuple[SpecId, bytes]:
    """Read a TCG_EfiSpecIDEvent at r.pos (the first event's data); r ends after it.

    ``event_size`` is the record's eventSize.  The structure must fill it exactly, except
    for one tolerated quirk (tpm2-tools ``specid-vendordata.bin``): an eventSize that stops
    right after vendorInfoSize, with the vendorInfo bytes following; tpm2-tools reads those
    as the vendorInfo too.
    """
    start = r.pos
    r.need(event_size, "Spec ID event data (eventSize)")
    min_size = 16 + 4 + 4 + 4 + 1
    if event_size < min_size:
        raise r.fail(f"Spec ID event size {event_size} is below the minimum {min_size}")
    r.take(16, "Spec ID signature")
    platform_class = r.u32("platformClass")
    minor = r.u8("specVersionMinor")
    major = r.u8("specVersionMajor")
    errata = r.u8("specErrata")
    uintn = r.u8("uintnSize")
    count_at = r.pos
    count = r.u32("numberOfAlgorithms")
    if count == 0:
        raise r.fail("Spec ID event lists no algorithm", count_at)
    if count * 4 + 1 > event_size - (r.pos - start):
        raise r.fail(
            f"Spec ID event claims {count} algorithms, more than its {event_size} bytes hold",
            count_at,
        )
    algorithms: list[tuple[int, int]] = []
    seen: set[int] = set()
    for _ in range(count):
        at = r.pos
        alg = r.u16("algorithmId")
        size = r.u16("digestSize")
        if alg == 0:
            raise r.fail("Spec ID event declares algorithm id 0 (TPM_ALG_ERROR)", at)
        if alg in seen:
            raise r.fail(f"Spec ID event declares algorithm {alg:#06x} twice", at)
        known = _KNOWN_BANKS.get(bank_name(alg))
        if known is not None and known[1] != size:
            raise r.fail(
                f"Spec ID event declares {bank_name(alg)} with digest size {size}, not {known[1]}",
                at,
            )
        if size == 0:
            raise r.fail(f"Spec ID event declares algorithm {alg:#06x} with digest size 0", at)
        seen.add(alg)
        algorithms.append((alg, size))
    vendor_size = r.u8("vendorInfoSize")
    used = r.pos - start
    if used + vendor_size == event_size:
        vendor = r.take(vendor_size, "vendorInfo")
    elif used == event_size and vendor_size > 0:
        # eventSize left the vendorInfo out; read it after the event (tpm2-tools does).
        vendor = r.take(vendor_size, "vendorInfo (past eventSize)")
    else:
        raise r.fail(
            f"Spec ID event size {event_size} does not match its structure "
            f"({used} bytes + vendorInfoSize {vendor_size})",
            event_start,
        )
    spec = SpecId(
        algorithms=tuple(algorithms),
        platform_class=platform_class,
        spec_version_minor=minor,
        spec_version_major=major,
        spec_errata=errata,
        uintn_size=uintn,
        vendor_info=vendor,
    )
    return spec, r.data[start : r.pos]


def _parse_sha1_records(r: _Reader, limit: int) -> list[Event]:
    """TCG_PCClientPCREvent records from r.pos up to the last non-zero byte before limit."""
    events: list[Event] = []
    while r.pos < limit:
        pcr = r.u32("PCRIndex")
        event_type = r.u32("EventType")
        digest = r.take(20, "SHA-1 digest")
        size_at = r.pos
        size = r.u32("EventSize")
        if size > r.remaining:
            raise r.fail(f"event data size {size} runs past the end ({r.remaining} left)", size_at)
        data = r.take(size, "event data")
        events.append(Event(pcr, event_type, {"sha1": digest}, data))
    return events


_U16 = struct.Struct("<H").unpack_from
_U32 = struct.Struct("<I").unpack_from
_U32X3 = struct.Struct("<III").unpack_from
_HEADER_FIELDS = struct.Struct("<II20xI").unpack_from
_ZERO_SHA1 = bytes(20)


def _digest_dict_builder(banks: list[str]) -> Callable[[tuple[Any, ...]], dict[str, bytes]]:
    """A function from the fields of a full-layout record to its digests (bank -> digest).

    Spelled out for the usual one to three banks: ``dict(zip(...))`` costs several times
    as much per event.
    """
    if len(banks) == 1:
        (b0,) = banks
        return lambda f: {b0: f[4]}
    if len(banks) == 2:
        b0, b1 = banks
        return lambda f: {b0: f[4], b1: f[6]}
    if len(banks) == 3:
        b0, b1, b2 = banks
        return lambda f: {b0: f[4], b1: f[6], b2: f[8]}
    return lambda f: dict(zip(banks, f[4:-1:2], strict=True))


def _parse_agile_fast(r: _Reader, limit: int, spec: SpecId, events: list[Event]) -> None:
    """The well-formed prefix of TCG_PCR_EVENT2 records, from r.pos, appended to ``events``.

    The same reading as :func:`_parse_agile_records`, without its per-field calls: it stops,
    with r.pos at the start of the record, at the first record that does not pass every
    check, so that the checked loop reads that record again and reports the exact error.
    A record carrying every declared bank in the Spec ID event's order (as firmware writes
    them) is read with one precompiled ``struct`` call.
    """
    data, end, pos = r.data, r.end, r.pos
    algorithms = spec.algorithms
    sizes = dict(algorithms)
    names = {alg: bank_name(alg) for alg in sizes}
    max_count = len(sizes)
    banks = [names[alg] for alg, _ in algorithms]
    ids = tuple(alg for alg, _ in algorithms)
    full = struct.Struct("<III" + "".join(f"H{size}s" for _, size in algorithms) + "I")
    full_unpack, full_size = full.unpack_from, full.size
    n_banks = len(banks)
    digests_of = _digest_dict_builder(banks)
    append = events.append
    new_event = Event
    while pos < limit:
        if pos + full_size <= end:
            fields = full_unpack(data, pos)
            if fields[2] == n_banks and fields[3:-1:2] == ids:
                p = pos + full_size
                dsize = fields[-1]
                if dsize > end - p:
                    break
                append(new_event(fields[0], fields[1], digests_of(fields), data[p : p + dsize]))
                pos = p + dsize
                continue
        if pos + 12 > end:
            break
        pcr, event_type, count = _U32X3(data, pos)
        if count > max_count:
            break
        p = pos + 12
        digests: dict[str, bytes] = {}
        for _ in range(count):
            if p + 2 > end:
                break
            (alg,) = _U16(data, p)
            size = sizes.get(alg)
            if size is None or names[alg] in digests or p + 2 + size > end:
                break
            digests[names[alg]] = data[p + 2 : p + 2 + size]
            p += 2 + size
        else:
            if p + 4 <= end:
                (dsize,) = _U32(data, p)
                p += 4
                if dsize <= end - p:
                    append(new_event(pcr, event_type, digests, data[p : p + dsize]))
                    pos = p + dsize
                    continue
        break
    r.pos = pos


def _parse_agile_records(r: _Reader, limit: int, spec: SpecId) -> list[Event]:
    """TCG_PCR_EVENT2 records from r.pos up to the last non-zero byte before limit."""
    sizes = {alg: size for alg, size in spec.algorithms}
    names = {alg: bank_name(alg) for alg in sizes}
    max_count = len(sizes)
    events: list[Event] = []
    _parse_agile_fast(r, limit, spec, events)
    while r.pos < limit:
        pcr = r.u32("PCRIndex")
        event_type = r.u32("EventType")
        count_at = r.pos
        count = r.u32("digest count")
        if count > max_count:
            raise r.fail(
                f"digest count {count} exceeds the {max_count} algorithms the Spec ID "
                "event declares",
                count_at,
            )
        digests: dict[str, bytes] = {}
        for _ in range(count):
            alg_at = r.pos
            alg = r.u16("digest algorithm id")
            size = sizes.get(alg)
            if size is None:
                raise r.fail(f"algorithm {alg:#06x} is not declared in the Spec ID event", alg_at)
            name = names[alg]
            if name in digests:
                raise r.fail(f"two {name} digests in one event", alg_at)
            digests[name] = r.take(size, f"{name} digest")
        size_at = r.pos
        size = r.u32("EventSize")
        if size > r.remaining:
            raise r.fail(f"event data size {size} runs past the end ({r.remaining} left)", size_at)
        data = r.take(size, "event data")
        events.append(Event(pcr, event_type, digests, data))
    return events


def parse(data: bytes) -> EventLog:
    """Parse a binary event log, detecting crypto-agile or legacy SHA-1 format.

    A log is crypto-agile when its first record is an EV_NO_ACTION event on PCR 0 whose data
    begins with ``Spec ID Event03``; that event is kept as ``events[0]`` and describes the
    banks.  Otherwise the whole log is read as SHA-1 TCG_PCClientPCREvent records.  Zero
    bytes after the last record end the log.  Raises :class:`EventLogError` for anything
    malformed, including an empty (or all-zero) log.
    """
    data = bytes(data)
    limit = _data_end(data, 0, len(data))
    if limit == 0:
        raise EventLogError("event log is empty (no bytes, or only zero padding)")
    r = _Reader(data)
    # The first record is always a TPM 1.2-style TCG_PCClientPCREvent.
    pcr = r.u32("PCRIndex")
    event_type = r.u32("EventType")
    digest = r.take(20, "SHA-1 digest")
    size_at = r.pos
    size = r.u32("EventSize")
    if size > r.remaining:
        raise r.fail(f"event data size {size} runs past the end ({r.remaining} left)", size_at)
    is_agile = (
        pcr == 0
        and event_type == EV_NO_ACTION
        and data[r.pos : r.pos + len(SPEC_ID_SIGNATURE)] == SPEC_ID_SIGNATURE
        and size >= len(SPEC_ID_SIGNATURE)
    )
    if not is_agile:
        r.pos = 0
        return EventLog(_parse_sha1_records(r, limit), ["sha1"], FORMAT_SHA1, None)
    if digest != bytes(20):
        raise r.fail("the Spec ID event's digest is not 20 zero bytes", 8)
    spec, spec_data = _parse_spec_id(r, 0, size)
    header = Event(0, EV_NO_ACTION, {"sha1": digest}, spec_data)
    events = [header, *_parse_agile_records(r, max(limit, r.pos), spec)]
    return EventLog(events, spec.banks, FORMAT_CRYPTO_AGILE, spec)


def parse_txt_tpm2_legacy(bank_logs: Mapping[str, bytes]) -> EventLog:
    """Parse tboot's per-bank "legacy TPM2" TXT event logs into one log.

    ``bank_logs`` maps a bank name to that bank's buffer, from its ``pcr_events_offset``
    (``heap_event_log_descr_t`` in tboot ``tboot/include/txt/heap.h``; zero padding after
    the last record is allowed).  Records are ``pcr u32, type u32, digest, data_size u32,
    data`` with the bank's digest size.  A non-SHA-1 bank starts with a TPM 1.2-style
    EV_NO_ACTION record whose 28-byte data is the TCG_LOG_DESCRIPTOR (signature[16],
    revision, digest id, digest size); it is kept as an event.  Each event carries one bank's
    digest; :func:`replay` extends each bank from its own events.
    """
    if not bank_logs:
        raise EventLogError("no per-bank TXT event log given")
    events: list[Event] = []
    for bank, data in bank_logs.items():
        try:
            size = digest_size(bank)
        except ValueError as exc:
            raise EventLogError(f"legacy TXT event log for unknown bank {bank!r}") from exc
        data = bytes(data)
        limit = _data_end(data, 0, len(data))
        r = _Reader(data)
        if bank != "sha1" and limit > 0:
            pcr = r.u32("PCRIndex")
            event_type = r.u32("EventType")
            digest = r.take(20, "SHA-1 digest")
            dsize_at = r.pos
            dsize = r.u32("EventSize")
            if pcr != 0 or event_type != EV_NO_ACTION or dsize != 28:
                raise r.fail(f"{bank} log does not start with its TCG_LOG_DESCRIPTOR record", 0)
            descriptor = r.take(dsize, "TCG_LOG_DESCRIPTOR")
            (declared,) = struct.unpack_from("<I", descriptor, 24)
            if declared != size:
                raise r.fail(
                    f"{bank} log descriptor declares digest size {declared}, not {size}",
                    dsize_at + 4 + 24,
                )
            events.append(Event(0, EV_NO_ACTION, {"sha1": digest}, descriptor))
        while r.pos < limit:
            pcr = r.u32("PCRIndex")
            event_type = r.u32("EventType")
            digest = r.take(size, f"{bank} digest")
            dsize_at = r.pos
            dsize = r.u32("EventSize")
            if dsize > r.remaining:
                raise r.fail(
                    f"event data size {dsize} runs past the end ({r.remaining} left)", dsize_at
                )
            events.append(Event(pcr, event_type, {bank: digest}, r.take(dsize, "event data")))
    return EventLog(events, list(bank_logs), FORMAT_TXT_TPM2_LEGACY, None)


TXT_EVENT_CONTAINER_SIGNATURE = b"TXT Event Container\x00"


def parse_txt_event_container(data: bytes) -> EventLog:
    """Parse a TPM 1.2 "TXT Event Container" (tboot ``event_log_container_t``).

    Header: signature[20] ``"TXT Event Container\\0"``, reserved[12], four version bytes,
    ``size``, ``pcr_events_offset`` and ``next_event_offset`` (u32 each); the SHA-1 records
    lie between the two offsets.
    """
    data = bytes(data)
    r = _Reader(data)
    if r.take(20, "container signature") != TXT_EVENT_CONTAINER_SIGNATURE:
        raise r.fail("not a TXT Event Container (signature mismatch)", 0)
    r.take(12, "reserved")
    major = r.u8("container major version")
    r.take(3, "versions")
    if major != 1:
        raise r.fail(f"unsupported TXT Event Container version {major}", 32)
    size = r.u32("container size")
    first_at = r.pos
    first = r.u32("pcr_events_offset")
    nxt = r.u32("next_event_offset")
    header_size = r.pos
    if not header_size <= first <= nxt <= min(size, len(data)):
        raise r.fail(
            f"event offsets [{first}, {nxt}) do not fit a container of {size} bytes "
            f"({len(data)} given)",
            first_at,
        )
    rr = _Reader(data, first, nxt)
    return EventLog(_parse_sha1_records(rr, nxt), ["sha1"], FORMAT_TXT_TPM12_CONTAINER, None)


# --- Writing -------------------------------------------------------------------------------


def _is_spec_id_event(event: Event) -> bool:
    return (
        event.pcr == 0
        and event.event_type == EV_NO_ACTION
        and event.data.startswith(SPEC_ID_SIGNATURE)
    )


def write(events: Sequence[Event], banks: Sequence[str], *, spec_id: SpecId | None = None) -> bytes:
    """Write a crypto-agile log: a Spec ID event for ``banks``, then ``events``.

    A leading Spec ID event in ``events`` (as :func:`parse` returns it) is replaced by the
    one written, so ``write(log.events, log.banks, spec_id=log.spec_id)`` rewrites a parsed
    log.  ``spec_id``, if given, must list exactly ``banks`` and supplies the header fields,
    vendorInfo and the digest size of banks we do not know; without it a default header is
    built (only known banks).  Every event needs at least one digest, each of a listed bank
    and of that bank's size; digests are written in the event's order.  Raises
    ``ValueError`` for events that cannot be written.
    """
    banks = list(banks)
    if spec_id is None:
        spec_id = SpecId(algorithms=tuple((alg_id(b), digest_size(b)) for b in banks))
    elif spec_id.banks != banks:
        raise ValueError(f"spec_id lists banks {spec_id.banks}, not {banks}")
    if not banks or len(set(banks)) != len(banks):
        raise ValueError(f"banks must be a non-empty list without repeats, not {banks}")
    sizes = spec_id.digest_sizes()
    ids = {b: alg_id(b) for b in banks}
    spec_data = spec_id.encode()
    out = bytearray(struct.pack("<II", 0, EV_NO_ACTION))
    out += bytes(20)
    out += struct.pack("<I", len(spec_data))
    out += spec_data
    body = list(events)
    if body and _is_spec_id_event(body[0]):
        body = body[1:]
    for index, event in enumerate(body):
        if not event.digests:
            raise ValueError(f"event {index} has no digest")
        out += _pack("<III", event.pcr, event.event_type, len(event.digests))
        for bank, digest in event.digests.items():
            if bank not in sizes:
                raise ValueError(f"event {index} has a {bank} digest; the log's banks: {banks}")
            if len(digest) != sizes[bank]:
                raise ValueError(
                    f"event {index}: {bank} digest of {len(digest)} bytes, not {sizes[bank]}"
                )
            out += struct.pack("<H", ids[bank])
            out += digest
        out += struct.pack("<I", len(event.data))
        out += event.data
    return bytes(out)


def write_sha1(events: Sequence[Event]) -> bytes:
    """Write a legacy SHA-1 log of TCG_PCClientPCREvent records.

    Every event must carry exactly one digest, ``sha1`` (20 bytes).  Raises ``ValueError``
    for an event the reader could not tell apart from something else: an all-zero record
    (read as padding) or a first event that looks like a crypto-agile Spec ID event.
    """
    out = bytearray()
    for index, event in enumerate(events):
        if set(event.digests) != {"sha1"} or len(event.digests["sha1"]) != 20:
            raise ValueError(f"event {index} must carry exactly one 20-byte sha1 digest")
        if index == 0 and _is_spec_id_event(event):
            raise ValueError("the first event of a SHA-1 log cannot be a Spec ID Event03")
        record = _pack("<II", event.pcr, event.event_type)
        record += event.digests["sha1"] + struct.pack("<I", len(event.data)) + event.data
        if not record.strip(b"\x00"):
            raise ValueError(f"event {index} is all zero bytes and would read as padding")
        out += record
    return bytes(out)


# --- Replay and verification ---------------------------------------------------------------

DRTM_PCRS = range(17, 23)
#: The "PCR" SINIT's EVTYPE_PCRMAPPING (0x401) event names: no PCR, nothing is extended.
PCR_MAPPING_INDEX = 0xFF
HCRTM_LOCALITY = 4
NUM_PCRS = 24


def initial_pcr_value(bank_size: int, pcr: int, *, drtm: bool, locality: int = 0) -> bytes:
    """The value a PCR holds before the log's first extend.

    PCR 0 holds ``00..00 || locality`` (the StartupLocality, 3, or 4 for an H-CRTM);
    PCR 17-22 hold zeros after a dynamic launch (``drtm=True``) and 0xFF otherwise;
    every other PCR holds zeros.
    """
    if pcr in DRTM_PCRS:
        return bytes(bank_size) if drtm else b"\xff" * bank_size
    if pcr == 0 and locality:
        return bytes(bank_size - 1) + bytes([locality])
    return bytes(bank_size)


def _startup_locality(event: Event) -> int | None:
    if (
        event.pcr == 0
        and event.event_type == EV_NO_ACTION
        and event.data.startswith(STARTUP_LOCALITY_SIGNATURE)
        and len(event.data) > len(STARTUP_LOCALITY_SIGNATURE)
    ):
        return event.data[len(STARTUP_LOCALITY_SIGNATURE)]
    return None


def _replay(log: EventLog, drtm: bool) -> tuple[dict[str, dict[int, bytes]], dict[str, int], int]:
    """Replayed values per bank, the digest size per replayed bank, and the locality."""
    hashes: dict[str, Callable[[bytes], Any]] = {}
    sizes: dict[str, int] = {}
    declared = log.spec_id.digest_sizes() if log.spec_id is not None else {}
    for bank in log.banks:
        ctor = _hash_constructor(bank)
        if ctor is not None:
            hashes[bank] = ctor
            sizes[bank] = declared.get(bank) or digest_size(bank)
    values: dict[str, dict[int, bytes]] = {bank: {} for bank in hashes}
    # Per bank: (hash constructor, digest size, the bank's PCR values); one lookup per digest.
    banks = {bank: (hashes[bank], sizes[bank], values[bank]) for bank in hashes}
    locality = 0
    seen_locality = False
    pcr0_extended = False
    for index, event in enumerate(log.events):
        pcr = event.pcr
        if event.event_type == EV_NO_ACTION:
            loc = _startup_locality(event)
            if loc is not None:
                if seen_locality:
                    raise EventLogError(f"event {index}: a second StartupLocality event")
                if pcr0_extended:
                    raise EventLogError(
                        f"event {index}: StartupLocality event after PCR 0 was extended"
                    )
                seen_locality = True
                locality = loc
            continue
        if event.event_type == EVTYPE_PCRMAPPING and pcr == PCR_MAPPING_INDEX:
            # SINIT's PCR-mapping event names "PCR 255": it records which mapping SINIT
            # used and extends nothing (real-drtm txt-stat dump, event 2).
            continue
        if not 0 <= pcr < NUM_PCRS:
            raise EventLogError(f"event {index} extends PCR {pcr}, beyond PCR 23")
        if pcr == 0:
            if event.event_type == EV_EFI_HCRTM_EVENT:
                # An H-CRTM measured before TPM2_Startup: the TPM starts PCR 0 at 00..04
                # (TPM 2.0 Library Part 1, "H-CRTM before TPM2_Startup"); such logs need
                # not carry a StartupLocality event (tpm2-tss binary_measurements_hcrtm.bin
                # has none).
                if pcr0_extended:
                    raise EventLogError(f"event {index}: H-CRTM event after PCR 0 was extended")
                if seen_locality and locality != HCRTM_LOCALITY:
                    raise EventLogError(
                        f"event {index}: H-CRTM event, but StartupLocality said {locality}"
                    )
                locality = HCRTM_LOCALITY
            if event.digests:
                pcr0_extended = True
        for bank, digest in event.digests.items():
            entry = banks.get(bank)
            if entry is None:
                continue
            ctor, size, pcrs = entry
            if len(digest) != size:
                raise EventLogError(
                    f"event {index}: {bank} digest of {len(digest)} bytes, not {size}"
                )
            current = pcrs.get(pcr)
            if current is None:
                current = initial_pcr_value(size, pcr, drtm=drtm, locality=locality)
            pcrs[pcr] = ctor(current + digest).digest()
    return values, sizes, locality


def replay(log: EventLog, *, drtm: bool = False) -> dict[str, dict[int, bytes]]:
    """Replay a log: the final value per bank and per PCR the log extends.

    EV_NO_ACTION events are not extended, nor is SINIT's PCR-mapping event (0x401) on
    "PCR 255".  A StartupLocality EV_NO_ACTION event makes PCR 0
    start at ``00..00 || locality``, and so does an EV_EFI_HCRTM_EVENT as PCR 0's first
    event, with locality 4; PCR 17-22 start at zero for a DRTM (TXT) log (``drtm=True``) and
    at 0xFF otherwise; other PCRs start at zero.  A StartupLocality or H-CRTM event after
    PCR 0 was extended, a second StartupLocality event, or an extend of a PCR above 23
    raises :class:`EventLogError`.  Banks whose hash hashlib does not provide (or that are
    unknown) are left out of the result; every other bank of the log is present, possibly
    empty.
    """
    values, _, _ = _replay(log, drtm)
    return values


def replay_bytes(data: bytes, *, drtm: bool = False) -> dict[str, dict[int, bytes]]:
    """``replay(parse(data), drtm=drtm)``, in one pass for a well-formed crypto-agile log.

    The records are read and extended as they are walked, without building an
    :class:`Event` per record.  Any other format, and any record or replay rule the fast
    walk does not pass (including every error), goes through :func:`parse` and
    :func:`replay`, so the result and every :class:`EventLogError` are theirs exactly.
    """
    fast = _replay_agile_fast(data, drtm)
    if fast is not None:
        return fast[0]
    return replay(parse(data), drtm=drtm)


_FastReplay = tuple[dict[str, dict[int, bytes]], list[str], int]


def _replay_agile_fast(data: bytes, drtm: bool) -> _FastReplay | None:
    """One pass over a crypto-agile log: (replayed values, the log's banks, event count).

    Returns None, without raising, for a log that is not crypto-agile or that anything
    would make :func:`parse` or :func:`replay` reject, or that takes a path not written out
    here: the caller then runs :func:`parse` and :func:`replay`, which give the answer (or
    the error).  The checks are those of :func:`parse` (``_parse_agile_records``) and
    :func:`_replay`, in the same order of rules; where this returns values, they are the
    ones :func:`replay` returns, in the same order.
    """
    data = bytes(data)
    end = len(data)
    # The Spec ID event: a TPM 1.2-style record, PCR 0, EV_NO_ACTION, 20 zero bytes.
    if end < 48:
        return None
    pcr, event_type, size = _HEADER_FIELDS(data, 0)
    if (
        pcr != 0
        or event_type != EV_NO_ACTION
        or size > end - 32
        or size < len(SPEC_ID_SIGNATURE)
        or data[32:48] != SPEC_ID_SIGNATURE
        or data[8:28] != _ZERO_SHA1
    ):
        return None
    r = _Reader(data, 32)
    try:
        spec, _ = _parse_spec_id(r, 0, size)
    except EventLogError:
        return None
    pos = r.pos
    limit = max(_data_end(data, 0, end), pos)

    algorithms = spec.algorithms
    sizes = dict(algorithms)
    names = {alg: bank_name(alg) for alg in sizes}
    banks = [names[alg] for alg, _ in algorithms]
    max_count = len(sizes)
    values: dict[str, dict[int, bytes]] = {}
    # Replayable banks by name: (hash constructor, digest size, the bank's PCR values).
    by_name: dict[str, tuple[Callable[[bytes], Any], int, dict[int, bytes]]] = {}
    # For a record in the full layout: (field index of the digest, constructor, PCRs).
    plan: list[tuple[int, Callable[[bytes], Any], int, dict[int, bytes]]] = []
    for index, (alg, dsize) in enumerate(algorithms):
        bank = names[alg]
        ctor = _hash_constructor(bank)
        if ctor is None:
            continue
        pcrs: dict[int, bytes] = {}
        values[bank] = pcrs
        by_name[bank] = (ctor, dsize, pcrs)
        plan.append((4 + 2 * index, ctor, dsize, pcrs))
    ids = tuple(alg for alg, _ in algorithms)
    full = struct.Struct("<III" + "".join(f"H{dsize}s" for _, dsize in algorithms) + "I")
    full_unpack, full_size = full.unpack_from, full.size
    n_banks = len(ids)

    no_action = EV_NO_ACTION
    hcrtm = EV_EFI_HCRTM_EVENT
    locality_signature = STARTUP_LOCALITY_SIGNATURE
    locality_at = len(locality_signature)
    locality = 0
    seen_locality = False
    pcr0_extended = False
    count_events = 1  # the Spec ID event
    digests: list[tuple[str, bytes]] = []
    while pos < limit:
        if pos + full_size <= end:
            fields = full_unpack(data, pos)
            full_layout = fields[2] == n_banks and fields[3:-1:2] == ids
        else:
            full_layout = False
        if full_layout:
            pcr, event_type = fields[0], fields[1]
            p = pos + full_size
            dsize = fields[-1]
            if dsize > end - p:
                return None
            next_pos = p + dsize
            count = n_banks
        else:
            # Any other layout: a subset of the banks, or another order.
            if pos + 12 > end:
                return None
            pcr, event_type, count = _U32X3(data, pos)
            if count > max_count:
                return None
            p = pos + 12
            digests = []
            for _ in range(count):
                if p + 2 > end:
                    return None
                (alg,) = _U16(data, p)
                dsize = sizes.get(alg, -1)
                if dsize < 0 or p + 2 + dsize > end:
                    return None
                name = names[alg]
                for seen_name, _ in digests:
                    if seen_name == name:
                        return None
                digests.append((name, data[p + 2 : p + 2 + dsize]))
                p += 2 + dsize
            if p + 4 > end:
                return None
            (dsize,) = _U32(data, p)
            p += 4
            if dsize > end - p:
                return None
            next_pos = p + dsize
        count_events += 1
        # The rules of _replay, per event.
        if event_type == no_action:
            if pcr == 0 and dsize > locality_at and data[p : p + locality_at] == locality_signature:
                if seen_locality or pcr0_extended:
                    return None
                seen_locality = True
                locality = data[p + locality_at]
            pos = next_pos
            continue
        if pcr >= NUM_PCRS:
            return None
        if pcr == 0:
            if event_type == hcrtm:
                if pcr0_extended or (seen_locality and locality != HCRTM_LOCALITY):
                    return None
                locality = HCRTM_LOCALITY
            if count:
                pcr0_extended = True
        if full_layout:
            for field, ctor, bank_size, pcrs in plan:
                current = pcrs.get(pcr)
                if current is None:
                    current = initial_pcr_value(bank_size, pcr, drtm=drtm, locality=locality)
                pcrs[pcr] = ctor(current + fields[field]).digest()
        else:
            for name, digest in digests:
                entry = by_name.get(name)
                if entry is None:
                    continue
                ctor, bank_size, pcrs = entry
                current = pcrs.get(pcr)
                if current is None:
                    current = initial_pcr_value(bank_size, pcr, drtm=drtm, locality=locality)
                pcrs[pcr] = ctor(current + digest).digest()
        pos = next_pos
    return values, banks, count_events


def verify(
    log: EventLog,
    tpm_pcrs: Mapping[str, Mapping[int, bytes]],
    *,
    drtm: bool = False,
) -> list[PcrCheck]:
    """Compare the log's replay with PCR values read from the TPM.

    Returns one :class:`PcrCheck` per (bank, PCR) that the log extends or that
    ``tpm_pcrs`` gives, sorted by bank then PCR; a PCR the log does not extend is expected
    at its reset value, and a replayed PCR missing from ``tpm_pcrs`` does not pass.  A bank
    in ``tpm_pcrs`` that the log does not have, or cannot replay, raises
    :class:`EventLogError`: a value that cannot be checked is never reported as checked.
    """
    values, sizes, locality = _replay(log, drtm)
    for bank in tpm_pcrs:
        if bank not in values:
            raise EventLogError(
                f"cannot check the {bank} bank: the log "
                + ("has no such bank" if bank not in log.banks else "uses a hash not available")
            )
    checks: list[PcrCheck] = []
    for bank in sorted(values, key=lambda b: log.banks.index(b)):
        replayed = values[bank]
        given = tpm_pcrs.get(bank, {})
        for pcr in sorted(set(replayed) | set(given)):
            if not 0 <= pcr < NUM_PCRS:
                raise EventLogError(f"no PCR {pcr} in a TPM (PCR 0-23)")
            expected = replayed.get(pcr)
            if expected is None:
                expected = initial_pcr_value(sizes[bank], pcr, drtm=drtm, locality=locality)
            tpm_value = given.get(pcr)
            checks.append(
                PcrCheck(
                    bank=bank,
                    pcr=pcr,
                    replayed=expected,
                    tpm=None if tpm_value is None else bytes(tpm_value),
                    extended=pcr in replayed,
                )
            )
    return checks
