"""TPM policy digests, computed offline (no TPM), as TPM 2.0 Part 1 section 19.7 defines them.

A policy session starts with a digest of zeros and each policy command extends it::

    policyDigest' = H(policyDigest || TPM_CC || command-specific data)

The functions here reproduce the TPM's computation so that a sealed object's ``authPolicy`` can
be computed from *expected* PCR values (the values of a boot that has not happened yet), and the
tests check them against a real TPM's trial session.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence

# TPM 2.0 Part 2, 6.5.2 (TPM_CC).
TPM_CC_POLICY_NV = 0x00000149
TPM_CC_POLICY_AUTHORIZE = 0x0000016A
TPM_CC_POLICY_AUTH_VALUE = 0x0000016B
TPM_CC_POLICY_OR = 0x00000171
TPM_CC_POLICY_PCR = 0x0000017F

# TPM 2.0 Part 2, 6.3 (TPM_ALG_ID), for the banks we seal to.
TPM_ALG_SHA1 = 0x0004
TPM_ALG_SHA256 = 0x000B
TPM_ALG_SHA384 = 0x000C
TPM_ALG_SHA512 = 0x000D

BANK_ALG = {
    "sha1": TPM_ALG_SHA1,
    "sha256": TPM_ALG_SHA256,
    "sha384": TPM_ALG_SHA384,
    "sha512": TPM_ALG_SHA512,
}

# TPM 2.0 Part 2, 6.9 (TPM_EO): operandA (the NV data) <= operandB, both unsigned big-endian.
TPM_EO_UNSIGNED_LE = 0x0009
#: The NV counter is 8 bytes (UINT64): PolicyNV compares all of them.
NV_COUNTER_SIZE = 8

#: PC Client platforms implement 24 PCRs: a selection bitmap is 3 bytes.
PCR_SELECT_SIZE = 3
PCR_COUNT = 24


def launch_happened(pcr17: bytes) -> bool:
    """PCR 17 of all 0xFF is its power-on value: no dynamic launch reset it (TBOOT-TXT.md)."""
    return pcr17 != b"\xff" * len(pcr17)


def validate_pcrs(pcrs: Iterable[int]) -> list[int]:
    """Sorted, de-duplicated PCR indices; an empty or out-of-range selection is an error.

    An empty selection would seal to nothing at all, so it is refused (fail closed).
    """
    out = sorted(set(pcrs))
    if not out:
        raise ValueError("empty PCR selection: a secret sealed to no PCR is not sealed")
    for p in out:
        if not 0 <= p < PCR_COUNT:
            raise ValueError(f"PCR index {p} out of range 0..{PCR_COUNT - 1}")
    return out


def pcr_select_bitmap(pcrs: Iterable[int]) -> bytes:
    """The 3-byte ``pcrSelect`` bitmap of a TPMS_PCR_SELECTION (PCR n: bit n % 8, byte n // 8)."""
    bitmap = bytearray(PCR_SELECT_SIZE)
    for p in pcrs:
        bitmap[p // 8] |= 1 << (p % 8)
    return bytes(bitmap)


def marshal_pcr_selection(bank: str, pcrs: Iterable[int]) -> bytes:
    """A TPML_PCR_SELECTION with one bank, as the TPM marshals it (Part 2, 10.9.7)."""
    return (
        (1).to_bytes(4, "big")
        + BANK_ALG[bank].to_bytes(2, "big")
        + bytes([PCR_SELECT_SIZE])
        + pcr_select_bitmap(pcrs)
    )


def pcr_digest(values: Mapping[int, bytes], pcrs: Sequence[int], *, bank: str = "sha256") -> bytes:
    """``pcrDigest`` of TPM2_PolicyPCR: the hash of the selected PCR values in index order."""
    h = hashlib.new(bank)
    for p in sorted(pcrs):
        h.update(values[p])
    return h.digest()


def policy_pcr(
    values: Mapping[int, bytes],
    pcrs: Sequence[int],
    *,
    bank: str = "sha256",
    start: bytes | None = None,
    name_alg: str = "sha256",
) -> bytes:
    """The policy digest after TPM2_PolicyPCR for the given expected PCR values.

    ``values`` maps each selected PCR index to its expected value in ``bank``; ``name_alg`` is
    the hash of the policy session (the sealed object's nameAlg).
    """
    pcrs = validate_pcrs(pcrs)
    missing = [p for p in pcrs if p not in values]
    if missing:
        raise ValueError(f"no expected value for PCR {missing}")
    digest = start if start is not None else bytes(hashlib.new(name_alg).digest_size)
    return hashlib.new(
        name_alg,
        digest
        + TPM_CC_POLICY_PCR.to_bytes(4, "big")
        + marshal_pcr_selection(bank, pcrs)
        + pcr_digest(values, pcrs, bank=bank),
    ).digest()


def policy_auth_value(start: bytes, *, name_alg: str = "sha256") -> bytes:
    """The policy digest after TPM2_PolicyAuthValue."""
    return hashlib.new(name_alg, start + TPM_CC_POLICY_AUTH_VALUE.to_bytes(4, "big")).digest()


def policy_nv(
    start: bytes,
    nv_name: bytes,
    operand_b: bytes,
    *,
    offset: int = 0,
    operation: int = TPM_EO_UNSIGNED_LE,
    name_alg: str = "sha256",
) -> bytes:
    """The policy digest after TPM2_PolicyNV (Part 3, 23.9)::

    policyDigest' = H(policyDigest || TPM_CC_PolicyNV || args || nvIndexName)
    args = H(operandB || offset (UINT16) || operation (UINT16))
    """
    args = hashlib.new(
        name_alg, operand_b + offset.to_bytes(2, "big") + operation.to_bytes(2, "big")
    ).digest()
    return hashlib.new(
        name_alg, start + TPM_CC_POLICY_NV.to_bytes(4, "big") + args + nv_name
    ).digest()


def counter_bound(bound: int) -> bytes:
    """operandB of the rollback check: the highest accepted counter value, UINT64 big-endian."""
    return bound.to_bytes(NV_COUNTER_SIZE, "big")


def policy_or(branches: Sequence[bytes], *, name_alg: str = "sha256") -> bytes:
    """The policy digest after TPM2_PolicyOR over 2 to 8 branch digests (Part 3, 23.6)."""
    if not 2 <= len(branches) <= 8:
        raise ValueError("TPM2_PolicyOR takes 2 to 8 branches")
    zero = bytes(hashlib.new(name_alg).digest_size)
    return hashlib.new(
        name_alg, zero + TPM_CC_POLICY_OR.to_bytes(4, "big") + b"".join(branches)
    ).digest()


def sealing_policy(
    states: Sequence[Mapping[int, bytes]],
    pcrs: Sequence[int],
    *,
    bank: str = "sha256",
    with_auth: bool = False,
    nv: tuple[bytes, int] | None = None,
) -> tuple[bytes, list[bytes]]:
    """The sealed object's ``authPolicy``, and the PolicyOR branches (empty for one state).

    One accepted state: ``PolicyPCR``.  Several (the current boot and predicted ones, at most
    8): ``PolicyPCR`` then ``PolicyOR`` over each state's PolicyPCR digest.  With ``with_auth``,
    ``PolicyAuthValue`` comes last, so the object's authValue (derived from the passphrase) must
    be proven in the session HMAC and the TPM's dictionary-attack lockout rate-limits guesses.
    With ``nv`` (the NV counter's name and the bound), ``PolicyNV`` (counter <= bound) comes
    after the PCR part: once the counter is incremented past the bound, the object is dead.
    """
    if not states:
        raise ValueError("no accepted PCR state")
    branches = [policy_pcr(s, pcrs, bank=bank) for s in states]
    digest = branches[0] if len(branches) == 1 else policy_or(branches)
    if nv is not None:
        digest = policy_nv(digest, nv[0], counter_bound(nv[1]))
    if with_auth:
        digest = policy_auth_value(digest)
    return digest, branches if len(branches) > 1 else []


def policy_authorize(key_name: bytes, policy_ref: bytes, *, name_alg: str = "sha256") -> bytes:
    """The policy digest after TPM2_PolicyAuthorize (Part 3, 23.16): the digest is *reset*,
    then ``PolicyUpdate(TPM_CC_PolicyAuthorize, keySign's name, policyRef)``::

        policyDigest' = H(0...0 || TPM_CC_PolicyAuthorize || keyName)
        policyDigest'' = H(policyDigest' || policyRef)

    An object whose authPolicy starts this way accepts any policy that the key signed.
    """
    zero = bytes(hashlib.new(name_alg).digest_size)
    first = hashlib.new(
        name_alg, zero + TPM_CC_POLICY_AUTHORIZE.to_bytes(4, "big") + key_name
    ).digest()
    return hashlib.new(name_alg, first + policy_ref).digest()


def approved_policy(
    values: Mapping[int, bytes],
    pcrs: Sequence[int],
    *,
    bank: str = "sha256",
    nv: tuple[bytes, int] | None = None,
) -> bytes:
    """One accepted boot state as the policy-signing key approves it: ``PolicyPCR`` of the
    expected values, then (with ``nv``: the counter's name and the bound) ``PolicyNV``
    (counter <= bound), so incrementing the counter past the bound voids the signature."""
    digest = policy_pcr(values, pcrs, bank=bank)
    if nv is not None:
        digest = policy_nv(digest, nv[0], counter_bound(nv[1]))
    return digest


def authorization_digest(approved: bytes, policy_ref: bytes, *, name_alg: str = "sha256") -> bytes:
    """``aHash`` of TPM2_PolicyAuthorize: what the key signs, ``H(approvedPolicy || policyRef)``
    (hashed with the key's nameAlg)."""
    return hashlib.new(name_alg, approved + policy_ref).digest()


def signed_object_policy(key_name: bytes, policy_ref: bytes, *, with_auth: bool) -> bytes:
    """The authPolicy of an object under signed policies: ``PolicyAuthorize`` (key, ref), then
    ``PolicyAuthValue`` when the passphrase-derived authValue is required."""
    digest = policy_authorize(key_name, policy_ref)
    return policy_auth_value(digest) if with_auth else digest
