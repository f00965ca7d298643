"""The key service's wire format, limits and exit codes: stdlib only, shared by both ends.

One request per connection: the client sends one JSON object on one line (UTF-8, ending in
``\\n``, at most :data:`MAX_REQUEST` bytes); the daemon answers one JSON object on one line and
closes the connection.

Requests::

    {"op": "get-key", "caller": "sys-storage", "domain": "work", "which": "current"}
    {"op": "status"} | {"op": "list"} | {"op": "reload"} | {"op": "lock"}      (admin: uid 0)
    {"op": "add", "name": "work", "qube_uuid": "..." | null}                  (admin: uid 0)
    {"op": "remove", "name": "work"}                                         (admin: uid 0)
    {"op": "show", "name": "work", "qube_uuid": ... , "show_key": false}      (admin: uid 0)
    {"op": "volume", "name": "work", "qube_uuid": ..., "volume": "private",
     "luks_uuid": "...", "key_id": "..."}    (admin: the pool driver's record of which key
                                             a volume opens with; "volume" omitted: the
                                             record with that luks_uuid; "forget": true)

``which`` is optional: ``"current"`` (the default) asks for the domain's key,
``"previous"`` for the key it had before ``qubes-seal domain rotate`` while that rotation is
pending (not yet ``--commit``-ed), so that the storage domain can re-key the volume.

Answers: ``{"ok": true, ...}`` (``"key"``: 128 hex digits for ``get-key``, ``"which"``: the
key it is), or
``{"ok": false, "error": NAME, "message": TEXT, "exit": CODE}`` with ``NAME`` one of
:data:`ERRORS` and ``CODE`` the exit status of ``qubes.SealGetDiskKey`` for that refusal.

The qrexec service executable (``qrexec/qubes.SealGetDiskKey``, also installed as
``qubes.SealGetPreviousDiskKey``: its name says which key it asks for) cannot import this
module (it must start fast and stand alone): it repeats the few constants it needs; a test
checks that the two agree.
"""

from __future__ import annotations

import json
from typing import Any

DEFAULT_SOCKET = "/run/qubes-seal/keyd.sock"
DEFAULT_CONFIG = "/etc/qubes-seal/config.toml"
SERVICE_NAME = "qubes.SealGetDiskKey"
PREVIOUS_SERVICE_NAME = "qubes.SealGetPreviousDiskKey"

#: the ``which`` of a ``get-key`` request: the domain's key, or the one before a pending rotation
CURRENT, PREVIOUS = "current", "previous"
WHICH_KEYS = (CURRENT, PREVIOUS)
#: qrexec service name -> the key it serves
SERVICES = {SERVICE_NAME: CURRENT, PREVIOUS_SERVICE_NAME: PREVIOUS}

MAX_REQUEST = 4096  # bytes, newline included: a request is a few names
MAX_DEPTH = 16  # nesting of arrays and objects in a line: a request has 1, an answer 4
MAX_RESPONSE = 65536  # a client reads at most this much (a list of many domains)
KEY_HEX_CHARS = 128  # 64 key bytes

# Exit codes of qubes.SealGet[Previous]DiskKey and of qubes-seal-storage-agent.
EXIT_OK = 0
EXIT_ERROR = 1  # internal error of the daemon, or a malformed answer
EXIT_BAD_ARGUMENT = 2  # the requested domain is not a valid qube name
EXIT_NO_KEY = 3  # no key for that domain ("previous": no rotation is pending)
EXIT_REFUSED = 4  # the caller does not serve that domain (or the qube UUID differs)
EXIT_RATE_LIMITED = 5  # too many requests from this caller: try again later
EXIT_UNREACHABLE = 6  # the daemon does not answer on its socket
EXIT_LOCKED = 7  # the daemon runs, but the container was not unlocked in this boot

#: error name -> exit code
ERRORS = {
    "bad-request": EXIT_BAD_ARGUMENT,
    "too-large": EXIT_BAD_ARGUMENT,
    "no-key": EXIT_NO_KEY,
    "refused": EXIT_REFUSED,
    "forbidden": EXIT_REFUSED,
    "rate-limited": EXIT_RATE_LIMITED,
    "busy": EXIT_UNREACHABLE,
    "locked": EXIT_LOCKED,
    "internal": EXIT_ERROR,
}

ADMIN_OPS = frozenset({"status", "list", "add", "remove", "show", "reload", "lock", "volume"})


def encode(doc: dict[str, Any]) -> bytes:
    """One line of compact JSON."""
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode() + b"\n"


def error(name: str, message: str) -> dict[str, Any]:
    """A refusal or failure answer; ``name`` must be one of :data:`ERRORS`."""
    return {"ok": False, "error": name, "message": message, "exit": ERRORS[name]}


class ProtocolError(ValueError):
    """A line that is not one JSON object."""


def nesting(text: str) -> int:
    """How deep arrays and objects nest in ``text`` (JSON), brackets inside strings ignored.

    A loop over the characters, not a parse: it cannot recurse, whatever the input."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def decode(line: bytes) -> dict[str, Any]:
    """The JSON object of one request or answer line; :class:`ProtocolError` otherwise, and
    nothing else, whatever the bytes.

    ``json`` parses recursively: a line nested a few thousand deep raises ``RecursionError``
    (not a ``ValueError``), which once stopped the daemon.  So the nesting is measured first,
    without recursion (:func:`nesting`, only when the line holds more than
    :data:`MAX_DEPTH` brackets at all: a request holds one), and a deeper line is refused
    before ``json`` sees it.  Every other failure of the parse is a :class:`ProtocolError`
    too.  The line is decoded as UTF-8 first: ``json.loads`` on bytes would also accept
    UTF-16 and UTF-32, which the protocol does not.
    """
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("not a JSON line (UnicodeDecodeError)") from None
    if text.count("[") + text.count("{") > MAX_DEPTH and nesting(text) > MAX_DEPTH:
        raise ProtocolError(f"nested deeper than {MAX_DEPTH}")
    try:
        doc = json.loads(text)
    except Exception as exc:  # ValueError; RecursionError, MemoryError: never past here
        raise ProtocolError(f"not a JSON line ({type(exc).__name__})") from None
    if not isinstance(doc, dict):
        raise ProtocolError("not a JSON object")
    return doc
