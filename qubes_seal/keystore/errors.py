"""Errors of the keystore, all under :class:`~qubes_seal.errors.QubesSealError`.

Messages hold names, UUIDs, key ids and generations (public values), never key bytes.
"""

from __future__ import annotations

from ..errors import AuthorizationError, CorruptState, QubesSealError, UsageError


class DomainExists(UsageError):
    """``add`` of a name (or qube UUID) that already has a key."""


class UnknownDomain(UsageError):
    """No key is stored under that name."""


class QubeUuidMismatch(AuthorizationError):
    """The stored key belongs to another qube (same name, other UUID): refused.

    A qube name can be reused after the qube is removed; the new qube must never receive the
    old qube's key, so a lookup must name the same UUID as the one stored (or none, when
    none is stored).
    """


class KeystoreFull(QubesSealError):
    """The encoded keystore does not fit in one slot of the payload."""


class ContainerResized(CorruptState):
    """The payload is not the size the newest keystore record was laid out for (exit 7).

    The container was grown or shrunk without ``qubes-seal grow``: reading it by its new
    size could miss the newest copy of the keystore, and writing could destroy it, so
    neither happens.
    """


class GrowInterrupted(CorruptState):
    """A ``qubes-seal grow`` was interrupted: the keystore is readable, not writable."""

    hint = "Run 'qubes-seal repair' (in a boot that unlocked the container) to finish it."


class StaleKeystore(QubesSealError):
    """The keystore was changed on disk since this copy was loaded; nothing was written."""

    hint = "Load the keystore again and repeat the change."
