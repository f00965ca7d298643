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
change measures the same; change a field to simulate a SINIT or BIOS update.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from ..measure import eventlog, tboot
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


@dataclass(frozen=True)
class Platform:
    """The fixed parts of a launch: the SINIT ACM, the tboot image and its policy."""

    sinit: bytes = b"simulated SINIT ACM for a simulated Intel platform, revision 1"
    tboot_image: bytes = b"simulated tboot 1.10.5 MLE"
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
    caps = _h(b"OS-SINIT data capabilities")
    lcp_control = _h(b"launch control policy: none (platform default)")
    nv_info = _h(b"TPM NV info")
    return [
        _ev(17, 0x40A, _h(p.bios_acm)),  # BIOSAC_REG_DATA
        _ev(17, 0x40B, cpu),  # CPU_SCRTM_STAT
        _ev(17, 0x40C, lcp_control),  # LCP_CONTROL_HASH
        _ev(17, 0x412, _h(b"LCP details: none")),  # LCP_DETAILS_HASH
        _ev(17, 0x40E, bytes(32)),  # STM_HASH: no STM
        _ev(17, 0x40F, caps),  # OSSINITDATA_CAP_HASH
        _ev(17, 0x404, _h(p.tboot_image + p.tboot_cmdline)),  # MLE_HASH: tboot + cmdline
        _ev(17, 0x414, nv_info),  # NV_INFO_HASH
        _ev(18, 0x410, _h(p.sinit_pubkey)),  # SINIT_PUBKEY_HASH
        _ev(18, 0x40B, cpu),  # CPU_SCRTM_STAT
        _ev(18, 0x40F, caps),  # OSSINITDATA_CAP_HASH
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


def txt_launch(
    swtpm: Swtpm,
    modules: list[Module],
    *,
    platform: Platform | None = None,
    log_path: Path | None = None,
) -> LaunchResult:
    """Perform the launch on ``swtpm`` and return its events, expected PCRs and event log.

    ``modules`` are tboot's modules in order: Xen first, then dom0's kernel and initramfs.
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
    return LaunchResult(events=events, expected=expected_pcrs(platform, modules), log=log)


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
