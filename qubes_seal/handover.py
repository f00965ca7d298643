"""The hand-over: from the boot-time unlock to the dom0 key service, through the kernel keyring.

After the unlock has opened the container and capped PCR 13, nothing can unseal again in this
boot; the key service still needs the keystore.  The unlock therefore leaves the container's
*volume key* in the kernel key retention service (keyrings(7)), as a ``user`` key
``qubes-seal:vk:<container UUID>`` in root's user keyring:

* kernel memory, never swapped, never on any file system: nothing persistent ever holds it;
* it survives the initramfs' ``switch_root`` (root's user keyring lives as long as any root
  process, PID 1 included): the same path systemd's ask-password cache and cryptsetup's
  ``--link-vk-to-keyring`` use;
* permissions ``possessor: all, user: view|read|search``, nothing for group or others: only
  root (and processes that possess the keyring) can read it;
* ``qubes-seal lock`` (or the key service at shutdown) unlinks it.

The same mechanism works here and in production, so the tests exercise the real path.  The
Python ``keyring`` library is not used: it talks to desktop secret services (a D-Bus daemon
of a user session), the wrong place for a disk key in dom0's early boot (docs/DESIGN.md).

The syscalls are made with ctypes (add_key(2), keyctl(2)); no extra dependency.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os

from .errors import QubesSealError
from .secret import Secret

SYS_ADD_KEY = 248  # x86_64
SYS_KEYCTL = 250
SYS_ADD_KEY_AARCH64 = 217
SYS_KEYCTL_AARCH64 = 219

KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_SESSION_KEYRING = -3
KEYCTL_SETPERM = 5
KEYCTL_UNLINK = 9
KEYCTL_SEARCH = 10
KEYCTL_READ = 11

# keyctl(2) KEYCTL_SETPERM: possessor all (0x3f << 24), user view|read|search (0x0b << 16).
KEY_PERM = 0x3F0B0000

KEYRINGS = {"user": KEY_SPEC_USER_KEYRING, "session": KEY_SPEC_SESSION_KEYRING}


class HandoverError(QubesSealError):
    """The kernel keyring refused or does not hold the hand-over."""


def _syscalls() -> tuple[int, int]:
    if os.uname().machine == "aarch64":
        return SYS_ADD_KEY_AARCH64, SYS_KEYCTL_AARCH64
    return SYS_ADD_KEY, SYS_KEYCTL


_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def _call(*args: object) -> int:
    ctypes.set_errno(0)
    r = int(_libc.syscall(*args))
    if r < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return r


KINDS = ("vk", "rs")
"""``vk``: the container's volume key (the key service reads the keystore with it); ``rs``:
the reseal bundle (master secret and authValue, so that this boot, already accepted by the
TPM, can approve a predicted next boot after PCR 13 was capped)."""


def description(container_uuid: str, kind: str = "vk") -> str:
    if kind not in KINDS:
        raise ValueError(f"unknown hand-over kind {kind!r}")
    return f"qubes-seal:{kind}:{container_uuid}"


def _keyring(name: str) -> int:
    try:
        return KEYRINGS[name]
    except KeyError:
        raise QubesSealError(f"unknown keyring {name!r}: use 'user' or 'session'") from None


def put(container_uuid: str, volume_key: Secret, *, keyring: str = "user", kind: str = "vk") -> int:
    """Leave ``volume_key`` (or the ``kind`` of secret) in the keyring; returns its serial."""
    add_key, keyctl = _syscalls()
    data = volume_key.reveal()
    buf = ctypes.create_string_buffer(data, len(data))
    try:
        serial = _call(
            add_key,
            b"user",
            description(container_uuid, kind).encode(),
            buf,
            ctypes.c_size_t(len(data)),
            ctypes.c_int(_keyring(keyring)),
        )
        _call(keyctl, KEYCTL_SETPERM, ctypes.c_long(serial), ctypes.c_uint(KEY_PERM))
    except OSError as exc:
        raise HandoverError(
            f"the kernel keyring refused the hand-over: {exc.strerror}",
            hint="Is the kernel built with CONFIG_KEYS? Does a seccomp filter block add_key?",
        ) from exc
    finally:
        ctypes.memset(buf, 0, len(data))
    return serial


def _find(container_uuid: str, keyring: str, kind: str = "vk") -> int | None:
    _, keyctl = _syscalls()
    try:
        return _call(
            keyctl,
            KEYCTL_SEARCH,
            ctypes.c_long(_keyring(keyring)),
            b"user",
            description(container_uuid, kind).encode(),
            ctypes.c_long(0),
        )
    except OSError as exc:
        if exc.errno in (errno.ENOKEY, errno.EKEYREVOKED, errno.EKEYEXPIRED):
            return None
        raise HandoverError(f"cannot search the kernel keyring: {exc.strerror}") from exc


def get(container_uuid: str, *, keyring: str = "user", kind: str = "vk") -> Secret | None:
    """The handed-over volume key (or ``kind``), or None when no unlock left one this boot."""
    serial = _find(container_uuid, keyring, kind)
    if serial is None:
        return None
    _, keyctl = _syscalls()
    cap = 4096
    buf = ctypes.create_string_buffer(cap)
    try:
        size = _call(keyctl, KEYCTL_READ, ctypes.c_long(serial), buf, ctypes.c_size_t(cap))
    except OSError as exc:
        raise HandoverError(f"cannot read the hand-over key: {exc.strerror}") from exc
    try:
        if size > cap:
            raise HandoverError("the hand-over key is larger than expected")
        return Secret(buf.raw[:size])
    finally:
        ctypes.memset(buf, 0, cap)


def drop(container_uuid: str, *, keyring: str = "user") -> bool:
    """Unlink the hand-over (every kind); True if there was one."""
    found = False
    for kind in KINDS:
        serial = _find(container_uuid, keyring, kind)
        if serial is not None:
            _unlink(serial, keyring)
            found = True
    return found


def _unlink(serial: int, keyring: str) -> None:
    _, keyctl = _syscalls()
    try:
        _call(keyctl, KEYCTL_UNLINK, ctypes.c_long(serial), ctypes.c_long(_keyring(keyring)))
    except OSError as exc:
        raise HandoverError(f"cannot unlink the hand-over key: {exc.strerror}") from exc
