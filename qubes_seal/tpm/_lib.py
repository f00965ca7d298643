"""libtss2 process-wide settings shared by both TPM stacks.

The boot path calls Debian's libtss2 through ctypes (:mod:`qubes_seal.tpm.esys`); everything
else (sealing, provisioning, status) uses tpm2-pytss's ESAPI (:mod:`qubes_seal.tpm.device`).
Both end up in the same C libraries, which read ``TSS2_LOG``.
"""

from __future__ import annotations

import os


def quiet_tss_log() -> None:
    """Silence libtss2's own ``ERROR:esys:...`` lines unless the user asked for them.

    The C libraries read ``TSS2_LOG`` when they first log; our own messages say what failed.
    """
    os.environ.setdefault("TSS2_LOG", "all+NONE")
