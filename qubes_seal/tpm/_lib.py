"""Lean access to tpm2-pytss's compiled cffi bindings of libtss2 (ESYS, MU, TCTI loader).

``import tpm2_pytss`` imports its whole Python layer (ESAPI, FAPI, types) and with it
``cryptography.x509``: about 65 ms before the first TPM command.  The unseal path runs at every
boot and is measured against clevis and systemd-creds, so it loads only the extension module
that tpm2-pytss ships (``tpm2_pytss._libtpm2_pytss``), registered under its own name so that a
later ``import tpm2_pytss`` in the same process reuses it.  That takes about 5 ms.

Everything else (sealing, provisioning, status) uses the full ``tpm2_pytss.ESAPI``.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from typing import Any

_MODULE = "tpm2_pytss._libtpm2_pytss"


def quiet_tss_log() -> None:
    """Silence libtss2's own ``ERROR:esys:...`` lines unless the user asked for them.

    The C libraries read ``TSS2_LOG`` when they first log; our own messages say what failed.
    """
    os.environ.setdefault("TSS2_LOG", "all+NONE")


def load() -> tuple[Any, Any]:
    """Return ``(ffi, lib)`` of tpm2-pytss's bindings, loading them without the package."""
    quiet_tss_log()
    mod = sys.modules.get(_MODULE)
    if mod is None:
        spec = importlib.util.find_spec("tpm2_pytss")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("tpm2-pytss is not installed")
        folder = spec.submodule_search_locations[0]
        names = [n for n in os.listdir(folder) if n.startswith("_libtpm2_pytss.")]
        if not names:
            raise ImportError("tpm2-pytss has no compiled bindings (_libtpm2_pytss)")
        path = os.path.join(folder, names[0])
        loader = importlib.machinery.ExtensionFileLoader(_MODULE, path)
        mspec = importlib.util.spec_from_file_location(_MODULE, path, loader=loader)
        if mspec is None:
            raise ImportError(f"cannot load {path}")
        mod = importlib.util.module_from_spec(mspec)
        loader.exec_module(mod)
        sys.modules[_MODULE] = mod
    return mod.ffi, mod.lib
