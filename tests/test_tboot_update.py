"""tboot updates predicted: SINIT's MLE_HASH from a tboot image and its command line.

The MLE hash is held against Debian's ``lcp2_mlehash`` (package ``tboot``, an independent
implementation) on the real ``/boot/tboot.gz`` that package ships; the OsSinitData
capabilities model against the real launch of ../shared/testdata/real-drtm; the whole cycle
(boot, update tboot, predict, sign, reboot into it, unlock with no recovery key) on swtpm.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from cli_util import run
from machine import Box
from rpm_util import Package, default_grub, packaged

from qubes_seal import state
from qubes_seal.measure import eventlog
from qubes_seal.measure.mle import (
    MAX_MLE_IMAGE,
    MLE_HEADER_UUID,
    NotAnMleImage,
    TbootImage,
    TbootImageError,
    os_sinit_caps,
)
from qubes_seal.measure.predict import Component, NextTboot, predict_txt
from qubes_seal.measure.tboot import ModuleTooLarge
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import (
    Module,
    Platform,
    expected_pcrs,
    launch_events,
    sample_modules,
    sample_tboot,
    txt_launch,
)

DEBIAN_TBOOT = Path("/boot/tboot.gz")
LCP2_MLEHASH = shutil.which("lcp2_mlehash") or "/usr/sbin/lcp2_mlehash"
REAL = Path(__file__).resolve().parents[1].parent / "shared" / "testdata" / "real-drtm"
DUMP = REAL / "tbootdevel_2021-08-26_skylake-0x506e3_tboot-1.10.2_tpm2-tcg-log_txt-stat.txt"

needs_debian_tboot = pytest.mark.skipif(
    not (DEBIAN_TBOOT.exists() and Path(LCP2_MLEHASH).exists()),
    reason="Debian's tboot package (scripts/setup installs it) is not installed",
)

CMDLINES = [
    "",
    "logging=serial,memory,vga",
    "logging=memory min_ram=0x2000000",
    "logging=serial,memory serial=115200,8n1,0x3f8 loglvl=all ignore_prev_err=true",
    'a "quoted word" \\x41',
    "x" * 510,  # the longest that fits tboot's buffer with its NUL
]


def lcp2_mlehash(path: Path, cmdline: str | None, alg: str) -> bytes:
    args = [LCP2_MLEHASH, "--create", "--alg", alg]
    if cmdline is not None:
        args += ["--cmdline", cmdline]
    res = subprocess.run([*args, str(path)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return bytes.fromhex("".join(res.stdout.split()))


@pytest.fixture(scope="module")
def debian() -> TbootImage:
    return TbootImage.from_file(DEBIAN_TBOOT)


# --- The MLE hash against lcp2_mlehash ---------------------------------------------------------


@needs_debian_tboot
def test_debian_tboot_header(debian: TbootImage) -> None:
    """TXT-LIFECYCLE.md's figures for Debian's tboot.gz."""
    h = debian.header
    assert (h.mle_start, h.mle_end) == (0x4000, 0x4D000)
    assert (h.cmdline_start, h.cmdline_end) == (0x7E00, 0x7FFF)
    assert h.capabilities == 0x627


@needs_debian_tboot
@pytest.mark.parametrize("alg", ["sha1", "sha256", "sha384", "sha512"])
def test_mle_hash_equals_lcp2_mlehash(debian: TbootImage, alg: str) -> None:
    for cmdline in CMDLINES:
        assert debian.mle_hash(cmdline.encode(), alg) == lcp2_mlehash(DEBIAN_TBOOT, cmdline, alg), (
            cmdline[:40]
        )
    # No --cmdline at all: the file's buffer is zeros, as an empty command line leaves it.
    assert debian.mle_hash(b"", alg) == lcp2_mlehash(DEBIAN_TBOOT, None, alg)


@needs_debian_tboot
def test_synthetic_tboot_agrees_with_lcp2_mlehash(tmp_path: Path) -> None:
    """The simulation's stand-in is a real MLE image: lcp2_mlehash reads it the same way."""
    for label, caps in (("tboot 1.10.5", 0x627), ("tboot 1.11.9", 0x4627)):
        path = tmp_path / f"{label}.gz"
        path.write_bytes(sample_tboot(label, caps=caps))
        image = TbootImage.from_file(path)
        assert image.header.capabilities == caps
        for cmdline in CMDLINES[:3]:
            got = image.mle_hash(cmdline.encode())
            assert got == lcp2_mlehash(path, cmdline, "sha256")


@needs_debian_tboot
def test_command_line_longer_than_the_buffer_is_refused(debian: TbootImage) -> None:
    with pytest.raises(TbootImageError, match="at most 510"):
        debian.mle_hash(b"x" * 511)


@needs_debian_tboot
def test_simulated_launch_measures_what_lcp2_mlehash_computes() -> None:
    """txt_launch's MLE_HASH for Debian's tboot is lcp2_mlehash's answer."""
    cmdline = "logging=serial,memory,vga"
    platform = Platform(tboot_image=DEBIAN_TBOOT.read_bytes(), tboot_cmdline=cmdline.encode())
    (mle,) = [e for e in launch_events(platform, []) if e.event_type == 0x404]
    assert mle.digests["sha256"] == lcp2_mlehash(DEBIAN_TBOOT, cmdline, "sha256")


# --- The capabilities event against the real launch -------------------------------------------


@pytest.mark.skipif(not DUMP.exists(), reason=f"no real-drtm test data at {REAL}")
def test_capabilities_model_on_the_real_launch() -> None:
    """The real dump: MLE header caps 0x627, OsSinitData 0x602, and the 0x40F event is the
    hash of that dword in both banks; the model keeps 0x602 for the same tboot and adds TPR
    support (bit 14) for tboot 1.11.6's header 0x4627."""
    text = DUMP.read_text(errors="replace")
    assert "\t capabilities: 0x00000627" in text and "\t capabilities: 0x00000602" in text
    m = re.search(r"event_type: 0x40f.*?SHA1: \s*TBOOT: ([0-9a-f ]+?)\s*\n"
                  r"TBOOT: SHA256: \s*TBOOT: ([0-9a-f ]+?)\s*\n.*?"
                  r"event_data: 4 bytes\s+([0-9a-f ]+?)\s*\n", text, re.S)  # fmt: skip
    assert m is not None
    sha1, sha256, data = (bytes.fromhex(g.replace(" ", "")) for g in m.groups())
    assert data == (0x602).to_bytes(4, "little")
    assert hashlib.sha1(data).digest() == sha1 and hashlib.sha256(data).digest() == sha256
    assert os_sinit_caps(0x602, 0x627) == 0x602
    assert os_sinit_caps(0x602, 0x4627) == 0x4602


# --- Prediction against the simulation ------------------------------------------------------------


def log_of(platform: Platform, modules: list[Module], banks: list[str] | None = None) -> bytes:
    events = launch_events(platform, modules)
    if banks and "sha1" in banks:  # the same launch seen in a SHA-1 bank too
        events = [eventlog.Event(e.pcr, e.event_type, {**e.digests, "sha1": bytes(20)}, e.data)
                  for e in events]  # fmt: skip
    return eventlog.write(events, banks or ["sha256"])


UPDATES = {
    "image": dict(tboot_image=sample_tboot("tboot 1.10.6")),
    "cmdline": dict(tboot_cmdline=b"logging=memory min_ram=0x2000000"),
    "caps": dict(tboot_image=sample_tboot("tboot 1.11.9", caps=0x4627)),
}


@pytest.mark.parametrize("update", sorted(UPDATES))
def test_prediction_equals_the_simulated_launch(update: str) -> None:
    old, new = Platform(), Platform(**UPDATES[update])  # type: ignore[arg-type]
    modules = sample_modules()
    log = eventlog.parse(log_of(old, modules))
    comps = [Component(m.name, m.cmdline, m.image) for m in modules]
    nxt = NextTboot(TbootImage.from_bytes(new.tboot_image), new.tboot_cmdline)
    want, before = expected_pcrs(new, modules), expected_pcrs(old, modules)
    assert predict_txt(log, comps, tboot=nxt) == {17: want[17], 18: want[18]}
    assert want[17] != before[17]
    # Only a capabilities change reaches PCR 18.
    assert (want[18] != before[18]) == (update == "caps")
    # Without the new tboot the prediction is the old MLE hash: wrong for the new launch.
    assert predict_txt(log, comps)[17] == before[17]


def test_every_bank_of_the_mle_event_is_recomputed() -> None:
    log = eventlog.parse(log_of(Platform(), sample_modules(), ["sha1", "sha256"]))
    image = TbootImage.from_bytes(sample_tboot("tboot 1.10.6"))
    from qubes_seal.measure.predict import with_tboot
    from qubes_seal.measure.tboot import split_txt_log

    sinit, _ = split_txt_log(log)
    (mle,) = [e for e in with_tboot(sinit, NextTboot(image, b"a")) if e.event_type == 0x404]
    assert mle.digests == {"sha1": image.mle_hash(b"a", "sha1"),
                           "sha256": image.mle_hash(b"a", "sha256")}  # fmt: skip


def test_log_without_mle_event_refuses_a_tboot_prediction() -> None:
    """Some SINITs do not log the MLE hash: a tboot update cannot be predicted there."""
    events = [e for e in launch_events(Platform(), sample_modules()) if e.event_type != 0x404]
    log = eventlog.parse(eventlog.write(events, ["sha256"]))
    comps = [Component(m.name, m.cmdline, m.image) for m in sample_modules()]
    nxt = NextTboot(TbootImage.from_bytes(sample_tboot()), b"")
    with pytest.raises(Exception, match="no MLE_HASH event"):
        predict_txt(log, comps, tboot=nxt)


# --- Hostile tboot files (an evil maid writes /boot) ---------------------------------------------


def elf32(segments: list[tuple[int, int, int, int]], body: bytes = b"") -> bytes:
    """An ELF32 file with PT_LOAD ``segments`` (offset, paddr, filesz, memsz) and ``body``
    from offset 0x100."""
    ehdr = (
        b"\x7fELF\x01\x01\x01"
        + bytes(9)
        + struct.pack("<HHIIIIIHHHHHH", 2, 3, 1, 0, 52, 0, 0, 52, 32, len(segments), 40, 0, 0)
    )
    phdrs = b"".join(struct.pack("<IIIIIIII", 1, o, p, p, f, m, 7, 0x1000)
                     for o, p, f, m in segments)  # fmt: skip
    head = ehdr + phdrs
    return head + bytes(0x100 - len(head)) + body


def with_header(mle: tuple[int, int], cmd: tuple[int, int], size: int = 0x1000) -> bytes:
    body = bytearray(size)
    body[0:52] = struct.pack("<16s9I", MLE_HEADER_UUID, 52, 0x20001, 0, 0, *mle, 0x627, *cmd)
    return elf32([(0x100, 0x800000, size, size)], bytes(body))


HOSTILE: dict[str, tuple[bytes, type[Exception]]] = {
    "not-elf": (gzip.compress(b"tboot MLE"), NotAnMleImage),
    "no-header": (elf32([(0x100, 0x800000, 0x100, 0x100)], bytes(0x100)), NotAnMleImage),
    "truncated-gzip": (gzip.compress(elf32([]))[:-12], TbootImageError),
    "segment-beyond-file": (elf32([(0x100, 0x800000, 0x10000, 0x10000)]), TbootImageError),
    "filesz-over-memsz": (elf32([(0x100, 0x800000, 0x10, 0x8)], bytes(0x10)), TbootImageError),
    "huge-memsz": (elf32([(0x100, 0x800000, 0, 0xFFFFF000)]), TbootImageError),
    "segments-far-apart": (elf32([(0x100, 0, 0, 1), (0x100, 0xF0000000, 0, 1)]), TbootImageError),
    "no-segments": (elf32([]), TbootImageError),
    "mle-beyond-image": (with_header((0x100, 0x2000), (0x200, 0x300)), TbootImageError),
    "cmdline-outside-mle": (with_header((0x100, 0x800), (0x900, 0xA00)), TbootImageError),
    "empty-mle": (with_header((0x800, 0x800), (0x800, 0x800)), TbootImageError),
    "phdrs-beyond-file": (elf32([(0, 0, 0, 0)])[:60], TbootImageError),
    "gzip-bomb": (gzip.compress(bytes(MAX_MLE_IMAGE + 1)), ModuleTooLarge),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_tboot_file_is_refused_cleanly(name: str, tmp_path: Path) -> None:
    data, error = HOSTILE[name]
    with pytest.raises(error) as info:
        TbootImage.from_bytes(data, name=name)
    assert info.value.exit_code == 7
    path = tmp_path / "tboot.gz"
    path.write_bytes(data)
    with pytest.raises(error):
        TbootImage.from_file(path)


def test_predict_with_a_hostile_tboot_exits_7(swtpm: Swtpm, tmp_path: Path) -> None:
    log = tmp_path / "txt.log"
    log.write_bytes(log_of(Platform(), sample_modules()))
    bad = tmp_path / "tboot.gz"
    bad.write_bytes(HOSTILE["mle-beyond-image"][0])
    args = ["predict", "--txt-log", str(log), "--tboot", str(bad)]
    for m in sample_modules():
        (tmp_path / m.name).write_bytes(m.image)
        args += [f"--{m.name}", str(tmp_path / m.name), f"--{m.name}-cmdline", m.cmdline.decode()]
    res = run(swtpm.tcti, tmp_path, *args)
    assert res.code == 7 and "MLE range" in res.err


# --- The cycle on swtpm: boot, update tboot, predict, sign, reboot, unlock ------------------------

TBOOT_CMDLINE = "logging=serial,memory,vga"


def write_boot(modules: list[Module], tboot: bytes, tboot_cmdline: str, folder: Path,
               *, vouch_tboot: bool = True, grub_tboot_cmdline: str | None = None,
               ) -> list[str]:  # fmt: skip
    """The next boot's files in ``folder`` and the options naming them, vouched for as
    tests/test_predict.py's ``write_components`` does (a private RPM database owns the files,
    an /etc/default/grub gives the command lines), tboot included."""
    folder.mkdir(parents=True, exist_ok=True)
    args: list[str] = []
    files: dict[str, bytes] = {}
    for m in modules:
        path = folder / m.name
        data = gzip.compress(m.image) if m.name == "xen" else m.image
        path.write_bytes(data)
        files[str(path.resolve())] = data
        args += [f"--{m.name}", str(path), f"--{m.name}-cmdline", m.cmdline.decode()]
    tboot_path = folder / "tboot.gz"
    tboot_path.write_bytes(tboot)
    if vouch_tboot:
        files[str(tboot_path.resolve())] = tboot
    args += ["--tboot", str(tboot_path), "--tboot-cmdline", tboot_cmdline]
    db = packaged(folder, [Package("boot-components", "1", files)])
    xen, kernel = (m.cmdline.decode() for m in modules[:2])
    words = kernel.split()
    grub = default_grub(folder / "default-grub", {
        "GRUB_CMDLINE_XEN_DEFAULT": xen,
        "GRUB_QUBES_SEAL_ROOT": words[0].removeprefix("root="),
        "GRUB_CMDLINE_LINUX": " ".join(words[2:]),
        "GRUB_QUBES_SEAL_TBOOT_CMDLINE": (tboot_cmdline if grub_tboot_cmdline is None
                                          else grub_tboot_cmdline),
    })  # fmt: skip
    return [*args, "--rpm-dbpath", str(db), "--etc-default-grub", str(grub)]


def next_platforms() -> dict[str, Platform]:
    out = {"cmdline": Platform(tboot_cmdline=b"logging=memory min_ram=0x2000000"),
           "caps": Platform(tboot_image=sample_tboot("tboot 1.11.9", caps=0x4627))}  # fmt: skip
    if DEBIAN_TBOOT.exists():
        out["debian"] = Platform(tboot_image=DEBIAN_TBOOT.read_bytes(),
                                 tboot_cmdline=TBOOT_CMDLINE.encode())  # fmt: skip
    return out


@pytest.mark.parametrize("update", ["debian", "cmdline", "caps"])
def test_tboot_update_then_reboot_unlocks_without_recovery(
    swtpm: Swtpm, tmp_path: Path, update: str
) -> None:
    platforms = next_platforms()
    if update not in platforms:
        pytest.skip("Debian's tboot package is not installed")
    old = Platform(tboot_cmdline=TBOOT_CMDLINE.encode())
    new = platforms[update]
    modules = sample_modules()
    log = tmp_path / "txt.log"
    txt_launch(swtpm, modules, platform=old, log_path=log)  # boot with tboot A
    assert run(swtpm.tcti, tmp_path, "seal").code == 0
    opts = write_boot(modules, new.tboot_image, new.tboot_cmdline.decode(), tmp_path / "new")
    res = run(swtpm.tcti, tmp_path, "predict", "--txt-log", str(log), *opts, "--json")
    assert res.code == 0, res.err
    want = expected_pcrs(new, modules)
    assert res.json()["pcrs"]["sha256"] == {"17": want[17].hex(), "18": want[18].hex()}
    doc = res.json()["tboot"]
    assert doc["recomputed"] is True and doc["cmdline"] == new.tboot_cmdline.decode()
    assert doc["mle_caps"] == TbootImage.from_bytes(new.tboot_image).header.capabilities
    res = run(swtpm.tcti, tmp_path, "reseal", "--predict", "--txt-log", str(log), *opts)
    assert res.code == 0, res.err
    assert [s.label for s in state.load(tmp_path).pcr_states] == ["current", "predicted"]

    swtpm.reboot()  # reboot into the new tboot: unlocks, no recovery key
    txt_launch(swtpm, modules, platform=new, log_path=log)
    res = run(swtpm.tcti, tmp_path, "unseal", "--check")
    assert res.code == 0, res.err
    # A tboot other than the one predicted (its command line changed again) is refused.
    swtpm.reboot()
    other = Platform(tboot_image=new.tboot_image, tboot_cmdline=b"logging=vga")
    txt_launch(swtpm, modules, platform=other)
    assert run(swtpm.tcti, tmp_path, "unseal", "--check").code == 3


@pytest.mark.parametrize("attack", ["unvouched-image", "unvouched-cmdline"])
def test_evil_maids_tboot_is_not_approved_unattended(
    swtpm: Swtpm, tmp_path: Path, attack: str
) -> None:
    """An evil maid writes her own tboot.gz, or her own tboot command line, into /boot:
    reseal --predict (stdin not a terminal, as the unit runs it) refuses to sign, exit 7,
    and changes nothing."""
    log = tmp_path / "txt.log"
    txt_launch(swtpm, sample_modules(), log_path=log)
    assert run(swtpm.tcti, tmp_path, "seal").code == 0
    before = (tmp_path / "sealed.json").read_bytes()
    opts = write_boot(
        sample_modules(), sample_tboot("evil tboot"),
        "logging=memory,vga" if attack == "unvouched-cmdline" else TBOOT_CMDLINE,
        tmp_path / "new", vouch_tboot=attack != "unvouched-image",
        grub_tboot_cmdline=TBOOT_CMDLINE,
    )  # fmt: skip
    res = run(swtpm.tcti, tmp_path, "reseal", "--predict", "--txt-log", str(log), *opts)
    assert res.code == 7, res.err
    assert ("tboot command line" in res.err) == (attack == "unvouched-cmdline")
    assert (tmp_path / "sealed.json").read_bytes() == before


@pytest.mark.parametrize("tboot", ["new", "hostile"])
def test_grub_entry_tboot_line_is_predicted(swtpm: Swtpm, tmp_path: Path, tboot: str) -> None:
    """From the GRUB entry: 'multiboot2 /tboot.gz ARGS' gives the image and its command line.
    A broken tboot.gz there (an evil maid's) is refused, exit 7, not taken as unchanged."""
    modules = sample_modules()
    old = Platform(tboot_cmdline=TBOOT_CMDLINE.encode())
    log = tmp_path / "txt.log"
    txt_launch(swtpm, modules, platform=old, log_path=log)
    boot = tmp_path / "boot"
    boot.mkdir()
    new_image = sample_tboot("tboot 1.10.6")
    hostile = HOSTILE["cmdline-outside-mle"][0]
    (boot / "tboot.gz").write_bytes(new_image if tboot == "new" else hostile)
    (boot / "xen.gz").write_bytes(gzip.compress(modules[0].image))
    (boot / "vmlinuz").write_bytes(modules[1].image)
    (boot / "initramfs.img").write_bytes(modules[2].image)
    cfg = tmp_path / "grub.cfg"
    cfg.write_text(
        "menuentry 'Qubes (tboot)' {\n"
        "  multiboot2 /tboot.gz logging=memory 'min_ram=0x2000000'\n"
        f"  module2 /xen.gz {modules[0].cmdline.decode()}\n"
        f"  module2 /vmlinuz {modules[1].cmdline.decode()}\n"
        "  module2 --nounzip /initramfs.img\n}\n"
    )
    res = run(swtpm.tcti, tmp_path, "predict", "--txt-log", str(log), "--grub-cfg", str(cfg),
              "--entry", "Qubes (tboot)", "--boot-dir", str(boot), "--json")  # fmt: skip
    if tboot == "hostile":
        assert res.code == 7 and "command-line buffer" in res.err
        return
    assert res.code == 0, res.err
    new = Platform(tboot_image=new_image, tboot_cmdline=b"logging=memory min_ram=0x2000000")
    want = expected_pcrs(new, modules)
    assert res.json()["pcrs"]["sha256"] == {"17": want[17].hex(), "18": want[18].hex()}


@needs_debian_tboot
def test_reseal_unit_handles_a_tboot_update(swtpm: Swtpm, tmp_path: Path) -> None:
    """The path unit's job after Debian's tboot.gz replaced the old one in /boot: it
    predicts the new MLE hash from grub.cfg's multiboot2 line, signs, and the reboot into
    the new tboot unlocks."""
    from test_grub_snippets import DEFAULT_GRUB, LINUX_WORDS, XEN_WORDS
    from test_reseal_units import REPO, run_wrapper, setup_machine

    from qubes_seal.measure.tboot import grub_module_string, load_module_image

    m = setup_machine(tmp_path)
    boot = m["boot"]
    kernel, initramfs = (
        "vmlinuz-6.12.9-1.qubes.fc37.x86_64",
        "initramfs-6.12.9-1.qubes.fc37.x86_64.img",
    )
    next_modules = [
        Module("xen", grub_module_string(XEN_WORDS), load_module_image(boot / "xen-4.19.1.gz")),
        Module("kernel", grub_module_string(LINUX_WORDS), (boot / kernel).read_bytes()),
        Module("initramfs", b"", (boot / initramfs).read_bytes()),
    ]  # fmt: skip
    old = Platform(tboot_cmdline=TBOOT_CMDLINE.encode())
    txt_launch(swtpm, next_modules, platform=old, log_path=m["log"])  # today's boot
    assert run(swtpm.tcti, m["state"], "seal", "--force").code == 0
    shutil.copyfile(DEBIAN_TBOOT, boot / "tboot.gz")  # the tboot update
    cli = m["bin"] / "qubes-seal"
    cli.write_text(f'#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m qubes_seal '
                   f'--tpm {swtpm.tcti} "$@"\n')  # fmt: skip
    grub = {k: v for k, v in DEFAULT_GRUB.items() if k != "GRUB_DEVICE"}
    grub["GRUB_QUBES_SEAL_ROOT"] = DEFAULT_GRUB["GRUB_DEVICE"]
    dom0 = {"QUBES_SEAL_ETC_DEFAULT_GRUB": str(default_grub(tmp_path / "default-grub", grub)),
            "QUBES_SEAL_RPM_DBPATH": str(tmp_path / "no-rpm-database")}  # fmt: skip
    files = [boot / "tboot.gz", boot / "xen-4.19.1.gz", boot / kernel, boot / initramfs]
    assert run(swtpm.tcti, m["state"], "vouch", "record", *map(str, files)).code == 0
    res = run_wrapper(m, **dom0)
    assert res.returncode == 0, res.stderr
    swtpm.reboot()
    new = Platform(tboot_image=DEBIAN_TBOOT.read_bytes(), tboot_cmdline=TBOOT_CMDLINE.encode())
    txt_launch(swtpm, next_modules, platform=new)
    res2 = run(swtpm.tcti, m["state"], "unseal", "--check")
    assert res2.code == 0, res2.err


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({}, b"logging=serial,memory,vga"),
        ({"GRUB_CMDLINE_TBOOT": "logging=vga"}, b"logging=vga"),
        ({"GRUB_CMDLINE_TBOOT": "logging=vga", "GRUB_QUBES_SEAL_TBOOT_CMDLINE": ""}, b""),
        ({"GRUB_QUBES_SEAL_TBOOT_CMDLINE": "a 'b c'"}, b'a "b c"'),
    ],
    ids=["default", "debian-variable", "ours-set-empty-wins", "quoted"],
)
def test_tboot_command_line_dom0_vouches_for(
    tmp_path: Path, values: dict[str, str], expected: bytes
) -> None:
    """The tboot command line dom0 vouches for is the one 20_qubes_seal_tboot writes."""
    from qubes_seal.measure.vouch import dom0_cmdlines

    path = default_grub(tmp_path / "default-grub", values)
    assert dom0_cmdlines(path).expected("tboot") == expected


# --- The real machine's two boots: a tboot change changes only MLE_HASH among SINIT's events ---

SECOND_BOOT = REAL / (
    "tbootdevel_2022-03-11_skylake-0x506e3_tboot-tip-9c625ab2035b_tpm2_serial_launch-OK.txt"
)


def tcg_events(path: Path) -> list[eventlog.Event]:
    """The TCG events tboot printed (txt-stat or serial console) for a TPM 2.0 launch."""
    events: list[eventlog.Event] = []
    lines = [line.removeprefix("TBOOT:").strip() for line in path.read_text().splitlines()]
    i = 0
    while i < len(lines):
        if lines[i] != "TCG Event:":
            i += 1
            continue
        pcr = int(lines[i + 1].split(":")[1])
        event_type = int(lines[i + 2].split(":")[1], 16)
        count = int(lines[i + 3].split(":")[1])
        digests = {lines[i + 4 + 2 * k].rstrip(":").lower(): bytes.fromhex(lines[i + 5 + 2 * k])
                   for k in range(count)}  # fmt: skip
        i += 4 + 2 * count
        size = int(lines[i].split(":")[1].split()[0])
        data, i = b"", i + 1
        while len(data) < size:
            data += bytes.fromhex(lines[i])
            i += 1
        events.append(eventlog.Event(pcr, event_type, digests, data[:size]))
    return events


class KnownMle:
    """A tboot whose MLE hashes are known (the binaries of those boots are not published)."""

    def __init__(self, digests: dict[str, bytes], capabilities: int) -> None:
        self.digests = digests
        self.header = type("Header", (), {"capabilities": capabilities})()

    def mle_hash(self, cmdline: bytes, bank: str = "sha256") -> bytes:
        return self.digests[bank]


@pytest.mark.skipif(not SECOND_BOOT.exists(), reason=f"no real-drtm test data at {REAL}")
def test_real_second_boot_differs_from_the_first_only_by_what_is_predicted() -> None:
    """Same machine, another tboot build (same MLE header capabilities, 0x627): replacing the
    first boot's MLE_HASH with the second's gives exactly the second boot's SINIT events, in
    both banks, and its PCR 18 (the value the README derives: identical in both boots)."""
    from qubes_seal.measure.predict import with_tboot
    from qubes_seal.measure.tboot import split_txt_log

    first, second = tcg_events(DUMP), tcg_events(SECOND_BOOT)
    assert len(first) == len(second) == 20
    sinit1, _ = split_txt_log(eventlog.EventLog(first, ["sha1", "sha256"], "crypto-agile"))
    sinit2, tboot2 = split_txt_log(eventlog.EventLog(second, ["sha1", "sha256"], "crypto-agile"))
    (mle2,) = [e for e in sinit2 if e.event_type == 0x404]
    new = NextTboot(KnownMle(mle2.digests, 0x627), b"logging=serial,memory,vga")  # type: ignore[arg-type]
    predicted = with_tboot(sinit1, new)
    assert predicted == sinit2
    assert predicted != sinit1
    drtm = [e for e in [*predicted, *tboot2] if e.pcr in (17, 18)]
    pcrs = eventlog.replay(eventlog.EventLog(drtm, ["sha1", "sha256"], "crypto-agile"), drtm=True)
    assert pcrs["sha256"][18].hex().startswith("add552b58f6ed359")
    assert pcrs["sha1"][18].hex().startswith("4e1da12b44ae4074")
    assert pcrs["sha256"][17].hex().startswith("458431542b2a2e77")  # the second boot's PCR 17


@needs_debian_tboot
def test_signed_container_tboot_update_unlocks_without_recovery(box: Box) -> None:
    """The signed path: a container initialised on tboot A; Debian's tboot.gz with its
    default command line is predicted and signed (the sealed object unchanged), the reboot
    into it unlocks with the passphrase alone, and tboot A is refused once it is dropped."""
    from qubes_seal import chain
    from qubes_seal.luks.container import Container

    log = box.dir / "txt.log"
    box.swtpm.reboot()
    txt_launch(box.swtpm, sample_modules(), log_path=log)  # tboot A: the default platform
    assert box.unlock().code == 0
    before = chain.read_token(Container(box.container))[1]
    new = Platform(tboot_image=DEBIAN_TBOOT.read_bytes(), tboot_cmdline=TBOOT_CMDLINE.encode())
    opts = write_boot(sample_modules(), new.tboot_image, TBOOT_CMDLINE, box.dir / "new")
    res = box.cli("reseal", "--predict", "--txt-log", str(log), *opts)
    assert res.code == 0, res.err
    after = chain.read_token(Container(box.container))[1]
    assert (after.sealed.public, after.sealed.private) == (before.sealed.public,
                                                           before.sealed.private)  # fmt: skip
    assert [s.label for s in after.sealed.pcr_states] == ["current", "predicted"]
    want = expected_pcrs(new, sample_modules())
    assert after.sealed.pcr_states[1].values[17] == want[17]
    chain.lock(box.container)
    box.swtpm.reboot()
    txt_launch(box.swtpm, sample_modules(), platform=new)  # the new tboot
    res = box.unlock()
    assert res.code == 0, res.err
    assert box.cli("reseal").code == 0  # drop tboot A
    chain.lock(box.container)
    box.boot()  # tboot A again: no longer signed
    assert box.unlock().code == 3
