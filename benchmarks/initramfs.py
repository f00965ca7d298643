"""What the qubes-seal dracut module adds to an initramfs, against clevis's tpm2 pin.

    .venv/bin/python benchmarks/initramfs.py [--sources] [--json] [--keep DIR]

Builds, in one run and with the same dracut (a copy of /usr/lib/dracut with
dracut-module/90qubes-seal added under modules.d), three images with ``--no-hostonly
--no-kernel --no-compress --no-early-microcode``:

  baseline    -m "base systemd systemd-initrd dracut-systemd crypt"
  qubes-seal  the baseline + qubes-seal (QUBES_SEAL_PYTHON = this interpreter)
  clevis      the baseline + clevis clevis-pin-tpm2 (Debian's clevis-dracut)

unpacks each (``lsinitrd --unpack``) and prints the uncompressed image size, the unpacked size
(sum of the regular files), the file count, what each adds over the baseline, and the biggest
files qubes-seal adds, grouped by kind too.  Target: qubes-seal adds under 15 MiB.
``--sources`` builds ours with the .py sources as well (QUBES_SEAL_PY_SOURCES=yes).
Needs root (dracut) and the Debian packages dracut, clevis-dracut, clevis-tpm2.  Exits 0
when the three images were built (the verdict on the target is printed, not the exit status).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODULE_DIR = REPO / "dracut-module" / "90qubes-seal"
BASELINE = "base systemd systemd-initrd dracut-systemd crypt"
VARIANTS = {
    "baseline": BASELINE,
    "qubes-seal": f"{BASELINE} qubes-seal",
    "clevis (tpm2 pin)": f"{BASELINE} clevis clevis-pin-tpm2",
}
TARGET_MIB = 15.0
MIB = 1 << 20


@dataclass
class Build:
    name: str
    modules: str
    seconds: float
    image_bytes: int
    files: dict[str, int] = field(repr=False)  # relative path -> size (regular files)
    symlinks: int = 0

    @property
    def unpacked_bytes(self) -> int:
        return sum(self.files.values())


def dracut_copy(work: Path) -> Path:
    base = work / "dracut"
    shutil.copytree("/usr/lib/dracut", base, symlinks=True)
    shutil.copytree(MODULE_DIR, base / "modules.d" / MODULE_DIR.name)
    return base


def build(name: str, modules: str, base: Path, work: Path, env: dict[str, str]) -> Build:
    out = work / (name.split()[0] + ".img")
    started = time.monotonic()
    proc = subprocess.run(
        ["dracut", "--no-hostonly", "--no-kernel", "--no-compress", "--no-early-microcode",
         "-m", modules, "-f", str(out)],
        env=dict(env, dracutbasedir=str(base)), capture_output=True, text=True,
    )  # fmt: skip
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        sys.exit(f"dracut failed for {name}:\n{proc.stderr[-3000:]}")
    for module in modules.split():
        if f"Including module: {module} " not in proc.stderr + proc.stdout:
            sys.exit(f"dracut did not include the module {module!r} in {name}")
    root = work / (name.split()[0] + ".d")
    root.mkdir()
    subprocess.run(["lsinitrd", "--unpack", str(out)], cwd=root, check=True,
                   capture_output=True)  # fmt: skip
    files: dict[str, int] = {}
    links = 0
    seen: set[tuple[int, int]] = set()
    for dirpath, _dirs, names in os.walk(root):
        for n in names:
            path = Path(dirpath, n)
            st = path.lstat()
            if path.is_symlink():
                links += 1
            elif (st.st_dev, st.st_ino) not in seen:  # hard links counted once
                seen.add((st.st_dev, st.st_ino))
                files[str(path.relative_to(root))] = st.st_size
    size = out.stat().st_size
    shutil.rmtree(root)
    out.unlink()
    return Build(name, modules, seconds, size, files, links)


def kind(path: str) -> str:
    if "/python3" in path and path.startswith("usr/lib/python"):
        if path.endswith(".so"):
            return "Python extension modules (.so)"
        return "Python modules (.pyc/.py)"
    if path == "usr/bin/python3" or "libpython" in path:
        return "interpreter (python3, libpython)"
    if ".so" in path:
        return "shared libraries"
    if path.startswith(("usr/bin/", "usr/sbin/", "bin/", "sbin/")):
        return "programs"
    return "other (units, config)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sources", action="store_true", help="ship the .py sources too")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    parser.add_argument("--keep", type=Path, help="work in DIR and keep it")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("dracut") is None:
        sys.exit("needs root and dracut")
    work = args.keep or Path(tempfile.mkdtemp(prefix="qs-initramfs-"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, QUBES_SEAL_PYTHON=sys.executable)
    if args.sources:
        env["QUBES_SEAL_PY_SOURCES"] = "yes"
    try:
        base = dracut_copy(work)
        builds = [build(n, m, base, work, env) for n, m in VARIANTS.items()]
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    baseline, ours, clevis = builds
    added = {p: s for p, s in ours.files.items() if p not in baseline.files}
    by_kind: dict[str, int] = {}
    for p, s in added.items():
        by_kind[kind(p)] = by_kind.get(kind(p), 0) + s
    top = sorted(added.items(), key=lambda kv: kv[1], reverse=True)[:10]
    ours_added = (ours.unpacked_bytes - baseline.unpacked_bytes) / MIB

    if args.json:
        print(json.dumps({
            "builds": [{k: v for k, v in asdict(b).items() if k != "files"}
                       | {"unpacked_bytes": b.unpacked_bytes, "file_count": len(b.files)}
                       for b in builds],
            "qubes_seal_added_by_kind": by_kind,
            "qubes_seal_top_files": top,
            "target_mib": TARGET_MIB,
            "qubes_seal_added_mib": ours_added,
        }, indent=2))  # fmt: skip
        return 0

    py = sys.executable
    print(f"dracut {dracut_version()}, --no-hostonly --no-kernel --no-compress, "
          f"QUBES_SEAL_PYTHON={py}{' (with sources)' if args.sources else ''}\n")  # fmt: skip
    header = ("image", "cpio MiB", "unpacked MiB", "added MiB", "files", "added files",
              "build s")  # fmt: skip
    rows = []
    for b in builds:
        rows.append((
            b.name,
            f"{b.image_bytes / MIB:.1f}",
            f"{b.unpacked_bytes / MIB:.1f}",
            "-" if b is baseline else f"{(b.unpacked_bytes - baseline.unpacked_bytes) / MIB:+.1f}",
            str(len(b.files)),
            "-" if b is baseline else f"{len(b.files) - len(baseline.files):+d}",
            f"{b.seconds:.1f}",
        ))  # fmt: skip
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))  # fmt: skip
    verdict = "under" if ours_added < TARGET_MIB else "OVER"
    clevis_added = (clevis.unpacked_bytes - baseline.unpacked_bytes) / MIB
    print(f"\nqubes-seal adds {ours_added:.1f} MiB: {verdict} the {TARGET_MIB:g} MiB target; "
          f"clevis adds {clevis_added:.1f} MiB.")  # fmt: skip
    print("\nWhat qubes-seal adds, by kind:")
    for k, s in sorted(by_kind.items(), key=lambda kv: kv[1], reverse=True):
        print(f"  {s / MIB:6.2f} MiB  {k}")
    print("\nThe 10 biggest files qubes-seal adds:")
    for p, s in top:
        print(f"  {s / MIB:6.2f} MiB  {p}")
    return 0


def dracut_version() -> str:
    proc = subprocess.run(["dracut", "--version"], capture_output=True, text=True)
    return proc.stdout.strip().split()[-1] if proc.stdout.strip() else "?"


if __name__ == "__main__":
    sys.exit(main())
