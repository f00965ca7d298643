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
* ``qubes-seal lock`` unlinks it (the key service leaves it, so that a restart resumes).

Lifetimes, per kind (issue 13: a bundle left for the whole boot is an offline
passphrase-guessing oracle for any root process):

* ``vk``, the volume key: until ``qubes-seal lock``.  The key service reads it at each start
  and follows it while it runs; ``reseal`` (the update path unit, any time in the boot),
  ``revoke`` and ``domain`` read it.  PCR 13 is capped, so it cannot be made again in this
  boot: an expiry would lock the key service until the next boot.
* ``rs``, the reseal bundle (master secret, authValue, proof value): expires
  :data:`RS_LIFETIME` seconds (15 minutes) after it was left, ``KEYCTL_SET_TIMEOUT``: the
  kernel refuses to read it afterwards and collects it.  Only the rotations (``rotate
  passphrase|master|recovery|signer``), the first ``reseal`` of a token older than signed
  policies, and the re-sealing of an unsigned proof of a clean boot need it; they run right
  after an unlock (or in the next boot).  ``QUBES_SEAL_HANDOVER_RS_LIFETIME`` (seconds, in
  the environment of the process that unlocks) changes the lifetime; 0 keeps it until
  ``lock``, as before.  It is not revoked when read: ``rotate passphrase`` then ``rotate
  master`` in one sitting read it twice (``rotate master`` leaves a new one, with a new
  lifetime).

:func:`listing` shows every hand-over key of a keyring with its lifetime, and
:func:`stale` those that no longer serve (another container's, expired): ``qubes-seal
status`` shows them, ``qubes-seal lock --stale`` drops them.

The same mechanism works here and in production, so the tests exercise the real path.  The
Python ``keyring`` library is not used: it talks to desktop secret services (a D-Bus daemon
of a user session), the wrong place for a disk key in dom0's early boot (docs/DESIGN.md).

The syscalls are made with ctypes (add_key(2), keyctl(2)); no extra dependency.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import struct
from dataclasses import dataclass
from typing import Any

from .errors import QubesSealError
from .secret import Secret

SYS_ADD_KEY = 248  # x86_64
SYS_KEYCTL = 250
SYS_ADD_KEY_AARCH64 = 217
SYS_KEYCTL_AARCH64 = 219

KEY_SPEC_USER_KEYRING = -4
KEY_SPEC_SESSION_KEYRING = -3
KEYCTL_SETPERM = 5
KEYCTL_DESCRIBE = 6
KEYCTL_UNLINK = 9
KEYCTL_SEARCH = 10
KEYCTL_READ = 11
KEYCTL_SET_TIMEOUT = 15

#: seconds the reseal bundle (``rs``) lives after the unlock left it (module docstring)
RS_LIFETIME = 900
RS_LIFETIME_ENV = "QUBES_SEAL_HANDOVER_RS_LIFETIME"
PREFIX = "qubes-seal:"

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


def lifetime(kind: str) -> int | None:
    """Seconds a hand-over of ``kind`` lives, or None: until ``lock`` (module docstring)."""
    if kind != "rs":
        return None
    raw = os.environ.get(RS_LIFETIME_ENV, "").strip()
    if not raw:
        return RS_LIFETIME
    try:
        seconds = int(raw)
    except ValueError:
        raise HandoverError(
            f"{RS_LIFETIME_ENV}={raw!r} is not a number of seconds",
            hint=f"A whole number of seconds; 0 keeps the reseal hand-over until 'qubes-seal "
            f"lock'; unset: {RS_LIFETIME}.",
        ) from None
    if seconds < 0:
        raise HandoverError(f"{RS_LIFETIME_ENV} must not be negative, not {seconds}")
    return seconds or None


def put(container_uuid: str, volume_key: Secret, *, keyring: str = "user", kind: str = "vk") -> int:
    """Leave ``volume_key`` (or the ``kind`` of secret) in the keyring, with the lifetime of
    its kind (:func:`lifetime`); returns its serial.

    The timeout is set before the permissions (setting it needs the ``setattr`` right, which
    the final permissions leave to possessors only).  Should the kernel refuse the timeout,
    the key is unlinked again and 0 returned: a bundle that would never expire is not left
    behind, and its readers say there is no hand-over."""
    seconds = lifetime(kind)
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
        if seconds is not None:
            try:  # also after an update in place: add_key resets a key's expiry
                _call(keyctl, KEYCTL_SET_TIMEOUT, ctypes.c_long(serial), ctypes.c_uint(seconds))
            except OSError:
                _unlink(serial, keyring)
                return 0
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
    """Unlink the hand-over (every kind, expired ones too); True if a live one was there."""
    found = False
    for kind in KINDS:
        serial = _find(container_uuid, keyring, kind)
        if serial is not None:
            _unlink(serial, keyring)
            found = True
    with contextlib.suppress(HandoverError):  # collected meanwhile, or unlistable: no more
        for key in listing(keyring):  # an expired key: a search no longer finds it
            if key.container_uuid == container_uuid and key.expired:
                _unlink(key.serial, keyring)
    return found


def _unlink(serial: int, keyring: str) -> None:
    _, keyctl = _syscalls()
    try:
        _call(keyctl, KEYCTL_UNLINK, ctypes.c_long(serial), ctypes.c_long(_keyring(keyring)))
    except OSError as exc:
        raise HandoverError(f"cannot unlink the hand-over key: {exc.strerror}") from exc


# -- what a keyring holds --------------------------------------------------------------------


@dataclass(frozen=True)
class HandedOver:
    """One hand-over key in a keyring (never its contents)."""

    serial: int
    kind: str  # "vk", "rs", or what a future version leaves
    container_uuid: str
    expires: str  # "never", "expired", or the kernel's remaining time ("14m", "50s")

    @property
    def expired(self) -> bool:
        return self.expires == "expired"

    def describe(self) -> str:
        what = {"vk": "volume key", "rs": "reseal bundle"}.get(self.kind, self.kind)
        left = {"never": "until lock", "expired": "EXPIRED"}.get(
            self.expires, f"expires in {self.expires}"
        )
        return f"{PREFIX}{self.kind}:{self.container_uuid} ({what}, {left})"


def _serials(keyring: str) -> list[int]:
    """The serials linked in ``keyring`` (keyctl(2) KEYCTL_READ on a keyring)."""
    _, keyctl = _syscalls()
    kid = ctypes.c_long(_keyring(keyring))
    cap = 4096
    while True:
        buf = ctypes.create_string_buffer(cap)
        try:
            size = _call(keyctl, KEYCTL_READ, kid, buf, ctypes.c_size_t(cap))
        except OSError as exc:
            if exc.errno == errno.ENOKEY:  # no such keyring yet: nothing in it
                return []
            raise HandoverError(
                f"cannot list the kernel {keyring} keyring: {exc.strerror}"
            ) from exc
        if size <= cap:
            return list(struct.unpack(f"{size // 4}i", buf.raw[: size // 4 * 4]))
        cap = size


def _proc_keys() -> dict[int, tuple[str, str]]:
    """serial -> (timeout column, description) from /proc/keys, the one place that shows an
    expired key's name and a key's remaining time; {} when it cannot be read."""
    out: dict[int, tuple[str, str]] = {}
    try:
        with open("/proc/keys", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split(None, 8)
                if len(fields) == 9 and fields[7] == "user":
                    desc = fields[8].rstrip("\n").rpartition(": ")[0] or fields[8].rstrip("\n")
                    out[int(fields[0], 16)] = (fields[3], desc)
    except OSError:
        return {}
    return out


def _describe(serial: int) -> tuple[str, str] | None:
    """(timeout column, description) of one key through keyctl: for a system without
    /proc/keys; an expired key's name cannot be read this way."""
    _, keyctl = _syscalls()
    buf = ctypes.create_string_buffer(512)
    try:
        size = _call(keyctl, KEYCTL_DESCRIBE, ctypes.c_long(serial), buf, ctypes.c_size_t(512))
    except OSError as exc:
        return ("expd", "") if exc.errno == errno.EKEYEXPIRED else None
    kind, _, rest = buf.raw[: max(0, min(size, 512) - 1)].decode(errors="replace").partition(";")
    return ("?", rest.split(";", 3)[-1]) if kind == "user" else None


def listing(keyring: str = "user") -> list[HandedOver]:
    """Every qubes-seal hand-over key linked in ``keyring``, with its lifetime."""
    proc = _proc_keys()
    found = []
    for serial in _serials(keyring):
        info = proc.get(serial) or _describe(serial)
        if info is None:
            continue
        timeout, desc = info
        if not desc.startswith(PREFIX):  # another program's (or expired, name unknown)
            continue
        kind, _, uuid = desc[len(PREFIX) :].partition(":")
        expires = {"perm": "never", "expd": "expired", "?": "unknown"}.get(timeout, timeout)
        found.append(HandedOver(serial, kind, uuid, expires))
    return found


def stale(container_uuid: str | None, keyring: str = "user") -> list[HandedOver]:
    """The hand-over keys of ``keyring`` that serve nothing any more: expired, or left for
    another container than ``container_uuid`` (an older one, a test's, a re-initialised
    one).  With ``container_uuid`` None only the expired ones: no container, no judgement."""
    return [
        k
        for k in listing(keyring)
        if k.expired or (container_uuid is not None and k.container_uuid != container_uuid)
    ]


def drop_stale(container_uuid: str, keyring: str = "user") -> list[HandedOver]:
    """Unlink the :func:`stale` keys of ``keyring``; the ones dropped."""
    dropped = stale(container_uuid, keyring)
    for key in dropped:
        try:
            _unlink(key.serial, keyring)
        except HandoverError:
            if not key.expired:  # an expired key may have been collected meanwhile
                raise
    return dropped


def summary(container_uuid: str | None, keyring: str = "user") -> tuple[dict[str, Any], list[str]]:
    """The hand-over part of ``qubes-seal status``: a JSON object and text lines."""
    try:
        keys = listing(keyring)
    except HandoverError as exc:
        return {"keyring": keyring, "error": exc.message}, [f"hand-over:       {exc.message}"]
    old = {k.serial for k in stale(container_uuid, keyring)} if keys else set()
    doc = {
        "keyring": keyring,
        "keys": [
            {"kind": k.kind, "container_uuid": k.container_uuid, "expires": k.expires,
             "stale": k.serial in old}
            for k in keys
        ],
        "stale": len(old),
    }  # fmt: skip
    if not keys:
        return doc, [f"hand-over:       none in the kernel {keyring} keyring"]
    lines = [f"hand-over:       {len(keys)} key(s) in the kernel {keyring} keyring"]
    for k in keys:
        mark = "STALE " if k.serial in old else ""
        lines.append(f"  {mark}{k.describe()}")
    if old:
        lines.append(
            f"  {len(old)} stale: another container's or expired; drop them with "
            "'qubes-seal lock --stale'"
        )
    if container_uuid is None:
        lines.append("  (no container given: which of them are current is not known)")
    return doc, lines
