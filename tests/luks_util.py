"""Helpers for tests/test_luks.py: test data, an independent AES-XTS, header surgery."""

from __future__ import annotations

import hashlib
import lzma
import shutil
import struct
import subprocess
import tarfile
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

TESTDATA = Path(__file__).resolve().parents[2] / "shared" / "testdata"
CRYPTSETUP_DATA = TESTDATA / "cryptsetup"
MDA_PASSPHRASE = b"Qx3qn46vq0v"  # cryptsetup tests/compat-test2 PWD4
COMPAT_PASSPHRASE = b"compatkey"  # cryptsetup tests/api-test-2.c KEY1


def testdata(name: str) -> Path:
    """A file of ../shared/testdata/cryptsetup; fails (never skips) when it is missing."""
    path = CRYPTSETUP_DATA / name
    if not path.is_file():
        raise AssertionError(f"test data missing: {path} (see ../shared/testdata/MANIFEST.txt)")
    return path


def unxz(name: str, dest: Path) -> Path:
    """Decompress the .xz file ``name`` of the test data to ``dest``."""
    with lzma.open(testdata(name)) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out)
    return dest


def untar_xz(name: str, dest: Path) -> list[Path]:
    """Unpack the .tar.xz ``name`` into ``dest``; the regular files it held, sorted."""
    dest.mkdir(parents=True, exist_ok=True)
    with lzma.open(testdata(name)) as src, tarfile.open(fileobj=src) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        for m in members:
            # Plain files only, no absolute or parent paths: safe without tarfile's "data"
            # filter, which Debian 12's Python 3.11.2 does not have.
            if m.name.startswith("/") or ".." in Path(m.name).parts:
                raise ValueError(f"unsafe member {m.name!r} in {name}")
            src_f = tar.extractfile(m)
            assert src_f is not None
            target = dest / m.name
            target.parent.mkdir(parents=True, exist_ok=True)
            with src_f, open(target, "wb") as out:
                shutil.copyfileobj(src_f, out)
    return sorted(dest / m.name for m in members)


def cli_volume_key(path: Path, passphrase: bytes) -> bytes:
    """The volume key printed by stock ``cryptsetup luksDump --dump-volume-key`` (stdin/out)."""
    out = subprocess.run(
        ["cryptsetup", "luksDump", "--dump-volume-key", "--batch-mode", "--key-file=-", str(path)],
        input=passphrase,
        capture_output=True,
        check=True,
    ).stdout.decode()
    hexdigits = ""
    grab = False
    for line in out.splitlines():
        if line.startswith(("MK dump:", "Volume key:")):
            grab = True
            hexdigits += line.split(":", 1)[1]
        elif grab and line[:1].isspace() and ":" not in line:
            hexdigits += line
        elif grab:
            break
    return bytes.fromhex(hexdigits.replace(" ", "").replace("\t", ""))


def cli_metadata(path: Path) -> dict[str, object]:
    """The JSON metadata as stock cryptsetup reads it."""
    import json

    out = subprocess.run(
        ["cryptsetup", "luksDump", "--dump-json-metadata", str(path)],
        capture_output=True,
        check=True,
    ).stdout
    result: dict[str, object] = json.loads(out)
    return result


def _gf_mul_x(t: bytes) -> bytes:
    """Multiply an XTS tweak by x in GF(2^128) (IEEE 1619, little-endian)."""
    v = int.from_bytes(t, "little") << 1
    if v >> 128:
        v ^= (1 << 128) | 0x87
    return v.to_bytes(16, "little")


def xts_sector(key: bytes, sector: int, data: bytes, *, encrypt: bool) -> bytes:
    """AES-XTS of one 512-byte sector, composed by hand from AES-ECB (independent check)."""
    half = len(key) // 2
    k1, k2 = key[:half], key[half:]
    ecb1 = Cipher(algorithms.AES(k1), modes.ECB())
    t_enc = Cipher(algorithms.AES(k2), modes.ECB()).encryptor()
    tweak = t_enc.update(sector.to_bytes(16, "little"))
    op = ecb1.encryptor() if encrypt else ecb1.decryptor()
    out = bytearray()
    for i in range(0, len(data), 16):
        block = bytes(a ^ b for a, b in zip(data[i : i + 16], tweak, strict=True))
        out += bytes(a ^ b for a, b in zip(op.update(block), tweak, strict=True))
        tweak = _gf_mul_x(tweak)
    return bytes(out)


def rewrite_metadata(path: Path, edit: object) -> None:
    """Apply ``edit(metadata) -> metadata`` to both header copies, with valid checksums.

    What an attacker with write access to the disk can do: the header checksum is no MAC.
    """
    import json

    with open(path, "r+b") as f:
        hdr_size = struct.unpack(">Q", f.read(16)[8:16])[0]
        for offset in (0, hdr_size):
            f.seek(offset)
            raw = bytearray(f.read(hdr_size))
            text = bytes(raw[4096:]).split(b"\x00", 1)[0]
            new = json.dumps(edit(json.loads(text))).encode()  # type: ignore[operator]
            assert len(new) < hdr_size - 4096
            raw[4096:] = new + bytes(hdr_size - 4096 - len(new))
            raw[448:512] = bytes(64)
            raw[448:480] = hashlib.sha256(raw).digest()
            f.seek(offset)
            f.write(raw)
