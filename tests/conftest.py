"""Shared fixtures: one fresh swtpm per test, and a proxy that records the TPM commands.

Every test that asks for ``swtpm`` gets its own swtpm process, on free ports, with its state
in the test's ``tmp_path``: no test sees another's PCRs, NV indices or lockout counter.  At
teardown the fixture fails the test (an error "at teardown") if a transient object or a
session is still loaded in the TPM: every TPM handle must be flushed on every path.

The ``swtpm`` marker is added automatically to every test that uses the ``swtpm`` or
``swtpm_proxy`` fixture, so ``pytest -m "not swtpm"`` runs the pure tests only.  Tests are
skipped, with the reason printed (``-ra``), only when the ``swtpm`` binary is missing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from qubes_seal.sim.proxy import CountingProxy
from qubes_seal.sim.swtpm import Swtpm, leaked_handles

if TYPE_CHECKING:
    from machine import Box

# libtss2 prints "ERROR:esys:..." on stderr for every TPM error, refused commands included
# (tests provoke many).  Each libtss2 module reads TSS2_LOG once, at its first log message
# (not when the library is loaded), and keeps that level for the life of the process: a
# fixture that sets the variable (monkeypatch.setenv) is too late as soon as an earlier test
# logged anything.  So it is set here, when pytest imports this file, before any test runs.
# An explicit TSS2_LOG in the environment still wins (TSS2_LOG=all+DEBUG to debug).
os.environ.setdefault("TSS2_LOG", "all+NONE")

SWTPM_FIXTURES = frozenset({"swtpm", "swtpm_proxy"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses a swtpm fixture with ``pytest.mark.swtpm``; put the VM
    tests first.

    ``./run-tests`` runs the suite on every core (pytest-xdist, ``--dist loadgroup``); the VM
    tests are its longest group (about 5 minutes, one VM at a time on one worker), so they
    start first while the other workers share the rest, instead of starting last and
    running alone.
    """
    for item in items:
        if SWTPM_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.swtpm)
    items.sort(key=lambda item: item.get_closest_marker("vm") is None)  # stable


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    """A started swtpm, private to this test; fails the test that leaks a TPM handle."""
    if shutil.which("swtpm") is None:
        pytest.skip("the swtpm binary is not on PATH (Debian package: swtpm)")
    tpm = Swtpm(tmp_path / "swtpm")
    tpm.start()
    try:
        yield tpm
        # A test may have stopped or killed its swtpm on purpose (crash tests): then there is
        # nothing left to leak.
        leaked = leaked_handles(tpm.tcti) if tpm.running else []
    finally:
        tpm.stop()
    if leaked:
        pytest.fail(f"the test left TPM handles loaded: {', '.join(leaked)}", pytrace=False)


@pytest.fixture
def box(swtpm: Swtpm, tmp_path: Path) -> Iterator[Box]:
    """A machine with an initialised container (a launch, ``init`` with a cheap KDF); this
    boot's hand-over is dropped afterwards, so no key stays in root's keyring."""
    # Imported here: this file is also copied alone into pytester runs (tests/test_sim.py).
    from machine import initialised

    from qubes_seal import chain

    b = initialised(swtpm, tmp_path)
    yield b
    if b.container.exists():
        chain.lock(b.container)


@pytest.fixture
def swtpm_proxy(swtpm: Swtpm) -> Iterator[CountingProxy]:
    """A :class:`CountingProxy` in front of this test's swtpm; use ``swtpm_proxy.tcti``."""
    with CountingProxy(swtpm.port) as proxy:
        yield proxy
