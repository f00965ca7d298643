"""The VM test's marker (pyproject.toml's list is not this folder's to edit)."""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "vm: boots our initramfs in QEMU with swtpm as the VM's TPM (docs/VM-TEST.md)"
    )
