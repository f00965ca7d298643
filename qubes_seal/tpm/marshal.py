"""Marshalling of the few TPM structures the signed policies need (TPM 2.0 Part 2), stdlib only.

The boot path uses these (the public key for TPM2_LoadExternal, the signature for
TPM2_VerifySignature); :mod:`qubes_seal.signer` (dom0 only) makes them.
"""

from __future__ import annotations

import hashlib
import struct

from ..errors import CorruptState

TPM_ALG_ECC = 0x0023
TPM_ALG_SHA256 = 0x000B
TPM_ALG_NULL = 0x0010
TPM_ALG_ECDSA = 0x0018
TPM_ECC_NIST_P256 = 0x0003
#: TPMA_OBJECT: userWithAuth (bit 6) | sign (bit 18).  Not restricted: it signs digests that
#: the TPM did not produce.
SIGNER_ATTRIBUTES = 0x00000040 | 0x00040000
SCALAR_SIZE = 32


def tpm2b(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def public_area(x: bytes, y: bytes) -> bytes:
    """TPMT_PUBLIC of an ECC P-256 signing key (ECDSA-SHA256 scheme, no symmetric part)."""
    return (
        struct.pack(">HHI", TPM_ALG_ECC, TPM_ALG_SHA256, SIGNER_ATTRIBUTES)
        + tpm2b(b"")  # authPolicy: empty
        + struct.pack(
            ">HHHHH", TPM_ALG_NULL, TPM_ALG_ECDSA, TPM_ALG_SHA256, TPM_ECC_NIST_P256, TPM_ALG_NULL
        )  # symmetric, scheme + hash, curveID, kdf
        + tpm2b(x)
        + tpm2b(y)
    )


def key_name(public_area: bytes) -> bytes:
    return struct.pack(">H", TPM_ALG_SHA256) + hashlib.sha256(public_area).digest()


def name_from_public(public: bytes) -> bytes:
    """The name of a key from its marshalled TPM2B_PUBLIC."""
    size = int.from_bytes(public[:2], "big")
    if size != len(public) - 2:
        raise CorruptState("the policy-signing public key in the token is malformed")
    return key_name(public[2:])


def marshal_signature(signature: bytes) -> bytes:
    """TPMT_SIGNATURE (ECDSA, SHA-256) from ``r || s``."""
    if len(signature) != 2 * SCALAR_SIZE:
        raise CorruptState("a boot-state signature in the token is malformed")
    r, s = signature[:SCALAR_SIZE], signature[SCALAR_SIZE:]
    return struct.pack(">HH", TPM_ALG_ECDSA, TPM_ALG_SHA256) + tpm2b(r) + tpm2b(s)


def auth_policy(public: bytes) -> bytes:
    """The authPolicy of an object from its marshalled TPM2B_PUBLIC (size, type, nameAlg,
    objectAttributes, then TPM2B_DIGEST authPolicy)."""
    if len(public) < 12:
        raise CorruptState("the sealed object's public area is malformed")
    size = int.from_bytes(public[10:12], "big")
    if len(public) < 12 + size:
        raise CorruptState("the sealed object's public area is malformed")
    return public[12 : 12 + size]
