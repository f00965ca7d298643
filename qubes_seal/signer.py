"""The dom0 policy-signing key: an ECC P-256 key that approves boot states.

Under signed policies the sealed object does not name its PCR values: its authPolicy is
``PolicyAuthorize(this key's name, policyRef)`` (then ``PolicyAuthValue``).  Each accepted
boot state is an *approved policy* (``PolicyPCR`` of the expected values, then ``PolicyNV`` of
the rollback counter), and this key's ECDSA signature over ``H(approvedPolicy || policyRef)``
is stored next to it in the token.  At boot the TPM checks the signature
(TPM2_VerifySignature, on the public key loaded with TPM2_LoadExternal) and accepts the
state (TPM2_PolicyAuthorize).  So an update needs a new signature, not a new sealed object.

The private key (its 32-byte scalar) lives in the keystore, inside the LUKS container: only a
dom0 that unlocked the container can approve a new boot state.  Signing uses the
``cryptography`` library; the boot path never imports this module (it only verifies, in the
TPM).  The marshalling below follows TPM 2.0 Part 2 (TPMT_PUBLIC 12.2.4, TPMT_SIGNATURE 11.3.4)
and is checked against the TPM's own name of the loaded key in the tests.
"""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, decode_dss_signature

from .errors import CorruptState
from .secret import Secret
from .tpm.marshal import key_name, public_area, tpm2b

SCALAR_SIZE = 32
#: The size of the random policyRef that binds signatures to one generation of sealed objects.
POLICY_REF_SIZE = 16


class PolicySigner:
    """An ECC P-256 private key; use as a context manager so the scalar is wiped."""

    def __init__(self, scalar: Secret) -> None:
        if len(scalar) != SCALAR_SIZE:
            raise CorruptState("the policy-signing key in the keystore is malformed")
        self._scalar = scalar
        try:
            self._key = ec.derive_private_key(
                int.from_bytes(scalar.reveal(), "big"), ec.SECP256R1()
            )
        except ValueError:
            raise CorruptState("the policy-signing key in the keystore is malformed") from None
        numbers = self._key.public_key().public_numbers()
        self.x = numbers.x.to_bytes(SCALAR_SIZE, "big")
        self.y = numbers.y.to_bytes(SCALAR_SIZE, "big")

    @classmethod
    def generate(cls) -> PolicySigner:
        key = ec.generate_private_key(ec.SECP256R1())
        scalar = key.private_numbers().private_value.to_bytes(SCALAR_SIZE, "big")
        return cls(Secret(scalar))

    @property
    def scalar(self) -> Secret:
        return self._scalar

    def __enter__(self) -> PolicySigner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()

    def wipe(self) -> None:
        self._scalar.wipe()

    def public_area(self) -> bytes:
        """The marshalled TPMT_PUBLIC of the public key (for TPM2_LoadExternal)."""
        return public_area(self.x, self.y)

    def public(self) -> bytes:
        """The marshalled TPM2B_PUBLIC (what the token stores)."""
        return tpm2b(self.public_area())

    def name(self) -> bytes:
        """The TPM name of the public key: nameAlg || SHA-256(TPMT_PUBLIC)."""
        return key_name(self.public_area())

    def sign(self, digest: bytes) -> bytes:
        """ECDSA (SHA-256) over a 32-byte digest: ``r || s``, 32 bytes each."""
        der = self._key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
        r, s = decode_dss_signature(der)
        return r.to_bytes(SCALAR_SIZE, "big") + s.to_bytes(SCALAR_SIZE, "big")
