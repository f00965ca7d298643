"""Our stdlib HKDF and libcrypto AES-XTS against pyca/cryptography and RFC 5869."""

from __future__ import annotations

import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given, settings
from hypothesis import strategies as st

from qubes_seal.hkdf import hkdf_sha256
from qubes_seal.luks.xts import Xts


def test_rfc5869_case_1() -> None:
    okm = hkdf_sha256(
        bytes.fromhex("0b" * 22),
        length=42,
        salt=bytes.fromhex("000102030405060708090a0b0c"),
        info=bytes.fromhex("f0f1f2f3f4f5f6f7f8f9"),
    )
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


@settings(max_examples=200, deadline=None)
@given(
    ikm=st.binary(min_size=1, max_size=100),
    salt=st.one_of(st.none(), st.binary(min_size=1, max_size=64)),
    info=st.binary(max_size=64),
    length=st.integers(1, 200),
)
def test_hkdf_equals_cryptography(ikm: bytes, salt: bytes | None, info: bytes, length: int) -> None:
    ref = HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=info).derive(ikm)
    assert hkdf_sha256(ikm, length=length, salt=salt, info=info) == ref


@settings(max_examples=50, deadline=None)
@given(key_size=st.sampled_from([32, 64]), sector=st.integers(0, 2**64 - 1))
def test_xts_equals_cryptography(key_size: int, sector: int) -> None:
    key = os.urandom(key_size)
    data = os.urandom(512)
    iv = sector.to_bytes(8, "little") + bytes(8)
    ref = Cipher(algorithms.AES(key), modes.XTS(iv)).encryptor().update(data)
    out = bytearray(512)
    with Xts(key, encrypt=True) as xts:
        xts.sector(data, iv, out, 0)
    assert bytes(out) == ref
    back = bytearray(512)
    with Xts(key, encrypt=False) as xts:
        xts.sector(bytes(out), iv, back, 0)
    assert bytes(back) == data
