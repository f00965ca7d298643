"""The dom0 RPM (issue 16, item 1): ``scripts/build-rpm`` builds it with a real rpmbuild
(Debian's, with the test-only macros of rpm/test-macros), and what ``rpm -qp`` says of it
matches docs/INSTALL.md: the file list (both ways), the %config(noreplace) files, the
scriptlets (no reseal, no TPM, no qubes-seal at all), the Requires in Fedora's names, the
modes.  The payload is unpacked (rpm2cpio) and compared with the tree byte for byte; its
``qubes-seal`` command runs from there and its configuration files parse with the real
loaders.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD = REPO / "scripts" / "build-rpm"
INSTALL_MD = REPO / "docs" / "INSTALL.md"

HAVE_RPMBUILD = all(shutil.which(c) for c in ("rpmbuild", "rpm", "rpm2cpio", "cpio"))
pytestmark = [
    pytest.mark.skipif(
        not HAVE_RPMBUILD,
        reason="rpmbuild, rpm, rpm2cpio or cpio is not installed (Debian package: rpm)",
    ),
    # The package is built once per module: its tests stay on one pytest-xdist worker.
    pytest.mark.xdist_group("rpm"),
]

FEDORA_REQUIRES = (
    "python3-tpm2-pytss",
    "python3-cryptography",
    "python3-argon2-cffi",
    "python3-pyudev",
    "cryptsetup",
    "tpm2-tss",
    "tboot",
    "dracut",
    "systemd",
    "rpm",
)
NOREPLACE = (
    "/etc/qubes-seal/config.toml",
    "/etc/qubes-seal/launch.toml",
    "/etc/qubes/policy.d/50-qubes-seal.policy",
)
RPMFILE_CONFIG = 1 << 0
RPMFILE_NOREPLACE = 1 << 4

# Installed path -> its source in the tree (installed byte for byte).
DRACUT = "/usr/lib/dracut/modules.d/90qubes-seal/"
FROM_TREE = {
    **{DRACUT + name: "dracut-module/90qubes-seal/" + name for name in (
        "module-setup.sh", "qubes-seal-modules.py", "qubes-seal-unlock.service")},
    "/etc/grub.d/20_qubes_seal_tboot": "grub-snippets/20_qubes_seal_tboot",
    "/usr/lib/systemd/system/qubes-seal-keyd.service": "systemd/qubes-seal-keyd.service",
    "/usr/lib/systemd/system/qubes-seal-reseal.path": "systemd/qubes-seal-reseal.path",
    "/usr/lib/systemd/system/qubes-seal-reseal.service": "systemd/qubes-seal-reseal.service",
    "/usr/libexec/qubes-seal/qubes-seal-reseal-on-update": "systemd/qubes-seal-reseal-on-update",
    "/usr/lib/kernel/install.d/60-qubes-seal.install": "kernel-install/60-qubes-seal.install",
    "/etc/qubes-rpc/qubes.SealGetDiskKey": "qrexec/qubes.SealGetDiskKey",
    "/etc/qubes/policy.d/50-qubes-seal.policy": "qrexec/50-qubes-seal.policy",
    "/etc/qubes-seal/config.toml": "config/config.toml",
    "/etc/qubes-seal/launch.toml": "config/launch.toml",
    "/usr/share/qubes-seal/boot.toml.example": "config/boot.toml.example",
}  # fmt: skip
EXECUTABLES = (
    "/usr/bin/qubes-seal",
    "/usr/bin/qubes-seal-storage-agent",
    DRACUT + "module-setup.sh",
    "/etc/grub.d/20_qubes_seal_tboot",
    "/usr/libexec/qubes-seal/qubes-seal-reseal-on-update",
    "/usr/lib/kernel/install.d/60-qubes-seal.install",
    "/etc/qubes-rpc/qubes.SealGetDiskKey",
)


@dataclass(frozen=True)
class FileEntry:
    path: str
    mode: int
    flags: int
    link: str


@dataclass(frozen=True)
class Built:
    rpm: Path
    srpm: Path
    stdout: str
    seconds: float
    files: dict[str, FileEntry]
    root: Path  # the payload, unpacked


def rpm_q(package: Path, *args: str) -> str:
    out = subprocess.run(
        ["rpm", "-qp", *args, str(package)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    import time

    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "QUBES_SEAL_SKIP_APT": "1"}
    start = time.monotonic()
    proc = subprocess.run(
        [str(BUILD), "--outdir", str(out)], capture_output=True, text=True, env=env, timeout=300
    )
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout + proc.stderr
    print(f"scripts/build-rpm: {seconds:.1f} s")
    rpms = sorted(out.glob("*.noarch.rpm"))
    srpms = sorted(out.glob("*.src.rpm"))
    assert len(rpms) == 1 and len(srpms) == 1, sorted(p.name for p in out.iterdir())
    qf = "[%{FILENAMES}\t%{FILEMODES}\t%{FILEFLAGS}\t%{FILELINKTOS}\n]"
    files = {}
    for line in rpm_q(rpms[0], "--qf", qf).splitlines():
        path, mode, flags, link = line.split("\t")
        files[path] = FileEntry(path, int(mode) & 0xFFFF, int(flags), link)
    root = tmp_path_factory.mktemp("payload")
    cpio = subprocess.run(
        f"rpm2cpio '{rpms[0]}' | cpio -idm --quiet --no-absolute-filenames",
        shell=True,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cpio.returncode == 0, cpio.stderr
    return Built(rpms[0], srpms[0], proc.stdout, seconds, files, root)


def documented_paths() -> list[str]:
    """The backquoted absolute paths in the first column of INSTALL.md's table."""
    text = INSTALL_MD.read_text()
    section = text.split("## What it installs, where", 1)[1].split("\n## ", 1)[0]
    paths = []
    for line in section.splitlines():
        m = re.match(r"\| `(/[^`]+)` \|", line)
        if m:
            paths.append(m.group(1))
    return paths


def documented_regex(path: str, version: str) -> re.Pattern[str]:
    pattern = re.escape(path).replace(r"python3\.X", r"python3\.\d+")
    pattern = pattern.replace("VERSION", re.escape(version))
    return re.compile(pattern.rstrip("/") + ("(/.*)?" if path.endswith("/") else "") + r"\Z")


def test_build_outputs_a_noarch_rpm_and_the_source_rpm(built: Built) -> None:
    assert built.rpm.name == "qubes-seal-0.1.0-1.noarch.rpm"
    assert built.srpm.name == "qubes-seal-0.1.0-1.src.rpm"
    assert rpm_q(built.rpm, "--qf", "%{NAME} %{VERSION} %{ARCH}") == "qubes-seal 0.1.0 noarch"
    assert rpm_q(built.rpm, "--qf", "%{SOURCERPM}") == built.srpm.name
    assert rpm_q(built.rpm, "--qf", "%{LICENSE}") == "GPL-2.0-or-later"
    assert sorted(rpm_q(built.srpm, "-l").split()) == ["qubes-seal-0.1.0.tar.gz", "qubes-seal.spec"]
    assert str(built.rpm) in built.stdout and str(built.srpm) in built.stdout
    assert built.seconds < 60


def test_spec_version_is_pyproject_version() -> None:
    spec = (REPO / "rpm" / "qubes-seal.spec").read_text()
    version = re.search(r"^Version:\s*(\S+)", spec, re.M)
    assert version is not None
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert version.group(1) == project["version"]


def test_every_documented_path_is_in_the_package_and_back(built: Built) -> None:
    documented = documented_paths()
    assert len(documented) >= 20, documented
    patterns = [documented_regex(p, "0.1.0") for p in documented]
    for path, pattern in zip(documented, patterns, strict=True):
        assert any(pattern.match(f) for f in built.files), f"INSTALL.md names {path}: not packaged"
    for f, entry in built.files.items():
        if entry.mode & 0o170000 == 0o040000:
            continue  # directories: those the files above live in
        assert any(p.match(f) for p in patterns), f"{f} is packaged but not in INSTALL.md"


def test_file_list_has_what_the_install_needs(built: Built) -> None:
    files = built.files
    for path in FROM_TREE:
        assert path in files, path
    assert "/usr/bin/qubes-seal" in files
    site = [f for f in files if re.fullmatch(r"/usr/lib/python3\.\d+/site-packages/qubes_seal", f)]
    assert len(site) == 1, "the Python package is not under Fedora's site-packages"
    for module in ("__init__.py", "py.typed", "boot/sequence.py", "cli/main.py", "launch.py"):
        assert f"{site[0]}/{module}" in files, module
    assert any(f.endswith(".dist-info/entry_points.txt") for f in files)
    # The dracut module, as dracut expects it: module-setup.sh executable.
    assert files[DRACUT + "module-setup.sh"].mode & 0o111
    # The second qrexec service name is a symlink to the first.
    previous = files["/etc/qubes-rpc/qubes.SealGetPreviousDiskKey"]
    assert previous.link == "qubes.SealGetDiskKey"
    # boot.toml would arm the early-boot unlock before 'qubes-seal init': never installed.
    assert "/etc/qubes-seal/boot.toml" not in files
    # The state directory: owned, 0700, empty (nothing of it is the package's but itself).
    assert files["/var/lib/qubes-seal"].mode == 0o40700
    assert not [f for f in files if f.startswith("/var/lib/qubes-seal/")]
    assert "/usr/share/doc/qubes-seal/INSTALL.md" in files
    assert "/usr/share/doc/qubes-seal/KEYSERVICE.md" in files  # the units' Documentation=


def test_modes(built: Built) -> None:
    for path in EXECUTABLES:
        assert built.files[path].mode == 0o100755, (path, oct(built.files[path].mode))
    for path, entry in built.files.items():
        if entry.link:
            continue  # a symlink's own mode (0777) means nothing
        assert not entry.mode & 0o002, f"{path} is world-writable"
        if path.startswith("/usr/lib/systemd/system/") or path.endswith(".policy"):
            assert entry.mode == 0o100644, path


def test_configuration_is_config_noreplace(built: Built) -> None:
    configs = set(rpm_q(built.rpm, "--configfiles").split())
    assert set(NOREPLACE) <= configs
    for path in NOREPLACE:
        assert built.files[path].flags & RPMFILE_NOREPLACE, path
    # The GRUB snippet is %config, replaced on update: its entries must stay the ones
    # 'qubes-seal predict' reads back.
    grub = built.files["/etc/grub.d/20_qubes_seal_tboot"]
    assert grub.flags & RPMFILE_CONFIG and not grub.flags & RPMFILE_NOREPLACE
    assert configs == {*NOREPLACE, "/etc/grub.d/20_qubes_seal_tboot"}


def test_payload_is_the_tree(built: Built) -> None:
    for installed, source in FROM_TREE.items():
        data = (built.root / installed.lstrip("/")).read_bytes()
        assert data == (REPO / source).read_bytes(), installed


def test_packaged_command_runs(built: Built) -> None:
    """The packaged console script and Python package, not the checkout's."""
    site = next(built.root.glob("usr/lib/python3.*/site-packages"))
    script = built.root / "usr/bin/qubes-seal"
    assert script.read_text().startswith("#!/usr/bin/python3")
    env = {**os.environ, "PYTHONPATH": str(site)}
    probe = "import qubes_seal, sys; print(qubes_seal.__file__)"
    where = subprocess.run(
        [sys.executable, "-c", probe],
        env=env,
        cwd=built.root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert where.stdout.startswith(str(site)), where.stdout + where.stderr
    out = subprocess.run(
        [sys.executable, str(script), "--help"],
        env=env,
        cwd=built.root,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "reseal" in out.stdout


def test_packaged_configuration_parses(built: Built) -> None:
    from qubes_seal import launch
    from qubes_seal.boot.sequence import BootConfig
    from qubes_seal.service import config

    service = config.load(built.root / "etc/qubes-seal/config.toml")
    assert service.storage_domains == {}  # as shipped, nothing is served
    policy = launch.load(built.root / "etc/qubes-seal/launch.toml")
    assert policy.pcrs == launch.DEFAULT_PCRS and policy.require_launch
    boot = BootConfig.load(built.root / "usr/share/qubes-seal/boot.toml.example")
    assert not boot.unsafe_test_mode and not boot.unsafe_no_measured_launch


FORBIDDEN_IN_SCRIPTLETS = (
    re.compile(r"qubes-seal\s+\w"),  # the command, any subcommand (reseal, init, unlock...)
    re.compile(r"qubes-seal-reseal-on-update"),
    re.compile(r"tpm", re.I),  # /dev/tpm*, tpm2_*, TCTI...
    re.compile(r"\b(dracut|grub2?-mkconfig|kernel-install|cryptsetup)\b"),
    re.compile(r"/var/lib/qubes-seal"),
    # systemctl's verbs that start something (try-restart, checked below, only restarts a
    # unit that runs; preset and disable start nothing).
    re.compile(r"systemctl\s+(?:--\S+\s+)*(start|restart|enable|reload-or-restart|isolate)\b"),
)


def test_scriptlets_touch_no_tpm_and_never_reseal(built: Built) -> None:
    scripts = rpm_q(built.rpm, "--scripts")
    assert "systemctl" in scripts
    assert not re.search(r"%[{a-z_]", scripts), "an unexpanded macro in a scriptlet"
    body = [
        line
        for line in scripts.splitlines()
        if line.strip() and not line.lstrip().startswith("#") and "scriptlet (using" not in line
    ]
    for line in body:
        for pattern in FORBIDDEN_IN_SCRIPTLETS:
            assert not pattern.search(line), f"scriptlet line {line!r} matches {pattern.pattern}"
    # Only the key daemon is ever restarted, only if running, only after an update.
    restarts = [line for line in body if "try-restart" in line]
    assert restarts and all("qubes-seal-reseal" not in line for line in restarts)
    assert all("qubes-seal-keyd.service" in line for line in restarts)
    # Nothing is enabled outright at install: preset only (the defaults leave it disabled).
    post = scripts.split("postinstall scriptlet", 1)[1].split("scriptlet (using", 1)[0]
    assert "preset" in post
    assert "qubes-seal-reseal.service" not in post  # started only by its path unit


def test_requires_fedora_names(built: Built) -> None:
    requires = {line.split()[0] for line in rpm_q(built.rpm, "--requires").splitlines()}
    missing = [name for name in FEDORA_REQUIRES if name not in requires]
    assert not missing, f"missing Requires: {missing}"
    # pyproject.toml's lower bounds, on the Fedora names.
    lines = set(rpm_q(built.rpm, "--requires").splitlines())
    fedora = {"tpm2-pytss": "python3-tpm2-pytss", "cryptography": "python3-cryptography",
              "argon2-cffi": "python3-argon2-cffi", "pyudev": "python3-pyudev"}  # fmt: skip
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for dependency in project["dependencies"]:
        name, _, bound = dependency.partition(">=")
        assert f"{fedora[name]} >= {bound}" in lines, dependency
    # No Debian names slipped in.
    assert not requires & {"python3-tpm2-pytss-dev", "cryptsetup-bin", "libtss2-dev", "tpm2-tools"}


def test_build_rpm_usage() -> None:
    bad = subprocess.run([str(BUILD), "--frobnicate"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2
    assert "unknown argument" in bad.stderr
    good = subprocess.run([str(BUILD), "--help"], capture_output=True, text=True, timeout=30)
    assert good.returncode == 0 and "--outdir" in good.stdout


def test_build_rpm_without_rpmbuild_and_apt_skipped(tmp_path: Path) -> None:
    """QUBES_SEAL_SKIP_APT=1 and no rpmbuild on PATH: a clear refusal, no apt-get."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("dirname", "id", "sed", "head"):
        found = shutil.which(tool)
        assert found is not None
        (bin_dir / tool).symlink_to(found)
    env = {"PATH": str(bin_dir), "QUBES_SEAL_SKIP_APT": "1", "HOME": str(tmp_path)}
    out = subprocess.run(
        ["/bin/bash", str(BUILD), "--outdir", str(tmp_path / "dist")],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1
    assert "rpmbuild is missing" in out.stderr
    assert not (tmp_path / "dist").exists()
