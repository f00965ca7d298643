"""A TCP proxy in front of swtpm that records which TPM commands cross the bus, in order.

Tests use it to check *how* the library talks to the TPM, not only what it gets back: that
an unseal is ``StartAuthSession, PolicyPCR, Unseal, FlushContext`` and nothing more, that
no command leaks a secret in clear, that a failure path still flushes its handles.

    with Swtpm(state) as tpm, CountingProxy(tpm.port) as proxy:
        with ESAPI(proxy.tcti) as esapi:
            esapi.pcr_read(selection)
        assert proxy.commands == ["PCR_Read"]

It listens on two adjacent ports ``P'`` and ``P' + 1`` of 127.0.0.1, so that libtss2's swtpm
TCTI (``"swtpm:host=127.0.0.1,port=P'"``) finds its control channel at ``P' + 1``, and
forwards them, byte for byte, to swtpm's ``P`` and ``P + 1``.

The command port carries bare TPM 2.0 command buffers (no framing of swtpm's own).  Every
command starts with the header of TPM 2.0 Part 1, 18.2 (big-endian)::

    tag (2 bytes: TPM_ST_NO_SESSIONS 0x8001 or TPM_ST_SESSIONS 0x8002)
    commandSize (4 bytes: the whole command, header included)
    commandCode (4 bytes: TPM_CC)

so a command is found by reading 10 bytes and skipping ``commandSize - 10``.  TCP does
not keep message boundaries: a command may arrive in several reads, or several in one, and
:class:`CommandParser` is written for that.  The libtss2 swtpm TCTI opens one connection per
command, tpm2-tools through ``tabrmd`` or a kernel RM would keep one open: both work.

One selector thread serves every socket; connections are bounded (``max_connections``) and
each send has a timeout, so a stuck peer cannot hang a test.  When one side closes, both
are closed (the TPM protocol is strict request/response: nothing is lost).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import struct
import threading
from dataclasses import dataclass, field
from types import TracebackType
from typing import Final

HOST: Final = "127.0.0.1"
HEADER_SIZE: Final = 10

#: TPM 2.0 Part 2, 6.5.2 Table 12 (TPM_CC), names as the specification writes them without
#: the ``TPM2_`` prefix; plus swtpm's in-band vendor command (swtpm ``tpm_ioctl.h``).
TPM_CC_NAMES: Final[dict[int, str]] = {
    0x11F: "NV_UndefineSpaceSpecial",
    0x120: "EvictControl",
    0x121: "HierarchyControl",
    0x122: "NV_UndefineSpace",
    0x124: "ChangeEPS",
    0x125: "ChangePPS",
    0x126: "Clear",
    0x127: "ClearControl",
    0x128: "ClockSet",
    0x129: "HierarchyChangeAuth",
    0x12A: "NV_DefineSpace",
    0x12B: "PCR_Allocate",
    0x12C: "PCR_SetAuthPolicy",
    0x12D: "PP_Commands",
    0x12E: "SetPrimaryPolicy",
    0x12F: "FieldUpgradeStart",
    0x130: "ClockRateAdjust",
    0x131: "CreatePrimary",
    0x132: "NV_GlobalWriteLock",
    0x133: "GetCommandAuditDigest",
    0x134: "NV_Increment",
    0x135: "NV_SetBits",
    0x136: "NV_Extend",
    0x137: "NV_Write",
    0x138: "NV_WriteLock",
    0x139: "DictionaryAttackLockReset",
    0x13A: "DictionaryAttackParameters",
    0x13B: "NV_ChangeAuth",
    0x13C: "PCR_Event",
    0x13D: "PCR_Reset",
    0x13E: "SequenceComplete",
    0x13F: "SetAlgorithmSet",
    0x140: "SetCommandCodeAuditStatus",
    0x141: "FieldUpgradeData",
    0x142: "IncrementalSelfTest",
    0x143: "SelfTest",
    0x144: "Startup",
    0x145: "Shutdown",
    0x146: "StirRandom",
    0x147: "ActivateCredential",
    0x148: "Certify",
    0x149: "PolicyNV",
    0x14A: "CertifyCreation",
    0x14B: "Duplicate",
    0x14C: "GetTime",
    0x14D: "GetSessionAuditDigest",
    0x14E: "NV_Read",
    0x14F: "NV_ReadLock",
    0x150: "ObjectChangeAuth",
    0x151: "PolicySecret",
    0x152: "Rewrap",
    0x153: "Create",
    0x154: "ECDH_ZGen",
    0x155: "HMAC",
    0x156: "Import",
    0x157: "Load",
    0x158: "Quote",
    0x159: "RSA_Decrypt",
    0x15B: "HMAC_Start",
    0x15C: "SequenceUpdate",
    0x15D: "Sign",
    0x15E: "Unseal",
    0x160: "PolicySigned",
    0x161: "ContextLoad",
    0x162: "ContextSave",
    0x163: "ECDH_KeyGen",
    0x164: "EncryptDecrypt",
    0x165: "FlushContext",
    0x167: "LoadExternal",
    0x168: "MakeCredential",
    0x169: "NV_ReadPublic",
    0x16A: "PolicyAuthorize",
    0x16B: "PolicyAuthValue",
    0x16C: "PolicyCommandCode",
    0x16D: "PolicyCounterTimer",
    0x16E: "PolicyCpHash",
    0x16F: "PolicyLocality",
    0x170: "PolicyNameHash",
    0x171: "PolicyOR",
    0x172: "PolicyTicket",
    0x173: "ReadPublic",
    0x174: "RSA_Encrypt",
    0x176: "StartAuthSession",
    0x177: "VerifySignature",
    0x178: "ECC_Parameters",
    0x179: "FirmwareRead",
    0x17A: "GetCapability",
    0x17B: "GetRandom",
    0x17C: "GetTestResult",
    0x17D: "Hash",
    0x17E: "PCR_Read",
    0x17F: "PolicyPCR",
    0x180: "PolicyRestart",
    0x181: "ReadClock",
    0x182: "PCR_Extend",
    0x183: "PCR_SetAuthValue",
    0x184: "NV_Certify",
    0x185: "EventSequenceComplete",
    0x186: "HashSequenceStart",
    0x187: "PolicyPhysicalPresence",
    0x188: "PolicyDuplicationSelect",
    0x189: "PolicyGetDigest",
    0x18A: "TestParms",
    0x18B: "Commit",
    0x18C: "PolicyPassword",
    0x18D: "ZGen_2Phase",
    0x18E: "EC_Ephemeral",
    0x18F: "PolicyNvWritten",
    0x190: "PolicyTemplate",
    0x191: "CreateLoaded",
    0x192: "PolicyAuthorizeNV",
    0x193: "EncryptDecrypt2",
    0x194: "AC_GetCapability",
    0x195: "AC_Send",
    0x196: "Policy_AC_SendSelect",
    0x197: "CertifyX509",
    0x198: "ACT_SetTimeout",
    0x199: "ECC_Encrypt",
    0x19A: "ECC_Decrypt",
    0x20001000: "swtpm_SetLocality",
}


def command_name(code: int) -> str:
    """The specification's name of a TPM_CC, or its hex value when unknown."""
    return TPM_CC_NAMES.get(code, f"0x{code:08x}")


class CommandParser:
    """Finds the command codes in one connection's client-to-TPM byte stream.

    Feed it the bytes as they arrive, however TCP split them; it returns the codes of the
    commands whose header completed.  A header with ``commandSize`` below 10 cannot be
    skipped over: the parser records it as ``malformed`` and ignores the rest of the stream.
    """

    def __init__(self) -> None:
        self._header = bytearray()
        self._skip = 0
        self.malformed = False

    def feed(self, data: bytes) -> list[int]:
        codes: list[int] = []
        view = memoryview(data)
        pos = 0
        while pos < len(view) and not self.malformed:
            if self._skip:
                step = min(self._skip, len(view) - pos)
                self._skip -= step
                pos += step
                continue
            take = min(HEADER_SIZE - len(self._header), len(view) - pos)
            self._header += view[pos : pos + take]
            pos += take
            if len(self._header) < HEADER_SIZE:
                break
            _tag, size, code = struct.unpack(">HII", self._header)
            self._header.clear()
            codes.append(code)
            if size < HEADER_SIZE:
                self.malformed = True
            else:
                self._skip = size - HEADER_SIZE
        return codes


@dataclass(eq=False)
class _Pipe:
    """Two connected sockets; bytes from ``client`` are parsed when ``parser`` is set."""

    client: socket.socket
    upstream: socket.socket
    parser: CommandParser | None
    closed: bool = field(default=False)


def _bind_pair(host: str, attempts: int = 64) -> tuple[socket.socket, socket.socket]:
    """Listening sockets on ``P`` and ``P + 1``, held open (no race with other processes)."""
    for _ in range(attempts):
        first = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        first.bind((host, 0))
        port: int = first.getsockname()[1]
        second = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            if port >= 65535:
                raise OSError("no room for P + 1")
            second.bind((host, port + 1))
        except OSError:
            first.close()
            second.close()
            continue
        first.listen(16)
        second.listen(16)
        return first, second
    raise OSError(f"no two adjacent free TCP ports on {host}")


class CountingProxy:
    """Forward ``P'``/``P'+1`` to swtpm's ``upstream_port``/``upstream_port+1``, log commands.

    A context manager (``start`` on entry, ``stop`` on exit).  :attr:`commands` lists the
    names of the TPM commands seen so far, oldest first; :meth:`reset` forgets them.  A
    command is recorded before it is forwarded, so it is in the list as soon as its response
    has reached the client.
    """

    def __init__(
        self,
        upstream_port: int,
        *,
        host: str = HOST,
        max_connections: int = 32,
        io_timeout: float = 5.0,
    ) -> None:
        self._host = host
        self._upstream = (upstream_port, upstream_port + 1)
        self._max_connections = max_connections
        self._io_timeout = io_timeout
        self._lock = threading.Lock()
        self._codes: list[int] = []
        self._malformed = 0
        self._listeners: tuple[socket.socket, socket.socket] | None = None
        self._port = 0
        self._selector: selectors.BaseSelector | None = None
        self._pipes: set[_Pipe] = set()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self.refused_connections = 0
        """Connections closed at once because ``max_connections`` were already open."""

    # -- public surface ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The proxy's TPM command port ``P'``."""
        return self._port

    @property
    def ctrl_port(self) -> int:
        """The proxy's control port ``P' + 1``."""
        return self._port + 1

    @property
    def tcti(self) -> str:
        """A TCTI string that goes through the proxy."""
        return f"swtpm:host={self._host},port={self._port}"

    @property
    def codes(self) -> list[int]:
        """The TPM_CC values seen, oldest first (a copy)."""
        with self._lock:
            return list(self._codes)

    @property
    def commands(self) -> list[str]:
        """The names of the TPM commands seen, oldest first (a copy), e.g. ``"PolicyPCR"``."""
        return [command_name(code) for code in self.codes]

    @property
    def malformed_streams(self) -> int:
        """Connections whose byte stream stopped parsing as TPM commands."""
        with self._lock:
            return self._malformed

    def reset(self) -> None:
        """Forget the commands recorded so far."""
        with self._lock:
            self._codes.clear()

    def __enter__(self) -> CountingProxy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<CountingProxy {self.tcti} -> port {self._upstream[0]}>"

    def start(self) -> None:
        """Bind the two ports and start the forwarding thread."""
        if self._thread is not None:
            raise RuntimeError("CountingProxy already started")
        if self._stopping.is_set():
            raise RuntimeError("a stopped CountingProxy cannot be restarted; make a new one")
        main, ctrl = _bind_pair(self._host)
        self._listeners = (main, ctrl)
        self._port = main.getsockname()[1]
        selector = selectors.DefaultSelector()
        for listener in (main, ctrl):
            listener.setblocking(False)
            selector.register(listener, selectors.EVENT_READ, listener)
        self._wake_r.setblocking(False)
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._selector = selector
        self._thread = threading.Thread(
            target=self._run, name=f"CountingProxy:{self._port}", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and close every socket; safe to call twice."""
        thread = self._thread
        if thread is None:
            return
        self._stopping.set()
        self._wake_w.send(b"\0")
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"{self!r} did not stop within {timeout:g} s")
        self._thread = None

    # -- the forwarding thread --------------------------------------------------------------

    def _run(self) -> None:
        selector = self._selector
        assert selector is not None and self._listeners is not None
        try:
            while not self._stopping.is_set():
                for key, _events in selector.select(timeout=1.0):
                    item = key.data
                    if item is None:
                        continue  # the wake-up socket: the loop condition decides
                    if isinstance(item, socket.socket):
                        self._accept(item)
                    else:
                        pipe, sock = item
                        self._forward(pipe, sock)
        finally:
            for pipe in list(self._pipes):
                self._close(pipe)
            for listener in self._listeners:
                selector.unregister(listener)
                listener.close()
            selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _accept(self, listener: socket.socket) -> None:
        assert self._selector is not None and self._listeners is not None
        try:
            client, _addr = listener.accept()
        except BlockingIOError:
            return
        if len(self._pipes) >= self._max_connections:
            self.refused_connections += 1
            client.close()
            return
        is_main = listener is self._listeners[0]
        upstream_port = self._upstream[0] if is_main else self._upstream[1]
        try:
            upstream = socket.create_connection((self._host, upstream_port), self._io_timeout)
        except OSError:
            client.close()  # the client sees the TPM as unreachable, as it is
            return
        for sock in (client, upstream):
            sock.settimeout(self._io_timeout)
        pipe = _Pipe(client, upstream, CommandParser() if is_main else None)
        self._pipes.add(pipe)
        self._selector.register(client, selectors.EVENT_READ, (pipe, client))
        self._selector.register(upstream, selectors.EVENT_READ, (pipe, upstream))

    def _forward(self, pipe: _Pipe, sock: socket.socket) -> None:
        if pipe.closed:
            return
        peer = pipe.upstream if sock is pipe.client else pipe.client
        try:
            data = sock.recv(65536)
            if not data:
                self._close(pipe)
                return
            if sock is pipe.client and pipe.parser is not None:
                codes = pipe.parser.feed(data)
                with self._lock:
                    self._codes.extend(codes)
                    if pipe.parser.malformed:
                        self._malformed += 1
                        pipe.parser = None
            peer.sendall(data)
        except OSError:
            self._close(pipe)

    def _close(self, pipe: _Pipe) -> None:
        assert self._selector is not None
        if pipe.closed:
            return
        pipe.closed = True
        self._pipes.discard(pipe)
        for sock in (pipe.client, pipe.upstream):
            with contextlib.suppress(KeyError, ValueError):  # never registered, or closed
                self._selector.unregister(sock)
            sock.close()
