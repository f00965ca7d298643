"""qubesd's storage stack without Qubes: qubes-core-admin's own code, for tests and demos.

The real qubesd storage code (qubes-core-admin 4.3.50, not on PyPI) is kept next to the
project in ``../shared/vendor/qubes-core-admin`` (``QUBES_CORE_ADMIN`` names another copy),
with upstream's ``test-packages`` stubs for libvirt, dbus and qubesdb.  :func:`setup` puts it
on ``sys.path``, writes the ``qubes.storage``/``qubes.vm`` entry points an installed
qubes-core-admin would have (ours from our installed metadata, or pyproject.toml), and points
qubesd's state directories into a work directory; :func:`new_app` and :func:`add_pools` then
build a ``qubes.Qubes`` app and the pools exactly as ``qvm-pool add`` does.  Shared by
tests/test_qubes_pool.py, tests/vm/dom0/pool_check.py and the demo: nothing else in qubes-seal
imports it, and it imports ``qubes`` only once :func:`setup` ran.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]

#: qubes-core-admin's own entry points (its setup.py) that the storage stack needs
VENDOR_ENTRY_POINTS = """\
[qubes.vm]
AppVM = qubes.vm.appvm:AppVM
TemplateVM = qubes.vm.templatevm:TemplateVM
StandaloneVM = qubes.vm.standalonevm:StandaloneVM
AdminVM = qubes.vm.adminvm:AdminVM
DispVM = qubes.vm.dispvm:DispVM

[qubes.storage]
file = qubes.storage.file:FilePool
file-reflink = qubes.storage.reflink:ReflinkPool
linux-kernel = qubes.storage.kernels:LinuxKernel
callback = qubes.storage.callback:CallbackPool
"""


def vendor_dir() -> Path:
    return Path(
        os.environ.get("QUBES_CORE_ADMIN", ROOT.parent / "shared" / "vendor" / "qubes-core-admin")
    )


def missing() -> str:
    """Why the stack cannot be loaded here ("" when it can)."""
    vendor = vendor_dir()
    if not (vendor / "qubes" / "storage" / "__init__.py").exists():
        return f"qubes-core-admin is not at {vendor} (QUBES_CORE_ADMIN)"
    import importlib.util

    if importlib.util.find_spec("lxml") is None:
        return "qubes-core-admin needs lxml (pip install '.[test]')"
    return ""


def add_vendor_path() -> None:
    vendor = vendor_dir()
    for extra in (vendor / "test-packages", vendor):
        if str(extra) not in sys.path:
            sys.path.insert(0, str(extra))


def ours_from_pyproject() -> dict[str, str]:
    """Our ``qubes.storage`` entry point, as pyproject.toml declares it."""
    doc = tomllib.loads((ROOT / "pyproject.toml").read_text())
    points: dict[str, str] = doc["project"]["entry-points"]["qubes.storage"]
    return points


def write_entry_points(where: Path) -> Path:
    """An installed distribution's metadata under ``where`` (qubesd finds drivers with
    importlib.metadata); ours added unless our own installed metadata has it already (a
    fresh ``scripts/setup``).  Returns the directory to put on ``sys.path``."""
    dist = where / "qubes_test_install-4.3.50.dist-info"
    dist.mkdir(parents=True, exist_ok=True)
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: qubes-test-install\nVersion: 4.3.50\n"
    )
    installed = importlib.metadata.entry_points(group="qubes.storage", name="qubes_seal")
    ours = "".join(f"{k} = {v}\n" for k, v in ours_from_pyproject().items())
    (dist / "entry_points.txt").write_text(VENDOR_ENTRY_POINTS + ("" if installed else ours))
    return where


def setup(
    workdir: Path,
    *,
    set_attr: Callable[[Any, str, Any], None] = setattr,
    prepend_path: Callable[[str], None] | None = None,
) -> None:
    """Load the vendored stack for a pool in ``workdir`` (entry points, qubesd's base and
    volume-state directories there).  ``set_attr``/``prepend_path``: how to change global
    state (a test passes its monkeypatch's, so it is undone)."""
    add_vendor_path()
    ep = write_entry_points(workdir / "ep")
    if prepend_path is not None:
        prepend_path(str(ep))
    elif str(ep) not in sys.path:
        sys.path.insert(0, str(ep))
    importlib.invalidate_caches()
    import qubes.config
    import qubes.storage

    set_attr(qubes.config, "qubes_base_dir", str(workdir / "qubes-base"))
    (workdir / "state").mkdir(exist_ok=True)
    set_attr(qubes.storage, "VOLUME_STATE_DIR", str(workdir / "state") + "/")


def new_app(workdir: Path) -> Any:
    """A ``qubes.Qubes`` app as qubesd's tests make one (offline, nothing loaded)."""
    import qubes

    app = qubes.Qubes(str(workdir / "qubes.xml"), load=False, offline_mode=True)
    app.load_initial_values()
    return app


async def add_pools(app: Any, workdir: Path, sock: Path, **options: str) -> Any:
    """``qvm-pool add inner file-reflink`` (``setup_check=False``, in ``workdir/inner``) and
    ``qvm-pool add vault qubes_seal -o inner_pool=inner``, strings only as admin.pool.Add
    passes them; vault becomes the default pool.  Returns the vault pool."""
    await app.add_pool("inner", driver="file-reflink", dir_path=str(workdir / "inner"),
                       setup_check="False")  # fmt: skip
    await app.add_pool("vault", driver="qubes_seal", inner_pool="inner", key_socket=str(sock),
                       **options)  # fmt: skip
    app.default_pool = "vault"
    return app.pools["vault"]


def add_template(app: Any, name: str, size: int) -> Any:
    """``qvm-create --class TemplateVM --label red NAME`` in the default pool, its private
    and root volumes ``size`` bytes, and its directory made (as qubesd makes it): the qube
    the benchmark, the demo and the VM's pool check drive (not yet created on disk)."""
    sizes = {"private": {"size": str(size)}, "root": {"size": str(size)}}
    vm = app.add_new_vm("TemplateVM", name=name, label="red", kernel=None,
                        volume_config=sizes)  # fmt: skip
    os.makedirs(vm.dir_path, exist_ok=True)
    return vm
