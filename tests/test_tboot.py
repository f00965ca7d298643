"""tboot's measurements: golden values from real hardware, GRUB's strings, module loading."""

from __future__ import annotations

import gzip
import hashlib
import lzma
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
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


def test_load_module_image_matches_the_standard_library(tmp_path: Path) -> None:
    # Incremental decompression reads what gzip.decompress and lzma.decompress read:
    # concatenated members or streams, zero padding, images larger than one step.
    big = bytes(range(256)) * (3 * 1024 * 16) + PAYLOAD  # 12 MiB + : several 1 MiB steps
    cases = {
        "members.gz": gzip.compress(PAYLOAD) + b"\0" * 7 + gzip.compress(b"second", mtime=0),
        "big.gz": gzip.compress(big, compresslevel=1),
        "streams.xz": lzma.compress(PAYLOAD) + bytes(8) + lzma.compress(b"second"),
        "trailing.xz": lzma.compress(big, preset=0) + b"not an xz stream",
    }
    for name, data in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        std = lzma.decompress(data) if name.endswith(".xz") else gzip.decompress(data)
        assert tboot.load_module_image(path) == std, name


@given(st.binary(max_size=4096), st.integers(1, 64), st.booleans())
@settings(max_examples=60, deadline=None)
def test_decompress_at_every_step_size(payload: bytes, step: int, xz: bool) -> None:
    # Small steps put the step boundaries everywhere: same bytes as the standard library.
    data = lzma.compress(payload) if xz else gzip.compress(payload)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tboot, "_CHUNK", step)
        got = tboot._decompress(data, xz=xz, path="m", limit=len(payload))
    assert got == payload


def test_truncated_images_do_not_decompress(tmp_path: Path) -> None:
    for name, data in (("t.gz", gzip.compress(PAYLOAD)), ("t.xz", lzma.compress(PAYLOAD))):
        path = tmp_path / name
        path.write_bytes(data[: len(data) // 2])
        with pytest.raises(UsageError, match="does not decompress"):
            tboot.load_module_image(path)


def test_module_size_bound_at_its_edge(tmp_path: Path) -> None:
    image = bytes(range(256)) * 40  # 10240 bytes
    for name, data in (("m.gz", gzip.compress(image)), ("m.xz", lzma.compress(image))):
        path = tmp_path / name
        path.write_bytes(data)
        assert tboot.load_module_image(path, max_size=len(image)) == image
        with pytest.raises(tboot.ModuleTooLarge, match=f"module {path} is larger") as info:
            tboot.load_module_image(path, max_size=len(image) - 1)
        assert info.value.exit_code == 7
    raw = tmp_path / "initramfs.img"  # as read, with --nounzip or not compressed at all
    raw.write_bytes(image)
    assert tboot.load_module_image(raw, nounzip=True, max_size=len(image)) == image
    with pytest.raises(tboot.ModuleTooLarge, match="as a file"):
        tboot.load_module_image(raw, nounzip=True, max_size=len(image) - 1)
    assert tboot.MAX_MODULE_SIZE == 256 * 1024 * 1024


BOMB_PROBE = """
import resource, sys
from qubes_seal.measure import tboot
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    tboot.load_module_image(sys.argv[1])
except tboot.ModuleTooLarge as exc:
    print("refused", exc.exit_code, exc.message, file=sys.stderr)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024)
"""


@pytest.mark.parametrize("kind", ["gz", "xz"])
def test_a_decompression_bomb_is_refused_in_bounded_memory(tmp_path: Path, kind: str) -> None:
    # The attack run's bomb: 2 GiB of output from a file of about 2 MB (gzip: 32 members of
    # 64 MiB of zeros each; xz, which compresses zeros much better, streams alike).
    member = bytes(64 * 1024 * 1024)
    one = gzip.compress(member, compresslevel=9, mtime=0) if kind == "gz" else lzma.compress(member)
    bomb = tmp_path / f"xen-4.19.{kind}"
    bomb.write_bytes(one * 32)
    assert bomb.stat().st_size < 3 * 1024 * 1024
    proc = subprocess.run(
        [sys.executable, "-c", BOMB_PROBE, str(bomb)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"refused 7 module {bomb} is larger than 256 MiB decompressed" in proc.stderr
    peak_mib = int(proc.stdout)
    # Bounded by the 256 MiB limit (plus a step and the compressed file), not by the 2 GiB
    # the file expands to.
    assert peak_mib < 256 + 64, peak_mib


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
