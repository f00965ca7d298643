"""A real software TPM 2.0 (swtpm) on TCP, and the Intel TXT dynamic launch simulated on it.

swtpm (Debian package ``swtpm``) runs libtpms, the TPM 2.0 reference implementation, behind
two TCP ports on 127.0.0.1:

* the *server* port ``P`` carries raw TPM 2.0 command and response buffers, the same bytes
  a kernel driver would put on the LPC/SPI bus;
* the *control* port ``P + 1`` carries swtpm's out-of-band control protocol (swtpm
  ``include/swtpm/tpm_ioctl.h`` and the "Control Channel Specification" page of swtpm's
  wiki).  It is how the platform's hardware is simulated: the locality of the commands
  that follow, a TPM reset, and the ``_TPM_Hash_Start`` / ``_TPM_Hash_Data`` /
  ``_TPM_Hash_End`` sequence that the CPU and the SINIT ACM perform during an Intel TXT
  dynamic launch (GETSEC[SENTER]).

libtss2's swtpm TCTI (``"swtpm:host=127.0.0.1,port=P"``) uses ``P + 1`` for its control
channel: that is why :func:`free_port_pair` looks for two adjacent free ports.

Control channel wire format (all integers big-endian): a request is a 4-byte command code
followed by the command's payload; a response starts with a 4-byte result, 0 for success
(a TPM 1.2 style ``TPM_RESULT``: 0x3d is ``TPM_BAD_LOCALITY``).  swtpm reads a request
into a 4096-byte buffer (recent versions re-assemble a request that TCP split, older ones
take whatever one ``read()`` returns), so every request here is sent in one ``sendall``
no larger than that, and the next request waits for the previous response.

Localities, as measured on this machine (swtpm 0.7.1, libtpms 0.9.2, tpm2-pytss 3.0 over
libtss2 3.2.1), ``E`` = ``TPM2_PCR_Extend`` accepted, ``.`` = refused with
``TPM_RC_LOCALITY`` (0x907):

======== == == == == == == == ==
locality 16 17 18 19 20 21 22 23
======== == == == == == == == ==
0        E  .  .  .  .  .  .  E
1        E  .  .  .  E  .  .  E
2        E  E  E  E  E  E  E  E
3        E  E  E  E  E  .  .  E
4        E  E  E  .  .  .  .  E
======== == == == == == == == ==

so PCR 17/18 extend from localities 2-4, PCR 19 from 2-3, PCR 20 from 1-3, PCR 21/22 from 2
only.  tboot extends at locality 2, dom0 runs at locality 0.

Three facts about how the locality behaves, all checked by ``tests/test_sim.py``:

* The locality is a property of the swtpm *process*, not of a connection: the swtpm TCTI
  opens a new TCP connection for every command, and a locality set through the control
  channel holds for all of them, from every client, until it is set again.
* **Creating a swtpm TCTI resets it to 0**: ``Tss2_Tcti_Swtpm_Init`` ends with
  ``set_locality(0)`` on the control channel.  ``ESAPI("swtpm:...")``, every tpm2-tools
  invocation, and :func:`leaked_handles` / :func:`configure_da` below therefore put the TPM
  back at locality 0, for every other client too.  Open the ESAPI *first*, then switch
  (:meth:`Swtpm.at_locality`, or ``esapi.tcti.set_locality(n)``).
* The launch sequence (:meth:`Swtpm.hash_start`) does not change the locality.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import time
import weakref
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Final

from qubes_seal.errors import TPMError, TPMUnavailable

HOST: Final = "127.0.0.1"

# Control channel command codes, swtpm include/swtpm/tpm_ioctl.h (enum ... CMD_*).
CMD_GET_CAPABILITY: Final = 0x01
CMD_INIT: Final = 0x02
CMD_SHUTDOWN: Final = 0x03
CMD_SET_LOCALITY: Final = 0x05
CMD_HASH_START: Final = 0x06
CMD_HASH_DATA: Final = 0x07
CMD_HASH_END: Final = 0x08

# swtpm reads one control request into a 4096-byte buffer: 4 bytes of command code, then
# ptm_hdata's 4-byte length, leaves 4088 bytes of data per CMD_HASH_DATA.
HASH_DATA_CHUNK: Final = 4096 - 4 - 4

# Handle ranges searched by leaked_handles(), TPM 2.0 Part 2, 7.2 TPM_HT.
_HANDLE_RANGES: Final = (
    (0x80000000, "transient object"),
    (0x02000000, "loaded session"),
    (0x03000000, "saved session"),
)

_POLL_INTERVAL: Final = 0.005
#: seconds between attempts to restart on the same ports while they are in use (about 3 s)
_RESTART_WAITS: Final = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
_STDERR_TAIL: Final = 2000


def free_port_pair(host: str = HOST, *, attempts: int = 64) -> int:
    """A TCP port ``P`` on ``host`` such that ``P`` and ``P + 1`` are both free right now.

    The kernel picks ``P`` (bind to port 0); ``P + 1`` is then tried.  The ports are
    released before returning, so another process may take them before swtpm binds them:
    :meth:`Swtpm.start` retries with a new pair when that happens and the port was not
    chosen by the caller.
    """
    for _ in range(attempts):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as first:
            first.bind((host, 0))
            port: int = first.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as second:
                try:
                    second.bind((host, port + 1))
                except OSError:
                    continue
                return port
    raise TPMUnavailable(
        f"no two adjacent free TCP ports on {host} after {attempts} attempts",
        hint="Free some local ports, or pass an explicit port to Swtpm.",
    )


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("swtpm closed the control connection")
        chunks += chunk
    return bytes(chunks)


class _ControlChannel:
    """One TCP connection to swtpm's control port, speaking the request/response protocol."""

    def __init__(self, port: int, *, timeout: float = 5.0) -> None:
        self._port = port
        try:
            self._sock = socket.create_connection((HOST, port), timeout=timeout)
        except OSError as exc:
            raise TPMUnavailable(f"cannot reach swtpm's control channel on port {port}") from exc

    def __enter__(self) -> _ControlChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self._sock.close()

    def call(self, command: int, payload: bytes = b"", *, response_size: int = 4) -> bytes:
        """Send one request, return the full response; raise on a non-zero result."""
        try:
            self._sock.sendall(struct.pack(">I", command) + payload)
            response = _recv_exact(self._sock, response_size)
        except OSError as exc:
            raise TPMUnavailable(
                f"swtpm's control channel on port {self._port} failed during "
                f"command 0x{command:02x}"
            ) from exc
        (result,) = struct.unpack(">I", response[:4])
        if command != CMD_GET_CAPABILITY and result != 0:
            raise TPMError(f"swtpm control command 0x{command:02x} failed with result 0x{result:x}")
        return response


def _stop_process(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout``; always reaps the child."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class Swtpm:
    """A swtpm process with its TPM state in ``state_dir``; a context manager.

    >>> with Swtpm(tmp_path / "tpm") as tpm:          # doctest: +SKIP
    ...     tpm.hash_start(b"SINIT and MLE")           # a simulated TXT launch
    ...     with ESAPI(tpm.tcti) as esapi, tpm.at_locality(2):
    ...         esapi.pcr_extend(ESYS_TR.PCR17, digests)   # what tboot does

    The first start creates the TPM state (``tpm2-00.permall``); no ``swtpm_setup`` is
    needed because no EK certificate is.  ``--flags not-need-init,startup-clear`` makes swtpm
    send ``TPM2_Startup(SU_CLEAR)`` itself, as firmware does, so the TPM is usable as soon
    as the ports answer; PCR 17-22 then hold all 0xFF ("no measured launch").

    With ``port=None`` a free pair is chosen at construction and kept for the life of the
    object (so :attr:`tcti` stays valid across :meth:`reboot`), except that a first
    :meth:`start` that loses a port race to another process moves to a new pair.
    swtpm's stderr is appended to :attr:`log_path`.
    """

    def __init__(
        self,
        state_dir: Path,
        *,
        port: int | None = None,
        binary: str = "swtpm",
        start_timeout: float = 10.0,
    ) -> None:
        self.state_dir = Path(state_dir)
        self._port_chosen = port is None
        self._port = free_port_pair() if port is None else port
        self._binary = binary
        self._start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._started_once = False
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self.start_seconds = 0.0
        """Wall-clock time the last :meth:`start` took, until both ports answered."""

    # -- identity ---------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The TPM command port ``P``."""
        return self._port

    @property
    def ctrl_port(self) -> int:
        """The control channel port, ``P + 1`` (where libtss2's swtpm TCTI expects it)."""
        return self._port + 1

    @property
    def tcti(self) -> str:
        """The TCTI configuration string for tpm2-pytss and tpm2-tools."""
        return f"swtpm:host={HOST},port={self._port}"

    @property
    def log_path(self) -> Path:
        """swtpm's stderr, appended over every start."""
        return self.state_dir / "swtpm.log"

    @property
    def running(self) -> bool:
        """True while the swtpm process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The swtpm process id, or None when not running."""
        return self._proc.pid if self._proc is not None and self.running else None

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"<Swtpm {self.tcti} {state} state={self.state_dir}>"

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> Swtpm:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _command(self) -> list[str]:
        return [
            self._binary,
            "socket",
            "--tpm2",
            "--tpmstate",
            f"dir={self.state_dir},mode=0600",
            "--server",
            f"type=tcp,port={self.port},bindaddr={HOST}",
            "--ctrl",
            f"type=tcp,port={self.ctrl_port},bindaddr={HOST}",
            "--flags",
            "not-need-init,startup-clear",
            # Lets a client also switch locality in-band (swtpm's vendor command
            # TPM2_CC_SET_LOCALITY); the control channel's CMD_SET_LOCALITY works without it.
            "--locality",
            "allow-set-locality",
        ]

    def start(self) -> None:
        """Start swtpm and wait until both ports answer.

        Raises :class:`TPMUnavailable` if the binary is missing, if swtpm exits (the message
        ends with the tail of its stderr), or if it does not answer within
        ``start_timeout`` seconds.
        """
        if self.running:
            raise TPMError(f"{self!r} is already running")
        if shutil.which(self._binary) is None:
            raise TPMUnavailable(
                f"{self._binary!r} not found on PATH",
                hint="Install the swtpm package (Debian: apt-get install swtpm).",
            )
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # Ports taken meanwhile: a first start on ports of our choosing moves to a new pair (on
        # the caller's ports, no retry); a restart (power back on after a crash test) keeps
        # the ports its clients know and waits for them, since another process (a test
        # running beside this one, probing for free ports) may hold one for a moment.
        restart = self._started_once
        attempts = len(_RESTART_WAITS) + 1 if restart else (3 if self._port_chosen else 1)
        for attempt in range(attempts):
            try:
                self._start_once()
            except TPMUnavailable as exc:
                if "Address already in use" in exc.message and attempt + 1 < attempts:
                    if restart:
                        time.sleep(_RESTART_WAITS[attempt])
                    else:
                        self._port = free_port_pair()
                    continue
                raise
            self._started_once = True
            return

    def _start_once(self) -> None:
        began = time.monotonic()
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%F %T')} {' '.join(self._command())}\n".encode())
            log.flush()
            proc = subprocess.Popen(
                self._command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._proc = proc
        # Do not leave a swtpm behind if the owner forgets stop(), or at interpreter exit.
        self._finalizer = weakref.finalize(self, _stop_process, proc, 1.0)
        deadline = began + self._start_timeout
        while True:
            if proc.poll() is not None:
                self._reap()
                raise TPMUnavailable(
                    f"swtpm exited with status {proc.returncode} while starting on ports "
                    f"{self.port}/{self.ctrl_port}: {self._log_tail(log_offset)}"
                )
            if self._answers():
                break
            if time.monotonic() > deadline:
                self.kill()
                raise TPMUnavailable(
                    f"swtpm did not answer on ports {self.port}/{self.ctrl_port} within "
                    f"{self._start_timeout:g} s: {self._log_tail(log_offset)}"
                )
            time.sleep(_POLL_INTERVAL)
        self.start_seconds = time.monotonic() - began

    def _answers(self) -> bool:
        """True once the control channel answers CMD_GET_CAPABILITY and the TPM port accepts."""
        try:
            with socket.create_connection((HOST, self.ctrl_port), timeout=1.0) as ctrl:
                ctrl.sendall(struct.pack(">I", CMD_GET_CAPABILITY))
                _recv_exact(ctrl, 8)
            with socket.create_connection((HOST, self.port), timeout=1.0):
                pass
        except OSError:
            return False
        return True

    def _log_tail(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        lines = [line for line in text.splitlines() if not line.startswith("--- ")]
        return " | ".join(lines)[-_STDERR_TAIL:] or "(swtpm printed nothing)"

    def _reap(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._proc = None

    def stop(self, timeout: float = 5.0) -> None:
        """Shut swtpm down cleanly; no-op when not running.

        Sends ``CMD_SHUTDOWN`` on the control channel (swtpm saves its state and exits), then
        SIGTERM and finally SIGKILL if it has not exited within ``timeout`` seconds.
        """
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            with (
                contextlib.suppress(TPMUnavailable, TPMError),
                _ControlChannel(self.ctrl_port, timeout=timeout) as ctrl,
            ):
                ctrl.call(CMD_SHUTDOWN)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _stop_process(proc, timeout)
        self._reap()

    def kill(self) -> None:
        """SIGKILL swtpm, as a power cut would: no state is saved (crash tests)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        self._reap()

    def reboot(self, *, orderly: bool = True) -> None:
        """A platform reset: stop and start on the same state and ports.

        PCR 0-16 and 23 come back zeroed, PCR 17-22 all 0xFF; transient objects and sessions
        are gone; NV indices and persistent objects (the SRK) remain.

        ``orderly`` (the default) first sends ``TPM2_Shutdown(SU_CLEAR)``, as Linux's TPM
        driver does on a reboot or power-off; ``orderly=False`` is a power cut.  Either way,
        libtpms answers ``TPM_RC_RETRY`` to the first authorization of a DA-protected object
        after a start (it records in NV that it is no longer orderly), and libtss2 resubmits
        that command once (measured: tests/test_auth.py).
        """
        if orderly and self.running:
            self.tpm2_shutdown()
        self.stop()
        self.start()

    def tpm2_shutdown(self) -> None:
        """Send ``TPM2_Shutdown(SU_CLEAR)`` on the TPM port, as an OS does before a reboot."""
        command = struct.pack(">HIIH", 0x8001, 12, 0x00000145, 0x0000)
        with socket.create_connection((HOST, self.port), timeout=5.0) as sock:
            sock.sendall(command)
            response = _recv_exact(sock, 10)
        rc = struct.unpack(">I", response[6:10])[0]
        if rc != 0:
            raise TPMError(f"TPM2_Shutdown failed: 0x{rc:x}")

    # -- simulated platform hardware ----------------------------------------------------------

    def _control(self) -> _ControlChannel:
        if not self.running:
            raise TPMUnavailable(f"{self!r} is not running")
        return _ControlChannel(self.ctrl_port)

    def set_locality(self, locality: int) -> None:
        """Make the TPM see the following commands, from every client, at ``locality``.

        ``CMD_SET_LOCALITY`` on the control channel.  Remember that any new swtpm TCTI
        (a new ``ESAPI``) sets it back to 0: prefer :meth:`at_locality` after opening the
        ESAPI.
        """
        if not 0 <= locality <= 4:
            raise ValueError(f"locality must be 0-4, not {locality}")
        with self._control() as ctrl:
            ctrl.call(CMD_SET_LOCALITY, bytes([locality]))

    @contextlib.contextmanager
    def at_locality(self, locality: int) -> Iterator[None]:
        """Run the block at ``locality``, then return to locality 0 (where dom0 runs).

        Open the ESAPI before entering the block: creating a swtpm TCTI inside it would
        silently switch back to locality 0.
        """
        self.set_locality(locality)
        try:
            yield
        finally:
            if self.running:
                self.set_locality(0)

    def hash_start(self, data: bytes) -> None:
        """Simulate the TXT dynamic launch: ``_TPM_Hash_Start``, ``_Hash_Data``, ``_Hash_End``.

        The TPM resets PCR 17-22 to all zero, then extends PCR 17, in every active bank, with
        the bank's hash of ``data``: PCR 17 = H(0x00 * n || H(data)).  On hardware the CPU
        sends this sequence at locality 4 with the SINIT ACM as data; here it goes through the
        control channel and leaves the current locality unchanged.  Same effect as
        ``swtpm_ioctl --tcp 127.0.0.1:CTRL -h -`` with ``data`` on stdin, without a process.
        """
        with self._control() as ctrl:
            ctrl.call(CMD_HASH_START)
            view = memoryview(data)
            for offset in range(0, len(view), HASH_DATA_CHUNK):
                chunk = view[offset : offset + HASH_DATA_CHUNK]
                ctrl.call(CMD_HASH_DATA, struct.pack(">I", len(chunk)) + chunk)
            ctrl.call(CMD_HASH_END)


# -- checks and settings through the TPM itself -----------------------------------------------


@contextlib.contextmanager
def _esapi(tcti: str) -> Iterator[Any]:
    from tpm2_pytss import ESAPI, TSS2_Exception

    try:
        esapi = ESAPI(tcti)
    except TSS2_Exception as exc:
        raise TPMUnavailable(f"cannot open the TPM through {tcti!r}: {exc}") from exc
    try:
        yield esapi
    finally:
        esapi.close()


def _session_type(handle: int) -> str:
    kind = handle >> 24
    if kind == 0x02:
        return " (HMAC session)"
    if kind == 0x03:
        return " (policy session)"
    return ""


def leaked_handles(tcti: str) -> list[str]:
    """Describe every transient object and session still in the TPM; [] when clean.

    ``TPM2_GetCapability(TPM_CAP_HANDLES)`` over the ranges 0x80000000 (transient objects),
    0x02000000 (loaded sessions) and 0x03000000 (saved sessions).  swtpm has no resource
    manager: whatever a client loads stays loaded after it disconnects, so anything found
    here was leaked by someone.  Opening the TCTI resets swtpm's locality to 0.
    """
    from tpm2_pytss import TPM2_CAP, TSS2_Exception

    found: list[str] = []
    with _esapi(tcti) as esapi:
        for first, kind in _HANDLE_RANGES:
            handle = first
            while True:
                try:
                    more, data = esapi.get_capability(TPM2_CAP.HANDLES, handle, 64)
                except TSS2_Exception as exc:
                    raise TPMError(f"TPM2_GetCapability(TPM_CAP_HANDLES) failed: {exc}") from exc
                handles = [int(h) for h in data.data.handles]
                found.extend(f"{kind} 0x{h:08x}{_session_type(h)}" for h in handles)
                if not more or not handles:
                    break
                # Session handles come back as 0x02... (HMAC) or 0x03... (policy) whichever
                # range was asked for: continue from the low 24 bits.
                handle = first | ((handles[-1] & 0x00FFFFFF) + 1)
    return found


def configure_da(
    tcti: str,
    *,
    max_tries: int,
    recovery_time: int,
    lockout_recovery: int,
) -> None:
    """Set the TPM's dictionary-attack parameters (``TPM2_DictionaryAttackParameters``).

    ``max_tries`` failed authorizations put the TPM in lockout; one failure is forgotten
    every ``recovery_time`` seconds (0 disables the protection); after a failed lockout
    authorization, ``lockout_recovery`` seconds must pass.  swtpm starts with 3 tries and
    1000 s.  Uses the lockout hierarchy with its empty authorization, as on a fresh swtpm.
    Opening the TCTI resets swtpm's locality to 0.
    """
    from tpm2_pytss import ESYS_TR, TSS2_Exception

    with _esapi(tcti) as esapi:
        try:
            esapi.dictionary_attack_parameters(
                max_tries, recovery_time, lockout_recovery, lock_handle=ESYS_TR.LOCKOUT
            )
        except TSS2_Exception as exc:
            raise TPMError(f"TPM2_DictionaryAttackParameters failed: {exc}") from exc


class AttachedSwtpm(Swtpm):
    """A swtpm that someone else started, on ``port`` (control channel ``port + 1``).

    It supports what a launch simulation needs (:attr:`tcti`, :meth:`hash_start`,
    :meth:`set_locality`, :meth:`at_locality`) but never starts, stops or reboots the process:
    that belongs to whoever started it.
    """

    def __init__(self, port: int) -> None:
        super().__init__(Path("."), port=port)

    @property
    def running(self) -> bool:
        return self._answers()

    def start(self) -> None:
        raise TPMError(f"{self.tcti} was started elsewhere: restart it there")

    def stop(self, timeout: float = 5.0) -> None:
        raise TPMError(f"{self.tcti} was started elsewhere: stop it there")

    def kill(self) -> None:
        self.stop()
