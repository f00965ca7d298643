"""tboot as SINIT measures it: the MLE hash of a tboot image and its command line.

Sources: tboot ``include/mle.h`` (``mle_hdr_t``, ``MLE_HDR_CAPS``), ``tboot/common/tboot.c``
(``begin_launch``: the command line copied into ``g_cmdline``), ``tboot/txt/txt.c``
(``init_txt_heap``: the OsSinitData capabilities), ``lcptools-v2/mlehash.c`` (Debian's
``lcp2_mlehash``, the independent reference the tests hold this module against); see
docs TXT-LIFECYCLE.md.

SINIT's ``MLE_HASH`` event (0x404, PCR 17) is, per bank, ``H(image[MleStart:MleEnd])`` of the
image *as loaded*:

1. the file in /boot gunzipped (GRUB decompresses it);
2. its ELF ``PT_LOAD`` segments laid out at their physical addresses, relative to the lowest
   one: ``p_filesz`` bytes of the file, then zeros up to ``p_memsz``;
3. the MLE header found (its UUID on a 16-byte boundary); ``[CmdlineStart, CmdlineEnd)``
   zeroed and tboot's command line copied there (tboot does this before SENTER);
4. ``[MleStart, MleEnd)`` hashed.

tboot's command line is the words after the file name on GRUB's ``multiboot2`` line, joined
as GRUB joins them (:func:`~qubes_seal.measure.tboot.grub_module_string`).

/boot is not protected: every offset and size read from the file is checked, the laid-out
image is bounded (:data:`MAX_MLE_IMAGE`), and a file that breaks a rule raises
:class:`TbootImageError` (exit 7), never reads outside the image.
"""

from __future__ import annotations

import lzma
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import EXIT_CORRUPT, UsageError
from .tboot import load_module_image

__all__ = [
    "MAX_MLE_IMAGE",
    "MLE_HEADER_UUID",
    "OS_SINIT_RUNTIME_CAPS",
    "MleHeader",
    "NotAnMleImage",
    "TbootImage",
    "TbootImageError",
    "os_sinit_caps",
]

MLE_HEADER_UUID = bytes.fromhex("5aac82906f47a7740f5c55a2cb51b642")
"""The MLE header's UUID as it lies in memory (``mle.h``: the u32 words 0x9082ac5a,
0x74a7476f, 0xa2555c0f, 0x42b651cb, little-endian)."""

_MLE_HEADER = struct.Struct("<16s9I")  # UUID, then HeaderLen .. CmdlineEnd

#: The most bytes a tboot may take gunzipped, and laid out: 64 MiB.  Debian's 1.10.5 is
#: 29.8 MB gunzipped and spans 0x228ad54 bytes laid out (its .bss), of which SINIT measures
#: [0x4000, 0x4d000).
MAX_MLE_IMAGE = 64 * 1024 * 1024

#: OsSinitData capability bits tboot chooses at launch from SINIT's capabilities and the
#: TPM, whatever its MLE header says (``init_txt_heap``): RLP wake-up by GETSEC (bit 0) or
#: MONITOR (1), ECX page table (2), PCR mapping no-legacy (4) and details/authorities (5),
#: the TCG event-log format (9).  The other bits of the MLE header's capabilities pass
#: through unchanged, among them TPR support (14), which tboot 1.11.6 added (header 0x4627):
#: such an update changes the OsSinitData event, in PCR 17 and 18 (TXT-LIFECYCLE.md).  Held
#: against the real launch of ../shared/testdata/real-drtm: header 0x627 (Debian 1.10.x)
#: gave OsSinitData 0x602.
OS_SINIT_RUNTIME_CAPS = 0x237


class TbootImageError(UsageError):
    """A tboot file that is not an MLE image GRUB could load, or that breaks its own header:
    refused before anything is predicted from it (a corrupted or hostile file in /boot)."""

    exit_code = EXIT_CORRUPT


class NotAnMleImage(TbootImageError):
    """A file that is no tboot at all (not an ELF file, or no MLE header)."""


def _bad(name: str, what: str, cls: type[TbootImageError] = TbootImageError) -> TbootImageError:
    return cls(
        f"tboot image {name}: {what}",
        hint="Check the file against the package it came from (rpm -Vf FILE) and reinstall "
        "it; nothing was predicted from it.",
    )


@dataclass(frozen=True)
class MleHeader:
    """tboot's MLE header (``mle_hdr_t``): offsets into the laid-out image."""

    offset: int  # where the header lies in the laid-out image
    header_len: int
    version: int
    entry_point: int
    first_valid_page: int
    mle_start: int
    mle_end: int
    capabilities: int
    cmdline_start: int
    cmdline_end: int

    @property
    def cmdline_size(self) -> int:
        return self.cmdline_end - self.cmdline_start


def layout_elf(elf: bytes, *, name: str = "tboot", limit: int = MAX_MLE_IMAGE) -> bytes:
    """The memory image of an ELF32/ELF64 file's ``PT_LOAD`` segments, from the lowest
    physical address: file bytes, then zeros up to ``p_memsz`` (as GRUB loads tboot)."""
    if len(elf) < 52 or elf[:4] != b"\x7fELF":
        raise _bad(name, "not an ELF file (gunzipped)", NotAnMleImage)
    cls, data_enc = elf[4], elf[5]
    if data_enc != 1:
        raise _bad(name, "not a little-endian ELF file")
    if cls == 1:
        phoff, phentsize, phnum = (struct.unpack_from("<I", elf, 28)[0],
                                   *struct.unpack_from("<HH", elf, 42))  # fmt: skip
        ph = struct.Struct("<IIIIIIII")  # type offset vaddr paddr filesz memsz flags align
        fields = (1, 3, 4, 5)  # offset, paddr, filesz, memsz
    elif cls == 2:
        if len(elf) < 64:
            raise _bad(name, "truncated ELF header")
        phoff = struct.unpack_from("<Q", elf, 32)[0]
        phentsize, phnum = struct.unpack_from("<HH", elf, 54)
        ph = struct.Struct("<IIQQQQQQ")  # type flags offset vaddr paddr filesz memsz align
        fields = (2, 4, 5, 6)
    else:
        raise _bad(name, f"unknown ELF class {cls}")
    if phentsize < ph.size or phnum == 0 or phoff + phnum * phentsize > len(elf):
        raise _bad(name, "program headers out of the file")
    segments: list[tuple[int, int, int, int]] = []
    for i in range(phnum):
        entry = ph.unpack_from(elf, phoff + i * phentsize)
        if entry[0] != 1:  # PT_LOAD
            continue
        offset, paddr, filesz, memsz = (entry[f] for f in fields)
        if filesz > memsz or offset + filesz > len(elf):
            raise _bad(name, f"segment {i} lies outside the file or exceeds its memory size")
        segments.append((offset, paddr, filesz, memsz))
    if not segments:
        raise _bad(name, "no loadable segment")
    base = min(s[1] for s in segments)
    end = max(s[1] + s[3] for s in segments)
    if end - base > limit:
        raise _bad(name, f"its segments span {end - base} bytes, more than {limit}")
    image = bytearray(end - base)
    for offset, paddr, filesz, _ in segments:
        image[paddr - base : paddr - base + filesz] = elf[offset : offset + filesz]
    return bytes(image)


def find_mle_header(image: bytes, *, name: str = "tboot") -> MleHeader:
    """The MLE header of a laid-out image (its UUID on a 16-byte boundary), checked."""
    at = image.find(MLE_HEADER_UUID)
    while at >= 0:
        if at % 16 or at + _MLE_HEADER.size > len(image):
            at = image.find(MLE_HEADER_UUID, at + 1)
            continue
        _, *values = _MLE_HEADER.unpack_from(image, at)
        hdr = MleHeader(at, *values)
        if not hdr.mle_start < hdr.mle_end <= len(image):
            raise _bad(name, f"MLE range [{hdr.mle_start:#x}, {hdr.mle_end:#x}) is not "
                       f"inside the {len(image):#x}-byte image")  # fmt: skip
        if not (hdr.mle_start <= hdr.cmdline_start <= hdr.cmdline_end <= hdr.mle_end):
            raise _bad(name, f"command-line buffer [{hdr.cmdline_start:#x}, "
                       f"{hdr.cmdline_end:#x}) is not inside the MLE range")  # fmt: skip
        return hdr
    raise _bad(name, "no MLE header (not a tboot image)", NotAnMleImage)


def os_sinit_caps(current: int, header_caps: int) -> int:
    """The OsSinitData capabilities a tboot with MLE header capabilities ``header_caps``
    gives on this platform, where this boot's tboot gave ``current``: the bits tboot chooses
    at launch (:data:`OS_SINIT_RUNTIME_CAPS`) as this boot chose them, the others from the
    header.  On a platform whose SINIT does not change, only a new header changes it."""
    return (current & OS_SINIT_RUNTIME_CAPS) | (header_caps & ~OS_SINIT_RUNTIME_CAPS)


@dataclass(frozen=True)
class TbootImage:
    """A tboot file laid out as GRUB loads it, with its MLE header."""

    name: str
    mle: bytes
    """The laid-out image's MLE range ``[MleStart, MleEnd)``, as in the file (the rest of
    the image, Debian's 36 MB of .bss among it, is not measured and not kept)."""
    header: MleHeader

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str = "tboot") -> TbootImage:
        """From a file's bytes: gzip (as /boot holds it), xz, or a plain ELF, decompressed
        as GRUB does and bounded by :data:`MAX_MLE_IMAGE`."""
        from .tboot import _decompress

        if data[:2] == b"\x1f\x8b" or data[:6] == b"\xfd7zXZ\x00":
            try:
                data = _decompress(data, xz=data[:1] == b"\xfd", path=name, limit=MAX_MLE_IMAGE)
            except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as exc:
                raise _bad(name, f"does not decompress: {exc}") from exc
        image = layout_elf(data, name=name)
        header = find_mle_header(image, name=name)
        return cls(name, image[header.mle_start : header.mle_end], header)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> TbootImage:
        """From a file (read as is, at most :data:`MAX_MLE_IMAGE` bytes)."""
        data = load_module_image(path, nounzip=True, max_size=MAX_MLE_IMAGE)
        return cls.from_bytes(data, name=os.fspath(path))

    def measured(self, cmdline: bytes) -> bytes:
        """The MLE range as SINIT reads it, with ``cmdline`` in tboot's buffer.

        The header's buffer ``[CmdlineStart, CmdlineEnd)`` is 511 bytes in tboot (its
        ``g_cmdline`` is 512, the last byte outside the range).  A command line that does
        not fit with room to spare (longer than the buffer less one byte, 510) is refused
        (:class:`TbootImageError`): tboot cuts it at 511 bytes, lcp2_mlehash at 510, and
        neither is what was asked for; a NUL byte ends it, as in C.
        """
        h = self.header
        buf = bytearray(self.mle)
        start = h.cmdline_start - h.mle_start
        size = h.cmdline_size
        cut = cmdline.split(b"\0", 1)[0]
        if len(cut) > max(size - 1, 0):
            raise TbootImageError(
                f"tboot's command line is {len(cut)} bytes; {self.name} holds at most "
                f"{max(size - 1, 0)}: tboot would cut it, so it is not predicted",
                hint="Shorten GRUB_QUBES_SEAL_TBOOT_CMDLINE in /etc/default/grub.",
            )
        buf[start : start + size] = cut + bytes(size - len(cut))
        return bytes(buf)

    def mle_hash(self, cmdline: bytes, bank: str = "sha256") -> bytes:
        """SINIT's MLE_HASH digest in ``bank`` for this tboot launched with ``cmdline``."""
        from .tboot import _h

        return _h(bank, self.measured(cmdline))


def load(path: Path) -> TbootImage:
    """:meth:`TbootImage.from_file`, the CLI's entry point."""
    return TbootImage.from_file(path)
