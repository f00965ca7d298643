"""An Intel TXT measured launch through tboot, simulated on a swtpm.

What a real launch does (TBOOT-TXT.md; tboot ``txt/txt.c``, ``common/policy.c``):

1. GETSEC[SENTER]: the CPU, at locality 4, sends ``_TPM_Hash_Start``/``Data``/``End`` with
   the SINIT ACM: PCR 17-22 are reset to zero and PCR 17 is extended with H(SINIT).
2. SINIT (locality 3) extends its own events: into PCR 17 the *details* (BIOS ACM
   registration data, CPU S-CRTM status, launch-control policy, STM, OS-SINIT data
   capabilities, the MLE, that is tboot with its command line, NV info), into PCR 18 the
   *authorities* (SINIT's public key hash, ...).
3. tboot (locality 2) extends its verified-launch policy digest into PCR 17 and 18, then
   for each module in order (Xen, dom0's kernel, dom0's initramfs) ``H(H(cmdline) ||
   H(image))`` into PCR 17.

Steps 2 and 3 are pure functions here (:func:`launch_events`), so the same model serves the
simulator, the tests' expected values and the demonstration.  :func:`txt_launch` performs them
on a running :class:`~qubes_seal.sim.swtpm.Swtpm` and writes the TXT event log (TCG
crypto-agile records) that a real launch leaves in the TXT heap.

SINIT's digests are synthetic but fixed per :class:`Platform`: a platform that does not
change measures the same; change a field to simulate a SINIT or BIOS update.  Two of them
depend on tboot and are computed the real way (:mod:`~qubes_seal.measure.mle`), from
``Platform.tboot_image`` (a tboot file as /boot holds it: Debian's ``tboot.gz``, or the small
synthetic one of :func:`sample_tboot`) and ``Platform.tboot_cmdline``: ``MLE_HASH``, and the
OsSinitData capabilities dword (its event data) from the image's MLE header, with the launch
choices of the real machine of ../shared/testdata/real-drtm (:data:`SINIT_RUNTIME_CAPS`).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..measure import eventlog, mle, tboot, txt_heap
from ..tpm.device import Tpm
from .swtpm import Swtpm

BANK = "sha256"  # tboot >= 1.9.12 (extpol=sha256) extends only this bank


@dataclass(frozen=True)
class Module:
    """A multiboot module as GRUB hands it to tboot: its string and its (decompressed) bytes."""

    name: str
    cmdline: bytes
    image: bytes

    @classmethod
    def from_file(cls, name: str, path: Path, cmdline: str | bytes = b"") -> Module:
        raw = cmdline.encode() if isinstance(cmdline, str) else cmdline
        return cls(name=name, cmdline=raw, image=tboot.load_module_image(path))


#: The OsSinitData capability bits tboot chose at launch on the real machine (RLP wake-up by
#: MONITOR, the TCG event-log format): with its MLE header's 0x627 they gave 0x602.
SINIT_RUNTIME_CAPS = 0x202


def sample_tboot(label: str = "tboot 1.10.5", *, caps: int = 0x627) -> bytes:
    """A small synthetic tboot file (gzip of an ELF32 with one PT_LOAD segment and an MLE
    header), laid out like Debian's: the header's range and a 511-byte command-line buffer
    inside it.  Different ``label`` or ``caps``, different MLE hash (for tests and demos)."""
    base, filesz, memsz = 0x800000, 0x6000, 0x8000
    body = bytearray(blob(label, filesz))
    hdr_at, mle_start, mle_end, cmd_start = 0x100, 0x1000, 0x6000, 0x2000
    body[hdr_at : hdr_at + 52] = struct.pack(
        "<16s9I", mle.MLE_HEADER_UUID, 52, 0x20001, 0x10, 0, mle_start, mle_end, caps,
        cmd_start, cmd_start + 511,
    )  # fmt: skip
    body[cmd_start : cmd_start + 512] = bytes(512)  # tboot's g_cmdline: zeros in the file
    phoff, ehsize = 52, 52
    ehdr = (
        b"\x7fELF"
        + bytes([1, 1, 1])
        + bytes(9)
        + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, base + 0x10, phoff, 0, 0, ehsize, 32, 1, 40, 0, 0)
    )
    offset = 0x1000
    phdr = struct.pack("<IIIIIIII", 1, offset, base, base, filesz, memsz, 7, 0x1000)
    elf = ehdr + phdr
    elf += bytes(offset - len(elf)) + bytes(body)
    return gzip.compress(elf, mtime=0)


@functools.lru_cache(maxsize=2)
def _tboot_image(data: bytes) -> mle.TbootImage | None:
    try:
        return mle.TbootImage.from_bytes(data)
    except mle.TbootImageError:
        return None  # a stand-in: the old synthetic measurement


@dataclass(frozen=True)
class Platform:
    """The fixed parts of a launch: the SINIT ACM, the tboot image and its policy."""

    sinit: bytes = b"simulated SINIT ACM for a simulated Intel platform, revision 1"
    tboot_image: bytes = field(default_factory=sample_tboot)
    tboot_cmdline: bytes = b"logging=serial,memory,vga"
    bios_acm: bytes = b"simulated BIOS ACM registration data"
    sinit_pubkey: bytes = b"simulated Intel SINIT signing key"
    policy_blob: bytes = field(default=tboot.DEFAULT_DA_POLICY_OLD)
    policy_control: int = 1


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _ev(pcr: int, event_type: int, digest: bytes, data: bytes = b"") -> eventlog.Event:
    return eventlog.Event(pcr=pcr, event_type=event_type, digests={BANK: digest}, data=data)


def sinit_events(platform: Platform) -> list[eventlog.Event]:
    """SINIT's events after the hash-start one, PCR 17 (details) and 18 (authorities)."""
    p = platform
    cpu = _h(b"CPU S-CRTM status: secure")
    lcp_control = _h(b"launch control policy: none (platform default)")
    nv_info = _h(b"TPM NV info")
    image = _tboot_image(p.tboot_image)
    if image is None:  # not a tboot file: a stand-in, measured as before
        mle_hash = _h(p.tboot_image + p.tboot_cmdline)
        caps, caps_data = _h(b"OS-SINIT data capabilities"), b""
    else:
        mle_hash = image.mle_hash(p.tboot_cmdline, BANK)
        dword = mle.os_sinit_caps(SINIT_RUNTIME_CAPS, image.header.capabilities)
        caps_data = dword.to_bytes(4, "little")
        caps = _h(caps_data)
    return [
        _ev(17, 0x40A, _h(p.bios_acm)),  # BIOSAC_REG_DATA
        _ev(17, 0x40B, cpu),  # CPU_SCRTM_STAT
        _ev(17, 0x40C, lcp_control),  # LCP_CONTROL_HASH
        _ev(17, 0x412, _h(b"LCP details: none")),  # LCP_DETAILS_HASH
        _ev(17, 0x40E, bytes(32)),  # STM_HASH: no STM
        _ev(17, 0x40F, caps, caps_data),  # OSSINITDATA_CAP_HASH
        _ev(17, 0x404, mle_hash),  # MLE_HASH: tboot's MLE range with its command line
        _ev(17, 0x414, nv_info),  # NV_INFO_HASH
        _ev(18, 0x410, _h(p.sinit_pubkey)),  # SINIT_PUBKEY_HASH
        _ev(18, 0x40B, cpu),  # CPU_SCRTM_STAT
        _ev(18, 0x40F, caps, caps_data),  # OSSINITDATA_CAP_HASH
        _ev(18, 0x40C, lcp_control),  # LCP_CONTROL_HASH
        _ev(18, 0x413, _h(b"LCP authorities: none")),  # LCP_AUTHORITIES_HASH
        _ev(18, 0x414, nv_info),  # NV_INFO_HASH
    ]


def tboot_events(platform: Platform, modules: list[Module]) -> list[eventlog.Event]:
    """tboot's own events (type 0x501, no data): policy into 17 and 18, then each module."""
    policy = tboot.policy_digest(
        platform.policy_blob, policy_control=platform.policy_control, bank=BANK
    )
    events = [_ev(17, 0x501, policy), _ev(18, 0x501, policy)]
    events += [_ev(17, 0x501, tboot.module_digest(m.cmdline, m.image, bank=BANK)) for m in modules]
    return events


def launch_events(platform: Platform, modules: list[Module]) -> list[eventlog.Event]:
    """Every event of the launch, the hash-start one first, as the TXT event log lists them."""
    start = _ev(17, 0x402, _h(platform.sinit))  # HASH_START
    return [start, *sinit_events(platform), *tboot_events(platform, modules)]


def expected_pcrs(platform: Platform, modules: list[Module]) -> dict[int, bytes]:
    """PCR 17-22 (SHA-256) after the launch, computed without a TPM."""
    values = {p: bytes(32) for p in range(17, 23)}
    for ev in launch_events(platform, modules):
        values[ev.pcr] = _h(values[ev.pcr] + ev.digests[BANK])
    return values


@dataclass(frozen=True)
class LaunchResult:
    events: list[eventlog.Event]
    expected: dict[int, bytes]
    log: bytes
    image: MemoryImage | None = None
    """The machine's memory image, when ``txt_launch(image_path=...)`` wrote one."""


def txt_launch(
    swtpm: Swtpm,
    modules: list[Module],
    *,
    platform: Platform | None = None,
    log_path: Path | None = None,
    image_path: Path | None = None,
) -> LaunchResult:
    """Perform the launch on ``swtpm`` and return its events, expected PCRs and event log.

    ``modules`` are tboot's modules in order: Xen first, then dom0's kernel and initramfs.
    With ``image_path``, also write the machine's memory as the launch leaves it (TXT
    registers and heap with this log, see :func:`write_memory_image`), for
    ``qubes-seal eventlog capture --mem``.
    """
    platform = platform or Platform()
    events = launch_events(platform, modules)
    swtpm.hash_start(platform.sinit)
    with Tpm(swtpm.tcti) as tpm:  # open first: a new swtpm TCTI resets the locality to 0
        with swtpm.at_locality(3):  # SINIT
            for ev in events[1:]:
                if ev.event_type != 0x501:
                    tpm.extend_pcr(ev.pcr, ev.digests[BANK], bank=BANK)
        with swtpm.at_locality(2):  # tboot
            for ev in events:
                if ev.event_type == 0x501:
                    tpm.extend_pcr(ev.pcr, ev.digests[BANK], bank=BANK)
    log = eventlog.write(events, [BANK])
    if log_path is not None:
        log_path.write_bytes(log)
    image = None
    if image_path is not None:
        image = write_memory_image(image_path, events)
        assert image.log == log
    return LaunchResult(
        events=events, expected=expected_pcrs(platform, modules), log=log, image=image
    )


def blob(label: str, size: int) -> bytes:
    """``size`` deterministic pseudo-random bytes named by ``label`` (SHA-256 in counter
    mode): stand-in file contents that differ by label and never change between runs."""
    seed = hashlib.sha256(label.encode()).digest()
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


def sample_modules(*, xen_version: str = "4.17.5", kernel_version: str = "6.6.63-1.qubes",
                   xen_cmdline: str = "console=none dom0_mem=min:1024M dom0_mem=max:4096M",
                   kernel_cmdline: str = "root=/dev/mapper/qubes_dom0-root ro rhgb quiet",
                   ) -> list[Module]:  # fmt: skip
    """Small, deterministic stand-ins for Xen, dom0's kernel and initramfs (for demos/tests)."""

    return [
        Module("xen", xen_cmdline.encode(), blob(f"xen-{xen_version}", 64 * 1024)),
        Module("kernel", kernel_cmdline.encode(), blob(f"vmlinuz-{kernel_version}", 128 * 1024)),
        Module("initramfs", b"", blob(f"initramfs-{kernel_version}", 256 * 1024)),
    ]


# --- The machine's memory after the launch: TXT registers and heap ---------------------------
#
# Laid out as SINIT and tboot leave it on the machine of the real txt-stat dump in
# ../shared/testdata/real-drtm (tbootdevel_2021-08-26_skylake-0x506e3...): the same
# register values, heap base and size, table sizes and versions, and the log buffer at the
# same place inside OsMleData (tboot's event_log_buffer, its last 0x5000 bytes).

LAYOUT_CRYPTO_AGILE = "crypto-agile"  # OsSinitData element type 8 (TCG log)
LAYOUT_TPM2_LEGACY = "tpm2-legacy"  # type 7: one legacy log per bank
LAYOUT_TPM12 = "tpm12"  # type 5: the TPM 1.2 TXT Event Container
LAYOUTS = (LAYOUT_CRYPTO_AGILE, LAYOUT_TPM2_LEGACY, LAYOUT_TPM12)

EXT = struct.Struct("<II")


@dataclass(frozen=True)
class HeapLayout:
    """Where the heap and its tables lie (defaults: the real machine's)."""

    heap_base: int = 0xB9F20000
    heap_size: int = 0xE0000
    os_mle_size: int = 0x15120  # with its 8-byte size field, as the heap stores it
    sinit_mle_size: int = 0x2FC
    log_offset: int = 0x10118  # event_log_buffer in OsMleData's data: 0xB9F30176
    log_buffer_size: int = 0x5000  # tboot MAX_EVENT_LOG_SIZE
    tcg_log_size: int = 0x2000  # what tboot allocates to the TCG log
    os_sinit_version: int = 7
    sinit_mle_version: int = 9

    @property
    def bios_data_size(self) -> int:
        return 8 + len(_bios_data())

    @property
    def log_phys_addr(self) -> int:
        return self.heap_base + self.bios_data_size + 8 + self.log_offset


def machine_registers(*, senter_done: bool = True, errorcode: int = 0,
                      layout: HeapLayout | None = None) -> txt_heap.TxtRegisters:  # fmt: skip
    """The public registers of the real machine after a launch (or a failed one)."""
    layout = layout or HeapLayout()
    return txt_heap.TxtRegisters(
        sts=0x000180B1 if senter_done else 0x00000012,
        ests=0,
        e2sts=0xE if senter_done else 0x8,
        errorcode=errorcode,
        didvid=0x00000001B0068086,
        ver_fsbif=0xFFFFFFFFFFFFFFFF,
        ver_qpiif=0x000000009D003000,
        sinit_base=0xB9ED0000,
        sinit_size=0x50000,
        heap_base=layout.heap_base,
        heap_size=layout.heap_size,
        dpr=0x00000000BA000041,
    )


def _bios_data() -> bytes:
    """BiosData version 6: BIOS_SPEC_VER 2.1.0, one BIOS ACM, END (tboot prints 0x56)."""
    fixed = struct.pack("<IIQQIII", 6, 0, 0, 0, 4, 0, 2)
    spec_ver = EXT.pack(txt_heap.EXT_BIOS_SPEC_VER, 14) + struct.pack("<HHH", 2, 1, 0)
    acm = EXT.pack(txt_heap.EXT_ACM, 20) + struct.pack("<IQ", 1, 0xFFE60000)
    return fixed + spec_ver + acm + EXT.pack(txt_heap.EXT_END, 8)


def _legacy_record(pcr: int, event_type: int, digest: bytes, data: bytes) -> bytes:
    return struct.pack("<II", pcr, event_type) + digest + struct.pack("<I", len(data)) + data


def _banks_of(events: Sequence[eventlog.Event]) -> list[str]:
    banks: list[str] = []
    for e in events:
        banks += [b for b in e.digests if b not in banks]
    return banks


@dataclass(frozen=True)
class MemoryImage:
    """A memory image written for a launch: where things are, and what capture must give."""

    path: Path
    layout: str
    registers: txt_heap.TxtRegisters
    heap: bytes
    log_phys_addr: int
    log: bytes
    """The bytes ``eventlog capture`` writes for this image."""


def build_heap(
    events: Sequence[eventlog.Event],
    *,
    layout: str = LAYOUT_CRYPTO_AGILE,
    heap_layout: HeapLayout | None = None,
    spec_id: eventlog.SpecId | None = None,
) -> tuple[bytes, bytes]:
    """The TXT heap after a launch that logged ``events``, and the log capture returns.

    ``crypto-agile``: the TCG log (``eventlog.write``) behind a type 8 pointer;
    ``tpm2-legacy``: one log per bank of the events (type 7), captured as one crypto-agile
    log; ``tpm12``: a TXT Event Container (type 5) of the events' SHA-1 digests.
    """
    h = heap_layout or HeapLayout()
    banks = _banks_of(events)
    buffer_at = h.log_offset  # inside OsMleData's data
    buffer = bytearray(h.log_buffer_size)
    phys = h.log_phys_addr
    if layout == LAYOUT_CRYPTO_AGILE:
        log = eventlog.write(list(events), spec_id.banks if spec_id else banks, spec_id=spec_id)
        if len(log) > h.tcg_log_size:
            raise ValueError(f"a {len(log)}-byte log does not fit tboot's TCG buffer")
        buffer[: len(log)] = log
        pointer = EXT.pack(txt_heap.EXT_EVENT_LOG_POINTER2_1, 28)
        pointer += txt_heap.LOG_PTR2_1.pack(phys, h.tcg_log_size, 0, len(log))
        captured = log
    elif layout == LAYOUT_TPM2_LEGACY:
        step = h.log_buffer_size // max(len(banks), 1)
        descrs = b""
        per_bank: list[eventlog.Event] = []
        for i, bank in enumerate(banks):
            records = b""
            first = 0
            if bank != "sha1":
                descriptor = b"TCG_LOG_DESCRIPT" + struct.pack(
                    "<III", 1, eventlog.alg_id(bank), eventlog.digest_size(bank)
                )
                records = _legacy_record(0, eventlog.EV_NO_ACTION, bytes(20), descriptor)
                first = len(records)
            for e in events:
                if bank in e.digests:
                    records += _legacy_record(e.pcr, e.event_type, e.digests[bank], e.data)
                    per_bank.append(eventlog.Event(e.pcr, e.event_type, {bank: e.digests[bank]},
                                                   e.data))  # fmt: skip
            if len(records) > step:
                raise ValueError(f"the {bank} log does not fit its {step}-byte buffer")
            buffer[i * step : i * step + len(records)] = records
            descrs += txt_heap.LOG_DESCR.pack(
                eventlog.alg_id(bank), 0, phys + i * step, step, first, len(records)
            )
        pointer = EXT.pack(txt_heap.EXT_EVENT_LOG_POINTER2, 12 + len(descrs))
        pointer += struct.pack("<I", len(banks)) + descrs
        captured = eventlog.write(per_bank, banks)
    elif layout == LAYOUT_TPM12:
        records = b"".join(
            _legacy_record(e.pcr, e.event_type, e.digests["sha1"], e.data) for e in events
        )
        header_size = txt_heap.CONTAINER_HEADER.size
        nxt = header_size + len(records)
        header = txt_heap.CONTAINER_HEADER.pack(
            eventlog.TXT_EVENT_CONTAINER_SIGNATURE, bytes(12), 1, 0, 1, 0,
            h.log_buffer_size, header_size, nxt,
        )  # fmt: skip
        captured = header + records
        if len(captured) > h.log_buffer_size:
            raise ValueError("the TPM 1.2 log does not fit tboot's buffer")
        buffer[: len(captured)] = captured
        pointer = EXT.pack(txt_heap.EXT_TPM_EVENT_LOG_PTR, 16) + struct.pack("<Q", phys)
    else:
        raise ValueError(f"unknown heap layout {layout!r}; one of {', '.join(LAYOUTS)}")

    bios = _bios_data()
    os_mle = bytearray(h.os_mle_size - 8)
    struct.pack_into("<I", os_mle, 0, 3)  # tboot's OsMleData version 3
    struct.pack_into("<I", os_mle, 12, 0x1000)  # loader context address, as printed
    os_mle[buffer_at : buffer_at + len(buffer)] = buffer
    os_sinit = txt_heap.OS_SINIT_FIXED_V5.pack(
        h.os_sinit_version, 1, 0x801000, 0x4A000, 0x1BC00, 0, 0x8FA00000,
        0x100000000, 0x13F800000, 0, 0, 0x602, 0x2472E20,
    )  # fmt: skip
    os_sinit += pointer + EXT.pack(txt_heap.EXT_END, 8)
    sinit_mle = bytearray(h.sinit_mle_size - 8)
    struct.pack_into("<I", sinit_mle, 0, h.sinit_mle_version)
    heap = bytearray()
    for table in (bios, bytes(os_mle), os_sinit, bytes(sinit_mle)):
        heap += struct.pack("<Q", 8 + len(table)) + table
    if len(heap) > h.heap_size:
        raise ValueError("the heap tables do not fit the heap")
    heap += bytes(h.heap_size - len(heap))
    return bytes(heap), captured


def write_image(path: Path, registers: txt_heap.TxtRegisters, heap: bytes = b"") -> None:
    """A sparse file read like /dev/mem: the registers at 0xFED30000, ``heap`` at
    ``registers.heap_base`` (any bytes: tests write hostile heaps through this)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, txt_heap.TXT_PUB_CONFIG_BASE + txt_heap.TXT_CONFIG_SIZE)
        for name, offset in txt_heap.REG.items():
            value = getattr(registers, name)
            os.pwrite(fd, struct.pack("<Q", value), txt_heap.TXT_PUB_CONFIG_BASE + offset)
        if heap:
            os.pwrite(fd, heap, registers.heap_base)
    finally:
        os.close(fd)


def write_memory_image(
    path: Path,
    events: Sequence[eventlog.Event],
    *,
    layout: str = LAYOUT_CRYPTO_AGILE,
    heap_layout: HeapLayout | None = None,
    registers: txt_heap.TxtRegisters | None = None,
    spec_id: eventlog.SpecId | None = None,
) -> MemoryImage:
    """Write the memory image of a launch that logged ``events`` (a sparse file).

    The registers say SENTER done (unless ``registers`` says otherwise; its heap base and
    size are taken from ``heap_layout``), the heap holds the four tables with the event-log
    pointer of ``layout`` and the log.
    """
    h = heap_layout or HeapLayout()
    regs = registers or machine_registers(layout=h)
    regs = replace(regs, heap_base=h.heap_base, heap_size=h.heap_size)
    heap, captured = build_heap(events, layout=layout, heap_layout=h, spec_id=spec_id)
    write_image(path, regs, heap)
    return MemoryImage(path, layout, regs, heap, h.log_phys_addr, captured)
