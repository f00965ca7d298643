"""Proof of a clean boot: a text or a TOTP code that only a genuine boot can show.

Before typing the passphrase, the user must know that the machine booted the approved
software; otherwise a tampered boot could simply ask for the passphrase and keep it.  As Qubes
Anti Evil Maid and tpm2-totp do, a secret is sealed to the boot's measurements alone (PCR 13,
17, 18, no passphrase): a genuine boot unseals it and shows it, a tampered one cannot.

* ``text``: a phrase the user chose (and would notice missing or wrong);
* ``totp``: a 20-byte seed; the boot shows the current 6-digit RFC 6238 code, which the user
  compares with an authenticator app on a phone (a replayed screenshot shows a stale code).

The sealed proof lives in the container's ``qubes-seal`` token beside the master secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from .errors import CorruptState, UsageError
from .secret import Secret
from .state import PcrState, SealedState

KINDS = ("text", "totp")
TOTP_STEP = 30
TOTP_DIGITS = 6
SEED_SIZE = 20
MAX_TEXT = 256


def totp(
    seed: bytes, *, at: float | None = None, step: int = TOTP_STEP, digits: int = TOTP_DIGITS
) -> str:
    """RFC 6238 TOTP (HMAC-SHA1) of ``seed`` at time ``at`` (default: now)."""
    counter = int((time.time() if at is None else at) // step)
    mac = hmac.new(seed, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = mac[-1] & 0x0F
    code = (struct.unpack(">I", mac[offset : offset + 4])[0] & 0x7FFFFFFF) % (10**digits)
    return str(code).zfill(digits)


def otpauth_uri(seed: bytes, *, label: str = "qubes-seal boot", issuer: str = "qubes-seal") -> str:
    """The ``otpauth://`` URI authenticator apps read (Key Uri Format)."""
    secret = base64.b32encode(seed).decode().rstrip("=")
    name = label.replace(" ", "%20")
    return (
        f"otpauth://totp/{issuer}:{name}?secret={secret}&issuer={issuer}"
        f"&algorithm=SHA1&digits={TOTP_DIGITS}&period={TOTP_STEP}"
    )


def qr_code(text: str) -> str | None:
    """The QR code of ``text`` for a terminal (qrencode), or None if qrencode is missing.

    ``text`` goes to qrencode on stdin, never in its argv.
    """
    exe = shutil.which("qrencode")
    if exe is None:
        return None
    proc = subprocess.run(
        [exe, "-t", "UTF8", "-o", "-"], input=text.encode(), capture_output=True, check=False
    )
    return proc.stdout.decode() if proc.returncode == 0 else None


@dataclass
class Proof:
    """The sealed proof of a token: its kind and sealed object."""

    kind: str
    sealed: SealedState

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "sealed": self.sealed.to_dict()}

    @classmethod
    def from_json(cls, doc: Any, *, source: str) -> Proof:
        if not isinstance(doc, dict) or doc.get("kind") not in KINDS:
            raise CorruptState(f"{source}: malformed proof of a clean boot")
        return cls(str(doc["kind"]), SealedState.from_dict(doc.get("sealed"), source=source))


def seal_proof(
    tpm: Any, *, kind: str, value: Secret, master: SealedState, signer: Any = None
) -> Proof:
    """Seal ``value`` to the master secret's PCR states, with no authorization.

    With ``signer`` (the dom0 policy-signing key) and a master object bound to the rollback
    counter, the proof uses signed policies too: an update then re-signs it, no reseal."""
    from .tpm.seal import seal_to_states  # not on the boot path

    if kind not in KINDS:
        raise UsageError(f"unknown proof kind {kind!r}: text or totp")
    states = [PcrState(s.label, dict(s.values)) for s in master.pcr_states]
    sealed = seal_to_states(
        tpm,
        value,
        pcrs=master.pcrs,
        states=states,
        bank=master.pcr_bank,
        require_launch=master.require_launch,
        nv=master.nv if signer is not None else None,
        signer=signer if master.nv is not None else None,
    )
    return Proof(kind, sealed)


def reveal(proof: Proof, *, tcti: str, at: float | None = None) -> str:
    """What the boot shows: the text, or the current TOTP code.  Refused when tampered."""
    from .tpm.unseal import unseal

    with unseal(proof.sealed, tcti=tcti) as value:
        if proof.kind == "text":
            return value.reveal().decode("utf-8", "replace")
        return totp(value.reveal(), at=at)


def new_value(kind: str, text: str | None) -> Secret:
    """The value to seal: the user's text, or a fresh TOTP seed."""
    if kind == "text":
        if not text:
            raise UsageError("give the text to show at boot with --text")
        data = text.encode()
        if len(data) > MAX_TEXT:
            raise UsageError(f"the proof text is at most {MAX_TEXT} bytes")
        return Secret(data)
    return Secret.random(SEED_SIZE)
