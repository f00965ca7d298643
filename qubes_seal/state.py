"""The sealed state: what the TPM needs to unseal the master secret, on disk.

Format (JSON, UTF-8, one object; documented in docs/STATE.md)::

    {
      "format": "qubes-seal/sealed-state",
      "version": 1,
      "tool_version": "0.1.0",
      "created": "2026-11-28T07:00:00+00:00",
      "srk": {"handle": "0x81000001", "name": "<hex>", "esys_tr": "<base64>"},
      "object": {"public": "<base64 TPM2B_PUBLIC>", "private": "<base64 TPM2B_PRIVATE>"},
      "pcr_bank": "sha256",
      "pcrs": [17, 18],
      "pcr_states": [{"label": "current", "values": {"17": "<hex>", "18": "<hex>"}}],
      "policy_digest": "<hex>",
      "require_launch": true,
      "auth_value": false,
      "nv": {"handle": "0x01800100", "name": "<hex>", "esys_tr": "<base64>", "bound": 2}
    }

``nv`` (optional; absent in states written before it, and for the state-dir ``seal``): the
TPM NV counter of the rollback protection.  The policy then requires ``counter <= bound``
(TPM2_PolicyNV); every reseal increments the counter past the older objects' bounds.

``signed`` (optional; the container's tokens since signed policies): the object's policy is
PolicyAuthorize over a dom0 policy-signing key (then PolicyAuthValue), and each accepted PCR
state carries that key's signature of its approved policy (PolicyPCR, then PolicyNV with the
``nv`` bound)::

      "signed": {"signer_public": "<base64 TPM2B_PUBLIC>", "signer_name": "<hex>",
                 "policy_ref": "<hex>", "signatures": ["<hex r||s>", ...],
                 "tickets": ["<hex TPMT_TK_VERIFIED>", ...]}

``tickets`` (optional; absent in older tokens): for each signature, the TPM's verification
ticket obtained when dom0 signed the state, so that the boot skips the signature check.
Untrusted input: the TPM checks the ticket's HMAC itself, and a refused one costs a fallback.

The private blob is encrypted by the TPM under the SRK: it is useless without that TPM.  The
file is still written with mode 0600 in a 0700 directory, atomically.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import __version__
from .errors import CorruptState

FORMAT = "qubes-seal/sealed-state"
VERSION = 1
STATE_FILE = "sealed.json"


@dataclass(frozen=True)
class PcrState:
    """One accepted set of PCR values (for example the current boot, or a predicted one)."""

    label: str
    values: dict[int, bytes]
    #: What this boot state was approved from, per component (``events`` in the JSON; see
    #: :mod:`qubes_seal.measure.explain`): only to explain a refusal, never to decide one.
    #: Kept as read (hostile until the token's MAC verified); absent in older states.
    record: dict[str, Any] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class NvBinding:
    """The NV counter a sealed object is bound to, and the highest value it accepts."""

    handle: int
    name: bytes
    esys_tr: bytes  # Esys_TR_Serialize of the index (written): no NV_ReadPublic at unseal
    bound: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "handle": f"0x{self.handle:08x}",
            "name": self.name.hex(),
            "esys_tr": base64.b64encode(self.esys_tr).decode(),
            "bound": self.bound,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> NvBinding:
        bound = doc["bound"]
        if not isinstance(bound, int) or not 0 <= bound < 1 << 64:
            raise ValueError("bad NV bound")
        return cls(
            handle=int(doc["handle"], 16),
            name=bytes.fromhex(doc["name"]),
            esys_tr=base64.b64decode(doc["esys_tr"], validate=True),
            bound=bound,
        )


@dataclass(frozen=True)
class SignedPolicy:
    """Signed policies: the object accepts any boot state the dom0 policy-signing key signed.

    ``public`` is the key's marshalled TPM2B_PUBLIC (loaded with TPM2_LoadExternal at unseal),
    ``name`` its TPM name, ``policy_ref`` the random value that binds the signatures to this
    generation of sealed objects, ``signatures`` one ECDSA ``r || s`` per accepted PCR state,
    over ``H(approvedPolicy || policyRef)``; the approved policy is PolicyPCR of the state,
    then PolicyNV (counter <= the ``nv`` bound).

    ``tickets`` (empty in older tokens): one marshalled TPMT_TK_VERIFIED per signature, the
    TPM's own record that it verified that signature (owner hierarchy: valid across reboots
    until TPM2_Clear).  The boot hands it to TPM2_PolicyAuthorize instead of verifying the
    signature again; the TPM checks its HMAC, so a forged or stale one only costs the
    fallback to TPM2_VerifySignature.  So nothing about them is checked here: a state without
    a ticket (fewer tickets than signatures), or a malformed one, is verified by signature.
    """

    public: bytes
    name: bytes
    policy_ref: bytes
    signatures: tuple[bytes, ...]
    tickets: tuple[bytes, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "signer_public": base64.b64encode(self.public).decode(),
            "signer_name": self.name.hex(),
            "policy_ref": self.policy_ref.hex(),
            "signatures": [s.hex() for s in self.signatures],
        }
        if self.tickets:  # older readers and older MACs: absent, not empty
            doc["tickets"] = [t.hex() for t in self.tickets]
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> SignedPolicy:
        signed = cls(
            public=base64.b64decode(doc["signer_public"], validate=True),
            name=bytes.fromhex(doc["signer_name"]),
            policy_ref=bytes.fromhex(doc["policy_ref"]),
            signatures=tuple(bytes.fromhex(s) for s in doc["signatures"]),
            tickets=tuple(bytes.fromhex(t) for t in doc.get("tickets", [])),
        )
        from .tpm.marshal import name_from_public

        if name_from_public(signed.public) != signed.name:
            raise ValueError("the signer's name does not match its public key")
        return signed


@dataclass
class SealedState:
    """Everything needed to unseal, and to explain a refusal."""

    srk_handle: int
    srk_name: bytes
    srk_esys_tr: bytes
    public: bytes
    private: bytes
    pcr_bank: str
    pcrs: list[int]
    pcr_states: list[PcrState]
    policy_digest: bytes
    require_launch: bool = True
    auth_value: bool = False
    nv: NvBinding | None = None
    signed: SignedPolicy | None = None
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    tool_version: str = __version__

    def to_json(self) -> bytes:
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "tool_version": self.tool_version,
            "created": self.created,
            "srk": {
                "handle": f"0x{self.srk_handle:08x}",
                "name": self.srk_name.hex(),
                "esys_tr": base64.b64encode(self.srk_esys_tr).decode(),
            },
            "object": {
                "public": base64.b64encode(self.public).decode(),
                "private": base64.b64encode(self.private).decode(),
            },
            "pcr_bank": self.pcr_bank,
            "pcrs": self.pcrs,
            "pcr_states": [
                {
                    "label": s.label,
                    "values": {str(k): v.hex() for k, v in sorted(s.values.items())},
                    **({"events": s.record} if s.record is not None else {}),
                }
                for s in self.pcr_states
            ],
            "policy_digest": self.policy_digest.hex(),
            "require_launch": self.require_launch,
            "auth_value": self.auth_value,
            **({"nv": self.nv.to_dict()} if self.nv is not None else {}),
            **({"signed": self.signed.to_dict()} if self.signed is not None else {}),
        }
        return (json.dumps(doc, indent=2) + "\n").encode()

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.to_json())
        return result

    @classmethod
    def from_dict(cls, doc: Any, *, source: str = "sealed state") -> SealedState:
        return cls.from_json(json.dumps(doc).encode(), source=source)

    @classmethod
    def from_json(cls, data: bytes, *, source: str = "sealed state") -> SealedState:
        def bad(why: str) -> CorruptState:
            return CorruptState(
                f"{source} is corrupted: {why}",
                hint="Restore it from a backup, or unlock with the recovery key and seal again.",
            )

        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad("not valid JSON") from exc
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise bad(f"not a {FORMAT} file")
        if doc.get("version") != VERSION:
            raise CorruptState(
                f"{source} has version {doc.get('version')!r}; this qubes-seal "
                f"({__version__}) reads version {VERSION} only",
                hint="Use the qubes-seal version that wrote it, or seal again.",
            )
        try:
            srk: dict[str, Any] = doc["srk"]
            obj: dict[str, Any] = doc["object"]
            pcrs = [int(p) for p in doc["pcrs"]]
            states = [
                PcrState(
                    label=str(s["label"]),
                    values={int(k): bytes.fromhex(v) for k, v in s["values"].items()},
                    record=s["events"] if isinstance(s.get("events"), dict) else None,
                )
                for s in doc["pcr_states"]
            ]
            state = cls(
                srk_handle=int(srk["handle"], 16),
                srk_name=bytes.fromhex(srk["name"]),
                srk_esys_tr=base64.b64decode(srk["esys_tr"], validate=True),
                public=base64.b64decode(obj["public"], validate=True),
                private=base64.b64decode(obj["private"], validate=True),
                pcr_bank=str(doc["pcr_bank"]),
                pcrs=pcrs,
                pcr_states=states,
                policy_digest=bytes.fromhex(doc["policy_digest"]),
                require_launch=bool(doc["require_launch"]),
                auth_value=bool(doc.get("auth_value", False)),
                nv=NvBinding.from_dict(doc["nv"]) if doc.get("nv") is not None else None,
                signed=(
                    SignedPolicy.from_dict(doc["signed"]) if doc.get("signed") is not None else None
                ),
                created=str(doc["created"]),
                tool_version=str(doc["tool_version"]),
            )
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error) as exc:
            raise bad(f"missing or malformed field ({type(exc).__name__})") from exc
        if not state.pcrs or not state.pcr_states or len(state.pcr_states) > 8:
            raise bad("no PCR selection or accepted PCR state")
        for s in state.pcr_states:
            if sorted(s.values) != sorted(state.pcrs):
                raise bad(f"PCR state '{s.label}' does not cover the selected PCRs")
        if state.signed is not None and len(state.signed.signatures) != len(state.pcr_states):
            raise bad("not one signature per accepted PCR state")
        if state.pcr_bank not in ("sha1", "sha256", "sha384", "sha512"):
            raise bad(f"unknown PCR bank {state.pcr_bank!r}")
        return state


def state_path(state_dir: Path) -> Path:
    return state_dir / STATE_FILE


def save(state: SealedState, state_dir: Path) -> Path:
    """Write the state atomically (mode 0600, directory 0700); return its path."""
    path = state_path(state_dir)
    from .fsutil import atomic_write  # tempfile: only when writing, not on the unseal path

    atomic_write(path, state.to_json())
    return path


def load(state_dir: Path) -> SealedState:
    """Read the state; a missing, unreadable or corrupted file is a clear error, and so is a
    state directory others could write to (:func:`qubes_seal.fsutil.check_private_dir`)."""
    from .fsutil import check_private_dir

    check_private_dir(state_dir)
    path = state_path(state_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise CorruptState(
            f"no sealed state in {state_dir}",
            hint="Run 'qubes-seal seal' first, or point --state-dir (QUBES_SEAL_STATE_DIR) "
            "at the right directory.",
        ) from exc
    except OSError as exc:
        raise CorruptState(f"cannot read {path}: {exc.strerror}") from exc
    return SealedState.from_json(data, source=str(path))
