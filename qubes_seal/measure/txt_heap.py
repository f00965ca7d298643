"""This boot's TXT event log, read from the Intel TXT registers and heap (``/dev/mem``).

Linux does not expose the DRTM event log: tboot's ``txt-stat`` reads it through ``/dev/mem``,
and so does :func:`capture`.  The memory is any file addressed like ``/dev/mem`` (byte
offset = physical address), read with ``pread`` at the few places needed, never mapped:

1. The TXT public configuration registers at 0xFED30000 (tboot ``include/txt/config_regs.h``):
   ``TXT.STS`` (bit 0 SENTER done), ``TXT.ESTS``, ``TXT.E2STS``, ``TXT.ERRORCODE`` (decoded
   as tboot's ``txt_display_errors`` decodes it), ``TXT.DIDVID``, ``TXT.VER.FSBIF``/``QPIIF``,
   ``TXT.SINIT.BASE``/``SIZE``, ``TXT.HEAP.BASE``/``SIZE``, ``TXT.DPR``.
2. The TXT heap (tboot ``include/txt/heap.h``): four tables in order, BiosData, OsMleData,
   OsSinitData, SinitMleData, each preceded by its u64 size (which counts those 8 bytes).
3. OsSinitData (version 6 and later) ends in extended data elements ``{u32 type; u32 size;
   data}`` (size counts the 8-byte header) closed by type 0 (END).  The event-log pointer is
   one of: type 8 ``EVENT_LOG_POINTER2_1`` (TCG crypto-agile log), type 7
   ``EVENT_LOG_POINTER2`` (one "legacy TPM2" log per hash bank), type 5
   ``TPM_EVENT_LOG_PTR`` (TPM 1.2 "TXT Event Container").
4. The log: the records from the pointer's first to its next record offset, as ``txt-stat``
   prints them.

The heap is attacker-writable before the launch and garbage when TXT is off, so every size,
offset, count and address is checked against the heap's bounds before it is used: the log
must lie inside the heap (a pointer elsewhere could make us copy any physical memory into a
file), every element list must end inside its table, nothing is read or allocated beyond
the heap (itself capped at :data:`MAX_HEAP_SIZE`).  Failures raise :class:`TxtHeapError`
(exit 7); a platform on which no measured launch happened raises nothing here but says so
in :attr:`TxtState.no_launch` (the CLI exits 3); memory that cannot be read raises
:class:`TxtMemoryError` (exit 1) with the reason.
"""

from __future__ import annotations

import errno
import os
import struct
from dataclasses import dataclass, field

from ..errors import EXIT_MEASUREMENT, CorruptState, QubesSealError
from . import eventlog

__all__ = [
    "DEV_MEM",
    "EXT_END",
    "EXT_EVENT_LOG_POINTER2",
    "EXT_EVENT_LOG_POINTER2_1",
    "EXT_TPM_EVENT_LOG_PTR",
    "HEAP_TABLES",
    "MAX_HEAP_SIZE",
    "REG",
    "TXT_PUB_CONFIG_BASE",
    "ExtElement",
    "HeapTable",
    "LogPointer",
    "TxtHeapError",
    "TxtMemoryError",
    "TxtNoLaunch",
    "TxtRegisters",
    "TxtState",
    "capture",
    "decode_errorcode",
    "no_launch_error",
    "parse_heap",
    "read_state",
    "registers_at",
]

DEV_MEM = "/dev/mem"

#: Physical base of the TXT public configuration space, 64 KiB (config_regs.h
#: TXT_PUB_CONFIG_REGS_BASE).
TXT_PUB_CONFIG_BASE = 0xFED30000
TXT_CONFIG_SIZE = 0x10000

#: Register offsets in the public space (tboot ``include/txt/config_regs.h``), each 8 bytes.
REG: dict[str, int] = {
    "sts": 0x000,
    "ests": 0x008,
    "errorcode": 0x030,
    "ver_fsbif": 0x100,
    "didvid": 0x110,
    "ver_qpiif": 0x200,
    "sinit_base": 0x270,
    "sinit_size": 0x278,
    "heap_base": 0x300,
    "heap_size": 0x308,
    "dpr": 0x330,
    "e2sts": 0x8F0,
}

#: The heap's tables, in the order they lie in it (heap.h).
HEAP_TABLES = ("bios_data", "os_mle_data", "os_sinit_data", "sinit_mle_data")

#: Real heaps are 0xE0000 or 1 MiB (the BIOS sets TXT.HEAP.SIZE); anything far larger is
#: garbage, and reading it would be an allocation an attacker sizes.
MAX_HEAP_SIZE = 64 * 1024 * 1024
#: Physical addresses above this (52 bits, the architectural maximum) are garbage.
MAX_PHYS_ADDR = 1 << 52

# Extended data element types (heap.h HEAP_EXTDATA_TYPE_*).
EXT_END = 0
EXT_BIOS_SPEC_VER = 1
EXT_ACM = 2
EXT_STM = 3
EXT_CUSTOM = 4
EXT_TPM_EVENT_LOG_PTR = 5
EXT_MADT = 6
EXT_EVENT_LOG_POINTER2 = 7
EXT_EVENT_LOG_POINTER2_1 = 8
EXT_MCFG = 9
LOG_POINTER_TYPES = (EXT_TPM_EVENT_LOG_PTR, EXT_EVENT_LOG_POINTER2, EXT_EVENT_LOG_POINTER2_1)
EXT_NAMES = {
    EXT_END: "END",
    EXT_BIOS_SPEC_VER: "BIOS_SPEC_VER",
    EXT_ACM: "ACM",
    EXT_STM: "STM",
    EXT_CUSTOM: "CUSTOM",
    EXT_TPM_EVENT_LOG_PTR: "TPM_EVENT_LOG_PTR",
    EXT_MADT: "MADT",
    EXT_EVENT_LOG_POINTER2: "EVENT_LOG_POINTER2",
    EXT_EVENT_LOG_POINTER2_1: "EVENT_LOG_POINTER2_1",
    EXT_MCFG: "MCFG",
}

#: OsSinitData's fixed part: up to ``capabilities`` (versions 1-4), then ``efi_rsdt_ptr``
#: (version 5 on); the extended data elements follow it from version 6.
OS_SINIT_FIXED_V4 = struct.Struct("<IIQQQQQQQQQI")
OS_SINIT_FIXED_V5 = struct.Struct("<IIQQQQQQQQQIQ")
#: heap_event_log_descr_t (type 7, per bank): alg, reserved, phys_addr, size, first, next.
LOG_DESCR = struct.Struct("<HHQIII")
#: heap_event_log_ptr_elt2_1_t (type 8): phys_addr, allocated size, first, next.
LOG_PTR2_1 = struct.Struct("<QIII")
#: event_log_container_t header (TPM 1.2): signature[20], reserved[12], 4 version bytes,
#: size, pcr_events_offset, next_event_offset.
CONTAINER_HEADER = struct.Struct("<20s12s4BIII")


# --- Errors ----------------------------------------------------------------------------------


class TxtHeapError(CorruptState):
    """The TXT heap or the log it points to is malformed: garbage or hostile."""

    hint = (
        "The TXT heap does not hold the tables and event-log pointer that SINIT and tboot "
        "leave after a launch: the memory is not this boot's TXT heap (TXT off, or a memory "
        "image that is not a real machine's), or something wrote over it. Do not trust a "
        "log read from it; nothing was written."
    )


class TxtNoLaunch(QubesSealError):
    """TXT says no measured launch happened: SENTER not done, or no event log."""

    exit_code = EXIT_MEASUREMENT
    hint = (
        "No Intel TXT measured launch happened in this boot, so there is no TXT event log. "
        "Check that the boot entry starts tboot, that TXT (and VT-d) are enabled in the "
        "firmware, and that the SINIT ACM matches the platform; TXT.ERRORCODE above says "
        "why SINIT refused, in tboot's words."
    )


class TxtMemoryError(QubesSealError):
    """The physical memory (``/dev/mem`` or an image) cannot be read."""


# --- Registers -------------------------------------------------------------------------------


def decode_errorcode(value: int) -> str:
    """TXT.ERRORCODE as tboot's ``txt_display_errors`` (``tboot/txt/errors.c``) prints it.

    Bit 31 valid, bit 30 external (0: the processor, 1: software), bits 0-29 the type.  A
    software error with bit 15 (src) set is "unknown SW error err1:err2"; otherwise it is
    an ACM error ``acm_type`` (bits 0-3), ``progress`` (4-9), ``error`` (10-14), with a TPM
    error code in bits 16-24 when progress is 0x10.
    """
    if not value & (1 << 31):
        return "no error" if value == 0 else f"not valid (0x{value:08x})"
    kind = value & 0x3FFFFFFF
    if not value & (1 << 30):
        return f"processor error 0x{kind:x}"
    if kind & (1 << 15):
        return f"unknown SW error 0x{kind & 0x7FFF:x}:0x{(kind >> 16) & 0x3FFF:x}"
    acm_type = kind & 0xF
    progress = (kind >> 4) & 0x3F
    error = (kind >> 10) & 0x1F
    text = (
        f"AC module error : acm_type=0x{acm_type:x}, progress=0x{progress:02x}, error=0x{error:x}"
    )
    tpm_err = (kind >> 16) & 0x1FF
    if progress == 0x10 and tpm_err:
        text += f"; TPM error code = 0x{tpm_err:x}"
    return text


@dataclass(frozen=True)
class TxtRegisters:
    """The TXT public registers that matter here, raw, with their bits decoded."""

    sts: int = 0
    ests: int = 0
    e2sts: int = 0
    errorcode: int = 0
    didvid: int = 0
    ver_fsbif: int = 0
    ver_qpiif: int = 0
    sinit_base: int = 0
    sinit_size: int = 0
    heap_base: int = 0
    heap_size: int = 0
    dpr: int = 0

    @property
    def senter_done(self) -> bool:
        return bool(self.sts & 0x1)

    @property
    def sexit_done(self) -> bool:
        return bool(self.sts & 0x2)

    @property
    def private_open(self) -> bool:
        return bool(self.sts & (1 << 7))

    @property
    def secrets(self) -> bool:
        """E2STS bit 1: secrets may be in memory (set by the MLE, cleared by TXT reset)."""
        return bool(self.e2sts & 0x2)

    @property
    def txt_reset(self) -> bool:
        return bool(self.ests & 0x1)

    @property
    def vendor_id(self) -> int:
        return self.didvid & 0xFFFF

    @property
    def device_id(self) -> int:
        return (self.didvid >> 16) & 0xFFFF

    @property
    def revision_id(self) -> int:
        return (self.didvid >> 32) & 0xFFFF

    def to_json(self) -> dict[str, object]:
        return {
            "sts": self.sts,
            "senter_done": self.senter_done,
            "sexit_done": self.sexit_done,
            "private_open": self.private_open,
            "ests": self.ests,
            "txt_reset": self.txt_reset,
            "e2sts": self.e2sts,
            "secrets": self.secrets,
            "errorcode": self.errorcode,
            "error": decode_errorcode(self.errorcode),
            "didvid": self.didvid,
            "vendor_id": self.vendor_id,
            "device_id": self.device_id,
            "revision_id": self.revision_id,
            "ver_fsbif": self.ver_fsbif,
            "ver_qpiif": self.ver_qpiif,
            "sinit_base": self.sinit_base,
            "sinit_size": self.sinit_size,
            "heap_base": self.heap_base,
            "heap_size": self.heap_size,
            "dpr": self.dpr,
        }


# --- The heap --------------------------------------------------------------------------------


@dataclass(frozen=True)
class HeapTable:
    """One heap table: where its data starts (after the u64 size), its size (with those 8
    bytes, as the heap stores and tboot prints it) and its version."""

    name: str
    phys_addr: int
    size: int
    version: int

    def to_json(self) -> dict[str, object]:
        return {"phys_addr": self.phys_addr, "size": self.size, "version": self.version}


@dataclass(frozen=True)
class ExtElement:
    type: int
    size: int
    phys_addr: int

    @property
    def name(self) -> str:
        return EXT_NAMES.get(self.type, f"unknown ({self.type})")


@dataclass(frozen=True)
class BankLog:
    """One bank's log of a type 7 pointer (heap_event_log_descr_t)."""

    bank: str
    phys_addr: int
    size: int
    first_record_offset: int
    next_record_offset: int


@dataclass(frozen=True)
class LogPointer:
    """The event-log pointer element, and what it points to."""

    element_type: int
    format: str
    phys_addr: int
    allocated: int
    first_record_offset: int
    next_record_offset: int
    banks: tuple[BankLog, ...] = ()

    @property
    def empty(self) -> bool:
        if self.banks:
            return all(b.first_record_offset == b.next_record_offset for b in self.banks)
        return self.first_record_offset == self.next_record_offset


@dataclass
class TxtState:
    """What :func:`read_state` found: registers, tables, the pointer and the log."""

    source: str
    registers: TxtRegisters
    tables: list[HeapTable] = field(default_factory=list)
    elements: list[ExtElement] = field(default_factory=list)
    pointer: LogPointer | None = None
    log: bytes = b""
    """The log as written by ``eventlog capture``: replayable by ``eventlog replay --txt``."""
    no_launch: str = ""
    """Why no measured launch (and so no log) is recorded; empty when there is a log."""

    def to_json(self) -> dict[str, object]:
        regs = self.registers
        log: dict[str, object] | None = None
        if self.pointer is not None:
            p = self.pointer
            log = {
                "format": p.format,
                "element_type": p.element_type,
                "phys_addr": p.phys_addr,
                "size": len(self.log),
                "allocated": p.allocated,
                "first_record_offset": p.first_record_offset,
                "next_record_offset": p.next_record_offset,
            }
            if p.banks:
                log["banks"] = [
                    {
                        "bank": b.bank,
                        "phys_addr": b.phys_addr,
                        "size": b.size,
                        "first_record_offset": b.first_record_offset,
                        "next_record_offset": b.next_record_offset,
                    }
                    for b in p.banks
                ]
        return {
            "source": self.source,
            "senter_done": regs.senter_done,
            "error_code": regs.errorcode,
            "error": decode_errorcode(regs.errorcode),
            "measured_launch": not self.no_launch,
            "no_launch_reason": self.no_launch or None,
            "registers": regs.to_json(),
            "heap": {t.name: t.to_json() for t in self.tables},
            "os_sinit_elements": [
                {"type": e.type, "name": e.name, "size": e.size, "phys_addr": e.phys_addr}
                for e in self.elements
            ],
            "log": log if self.log else None,
        }


class _Memory:
    """pread at physical addresses of a file read like /dev/mem."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise _memory_error(path, exc, "open") from exc

    def close(self) -> None:
        os.close(self.fd)

    def read(self, phys: int, size: int, what: str) -> bytes:
        """Exactly ``size`` bytes at ``phys``; a short read raises TxtMemoryError."""
        out = bytearray()
        while len(out) < size:
            try:
                chunk = os.pread(self.fd, size - len(out), phys + len(out))
            except OSError as exc:
                raise _memory_error(self.path, exc, f"read {what} at {phys:#x}") from exc
            if not chunk:
                raise TxtMemoryError(
                    f"cannot read {what} at {phys:#x} from {self.path}: the file ends at "
                    f"{phys + len(out):#x}",
                    hint="A memory image for --mem is addressed like /dev/mem (byte offset = "
                    "physical address): it must reach the TXT registers at 0xFED30000 and "
                    "the heap where TXT.HEAP.BASE points.",
                )
            out += chunk
        return bytes(out)


def _lockdown() -> str:
    try:
        with open("/sys/kernel/security/lockdown") as f:
            text = f.read()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def _memory_error(path: str, exc: OSError, action: str) -> TxtMemoryError:
    """The reason a read of physical memory failed, in words, with what to do."""
    is_dev_mem = os.path.realpath(path) == DEV_MEM
    if isinstance(exc, FileNotFoundError):
        hint = (
            "There is no /dev/mem here: a kernel built without CONFIG_DEVMEM, or a container "
            "or VM that does not expose it. Capture in dom0 (or its initramfs) on the machine."
            if is_dev_mem
            else "Give a memory image addressed like /dev/mem with --mem FILE."
        )
        return TxtMemoryError(f"cannot {action} {path}: no such file", hint=hint)
    if not is_dev_mem:
        return TxtMemoryError(f"cannot {action} the memory image {path}: {exc.strerror}")
    if exc.errno == errno.EACCES:
        return TxtMemoryError(
            f"cannot {action} {path}: permission denied (not root)",
            hint="/dev/mem is readable by root only (and needs CAP_SYS_RAWIO): run as root.",
        )
    if exc.errno == errno.EPERM:
        mode = _lockdown()
        if mode and mode != "none":
            return TxtMemoryError(
                f"cannot {action} {path}: the kernel is locked down ({mode}), and lockdown "
                "refuses /dev/mem",
                hint="Capture the log in the initramfs before lockdown is enabled, or boot "
                "without lockdown=; the running system cannot read the TXT heap.",
            )
        return TxtMemoryError(
            f"cannot {action} {path}: operation not permitted (missing CAP_SYS_RAWIO, or "
            "CONFIG_STRICT_DEVMEM refused this range)",
            hint="Run as root with CAP_SYS_RAWIO. With CONFIG_STRICT_DEVMEM the kernel lets "
            "/dev/mem reach only ranges that are not System RAM: the TXT registers and a heap "
            "that tboot reserved in the e820 map are allowed; older kernels refuse the rest "
            "with this error (newer ones read it as zeros, which shows as a corrupt heap).",
        )
    return TxtMemoryError(f"cannot {action} {path}: {exc.strerror}")


def _u64(data: bytes, at: int) -> int:
    return int(struct.unpack_from("<Q", data, at)[0])


def _u32(data: bytes, at: int) -> int:
    return int(struct.unpack_from("<I", data, at)[0])


def read_registers(mem: _Memory) -> TxtRegisters:
    """The public registers, one aligned 8-byte read each."""
    values = {
        name: _u64(mem.read(TXT_PUB_CONFIG_BASE + off, 8, f"TXT.{name.upper()}"), 0)
        for name, off in REG.items()
    }
    return TxtRegisters(**values)


def registers_at(path: str = DEV_MEM) -> TxtRegisters:
    """Only the public registers of the memory at ``path`` (``doctor``: after a corrupt heap,
    the registers still say whether TXT is on and which chipset this is)."""
    mem = _Memory(path)
    try:
        return read_registers(mem)
    finally:
        mem.close()


class _Heap:
    """The heap's bytes with bounds-checked reads; every failure is a TxtHeapError."""

    def __init__(self, data: bytes, base: int) -> None:
        self.data = data
        self.base = base
        self.end = base + len(data)

    def fail(self, what: str) -> TxtHeapError:
        return TxtHeapError(f"TXT heap at {self.base:#x} is corrupt: {what}")

    def offset(self, phys: int, size: int, what: str) -> int:
        """The heap offset of [phys, phys+size), which must lie inside the heap."""
        if not (self.base <= phys and size >= 0 and phys + size <= self.end):
            raise self.fail(
                f"{what} [{phys:#x}, {phys + size:#x}) lies outside the heap "
                f"[{self.base:#x}, {self.end:#x})"
            )
        return phys - self.base


def walk_tables(heap: _Heap) -> list[HeapTable]:
    """The four tables, each size checked to lie inside the heap."""
    tables: list[HeapTable] = []
    off = 0
    for name in HEAP_TABLES:
        if off + 12 > len(heap.data):
            raise heap.fail(f"{name}'s size and version at heap offset {off:#x} lie past its end")
        size = _u64(heap.data, off)
        if size < 12 or size > len(heap.data) - off:
            raise heap.fail(
                f"{name} at heap offset {off:#x} claims {size:#x} bytes; "
                f"{len(heap.data) - off:#x} remain (at least 12 needed)"
            )
        tables.append(HeapTable(name, heap.base + off + 8, size, _u32(heap.data, off + 8)))
        off += size
    return tables


def ext_elements(heap: _Heap, start: int, end: int, where: str) -> list[ExtElement]:
    """The extended data elements in heap offsets [start, end), up to and including END.

    Each element's size counts its 8-byte header, so a size below 8 (which would loop on
    itself) or past ``end`` is corrupt, as is a list that reaches ``end`` without END.
    """
    elements: list[ExtElement] = []
    pos = start
    while True:
        if pos + 8 > end:
            raise heap.fail(f"{where}'s extended data elements have no END element")
        etype, size = struct.unpack_from("<II", heap.data, pos)
        if size < 8 or size > end - pos:
            raise heap.fail(
                f"{where} element type {etype} at {heap.base + pos:#x} has size {size} "
                f"({end - pos} bytes remain, at least 8 needed)"
            )
        elements.append(ExtElement(etype, size, heap.base + pos))
        if etype == EXT_END:
            return elements
        pos += size


def _log_bounds(heap: _Heap, phys: int, allocated: int, first: int, nxt: int, what: str) -> int:
    """Check a log buffer and its record offsets; return the buffer's heap offset."""
    off = heap.offset(phys, allocated, what)
    if not first <= nxt <= allocated:
        raise heap.fail(
            f"{what}'s record offsets [{first}, {nxt}) do not fit its {allocated} bytes"
        )
    return off


def _pointer_tcg(heap: _Heap, elt: ExtElement) -> tuple[LogPointer, bytes]:
    at = elt.phys_addr - heap.base + 8
    if elt.size - 8 < LOG_PTR2_1.size:
        raise heap.fail(f"EVENT_LOG_POINTER2_1 element of {elt.size} bytes is too small")
    phys, allocated, first, nxt = LOG_PTR2_1.unpack_from(heap.data, at)
    off = _log_bounds(heap, phys, allocated, first, nxt, "the TCG event log")
    pointer = LogPointer(elt.type, eventlog.FORMAT_CRYPTO_AGILE, phys, allocated, first, nxt)
    if pointer.empty:
        return pointer, b""
    log = heap.data[off + first : off + nxt]
    parsed = eventlog.parse(log)
    if parsed.format != eventlog.FORMAT_CRYPTO_AGILE:
        raise heap.fail("the EVENT_LOG_POINTER2_1 log does not start with a Spec ID Event03 header")
    return pointer, log


def _pointer_legacy(heap: _Heap, elt: ExtElement) -> tuple[LogPointer, bytes]:
    at = elt.phys_addr - heap.base + 8
    room = elt.size - 8
    if room < 4:
        raise heap.fail(f"EVENT_LOG_POINTER2 element of {elt.size} bytes is too small")
    count = _u32(heap.data, at)
    if count == 0 or 4 + count * LOG_DESCR.size > room:
        raise heap.fail(
            f"EVENT_LOG_POINTER2 element claims {count} bank logs; its {elt.size} bytes "
            f"hold at most {(room - 4) // LOG_DESCR.size}"
        )
    banks: list[BankLog] = []
    buffers: dict[str, bytes] = {}
    for i in range(count):
        alg, _, phys, size, first, nxt = LOG_DESCR.unpack_from(heap.data, at + 4 + i * 24)
        bank = eventlog.bank_name(alg)
        try:
            eventlog.digest_size(bank)
        except ValueError:
            raise heap.fail(f"bank log {i} has unknown algorithm {alg:#06x}") from None
        if bank in buffers:
            raise heap.fail(f"two bank logs for {bank}")
        off = _log_bounds(heap, phys, size, first, nxt, f"the {bank} bank log")
        banks.append(BankLog(bank, phys, size, first, nxt))
        # A non-SHA-1 bank starts with its TCG_LOG_DESCRIPTOR record, before the first
        # record offset: the parser reads it from the buffer's start.
        start = first if bank == "sha1" else 0
        buffers[bank] = heap.data[off + start : off + nxt]
    first_bank = banks[0]
    pointer = LogPointer(
        elt.type,
        eventlog.FORMAT_TXT_TPM2_LEGACY,
        first_bank.phys_addr,
        first_bank.size,
        first_bank.first_record_offset,
        first_bank.next_record_offset,
        tuple(banks),
    )
    if pointer.empty:
        return pointer, b""
    parsed = eventlog.parse_txt_tpm2_legacy(buffers)
    # One file that `eventlog replay --txt` reads: the records of every bank, each with its
    # one bank's digest, as a crypto-agile log (each bank replays from its own events).
    events = [e for e in parsed.events if e.event_type != eventlog.EV_NO_ACTION]
    try:
        log = eventlog.write(events, parsed.banks)
    except ValueError as exc:
        raise heap.fail(f"the per-bank logs cannot be written as one log: {exc}") from exc
    return pointer, log


def _pointer_container(heap: _Heap, elt: ExtElement) -> tuple[LogPointer, bytes]:
    at = elt.phys_addr - heap.base + 8
    if elt.size - 8 < 8:
        raise heap.fail(f"TPM_EVENT_LOG_PTR element of {elt.size} bytes is too small")
    phys = _u64(heap.data, at)
    off = heap.offset(phys, CONTAINER_HEADER.size, "the TXT Event Container header")
    signature, _, _, _, _, _, size, first, nxt = CONTAINER_HEADER.unpack_from(heap.data, off)
    if signature != eventlog.TXT_EVENT_CONTAINER_SIGNATURE:
        raise heap.fail(f"no TXT Event Container at {phys:#x} (signature mismatch)")
    _log_bounds(heap, phys, size, first, nxt, "the TXT Event Container")
    if first < CONTAINER_HEADER.size:
        raise heap.fail(f"the container's first record offset {first} is inside its header")
    pointer = LogPointer(elt.type, eventlog.FORMAT_TXT_TPM12_CONTAINER, phys, size, first, nxt)
    if pointer.empty:
        return pointer, b""
    log = heap.data[off : off + nxt]
    eventlog.parse_txt_event_container(log)
    return pointer, log


def find_log(heap: _Heap, table: HeapTable, state: TxtState) -> None:
    """Walk OsSinitData: its elements and the log pointer (into ``state``)."""
    start = table.phys_addr - heap.base
    end = start - 8 + table.size
    fixed = OS_SINIT_FIXED_V5 if table.version >= 5 else OS_SINIT_FIXED_V4
    if end - start < fixed.size:
        raise heap.fail(
            f"os_sinit_data version {table.version} needs {fixed.size} bytes; it has {end - start}"
        )
    if table.version < 6:
        state.no_launch = (
            f"os_sinit_data version {table.version} has no extended data elements, so no "
            "event-log pointer"
        )
        return
    state.elements = ext_elements(heap, start + fixed.size, end, "os_sinit_data")
    pointers = [e for e in state.elements if e.type in LOG_POINTER_TYPES]
    if not pointers:
        state.no_launch = "os_sinit_data holds no event-log pointer element"
        return
    if len(pointers) > 1:
        raise heap.fail(
            "os_sinit_data holds more than one event-log pointer element ("
            + ", ".join(e.name for e in pointers)
            + "): which log SINIT wrote is ambiguous"
        )
    elt = pointers[0]
    readers = {
        EXT_EVENT_LOG_POINTER2_1: _pointer_tcg,
        EXT_EVENT_LOG_POINTER2: _pointer_legacy,
        EXT_TPM_EVENT_LOG_PTR: _pointer_container,
    }
    try:
        state.pointer, state.log = readers[elt.type](heap, elt)
    except eventlog.EventLogError as exc:
        raise TxtHeapError(f"the TXT event log in the heap is corrupt: {exc.message}") from exc
    if not state.log:
        state.no_launch = (
            "the event-log pointer holds no records (SINIT wrote no event): the launch did "
            "not complete"
        )


def read_state(path: str = DEV_MEM) -> TxtState:
    """Read the registers, then (after a launch) the heap, its tables and the log.

    Raises :class:`TxtMemoryError` when the memory cannot be read and :class:`TxtHeapError`
    for a corrupt heap or log; "no measured launch" is not an error here: see
    :attr:`TxtState.no_launch`.
    """
    mem = _Memory(path)
    try:
        regs = read_registers(mem)
        state = TxtState(source=path, registers=regs)
        if not regs.senter_done:
            state.no_launch = "TXT.STS says SENTER was not done"
            return state
        if regs.heap_base == 0 or regs.heap_size == 0:
            # TXT off or no SMX: the registers read as garbage, and txt-stat then says
            # "measured launch: TRUE" (real-drtm: nuc8i7hvk, icelake-495).
            state.no_launch = (
                "TXT.HEAP.BASE/SIZE are zero: TXT is not enabled (the status bits are then "
                "meaningless)"
            )
            return state
        if regs.heap_size > MAX_HEAP_SIZE or regs.heap_base + regs.heap_size > MAX_PHYS_ADDR:
            raise TxtHeapError(
                f"TXT.HEAP.BASE {regs.heap_base:#x} / SIZE {regs.heap_size:#x} is not a "
                f"plausible heap (at most {MAX_HEAP_SIZE:#x} bytes below 2^52)"
            )
        data = mem.read(regs.heap_base, regs.heap_size, "the TXT heap")
    finally:
        mem.close()
    parse_heap(state, data)
    return state


def parse_heap(state: TxtState, data: bytes) -> None:
    """Walk the heap's bytes (read at ``state.registers.heap_base``) into ``state``."""
    heap = _Heap(data, state.registers.heap_base)
    state.tables = walk_tables(heap)
    find_log(heap, state.tables[2], state)


def capture(path: str = DEV_MEM) -> TxtState:
    """:func:`read_state`, raising :class:`TxtNoLaunch` when there is no log to capture."""
    state = read_state(path)
    if state.no_launch:
        raise no_launch_error(state)
    return state


def no_launch_error(state: TxtState) -> TxtNoLaunch:
    """The exit-3 error for a state without a log: why, and TXT.ERRORCODE in tboot's words."""
    code = state.registers.errorcode
    return TxtNoLaunch(
        f"no TXT measured launch: {state.no_launch} "
        f"(TXT.ERRORCODE 0x{code:08x}: {decode_errorcode(code)})"
    )
