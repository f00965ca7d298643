"""tboot's measurements: golden values from real hardware, GRUB's strings, module loading."""

from __future__ import annotations

import gzip
import hashlib
import lzma
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qubes_seal.errors import UsageError
from qubes_seal.measure import eventlog as el
from qubes_seal.measure import tboot
from qubes_seal.measure.eventlog import Event, EventLogError

# --- Policy ---------------------------------------------------------------------------------

# TBOOT-TXT.md: seen on real tboot + TXT + TPM 2.0 hardware (tboot <= 1.9.11 default policy).
REAL_SHA256 = "27808f64e6383982cd3bcc10cfcb3457c0b65f465f779d89b668839eaf263a67"
REAL_SHA1 = "ca96de412b4e8c062e570d3013d2fccb4b20250a"


def test_old_default_policy_blob() -> None:
    assert len(tboot.DEFAULT_DA_POLICY_OLD) == 36
    assert tboot.default_policy_blob(el.ALG_SHA1) == tboot.DEFAULT_DA_POLICY_OLD


def test_policy_digest_sha256_bank_matches_hardware() -> None:
    digest = tboot.policy_digest(
        tboot.DEFAULT_DA_POLICY_OLD, policy_control=1, bank="sha256", inner="sha256"
    )
    assert digest.hex() == REAL_SHA256


def test_policy_digest_sha1_bank_matches_hardware_with_sha256_inner_hash() -> None:
    """The SHA-1 bank's figure needs H_inner = SHA-256 (tboot's cur_alg), not SHA-1."""
    blob = tboot.DEFAULT_DA_POLICY_OLD
    assert tboot.policy_digest(blob, bank="sha1", inner="sha256").hex() == REAL_SHA1
    assert tboot.policy_digest(blob, bank="sha1", inner="sha1").hex() != REAL_SHA1


def test_policy_digest_definition() -> None:
    blob = b"any policy"
    expected = hashlib.sha384(b"\x01\x00\x00\x00" + hashlib.sha256(blob).digest()).digest()
    assert tboot.policy_digest(blob, bank="sha384") == expected
    # Without EXTEND_PCR17 tboot hashes zeros in place of the policy's hash.
    zeros = hashlib.sha256(bytes(4) + bytes(32)).digest()
    assert tboot.policy_digest(blob, policy_control=0) == zeros


def test_new_default_policy_blob_differs_only_in_hash_alg() -> None:
    new = tboot.default_policy_blob(el.ALG_SHA256)
    old = tboot.DEFAULT_DA_POLICY_OLD
    assert len(new) == len(old) == 36
    assert new[2] == 0x0B
    assert [i for i in range(36) if new[i] != old[i]] == [2]
    assert new == tboot.DEFAULT_DA_POLICY_SHA256
    # Regression value (computed here, not observed on hardware).
    assert (
        tboot.policy_digest(new).hex()
        == hashlib.sha256(b"\x01\x00\x00\x00" + hashlib.sha256(new).digest()).hexdigest()
    )


def test_policy_errors() -> None:
    with pytest.raises(UsageError):
        tboot.default_policy_blob(0x100)
    with pytest.raises(UsageError):
        tboot.policy_digest(b"", bank="md5")
    with pytest.raises(UsageError):
        tboot.policy_digest(b"", policy_control=1 << 32)


# --- Modules --------------------------------------------------------------------------------


def test_module_digest_definition() -> None:
    cmdline, image = b"placeholder root=/dev/mapper/qubes_dom0-root ro", b"\x7fELF" + bytes(100)
    for bank, h in (("sha256", hashlib.sha256), ("sha1", hashlib.sha1), ("sha512", hashlib.sha512)):
        expected = h(h(cmdline).digest() + h(image).digest()).digest()
        assert tboot.module_digest(cmdline, image, bank=bank) == expected
    # Golden: empty string and empty image, SHA-256.
    empty = hashlib.sha256(b"").digest()
    assert tboot.module_digest(b"", b"") == hashlib.sha256(empty + empty).digest()
    assert (
        tboot.module_digest(b"", b"").hex()
        == "2dba5dbc339e7316aea2683faf839c1b7b1ee2313db792112588118df066aa35"
    )


# --- GRUB strings ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], b""),
        (["placeholder", "root=/dev/sda1", "ro"], b"placeholder root=/dev/sda1 ro"),
        (["console=vga,com1", "dom0_mem=max:4G"], b"console=vga,com1 dom0_mem=max:4G"),
        (["a b"], b'"a b"'),
        (["say='hi'"], b"say=\\'hi\\'"),
        (['x="y z"'], b'"x=\\"y z\\""'),
        (["back\\slash"], b"back\\\\slash"),
        (["\\x41\\x4g"], b"\\x41\\\\x4g"),
        (["\\x4"], b"\\\\x4"),
        (["a", "", "b"], b"a  b"),
    ],
)
def test_grub_module_string(args: list[str], expected: bytes) -> None:
    assert tboot.grub_module_string(args) == expected


@given(st.lists(st.text(alphabet="abcXYZ019=,._/-:", min_size=1), max_size=8))
def test_grub_module_string_plain_words_join_with_spaces(words: list[str]) -> None:
    assert tboot.grub_module_string(words) == " ".join(words).encode()


# --- Module images --------------------------------------------------------------------------

PAYLOAD = b"\x7fELF" + bytes(range(256)) * 64


def test_load_module_image_decompresses_by_magic(tmp_path: Path) -> None:
    gz = tmp_path / "xen.img"  # no .gz extension: detected by magic
    gz.write_bytes(gzip.compress(PAYLOAD))
    xz = tmp_path / "vmlinuz"
    xz.write_bytes(lzma.compress(PAYLOAD, format=lzma.FORMAT_XZ))
    assert tboot.load_module_image(gz) == PAYLOAD
    assert tboot.load_module_image(xz) == PAYLOAD
    assert tboot.load_module_image(gz, nounzip=True) == gz.read_bytes()


def test_load_module_image_keeps_other_formats(tmp_path: Path) -> None:
    zstd = tmp_path / "initramfs.gz"  # misleading extension: zstd magic, loaded as is
    zstd.write_bytes(b"\x28\xb5\x2f\xfd" + bytes(40))
    cpio = tmp_path / "initrd"
    cpio.write_bytes(b"070701" + bytes(200))
    assert tboot.load_module_image(zstd) == zstd.read_bytes()
    assert tboot.load_module_image(cpio) == cpio.read_bytes()


def test_load_module_image_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00" + b"garbage")
    with pytest.raises(UsageError, match="does not decompress"):
        tboot.load_module_image(bad)
    lzo = tmp_path / "mod.lzo"
    lzo.write_bytes(b"\x89LZO\x00\r\n\x1a\n" + bytes(10))
    with pytest.raises(UsageError, match="lzop"):
        tboot.load_module_image(lzo)
    assert tboot.load_module_image(lzo, nounzip=True).startswith(b"\x89LZO")
    with pytest.raises(UsageError, match="cannot read"):
        tboot.load_module_image(tmp_path / "missing")


# --- The TXT log ----------------------------------------------------------------------------


def h(*parts: bytes) -> bytes:
    return hashlib.sha256(b"".join(parts)).digest()


def txt_log_bytes() -> tuple[bytes, list[Event], list[Event]]:
    """A TXT log as tboot keeps it: crypto-agile, zero-padded to its 0x2000-byte buffer."""
    sinit = [
        Event(17, el.EVTYPE_HASH_START, {"sha256": h(b"acm")}, b"\x01\x02"),
        Event(17, el.EVTYPE_MLE_HASH, {"sha256": h(b"tboot")}, b""),
        Event(18, el.EVTYPE_SINIT_PUBKEY_HASH, {"sha256": h(b"key")}, b""),
    ]
    policy = tboot.policy_digest(tboot.DEFAULT_DA_POLICY_OLD)
    xen = tboot.module_digest(b"placeholder console=none", b"xen image")
    tb = [
        Event(17, el.EVTYPE_TB_MEASUREMENT, {"sha256": policy}, b""),
        Event(18, el.EVTYPE_TB_MEASUREMENT, {"sha256": policy}, b""),
        Event(17, el.EVTYPE_TB_MEASUREMENT, {"sha256": xen}, b""),
    ]
    raw = el.write(sinit + tb, ["sha256"])
    return raw.ljust(0x2000, b"\x00"), sinit, tb


def test_split_and_replay_a_txt_log() -> None:
    raw, sinit, tb = txt_log_bytes()
    log = el.parse(raw)
    got_sinit, got_tboot = tboot.split_txt_log(log)
    assert got_sinit == sinit
    assert got_tboot == tb
    pcr17 = bytes(32)
    for digest in (h(b"acm"), h(b"tboot"), tb[0].digests["sha256"], tb[2].digests["sha256"]):
        pcr17 = h(pcr17, digest)
    values = el.replay(log, drtm=True)["sha256"]
    assert values[17] == pcr17
    assert values[18] == h(h(bytes(32), h(b"key")), tb[1].digests["sha256"])
    assert all(e.event_type in tboot.DRTM_EVENT_TYPES for e in got_sinit + got_tboot)


def test_split_refuses_sinit_event_after_tboot() -> None:
    _, sinit, tb = txt_log_bytes()
    log = el.parse(el.write([*sinit, *tb, sinit[0]], ["sha256"]))
    with pytest.raises(EventLogError, match="follows tboot"):
        tboot.split_txt_log(log)


def test_split_per_bank_legacy_log() -> None:
    def rec(pcr: int, typ: int, digest: bytes) -> bytes:
        return pcr.to_bytes(4, "little") + typ.to_bytes(4, "little") + digest + bytes(4)

    sha1 = rec(17, 0x402, b"\x01" * 20) + rec(17, 0x501, b"\x02" * 20)
    descriptor = rec(0, 3, bytes(20))[:-4] + (28).to_bytes(4, "little")
    descriptor += b"TCG_LOG_DESCRIPT" + (1).to_bytes(4, "little") + (2).to_bytes(4, "little")
    descriptor += (32).to_bytes(4, "little")
    sha256 = descriptor + rec(17, 0x402, b"\x03" * 32) + rec(17, 0x501, b"\x04" * 32)
    log = el.parse_txt_tpm2_legacy({"sha1": sha1, "sha256": sha256})
    sinit, tb = tboot.split_txt_log(log)
    assert [list(e.digests) for e in sinit] == [["sha1"], ["sha256"]]
    assert [list(e.digests) for e in tb] == [["sha1"], ["sha256"]]
