"""What tboot measures into PCR 17 and 18 on a TPM 2.0, computed offline.

Sources: tboot ``tboot/common/policy.c`` (``hash_module``, ``verify_g_policy``,
``_def_policy_da``), ``include/tb_policy.h`` (``tb_policy_t``), ``include/hash.h``
(``TB_HALG_*``), ``tboot/common/integrity.c`` (``EVTTYPE_TB_MEASUREMENT``), GRUB
``grub-core/lib/cmdline.c`` (``grub_create_loader_cmdline``) and
``grub-core/loader/multiboot.c`` (``grub_cmd_module``); see docs TBOOT-TXT.md.

* A module is measured as ``H( H(cmdline) || H(image) )`` per bank (:func:`module_digest`).
* The policy as ``H( policy_control (u32 LE) || H_inner(policy blob) )``
  (:func:`policy_digest`), where ``H_inner`` is tboot's current algorithm (``tpm->cur_alg``,
  SHA-256 on every tboot that drives a TPM 2.0 with ``extpol=agile`` or ``sha256``) and
  the outer hash is the bank's.
"""

from __future__ import annotations

import hashlib
import lzma
import os
import struct
import zlib
from collections.abc import Sequence
from typing import Any

from qubes_seal.errors import EXIT_CORRUPT, UsageError
from qubes_seal.measure.eventlog import (
    ALG_SHA256,
    EV_NO_ACTION,
    EVTYPE_BIOSAC_REG_DATA,
    EVTYPE_CAP_VALUE,
    EVTYPE_COMBINED_HASH,
    EVTYPE_CPU_SCRTM_STAT,
    EVTYPE_ELEMENTS_HASH,
    EVTYPE_HASH_START,
    EVTYPE_LCP_AUTHORITIES_HASH,
    EVTYPE_LCP_CONTROL_HASH,
    EVTYPE_LCP_DETAILS_HASH,
    EVTYPE_LCP_HASH,
    EVTYPE_MLE_HASH,
    EVTYPE_NV_INFO_HASH,
    EVTYPE_OSSINITDATA_CAP_HASH,
    EVTYPE_PCRMAPPING,
    EVTYPE_SINIT_PUBKEY_HASH,
    EVTYPE_STM_HASH,
    EVTYPE_TB_MEASUREMENT,
    Event,
    EventLog,
    EventLogError,
)

__all__ = [
    "DEFAULT_DA_POLICY_OLD",
    "DEFAULT_DA_POLICY_SHA256",
    "DRTM_EVENT_TYPES",
    "EVTYPE_TB_MEASUREMENT",
    "MAX_MODULE_SIZE",
    "SINIT_EVENT_TYPES",
    "TB_POLCTL_EXTEND_PCR17",
    "ModuleTooLarge",
    "default_policy_blob",
    "grub_module_string",
    "load_module_image",
    "module_digest",
    "policy_digest",
    "split_txt_log",
]

# --- Hashes ---------------------------------------------------------------------------------

_HASHLIB_NAMES = {
    "sha1": "sha1",
    "sha256": "sha256",
    "sha384": "sha384",
    "sha512": "sha512",
    "sm3_256": "sm3",
}


def _h(bank: str, data: bytes) -> bytes:
    name = _HASHLIB_NAMES.get(bank)
    if name is None:
        raise UsageError(f"unknown hash bank {bank!r} (known: {', '.join(_HASHLIB_NAMES)})")
    try:
        return hashlib.new(name, data).digest()
    except ValueError as exc:
        raise UsageError(f"this Python's hashlib does not provide {bank}") from exc


def module_digest(cmdline: bytes, image: bytes, bank: str = "sha256") -> bytes:
    """The digest tboot extends for one module: ``H(H(cmdline) || H(image))`` in ``bank``.

    ``cmdline`` is the module string exactly as the boot loader passed it (see
    :func:`grub_module_string`), without a terminating NUL; ``image`` the module's bytes in
    memory (see :func:`load_module_image`).  tboot ``hash_module``, ``TB_EXTPOL_AGILE`` /
    ``EMBEDDED``: every bank hashes with its own algorithm throughout.
    """
    return _h(bank, _h(bank, cmdline) + _h(bank, image))


# --- Policy ---------------------------------------------------------------------------------

TB_POLCTL_EXTEND_PCR17 = 0x1
"""``policy_control`` bit: extend the policy's hash into PCR 17 (tb_policy.h)."""

_TB_POLICY_VERSION = 2
_TB_POLTYPE_CONT_NON_FATAL = 0
_TB_HTYPE_ANY = 0
_TB_POL_MOD_NUM_ANY = 129
_TB_POL_MOD_NUM_NV_RAW = 131
_TB_POL_PCR_NONE = 255
_TB_GEOTAG_NV_INDEX = 0x40000010


def default_policy_blob(hash_alg: int) -> bytes:
    """tboot's default policy for the details/authorities PCR mapping, as measured.

    The ``tb_policy_t`` (``include/tb_policy.h``, packed, little-endian) of
    ``_def_policy_da`` in ``tboot/common/policy.c``: version 2, policy type
    CONT_NON_FATAL, ``hash_alg`` (one byte: the low byte of a ``TB_HALG_*`` /
    TPM_ALG_ID, at offset 2), ``policy_control`` = EXTEND_PCR17, reserved 0, and three
    8-byte entries (``mod_num, pcr, hash_type, nv_index u32, num_hashes``): module 0 not
    re-extended (PCR 255), any other module into PCR 17, and the geo-tagging NV index
    0x40000010 (raw) into PCR 22.  ``default_policy_blob(ALG_SHA1)`` is
    :data:`DEFAULT_DA_POLICY_OLD`; tboot 1.10 writes ``TB_HALG_SHA256`` (0x0B).
    """
    if not 0 < hash_alg <= 0xFF:
        raise UsageError(f"tb_policy_t.hash_alg is one byte; {hash_alg:#x} does not fit")
    header = struct.pack(
        "<BBBIIB",
        _TB_POLICY_VERSION,
        _TB_POLTYPE_CONT_NON_FATAL,
        hash_alg,
        TB_POLCTL_EXTEND_PCR17,
        0,
        3,
    )
    entries = [
        (0, _TB_POL_PCR_NONE, _TB_HTYPE_ANY, 0, 0),
        (_TB_POL_MOD_NUM_ANY, 17, _TB_HTYPE_ANY, 0, 0),
        (_TB_POL_MOD_NUM_NV_RAW, 22, _TB_HTYPE_ANY, _TB_GEOTAG_NV_INDEX, 0),
    ]
    return header + b"".join(struct.pack("<BBBIB", *entry) for entry in entries)


DEFAULT_DA_POLICY_OLD = bytes.fromhex(
    "02000401000000000000000300ff00000000000081110000000000008316001000004000"
)
"""The default DA policy of tboot <= 1.9.11 (``hash_alg`` = TB_HALG_SHA1), 36 bytes."""

DEFAULT_DA_POLICY_SHA256 = default_policy_blob(ALG_SHA256)
"""The default DA policy of tboot >= 1.9.12 (``hash_alg`` = TB_HALG_SHA256)."""


def policy_digest(
    policy_blob: bytes,
    *,
    policy_control: int = TB_POLCTL_EXTEND_PCR17,
    bank: str = "sha256",
    inner: str = "sha256",
) -> bytes:
    """The digest tboot extends into PCR 17 (and 18) for its launch policy.

    ``H_bank( policy_control as u32 LE || H_inner(policy_blob) )`` (tboot
    ``verify_g_policy``).  ``inner`` is tboot's current algorithm, SHA-256 with a TPM 2.0 for
    every bank: the SHA-1 bank of the old default policy is
    ``ca96de412b4e8c062e570d3013d2fccb4b20250a`` with ``inner="sha256"``.  When the
    EXTEND_PCR17 bit is clear tboot hashes zeros in place of the inner hash.
    """
    if not 0 <= policy_control <= 0xFFFFFFFF:
        raise UsageError(f"policy_control {policy_control:#x} is not a 32-bit value")
    if policy_control & TB_POLCTL_EXTEND_PCR17:
        inner_hash = _h(inner, policy_blob)
    else:
        inner_hash = bytes(len(_h(inner, b"")))
    return _h(bank, struct.pack("<I", policy_control) + inner_hash)


# --- GRUB ----------------------------------------------------------------------------------


def _is_hex(chars: str) -> bool:
    return all(c in "0123456789abcdefABCDEF" for c in chars)


def grub_module_string(args: Sequence[str]) -> bytes:
    """The string GRUB 2.04+ passes for a ``module``/``module2`` line, as tboot measures it.

    ``args`` are the words after the module's path (and after ``--nounzip``), as GRUB's
    script parser produced them.  Following ``grub_create_loader_cmdline``: words are joined
    by one space; a word containing a space is wrapped in double quotes; ``\\``, ``'`` and
    ``"`` are escaped with a backslash, except that a ``\\xHH`` escape is passed unchanged.
    """
    words: list[str] = []
    for arg in args:
        out: list[str] = []
        i = 0
        while i < len(arg):
            c = arg[i]
            if arg.startswith("\\x", i) and len(arg) >= i + 4 and _is_hex(arg[i + 2 : i + 4]):
                out.append(arg[i : i + 4])
                i += 4
                continue
            if c in "\\'\"":
                out.append("\\")
            out.append(c)
            i += 1
        word = "".join(out)
        words.append(f'"{word}"' if " " in arg else word)
    return " ".join(words).encode()


# Magic numbers of the compressions GRUB's file filters undo (grub-core/io/gzio.c,
# xzio.c, lzopio.c).
_GZIP_MAGIC = b"\x1f\x8b"
_XZ_MAGIC = b"\xfd7zXZ\x00"
_LZOP_MAGIC = b"\x89LZO\x00\r\n\x1a\n"


#: The most bytes one module may take in memory, as read (``--nounzip``) or decompressed:
#: 256 MiB.  What tboot measures today is far smaller: Xen decompressed is 1-5 MiB, the dom0
#: kernel a 10-20 MiB bzImage (loaded as is), the initramfs 30-120 MiB (loaded as is with
#: ``--nounzip``, docs/GRUB.md; decompressed, a large dracut image stays under 200 MiB).
#: /boot is not protected: without a bound, 2 MB of gzip there became 2 GiB in memory.
MAX_MODULE_SIZE = 256 * 1024 * 1024
_CHUNK = 1024 * 1024  # decompressed at most this much per step


class ModuleTooLarge(UsageError):
    """A module image from /boot is larger than :data:`MAX_MODULE_SIZE` (perhaps a
    decompression bomb): refused before it fills memory."""

    exit_code = EXIT_CORRUPT


def _too_large(path: str, what: str, limit: int) -> ModuleTooLarge:
    return ModuleTooLarge(
        f"module {path} is larger than {limit // (1024 * 1024)} MiB {what}: refused "
        "(a corrupted or hostile file in /boot, e.g. a decompression bomb)",
        hint="Check the file against the package it came from (rpm -Vf FILE) and reinstall it.",
    )


def _decompress(data: bytes, *, xz: bool, path: str, limit: int) -> bytes:
    """``data`` decompressed as gzip.decompress or lzma.decompress(FORMAT_XZ) would, but
    incrementally: at most :data:`_CHUNK` bytes of output per step, stopping (raising
    :class:`ModuleTooLarge`) as soon as the output passes ``limit`` bytes.

    Like them, it reads concatenated gzip members (zero padding between them skipped) or xz
    streams (data after a stream that does not begin another one ignored).
    """
    out = bytearray()
    rest = data
    while True:
        d: Any = lzma.LZMADecompressor(format=lzma.FORMAT_XZ) if xz else zlib.decompressobj(31)
        pending = rest
        try:
            while not d.eof:
                chunk = d.decompress(pending, _CHUNK)
                out += chunk
                if len(out) > limit:
                    raise _too_large(path, "decompressed", limit)
                # zlib hands back the input it did not read; lzma keeps it (needs_input False).
                pending = b"" if xz else d.unconsumed_tail
                if not (d.eof or chunk or pending) and (not xz or d.needs_input):
                    raise EOFError("compressed data ended before the end-of-stream marker")
        except lzma.LZMAError:
            if xz and rest is not data:
                return bytes(out)  # trailing data that is not an xz stream, as lzma ignores
            raise
        rest = d.unused_data if xz else d.unused_data.lstrip(b"\0")
        if not rest:
            return bytes(out)


def load_module_image(
    path: str | os.PathLike[str], *, nounzip: bool = False, max_size: int = MAX_MODULE_SIZE
) -> bytes:
    """The bytes GRUB loads for a module file: what tboot hashes as the module's image.

    GRUB decompresses gzip and xz modules (detected by magic number, whatever the file's
    name) unless ``--nounzip`` is given; anything else (zstd, cpio, ELF, bzImage) is loaded
    as is.  An lzop module, which GRUB would decompress and the standard library cannot,
    raises :class:`UsageError` rather than give a wrong digest.  The file as read and the
    image decompressed are each bounded by ``max_size`` (:data:`MAX_MODULE_SIZE`):
    decompression is incremental and stops as soon as the output passes it
    (:class:`ModuleTooLarge`, exit 7), so a decompression bomb never fills memory.
    """
    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read(max_size + 1)
    except OSError as exc:
        raise UsageError(f"cannot read module {name!s}: {exc.strerror}") from exc
    if len(data) > max_size:
        raise _too_large(name, "as a file", max_size)
    if nounzip:
        return data
    try:
        if data.startswith(_GZIP_MAGIC):
            return _decompress(data, xz=False, path=name, limit=max_size)
        if data.startswith(_XZ_MAGIC):
            return _decompress(data, xz=True, path=name, limit=max_size)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:
        raise UsageError(
            f"module {name!s} looks compressed but does not decompress: {exc}"
        ) from exc
    if data.startswith(_LZOP_MAGIC):
        raise UsageError(
            f"module {name!s} is lzop-compressed: GRUB would measure it "
            "decompressed, which this tool cannot do; recompress it with gzip or xz"
        )
    return data


# --- The TXT event log ---------------------------------------------------------------------

SINIT_EVENT_TYPES = frozenset(
    {
        EVTYPE_PCRMAPPING,
        EVTYPE_HASH_START,
        EVTYPE_COMBINED_HASH,
        EVTYPE_MLE_HASH,
        EVTYPE_BIOSAC_REG_DATA,
        EVTYPE_CPU_SCRTM_STAT,
        EVTYPE_LCP_CONTROL_HASH,
        EVTYPE_ELEMENTS_HASH,
        EVTYPE_STM_HASH,
        EVTYPE_OSSINITDATA_CAP_HASH,
        EVTYPE_SINIT_PUBKEY_HASH,
        EVTYPE_LCP_HASH,
        EVTYPE_LCP_DETAILS_HASH,
        EVTYPE_LCP_AUTHORITIES_HASH,
        EVTYPE_NV_INFO_HASH,
        EVTYPE_CAP_VALUE,
    }
)
"""Event types SINIT (the Intel TXT ACM) logs."""

DRTM_EVENT_TYPES = SINIT_EVENT_TYPES | {EVTYPE_TB_MEASUREMENT}
"""Every event type a TXT event log holds besides EV_NO_ACTION records."""


def split_txt_log(log: EventLog) -> tuple[list[Event], list[Event]]:
    """Split a TXT event log into SINIT's events and tboot's (type 0x501), in order.

    EV_NO_ACTION records (the Spec ID or log descriptor headers) belong to neither.  SINIT
    measures before tboot runs, so an event of another type after one of tboot's means the
    log is not what a launch writes: :class:`EventLogError`.
    """
    sinit: list[Event] = []
    tboot: list[Event] = []
    tboot_banks: set[str] = set()
    for index, event in enumerate(log.events):
        if event.event_type == EV_NO_ACTION:
            continue
        if event.event_type == EVTYPE_TB_MEASUREMENT:
            tboot.append(event)
            tboot_banks.update(event.digests)
            continue
        # Per bank: tboot's legacy TPM2 format holds one log per bank, one after the other.
        if tboot_banks.intersection(event.digests):
            raise EventLogError(
                f"TXT event log: event {index} ({event.type_name}, PCR {event.pcr}) "
                "follows tboot's measurements"
            )
        sinit.append(event)
    return sinit, tboot
