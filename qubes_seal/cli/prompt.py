"""Reading passphrases and keys: from a file (automation) or the terminal, never from argv."""

from __future__ import annotations

import getpass
import os
import sys
from pathlib import Path

from ..errors import UsageError
from ..secret import Secret


def read_secret_file(path: Path, what: str) -> Secret:
    """A secret from a file (or ``-`` for stdin): one trailing newline is not part of it."""
    try:
        data = sys.stdin.buffer.read() if str(path) == "-" else path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read the {what} file {path}: {exc.strerror}") from exc
    if data.endswith(b"\n"):
        data = data[:-1]
        if data.endswith(b"\r"):
            data = data[:-1]
    if not data:
        raise UsageError(f"the {what} file {path} is empty")
    return Secret(data)


def ask(what: str, *, path: Path | None, confirm: bool = False) -> Secret:
    """The ``what`` (e.g. "passphrase") from ``path``, else typed twice (``confirm``) or once."""
    if path is not None:
        return read_secret_file(path, what)
    if not (sys.stdin.isatty() and os.isatty(sys.stderr.fileno())):
        raise UsageError(
            f"no terminal to ask the {what} on",
            hint=f"Give it in a file with --{what.replace(' ', '-')}-file FILE "
            f"(or QUBES_SEAL_{what.upper().replace(' ', '_')}_FILE).",
        )
    first = getpass.getpass(f"{what.capitalize()}: ", stream=sys.stderr).encode()
    if not first:
        raise UsageError(f"an empty {what} is not accepted")
    if confirm:
        again = getpass.getpass(f"{what.capitalize()} again: ", stream=sys.stderr).encode()
        if again != first:
            raise UsageError(f"the two {what}s differ")
    return Secret(first)
