"""The TPM's lockout authorization: set it, use it to leave a lockout, clear it.

With the empty lockoutAuth of a new (or cleared) TPM, anyone who can send the TPM a command
can run TPM2_DictionaryAttackLockReset and so guess passphrases without limit: the attack
run did 9 wrong guesses, a reset, and the right one worked.  ``qubes-seal tpm
set-lockout-auth`` gives the TPM a random lockoutAuth (32 bytes) and keeps it in the
keystore inside the container, so that whoever opens the container (this boot's TPM and
passphrase unlock, or the recovery key) gets it back, and nobody else.  It is never printed.

Which value the TPM holds is read, never guessed: TPMA_PERMANENT.lockoutAuthSet says whether
the lockoutAuth is empty; when it is not, it is the keystore's.  Trying values is no option:
one wrong lockout authorization locks the lockout hierarchy itself for lockoutRecovery
seconds (TPM 2.0 Part 1, 19.8.6), which is exactly when it is needed.  So every change goes
through the empty value, in an order where a crash at any point leaves a state that
lockoutAuthSet and the keystore describe together (then the command is simply run again):

* set: (only when qubes-seal set one before: TPM old -> empty; a crash after it leaves the
  TPM empty, the keystore old), keystore := new (crash: TPM empty, keystore new), TPM
  empty -> new.  A crash leaves at worst an empty lockoutAuth, which ``status`` reports;
  the value the TPM holds is never one the keystore lacks.
* clear: TPM value -> empty (crash: TPM empty, keystore still has it: the next run drops it),
  keystore := none.
* reset: the keystore's value when lockoutAuthSet, the empty one otherwise.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import AuthorizationError, LockoutError, UsageError
from .journal import crash_point
from .secret import Secret

if TYPE_CHECKING:
    from .chain import Unlocked

FIX = "qubes-seal tpm set-lockout-auth"
NOT_OURS_HINT = (
    "Someone set it with other tools. If you hold that value and want qubes-seal to keep it "
    "instead, set it back to empty first (tpm2_changeauth -c lockout -p file:- with an empty "
    "new value), then run 'qubes-seal tpm set-lockout-auth'. Otherwise use your value: "
    "tpm2_dictionarylockout --clear-lockout -p file:-"
)
WRONG_AUTH_HINT = (
    "The TPM refused the lockout authorization kept in the keystore: it was changed with other "
    "tools. A wrong lockout authorization locks the lockout hierarchy for the TPM's "
    "lockoutRecovery time ('qubes-seal status' shows it); no other value was tried."
)


def warning_lines(is_set: bool) -> list[str]:
    """What ``status`` and ``init`` print about the lockout authorization."""
    if is_set:
        return ["lockout auth:    set (the dictionary-attack lockout cannot be reset by others)"]
    return [
        "lockout auth:    EMPTY. WARNING: anyone who can reach the TPM can reset its "
        "dictionary-attack counter",
        "  (TPM2_DictionaryAttackLockReset) and so guess passphrases without limit. Fix, in a "
        "boot that",
        f"  unlocked the container: {FIX} (a random value, kept in the keystore: the recovery "
        "key gets it back)",
    ]


@contextmanager
def _handed_over(container: Path, *, keyring: str) -> Iterator[Unlocked]:
    """The container through this boot's hand-over; the keystore and key wiped after."""
    from . import chain

    unlocked = chain.open_handed_over(container, keyring=keyring)
    if unlocked is None:
        raise UsageError(
            f"no hand-over of {container} in this boot's {keyring} keyring: the keystore, "
            "which holds the lockout authorization, cannot be read",
            hint="Run this in a boot that unlocked the container ('qubes-seal unlock'), or "
            "after 'qubes-seal recover' (the recovery key) when the TPM is locked out.",
        )
    try:
        yield unlocked
    finally:
        unlocked.keystore.wipe()
        unlocked.close()


def _refuse_while_service_runs(container: Path) -> None:
    from .service import client

    if client.daemon_for(container) is not None:
        raise UsageError(
            "the key service is running: it keeps the keystore in memory and would write it "
            "back without the lockout authorization",
            hint="Stop the key service (systemctl stop qubes-seal-keyd), run this, start it.",
        )


@contextmanager
def _explained() -> Iterator[None]:
    try:
        yield
    except AuthorizationError as exc:
        raise AuthorizationError(exc.message, hint=WRONG_AUTH_HINT) from exc
    except LockoutError as exc:
        raise LockoutError(
            exc.message,
            hint="The lockout hierarchy itself is locked after a wrong lockout authorization: "
            "wait for the TPM's lockoutRecovery time ('qubes-seal status'), then try again.",
        ) from exc


def set_lockout_auth(container: Path, *, tcti: str, keyring: str = "user") -> bool:
    """Give the TPM a new random lockoutAuth, kept in the container's keystore first.

    Returns True when it replaced a value qubes-seal had set, False when it was empty.
    Refuses (:class:`UsageError`) a lockoutAuth set by other tools.
    """
    from .tpm.device import LOCKOUT_AUTH_SIZE, Tpm

    _refuse_while_service_runs(container)
    with _handed_over(container, keyring=keyring) as unlocked, Tpm(tcti) as tpm, _explained():
        ks = unlocked.keystore
        replaced = tpm.lockout_auth_set()
        if replaced:
            if ks.lockout_auth is None:
                raise UsageError(
                    "the TPM's lockout authorization is already set, and this container's "
                    "keystore does not hold it",
                    hint=NOT_OURS_HINT,
                )
            # Through the empty value: lockoutAuthSet then always tells which value it holds.
            tpm.change_lockout_auth(current=ks.lockout_auth, new=None)
        new = Secret.random(LOCKOUT_AUTH_SIZE)
        try:
            if ks.lockout_auth is not None:
                ks.lockout_auth.wipe()
            ks.lockout_auth = Secret(bytes(new.reveal()))
            unlocked.save()  # the keystore first: a crash now leaves the TPM empty
            crash_point("keystore-written")
            tpm.change_lockout_auth(current=None, new=new)
        finally:
            new.wipe()
        return replaced


def _stored(unlocked: Unlocked) -> Secret:
    if unlocked.keystore.lockout_auth is None:
        raise UsageError(
            "the TPM's lockout authorization is set, and this container's keystore does not "
            "hold it",
            hint=NOT_OURS_HINT,
        )
    stored: Secret = unlocked.keystore.lockout_auth
    return stored


def reset_lockout(container: Path, *, tcti: str, keyring: str = "user") -> bool:
    """TPM2_DictionaryAttackLockReset with the keystore's lockoutAuth (or the empty one when
    the TPM has none: then no hand-over is needed).  Returns whether the lockoutAuth is set."""
    from .tpm.device import Tpm

    with Tpm(tcti) as tpm, _explained():
        if not tpm.lockout_auth_set():
            tpm.dictionary_attack_lock_reset(None)
            return False
        with _handed_over(container, keyring=keyring) as unlocked:
            tpm.dictionary_attack_lock_reset(_stored(unlocked))
        return True


def clear_lockout_auth(container: Path, *, tcti: str, keyring: str = "user") -> bool:
    """Set the TPM's lockoutAuth back to empty, then drop it from the keystore.  Returns
    whether the TPM had one."""
    from .tpm.device import Tpm

    _refuse_while_service_runs(container)
    with _handed_over(container, keyring=keyring) as unlocked, Tpm(tcti) as tpm, _explained():
        was_set = tpm.lockout_auth_set()
        if was_set:
            tpm.change_lockout_auth(current=_stored(unlocked), new=None)
        ks = unlocked.keystore
        if ks.lockout_auth is not None:
            ks.lockout_auth.wipe()
            ks.lockout_auth = None
            unlocked.save()
        return was_set
