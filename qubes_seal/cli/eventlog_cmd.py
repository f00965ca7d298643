"""``qubes-seal eventlog show|replay|verify``: reading TCG and TXT event logs."""

from __future__ import annotations

from typing import Any


def register(sub: Any) -> None:
    """Add the ``eventlog`` command to the CLI's subparsers (filled in by the eventlog work)."""
