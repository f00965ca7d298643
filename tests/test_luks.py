"""qubes_seal.luks against real cryptsetup, on files, and against stock cryptsetup images.

This machine has no device-mapper: the dm-crypt back-end is tested as far as it goes (a clear
error), its positive test is skipped with the probed reason and runs in a VM.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from luks_util import (
    COMPAT_PASSPHRASE,
    MDA_PASSPHRASE,
    TESTDATA,
    cli_metadata,
    cli_volume_key,
    rewrite_metadata,
    untar_xz,
    unxz,
    xts_sector,
)

from qubes_seal.errors import (
    EXIT_AUTH,
    EXIT_CORRUPT,
    AuthorizationError,
    CorruptState,
    QubesSealError,
    UsageError,
)
from qubes_seal.luks import (
    Container,
    DmCryptPayload,
    DmCryptUnavailable,
    PbkdfCost,
    UnsupportedPayload,
    UserspacePayload,
    WrongKey,
    dm_crypt_available,
    header_digest,
    open_payload,
    read_header,
)
from qubes_seal.luks import cryptsetup as cs
from qubes_seal.luks.container import HEADER_REGION, parse_volume_key_dump
from qubes_seal.luks.header import DIGEST_TAG, canonical_json
from qubes_seal.secret import Secret

if shutil.which("cryptsetup") is None:  # pragma: no cover - the environment provides it
    pytest.fail("cryptsetup is required for tests/test_luks.py", pytrace=False)

CHEAP = PbkdfCost(iterations=4, memory_kib=32, parallelism=1)
RECOVERY = b"correct horse battery staple"
SIZE = 8 * 1024 * 1024


def stock(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["cryptsetup", *args], input=stdin, capture_output=True, check=False)


@pytest.fixture
def key() -> Secret:
    return Secret.random(32)


@pytest.fixture
def container(tmp_path: Path, key: Secret) -> Container:
    return Container.format(
        tmp_path / "keys.luks",
        size_bytes=SIZE,
        key=key,
        recovery=Secret(RECOVERY),
        recovery_pbkdf=CHEAP,
    )


# -- format, keyslots ----------------------------------------------------------------------


def test_testdata_present() -> None:
    assert (TESTDATA / "MANIFEST.txt").is_file(), f"missing {TESTDATA}"


def test_format_layout(container: Container, key: Secret) -> None:
    assert container.slots() == [0, 1]
    assert container.cipher == "aes-xts-plain64"
    assert container.sector_size == 512
    assert container.data_offset == HEADER_REGION
    assert container.data_size == SIZE - HEADER_REGION
    assert container.label == "qubes-seal"
    assert os.stat(container.path).st_mode & 0o777 == 0o600
    meta = cli_metadata(container.path)
    assert meta["keyslots"]["0"]["kdf"] == {  # type: ignore[index]
        "type": "pbkdf2",
        "hash": "sha256",
        "iterations": 1000,
        "salt": meta["keyslots"]["0"]["kdf"]["salt"],  # type: ignore[index]
    }
    assert meta["keyslots"]["1"]["kdf"]["type"] == "argon2id"  # type: ignore[index]
    assert meta["keyslots"]["1"]["kdf"]["memory"] == 32  # type: ignore[index]
    assert meta["config"]["json_size"] == str(64 * 1024 - 4096)  # type: ignore[index]
    assert meta["config"]["keyslots_size"] == str(2 * 1024 * 1024)  # type: ignore[index]
    assert len(container.volume_key(key)) == 64


def test_format_refuses_to_overwrite(tmp_path: Path, key: Secret) -> None:
    path = tmp_path / "busy"
    path.write_bytes(b"precious")
    args = {"size_bytes": SIZE, "key": key, "recovery": Secret(RECOVERY), "recovery_pbkdf": CHEAP}
    with pytest.raises(UsageError, match="not empty"):
        Container.format(path, **args)  # type: ignore[arg-type]
    assert path.read_bytes() == b"precious"
    c = Container.format(path, force=True, **args)  # type: ignore[arg-type]
    assert c.slots() == [0, 1]
    with pytest.raises(UsageError, match="at least 32 random bytes"):
        Container.format(
            tmp_path / "weak",
            size_bytes=SIZE,
            key=Secret(b"short"),
            recovery=Secret(RECOVERY),
            recovery_pbkdf=CHEAP,
        )
    assert not (tmp_path / "weak").exists()


def test_format_cleans_up_on_failure(tmp_path: Path, key: Secret) -> None:
    path = tmp_path / "c"
    with pytest.raises(QubesSealError):
        Container.format(
            path,
            size_bytes=SIZE,
            key=key,
            recovery=Secret(RECOVERY),
            recovery_pbkdf=PbkdfCost(iterations=4, memory_kib=1024 * 1024, parallelism=1),
            timeout=0.5,
        )
    assert not path.exists()


def test_stock_cryptsetup_accepts_both_keys(container: Container, key: Secret) -> None:
    p = str(container.path)
    assert stock("open", "--test-passphrase", "--key-file=-", p, stdin=RECOVERY).returncode == 0
    r = stock("open", "--test-passphrase", "--key-slot=1", "--key-file=-", p, stdin=RECOVERY)
    assert r.returncode == 0
    assert stock("open", "--test-passphrase", "--key-file=-", p, stdin=key.reveal()).returncode == 0
    assert stock("open", "--test-passphrase", "--key-file=-", p, stdin=b"wrong").returncode == 2


def test_add_test_kill(container: Container, key: Secret) -> None:
    recovery = Secret(RECOVERY)
    other = Secret(b"another passphrase")
    assert container.test_key(key) and container.test_key(recovery)
    assert container.test_key(key, slot=0) and not container.test_key(key, slot=1)
    assert not container.test_key(other)
    slot = container.add_key(recovery, other, pbkdf=CHEAP)
    assert slot == 2 and container.slots() == [0, 1, 2]
    assert container.test_key(other, slot=2)
    assert container.add_key(key, Secret.random(32), slot=7, pbkdf=PbkdfCost.minimal()) == 7
    with pytest.raises(UsageError, match="already in use"):
        container.add_key(key, Secret(b"x" * 40), slot=7, pbkdf=CHEAP)
    with pytest.raises(UsageError, match="not for passphrases"):
        container.add_key(key, Secret(b"typed"), pbkdf=PbkdfCost.minimal())
    with pytest.raises(WrongKey) as info:
        container.add_key(Secret(b"wrong"), Secret(b"new one"), pbkdf=CHEAP)
    assert isinstance(info.value, AuthorizationError) and info.value.exit_code == EXIT_AUTH
    with pytest.raises(AuthorizationError):
        container.kill_slot(2, existing=Secret(b"wrong"))
    assert container.slots() == [0, 1, 2, 7]
    with pytest.raises(WrongKey):  # "any remaining passphrase": not the one being killed
        container.kill_slot(2, existing=other)
    container.kill_slot(2, existing=recovery)
    container.kill_slot(7, existing=key)
    assert container.slots() == [0, 1]
    assert not container.test_key(other)
    with pytest.raises(UsageError, match="not in use"):
        container.kill_slot(5, existing=key)
    container.kill_slot(1, existing=key)
    with pytest.raises(UsageError, match="last one"):
        container.kill_slot(0, existing=key)
    assert container.test_key(key)


def test_pbkdf_cost() -> None:
    assert CHEAP.options() == [
        "--pbkdf=argon2id",
        "--pbkdf-force-iterations=4",
        "--pbkdf-memory=32",
        "--pbkdf-parallel=1",
    ]
    assert PbkdfCost(time_ms=2000).options()[:2] == ["--pbkdf=argon2id", "--iter-time=2000"]
    assert PbkdfCost.minimal().options() == ["--pbkdf=pbkdf2", "--pbkdf-force-iterations=1000"]
    for bad in (
        {},
        {"time_ms": 1, "iterations": 4},
        {"iterations": 3},
        {"iterations": 4, "memory_kib": 16},
        {"iterations": 4, "parallelism": 8},
        {"algorithm": "pbkdf2", "iterations": 999},
    ):
        with pytest.raises(UsageError):
            PbkdfCost(**bad)  # type: ignore[arg-type]


# -- tokens ----------------------------------------------------------------------------------


def test_token_round_trip(container: Container) -> None:
    token = {"type": "qubes-seal", "keyslots": ["0"], "version": 1, "blob": "AAEC" * 500}
    assert container.import_token(token) == 0
    assert container.export_token(0) == token
    other = {"type": "systemd-recovery", "keyslots": ["1"]}
    assert container.import_token(other) == 1
    assert container.find_tokens("qubes-seal") == {0: token}
    assert container.find_tokens("nothing") == {}
    with pytest.raises(UsageError, match="already in use"):
        container.import_token(token, token_id=0)
    newer = dict(token, blob="BBBB")
    assert container.import_token(newer, token_id=0, replace=True) == 0
    assert container.export_token(0) == newer
    assert container.import_token(token, token_id=5) == 5
    dump = stock("luksDump", str(container.path)).stdout.decode()
    assert "Tokens:" in dump and "0: qubes-seal" in dump and "5: qubes-seal" in dump


def test_token_errors(container: Container) -> None:
    with pytest.raises(UsageError, match="no token 3"):
        container.export_token(3)
    with pytest.raises(UsageError, match="out of range"):
        container.export_token(40)
    for bad in (
        {"keyslots": ["0"]},
        {"type": "", "keyslots": []},
        {"type": "qubes-seal", "keyslots": [0]},
        {"type": "qubes-seal"},
        {"type": "qubes-seal", "keyslots": [], "x": float("nan")},
        {"type": "qubes-seal", "keyslots": [], "x": b"bytes"},
    ):
        with pytest.raises(UsageError):
            container.import_token(bad)  # type: ignore[arg-type]
    # cryptsetup's own checks stay in force: a token bound to a keyslot that does not exist.
    with pytest.raises(cs.CryptsetupError, match="token import"):
        container.import_token({"type": "qubes-seal", "keyslots": ["9"]})


def test_corrupted_token_json_in_header(container: Container) -> None:
    """A token without a type (written by hand, checksums fixed): refused, not a traceback."""
    container.import_token({"type": "qubes-seal", "keyslots": ["0"]})

    def untype(meta: dict[str, dict[str, dict[str, object]]]) -> object:
        meta["tokens"]["0"]["type"] = 17
        return meta

    rewrite_metadata(container.path, untype)
    with pytest.raises(QubesSealError) as info:
        container.export_token(0)
    assert info.value.exit_code == EXIT_CORRUPT
    assert "LUKS2" in str(info.value)


# -- volume key, payload ---------------------------------------------------------------------


def test_volume_key_ctypes_equals_cli(container: Container, key: Secret) -> None:
    vk = container.volume_key(key, backend="libcryptsetup")
    assert vk.reveal() == cli_volume_key(container.path, key.reveal())
    assert container.volume_key(Secret(RECOVERY), backend="cli") == vk
    assert container.volume_key(key) == vk
    for backend in ("libcryptsetup", "cli"):
        with pytest.raises(AuthorizationError):
            container.volume_key(Secret(b"wrong"), backend=backend)  # type: ignore[arg-type]


def test_parse_volume_key_dump() -> None:
    out = (
        b"LUKS header information for x\nCipher name:   \taes\nMK bits:       \t256\n"
        b"MK dump:\t00 01 02 03 04 05 06 07 08 09 0a 0b 0c 0d 0e 0f \n"
        b"\t\t10 11 12 13 14 15 16 17 18 19 1a 1b 1c 1d 1e 1f \n"
    )
    assert parse_volume_key_dump(out).reveal() == bytes(range(32))
    with pytest.raises(CorruptState):
        parse_volume_key_dump(out.replace(b"256", b"512"))
    with pytest.raises(CorruptState):
        parse_volume_key_dump(b"garbage")


def test_userspace_payload_round_trip(container: Container, key: Secret) -> None:
    vk = cli_volume_key(container.path, key.reveal())
    with open_payload(container, key=key, prefer="userspace") as p:
        assert isinstance(p, UserspacePayload)
        assert p.size == container.data_size
        p.write(0, b"A" * 512)
        p.write(1000, b"unaligned write across sectors " * 10)
        p.write(p.size - 3, b"end")
        with pytest.raises(ValueError):
            p.write(p.size - 2, b"end")
        with pytest.raises(ValueError):
            p.read(-1, 2)
    with open_payload(container, key=Secret(RECOVERY), prefer="userspace", writable=False) as p:
        assert p.read(0, 512) == b"A" * 512
        assert p.read(1000, 31) == b"unaligned write across sectors "
        assert p.read(p.size - 3, 3) == b"end"
        with pytest.raises(UsageError, match="read-only"):
            p.write(0, b"x")
    # As dm-crypt would read it: AES-XTS, tweak = sector number from the data area start.
    raw = container.path.read_bytes()[container.data_offset :]
    assert xts_sector(vk, 0, raw[:512], encrypt=False) == b"A" * 512
    sector2 = xts_sector(vk, 2, raw[1024:1536], encrypt=False)
    assert sector2[:40] == (b"unaligned write across sectors " * 10)[24:64]
    last = container.data_size // 512 - 1
    assert xts_sector(vk, last, raw[-512:], encrypt=False).endswith(b"end")


def test_userspace_payload_refuses_wrong_key(container: Container) -> None:
    with pytest.raises(AuthorizationError):
        open_payload(container, key=Secret(b"wrong"), prefer="userspace")
    with pytest.raises(UnsupportedPayload, match="32- or 64-byte"):
        UserspacePayload(container, Secret(b"k" * 48))


# -- stock cryptsetup images ------------------------------------------------------------------


@pytest.fixture(scope="module")
def mda_images(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    images = untar_xz("luks2_mda_images.tar.xz", tmp_path_factory.mktemp("mda"))
    assert len(images) == 9
    return images


def test_mda_images_headers_match_cryptsetup(mda_images: list[Path]) -> None:
    sizes = set()
    for image in mda_images:
        header = read_header(image)
        assert header.metadata == cli_metadata(image), image.name
        assert header.cipher == "aes-xts-plain64"
        assert header.data_offset == 12582912
        assert header.secondary.hdr_offset == header.hdr_size
        sizes.add(header.hdr_size)
        assert len(header_digest(image)) == 32
    assert sizes == {16384 << i for i in range(9)}


def test_mda_images_volume_key_and_payload(mda_images: list[Path]) -> None:
    for image in mda_images[:3]:
        c = Container(image)
        vk = c.volume_key(Secret(MDA_PASSPHRASE))
        assert len(vk) == 32
        assert vk.reveal() == cli_volume_key(image, MDA_PASSPHRASE)
        raw = image.read_bytes()[c.data_offset :]
        with UserspacePayload(c, vk, writable=False) as p:
            assert p.size == len(raw) == 4 * 1024 * 1024
            data = p.read(0, 64 * 512)
            for s in (0, 1, 63):
                chunk = raw[s * 512 : (s + 1) * 512]
                assert data[s * 512 : (s + 1) * 512] == xts_sector(
                    vk.reveal(), s, chunk, encrypt=False
                )
            last = p.size // 512 - 1
            assert p.read(last * 512, 512) == xts_sector(
                vk.reveal(), last, raw[-512:], encrypt=False
            )


def test_mda_image_write_matches_independent_xts(mda_images: list[Path], tmp_path: Path) -> None:
    image = tmp_path / "copy"
    shutil.copyfile(mda_images[0], image)
    c = Container(image)
    vk = c.volume_key(Secret(MDA_PASSPHRASE))
    plaintext = bytes(range(256)) * 4
    with UserspacePayload(c, vk) as p:
        p.write(5 * 512, plaintext)
    raw = image.read_bytes()[c.data_offset :]
    expected = xts_sector(vk.reveal(), 5, plaintext[:512], encrypt=True)
    expected += xts_sector(vk.reveal(), 6, plaintext[512:], encrypt=True)
    assert raw[5 * 512 : 7 * 512] == expected
    r = stock("open", "--test-passphrase", "--key-file=-", str(image), stdin=MDA_PASSPHRASE)
    assert r.returncode == 0
    assert c.test_key(Secret(MDA_PASSPHRASE))


def test_compat_image_cbc(tmp_path: Path) -> None:
    image = unxz("compatimage2.img.xz", tmp_path / "compat.img")
    header = read_header(image)
    assert header.metadata == cli_metadata(image)
    assert header.uuid == "28632274-8c8a-493f-835b-da802e1c576b"
    assert header.cipher == "aes-cbc-essiv:sha256"
    assert header.data_offset == 4194304
    assert header.data_size == 512
    assert len(header_digest(image)) == 32
    c = Container(image)
    vk = c.volume_key(Secret(COMPAT_PASSPHRASE))
    assert len(vk) == 16
    assert vk.reveal() == cli_volume_key(image, COMPAT_PASSPHRASE)
    with pytest.raises(UnsupportedPayload, match="aes-cbc-essiv:sha256"):
        UserspacePayload(c, vk)
    with pytest.raises(UnsupportedPayload, match="aes-cbc-essiv"):
        open_payload(c, key=Secret(COMPAT_PASSPHRASE), prefer="userspace")


def test_valid_header_image(tmp_path: Path) -> None:
    image = unxz("luks2_valid_hdr.img.xz", tmp_path / "valid.img")
    header = read_header(image)
    assert header.metadata == cli_metadata(image)
    assert header.uuid == "12a3a118-7039-4575-a649-3f559d8d87ee"
    assert header.hdr_size == 16384
    assert sorted(header.keyslots) == list(range(8))
    assert header.cipher == "aes-xts-plain64"


# -- the header digest (PCR 13) ---------------------------------------------------------------


def independent_digest(path: Path, exclude: str | None = "qubes-seal") -> bytes:
    """The definition of header_digest, recomputed from stock cryptsetup's JSON."""
    meta = cli_metadata(path)
    uuid = stock("luksUUID", str(path)).stdout.strip()
    tokens = meta["tokens"]
    meta["tokens"] = {
        k: v
        for k, v in tokens.items()  # type: ignore[attr-defined]
        if v["type"] != exclude
    }
    j = canonical_json(meta)
    h = hashlib.sha256(DIGEST_TAG)
    h.update(struct.pack(">Q", len(uuid)) + uuid + struct.pack(">Q", len(j)) + j)
    keyslots = meta["keyslots"]
    h.update(struct.pack(">Q", len(keyslots)))  # type: ignore[arg-type]
    data = path.read_bytes()
    for kid in sorted(keyslots, key=int):  # type: ignore[arg-type,call-overload]
        area = keyslots[kid]["area"]  # type: ignore[index]
        off, size = int(area["offset"]), int(area["size"])
        h.update(struct.pack(">QQQ", int(kid), off, size))
        h.update(hashlib.sha256(data[off : off + size]).digest())
    return h.digest()


def test_header_digest_definition(container: Container, key: Secret) -> None:
    container.import_token({"type": "qubes-seal", "keyslots": ["0"], "blob": "x"})
    container.import_token({"type": "other", "keyslots": []})
    for exclude in ("qubes-seal", None):
        assert header_digest(container.path, exclude_token_type=exclude) == independent_digest(
            container.path, exclude
        )


def test_header_digest_stable_across_our_token(container: Container) -> None:
    before = header_digest(container.path)
    seq0 = read_header(container.path).seqid
    container.import_token({"type": "qubes-seal", "keyslots": ["0"], "blob": "first"})
    assert header_digest(container.path) == before
    container.import_token(
        {"type": "qubes-seal", "keyslots": ["0"], "blob": "second" * 100}, token_id=0, replace=True
    )
    assert read_header(container.path).seqid > seq0
    assert header_digest(container.path) == before
    # Covered: any other token, and our own when not excluded.
    assert header_digest(container.path, exclude_token_type=None) != before
    container.import_token({"type": "other", "keyslots": []})
    assert header_digest(container.path) != before


def test_header_digest_follows_keyslots(container: Container, key: Secret) -> None:
    d0 = header_digest(container.path)
    slot = container.add_key(key, Secret(b"new passphrase"), pbkdf=CHEAP)
    d1 = header_digest(container.path)
    container.kill_slot(slot, existing=key)
    d2 = header_digest(container.path)
    assert d1 != d0
    assert d2 == d0  # the slot's JSON is gone and the area of a free slot is not covered
    # Changing the recovery passphrase (new slot, old one killed) changes it too.
    container.add_key(key, Secret(b"new recovery"), slot=2, pbkdf=CHEAP)
    container.kill_slot(1, existing=key)
    assert header_digest(container.path) not in (d0, d1, d2)


def test_header_digest_detects_rollback(container: Container, key: Secret) -> None:
    """An old header (with an old, leaked recovery passphrase) written back: old digest."""
    old_recovery = Secret(RECOVERY)
    with open(container.path, "rb") as f:
        saved = f.read(container.data_offset)
    old = header_digest(container.path)
    container.add_key(key, Secret(b"new recovery"), slot=2, pbkdf=CHEAP)
    container.kill_slot(1, existing=key)
    current = header_digest(container.path)
    assert current != old
    assert not container.test_key(old_recovery)
    with open(container.path, "r+b") as f:
        f.write(saved)
        f.flush()
        os.fsync(f.fileno())
    assert container.test_key(old_recovery)  # the attack works on LUKS alone...
    assert header_digest(container.path) == old != current  # ...but PCR 13 differs


def test_corrupted_header(container: Container) -> None:
    hdr_size = read_header(container.path).hdr_size
    pristine = container.path.read_bytes()[: 2 * hdr_size]
    for where, offset in (("primary", 4096 + 10), ("secondary", hdr_size + 4096 + 10)):
        with open(container.path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x01]))
        with pytest.raises(CorruptState, match=f"{where} LUKS2 header: checksum mismatch") as e:
            header_digest(container.path)
        assert e.value.exit_code == EXIT_CORRUPT
        assert "cryptsetup repair" in e.value.diagnostics()
        with open(container.path, "r+b") as f:
            f.write(pristine)
    assert header_digest(container.path)
    with open(container.path, "r+b") as f:
        f.write(b"\0" * 6)
    with pytest.raises(CorruptState, match="bad magic"):
        container.slots()
    # libcryptsetup would fall back to the secondary copy; we fail closed instead.
    with pytest.raises(CorruptState):
        container.volume_key(Secret.random(32))


def test_header_copies_must_agree(container: Container) -> None:
    hdr_size = read_header(container.path).hdr_size
    old_secondary = container.path.read_bytes()[hdr_size : 2 * hdr_size]
    container.import_token({"type": "qubes-seal", "keyslots": ["0"]})
    with open(container.path, "r+b") as f:
        f.seek(hdr_size)
        f.write(old_secondary)
    with pytest.raises(CorruptState, match="disagree"):
        header_digest(container.path)


def test_keyslot_area_tamper_changes_digest(container: Container) -> None:
    before = header_digest(container.path)
    area = read_header(container.path).keyslots[1]["area"]
    with open(container.path, "r+b") as f:
        f.seek(int(area["offset"]) + 100)
        f.write(b"\xff")
    assert header_digest(container.path) != before


# -- dm-crypt ---------------------------------------------------------------------------------

DM_OK, DM_REASON = dm_crypt_available()


def test_dm_crypt_probe_and_clear_failure(container: Container, key: Secret) -> None:
    assert DM_REASON
    if DM_OK:
        pytest.skip(f"dm-crypt is available here ({DM_REASON}): the positive test covers it")
    with pytest.raises(DmCryptUnavailable) as info:
        DmCryptPayload(container, key, "qubes-seal-test")
    assert isinstance(info.value, QubesSealError)
    assert "dm-crypt cannot map" in str(info.value)
    assert "user-space" in info.value.diagnostics()
    with pytest.raises(DmCryptUnavailable):
        open_payload(container, key=key, prefer="dm-crypt")
    with pytest.raises(UsageError):
        DmCryptPayload(container, key, "bad/name")
    with open_payload(container, key=key) as p:  # auto falls back to user space
        assert isinstance(p, UserspacePayload)


@pytest.mark.skipif(not DM_OK, reason=f"dm-crypt unavailable: {DM_REASON}")
def test_dm_crypt_payload_matches_userspace(container: Container, key: Secret) -> None:
    name = f"qubes-seal-test-{os.getpid()}"
    with DmCryptPayload(container, key, name) as p:
        assert p.size == container.data_size
        p.write(700, b"written through dm-crypt")
    assert not Path("/dev/mapper", name).exists()
    with open_payload(container, key=key, prefer="userspace") as u:
        assert u.read(700, 24) == b"written through dm-crypt"
        u.write(4096, b"written in user space")
    with DmCryptPayload(container, key, name, writable=False) as p:
        assert p.read(4096, 21) == b"written in user space"


# -- no secret in argv or environment ---------------------------------------------------------


class ProcWatcher(threading.Thread):
    """Polls /proc/*/cmdline and the environment of cryptsetup processes for secrets."""

    def __init__(self, needles: list[bytes]) -> None:
        super().__init__(daemon=True)
        self.needles = needles
        self.stop = threading.Event()
        self.leaks: list[str] = []
        self.seen: set[str] = set()

    def run(self) -> None:
        me = str(os.getpid())
        while not self.stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or pid == me:
                    continue
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                    environ = (
                        Path(f"/proc/{pid}/environ").read_bytes()
                        if b"cryptsetup" in cmdline
                        else b""
                    )
                except OSError:
                    continue
                if b"cryptsetup" in cmdline:
                    self.seen.add(cmdline.decode(errors="replace"))
                for needle in self.needles:
                    if needle in cmdline or needle in environ:
                        self.leaks.append(f"pid {pid}: {cmdline!r}")
            time.sleep(0.001)


@pytest.fixture
def watcher(key: Secret) -> Iterator[ProcWatcher]:
    raw = key.reveal()
    needles = [raw, raw.hex().encode(), raw.hex().upper().encode(), RECOVERY, b"new recovery 2"]
    w = ProcWatcher(needles)
    w.start()
    yield w
    w.stop.set()
    w.join()


def test_no_secret_in_argv_or_environ(tmp_path: Path, key: Secret, watcher: ProcWatcher) -> None:
    slow = PbkdfCost(iterations=4, memory_kib=128 * 1024, parallelism=1)
    c = Container.format(
        tmp_path / "c", size_bytes=SIZE, key=key, recovery=Secret(RECOVERY), recovery_pbkdf=slow
    )
    c.add_key(Secret(RECOVERY), Secret(b"new recovery 2"), pbkdf=slow)
    assert c.test_key(Secret(RECOVERY))
    c.volume_key(key, backend="cli")
    c.kill_slot(2, existing=Secret(RECOVERY))
    watcher.stop.set()
    watcher.join()
    assert not watcher.leaks, watcher.leaks
    seen = " ".join(watcher.seen)
    assert "luksAddKey" in seen, f"the watcher saw no cryptsetup process: {watcher.seen}"
    assert "--new-keyfile=/dev/fd/" in seen


# -- the cryptsetup runner --------------------------------------------------------------------


def test_runner_errors(tmp_path: Path) -> None:
    plain = tmp_path / "plain"
    plain.write_bytes(bytes(1 << 20))
    with pytest.raises(cs.NotLuksDevice) as info:
        cs.run(["luksDump", str(plain)])
    assert info.value.exit_code == EXIT_CORRUPT and "not a valid LUKS device" in info.value.stderr
    with pytest.raises(cs.CryptsetupError, match="wrong or inaccessible device"):
        cs.run(["luksDump", str(tmp_path / "missing")])
    with pytest.raises(ValueError):
        cs.run(["luksDump"], key=Secret(b"k"), stdin=b"x")


def test_runner_timeout(container: Container) -> None:
    slow = PbkdfCost(iterations=4, memory_kib=512 * 1024, parallelism=1)
    with pytest.raises(cs.CryptsetupTimeout, match="did not finish"):
        cs.run(
            ["luksAddKey", str(container.path)],
            options=["--key-file=-", *slow.options()],
            key=Secret(RECOVERY),
            new_key=Secret(b"x" * 12),
            timeout=0.05,
        )


def test_stderr_summary_redacts() -> None:
    secret = b"hunter2-secret"
    text = b"line one\nkey " + secret + b" and " + secret.hex().encode() + b"\n\nline one\n"
    summary = cs.summarize_stderr(text, secrets=[secret])
    assert secret.decode() not in summary and secret.hex() not in summary
    assert "<redacted>" in summary
    assert len(cs.summarize_stderr(b"x" * 5000)) <= 400
