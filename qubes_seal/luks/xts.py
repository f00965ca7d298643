"""AES-XTS per 512-byte sector, through the system's libcrypto (OpenSSL 3) with ctypes.

The user-space payload must decrypt exactly what dm-crypt's ``aes-xts-plain64`` writes.  The
system libcrypto is already on every machine and in every initramfs that has cryptsetup (it is
cryptsetup's crypto back-end), so using it directly keeps the boot image free of the
``cryptography`` wheel, which bundles a second OpenSSL (11 MiB).  The tests check this module
against ``cryptography`` and against an XTS written by hand from AES-ECB.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from functools import cache
from typing import Any

from ..errors import QubesSealError

SECTOR = 512


@cache
def _lib() -> Any:
    name = ctypes.util.find_library("crypto") or "libcrypto.so.3"
    for candidate in (name, "libcrypto.so.3"):
        try:
            lib = ctypes.CDLL(candidate)
            break
        except OSError:
            continue
    else:  # pragma: no cover - every machine with cryptsetup has it
        raise QubesSealError("libcrypto (OpenSSL) cannot be loaded: the user-space path needs it")
    lib.EVP_CIPHER_CTX_new.restype = ctypes.c_void_p
    lib.EVP_CIPHER_CTX_free.argtypes = [ctypes.c_void_p]
    lib.EVP_aes_128_xts.restype = ctypes.c_void_p
    lib.EVP_aes_256_xts.restype = ctypes.c_void_p
    lib.EVP_CipherInit_ex.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p,
        ctypes.c_int,
    ]  # fmt: skip
    lib.EVP_CipherUpdate.argtypes = [
        ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_int), ctypes.c_char_p,
        ctypes.c_int,
    ]  # fmt: skip
    return lib


class Xts:
    """AES-XTS with one key, sector by sector; ``close()`` frees the OpenSSL context."""

    def __init__(self, key: bytes, *, encrypt: bool) -> None:
        if len(key) not in (32, 64):
            raise QubesSealError(f"AES-XTS takes a 32- or 64-byte key, not {len(key)}")
        lib = _lib()
        self._lib = lib
        self._enc = 1 if encrypt else 0
        self._ctx = lib.EVP_CIPHER_CTX_new()
        if not self._ctx:
            raise QubesSealError("OpenSSL: cannot allocate a cipher context")
        cipher = lib.EVP_aes_256_xts() if len(key) == 64 else lib.EVP_aes_128_xts()
        if lib.EVP_CipherInit_ex(self._ctx, cipher, None, key, bytes(16), self._enc) != 1:
            self.close()
            raise QubesSealError("OpenSSL refused the AES-XTS key (are its halves equal?)")
        self._outl = ctypes.c_int(0)

    def sector(self, data: bytes, iv: bytes, out: Any, offset: int) -> None:
        """Process one sector of ``data`` with tweak ``iv`` into ``out`` at ``offset``."""
        lib = self._lib
        if lib.EVP_CipherInit_ex(self._ctx, None, None, None, iv, self._enc) != 1:
            raise QubesSealError("OpenSSL: AES-XTS tweak refused")
        dest = (ctypes.c_char * len(data)).from_buffer(out, offset)
        if lib.EVP_CipherUpdate(self._ctx, dest, ctypes.byref(self._outl), data, len(data)) != 1:
            raise QubesSealError("OpenSSL: AES-XTS failed")
        if self._outl.value != len(data):
            raise QubesSealError("OpenSSL: AES-XTS returned a short block")

    def close(self) -> None:
        if self._ctx:
            self._lib.EVP_CIPHER_CTX_free(self._ctx)  # also wipes the expanded key
            self._ctx = None

    def __enter__(self) -> Xts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
