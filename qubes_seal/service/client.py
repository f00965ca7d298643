"""Talking to the key service from dom0: the admin side of ``qubes-seal domain`` and ``status``.

:func:`request` sends one request and returns the answer; :func:`answering` says whether a
daemon answers at all (the CLI then routes ``domain`` commands through it, so a change made
while the system runs reaches the daemon's memory and the container together).
"""

from __future__ import annotations

import os
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import QubesSealError
from ..secret import Secret
from .protocol import (
    CURRENT,
    DEFAULT_SOCKET,
    KEY_HEX_CHARS,
    MAX_RESPONSE,
    ProtocolError,
    decode,
    encode,
)

DEFAULT_TIMEOUT = 10.0


class ServiceUnreachable(QubesSealError):
    """Nobody answers on the key service's socket."""

    exit_code = 6


class ServiceRefused(QubesSealError):
    """The key service answered with an error; ``exit_code`` is the one it gave."""

    def __init__(self, name: str, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.name = name
        self.exit_code = exit_code


def socket_path() -> Path:
    """``QUBES_SEAL_SOCKET`` or the default socket."""
    return Path(os.environ.get("QUBES_SEAL_SOCKET", DEFAULT_SOCKET))


def connect(path: Path, deadline: float) -> socket.socket:
    """A connection to ``path``, waiting while the daemon's backlog is full (EAGAIN)."""
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            sock.connect(str(path))
            return sock
        except BlockingIOError:
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.005)
        except BaseException:
            sock.close()
            raise


def request(path: Path, doc: dict[str, Any], *, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Send ``doc``, return the answer (``{"ok": ...}``); :class:`ServiceUnreachable` if none."""
    deadline = time.monotonic() + timeout
    try:
        with connect(path, deadline) as sock:
            sock.sendall(encode(doc))
            buf = bytearray()
            while b"\n" not in buf and len(buf) <= MAX_RESPONSE:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except OSError as exc:
        raise ServiceUnreachable(
            f"the key service does not answer on {path}: {exc.strerror or exc}",
            hint="Is it running? systemctl status qubes-seal-keyd",
        ) from exc
    line, newline, _ = bytes(buf).partition(b"\n")
    try:
        if not newline:
            raise ProtocolError("no complete answer")
        return decode(line)
    except ProtocolError as exc:
        raise ServiceUnreachable(f"the key service on {path} answered badly: {exc}") from exc


def call(path: Path, doc: dict[str, Any], *, timeout: float = DEFAULT_TIMEOUT) -> dict[str, Any]:
    """Like :func:`request`, but an error answer raises :class:`ServiceRefused`."""
    answer = request(path, doc, timeout=timeout)
    if answer.get("ok") is not True:
        raise ServiceRefused(
            str(answer.get("error", "internal")),
            str(answer.get("message", "the key service refused")),
            int(answer.get("exit", 1)),
        )
    return answer


#: answers worth asking again after a pause: the daemon's rate limit, or its connections full
RETRIED = ("rate-limited", "busy")
BACKOFF_FIRST = 0.02  # seconds before the first retry; doubled each time
BACKOFF_MAX = 1.0


def call_retrying(
    path: Path, doc: dict[str, Any], *, timeout: float = DEFAULT_TIMEOUT
) -> dict[str, Any]:
    """:func:`call`, asking again after a ``rate-limited`` or ``busy`` answer, with an
    exponential backoff (20 ms doubling to 1 s, with jitter), until ``timeout`` is spent."""
    deadline = time.monotonic() + timeout
    pause = BACKOFF_FIRST
    while True:
        left = deadline - time.monotonic()
        try:
            return call(path, doc, timeout=max(0.01, left))
        except ServiceRefused as exc:
            if exc.name not in RETRIED or time.monotonic() + pause >= deadline:
                raise
        time.sleep(pause * (0.5 + random.random() / 2))  # noqa: S311 (jitter, not a secret)
        pause = min(BACKOFF_MAX, pause * 2)


def get_key(
    path: Path,
    domain: str,
    *,
    caller: str,
    qube_uuid: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> Secret:
    """The 64-byte key of ``domain`` asked as ``caller`` (``"dom0"``: root's pool driver);
    :class:`ServiceRefused` (``exit_code`` of :mod:`.protocol`) or :class:`ServiceUnreachable`.
    The caller wipes the returned secret."""
    return get_key_info(path, domain, caller=caller, qube_uuid=qube_uuid, timeout=timeout)[0]


def get_key_info(
    path: Path,
    domain: str,
    *,
    caller: str,
    qube_uuid: str | None = None,
    which: str = CURRENT,
    timeout: float = DEFAULT_TIMEOUT,
) -> tuple[Secret, bool]:
    """:func:`get_key` for ``which`` key (``"current"`` or ``"previous"``), and whether a
    rotation of ``domain`` is pending (said with the current key)."""
    found = get_key_answer(path, domain, caller=caller, qube_uuid=qube_uuid, which=which,
                           timeout=timeout)  # fmt: skip
    return found.key, found.rotation_pending


@dataclass
class KeyAnswer:
    """A key from the service: the key (the caller wipes it), its id, and whether a rotation
    of its domain is pending (said with the current key)."""

    key: Secret
    key_id: str
    rotation_pending: bool


def get_key_answer(
    path: Path,
    domain: str,
    *,
    caller: str,
    qube_uuid: str | None = None,
    which: str = CURRENT,
    timeout: float = DEFAULT_TIMEOUT,
) -> KeyAnswer:
    """:func:`get_key_info` with the key's id (the pool driver records which key each
    volume opens with: :mod:`qubes_seal.keystore.volumes`)."""
    doc: dict[str, Any] = {"op": "get-key", "caller": caller, "domain": domain}
    if qube_uuid is not None:
        doc["qube_uuid"] = qube_uuid
    if which != CURRENT:
        doc["which"] = which
    answer = call_retrying(path, doc, timeout=timeout)
    key_hex = answer.pop("key", None)
    if (
        answer.get("domain") != domain
        or answer.get("which", CURRENT) != which
        or not isinstance(key_hex, str)
        or len(key_hex) != KEY_HEX_CHARS
    ):
        raise ServiceUnreachable(
            f"the key service on {path} answered badly: not the key of {domain}"
        )
    key_id = answer.get("key_id")
    try:
        key = Secret(bytes.fromhex(key_hex))
    except ValueError:
        raise ServiceUnreachable(f"the key service on {path} answered badly: no key") from None
    return KeyAnswer(key, key_id if isinstance(key_id, str) else "",
                     answer.get("rotation_pending") is True)  # fmt: skip


def note_volume(
    path: Path,
    domain: str,
    *,
    qube_uuid: str | None,
    volume: str | None,
    luks_uuid: str | None = None,
    key_id: str | None = None,
    forget: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """The ``volume`` request (root): which key ``volume`` of ``domain`` opens with now, or
    ``forget`` its record (:mod:`qubes_seal.keystore.volumes`)."""
    doc: dict[str, Any] = {"op": "volume", "name": domain, "qube_uuid": qube_uuid}
    if volume is not None:
        doc["volume"] = volume
    if forget:
        doc["forget"] = True
    else:
        doc.update(luks_uuid=luks_uuid, key_id=key_id)
    return call_retrying(path, doc, timeout=timeout)


def status(path: Path, *, timeout: float = 2.0) -> dict[str, Any] | None:
    """The daemon's status answer, or None when nobody answers on ``path``."""
    try:
        return request(path, {"op": "status"}, timeout=timeout)
    except ServiceUnreachable:
        return None


def serves_container(answer: dict[str, Any], container: Path) -> bool:
    """Whether a status answer is that of a daemon serving ``container``."""
    served = answer.get("container")
    if not isinstance(served, str):
        return False
    try:
        return os.path.samefile(served, container)
    except OSError:
        return False


#: The CLI's exit code (qubes_seal.errors) for an admin request the daemon refused.
CLI_EXITS = {"bad-request": 2, "too-large": 2, "no-key": 2, "refused": 4, "forbidden": 4}


def admin(path: Path, doc: dict[str, Any]) -> dict[str, Any]:
    """An admin request; a refusal raises :class:`ServiceRefused` with the CLI's exit code."""
    try:
        return call(path, doc)
    except ServiceRefused as exc:
        exc.exit_code = CLI_EXITS.get(exc.name, exc.exit_code)
        raise


def daemon_for(container: Path) -> Path | None:
    """The socket of a running, unlocked daemon that serves ``container``, or None."""
    path = socket_path()
    answer = status(path)
    if answer is None or answer.get("ok") is not True or answer.get("locked") is not False:
        return None
    return path if serves_container(answer, container) else None


def summary() -> tuple[dict[str, Any], list[str]]:
    """The key service's part of ``qubes-seal status``: a JSON object and text lines."""
    path = socket_path()
    answer = status(path)
    if answer is None:
        return {"socket": str(path), "running": False}, [
            f"key service:     not running (nothing answers on {path})"
        ]
    if answer.get("ok") is not True:
        message = str(answer.get("message", "refused"))
        return {"socket": str(path), "running": True, "error": message}, [
            f"key service:     {path}: {message}"
        ]
    served = answer.get("domains_served") or {}
    requests = answer.get("requests") or {}
    doc = {
        "socket": str(path),
        "running": True,
        "locked": answer.get("locked"),
        "container": answer.get("container"),
        "domains_served": served,
        "keystore_domains": answer.get("keystore_domains"),
        "requests": requests,
        "pid": answer.get("pid"),
    }
    state = "LOCKED (no unlock in this boot yet)" if answer.get("locked") else "unlocked"
    by_storage: dict[str, list[str]] = {}
    for domain, storage in sorted(served.items()):
        by_storage.setdefault(str(storage), []).append(str(domain))
    lines = [
        f"key service:     {path} (pid {answer.get('pid')}), {state}",
        f"  container:     {answer.get('container')}"
        + (f", {answer['keystore_domains']} key(s)" if not answer.get("locked") else ""),
    ]
    lines += [f"  serves:        {sd} <- {', '.join(ds)}" for sd, ds in by_storage.items()]
    if not by_storage:
        lines.append("  serves:        nothing (no [storage-domains] entries)")
    lines.append(
        f"  requests:      {requests.get('requests', 0)} answered, "
        f"{requests.get('keys_served', 0)} key(s) served, "
        f"{requests.get('refused', 0)} refused, {requests.get('locked', 0)} while locked"
    )
    return doc, lines
