"""Per-domain disk keys in memory: :class:`DomainKey` and :class:`Keystore`."""

from __future__ import annotations

import builtins
import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ..secret import Secret
from .errors import DomainExists, QubeUuidMismatch, UnknownDomain
from .names import normalise_uuid, validate_name

KEY_SIZE = 64  # aes-xts-plain64 with a 512-bit key (two AES-256 keys)
KEY_ID_HEX_CHARS = 16


def new_key_id() -> str:
    """16 random hex characters naming a key in logs and listings.

    Random, not derived from the key: a key id says nothing about the key it names.
    """
    return secrets.token_hex(KEY_ID_HEX_CHARS // 2)


def utc_now() -> str:
    """The current time as ISO 8601 UTC, to the second (``2026-01-31T12:00:00+00:00``)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class DomainKey:
    """The disk key of one qube.

    ``generation`` is 1 for a new key and grows with each rotation.  ``extra`` holds fields
    of this entry that this version of qubes-seal does not know (written by a newer one);
    they are kept as read and written back unchanged.
    """

    name: str
    qube_uuid: str | None
    key_id: str
    created: str
    generation: int
    key: Secret = field(repr=False)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def new(cls, name: str, *, qube_uuid: str | None = None) -> DomainKey:
        """A new random 64-byte key for ``name`` (validated), generation 1."""
        return cls(
            name=validate_name(name),
            qube_uuid=None if qube_uuid is None else normalise_uuid(qube_uuid),
            key_id=new_key_id(),
            created=utc_now(),
            generation=1,
            key=Secret.random(KEY_SIZE),
        )

    def public_view(self) -> dict[str, Any]:
        """Name, UUID, key id, creation time and generation: everything but the key."""
        return {
            "name": self.name,
            "qube_uuid": self.qube_uuid,
            "key_id": self.key_id,
            "created": self.created,
            "generation": self.generation,
        }

    def wipe(self) -> None:
        """Zero the key bytes."""
        self.key.wipe()


class Keystore:
    """All per-domain keys, keyed on the qube name and, when known, its UUID.

    ``generation`` is the number of the last write of this keystore; :func:`store` raises it
    by one on each write.  ``extra`` holds top-level fields unknown to this version, kept
    and written back unchanged.  Use as a context manager (or call :meth:`wipe`) to zero
    every key when done.
    """

    def __init__(
        self,
        domains: dict[str, DomainKey] | None = None,
        *,
        generation: int = 0,
        extra: dict[str, Any] | None = None,
        signer: Secret | None = None,
        signer_next: Secret | None = None,
        lockout_auth: Secret | None = None,
    ) -> None:
        self.generation = generation
        #: The 32-byte scalar of the dom0 policy-signing key (ECC P-256), which approves boot
        #: states (:mod:`qubes_seal.signer`); None in keystores written before signed policies.
        self.signer = signer
        #: During ``rotate signer`` only: the new key, kept next to the current one until the
        #: token trusts it (then it replaces ``signer``), so no crash loses the trusted key.
        self.signer_next = signer_next
        #: The TPM's lockout authorization (32 bytes) set by ``qubes-seal tpm
        #: set-lockout-auth``, kept here so the recovery key always gets it back; None when
        #: qubes-seal did not set one (docs/OPERATIONS.md, "TPM lockout authorization").
        self.lockout_auth = lockout_auth
        self.domains: dict[str, DomainKey] = dict(domains or {})
        self.extra: dict[str, Any] = dict(extra or {})
        # Set by remove(): the next store() then also overwrites the previous generation.
        self.keys_removed = False

    def __repr__(self) -> str:
        return f"Keystore(generation={self.generation}, domains={sorted(self.domains)!r})"

    __str__ = __repr__

    def __enter__(self) -> Keystore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()

    def wipe(self) -> None:
        """Zero every key held in memory."""
        for entry in self.domains.values():
            entry.wipe()
        for key in (self.signer, self.signer_next, self.lockout_auth):
            if key is not None:
                key.wipe()

    def add(self, name: str, *, qube_uuid: str | None = None) -> DomainKey:
        """Create and return a new key for ``name``; refuse a name or UUID already present."""
        entry = DomainKey.new(name, qube_uuid=qube_uuid)
        if name in self.domains:
            entry.wipe()
            raise DomainExists(
                f"qube {name!r} already has a key (key id {self.domains[name].key_id})",
                hint="Remove the old key first if the old qube is gone.",
            )
        for other in self.domains.values():
            if entry.qube_uuid is not None and other.qube_uuid == entry.qube_uuid:
                entry.wipe()
                raise DomainExists(
                    f"qube UUID {entry.qube_uuid} already has a key, under the name {other.name!r}"
                )
        self.domains[name] = entry
        return entry

    def _entry(self, name: str) -> DomainKey:
        try:
            return self.domains[name]
        except KeyError:
            raise UnknownDomain(f"no key is stored for qube {name!r}") from None

    def get(self, name: str, *, qube_uuid: str | None = None) -> DomainKey:
        """The key of qube ``name``, if it belongs to the qube with ``qube_uuid``.

        The UUID must match exactly: a key stored with a UUID is given only to a caller that
        names that UUID, and a key stored without one only to a caller that names none.
        Anything else raises :class:`QubeUuidMismatch`, so a new qube that reuses a removed
        qube's name never receives the old qube's key.
        """
        wanted = None if qube_uuid is None else normalise_uuid(qube_uuid)
        entry = self._entry(name)
        if entry.qube_uuid != wanted:
            stored = entry.qube_uuid or "no UUID"
            raise QubeUuidMismatch(
                f"the key stored for qube {name!r} belongs to {stored}, "
                f"not to {wanted or 'no UUID'}: refused",
                hint=(
                    "A qube with this name existed before and was removed; the new qube "
                    "does not receive its key. Remove the old key, then add one for the new "
                    "qube."
                ),
            )
        return entry

    def remove(self, name: str) -> DomainKey:
        """Remove the key of ``name`` and return its entry, with the key bytes zeroed.

        The key is zeroed in memory at once; on the payload, the next :func:`store` overwrites
        both slots (see its ``erase_previous``), so no copy of the key remains there.
        """
        entry = self._entry(name)
        del self.domains[name]
        entry.wipe()
        self.keys_removed = True
        return entry

    def list(self) -> builtins.list[DomainKey]:
        """Every entry, sorted by name."""
        return [self.domains[name] for name in sorted(self.domains)]

    def public_view(self) -> dict[str, Any]:
        """``{"generation": n, "domains": [...]}`` with every field except the keys."""
        return {
            "generation": self.generation,
            "domains": [entry.public_view() for entry in self.list()],
        }
