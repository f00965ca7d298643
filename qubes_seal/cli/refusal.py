"""A refused unseal explained by component, for ``unlock``, ``unseal --check`` and ``status``.

The explanation (:mod:`qubes_seal.measure.explain`) is a diagnosis from unauthenticated
inputs: it is added to the error's text and, with ``--json``, printed on stdout as
``{"refused": true, "error": ..., "exit_code": ..., "explanation": {...}}``; the exit code is
the refusal's own (3), whatever the explanation says.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from ..errors import MeasurementMismatch

#: Where the boot wrote this boot's TXT log, and the running kernel's command line.
TXT_LOG_ENV = "QUBES_SEAL_TXT_LOG"
CMDLINE_ENV = "QUBES_SEAL_KERNEL_CMDLINE_FILE"


def txt_log(args: argparse.Namespace) -> str:
    given = getattr(args, "txt_log", None)
    return str(given) if given else os.environ.get(TXT_LOG_ENV, "/run/qubes-seal/txt-event.log")


def cmdline_file() -> str:
    return os.environ.get(CMDLINE_ENV, "/proc/cmdline")


def explain(sealed: Any, current: dict[int, bytes], args: argparse.Namespace) -> Any:
    from ..measure.explain import describe_refusal

    return describe_refusal(sealed, current, txt_log=txt_log(args), cmdline_file=cmdline_file())


def attach(exc: MeasurementMismatch, sealed: Any, args: argparse.Namespace, **doc: Any) -> None:
    """Explain ``exc`` (when the refusal knows this boot's PCRs) and, with ``--json``, print
    the refusal's document (``doc`` first) on stdout.  Never raises: the refusal is what
    matters."""
    try:
        if exc.current is not None and sealed is not None and exc.explanation is None:
            exc.explanation = explain(sealed, exc.current, args)
    except Exception:  # noqa: S110 - a diagnosis never hides the refusal
        pass
    if getattr(args, "json", False):
        out = {
            **doc,
            "refused": True,
            "error": exc.message,
            "exit_code": exc.exit_code,
            "diffs": [{"pcr": p, "expected": e, "actual": a} for p, e, a in exc.diffs],
            "explanation": None if exc.explanation is None else exc.explanation.to_json(),
        }
        print(json.dumps(out, indent=2, sort_keys=True))


def token_state(path: Any) -> Any:
    """The container token's sealed state, unauthenticated (for the explanation only)."""
    from .. import chain
    from ..errors import QubesSealError
    from ..luks.container import Container

    try:
        return chain.read_token(Container(path))[1].sealed
    except (QubesSealError, OSError):
        return None
