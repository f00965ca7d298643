"""TSS2 / TPM response codes, and their meaning for a user of qubes-seal.

TPM 2.0 Part 2, 6.6 (TPM_RC).  A format-one code (bit 7 set) carries a handle, session or
parameter number in bits 8-11 that we strip to find the error itself.  libtss2 puts its own
layer in bits 16-23: layer 0 is the TPM, the others are software layers (ESYS, TCTI, ...).
"""

from __future__ import annotations

from ..errors import (
    AuthorizationError,
    LockoutError,
    MeasurementMismatch,
    QubesSealError,
    TPMError,
    TPMUnavailable,
)

RC_FMT1 = 0x080
RC_WARN = 0x900
TPM_RC_VALUE = RC_FMT1 + 0x004
TPM_RC_HANDLE = RC_FMT1 + 0x00B
TPM_RC_AUTH_FAIL = RC_FMT1 + 0x00E
TPM_RC_POLICY_FAIL = RC_FMT1 + 0x01D
TPM_RC_INTEGRITY = RC_FMT1 + 0x01F
TPM_RC_BAD_AUTH = RC_FMT1 + 0x022
TPM_RC_LOCALITY = 0x907
TPM_RC_LOCKOUT = RC_WARN + 0x021
TPM_RC_RETRY = RC_WARN + 0x022
TPM_RC_PCR_CHANGED = RC_WARN + 0x027
TPM_RC_REFERENCE_H0 = RC_WARN + 0x010  # 0x910 .. 0x916: handle not loaded
TPM_RC_REFERENCE_H6 = RC_WARN + 0x016
TPM_RC_INITIALIZE = 0x100
TPM_RC_FAILURE = 0x101
TPM_RC_POLICY = 0x126  # TPM2_PolicyNV and others: the comparison failed

LAYER_SHIFT = 16
TSS2_TCTI_LAYER = 10
TSS2_SYS_LAYER = 8
TSS2_ESYS_LAYER = 7
TSS2_RESMGR_LAYER = 11
TSS2_RESMGR_TPM_LAYER = 12
TSS2_BASE_RC_IO_ERROR = 9
TSS2_BASE_RC_NO_CONNECTION = 15
TSS2_BASE_RC_TRY_AGAIN = 10


def layer(rc: int) -> int:
    """The libtss2 layer that produced ``rc`` (0 = the TPM itself)."""
    return (rc >> LAYER_SHIFT) & 0xFF


def base(rc: int) -> int:
    """The TPM error without its handle/session/parameter number, or the TSS base code."""
    low = rc & 0xFFFF
    if layer(rc) not in (0, TSS2_RESMGR_TPM_LAYER):
        return low & 0xFFF
    if low & RC_FMT1:
        return low & 0xBF
    return low


def describe(rc: int) -> str:
    """A short, stable text for a response code, e.g. ``TPM_RC_POLICY_FAIL (0x99d)``."""
    names = {
        TPM_RC_VALUE: "TPM_RC_VALUE",
        TPM_RC_HANDLE: "TPM_RC_HANDLE",
        TPM_RC_AUTH_FAIL: "TPM_RC_AUTH_FAIL",
        TPM_RC_POLICY_FAIL: "TPM_RC_POLICY_FAIL",
        TPM_RC_INTEGRITY: "TPM_RC_INTEGRITY",
        TPM_RC_BAD_AUTH: "TPM_RC_BAD_AUTH",
        TPM_RC_LOCALITY: "TPM_RC_LOCALITY",
        TPM_RC_LOCKOUT: "TPM_RC_LOCKOUT",
        TPM_RC_RETRY: "TPM_RC_RETRY",
        TPM_RC_PCR_CHANGED: "TPM_RC_PCR_CHANGED",
        TPM_RC_INITIALIZE: "TPM_RC_INITIALIZE",
        TPM_RC_FAILURE: "TPM_RC_FAILURE",
        TPM_RC_POLICY: "TPM_RC_POLICY",
    }
    if layer(rc) in (0, TSS2_RESMGR_TPM_LAYER):
        return f"{names.get(base(rc), 'TPM error')} (0x{rc:x})"
    return f"TSS2 layer {layer(rc)} error {base(rc)} (0x{rc:x})"


def is_connection_error(rc: int) -> bool:
    """True when ``rc`` says the TPM could not be reached (TCTI I/O, no connection)."""
    return layer(rc) == TSS2_TCTI_LAYER or (
        base(rc)
        in (
            TSS2_BASE_RC_IO_ERROR,
            TSS2_BASE_RC_NO_CONNECTION,
        )
        and layer(rc) != 0
    )


def to_error(rc: int, *, action: str, tcti: str) -> QubesSealError:
    """Map a failed command's response code to the qubes-seal error a user should see."""
    what = f"{action}: {describe(rc)}"
    if is_connection_error(rc):
        return TPMUnavailable(
            f"TPM unavailable through TCTI '{tcti}' ({action} failed: {describe(rc)})",
            hint="Is the TPM present and its driver loaded? Choose another with --tpm or "
            "QUBES_SEAL_TPM (e.g. device:/dev/tpmrm0, swtpm:host=127.0.0.1,port=2321).",
        )
    b = base(rc)
    if layer(rc) in (0, TSS2_RESMGR_TPM_LAYER):
        if b == TPM_RC_LOCKOUT:
            return LockoutError(
                f"the TPM is in dictionary-attack lockout ({action} refused)",
                hint="Too many wrong authorizations. Wait for the TPM's recovery interval "
                "(see 'qubes-seal status'), or reset the lockout with the lockout "
                "authorization (tpm2_dictionarylockout --clear-lockout).",
            )
        if b in (TPM_RC_POLICY_FAIL, TPM_RC_PCR_CHANGED):
            return MeasurementMismatch()
        if b in (TPM_RC_AUTH_FAIL, TPM_RC_BAD_AUTH):
            return AuthorizationError(f"authorization refused by the TPM ({what})")
    return TPMError(f"TPM command failed: {what}")
