"""Our LUKS2 token, and its authentication.

The token (type ``qubes-seal`` in the container's LUKS2 header) carries everything the unlock
needs before the container is open: the sealed object, the accepted boot states and their
signatures, the Argon2id parameters, the pinned SRK, the keyslot numbers.  An evil maid can
rewrite it at will: the header is plaintext and PCR 13 measures the header *without* this
token (it holds PCR 13's own expected value).

So the token is authenticated (docs/DESIGN.md, "The authenticated token"):

- **Before the unlock** nothing in it is trusted.  The TPM enforces what matters: the sealed
  object's authPolicy names the dom0 policy-signing key, so only states that key signed, with
  this boot's PCRs and a counter within bound, unseal the master secret.  A forged state, a
  forged signature, another object: the TPM refuses.
- **Right after the unlock** (the volume key in hand, from the TPM + passphrase, the recovery
  key, or this boot's hand-over) the token's MAC is checked before anything in it steers a
  decision: ``HMAC-SHA256(K, "qubes-seal token v2" || 0 || UUID || 0 || canonical JSON)``,
  ``K = HKDF-SHA256(volume key, info="qubes-seal token mac v2")``.  The canonical JSON is the
  token without ``mac`` and without ``keyslots`` (which cryptsetup itself rewrites when a
  keyslot is killed; qubes-seal never reads it), keys sorted, no blanks, ASCII.  A token that
  fails is refused (:class:`TokenNotAuthentic`, exit 7) with the recovery path offered.

Version 1 tokens (before authentication) are refused the same way: nothing can tell them
from a forgery.  ``qubes-seal recover --reseal`` writes a new, authenticated token.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from . import __version__
from .errors import CorruptState
from .hkdf import hkdf_sha256
from .secret import Secret
from .state import SealedState

if TYPE_CHECKING:
    from .luks.container import Container

TOKEN_TYPE = "qubes-seal"  # noqa: S105 - a LUKS2 token type, not a password
TOKEN_VERSION = 2
MAC_KEY_INFO = b"qubes-seal token mac v2"
MAC_DOMAIN = b"qubes-seal token v2\x00"
#: Fields the MAC does not cover: the MAC itself, and the keyslot list cryptsetup maintains.
UNCOVERED = frozenset({"mac", "keyslots"})
#: The root volume name becomes a file name in /run/cryptsetup-keys.d: no path, no dot-file.
_ROOT_VOLUME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")

RECOVER_HINT = (
    "Open the container with the recovery key ('qubes-seal recover --reseal'): it writes a "
    "new, authenticated token from this boot's measurements and dom0's launch policy."
)


class TokenNotAuthentic(CorruptState):
    """The token's MAC does not verify under the key the unlocked container gives: someone
    rewrote it (or it predates authenticated tokens).  Nothing in it is used."""

    hint = RECOVER_HINT


def mac_key(volume_key: Secret) -> Secret:
    """The token's MAC key, derived from the container's volume key."""
    return Secret(hkdf_sha256(volume_key.reveal(), length=32, info=MAC_KEY_INFO))


def canonical(doc: dict[str, Any]) -> bytes:
    """The covered content of a token document, canonically serialised."""
    covered = {k: v for k, v in doc.items() if k not in UNCOVERED}
    return json.dumps(covered, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def compute_mac(doc: dict[str, Any], key: Secret, uuid: str) -> str:
    data = MAC_DOMAIN + uuid.lower().encode() + b"\x00" + canonical(doc)
    return hmac.new(key.reveal(), data, hashlib.sha256).hexdigest()


def valid_root_volume(name: str) -> bool:
    return 0 < len(name) <= 128 and not name.startswith(".") and set(name) <= _ROOT_VOLUME_CHARS


@dataclass
class Token:
    """Our LUKS2 token: everything the unlock needs, none of it secret."""

    sealed: SealedState
    kdf: dict[str, Any]
    tpm_keyslot: int
    recovery_keyslot: int
    proof: Any = None  # attest.Proof: the sealed proof of a clean boot, if set up
    root_volume: str | None = None  # dom0's root volume, opened with the keystore's "dom0" key
    #: The oldest keystore generation the unlock accepts: an older copy of the container's
    #: data (a removed or rotated domain key still in it) is refused.  Raised with every token
    #: write that follows a keystore change; the counter increment after it voids older tokens.
    keystore_generation: int | None = None
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    tool_version: str = __version__
    #: The document as read from the header (None for a token built in memory): the MAC is
    #: checked over exactly these bytes' content, never over a re-serialisation.
    raw: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    #: Set once :func:`authenticate` verified ``raw`` (or this token was written by us).
    authenticated: bool = field(default=False, repr=False, compare=False)

    def to_json(self) -> dict[str, Any]:
        """The document without its MAC (see :meth:`to_signed_json`)."""
        return {
            "type": TOKEN_TYPE,
            "keyslots": [str(self.tpm_keyslot)],
            "qubes_seal_version": TOKEN_VERSION,
            "tool_version": self.tool_version,
            "created": self.created,
            "tpm_keyslot": self.tpm_keyslot,
            "recovery_keyslot": self.recovery_keyslot,
            "kdf": self.kdf,
            "sealed": self.sealed.to_dict(),
            **({"proof": self.proof.to_json()} if self.proof is not None else {}),
            **({"root_volume": self.root_volume} if self.root_volume else {}),
            **(
                {"keystore_generation": self.keystore_generation}
                if self.keystore_generation is not None
                else {}
            ),
        }

    def to_signed_json(self, key: Secret, uuid: str) -> dict[str, Any]:
        """The document with its MAC under ``key`` (:func:`mac_key`) for container ``uuid``."""
        doc = self.to_json()
        doc["mac"] = compute_mac(doc, key, uuid)
        return doc

    @classmethod
    def from_json(cls, doc: Any, *, source: str) -> Token:
        if not isinstance(doc, dict) or doc.get("type") != TOKEN_TYPE:
            raise CorruptState(f"{source}: not a {TOKEN_TYPE} token", hint=RECOVER_HINT)
        version = doc.get("qubes_seal_version")
        if version != TOKEN_VERSION:
            raise TokenNotAuthentic(
                f"{source}: token version {version!r}; this qubes-seal reads only version "
                f"{TOKEN_VERSION} (authenticated) tokens"
            )
        from .attest import Proof

        try:
            proof = doc.get("proof")
            root_volume = doc.get("root_volume")
            if root_volume is not None and (
                not isinstance(root_volume, str) or not valid_root_volume(root_volume)
            ):
                raise ValueError("bad root volume name")
            generation = doc.get("keystore_generation")
            if generation is not None and (
                not isinstance(generation, int) or isinstance(generation, bool) or generation < 0
            ):
                raise ValueError("bad keystore generation")
            mac = doc.get("mac")
            if not isinstance(mac, str) or len(mac) != 64:
                raise ValueError("no MAC")
            bytes.fromhex(mac)
            return cls(
                proof=None if proof is None else Proof.from_json(proof, source=f"{source} proof"),
                root_volume=root_volume or None,
                keystore_generation=generation,
                sealed=SealedState.from_dict(doc["sealed"], source=f"{source} (sealed object)"),
                kdf=dict(doc["kdf"]),
                tpm_keyslot=_slot(doc["tpm_keyslot"]),
                recovery_keyslot=_slot(doc["recovery_keyslot"]),
                created=str(doc["created"]),
                tool_version=str(doc["tool_version"]),
                raw=doc,
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CorruptState(
                f"{source}: malformed token ({type(exc).__name__})", hint=RECOVER_HINT
            ) from exc

    def authenticate(self, key: Secret, uuid: str, *, source: str = "the token") -> Token:
        """Check the MAC of the document this token was read from; self, or
        :class:`TokenNotAuthentic`.  Call it before anything in the token steers a decision."""
        doc = self.raw
        if doc is None:
            raise TokenNotAuthentic(f"{source} was not read from a container: nothing to check")
        given = doc.get("mac")
        if not isinstance(given, str) or not hmac.compare_digest(
            given.encode(), compute_mac(doc, key, uuid).encode()
        ):
            raise TokenNotAuthentic(
                f"{source} is not authentic: its MAC does not verify under this container's "
                "key (the token was rewritten outside qubes-seal); nothing in it is used"
            )
        self.authenticated = True
        return self


def _slot(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 32:
        raise ValueError("bad keyslot number")
    return value


def read_token(container: Container) -> tuple[int, Token]:
    """Our token from the container, *not yet authenticated*: its id and content; exactly one
    must exist."""
    found = container.find_tokens(TOKEN_TYPE)
    source = f"{container.path}"
    if not found:
        raise CorruptState(
            f"{source} has no {TOKEN_TYPE} token: not a qubes-seal container, or the token "
            "was removed",
            hint=RECOVER_HINT,
        )
    if len(found) > 1:
        raise CorruptState(
            f"{source} has {len(found)} {TOKEN_TYPE} tokens: expected one", hint=RECOVER_HINT
        )
    token_id, doc = next(iter(found.items()))
    return token_id, Token.from_json(doc, source=f"{source} token {token_id}")


def store_token(container: Container, token: Token, key: Secret, *, token_id: int | None) -> int:
    """Write ``token`` with its MAC into ``container`` (replacing ``token_id`` when given)."""
    doc = token.to_signed_json(key, container.uuid)
    if token_id is None:
        new_id = container.import_token(doc)
    else:
        new_id = container.import_token(doc, token_id=token_id, replace=True)
    token.raw = doc
    token.authenticated = True
    return new_id
