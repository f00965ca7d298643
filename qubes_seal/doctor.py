"""``qubes-seal doctor``: every check a careful installer makes, each with a verdict and a fix.

Each check is a small function of a :class:`Context` returning a :class:`Check`:

- ``ok`` True: fine; True with a ``fix``: fine but worth a look (a warning);
- ``ok`` False: something to fix, and ``fix`` says how;
- ``ok`` None: could not be checked, ``summary`` says why (no TPM to ask, no /dev/mem, a
  file that cannot be read).

Files are read under ``Context.root`` (``/`` on the machine itself; a mounted dom0 disk or a
test's tree otherwise).  Nothing here writes anything or asks the TPM for more than its
properties and the SRK's public part.  The TXT registers are read through
:mod:`qubes_seal.measure.txt_heap`, and never believed on their own: without SMX, or with
TXT off, they are garbage (``txt-stat`` then says "TXT measured launch: TRUE" on machines
that cannot launch at all: real-drtm nuc8i7hvk, icelake-495), so the verdict is then "TXT
not available", whatever TXT.STS says.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import struct
import subprocess
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import QubesSealError
from .measure import txt_heap

DEFAULT_CONTAINER = "var/lib/qubes-seal/keys.luks"
GRUB_ENTRY_ID = "qubes-seal-tboot"
#: Files of our dracut module, as they appear inside an initramfs.
INITRAMFS_MARKERS = ("qubes-seal-unlock.service", "qubes_seal/")
#: The units ``systemctl enable`` links, and the target whose .wants holds each.
UNITS = {
    "qubes-seal-keyd.service": "multi-user.target.wants",
    "qubes-seal-reseal.path": "paths.target.wants",
}
#: Files the Qubes anti-evil-maid package installs (any one is enough).
AEM_FILES = (
    "usr/sbin/anti-evil-maid-seal",
    "usr/sbin/anti-evil-maid-unseal",
    "etc/anti-evil-maid.conf",
    "usr/lib/systemd/system/anti-evil-maid-seal.service",
    "usr/lib/systemd/system/anti-evil-maid-unseal.service",
    "usr/lib/dracut/modules.d/90anti-evil-maid",
)
#: The bounds of what an initramfs scan reads and decompresses.
MAX_INITRAMFS = 512 * 1024 * 1024
#: ACM files in /boot are ~64-300 KiB; anything far larger is not one.
MAX_ACM_SIZE = 4 * 1024 * 1024


@dataclass
class Check:
    id: str
    ok: bool | None
    summary: str
    fix: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "ok": self.ok, "summary": self.summary, "fix": self.fix}


@dataclass
class Context:
    root: Path = Path("/")
    mem: str = txt_heap.DEV_MEM
    tcti: str = "device:/dev/tpmrm0"
    container: Path | None = None
    socket: Path | None = None
    _cache: dict[str, Any] = field(default_factory=dict)

    def path(self, rel: str) -> Path:
        return self.root / rel.lstrip("/")

    @property
    def on_this_machine(self) -> bool:
        return self.root.resolve() == Path("/")

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


# --- TPM -------------------------------------------------------------------------------------


@dataclass
class TpmFacts:
    error: str = ""
    da: dict[str, int | bool] = field(default_factory=dict)
    srk_name: bytes | None = None


def _tpm_facts(ctx: Context) -> TpmFacts:
    from .tpm.device import Tpm

    facts = TpmFacts()
    try:
        with Tpm(ctx.tcti) as tpm:
            facts.da = tpm.da_status()
            srk = tpm.find_srk()
            facts.srk_name = srk.name if srk is not None else None
    except QubesSealError as exc:
        facts.error = exc.message
    return facts


def check_tpm(ctx: Context) -> Check:
    facts: TpmFacts = ctx.cached("tpm", lambda: _tpm_facts(ctx))
    if facts.error:
        return Check(
            "tpm",
            False,
            f"no TPM 2.0 reachable through {ctx.tcti}: {facts.error}",
            "Enable the TPM in the firmware set up, in TPM 2.0 mode (not 1.2), and check "
            "that /dev/tpmrm0 exists (modules tpm_tis or tpm_crb); or give the right TCTI "
            "with --tpm.",
        )
    return Check("tpm", True, f"TPM 2.0 reachable through {ctx.tcti}")


def check_tpm_lockout(ctx: Context) -> Check:
    facts: TpmFacts = ctx.cached("tpm", lambda: _tpm_facts(ctx))
    if facts.error:
        return Check("tpm-lockout", None, "not checked: no TPM reachable")
    da = facts.da
    tries = f"{da['failed_tries']}/{da['max_tries']} failed authorizations"
    if da["in_lockout"]:
        wait = int(da["next_try_within_seconds"])
        when = (
            f"it recovers by itself within {wait} s of powered-on time"
            if wait >= 0
            else "it does not recover by itself (recovery interval 0)"
        )
        return Check(
            "tpm-lockout",
            False,
            f"the TPM is in dictionary-attack lockout ({tries}): every unlock is refused; {when}",
            "Wait for the recovery (leave the machine powered on), or clear it with the "
            "lockout authorization: 'qubes-seal tpm reset-lockout' (after a recovery-key "
            "unlock) or tpm2_dictionarylockout --clear-lockout.",
        )
    return Check("tpm-lockout", True, f"not in lockout ({tries})")


def check_tpm_lockout_auth(ctx: Context) -> Check:
    from .lockout import FIX

    facts: TpmFacts = ctx.cached("tpm", lambda: _tpm_facts(ctx))
    if facts.error:
        return Check("tpm-lockout-auth", None, "not checked: no TPM reachable")
    if facts.da["lockout_auth_set"]:
        return Check("tpm-lockout-auth", True, "the lockout authorization is set")
    return Check(
        "tpm-lockout-auth",
        True,
        "WARNING: the lockout authorization is empty: anyone who reaches the TPM can reset "
        "the dictionary-attack counter and guess passphrases without limit",
        f"{FIX} (once the container is unlocked; the value is kept in the keystore)",
    )


def _pinned_srk(ctx: Context) -> tuple[bytes | None, str]:
    """The SRK name the container's token pins, or None with the reason."""
    path = _container_path(ctx)
    if not path.exists():
        return None, f"no container at {path}"
    from . import chain
    from .luks.container import Container

    try:
        return chain.read_token(Container(path))[1].sealed.srk_name, ""
    except QubesSealError as exc:
        return None, f"the container's token cannot be read: {exc.message}"


def check_srk(ctx: Context) -> Check:
    facts: TpmFacts = ctx.cached("tpm", lambda: _tpm_facts(ctx))
    if facts.error:
        return Check("srk", None, "not checked: no TPM reachable")
    pinned, why = _pinned_srk(ctx)
    have = facts.srk_name
    if pinned is None:
        if have is None:
            return Check("srk", True, f"no SRK at 0x81000001 yet ({why}): 'init' creates it")
        return Check("srk", True, f"SRK present at 0x81000001 ({why}, nothing pins it)")
    if have is None:
        return Check(
            "srk",
            False,
            "the container's token pins an SRK, but 0x81000001 is empty: the TPM was "
            "cleared (or the key evicted), so the sealed secret is gone",
            "Unlock with the recovery key, then 'qubes-seal repair' seals again to this TPM "
            "(see docs/RECOVERY.md).",
        )
    if have != pinned:
        return Check(
            "srk",
            False,
            f"the SRK at 0x81000001 ({have.hex()[:16]}...) is not the one the token pins "
            f"({pinned.hex()[:16]}...): the TPM was cleared, or another key was put there",
            "Unlock with the recovery key, then 'qubes-seal repair' seals to this TPM's SRK.",
        )
    return Check("srk", True, f"SRK at 0x81000001 as pinned by the token ({have.hex()[:16]}...)")


# --- CPU and TXT -----------------------------------------------------------------------------


def _cpu_flags(ctx: Context) -> tuple[set[str] | None, str, str]:
    """(flags of the first CPU, vendor, error)."""
    path = ctx.path("proc/cpuinfo")
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return None, "", f"cannot read {path}: {exc.strerror}"
    flags: set[str] | None = None
    vendor = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "vendor_id" and not vendor:
            vendor = value.strip()
        if key == "flags" and flags is None:
            flags = set(value.split())
    if flags is None:
        return None, vendor, f"{path} has no 'flags' line"
    return flags, vendor, ""


def _under_xen(ctx: Context) -> bool:
    """dom0 (or any Xen guest): Xen's CPUID policy hides SMX from its guests' cpuinfo."""
    try:
        kind = ctx.path("sys/hypervisor/type").read_text().strip()
    except OSError:
        kind = ""
    return kind == "xen" or ctx.path("proc/xen").is_dir()


def _smx(ctx: Context) -> bool | None:
    """The CPU has SMX: True, False, or None when unknown (no cpuinfo; under Xen, which
    hides the flag from dom0 whether or not the CPU has it)."""
    flags, _, _ = _cpu_flags(ctx)
    if flags is None:
        return None
    if "smx" in flags:
        return True
    return None if _under_xen(ctx) else False


def check_smx(ctx: Context) -> Check:
    flags, vendor, error = _cpu_flags(ctx)
    if flags is None:
        return Check("cpu-smx", None, f"not checked: {error}")
    if "smx" in flags:
        return Check("cpu-smx", True, "the CPU has SMX (safer mode extensions, GETSEC)")
    if vendor != "AuthenticAMD" and _under_xen(ctx):
        return Check(
            "cpu-smx",
            None,
            "not checked: under Xen, dom0's /proc/cpuinfo never shows 'smx' (Xen hides it "
            "from its guests); txt-enabled and txt-launch read the hardware instead",
        )
    if vendor == "AuthenticAMD":
        return Check(
            "cpu-smx",
            False,
            "an AMD CPU: no Intel TXT (AMD's SKINIT is not what tboot uses)",
            "qubes-seal's measured launch needs an Intel CPU with TXT (vPro); on this "
            "machine it cannot seal to a DRTM.",
        )
    return Check(
        "cpu-smx",
        False,
        "the CPU does not report SMX: no GETSEC[SENTER], so no TXT launch is possible",
        "Use a TXT-capable (vPro) CPU. If it is one, SMX is hidden when TXT is disabled "
        "in the firmware set up: enable Intel TXT (and VT-d, VT-x) there. Under Xen, dom0's "
        "/proc/cpuinfo may hide SMX: check with the hypervisor's 'xl info' or before Xen.",
    )


@dataclass
class TxtFacts:
    smx: bool | None
    state: txt_heap.TxtState | None = None
    error: str = ""
    corrupt: str = ""


def _txt_facts(ctx: Context) -> TxtFacts:
    facts = TxtFacts(smx=_smx(ctx))
    try:
        facts.state = txt_heap.read_state(ctx.mem)
    except txt_heap.TxtHeapError as exc:
        facts.corrupt = exc.message
        with contextlib.suppress(QubesSealError):  # the registers alone: verdict, DIDVID
            facts.state = txt_heap.TxtState(ctx.mem, txt_heap.registers_at(ctx.mem))
    except QubesSealError as exc:
        facts.error = exc.message
    return facts


def _txt_enabled(facts: TxtFacts) -> bool:
    """TXT is on: the heap the BIOS sets up (zero when TXT is off, and on the real machines
    whose registers are garbage), and SMX unless it cannot be known (under Xen)."""
    regs = facts.state.registers if facts.state else None
    return bool(facts.smx is not False and regs is not None and regs.heap_base and regs.heap_size)


def check_txt_enabled(ctx: Context) -> Check:
    facts: TxtFacts = ctx.cached("txt", lambda: _txt_facts(ctx))
    if facts.smx is False:
        return Check(
            "txt-enabled",
            False,
            "TXT not available: the CPU has no SMX (the TXT registers, if any read, are "
            "garbage then)",
            "See cpu-smx: a TXT-capable CPU with TXT enabled in the firmware.",
        )
    if facts.state is None:
        return Check("txt-enabled", None, f"not checked: {facts.error}")
    regs = facts.state.registers
    if not (regs.heap_base and regs.heap_size):
        return Check(
            "txt-enabled",
            False,
            "TXT not available: TXT.HEAP.BASE/SIZE are zero, so the firmware did not set TXT "
            "up (disabled, or not a vPro platform); its status registers mean nothing then",
            "Enable Intel TXT in the firmware set up (it usually needs VT-x, VT-d and the "
            "TPM enabled first); a non-vPro chipset cannot.",
        )
    if facts.smx is None:
        return Check(
            "txt-enabled",
            True,
            f"TXT enabled: heap {regs.heap_base:#x} ({regs.heap_size:#x} bytes), chipset "
            f"DIDVID {regs.didvid:#x} (SMX not visible here: under Xen, or no cpuinfo)",
        )
    return Check(
        "txt-enabled",
        True,
        f"TXT enabled: heap {regs.heap_base:#x} ({regs.heap_size:#x} bytes), SINIT region "
        f"{regs.sinit_base:#x}, chipset DIDVID {regs.didvid:#x}",
    )


#: What to do for the ACM error classes tboot's decoder names.
def _error_fix(code: int) -> str:
    kind = code & 0x3FFFFFFF
    progress = (kind >> 4) & 0x3F
    base = (
        "Look the code up in the SINIT ACM's error table (Intel publishes one with each "
        "ACM) and the tboot log (txt-stat, or 'logging=serial,memory'). "
    )
    if not code & (1 << 30):
        return base + "A processor error: update the BIOS and the CPU microcode."
    if progress == 0x10:
        return base + "A TPM error during the launch: clear or update the TPM firmware."
    return base + (
        "The usual causes: a SINIT ACM that does not match the chipset or is too old "
        "(see 'sinit'), TXT/VT-d settings in the firmware, a launch control policy in "
        "the TPM's NV that refuses this MLE, or memory (PMR/DMA) configuration."
    )


def check_txt_launch(ctx: Context) -> Check:
    facts: TxtFacts = ctx.cached("txt", lambda: _txt_facts(ctx))
    if facts.state is None and facts.smx is not False:
        return Check("txt-launch", None, f"not checked: {facts.error}")
    if not _txt_enabled(facts):
        why = "no SMX" if facts.smx is False else "TXT is off"
        sts = f" (TXT.STS reads {facts.state.registers.sts:#x}: garbage)" if facts.state else ""
        return Check(
            "txt-launch",
            False,
            f"TXT not available ({why}): no measured launch is possible{sts}",
            "Fix cpu-smx and txt-enabled first.",
        )
    assert facts.state is not None
    regs = facts.state.registers
    code = regs.errorcode
    decoded = txt_heap.decode_errorcode(code)
    if facts.corrupt:
        return Check(
            "txt-launch",
            False,
            f"TXT says SENTER done, but the heap is not a launch's: {facts.corrupt}",
            "Do not trust this boot: reboot, and if it persists, look for something writing "
            "the TXT heap (an evil maid's firmware or boot loader).",
        )
    if regs.senter_done and not facts.state.no_launch:
        return Check(
            "txt-launch",
            True,
            f"launched: SENTER done, the TXT event log is in the heap "
            f"({len(facts.state.log)} bytes)",
        )
    if code & (1 << 31):
        return Check(
            "txt-launch",
            False,
            f"the last launch failed: TXT.ERRORCODE {code:#010x}: {decoded}",
            _error_fix(code),
        )
    if regs.senter_done:
        return Check(
            "txt-launch",
            False,
            f"SENTER done but no event log: {facts.state.no_launch}",
            "tboot is too old for a TPM 2.0 log (use tboot >= 1.9.12), or the launch did "
            "not complete; see the tboot log.",
        )
    return Check(
        "txt-launch",
        False,
        "no measured launch in this boot (SENTER not done, no error code): tboot did not "
        "run, or gave up before SENTER",
        "Boot the qubes-seal (tboot) GRUB entry (see grub-entry, grub-default); if you did, "
        "read tboot's log (txt-stat) for why it fell through (no SINIT ACM, 'CPU does not "
        "support SMX', TPM not found).",
    )


# --- /boot: tboot, SINIT, GRUB, initramfs --------------------------------------------------


def _grub_default_file(ctx: Context) -> dict[str, str]:
    values: dict[str, str] = {}
    try:
        text = ctx.path("etc/default/grub").read_text(errors="replace")
    except OSError:
        return values
    for line in text.splitlines():
        m = re.match(r"\s*(?:export\s+)?([A-Z_][A-Z0-9_]*)=(.*)$", line)
        if m:
            values[m.group(1)] = m.group(2).strip().strip("'\"")
    return values


def check_tboot(ctx: Context) -> Check:
    name = _grub_default_file(ctx).get("GRUB_QUBES_SEAL_TBOOT", "tboot.gz")
    for rel in (f"boot/{name}", "boot/tboot.gz", "boot/tboot"):
        if ctx.path(rel).is_file():
            return Check("tboot", True, f"tboot installed: /{rel}")
    return Check(
        "tboot",
        False,
        f"no tboot in /boot (looked for {name})",
        "sudo qubes-dom0-update tboot (Fedora's package installs /boot/tboot.gz), then "
        "grub2-mkconfig -o /boot/grub2/grub.cfg.",
    )


@dataclass(frozen=True)
class AcmInfo:
    path: Path
    sinit: bool
    chipsets: tuple[tuple[int, int, int, int], ...]  # (flags, vendor, device, revision)


#: acm_info_table_t's UUID (ACM_UUID_V3, tboot include/txt/acmod.h) as it lies in memory.
ACM_UUID_V3 = struct.pack("<IHHH6s", 0x7FC03AAA, 0x46A7, 0x18DB, 0xAC2E,
                          bytes([0x69, 0x8F, 0x8D, 0x41, 0x7F, 0x5A]))  # fmt: skip
ACM_TYPE_CHIPSET = 2
ACM_CHIPSET_TYPE_SINIT = 1


def parse_acm(data: bytes, path: Path) -> AcmInfo | None:
    """An Intel ACM's type and chipset ID list, or None when ``data`` is not one.

    acm_hdr_t: module_type u16 at 0 (2), header_len u32 at 4 and scratch_size u32 at 124
    (both in 4-byte units), module_vendor u32 at 16 (0x8086); the info table at
    (header_len + scratch_size) * 4: UUID, chipset_acm_type u8, version u8, length u16,
    chipset_id_list u32 (an offset in the ACM): count u32, then 16-byte entries (flags u32,
    vendor u16, device u16, revision u16, reserved u16, extended u32).  Every offset is
    checked against the file's size.
    """
    if len(data) < 128 + 4:
        return None
    module_type, _, header_len = struct.unpack_from("<HHI", data, 0)
    vendor = struct.unpack_from("<I", data, 16)[0]
    scratch = struct.unpack_from("<I", data, 124)[0]
    if module_type != ACM_TYPE_CHIPSET or vendor != 0x8086:
        return None
    info = (header_len + scratch) * 4
    if info + 24 > len(data):
        return None
    if data[info : info + 16] != ACM_UUID_V3:
        return None
    acm_type = data[info + 16]
    list_off = struct.unpack_from("<I", data, info + 20)[0]
    chipsets: list[tuple[int, int, int, int]] = []
    if list_off + 4 <= len(data):
        count = struct.unpack_from("<I", data, list_off)[0]
        if list_off + 4 + 16 * count <= len(data):
            for i in range(count):
                flags, vid, did, rid = struct.unpack_from("<IHHH", data, list_off + 4 + 16 * i)
                chipsets.append((flags, vid, did, rid))
    return AcmInfo(path, acm_type == ACM_CHIPSET_TYPE_SINIT, tuple(chipsets))


def acm_matches(acm: AcmInfo, didvid: int) -> bool:
    """tboot's does_acmod_match_platform for the chipset list: vendor and device equal;
    the revision equal, or (flags bit 0) sharing a bit with the chipset's."""
    vid, did, rid = didvid & 0xFFFF, (didvid >> 16) & 0xFFFF, (didvid >> 32) & 0xFFFF
    for flags, v, d, r in acm.chipsets:
        if v == vid and d == did and ((r & rid) != 0 if flags & 1 else r == rid):
            return True
    return False


def _find_acms(ctx: Context) -> list[AcmInfo]:
    boot = ctx.path("boot")
    found: list[AcmInfo] = []
    try:
        entries = sorted(boot.iterdir())
    except OSError:
        return found
    for entry in entries:
        try:
            if not entry.is_file() or entry.stat().st_size > MAX_ACM_SIZE:
                continue
            with entry.open("rb") as f:
                head = f.read(2)
                if head != b"\x02\x00":  # module_type 2, little-endian: cheap first filter
                    continue
                data = head + f.read(MAX_ACM_SIZE)
        except OSError:
            continue
        acm = parse_acm(data, entry)
        if acm is not None and acm.sinit:
            found.append(acm)
    return found


def _bios_sinit_size(ctx: Context, regs: txt_heap.TxtRegisters) -> int | None:
    """BiosData's bios_sinit_size (its first u32 after the version): a SINIT in the BIOS."""
    try:
        fd = os.open(ctx.mem, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        raw = os.pread(fd, 16, regs.heap_base)
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(raw) < 16:
        return None
    size, _version, sinit_size = struct.unpack("<QII", raw)
    if size < 16 or size > regs.heap_size:
        return None
    return int(sinit_size)


def check_sinit(ctx: Context) -> Check:
    acms = _find_acms(ctx)
    facts: TxtFacts = ctx.cached("txt", lambda: _txt_facts(ctx))
    regs = facts.state.registers if facts.state and _txt_enabled(facts) else None
    bios = _bios_sinit_size(ctx, regs) if regs is not None else None
    names = ", ".join(a.path.name for a in acms)
    if regs is None:
        if acms:
            return Check(
                "sinit",
                None,
                f"SINIT ACM present in /boot ({names}), not matched: the chipset's "
                "TXT.DIDVID cannot be read (TXT off, or no /dev/mem)",
            )
        return Check(
            "sinit",
            False,
            "no SINIT ACM in /boot, and whether the BIOS carries one cannot be read",
            "Download the SINIT ACM for this platform from Intel (Trusted Execution "
            "Technology SINIT ACMs) and copy its .BIN into /boot; our GRUB entry passes it.",
        )
    didvid = regs.didvid
    matching = [a for a in acms if acm_matches(a, didvid)]
    if matching:
        return Check(
            "sinit",
            True,
            f"SINIT ACM {matching[0].path.name} matches this chipset (DIDVID {didvid:#x})",
        )
    if bios:
        return Check(
            "sinit",
            True,
            f"the BIOS carries a SINIT ACM ({bios} bytes)"
            + (f"; the ones in /boot ({names}) do not match DIDVID {didvid:#x}" if acms else ""),
        )
    if acms:
        return Check(
            "sinit",
            False,
            f"SINIT ACMs in /boot ({names}) do not list this chipset (DIDVID {didvid:#x}: "
            f"vendor {didvid & 0xFFFF:#x}, device {(didvid >> 16) & 0xFFFF:#x}), and the BIOS "
            "carries none",
            "Get the SINIT ACM for this chipset generation from Intel and put it in /boot "
            "(GRUB_QUBES_SEAL_SINIT in /etc/default/grub picks which ones the entry passes).",
        )
    return Check(
        "sinit",
        False,
        f"no SINIT ACM in /boot and none in the BIOS (DIDVID {didvid:#x})",
        "Download the SINIT ACM for this platform from Intel and copy its .BIN into /boot; "
        "then grub2-mkconfig -o /boot/grub2/grub.cfg.",
    )


GRUB_CFGS = ("boot/grub2/grub.cfg", "boot/grub/grub.cfg", "boot/efi/EFI/qubes/grub.cfg")


def _grub_cfg(ctx: Context) -> tuple[Path | None, str]:
    for rel in GRUB_CFGS:
        p = ctx.path(rel)
        try:
            return p, p.read_text(errors="replace")
        except OSError:
            continue
    return None, ""


_MENUENTRY = re.compile(r"^(menuentry|submenu)\s+('[^']*'|\"[^\"]*\"|\S+)(.*)$")


def _menu(text: str) -> list[tuple[str, str, str]]:
    """Top-level entries of a grub.cfg: (kind, title, id)."""
    entries: list[tuple[str, str, str]] = []
    depth = 0
    for line in text.splitlines():
        stripped = line.strip()
        m = _MENUENTRY.match(stripped)
        if m and depth == 0:
            idm = re.search(r"\$menuentry_id_option\s+('[^']*'|\"[^\"]*\"|\S+)", m.group(3))
            ident = idm.group(1).strip("'\"") if idm else ""
            entries.append((m.group(1), m.group(2).strip("'\""), ident))
        depth += stripped.count("{") - stripped.count("}") if not stripped.startswith("#") else 0
    return entries


def _ours(entry: tuple[str, str, str]) -> bool:
    return entry[2].startswith(GRUB_ENTRY_ID)


def check_grub_entry(ctx: Context) -> Check:
    path, text = _grub_cfg(ctx)
    if path is None:
        return Check(
            "grub-entry",
            False,
            "no grub.cfg in /boot/grub2, /boot/grub or /boot/efi/EFI/qubes",
            "grub2-mkconfig -o /boot/grub2/grub.cfg (legacy) after installing qubes-seal.",
        )
    ours = [e for e in _menu(text) if _ours(e)]
    if not ours:
        return Check(
            "grub-entry",
            False,
            f"{path.relative_to(ctx.root)} has no qubes-seal (tboot) entry",
            "Check that /etc/grub.d/20_qubes_seal_tboot is installed and executable, that "
            "tboot and a SINIT ACM are in /boot, then grub2-mkconfig -o /boot/grub2/grub.cfg.",
        )
    return Check(
        "grub-entry",
        True,
        f"entry '{ours[0][1]}' (id {ours[0][2]}) in /{path.relative_to(ctx.root)}",
    )


def _grubenv_saved(ctx: Context, cfg: Path) -> str:
    for p in (cfg.parent / "grubenv", ctx.path("boot/grub2/grubenv")):
        try:
            for line in p.read_text(errors="replace").splitlines():
                if line.startswith("saved_entry="):
                    return line.split("=", 1)[1].strip()
        except OSError:
            continue
    return ""


def check_grub_default(ctx: Context) -> Check:
    path, text = _grub_cfg(ctx)
    if path is None:
        return Check("grub-default", None, "not checked: no grub.cfg")
    entries = _menu(text)
    default = _grub_default_file(ctx).get("GRUB_DEFAULT", "0")
    how = f"GRUB_DEFAULT={default}"
    if default == "saved":
        default = _grubenv_saved(ctx, path) or "0"
        how = f"GRUB_DEFAULT=saved, saved_entry={default}"
    if default.isdigit():
        i = int(default)
        chosen = entries[i] if i < len(entries) else None
    else:
        first = default.split(">")[0]
        chosen = next((e for e in entries if first in (e[1], e[2])), None)
    fix = (
        "sudo grub2-set-default <id of the qubes-seal entry> (with GRUB_DEFAULT=saved in "
        "/etc/default/grub), or GRUB_DEFAULT=<its id>, then grub2-mkconfig -o "
        "/boot/grub2/grub.cfg."
    )
    if chosen is None:
        return Check("grub-default", False, f"{how} names no entry of grub.cfg", fix)
    if not _ours(chosen):
        return Check("grub-default", False, f"{how}: the default is '{chosen[1]}', not ours", fix)
    return Check("grub-default", True, f"the default entry ({how}) is ours: '{chosen[1]}'")


def check_boot_mode(ctx: Context) -> Check:
    if not ctx.path("sys/firmware/efi").exists():
        return Check("boot-mode", True, "legacy (BIOS) boot: GRUB loads tboot by multiboot2")
    if ctx.path("boot/efi/EFI/qubes/xen.cfg").exists() and _grub_cfg(ctx)[0] is None:
        return Check(
            "boot-mode",
            False,
            "UEFI, booting xen.efi directly (EFI/qubes/xen.cfg, no GRUB): tboot is never "
            "started, so no measured launch",
            "tboot + Xen needs GRUB loading tboot by multiboot2: switch the machine to legacy "
            "boot (Qubes' installer supports it), or boot GRUB under UEFI with our entry.",
        )
    return Check(
        "boot-mode",
        True,
        "WARNING: UEFI boot: tboot + Xen only launches when GRUB loads tboot by multiboot2 "
        "(our entry does) and tboot supports UEFI (1.10 or later)",
        "Legacy (CSM) boot is the well-trodden path for tboot; if the launch fails under UEFI, "
        "try it.",
    )


def check_aem(ctx: Context) -> Check:
    found = [rel for rel in AEM_FILES if ctx.path(rel).exists()]
    if not found:
        return Check("aem", True, "Qubes anti-evil-maid not installed")
    return Check(
        "aem",
        False,
        "Qubes anti-evil-maid is installed (/" + found[0] + "): it also uses PCR 13 (it "
        "extends the LUKS header there and seals its secret to it), as qubes-seal does for "
        "the container header; two writers of PCR 13 make each other's sealed values "
        "unpredictable, so one of them fails to unseal",
        "Use one of them: 'sudo dnf remove anti-evil-maid' (and regenerate the initramfs: "
        "dracut -f), or do not install qubes-seal on this machine.",
    )


def _newest_initramfs(ctx: Context) -> Path | None:
    boot = ctx.path("boot")
    try:
        images = [p for p in boot.glob("initramfs-*.img") if p.is_file()]
    except OSError:
        return None
    images = [p for p in images if "kdump" not in p.name]
    return max(images, key=lambda p: p.stat().st_mtime) if images else None


def _cpio_names(data: bytes) -> Iterator[str]:
    """The names in a newc (070701/070702) cpio archive, stopping at its trailer."""
    pos = 0
    while pos + 110 <= len(data) and data[pos : pos + 5] == b"07070":
        try:
            filesize = int(data[pos + 54 : pos + 62], 16)
            namesize = int(data[pos + 94 : pos + 102], 16)
        except ValueError:
            return
        name = data[pos + 110 : pos + 110 + namesize].rstrip(b"\0").decode(errors="replace")
        if name == "TRAILER!!!":
            return
        yield name
        pos = (pos + 110 + namesize + 3) & ~3
        pos = (pos + filesize + 3) & ~3


def _decompress(data: bytes, limit: int) -> bytes:
    """gzip/xz/zstd/none, bounded by ``limit`` bytes of output."""
    import lzma

    if data.startswith(b"\x1f\x8b"):
        d = zlib.decompressobj(wbits=31)
        out = d.decompress(data, limit)
        return out
    if data.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor().decompress(data, limit)
    if data.startswith(b"\x28\xb5\x2f\xfd"):
        if shutil.which("zstd") is None:
            raise OSError("zstd-compressed initramfs and no zstd command")
        proc = subprocess.Popen(["zstd", "-dc"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL)  # fmt: skip
        assert proc.stdin is not None and proc.stdout is not None
        stdin = proc.stdin

        def feed() -> None:  # a thread: zstd's output would block on a full pipe otherwise
            with contextlib.suppress(OSError):
                stdin.write(data)
            with contextlib.suppress(OSError):
                stdin.close()

        writer = threading.Thread(target=feed, daemon=True)
        writer.start()
        out = proc.stdout.read(limit)
        proc.kill()
        proc.wait()
        writer.join()
        proc.stdout.close()
        return out
    return data


def initramfs_names(path: Path, *, use_lsinitrd: bool = True) -> list[str]:
    """The file names in an initramfs: ``lsinitrd`` if present, else our own cpio reader
    (an uncompressed early cpio, then the main one gzip/xz/zstd), bounded in size."""
    if use_lsinitrd and shutil.which("lsinitrd"):
        proc = subprocess.run(["lsinitrd", str(path)], capture_output=True, text=True,
                              timeout=120, check=False)  # fmt: skip
        if proc.returncode == 0 and proc.stdout.strip():
            return [line.split()[-1] for line in proc.stdout.splitlines() if line.strip()]
    with path.open("rb") as f:
        data = f.read(MAX_INITRAMFS)
    names: list[str] = []
    pos = 0
    # Uncompressed parts (the early microcode cpio) come first; the compressed one last.
    while data[pos : pos + 5] == b"07070":
        start = len(names)
        names += _cpio_names(data[pos:])
        if len(names) == start:
            break
        end = data.find(b"TRAILER!!!", pos)
        if end < 0:
            return names
        pos = (end + len("TRAILER!!!") + 1 + 3) & ~3
        while pos < len(data) and data[pos] == 0:
            pos += 1
    if pos < len(data):
        names += _cpio_names(_decompress(data[pos:], MAX_INITRAMFS))
    return names


def check_initramfs(ctx: Context) -> Check:
    image = _newest_initramfs(ctx)
    if image is None:
        return Check("initramfs", None, "not checked: no /boot/initramfs-*.img")
    try:
        names = initramfs_names(image, use_lsinitrd=ctx.cached("lsinitrd", lambda: True))
    except (OSError, EOFError, zlib.error, subprocess.SubprocessError) as exc:
        return Check("initramfs", None, f"not checked: cannot read {image.name}: {exc}")
    except Exception as exc:  # lzma.LZMAError and friends: a file we cannot read
        return Check("initramfs", None, f"not checked: cannot read {image.name}: {exc}")
    missing = [m for m in INITRAMFS_MARKERS if not any(m in n for n in names)]
    if missing:
        return Check(
            "initramfs",
            False,
            f"{image.name} (the newest initramfs) lacks our dracut module ({', '.join(missing)})",
            "Create /etc/qubes-seal/boot.toml (from /usr/share/qubes-seal/boot.toml.example): "
            "dracut includes the module only when it exists; then sudo dracut -f (dracut "
            "says why it skipped the module: 'qubes_seal is not importable', a missing "
            "binary).",
        )
    return Check("initramfs", True, f"{image.name} carries our dracut module")


# --- The installed service -------------------------------------------------------------------


def _container_path(ctx: Context) -> Path:
    return ctx.container if ctx.container is not None else ctx.path(DEFAULT_CONTAINER)


PLACE_FIX = (
    "Put the container on a partition labelled qubes-seal and link dom0's path to it: "
    "docs/INSTALL.md, step 4 (qubes-seal init --container /dev/disk/by-partlabel/qubes-seal; "
    "ln -s /dev/disk/by-partlabel/qubes-seal /var/lib/qubes-seal/keys.luks)."
)


def check_container(ctx: Context) -> Check:
    """The container exists; and, once the initramfs has a boot.toml, it is the one the
    initramfs opens, somewhere it can open it: before dom0's root volume is open, so not a
    file on that root (a partition, reached from dom0's default path by a symbolic link)."""
    path = _container_path(ctx)
    if not os.path.lexists(path):  # a link to a partition of this machine may dangle here
        return Check(
            "container",
            False,
            f"no container at {path}",
            "sudo qubes-seal init (once the checks above pass: it seals to this boot's "
            "launch); on a partition: " + PLACE_FIX,
        )
    toml = ctx.path("etc/qubes-seal/boot.toml")
    if not toml.exists():
        return Check("container", True, f"container {path}")
    from .boot.sequence import BootConfig

    try:
        boot = BootConfig.load(toml).container
    except QubesSealError as exc:
        return Check("container", None, f"container {path}; not compared with {toml}: "
                     f"{exc.message}")  # fmt: skip
    if path.is_symlink():
        target = os.readlink(path)
        if target == boot or os.path.normpath(target) == os.path.normpath(boot):
            unreachable = _units_missing_device(ctx, target)
            if unreachable:
                return unreachable
            return Check("container", True, f"container {path} -> {target}, the one the "
                         "initramfs opens (boot.toml)")  # fmt: skip
        return Check(
            "container",
            False,
            f"dom0's tools use {path} -> {target}, but the initramfs opens {boot} (boot.toml)",
            f'Make them one: ln -sfn {boot} {path} (or container = "{target}" in '
            f"{toml}), then sudo dracut -f.",
        )
    same = str(path) == boot or (
        ctx.on_this_machine and os.path.realpath(path) == os.path.realpath(boot)
    )
    if stat.S_ISBLK(path.stat().st_mode):
        if same:
            return _units_missing_device(ctx, str(path)) or Check(
                "container", True, f"container {path}, the one the initramfs opens"
            )
        return Check("container", False, f"dom0's tools use {path}, but the initramfs opens "
                     f"{boot} (boot.toml)", f"Make them one: container = \"{path}\" in "
                     f"{toml}, then sudo dracut -f.")  # fmt: skip
    where = "" if same else f" (and the initramfs opens {boot}, boot.toml)"
    return Check(
        "container",
        False,
        f"container {path} is a file on dom0's root{where}: the initramfs cannot open it "
        "before that root is open",
        PLACE_FIX,
    )


#: the container's node that the units reach without a drop-in (BindPaths=/DeviceAllow=)
UNIT_CONTAINER = "/dev/disk/by-partlabel/qubes-seal"


def _units_missing_device(ctx: Context, node: str) -> Check | None:
    """A failed check when the key service or the reseal unit cannot reach the container's
    block device ``node``: the units reach :data:`UNIT_CONTAINER` by themselves; another
    node (an MBR disk's /dev/disk/by-uuid/...) needs a drop-in naming it (docs/INSTALL.md,
    step 4).  None when both reach it."""
    if os.path.normpath(node) == UNIT_CONTAINER:
        return None
    wanted = {"qubes-seal-keyd.service": (f"BindPaths={node}", f"DeviceAllow={node} rw"),
              "qubes-seal-reseal.service": (f"DeviceAllow={node} rw",)}  # fmt: skip
    missing = []
    for unit, lines in wanted.items():
        text = ""
        for d in (
            ctx.path(f"etc/systemd/system/{unit}.d"),
            ctx.path(f"run/systemd/system/{unit}.d"),
        ):
            with contextlib.suppress(OSError):
                text += "".join(p.read_text(errors="replace") for p in sorted(d.glob("*.conf")))
        have = {" ".join(line.split()) for line in text.splitlines()}
        if not all(line in have for line in lines):
            missing.append(unit)
    if not missing:
        return None
    return Check(
        "container",
        False,
        f"the container is {node}, which {' and '.join(missing)} cannot reach: their "
        f"hardening allows {UNIT_CONTAINER} only",
        f"sudo systemctl edit {' and '.join(missing)}: under [Service], BindPaths={node} and "
        f"DeviceAllow={node} rw (the reseal unit: the DeviceAllow= line only); "
        "docs/INSTALL.md, step 4.",
    )


def check_units(ctx: Context) -> Check:
    base = ctx.path("etc/systemd/system")
    missing = [f"{unit} ({wants})" for unit, wants in UNITS.items()
               if not os.path.lexists(base / wants / unit)]  # fmt: skip
    if missing:
        return Check(
            "units",
            False,
            "not enabled: " + ", ".join(missing),
            "sudo systemctl enable --now " + " ".join(UNITS),
        )
    return Check("units", True, "enabled: " + ", ".join(UNITS))


def check_keyd(ctx: Context) -> Check:
    if not ctx.on_this_machine and ctx.socket is None:
        return Check("keyd", None, "not checked under --root: the key daemon runs on the machine")
    from .service import client

    path = ctx.socket or client.socket_path()
    try:
        answer = client.status(path)
    except QubesSealError as exc:
        return Check("keyd", False, f"the key daemon at {path} refused: {exc.message}",
                     "journalctl -u qubes-seal-keyd")  # fmt: skip
    if answer is None:
        return Check(
            "keyd",
            False,
            f"the key daemon is not running (nothing answers on {path})",
            "sudo systemctl start qubes-seal-keyd (it serves keys after the boot's unlock); "
            "journalctl -u qubes-seal-keyd says why it stopped.",
        )
    return Check("keyd", True, f"the key daemon answers on {path}")


CHECKS: tuple[Callable[[Context], Check], ...] = (
    check_tpm,
    check_tpm_lockout,
    check_tpm_lockout_auth,
    check_srk,
    check_smx,
    check_txt_enabled,
    check_txt_launch,
    check_tboot,
    check_sinit,
    check_grub_entry,
    check_grub_default,
    check_boot_mode,
    check_aem,
    check_initramfs,
    check_container,
    check_units,
    check_keyd,
)


def run(ctx: Context) -> list[Check]:
    """Every check, in order; a check that raises is reported as not checked."""
    results: list[Check] = []
    for fn in CHECKS:
        try:
            results.append(fn(ctx))
        except QubesSealError as exc:
            name = fn.__name__.removeprefix("check_").replace("_", "-")
            results.append(Check(name, None, f"not checked: {exc.message}"))
    return results


def all_ok(checks: list[Check]) -> bool:
    return all(c.ok is not False for c in checks)
