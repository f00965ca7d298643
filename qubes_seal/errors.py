"""The one error hierarchy of qubes-seal, and the exit codes the CLI maps it to.

Every error carries a short message (safe to print: it never holds secret material) and a
``diagnostics()`` text that tells the user what to do next.  The CLI catches
:class:`QubesSealError` in one place and exits with :attr:`QubesSealError.exit_code`.

Exit codes (documented in the README and kept stable):

====  ==========================================================
0     success
1     other error
2     usage error (bad flag, bad value)
3     measurements do not match, or no measured launch happened
4     wrong passphrase or authorization
5     TPM in dictionary-attack lockout
6     TPM unavailable
7     corrupted or unknown state, container or keystore
====  ==========================================================
"""

from __future__ import annotations

from typing import Any

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_MEASUREMENT = 3
EXIT_AUTH = 4
EXIT_LOCKOUT = 5
EXIT_TPM_UNAVAILABLE = 6
EXIT_CORRUPT = 7


class QubesSealError(Exception):
    """Base class of every error qubes-seal reports to a user."""

    exit_code = EXIT_ERROR
    hint = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def diagnostics(self) -> str:
        """The message followed by what to do next, ready for the console."""
        if self.hint:
            return f"{self.message}\n{self.hint}"
        return self.message


class UsageError(QubesSealError):
    """A bad flag or value given by the user."""

    exit_code = EXIT_USAGE


class MeasurementMismatch(QubesSealError):
    """The TPM refused to unseal: the PCRs are not in a state the secret was sealed to.

    Every policy failure is reported as this one type (compare pyca/cryptography's
    ``InvalidToken``).  ``diffs`` lists ``(pcr, expected_hex, actual_hex)`` for the PCRs that
    differ; PCR values are public (anyone can read them with TPM2_PCR_Read), so showing them
    leaks nothing.
    """

    exit_code = EXIT_MEASUREMENT
    hint = (
        "The boot measurements differ from those the secret was sealed to. If you did not "
        "update Xen, dom0's kernel or initramfs, do not type your passphrase: this machine "
        "may have been tampered with. After an intended update, use the recovery key."
    )

    def __init__(
        self,
        message: str = "measurements do not match",
        *,
        diffs: list[tuple[int, str, str]] | None = None,
        hint: str | None = None,
    ) -> None:
        super().__init__(message, hint=hint)
        self.diffs = diffs or []
        #: This boot's values of the PCRs compared (None: not known), for the explanation.
        self.current: dict[int, bytes] | None = None
        #: Why, by component (:mod:`qubes_seal.measure.explain`), when a caller added it:
        #: a diagnosis from unauthenticated inputs, shown, never acted upon.
        self.explanation: Any = None

    def diagnostics(self) -> str:
        lines = [self.message]
        for pcr, expected, actual in self.diffs:
            lines.append(f"  PCR {pcr}: expected {expected}")
            lines.append(f"  {'':>{len(str(pcr)) + 4}}  actual   {actual}")
        if self.explanation is not None:
            lines += self.explanation.lines()
        if self.hint:
            lines.append(self.hint)
        return "\n".join(lines)


class NoMeasuredLaunch(MeasurementMismatch):
    """PCR 17 is all 0xFF: no TXT dynamic launch happened in this boot (fail closed)."""

    hint = (
        "PCR 17 still holds its power-on value (all 0xFF): tboot did not perform an Intel TXT "
        "measured launch. Check that TXT is enabled in the firmware, that the SINIT module "
        "matches the CPU, and that the boot entry starts tboot. Nothing is unsealed without "
        "a measured launch."
    )

    def __init__(self, message: str = "no TXT measured launch happened (PCR 17 is all 0xFF)"):
        super().__init__(message)


class AuthorizationError(QubesSealError):
    """Wrong passphrase or authorization value."""

    exit_code = EXIT_AUTH


class LockoutError(QubesSealError):
    """The TPM's dictionary-attack protection is active."""

    exit_code = EXIT_LOCKOUT


class TPMUnavailable(QubesSealError):
    """No TPM could be reached through the TCTI."""

    exit_code = EXIT_TPM_UNAVAILABLE


class TPMError(QubesSealError):
    """The TPM answered with an error that has no more specific meaning for us."""

    exit_code = EXIT_ERROR


class CorruptState(QubesSealError):
    """A state file, container or keystore that is corrupted or of an unknown version."""

    exit_code = EXIT_CORRUPT


class SRKMismatch(CorruptState):
    """The TPM's storage root key is not the key the secret was sealed under."""

    hint = (
        "The TPM's storage root key (persistent handle 0x81000001) is not the key recorded at "
        "sealing time. Either the TPM was cleared, or something replaced the SRK to intercept "
        "the unseal. Nothing was sent to it. Use the recovery key, then seal again."
    )


class RevokedState(MeasurementMismatch):
    """The rollback counter is past this sealed object's bound: a newer object replaced it.

    The TPM's NV counter is incremented by every reseal, rotation and revoke: an older sealed
    object (for example a restored copy of the container's header with its old token) no
    longer satisfies its TPM2_PolicyNV.
    """

    hint = (
        "The container's header or token is older than the TPM's rollback counter allows: "
        "it was replaced (rotation, reseal, revoke) and a copy of the old one was restored. "
        "If you did not restore it yourself, someone rolled the header back. Unlock with "
        "the recovery key ('qubes-seal recover --reseal') to seal again."
    )

    def __init__(
        self,
        message: str = "this sealed object was revoked (a newer one exists): rollback refused",
    ) -> None:
        super().__init__(message)


class NotVouched(QubesSealError):
    """A boot to approve unattended holds a file or command line dom0 does not vouch for.

    /boot is plaintext: only the RPM database, the digests dom0 recorded and /etc/default/grub
    (all on the encrypted root) say which Xen, kernel, initramfs and command lines are dom0's.
    Anything else is approved only by a human at a terminal.
    """

    exit_code = EXIT_CORRUPT
