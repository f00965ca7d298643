"""Vouching: which boot files and command lines dom0's encrypted root stands behind.

/boot is plaintext: while the machine is off, an evil maid can write any file there and any
grub.cfg.  She cannot write dom0's encrypted root (/etc, /var, the RPM database, qubes-seal's
state) and is not there while dom0 runs.  So a boot that is approved without a human looking
(the reseal path unit) may use only files that the encrypted root vouches for:

* the file's digest equals the one the **RPM database** holds for that path in an installed
  package (dom0 installs signed RPMs; the database lives on the encrypted root).  A kernel
  ``vmlinuz-VER`` is also vouched by ``/lib/modules/VER/vmlinuz`` (or ``/usr/lib/...``) of
  an installed package: Fedora's and Qubes' kernel packages ship the image there and own
  ``/boot/vmlinuz-VER`` only as a ``%ghost`` (no digest), which kernel-install copies;
* or the digest **recorded** for that path in ``vouched.json`` in qubes-seal's state
  directory (root-owned, 0600), written by ``qubes-seal vouch record``, which dom0 runs
  when it builds a file itself: the initramfs, after dracut (kernel-install's
  ``60-qubes-seal.install``).

MD5 and SHA-1 file digests in the database are refused (a file made to match them is
conceivable); SHA-224/256/384/512 are accepted.

Command lines are dom0's own configuration, ``/etc/default/grub`` read by ``sh`` as
grub-mkconfig reads it, turned into module strings by the rules of
``grub-snippets/20_qubes_seal_tboot``; never grub.cfg's.

This module knows nothing of its callers: it answers "who vouches for this file / this
command line, or why nobody does"; the CLI decides what to do with the answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CorruptState, UsageError
from ..fsutil import atomic_write
from .tboot import grub_module_string

RECORDS_FILE = "vouched.json"
RECORDS_VERSION = 1
DEFAULT_ETC_DEFAULT_GRUB = Path("/etc/default/grub")

#: RPM's PGPHASHALGO numbers (rpmpgp.h) for FILEDIGESTALGO; a package without the tag
#: has MD5 file digests.
RPM_DIGEST_ALGOS = {8: "sha256", 9: "sha384", 10: "sha512", 11: "sha224"}
RPM_WEAK_ALGOS = {1: "MD5", 2: "SHA-1"}
_RPM_QF = (
    "P\t%{NEVRA}\t%{VERSION}-%{RELEASE}\t%{FILEDIGESTALGO}\t"
    "%|RSAHEADER?{%{RSAHEADER:pgpsig}}:{unsigned}|\n"
    "[F\t%{FILEDIGESTS}\t%{FILENAMES}\n]"
)


class VouchError(UsageError):
    """dom0's configuration cannot be read or cannot give a predictable command line."""


# --- Findings ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileFinding:
    """One boot file: its digest, and who vouches for it (or why nobody does)."""

    role: str  # tboot, xen, kernel, initramfs, or a module's file name
    path: Path
    sha256: str
    version: str | None
    vouched_by: str | None
    reason: str | None = None  # why nobody vouches (vouched_by is None)

    @property
    def vouched(self) -> bool:
        return self.vouched_by is not None

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "path": str(self.path), "sha256": self.sha256,
                "version": self.version, "vouched_by": self.vouched_by,
                "reason": self.reason}  # fmt: skip


@dataclass(frozen=True)
class CmdlineFinding:
    """One module string against the one dom0's configuration gives."""

    role: str
    found: bytes
    expected: bytes | None  # None: dom0's configuration could not say
    reason: str | None = None  # why it is not vouched

    @property
    def vouched(self) -> bool:
        return self.reason is None

    def as_dict(self) -> dict[str, Any]:
        return {"role": self.role, "found": self.found.decode(errors="replace"),
                "expected": None if self.expected is None
                else self.expected.decode(errors="replace"),
                "vouched": self.vouched, "reason": self.reason}  # fmt: skip


@dataclass(frozen=True)
class Report:
    """Everything a boot to approve is made of, and whether dom0 vouches for all of it."""

    files: list[FileFinding]
    cmdlines: list[CmdlineFinding] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # about the entry as a whole

    @property
    def vouched(self) -> bool:
        return (
            not self.problems
            and all(f.vouched for f in self.files)
            and all(c.vouched for c in self.cmdlines)
        )

    def not_vouched(self) -> list[str]:
        """One line per thing nobody vouches for."""
        out = list(self.problems)
        out += [f"{f.role} {f.path} (sha256 {f.sha256}): {f.reason}"
                for f in self.files if not f.vouched]  # fmt: skip
        out += [f"{c.role} command line: {c.reason}" for c in self.cmdlines if not c.vouched]
        return out

    def lines(self) -> list[str]:
        """The whole report, for a human deciding whether to approve."""
        out: list[str] = []
        for f in self.files:
            out.append(f"  {f.role:<10} {f.path}")
            out.append(f"  {'':<10} version {f.version or 'unknown'}, sha256 {f.sha256}")
            out.append(f"  {'':<10} " + (f"vouched by {f.vouched_by}" if f.vouched
                                         else f"NOT VOUCHED: {f.reason}"))  # fmt: skip
        for c in self.cmdlines:
            text = c.found.decode(errors="replace")
            out.append(f"  {c.role + ' command line:':<22} {text!r}")
            if c.vouched:
                out.append(f"  {'':<22} as dom0's /etc/default/grub gives it")
            else:
                out.append(f"  {'':<22} NOT VOUCHED: {c.reason}")
        out += [f"  NOT VOUCHED: {p}" for p in self.problems]
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"vouched": self.vouched, "files": [f.as_dict() for f in self.files],
                "cmdlines": [c.as_dict() for c in self.cmdlines],
                "problems": list(self.problems)}  # fmt: skip


# --- Digests ---------------------------------------------------------------------------------


def file_digests(path: Path) -> dict[str, str]:
    """The file's digests in every algorithm RPM may have recorded (one read)."""
    hashes = {name: hashlib.new(name) for name in RPM_DIGEST_ALGOS.values()}
    try:
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                for h in hashes.values():
                    h.update(chunk)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from exc
    return {name: h.hexdigest() for name, h in hashes.items()}


def version_from_name(name: str) -> str | None:
    """The version in a /boot file name: xen-4.19.1.gz, vmlinuz-V, initramfs-V.img, ..."""
    for prefix, suffixes in (("xen-", (".gz",)), ("vmlinuz-", ()),
                             ("initramfs-", (".img",)), ("initrd.img-", ()),
                             ("initrd-", (".img", ".gz")), ("tboot-", (".gz",))):  # fmt: skip
        if name.startswith(prefix):
            version = name[len(prefix) :]
            for s in suffixes:
                version = version.removesuffix(s)
            return version or None
    return None


# --- The RPM database -------------------------------------------------------------------------


@dataclass(frozen=True)
class RpmPackage:
    nevra: str
    version: str
    algo: int | None  # FILEDIGESTALGO; None: absent (MD5)
    signature: str
    files: dict[str, str]  # path -> hex digest ("" for %ghost files and directories)

    def describe(self) -> str:
        sig = "unsigned" if self.signature in ("unsigned", "(none)") else self.signature
        return f"RPM {self.nevra} ({sig})"


class RpmDb:
    """The installed packages, through the ``rpm`` command (read-only queries only)."""

    def __init__(self, dbpath: Path | None = None, *, rpm: str | None = None) -> None:
        """``rpm``: the command (default: ``rpm`` from PATH; ``""``: there is none)."""
        self.dbpath = dbpath
        self.rpm = shutil.which("rpm") if rpm is None else (rpm or None)
        self._unavailable: str | None = None
        self._checked = False
        self._cache: dict[str, list[RpmPackage]] = {}

    def _args(self) -> list[str]:
        assert self.rpm is not None
        return [self.rpm] + ([] if self.dbpath is None else ["--dbpath", str(self.dbpath)])

    def unavailable(self) -> str | None:
        """Why this database cannot vouch for anything, or None when it can be queried."""
        if self._checked:
            return self._unavailable
        self._checked = True
        if self.rpm is None:
            self._unavailable = (
                "no rpm command on this system: nothing is vouched by an RPM database"
            )
            return self._unavailable
        dbpath = self.dbpath
        if dbpath is None:
            try:
                res = subprocess.run([self.rpm, "-E", "%_dbpath"], capture_output=True,
                                     text=True, timeout=30, env=_clean_env())  # fmt: skip
                dbpath = Path(res.stdout.strip())
            except (OSError, subprocess.SubprocessError) as exc:
                self._unavailable = f"rpm does not run: {exc}"
                return self._unavailable
        # A query on a missing database would create an empty one: look first.
        if not dbpath.is_dir() or not any(dbpath.iterdir()):
            self._unavailable = f"no RPM database in {dbpath}: nothing is vouched by RPM"
        return self._unavailable

    def owners(self, path: str) -> list[RpmPackage]:
        """The installed packages that own ``path`` (with all their files' digests)."""
        if path in self._cache:
            return self._cache[path]
        if self.unavailable() is not None:
            return []
        try:
            res = subprocess.run([*self._args(), "-qf", "--qf", _RPM_QF, "--", path],
                                 capture_output=True, text=True, timeout=60,
                                 env=_clean_env())  # fmt: skip
        except (OSError, subprocess.SubprocessError) as exc:
            raise UsageError(f"rpm -qf {path} failed: {exc}") from exc
        packages: list[RpmPackage] = []
        current: RpmPackage | None = None
        for line in res.stdout.splitlines():
            kind, _, rest = line.partition("\t")
            if kind == "P":
                nevra, version, algo, sig = [*rest.split("\t"), "", "", ""][:4]
                current = RpmPackage(nevra, version, int(algo) if algo.isdigit() else None,
                                     sig, {})  # fmt: skip
                packages.append(current)
            elif kind == "F" and current is not None:
                digest, _, name = rest.partition("\t")
                current.files[name] = digest.lower()
        self._cache[path] = packages
        return packages


def _clean_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "LC_ALL": "C"}


@dataclass(frozen=True)
class RpmVerdict:
    """What the RPM database says of one file."""

    by: str | None  # the package that vouches for it
    version: str  # that package's VERSION-RELEASE, or ""
    reason: str  # why no package does (when ``by`` is None)
    contradicted: bool = False  # a package owns the path with another digest


def rpm_vouch(db: RpmDb, path: Path, digests: dict[str, str]) -> RpmVerdict:
    """Whether an installed package holds ``path`` with these digests (see the module doc)."""
    why = db.unavailable()
    if why is not None:
        return RpmVerdict(None, "", why)
    name = str(path)
    candidates = [name]
    if path.name.startswith("vmlinuz-"):
        ver = path.name.removeprefix("vmlinuz-")
        candidates += [f"/lib/modules/{ver}/vmlinuz", f"/usr/lib/modules/{ver}/vmlinuz"]
    reasons: list[str] = []
    contradicted = False
    for query in candidates:
        for pkg in db.owners(query):
            for fname, digest in pkg.files.items():
                if fname not in candidates or not digest:
                    continue
                if pkg.algo is None or pkg.algo in RPM_WEAK_ALGOS:
                    weak = RPM_WEAK_ALGOS.get(pkg.algo or 1, "MD5")
                    reasons.append(f"{pkg.nevra} has only {weak} file digests (refused)")
                    continue
                algo = RPM_DIGEST_ALGOS.get(pkg.algo)
                if algo is None:
                    reasons.append(f"{pkg.nevra}: unknown file digest algorithm {pkg.algo}")
                elif digests[algo] == digest:
                    via = "" if fname == name else f" (as {fname})"
                    return RpmVerdict(f"{pkg.describe()}{via}", pkg.version, "")
                else:
                    contradicted = True
                    reasons.append(f"its content differs from {fname} of {pkg.nevra}")
        if reasons:
            break
    if not reasons:
        reasons.append("not owned by any installed RPM package")
    return RpmVerdict(None, "", "; ".join(dict.fromkeys(reasons)), contradicted)


# --- Recorded digests -------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    path: str
    sha256: str
    recorded: str  # ISO 8601, UTC
    by: str  # what recorded it (kernel-install, or the command)
    version: str | None

    def as_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "recorded": self.recorded, "by": self.by,
                "version": self.version}  # fmt: skip


class Records:
    """``vouched.json`` in the state directory: path -> the digest dom0 recorded for it."""

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / RECORDS_FILE
        self.entries: dict[str, Record] = {}
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise CorruptState(f"cannot read {self.path}: {exc.strerror}") from exc
        try:
            doc = json.loads(raw)
            if doc.get("version") != RECORDS_VERSION:
                raise ValueError(f"unknown version {doc.get('version')!r}")
            for p, e in doc["files"].items():
                sha = str(e["sha256"]).lower()
                if len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
                    raise ValueError(f"bad digest for {p}")
                version = None if e.get("version") is None else str(e["version"])
                self.entries[p] = Record(p, sha, str(e["recorded"]), str(e["by"]), version)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CorruptState(
                f"{self.path} is not a qubes-seal record of vouched digests: {exc}",
                hint="Move it away and record the initramfs again "
                "(qubes-seal vouch record /boot/initramfs-VER.img).",
            ) from exc

    def record(self, path: Path, sha256: str, *, by: str, version: str | None) -> Record:
        key = str(path)
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        rec = Record(key, sha256, now, by, version)
        self.entries[key] = rec
        return rec

    def forget(self, path: Path) -> bool:
        return self.entries.pop(str(path), None) is not None

    def save(self) -> None:
        doc = {"version": RECORDS_VERSION,
               "files": {p: r.as_dict() for p, r in sorted(self.entries.items())}}  # fmt: skip
        atomic_write(self.path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())

    def vouch(self, path: Path, sha256: str) -> tuple[str | None, str]:
        rec = self.entries.get(str(path))
        if rec is None:
            return None, f"no digest recorded in {self.path}"
        if rec.sha256 != sha256:
            return None, (f"its content differs from the digest recorded in {self.path} "
                          f"on {rec.recorded} ({rec.sha256})")  # fmt: skip
        return (
            f"the digest recorded in {self.path} on {rec.recorded} by {rec.by}",
            rec.version or "",
        )


# --- Files -------------------------------------------------------------------------------------


def canonical(path: Path) -> Path:
    """The path a database entry or a record names: absolute, symlinks resolved."""
    return Path(os.path.realpath(path))


def vouch_file(role: str, path: Path, *, rpm: RpmDb, records: Records) -> FileFinding:
    """Who vouches for one file: the RPM database first, then the recorded digests."""
    real = canonical(path)
    try:
        digests = file_digests(real)
    except UsageError as exc:
        return FileFinding(role, real, "(unreadable)", None, None, exc.message)
    sha = digests["sha256"]
    version = version_from_name(real.name)
    verdict = rpm_vouch(rpm, real, digests)
    if verdict.by is not None:
        return FileFinding(role, real, sha, verdict.version or version, verdict.by)
    by, why_rec = records.vouch(real, sha)
    if by is not None:
        return FileFinding(role, real, sha, why_rec or version, by)
    return FileFinding(role, real, sha, version, None, f"{verdict.reason}; {why_rec}")


# --- Command lines from /etc/default/grub -------------------------------------------------------

#: The variables of /etc/default/grub that 20_qubes_seal_tboot turns into module strings.
GRUB_VARIABLES = (
    "GRUB_CMDLINE_XEN", "GRUB_CMDLINE_XEN_DEFAULT", "GRUB_QUBES_SEAL_CMDLINE_XEN_EXTRA",
    "GRUB_CMDLINE_LINUX", "GRUB_CMDLINE_LINUX_DEFAULT", "GRUB_CMDLINE_LINUX_XEN_REPLACE",
    "GRUB_CMDLINE_LINUX_XEN_REPLACE_DEFAULT", "GRUB_QUBES_SEAL_CMDLINE_LINUX_EXTRA",
    "GRUB_QUBES_SEAL_ROOT", "GRUB_QUBES_SEAL_TBOOT_CMDLINE", "GRUB_CMDLINE_TBOOT",
)  # fmt: skip

#: tboot's command line when /etc/default/grub sets none (20_qubes_seal_tboot's default).
DEFAULT_TBOOT_CMDLINE = "logging=serial,memory,vga"

_READ_SCRIPT = r"""
f="$1"; shift
. "$f" >/dev/null || exit 3
for v in "$@"; do
    eval "s=\${$v+1} x=\${$v-}"
    printf '%s\0%s\0%s\0' "$v" "$s" "$x"
done
"""


def read_default_grub(path: Path) -> dict[str, str]:
    """The set GRUB_* variables of ``path``, read by ``sh`` as grub-mkconfig reads the file.

    The file must be a regular file owned by root (or by the caller) and not writable by
    group or others: it is the configuration the encrypted root vouches for.
    """
    try:
        st = path.stat()
    except OSError as exc:
        raise VouchError(f"cannot read dom0's GRUB configuration {path}: {exc.strerror}") from exc
    if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.getuid()) or st.st_mode & 0o022:
        raise VouchError(
            f"{path} is not a regular file owned by root and writable only by it",
            hint="dom0's command lines are read from it: fix its owner and mode (0644).",
        )
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    try:
        res = subprocess.run(["sh", "-c", _READ_SCRIPT, "sh", str(path), *GRUB_VARIABLES],
                             capture_output=True, timeout=30, env=env,
                             stdin=subprocess.DEVNULL)  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        raise VouchError(f"cannot read {path} with sh: {exc}") from exc
    if res.returncode != 0:
        raise VouchError(f"sh cannot read {path}: {res.stderr.decode(errors='replace').strip()}")
    parts = res.stdout.decode(errors="surrogateescape").split("\0")
    values: dict[str, str] = {}
    for i in range(0, len(parts) - 2, 3):
        name, is_set, value = parts[i : i + 3]
        if is_set:
            values[name] = value
    return values


def config_words(name: str, value: str) -> list[str]:
    """A command-line value read as a GRUB word list, by 20_qubes_seal_tboot's rules (qs_words).

    Blanks separate words; '...' and "..." quote (in double quotes \\\\, \\", \\$ escape, a
    backslash-newline vanishes); a backslash escapes the next character; everything else is
    literal.  A ``$`` outside single quotes is refused, as the snippet refuses it.
    """
    words: list[str] = []
    cur: list[str] = []
    in_word = False
    i, n = 0, len(value)

    def fail(msg: str) -> VouchError:
        return VouchError(f"{name} in /etc/default/grub: {msg}",
                          hint="20_qubes_seal_tboot refuses it too: fix the value.")  # fmt: skip

    while i < n:
        c = value[i]
        if c in " \t\n":
            if in_word:
                words.append("".join(cur))
                cur, in_word = [], False
        elif c == "'":
            end = value.find("'", i + 1)
            if end < 0:
                raise fail("unterminated single quote")
            cur.append(value[i + 1 : end])
            i, in_word = end, True
        elif c == '"':
            in_word = True
            i += 1
            while i < n and value[i] != '"':
                c = value[i]
                if c == "\\" and i + 1 < n and value[i + 1] in '\\"$':
                    cur.append(value[i + 1])
                    i += 2
                    continue
                if c == "\\" and i + 1 < n and value[i + 1] == "\n":
                    i += 2
                    continue
                if c == "$":
                    raise fail("a GRUB variable ($) cannot be predicted")
                cur.append(c)
                i += 1
            if i >= n:
                raise fail("unterminated double quote")
        elif c == "\\":
            if i + 1 >= n:
                raise fail("backslash at the end")
            i += 1
            if value[i] != "\n":
                cur.append(value[i])
            in_word = True
        elif c == "$":
            raise fail("a GRUB variable ($) cannot be predicted")
        else:
            cur.append(c)
            in_word = True
        i += 1
    if in_word:
        words.append("".join(cur))
    return words


@dataclass(frozen=True)
class Dom0Cmdlines:
    """The module strings 20_qubes_seal_tboot writes for dom0's configuration."""

    source: Path
    xen: list[str]
    root: str | None  # GRUB_QUBES_SEAL_ROOT when set ("" = no root=); None: dom0's root fs
    linux: list[str]  # the words after ``root=... ro``
    tboot: list[str] = field(default_factory=lambda: [DEFAULT_TBOOT_CMDLINE])

    def expected(self, role: str) -> bytes | None:
        if role == "tboot":
            return grub_module_string(self.tboot)
        if role == "xen":
            return grub_module_string(self.xen)
        if role == "initramfs":
            return b""
        if role == "kernel" and self.root is not None:
            head = [f"root={self.root}", "ro"] if self.root else []
            return grub_module_string([*head, *self.linux])
        return None


def dom0_cmdlines(path: Path = DEFAULT_ETC_DEFAULT_GRUB) -> Dom0Cmdlines:
    """Read ``path`` and apply 20_qubes_seal_tboot's rules (docs/GRUB.md, Configuration)."""
    v = read_default_grub(path)
    xen = [*config_words("GRUB_CMDLINE_XEN", v.get("GRUB_CMDLINE_XEN", "")),
           *config_words("GRUB_CMDLINE_XEN_DEFAULT", v.get("GRUB_CMDLINE_XEN_DEFAULT", "")),
           *config_words("GRUB_QUBES_SEAL_CMDLINE_XEN_EXTRA",
                         v.get("GRUB_QUBES_SEAL_CMDLINE_XEN_EXTRA", ""))]  # fmt: skip
    linux_name, default_name = "GRUB_CMDLINE_LINUX", "GRUB_CMDLINE_LINUX_DEFAULT"
    if v.get("GRUB_CMDLINE_LINUX_XEN_REPLACE"):
        linux_name = "GRUB_CMDLINE_LINUX_XEN_REPLACE"
    if v.get("GRUB_CMDLINE_LINUX_XEN_REPLACE_DEFAULT"):
        default_name = "GRUB_CMDLINE_LINUX_XEN_REPLACE_DEFAULT"
    linux = [*config_words(linux_name, v.get(linux_name, "")),
             *config_words(default_name, v.get(default_name, "")),
             *config_words("GRUB_QUBES_SEAL_CMDLINE_LINUX_EXTRA",
                           v.get("GRUB_QUBES_SEAL_CMDLINE_LINUX_EXTRA", ""))]  # fmt: skip
    # 20_qubes_seal_tboot: GRUB_QUBES_SEAL_TBOOT_CMDLINE if set, else GRUB_CMDLINE_TBOOT if
    # set, else its default.
    tboot_name = next((n for n in ("GRUB_QUBES_SEAL_TBOOT_CMDLINE", "GRUB_CMDLINE_TBOOT")
                       if n in v), None)  # fmt: skip
    tboot = (config_words(tboot_name, v[tboot_name]) if tboot_name is not None
             else [DEFAULT_TBOOT_CMDLINE])  # fmt: skip
    return Dom0Cmdlines(path, xen, v.get("GRUB_QUBES_SEAL_ROOT"), linux, tboot)


_BY_TAG = {"UUID": "by-uuid", "PARTUUID": "by-partuuid", "LABEL": "by-label",
           "PARTLABEL": "by-partlabel"}  # fmt: skip


def names_root_fs(spec: str, *, system_root: Path = Path("/")) -> bool:
    """Whether ``root=spec`` names the block device that holds dom0's root file system."""
    tag, eq, rest = spec.partition("=")
    if eq and tag in _BY_TAG:
        device = Path("/dev/disk") / _BY_TAG[tag] / rest
    elif spec.startswith("/dev/"):
        device = Path(spec)
    else:
        return False
    try:
        st = device.stat()
        return stat.S_ISBLK(st.st_mode) and st.st_rdev == system_root.stat().st_dev
    except OSError:
        return False


def check_cmdline(role: str, found: bytes, dom0: Dom0Cmdlines) -> CmdlineFinding:
    """Whether the module string ``found`` is the one dom0's configuration gives ``role``."""
    expected = dom0.expected(role)
    if expected is not None:
        if found == expected:
            return CmdlineFinding(role, found, expected)
        return CmdlineFinding(
            role, found, expected, f"{dom0.source} gives {expected.decode(errors='replace')!r}"
        )
    if role == "kernel":  # root= must name dom0's root file system
        tail = grub_module_string(["ro", *dom0.linux])
        want = f"root=<dom0's root device> {tail.decode(errors='replace')}"
        head, _, rest = found.partition(b" ")
        spec = head.removeprefix(b"root=").decode(errors="replace")
        if (head.startswith(b"root=") and rest == tail and not any(c in spec for c in "\\'\"")
                and names_root_fs(spec)):  # fmt: skip
            return CmdlineFinding(role, found, found)
        return CmdlineFinding(role, found, None,
                              f"{dom0.source} gives {want!r} (set GRUB_QUBES_SEAL_ROOT to "
                              "name the root device explicitly)")  # fmt: skip
    return CmdlineFinding(role, found, None, f"{dom0.source} gives no command line for {role}")


# --- A boot to approve ---------------------------------------------------------------------------

MEASURED_ROLES = ("xen", "kernel", "initramfs")


def check_boot(
    files: Sequence[tuple[str, Path, bytes | None]],
    *,
    rpm: RpmDb,
    records: Records,
    etc_default_grub: Path = DEFAULT_ETC_DEFAULT_GRUB,
) -> Report:
    """Vouch for every file and module string of a boot: ``(role, path, module string)``.

    The roles are ``tboot`` (measured by SINIT as the MLE: its command line is vouched for
    when the prediction recomputes its MLE hash, else None: taken from this boot's log), then
    ``xen``, ``kernel``, ``initramfs`` in that order; any other module tboot would measure is
    a problem (dom0's configuration has exactly these three).
    """
    report = Report([], [], [])
    measured = [role for role, _, cmdline in files if cmdline is not None and role != "tboot"]
    if measured != list(MEASURED_ROLES):
        report.problems.append(
            "the modules tboot measures are " + (", ".join(measured) or "none")
            + f", not exactly {', '.join(MEASURED_ROLES)}"
        )  # fmt: skip
    try:
        dom0: Dom0Cmdlines | None = dom0_cmdlines(etc_default_grub)
        dom0_error = ""
    except VouchError as exc:
        dom0, dom0_error = None, exc.diagnostics().replace("\n", " ")
    for role, path, cmdline in files:
        report.files.append(vouch_file(role, path, rpm=rpm, records=records))
        if cmdline is None:
            continue
        if dom0 is None:
            report.cmdlines.append(CmdlineFinding(role, cmdline, None, dom0_error))
        else:
            report.cmdlines.append(check_cmdline(role, cmdline, dom0))
    return report
