"""Real RPM packages for the vouching tests: built with rpmbuild (Debian's ``rpm`` package),
registered in a private database (``rpm --dbpath DIR -i --justdb``), and the
/etc/default/grub that gives a boot's command lines."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

HAVE_RPMBUILD = shutil.which("rpmbuild") is not None and shutil.which("rpm") is not None
needs_rpmbuild = pytest.mark.skipif(
    not HAVE_RPMBUILD, reason="rpmbuild is not installed (Debian package: rpm)"
)


@dataclass
class Package:
    name: str
    version: str
    files: dict[str, bytes]  # absolute path in the package -> content
    ghosts: list[str] = field(default_factory=list)  # %ghost paths (no digest)


def build_rpms(folder: Path, packages: list[Package], *, digest_algo: int = 8) -> list[Path]:
    """One spec, one subpackage per ``packages`` entry, built with rpmbuild; the RPM files.

    ``digest_algo``: RPM's file digest algorithm (8 SHA-256, the default; 1 MD5).
    """
    if not HAVE_RPMBUILD:
        pytest.skip("rpmbuild is not installed (Debian package: rpm)")
    top = folder / "rpmbuild"
    src = top / "SOURCES"
    src.mkdir(parents=True, exist_ok=True)
    spec = [
        "Name: qubes-seal-test-files", "Version: 1", "Release: 1", "Summary: test",
        "License: MIT", "BuildArch: noarch", "%description", "test",
        "%define debug_package %{nil}", "%define __os_install_post %{nil}",
    ]  # fmt: skip
    install, files_sections = ["%install"], []
    n = 0
    for pkg in packages:
        spec += [f"%package -n {pkg.name}", f"Version: {pkg.version}", "Summary: test",
                 f"%description -n {pkg.name}", "test"]  # fmt: skip
        section = [f"%files -n {pkg.name}"]
        for path, data in pkg.files.items():
            (src / f"f{n}").write_bytes(data)
            install.append(f"install -D -m 0644 %{{_sourcedir}}/f{n} '%{{buildroot}}{path}'")
            section.append(f'"{path}"')
            n += 1
        for path in pkg.ghosts:
            install.append(f"mkdir -p \"$(dirname '%{{buildroot}}{path}')\"")
            install.append(f"touch '%{{buildroot}}{path}'")
            section.append(f'%ghost "{path}"')
        files_sections += section
    (top / "t.spec").write_text("\n".join([*spec, *install, *files_sections]) + "\n")
    res = subprocess.run(
        ["rpmbuild", "-bb", "--define", f"_topdir {top}", "--define", f"_sourcedir {src}",
         "--define", f"_binary_filedigest_algorithm {digest_algo}", str(top / "t.spec")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return sorted((top / "RPMS").rglob("*.rpm"))


def install(dbpath: Path, rpms: list[Path]) -> Path:
    """Register ``rpms`` as installed in the private database ``dbpath`` (files untouched)."""
    dbpath.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["rpm", "--dbpath", str(dbpath), "-i", "--justdb", "--nodeps", "--noscripts",
         *map(str, rpms)], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stdout + res.stderr
    return dbpath


def packaged(folder: Path, packages: list[Package], *, digest_algo: int = 8) -> Path:
    """Build ``packages`` and install them into a new ``folder/rpmdb``: the database's path."""
    for old in (folder / "rpmdb", folder / "rpmbuild"):  # a second call replaces the first
        shutil.rmtree(old, ignore_errors=True)
    return install(folder / "rpmdb", build_rpms(folder, packages, digest_algo=digest_algo))


def default_grub(path: Path, values: dict[str, str]) -> Path:
    """An /etc/default/grub setting ``values`` (shell-quoted, as a user would write them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items()))
    path.chmod(0o644)
    return path


def default_grub_for(path: Path, xen_cmdline: str, kernel_cmdline: str) -> Path:
    """The /etc/default/grub whose 20_qubes_seal_tboot entry has these module strings."""
    words = kernel_cmdline.split()
    if len(words) >= 2 and words[0].startswith("root=") and words[1] == "ro":
        root, rest = words[0].removeprefix("root="), words[2:]
    else:
        root, rest = "", words
    return default_grub(path, {"GRUB_CMDLINE_XEN_DEFAULT": xen_cmdline,
                               "GRUB_QUBES_SEAL_ROOT": root,
                               "GRUB_CMDLINE_LINUX": " ".join(rest)})  # fmt: skip
