"""libcryptsetup through ctypes: the volume key, from a passphrase held in our memory only.

Only four functions of the stable libcryptsetup 2.x ABI (``libcryptsetup.so.12``) are used:
``crypt_init``, ``crypt_load``, ``crypt_volume_key_get`` and ``crypt_free`` (see
``lib/libcryptsetup.h``), plus ``crypt_token_external_disable`` when the library has it
(2.4 and later) so that no token plugin is loaded into our process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

from ..errors import CorruptState, QubesSealError
from ..secret import Secret
from .cryptsetup import WrongKey

CRYPT_ANY_SLOT = -1
_SONAME = "libcryptsetup.so.12"
_lib: ctypes.CDLL | None = None


class LibcryptsetupUnavailable(QubesSealError):
    """libcryptsetup.so.12 cannot be loaded."""


def load() -> ctypes.CDLL:
    """The loaded library, with argument types declared; raises if it is missing."""
    global _lib
    if _lib is not None:
        return _lib
    name = ctypes.util.find_library("cryptsetup") or _SONAME
    try:
        lib = ctypes.CDLL(_SONAME)
    except OSError:
        try:
            lib = ctypes.CDLL(name)
        except OSError as exc:
            raise LibcryptsetupUnavailable(
                f"cannot load {_SONAME}", hint="Install libcryptsetup12."
            ) from exc
    c_vp = ctypes.c_void_p
    lib.crypt_init.argtypes = [ctypes.POINTER(c_vp), ctypes.c_char_p]
    lib.crypt_init.restype = ctypes.c_int
    lib.crypt_load.argtypes = [c_vp, ctypes.c_char_p, c_vp]
    lib.crypt_load.restype = ctypes.c_int
    lib.crypt_volume_key_get.argtypes = [
        c_vp,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.POINTER(ctypes.c_size_t),
        ctypes.c_void_p,
        ctypes.c_size_t,
    ]
    lib.crypt_volume_key_get.restype = ctypes.c_int
    lib.crypt_get_volume_key_size.argtypes = [c_vp]
    lib.crypt_get_volume_key_size.restype = ctypes.c_int
    lib.crypt_free.argtypes = [c_vp]
    lib.crypt_free.restype = None
    if hasattr(lib, "crypt_token_external_disable"):
        lib.crypt_token_external_disable.argtypes = []
        lib.crypt_token_external_disable.restype = None
        lib.crypt_token_external_disable()
    _lib = lib
    return lib


def volume_key(path: Path, passphrase: Secret, *, keyslot: int = CRYPT_ANY_SLOT) -> Secret:
    """The volume key of the LUKS2 container at ``path``, unlocked with ``passphrase``.

    The passphrase is copied into a ctypes buffer that is zeroed on return; the volume key is
    copied from the library's buffer into a :class:`Secret` and the buffer zeroed.  A wrong
    passphrase raises :class:`WrongKey` (an ``AuthorizationError``).
    """
    lib = load()
    cd = ctypes.c_void_p()
    rc = lib.crypt_init(ctypes.byref(cd), os.fsencode(path))
    if rc < 0:
        raise QubesSealError(f"libcryptsetup cannot open {path}: {os.strerror(-rc)}")
    pw_len = len(passphrase)
    pw = ctypes.create_string_buffer(passphrase.reveal(), max(pw_len, 1))
    vk = ctypes.create_string_buffer(512)
    try:
        rc = lib.crypt_load(cd, b"LUKS2", None)
        if rc < 0:
            raise CorruptState(
                f"libcryptsetup: {path} holds no valid LUKS2 header ({os.strerror(-rc)})",
                hint="Check the path, or repair the header (cryptsetup repair).",
            )
        size = lib.crypt_get_volume_key_size(cd)
        if size <= 0 or size > len(vk):
            raise CorruptState(f"libcryptsetup: unexpected volume key size {size}")
        vk_size = ctypes.c_size_t(size)
        rc = lib.crypt_volume_key_get(
            cd,
            keyslot,
            ctypes.cast(vk, ctypes.c_void_p),
            ctypes.byref(vk_size),
            ctypes.cast(pw, ctypes.c_void_p),
            pw_len,
        )
        if rc == -errno.EPERM or rc == -errno.ENOENT:
            raise WrongKey(
                "no keyslot of the LUKS container accepted the key",
                hint="Check the passphrase (or use the recovery key).",
                returncode=2,
            )
        if rc < 0:
            raise QubesSealError(
                f"libcryptsetup cannot unlock the volume key: {os.strerror(-rc)}",
                hint="A memory-hard keyslot may need more memory than is available."
                if rc == -errno.ENOMEM
                else None,
            )
        return Secret(memoryview(vk)[: vk_size.value])
    finally:
        ctypes.memset(pw, 0, ctypes.sizeof(pw))
        ctypes.memset(vk, 0, ctypes.sizeof(vk))
        lib.crypt_free(cd)
