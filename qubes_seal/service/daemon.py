"""The dom0 key service: :class:`KeyService` decides, :class:`Server` listens.

:class:`KeyService` holds the keystore, opened through this boot's hand-over
(:func:`qubes_seal.chain.open_handed_over`), and answers requests (:mod:`.protocol`):

* ``get-key``: the caller (``QREXEC_REMOTE_DOMAIN``, set by dom0's qrexec daemon) receives the
  key of the requested domain only if the configuration names it as the storage domain that
  serves that domain (``dom0``, root only, for the qubes of ``[dom0-storage]``: the pool
  driver in qubesd, which may name the qube's UUID), and only for the qube UUID the
  configuration binds that domain to (when it does).  The rate limit takes refused and
  malformed requests only: an authorised burst is never refused for its size.
  ``"which": "previous"`` asks for the key the domain had before ``qubes-seal domain
  rotate``, while that rotation is pending (the storage domain re-keys the volume with
  both), under the same checks; without a pending rotation the answer is ``no-key``.
  Every answer is logged: which key, caller, domain, result; never key material.
* admin requests (``status``, ``list``, ``show``, ``add``, ``remove``, ``reload``, ``lock``):
  from root only (``list`` and ``show`` say whether a rotation is pending); ``add`` and
  ``remove`` are written to the container at once (:meth:`qubes_seal.chain.Unlocked.save`).

Without a hand-over (the daemon started before ``qubes-seal unlock``, or after
``qubes-seal lock``) the service is *locked*: every key request gets the ``locked`` error.
Requests check the kernel keyring (a keyctl search; while unlocked at most every
:data:`RECHECK_UNLOCKED` seconds): a new hand-over unlocks the service, a dropped one locks it
and wipes the keys from its memory.

:class:`Server` accepts connections on a Unix socket and serves them from one event loop
(``selectors``, every socket non-blocking): one request per connection, at most
``MAX_REQUEST`` bytes within ``request_timeout`` seconds.  A slow, silent or garbage-sending
client costs one registered socket until its deadline, and nobody waits for it; answering a
key request takes tens of microseconds, so one thread serves thousands a second.  Waiting
connections are counted per user (``SO_PEERCRED`` uid): a user over
``max-connections-per-caller``, or the user holding most when the server is full, loses its
oldest waiting connection to the newcomer, so hoarding starves only the hoarder.  A request
is parsed by :func:`.protocol.decode`, which raises nothing but ``ProtocolError`` (nesting
is bounded before ``json`` recurses); any other exception of one connection is logged and
closes that connection only.
Peers are identified with ``SO_PEERCRED``: root, or a member of the configured
group (Qubes runs dom0's qrexec services as the first member of group ``qubes``).
"""

from __future__ import annotations

import contextlib
import grp
import logging
import os
import pwd
import re
import resource
import selectors
import signal
import socket
import stat
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from .. import handover
from ..errors import CorruptState, QubesSealError, UsageError
from ..keystore import volumes
from ..keystore.errors import QubeUuidMismatch, UnknownDomain
from ..keystore.names import name_problem, normalise_uuid
from . import config as config_mod
from .protocol import (
    ADMIN_OPS,
    CURRENT,
    DEFAULT_SOCKET,
    MAX_REQUEST,
    WHICH_KEYS,
    ProtocolError,
    decode,
    encode,
    error,
)
from .ratelimit import RateLimiter

#: the keystore entry's field that holds the previous key during a rotation (one name for the
#: daemon, :mod:`qubes_seal.rotate` and the volume records)
PREVIOUS_KEY = volumes.PREVIOUS

log = logging.getLogger("qubes_seal.service")

#: While unlocked, the keyring is looked at again at most this often (seconds): a dropped
#: hand-over locks the service within this time.  While locked, every request looks.
RECHECK_UNLOCKED = 0.2

Opener = Callable[[Path], Any]  # path -> Unlocked | None


def _shown(value: object) -> str:
    """A value from a request, safe for a log line: repr'd and cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _uuid_or_none(value: object) -> str | None:
    """The canonical form of a qube UUID from a request, or None when it is not one."""
    if not isinstance(value, str):
        return None
    try:
        return normalise_uuid(value)
    except UsageError:
        return None


_KEY_HEX = re.compile(r"\A[0-9a-f]{128}\Z")


def _pending(entry: Any) -> dict[str, Any] | None:
    """The previous key of ``entry`` while a rotation is pending (``domain rotate`` keeps it
    in ``extra["previous"]``, :mod:`qubes_seal.rotate`), else None; a malformed one raises
    :class:`CorruptState` (never showing the value)."""
    prev = entry.extra.get(PREVIOUS_KEY)
    if prev is None:
        return None
    if not (
        isinstance(prev, dict)
        and isinstance(prev.get("key"), str)
        and _KEY_HEX.match(prev["key"])
        and isinstance(prev.get("key_id"), str)
    ):
        raise CorruptState(f"the previous key kept for {entry.name} is malformed")
    return prev


def domain_view(entry: Any) -> dict[str, Any]:
    """The public view of a keystore entry, and whether a rotation is pending:
    ``rotation_pending`` is None, or the previous key's id, generation and rotation time."""
    view: dict[str, Any] = entry.public_view()
    recorded = volumes.view(entry)
    if recorded:
        view["volumes"] = recorded  # the pool's record: which key each volume opens with
    prev = entry.extra.get(PREVIOUS_KEY)
    view["rotation_pending"] = (
        None
        if not isinstance(prev, dict)
        else {
            "previous_key_id": prev.get("key_id"),
            "previous_generation": prev.get("generation"),
            "rotated": prev.get("rotated"),
        }
    )
    return view


@dataclass(frozen=True)
class Peer:
    """The process at the other end of a connection (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int

    def __str__(self) -> str:
        return f"pid {self.pid} uid {self.uid}"


_UCRED = struct.Struct("3i")


def peer_of(conn: socket.socket) -> Peer:
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return Peer(pid, uid, gid)


def _default_opener(keyring: str) -> Opener:
    def opener(path: Path) -> Any:
        from .. import chain

        return chain.open_handed_over(path, keyring=keyring)

    return opener


class KeyService:
    """The decisions of the key service, independent of any socket."""

    def __init__(
        self,
        config: config_mod.ServiceConfig,
        *,
        container: Path,
        keyring: str = "user",
        config_path: Path | None = None,
        opener: Opener | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.container = container
        self.keyring = keyring
        self._open = opener or _default_opener(keyring)
        self._lock = threading.RLock()
        self._unlocked: Any = None  # chain.Unlocked while unlocked
        self._uuid: str | None = None  # the container's LUKS UUID: the hand-over's name
        self._checked = float("-inf")  # when refresh() last looked at the keyring
        self.limiter = RateLimiter(rate=config.rate, burst=config.burst)
        self.started = time.time()
        self.counts: Counter[str] = Counter()
        self._counts_lock = threading.Lock()

    # -- state -------------------------------------------------------------------------------

    @property
    def locked(self) -> bool:
        return self._unlocked is None

    def _container_uuid(self) -> str:
        if self._uuid is None:
            from ..luks.container import Container

            self._uuid = Container(self.container).uuid
        return self._uuid

    def _drop(self) -> None:
        if self._unlocked is not None:
            self._unlocked.keystore.wipe()
            self._unlocked.close()
            self._unlocked = None

    def refresh(self) -> bool:
        """Follow the kernel keyring: unlock on a new hand-over, lock when it is gone.

        Returns True when the service holds the keystore afterwards.
        """
        with self._lock:
            now = time.monotonic()
            if self._unlocked is not None and now < self._checked + RECHECK_UNLOCKED:
                return True
            self._checked = now
            try:
                vk = handover.get(self._container_uuid(), keyring=self.keyring)
            except (QubesSealError, OSError) as exc:
                log.error("cannot check the hand-over of %s: %s", self.container, exc)
                return self._unlocked is not None
            if vk is None:
                if self._unlocked is not None:
                    log.warning("the hand-over was dropped: locked, keys wiped from memory")
                self._drop()
                return False
            vk.wipe()
            if self._unlocked is None:
                self._load()
            return self._unlocked is not None

    def _load(self) -> None:
        try:
            unlocked = self._open(self.container)
        except (QubesSealError, OSError) as exc:
            log.error("cannot open the keystore of %s: %s", self.container, exc)
            return
        if unlocked is not None:
            self._unlocked = unlocked
            n = len(unlocked.keystore.list())
            log.info("unlocked: keystore of %s open, %d domain key(s)", self.container, n)

    def reload(self) -> dict[str, Any]:
        """Read the configuration again (when it came from a file) and the keystore."""
        with self._lock:
            self._checked = float("-inf")
            if self.config_path is not None:
                try:
                    new = config_mod.load(self.config_path)
                except config_mod.ConfigError as exc:
                    log.error("reload: configuration kept, the new one is invalid: %s", exc)
                    return error("bad-request", f"invalid configuration: {exc.message}")
                self.config = new
                self.limiter = RateLimiter(rate=new.rate, burst=new.burst)
            self._drop()
            self._uuid = None
            self.refresh()
            log.info("reloaded: %s", "unlocked" if self._unlocked else "locked")
            return {"ok": True, **self.status()}

    def close(self) -> None:
        """Wipe the keys from memory; the hand-over stays, so a restart resumes."""
        with self._lock:
            self._drop()

    def status(self) -> dict[str, Any]:
        with self._counts_lock:
            counts = dict(self.counts)
        ks = None if self._unlocked is None else self._unlocked.keystore
        return {
            "locked": ks is None,
            "container": str(self.container),
            "container_uuid": self._uuid,
            "domains_served": self.config.server_of,
            "keystore_domains": None if ks is None else len(ks.list()),
            "config": self.config.public_view(),
            "requests": counts,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
        }

    def _count(self, *names: str) -> None:
        with self._counts_lock:
            for name in names:
                self.counts[name] += 1

    # -- requests ----------------------------------------------------------------------------

    def handle(self, request: dict[str, Any], peer: Peer, *, admin: bool) -> dict[str, Any]:
        """The answer to one request from ``peer`` (``admin``: the peer may administer)."""
        op = request.get("op")
        if not isinstance(op, str):
            op = None  # a list or an object would not even hash: refused as unknown below
        if op == "get-key":
            answer = self._get_key(request, peer)
        elif op in ADMIN_OPS:
            if not admin:
                log.warning("admin request %s from %s refused: root only", _shown(op), peer)
                answer = error("forbidden", f"{op} is for root only")
            else:
                answer = self._admin(str(op), request, peer)
        else:
            log.warning("request from %s refused: unknown op %s", peer, _shown(op))
            answer = error("bad-request", "unknown op")
        self._count("requests", "ok" if answer["ok"] else str(answer["error"]),
                    *(("keys_served",) if op == "get-key" and answer["ok"] else ()))  # fmt: skip
        return answer

    def _limited(self, bucket: str) -> bool:
        """Whether a refused or malformed request from ``bucket`` finds its bucket empty."""
        return not self.limiter.allow(bucket)

    def _get_key(self, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        caller, domain = request.get("caller"), request.get("domain")
        for role, value in (("caller", caller), ("domain", domain)):
            problem = name_problem(value)
            if problem:
                log.warning("key request from %s: invalid %s %s: refused", peer, role,
                            _shown(value))  # fmt: skip
                if self._limited(f"uid {peer.uid}"):
                    return error("rate-limited", "too many malformed requests: try again later")
                return error("bad-request", f"invalid {role} name: {problem}")
        which = request.get("which", CURRENT)
        if which not in WHICH_KEYS:
            log.warning("key request from %s: invalid which %s: refused", peer, _shown(which))
            if self._limited(f"uid {peer.uid}"):
                return error("rate-limited", "too many malformed requests: try again later")
            return error("bad-request", "invalid which: 'current' or 'previous'")
        assert isinstance(caller, str) and isinstance(domain, str)
        # The rate limit takes what deserves it: a refused request.  An authorised caller's
        # burst (qubesd starting every autostart qube at boot, a storage domain opening all
        # its volumes) is never refused for its size.
        # Every line names the key asked for ("current key request ..." or "previous key
        # request ..."), never the key itself.
        qube_uuid = self.config.domain_uuids.get(domain)
        reason = ""
        if self.config.served_by(domain) != caller:
            reason = f"{caller} is not the storage domain of {domain}"
        elif caller == config_mod.DOM0 and peer.uid != 0:
            reason = f"only root in dom0 may ask as {config_mod.DOM0}"
        elif caller == config_mod.DOM0 and request.get("qube_uuid") is not None:
            # dom0's pool driver knows the qube's UUID: it binds the key like the config does
            asked = _uuid_or_none(request.get("qube_uuid"))
            if asked is None:
                reason = "invalid qube_uuid"
            elif qube_uuid is not None and asked != qube_uuid:
                reason = f"the configured qube UUID of {domain} differs"
            else:
                qube_uuid = asked
        if reason:
            # an impostor's claim to be dom0 is charged to its uid, not to dom0's bucket
            bucket = caller if caller != config_mod.DOM0 or peer.uid == 0 else f"uid {peer.uid}"
            if self._limited(bucket):
                log.warning("%s key request caller=%s domain=%s result=rate-limited", which,
                            caller, domain)  # fmt: skip
                return error("rate-limited", f"too many refused requests from {caller}: "
                             "try again later")  # fmt: skip
            log.warning("%s key request caller=%s domain=%s result=refused (%s)", which,
                        caller, domain, reason)  # fmt: skip
            return error("refused", f"{reason}: refused")
        with self._lock:
            if not self.refresh():
                log.warning("%s key request caller=%s domain=%s result=locked", which, caller,
                            domain)  # fmt: skip
                return error(
                    "locked",
                    "the key service is locked: the container was not unlocked in this boot "
                    "(run 'qubes-seal unlock' in dom0)",
                )
            try:
                entry = self._unlocked.keystore.get(domain, qube_uuid=qube_uuid)
            except UnknownDomain:
                log.warning("%s key request caller=%s domain=%s result=no-key", which, caller,
                            domain)  # fmt: skip
                return error("no-key", f"no key is stored for {domain}")
            except QubeUuidMismatch:
                log.warning("%s key request caller=%s domain=%s result=refused (qube UUID "
                            "differs)", which, caller, domain)  # fmt: skip
                return error("refused", f"the stored key of {domain} belongs to another qube")
            rotation_pending = False
            if which == CURRENT:
                key_hex = entry.key.reveal().hex()
                key_id = entry.key_id
                # dom0's pool driver re-keys a volume at its start while a rotation is pending
                rotation_pending = PREVIOUS_KEY in entry.extra
            else:
                try:
                    pending = _pending(entry)
                except CorruptState as exc:
                    log.error("previous key request caller=%s domain=%s result=internal (%s)",
                              caller, domain, exc)  # fmt: skip
                    return error("internal", "the previous key kept in dom0 is unusable")
                if pending is None:
                    log.warning("previous key request caller=%s domain=%s result=no-key (no "
                                "rotation pending)", caller, domain)  # fmt: skip
                    return error(
                        "no-key",
                        f"no previous key for {domain}: no rotation is pending (none was "
                        f"started with 'qubes-seal domain rotate {domain}', or it was committed)",
                    )
                key_hex, key_id = pending["key"], pending["key_id"]
        log.info("%s key request caller=%s domain=%s result=ok key_id=%s", which, caller, domain,
                 key_id)  # fmt: skip
        answer = {"ok": True, "domain": domain, "which": which, "key_id": key_id, "key": key_hex}
        if rotation_pending:
            answer["rotation_pending"] = True
        return answer

    def _admin(self, op: str, request: dict[str, Any], peer: Peer) -> dict[str, Any]:
        if op == "status":
            with self._lock:
                self.refresh()
                return {"ok": True, **self.status()}
        if op == "reload":
            log.info("reload requested by %s", peer)
            return self.reload()
        with self._lock:
            if op == "lock":
                from .. import chain

                self._drop()
                dropped = chain.lock(self.container, keyring=self.keyring)
                log.warning("locked by %s: keys wiped, hand-over dropped=%s", peer, dropped)
                return {"ok": True, "locked": True, "dropped": dropped}
            if not self.refresh():
                return error("locked", "the key service is locked: run 'qubes-seal unlock'")
            unlocked = self._unlocked
            ks = unlocked.keystore
            name = request.get("name")
            qube_uuid = request.get("qube_uuid")
            if op == "list":
                return {"ok": True, "domains": [domain_view(d) for d in ks.list()]}
            if name_problem(name) or not (qube_uuid is None or isinstance(qube_uuid, str)):
                return error("bad-request", f"invalid qube name {_shown(name)} or UUID")
            try:
                if op == "show":
                    entry = ks.get(name, qube_uuid=qube_uuid)
                    answer = {"ok": True, "domain": domain_view(entry)}
                    if request.get("show_key") is True:
                        answer["key"] = entry.key.reveal().hex()
                        log.warning("admin %s: key of %s shown to %s", op, name, peer)
                    return answer
                if op == "volume":
                    return self._volume(ks, str(name), qube_uuid, request, peer)
                if op == "add":
                    entry = ks.add(name, qube_uuid=qube_uuid)
                    self._save(op, name)
                    log.info("admin add %s by %s: key id %s", name, peer, entry.key_id)
                    return {"ok": True, "added": domain_view(entry)}
                ks.remove(name)
                self._save(op, name)
                log.info("admin remove %s by %s: key destroyed", name, peer)
                return {"ok": True, "removed": name}
            except QubeUuidMismatch as exc:
                return error("refused", exc.message)
            except UnknownDomain as exc:
                return error("no-key", exc.message)
            except UsageError as exc:
                return error("bad-request", exc.message)

    def _volume(
        self, ks: Any, name: str, qube_uuid: str | None, request: dict[str, Any], peer: Peer
    ) -> dict[str, Any]:
        """The pool driver's word on which key a volume of ``name`` opens with now
        (:mod:`qubes_seal.keystore.volumes`): ``{"volume": NAME or "luks_uuid" alone,
        "luks_uuid", "key_id"}``, or ``{"volume", "forget": true}``.  Written only when the
        record changes."""
        entry = ks.get(name, qube_uuid=qube_uuid)
        volume, luks_uuid, key_id = (request.get(k) for k in ("volume", "luks_uuid", "key_id"))
        if request.get("forget") is True:
            changed = volumes.forget(entry, volume)
        elif not isinstance(key_id, str) or not (
            isinstance(luks_uuid, str) or (luks_uuid is None and volume is not None)
        ):
            raise UsageError("a volume record needs a key_id, and a volume or a luks_uuid")
        elif volume is None:
            volume, changed = volumes.note_by_uuid(entry, str(luks_uuid), key_id=key_id)
        else:
            changed = volumes.note(entry, volume, luks_uuid=luks_uuid, key_id=key_id)
        if changed:
            self._save("volume", name)
            log.info("admin volume %s:%s by %s: key id %s%s", name, volume, peer,
                     key_id, " (forgotten)" if request.get("forget") is True else "")  # fmt: skip
        return {"ok": True, "volume": volume, "changed": changed}

    def _save(self, op: str, name: object) -> None:
        """Persist the keystore; on failure read it back, so memory matches the container."""
        try:
            self._unlocked.save()
        except (QubesSealError, OSError) as exc:
            log.error("admin %s %s: writing the keystore failed: %s", op, _shown(name), exc)
            self._drop()
            self.refresh()
            raise UsageError(f"{op} {name}: the keystore could not be written: {exc}") from exc


# -- the socket ------------------------------------------------------------------------------


SWEEP_INTERVAL = 0.1  # seconds between looks for connections past their deadline
ACCEPT_BATCH = 64  # connections accepted per wake-up, before reading the open ones
SEND_TIMEOUT = 0.5


#: file descriptors kept beyond ``max-connections``: the listening socket, the log, the
#: container, the keyring look-ups
SPARE_FDS = 64


@dataclass
class _Conn:
    peer: Peer
    deadline: float
    buf: bytearray = field(default_factory=bytearray)
    registered: bool = False  # with the selector (most connections are answered at accept)


def _raise_fd_limit(wanted: int) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` towards ``wanted`` (within the hard limit); the
    soft limit afterwards.  systemd starts services with a soft limit of 1024, fewer than
    the default ``max-connections`` plus the daemon's own files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    return int(wanted if soft == resource.RLIM_INFINITY else soft)


class Server:
    """A Unix-socket front of a :class:`KeyService`: one thread, a ``selectors`` event loop."""

    def __init__(self, service: KeyService, path: Path) -> None:
        self.service = service
        self.path = path
        cfg = service.config
        self.timeout = cfg.request_timeout
        self.max_connections = cfg.max_connections
        self.per_caller = cfg.max_connections_per_caller
        self._conns: dict[socket.socket, _Conn] = {}
        # uid -> its open connections, oldest first (dicts keep insertion order)
        self._by_uid: dict[int, dict[socket.socket, None]] = {}
        self._evicted: Counter[int] = Counter()  # uid -> closed for room, not yet logged
        self._sel: selectors.BaseSelector | None = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._sock: socket.socket | None = None
        try:
            self.gid: int | None = grp.getgrnam(cfg.group).gr_gid
        except KeyError:
            self.gid = None
        self._members: dict[int, bool] = {}
        self._euid = os.geteuid()

    # -- setup -------------------------------------------------------------------------------

    def _prepare_dir(self) -> None:
        directory = self.path.parent
        mode = 0o750 if self.gid is not None else 0o700
        created = False
        try:
            directory.mkdir(mode=mode)
            created = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise UsageError(f"cannot create {directory}: {exc.strerror}") from exc
        st = directory.stat()
        if created or directory == Path(DEFAULT_SOCKET).parent:
            os.chmod(directory, mode)
            if self.gid is not None and os.geteuid() == 0:
                os.chown(directory, 0, self.gid)
        elif st.st_uid != os.geteuid() or st.st_mode & 0o022:
            raise UsageError(
                f"{directory} is writable by others or not ours: refusing to put the key "
                "service's socket there",
                hint="Use a directory of its own (default /run/qubes-seal).",
            )

    def bind(self) -> None:
        """Create the socket: 0660 root:GROUP if the group exists, else 0600."""
        self._prepare_dir()
        if self.path.exists() or self.path.is_symlink():
            if not stat.S_ISSOCK(os.lstat(self.path).st_mode):
                raise UsageError(f"{self.path} exists and is not a socket")
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                try:
                    probe.connect(str(self.path))
                except OSError:
                    self.path.unlink()  # a stale socket of a daemon that died
                else:
                    raise UsageError(f"another key service answers on {self.path}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old)
        if self.gid is not None and os.geteuid() == 0:
            os.chown(self.path, 0, self.gid)
            os.chmod(self.path, 0o660)
        else:
            os.chmod(self.path, 0o600)
        sock.listen(socket.SOMAXCONN)
        sock.settimeout(0.25)
        self._sock = sock
        limit = _raise_fd_limit(self.max_connections + SPARE_FDS)
        if limit < self.max_connections + SPARE_FDS:
            self.max_connections = max(1, limit - SPARE_FDS)
            log.warning("file descriptor limit %d: at most %d connections at once", limit,
                        self.max_connections)  # fmt: skip

    def _restore_access(self) -> None:
        """The socket's group again (and its directory's, when it is the default one).

        systemd resets the owner of ``RuntimeDirectory=`` and of what it holds to the unit's
        user and group (root:root) each time it spawns one of the unit's commands,
        ``ExecReload=`` included: after ``systemctl reload qubes-seal-keyd`` the service group
        (dom0's qrexec service user) could no longer reach the socket, until a restart
        (found in the VM, tests/vm/test_dom0.py).  A reload puts the group back.
        """
        if self.gid is None or os.geteuid() != 0:
            return
        try:
            if self.path.parent == Path(DEFAULT_SOCKET).parent:
                os.chown(self.path.parent, 0, self.gid)
                os.chmod(self.path.parent, 0o750)  # noqa: S103 (root:GROUP, the socket's group)
            if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                os.chown(self.path, 0, self.gid)
                os.chmod(self.path, 0o660)
        except OSError as exc:
            log.error("cannot give the socket back to group %d: %s", self.gid, exc)

    # -- peers -------------------------------------------------------------------------------

    def _admitted(self, peer: Peer) -> bool:
        if peer.uid == 0 or peer.uid == self._euid:
            return True
        if self.gid is None:
            return False
        if peer.gid == self.gid:
            return True
        if peer.uid not in self._members:
            try:
                user = pwd.getpwuid(peer.uid).pw_name
                self._members[peer.uid] = user in grp.getgrgid(self.gid).gr_mem
            except KeyError:
                self._members[peer.uid] = False
        return self._members[peer.uid]

    def _is_admin(self, peer: Peer) -> bool:
        return peer.uid == 0 or peer.uid == self._euid

    # -- serving -----------------------------------------------------------------------------

    def serve_forever(self) -> None:
        """The event loop: one thread, every connection non-blocking, each with a deadline."""
        if self._sock is None:
            self.bind()
        assert self._sock is not None
        self._sock.setblocking(False)
        sel = selectors.DefaultSelector()
        sel.register(self._sock, selectors.EVENT_READ, None)
        self._sel = sel
        log.info("listening on %s (%s)", self.path,
                 "locked" if self.service.locked else "unlocked")  # fmt: skip
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        try:
            while not self._stop.is_set():
                if self._reload.is_set():
                    self._reload.clear()
                    self.service.reload()
                    self._restore_access()
                for key, _ in sel.select(SWEEP_INTERVAL):
                    if key.data is None:
                        self._accept()
                    else:
                        self._readable(key.fileobj, key.data)  # type: ignore[arg-type]
                now = time.monotonic()
                if now >= next_sweep:
                    self._sweep(now)
                    self._log_evictions()
                    next_sweep = now + SWEEP_INTERVAL
        finally:
            for conn in list(self._conns):
                self._close(conn)
            sel.close()
            self._sock.close()
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.service.close()
            log.info("stopped")

    def _accept(self) -> None:
        assert self._sock is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.error("accept failed: %s", exc)
                return
            try:
                self._admit(conn)
            except Exception:  # one connection's bug, not the server's: logged, closed
                log.exception("internal error accepting a connection")
                self._close(conn)

    def _admit(self, conn: socket.socket) -> None:
        """Identify, admit, make room, then answer or register one accepted connection."""
        conn.setblocking(False)
        try:
            peer = peer_of(conn)
        except OSError:
            conn.close()
            return
        if not self._admitted(peer):
            log.warning("connection from %s refused: not root, not in the service group",
                        peer)  # fmt: skip
            self._reply(conn, error("forbidden", "not allowed to use the key service"))
            conn.close()
            return
        # Room for the newcomer: over its own cap, the caller's oldest connection goes; the
        # server full, the oldest connection of the caller holding most.  Every connection
        # held here is one still waiting for its request (an answered one is closed at
        # once), so a caller that hoards idle connections recycles its own, and a newcomer,
        # whoever it is, is always read.
        mine = self._by_uid.get(peer.uid)
        if mine is not None and len(mine) >= self.per_caller:
            self._evict(next(iter(mine)))
        elif len(self._conns) >= self.max_connections:
            heaviest = max(self._by_uid, key=lambda uid: len(self._by_uid[uid]))
            self._evict(next(iter(self._by_uid[heaviest])))
        state = _Conn(peer, time.monotonic() + self.timeout)
        self._conns[conn] = state
        self._by_uid.setdefault(peer.uid, {})[conn] = None
        # Most clients have sent their request by now: answer it without a trip through
        # the selector; the others are registered and read when they are ready.
        if self._readable(conn, state):
            return
        assert self._sel is not None
        self._sel.register(conn, selectors.EVENT_READ, state)
        state.registered = True

    def _evict(self, conn: socket.socket) -> None:
        """Close a connection still waiting for its request to make room (``busy``)."""
        state = self._conns.get(conn)
        if state is not None:
            self._evicted[state.peer.uid] += 1
            self.service._count("requests", "busy")
        message = "too many connections waiting: one of the oldest, closed for room; try again"
        self._reply(conn, error("busy", message))
        self._close(conn)

    def _log_evictions(self) -> None:
        """One log line per user and sweep for the connections closed to make room."""
        for uid, n in self._evicted.items():
            held = len(self._by_uid.get(uid, ()))
            log.warning("%d waiting connection(s) of uid %d closed to make room (uid %d holds "
                        "%d, at most %d per user, %d in all)", n, uid, uid, held,
                        self.per_caller, self.max_connections)  # fmt: skip
        self._evicted.clear()

    def _close(self, conn: socket.socket) -> None:
        # Only a registered connection is unregistered: selectors' KeyError for one that is
        # not builds a repr of the socket, a measurable share of a request's CPU.
        state = self._conns.pop(conn, None)
        if state is not None:
            mine = self._by_uid.get(state.peer.uid)
            if mine is not None:
                mine.pop(conn, None)
                if not mine:
                    del self._by_uid[state.peer.uid]
            if state.registered and self._sel is not None:
                with contextlib.suppress(KeyError, ValueError):
                    self._sel.unregister(conn)
        conn.close()

    def _sweep(self, now: float) -> None:
        """Answer and drop the connections whose request did not arrive in time."""
        for conn, state in list(self._conns.items()):
            if state.deadline <= now:
                log.warning("client %s sent %d byte(s) and no complete request in %.1f s: "
                            "dropped", state.peer, len(state.buf), self.timeout)  # fmt: skip
                self.service._count("requests", "timeout")
                self._reply(conn, error("bad-request", "no complete request in time"))
                self._close(conn)

    def _readable(self, conn: socket.socket, state: _Conn) -> bool:
        """Read what ``conn`` has; True when the connection is finished (and closed).

        Whatever goes wrong with one request stays with it: an unexpected exception is
        logged, answered ``internal`` and closes that connection only."""
        try:
            return self._read(conn, state)
        except Exception:
            log.exception("internal error serving %s", state.peer)
            self.service._count("requests", "internal")
            self._reply(conn, error("internal", "internal error of the key service (see its log)"))
            self._close(conn)
            return True

    def _read(self, conn: socket.socket, state: _Conn) -> bool:
        try:
            chunk = conn.recv(MAX_REQUEST + 1 - len(state.buf))
        except BlockingIOError:
            return False
        except OSError as exc:
            log.info("connection from %s dropped: %s", state.peer, exc.strerror or exc)
            self._close(conn)
            return True
        if not chunk:
            what = "mid-request" if state.buf else "without a request"
            log.info("client %s disconnected %s", state.peer, what)
            self.service._count("disconnected")
            self._close(conn)
            return True
        state.buf += chunk
        end = state.buf.find(b"\n")
        if end < 0:
            if len(state.buf) > MAX_REQUEST:
                log.warning("request from %s refused: larger than %d bytes", state.peer,
                            MAX_REQUEST)  # fmt: skip
                self.service._count("requests", "too-large")
                self._reply(conn, error("too-large", f"request larger than {MAX_REQUEST} bytes"))
                self._close(conn)
                return True
            return False
        line = bytes(state.buf[:end])
        state.buf.clear()
        self._reply(conn, self._answer(line, state.peer))
        self._close(conn)
        return True

    def _answer(self, line: bytes, peer: Peer) -> dict[str, Any]:
        try:
            request = decode(line)  # raises ProtocolError and nothing else
        except ProtocolError as exc:
            log.warning("request from %s refused: %s", peer, exc)
            if self.service._limited(f"uid {peer.uid}"):
                self.service._count("requests", "rate-limited")
                return error("rate-limited", "too many malformed requests: try again later")
            self.service._count("requests", "bad-request")
            return error("bad-request", f"malformed request: {exc}")
        try:
            return self.service.handle(request, peer, admin=self._is_admin(peer))
        except Exception:  # a bug must not take the server down; it is logged
            log.exception("internal error answering %s", peer)
            return error("internal", "internal error of the key service (see its log)")

    @staticmethod
    def _reply(conn: socket.socket, answer: dict[str, Any]) -> None:
        """Send one answer line without blocking: it fits an empty socket buffer; should it
        not (a huge listing), the rest is sent with a timeout of :data:`SEND_TIMEOUT`."""
        data = encode(answer)
        try:
            sent = conn.send(data)
            if sent < len(data):
                conn.settimeout(SEND_TIMEOUT)
                conn.sendall(data[sent:])
        except OSError as exc:
            log.info("answer not delivered: %s", exc.strerror or exc)

    def stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT stop the server, SIGHUP reloads (main thread only)."""

        def on_stop(signum: int, frame: FrameType | None) -> None:
            self.stop()

        def on_hup(signum: int, frame: FrameType | None) -> None:
            self.request_reload()

        signal.signal(signal.SIGTERM, on_stop)
        signal.signal(signal.SIGINT, on_stop)
        signal.signal(signal.SIGHUP, on_hup)


# -- logging ---------------------------------------------------------------------------------

SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class JournalFormatter(logging.Formatter):
    """``<priority>message``: journald reads the prefix from a service's stderr."""

    def format(self, record: logging.LogRecord) -> str:
        return f"<{SYSLOG_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


class _StampFormatter(logging.Formatter):
    """The terminal format: the timestamp text is made once a second, not once a record."""

    _second = -1
    _stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr: under systemd (``JOURNAL_STREAM`` set) with syslog priorities for the
    journal, else with a timestamp.  No dependency on python3-systemd.

    Every key request is logged, so a record must be cheap: the daemon's process id is put
    into the format once, and the logging module is told not to look up what no format
    uses (the caller's source line, thread and process names: the "Optimization" switches
    of the logging documentation).  This is the daemon's process, and these formats only.
    """
    handler = logging.StreamHandler()
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(
            _StampFormatter(
                f"%(asctime)s qubes-seal keyd[{os.getpid()}]: %(levelname)s %(message)s"
            )
        )
    logging._srcfile = None  # no findCaller() per record
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False


def serve(
    *,
    socket_path: Path,
    config_path: Path,
    container: Path,
    keyring: str = "user",
    ready: Callable[[Server], None] | None = None,
) -> int:
    """Run the daemon until SIGTERM/SIGINT; returns the exit status."""
    from ..hardening import no_core_dumps

    no_core_dumps()  # it holds every domain key: no core file, no ptrace (also the CLI's)
    configure_logging()
    cfg = config_mod.load(config_path)
    service = KeyService(cfg, container=container, keyring=keyring, config_path=config_path)
    server = Server(service, socket_path)
    server.bind()
    server.install_signal_handlers()
    service.refresh()
    served = ", ".join(f"{sd}: {', '.join(ds) or '-'}" for sd, ds in cfg.storage_domains.items())
    log.info("configuration %s: %s", cfg.source, served or "no storage domain")
    if ready is not None:
        ready(server)
    server.serve_forever()
    return 0
