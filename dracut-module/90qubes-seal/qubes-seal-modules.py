#!/usr/bin/env python3
"""Compute the Python files the initramfs needs for ``python3 -m qubes_seal.boot``.

Run by ``module-setup.sh`` with the interpreter named by ``QUBES_SEAL_PYTHON`` (a virtual
environment's python works: its site-packages are the ones used).  Nothing is listed by hand:

1. Starting from ``qubes_seal/boot/__main__.py``, the source of every qubes_seal module the
   boot path can reach is parsed (``ast``), *including the imports made inside functions*
   (the boot path imports lazily); the closure over qubes_seal's own modules is taken, and
   every import statement that leaves qubes_seal (stdlib, tpm2_pytss, cryptography, argon2,
   pyudev, ...) is recorded.  Imports under ``if TYPE_CHECKING:`` are skipped.
2. A fresh interpreter imports all of them, plus ``runpy`` (``-m``), and reports every module
   in ``sys.modules`` with its file: the third-party packages' own imports, and the modules
   the interpreter itself loads at start-up, are thus included by construction.  Modules that
   only this build host's ``site`` loaded from site-packages (``.pth`` hooks such as an
   editable install's finder) are left out: the image has no ``.pth`` files.
3. Each module is mapped to its place in the image *by its module name*: everything goes
   under ``/usr/lib/pythonX.Y/`` (the standard library directory of an interpreter installed
   as ``/usr/bin/python3``, on ``sys.path`` with no site, ``.pth`` or environment variable),
   the standard library's extension modules under ``/usr/lib/pythonX.Y/lib-dynload/``.
   Python sources are compiled here to ``unchecked-hash`` ``.pyc`` files (never re-validated
   nor rewritten at boot), with the image path as their file name for tracebacks.

Output, one record a line, tab-separated (read by module-setup.sh):

    interpreter  REAL-PATH         the real interpreter (a venv's python resolved)
    dir          DST               a directory to create (lib-dynload: the interpreter's
                                   prefix landmark)
    file         SRC  DST          a Python source, compiled file or data file
    native       SRC  DST          an extension module (install with its library deps)
    library      SRC               a shared library mapped while importing (ctypes, deps)

``--list`` prints the module names and their source files instead (for humans and tests).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import py_compile
import subprocess
import sys
import sysconfig
from pathlib import Path

FIRST_PARTY = "qubes_seal"
ENTRY = "qubes_seal.boot.__main__"
#: Imported by the interpreter for ``python3 -m``, before our code runs.
RUNTIME = ("runpy",)
#: The codecs Python may need for a console or locale other than UTF-8 (tiny).
CODECS = ("encodings.utf_8", "encodings.ascii", "encodings.latin_1", "encodings.aliases")


# -- 1. the static closure over qubes_seal ---------------------------------------------------


def _is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


#: An import statement whose line carries this comment is made only by code the boot sequence
#: never runs (sealing, provisioning: they need tpm2-pytss's full ESAPI).  tests/test_esys_ctypes.py
#: runs the boot sequence's success and failure paths and checks that tpm2_pytss is never
#: imported, which keeps these markers honest; the chroot test proves the image complete.
NOT_BOOT = "# not on the boot path"


def _imports(
    tree: ast.AST, module: str, is_package: bool, lines: list[str] | None = None
) -> set[str]:
    """Absolute names of every import in ``tree`` (module level and inside functions)."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if (
            isinstance(node, (ast.Import, ast.ImportFrom))
            and lines is not None
            and NOT_BOOT in lines[node.lineno - 1]
        ):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            if prefix and prefix != "__future__":
                found.add(prefix)
                # ``from X import Y``: Y may be a submodule (``from . import chain``).
                found.update(f"{prefix}.{alias.name}" for alias in node.names)
        for sub in ast.iter_child_nodes(node):
            visit(sub)

    visit(tree)
    return found


def _spec(name: str) -> importlib.machinery.ModuleSpec | None:
    try:
        return importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):
        return None


def closure(entry: str = ENTRY) -> tuple[list[str], list[str]]:
    """(qubes_seal modules reachable from ``entry``, the imports that leave qubes_seal)."""
    ours: set[str] = set()
    outside: set[str] = set()
    todo = [entry]
    while todo:
        name = todo.pop()
        if name in ours:
            continue
        spec = _spec(name)
        if spec is None or spec.origin is None or not spec.origin.endswith(".py"):
            continue  # ``from .x import SomeClass``: not a module
        ours.add(name)
        parts = name.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # parent packages
        source = Path(spec.origin).read_bytes()
        tree = ast.parse(source, spec.origin)
        lines = source.decode("utf-8", "replace").splitlines()
        for imp in _imports(tree, name, spec.submodule_search_locations is not None, lines):
            if imp == FIRST_PARTY or imp.startswith(FIRST_PARTY + "."):
                todo.append(imp)
            elif _spec(imp) is not None:
                outside.add(imp)  # a module (``from X import Class`` names a class)
    return sorted(ours), sorted(outside)


# -- 2. what importing them loads -------------------------------------------------------------

_CHILD = r"""
import sys

before = {n: getattr(m, "__file__", None) for n, m in list(sys.modules.items())}
found = []  # every module an import *found*, even one whose code then raised (an optional
            # part of a package, such as tpm2_pytss.policy raising NotImplementedError)


class Recorder:
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        for finder in sys.meta_path:
            if finder is not cls and hasattr(finder, "find_spec"):
                spec = finder.find_spec(name, path, target)
                if spec is not None:
                    if spec.has_location and spec.origin:
                        pkg = spec.submodule_search_locations is not None
                        found.append([name, spec.name, spec.origin, pkg, False])
                    return spec
        return None


sys.meta_path.insert(0, Recorder)
failed = []
for name in sys.argv[1:]:
    try:
        __import__(name)
    except ImportError:
        failed.append(name)  # ``from X import Class`` recorded as X.Class: expected
sys.meta_path.remove(Recorder)
out = []
for key, mod in list(sys.modules.items()):
    spec = getattr(mod, "__spec__", None)
    out.append([key, getattr(spec, "name", None) or getattr(mod, "__name__", key),
                getattr(mod, "__file__", None), hasattr(mod, "__path__"), key in before])
# Shared libraries loaded while importing (ctypes.CDLL at import time, extension deps).
with open("/proc/self/maps") as maps:
    libs = sorted({line.split(None, 5)[5].strip() for line in maps
                   if len(line.split(None, 5)) == 6 and ".so" in line.split(None, 5)[5]})
print(repr((out + found, failed, libs)))
"""


def loaded_modules(names: list[str]) -> tuple[list[tuple[str, str, bool, bool]], list[str]]:
    """(module name, file, is package, loaded before our imports) for each module loaded,
    and the shared libraries the process had mapped."""
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    mains = [n for n in names if n.endswith(".__main__")]  # importing one would run it
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, *(n for n in names if n not in mains)],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    rows, _failed, libs = ast.literal_eval(proc.stdout.strip().splitlines()[-1])
    for name in mains:
        spec = _spec(name)
        if spec is not None and spec.origin:
            rows.append([name, name, spec.origin, False, False])
    result = []
    seen: set[str] = set()
    for _key, name, file, is_pkg, before in rows:
        if not file or file in seen:
            continue  # built-in, frozen without a file, namespace package
        seen.add(file)
        result.append((name, file, is_pkg, before))
    return result, libs


# -- 3. where each file goes in the image -----------------------------------------------------


def stdlib_dirs() -> tuple[Path, Path]:
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"]).resolve()
    dynload = Path(sysconfig.get_config_var("DESTSHARED") or stdlib / "lib-dynload").resolve()
    return stdlib, dynload


def image_lib() -> Path:
    return Path(f"/usr/lib/python{sys.version_info.major}.{sys.version_info.minor}")


def manifest(pyc_dir: Path | None, *, sources: bool) -> list[tuple[str, ...]]:
    ours, outside = closure()
    names = [*ours, *outside, *RUNTIME, *CODECS]
    stdlib, dynload = stdlib_dirs()
    dest_lib = image_lib()
    dest_dynload = dest_lib / "lib-dynload"
    records: list[tuple[str, ...]] = [
        ("interpreter", str(Path(getattr(sys, "_base_executable", sys.executable)).resolve())),
        ("dir", str(dest_dynload)),
    ]
    modules, libs = loaded_modules(names)
    for name, file, is_pkg, before in modules:
        src = Path(file).resolve()
        in_stdlib = src.is_relative_to(stdlib) or src.is_relative_to(dynload)
        if before and not in_stdlib:
            continue  # a .pth hook of this host's site-packages
        if src.parent == dynload:
            dst = dest_dynload / src.name
        else:
            parts = name.split(".") if is_pkg else name.split(".")[:-1]
            dst = dest_lib.joinpath(*parts, src.name)
        if src.suffix == ".py":
            records.extend(_python_file(src, dst, pyc_dir, sources=sources))
        elif src.suffix == ".so":
            records.append(("native", str(src), str(dst)))
        else:
            records.append(("file", str(src), str(dst)))
    natives = {r[1] for r in records if r[0] == "native"}
    interpreter = Path(records[0][1])
    for lib in libs:
        path = Path(lib).resolve()
        if str(path) not in natives and path != interpreter and path.exists():
            records.append(("library", str(path)))  # installed at its own path, with deps
    return records


def _python_file(
    src: Path, dst: Path, pyc_dir: Path | None, *, sources: bool
) -> list[tuple[str, ...]]:
    if pyc_dir is None:
        return [("file", str(src), str(dst))]
    tag = sys.implementation.cache_tag
    pyc_dst = (
        dst.parent / "__pycache__" / f"{dst.stem}.{tag}.pyc" if sources else dst.with_suffix(".pyc")
    )
    cfile = pyc_dir / pyc_dst.relative_to("/")
    py_compile.compile(str(src), cfile=str(cfile), dfile=str(dst), doraise=True,
                       invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)  # fmt: skip
    out: list[tuple[str, ...]] = [("file", str(cfile), str(pyc_dst))]
    if sources:
        out.append(("file", str(src), str(dst)))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pyc-dir", type=Path, help="compile into this directory, list .pyc")
    parser.add_argument("--no-sources", action="store_true",
                        help="with --pyc-dir: sourceless .pyc files only")  # fmt: skip
    parser.add_argument("--list", action="store_true", help="print module names and files")
    parser.add_argument("--json", action="store_true", help="the closure as JSON")
    args = parser.parse_args()
    if args.json:
        ours, outside = closure()
        print(json.dumps({"qubes_seal": ours, "imports": outside}, indent=2))
        return 0
    if args.list:
        ours, outside = closure()
        modules, libs = loaded_modules([*ours, *outside, *RUNTIME, *CODECS])
        for name, file, _pkg, _before in modules:
            print(f"{name}\t{file}")
        for lib in libs:
            print(f"(library)\t{lib}")
        return 0
    for record in manifest(args.pyc_dir, sources=not args.no_sources):
        print("\t".join(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
