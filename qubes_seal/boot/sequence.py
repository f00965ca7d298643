"""The boot sequence (see the package docstring), and its configuration."""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, TextIO

from ..errors import (
    EXIT_USAGE,
    AuthorizationError,
    CorruptState,
    LockoutError,
    MeasurementMismatch,
    QubesSealError,
    TPMUnavailable,
    UsageError,
)
from ..secret import Secret
from .splash import Plymouth

DEFAULT_CONFIG = Path("/etc/qubes-seal/boot.toml")
KEYS_DIR = Path("/run/cryptsetup-keys.d")
DRTM_PCR = 17
PROOF_ADVICE = (
    "If this is not the proof you set up, do NOT type your passphrase: "
    "the machine did not boot the approved software."
)


@dataclass
class BootConfig:
    """``/etc/qubes-seal/boot.toml`` (copied into the initramfs by the dracut module).

    Every key is type-checked by :meth:`load` (:data:`CONFIG_KEYS`): a boolean must be a TOML
    boolean (``true``, not ``"true"``: a quoted ``"false"`` would otherwise be true), an
    integer a TOML integer in its range, a string a string; unknown keys are refused.
    """

    container: str = "/dev/disk/by-partlabel/qubes-seal"
    tpm: str = "device:/dev/tpmrm0"
    keyring: str = "user"
    timeout: float = 30.0
    tries: int = 3
    ask: str = "auto"  # auto | systemd | tty | file:PATH (tests)
    backend: str = "auto"  # auto | dm-crypt | userspace: how the container is read
    recovery_ask: str = ""  # as ask; empty: same as ask
    unsafe_no_measured_launch: bool = False  # honoured only with unsafe_test_mode too
    unsafe_test_mode: bool = False
    keys_dir: str = str(KEYS_DIR)
    console: str = "/dev/console"
    txt_mem: str = "/dev/mem"  # the TXT registers and heap; empty: no log captured
    txt_log: str = "/run/qubes-seal/txt-event.log"  # the captured log, if it replays
    cmdline_file: str = "/proc/cmdline"  # the dom0 kernel's command line, for explanations

    @classmethod
    def load(cls, path: Path | None) -> BootConfig:
        doc: dict[str, Any] = {}
        if path is not None and path.exists():
            try:
                doc = tomllib.loads(path.read_text())
            except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise UsageError(f"cannot read the boot configuration {path}: {exc}") from exc
        table = doc.get("boot", doc)
        if not isinstance(table, dict):
            raise UsageError(f"{path}: [boot] must be a table")
        doc = dict(table)
        names = {f.name for f in fields(cls)}
        unknown = set(doc) - names
        if unknown:
            raise UsageError(
                f"{path}: unknown setting(s) {sorted(unknown)}",
                hint=f"Known settings: {', '.join(sorted(names))} (docs/BOOT.md).",
            )
        for name, value in doc.items():
            doc[name] = _checked(name, value, where=str(path))
        for f in fields(cls):  # QUBES_SEAL_BOOT_<NAME> overrides (tests, debugging)
            env_name = f"QUBES_SEAL_BOOT_{f.name.upper()}"
            raw = os.environ.get(env_name)
            if raw is not None:
                kind = CONFIG_KEYS[f.name][0]
                doc[f.name] = _checked(f.name, _coerce(f.name, raw, kind), where=env_name)
        cfg = cls(**doc)
        if cfg.unsafe_no_measured_launch and not cfg.unsafe_test_mode:
            raise UsageError(
                "unsafe_no_measured_launch is set without unsafe_test_mode: refusing "
                "(it exists only for the VM test, where TXT cannot be simulated)"
            )
        return cfg


#: Each boot.toml key: (type, allowed range or values).  A float key takes a TOML integer
#: too (``timeout = 30``); nothing else is converted.
CONFIG_KEYS: dict[str, tuple[type, tuple[float, float] | tuple[str, ...] | None]] = {
    "container": (str, None),
    "tpm": (str, None),
    "keyring": (str, ("user", "session")),
    "timeout": (float, (0.1, 3600.0)),
    "tries": (int, (1, 100)),
    "ask": (str, None),
    "backend": (str, ("auto", "dm-crypt", "userspace")),
    "recovery_ask": (str, None),
    "unsafe_no_measured_launch": (bool, None),
    "unsafe_test_mode": (bool, None),
    "keys_dir": (str, None),
    "console": (str, None),
    "txt_mem": (str, None),
    "txt_log": (str, None),
    "cmdline_file": (str, None),
}
_TYPE_NAMES = {str: "a string", bool: "a boolean (true or false, unquoted)",
               int: "an integer", float: "a number"}  # fmt: skip


def _checked(name: str, value: object, *, where: str) -> Any:
    """``value`` for key ``name`` if it has the key's type and range; else UsageError."""
    kind, allowed = CONFIG_KEYS[name]
    got = type(value).__name__
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:  # exact: a bool is not an int here, nor an int a bool
        raise UsageError(
            f"{where}: {name} must be {_TYPE_NAMES[kind]}, not {got} ({_short(value)})",
            hint="See the settings and their types in docs/BOOT.md (boot.toml).",
        )
    if isinstance(allowed, tuple) and allowed and isinstance(allowed[0], str):
        if value not in allowed:
            raise UsageError(
                f"{where}: {name} must be one of {', '.join(map(str, allowed))}, "
                f"not {_short(value)}"
            )
    elif allowed is not None:
        low, high = allowed
        assert isinstance(value, int | float) and isinstance(low, int | float)
        assert isinstance(high, int | float)
        if not low <= value <= high:
            raise UsageError(f"{where}: {name} must be from {low} to {high}, not {value}")
    if kind is str and "\0" in str(value):
        raise UsageError(f"{where}: {name} contains a NUL character")
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _coerce(name: str, raw: str, kind: type) -> Any:
    """An environment override as the key's type (booleans parsed strictly)."""
    if kind is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off", ""):
            return False
        raise UsageError(f"QUBES_SEAL_BOOT_{name.upper()}={raw!r} is not a boolean")
    try:
        if kind is float:
            return float(raw)
        if kind is int:
            return int(raw)
    except ValueError:
        raise UsageError(
            f"QUBES_SEAL_BOOT_{name.upper()}={_short(raw)} is not {_TYPE_NAMES[kind]}"
        ) from None
    return raw


class Console:
    """Where the user sees the boot: /dev/console when we may write it, else stderr; and
    Plymouth's splash when ``splash`` is given (a running plymouthd, docs/BOOT.md).

    A unit's stdout goes to the journal, not to the screen (VM-E2E.md): messages for the user
    are written to the console explicitly, timestamped for the boot-timing report.  Every
    message for the user goes through :meth:`say`, the one place that knows about the splash.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        *,
        path: str = "/dev/console",
        splash: Plymouth | None = None,
    ) -> None:
        self.start = time.monotonic()
        self.splash = splash
        self._own = False
        if stream is None:
            try:
                stream = open(path, "a")  # noqa: SIM115 - closed in close()
                self._own = True
            except OSError:
                stream = sys.stderr
        self.stream = stream

    def say(self, text: str, *, splash: str | None = None, private: bool = False) -> None:
        """``text`` on the console, one stamped line per line; on the splash too (``splash``
        instead when given: a themed splash may show only its latest message), where it stays
        until :meth:`clear_splash`.

        ``private`` (the proof of a clean boot): on the splash only, when it shows it.
        Plymouth attached to the console keeps what is written there in its boot log
        (/var/log/boot.log after the switch-root): a text proof must not outlive the boot
        on dom0's disk.  Without a splash the console, as always (nothing keeps it)."""
        stamp = time.monotonic() - self.start
        if self.splash is not None:
            self.splash.display(text if splash is None else splash)
            if private and self.splash.alive:
                return
        for line in text.splitlines() or [""]:
            self.stream.write(f"[qubes-seal {stamp:7.3f}] {line}\n")
        self.stream.flush()

    def clear_splash(self) -> None:
        """Hide the splash's messages: they are obsolete (a prompt was answered, the unlock
        is done).  Without a splash, nothing (the console keeps its lines)."""
        if self.splash is not None:
            self.splash.hide_all()

    def close(self) -> None:
        if self._own:
            self.stream.close()


# -- waiting for devices ---------------------------------------------------------------------


def _device_of(tcti: str) -> Path | None:
    name, _, conf = tcti.partition(":")
    if name == "device":
        return Path(conf or "/dev/tpmrm0")
    return None


def wait_for(paths: list[Path], *, timeout: float, console: Console) -> None:
    """Wait until every path exists, woken by udev events (pyudev), at most ``timeout`` s."""
    missing = [p for p in paths if not p.exists()]
    if not missing:
        return
    console.say("waiting for " + ", ".join(str(p) for p in missing))
    try:
        import pyudev
    except ImportError:  # pragma: no cover - pyudev is a dependency
        pyudev = None
    deadline = time.monotonic() + timeout
    monitor = None
    if pyudev is not None:
        try:
            monitor = pyudev.Monitor.from_netlink(pyudev.Context())
            monitor.start()
        except (OSError, ValueError):
            monitor = None  # no udev netlink (a chroot, a container): watch the paths
    while True:
        missing = [p for p in missing if not p.exists()]
        remaining = deadline - time.monotonic()
        if not missing:
            return
        if remaining <= 0:
            raise TPMUnavailable(
                "timed out after {:g} s waiting for {}".format(
                    timeout, ", ".join(str(p) for p in missing)
                ),
                hint="Is the TPM enabled in the firmware (and its driver, tpm_tis or tpm_crb, "
                "in the initramfs)? Is the container's disk present?",
            )
        if monitor is not None:
            monitor.poll(timeout=min(remaining, 1.0))  # an event, or re-check the paths
        else:
            _inotify_wait(missing, min(remaining, 1.0))


def _inotify_wait(paths: list[Path], timeout: float) -> None:
    """Block until something changes in the paths' directories (or ``timeout``)."""
    import select

    dirs = {p.parent for p in paths if p.parent.exists()}
    if not dirs:
        select.select([], [], [], timeout)
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        select.select([], [], [], timeout)
        return
    try:
        for d in dirs:
            libc.inotify_add_watch(fd, str(d).encode(), 0x100 | 0x80)  # IN_CREATE | IN_MOVED_TO
        select.select([fd], [], [], timeout)
    finally:
        os.close(fd)


# -- asking ------------------------------------------------------------------------------------


def ask(how: str, prompt: str, *, ident: str, splash: Plymouth | None = None) -> Secret:
    """A secret from the user: systemd-ask-password (its Plymouth agent answers when Plymouth
    runs, else the console agent), Plymouth's own prompt, or the terminal.

    ``systemd``: always systemd-ask-password.  ``tty``: the terminal, but Plymouth's prompt
    (``plymouth ask-for-password``) when ``splash`` runs, since Plymouth then holds the
    console.  ``auto``: systemd-ask-password when installed and stdin is no terminal (a
    unit), else as ``tty``."""
    if how.startswith("file:"):
        data = Path(how[5:]).read_bytes().rstrip(b"\n")
        return Secret(data)
    use_systemd = how == "systemd" or (
        how == "auto" and _which("systemd-ask-password") and not sys.stdin.isatty()
    )
    if not use_systemd and splash is not None and splash.alive:
        return splash.ask_password(prompt)
    if use_systemd:
        proc = subprocess.run(
            [_which("systemd-ask-password") or "systemd-ask-password",
             "--timeout=0", f"--id={ident}", "--icon=drive-harddisk", prompt],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            check=False,
        )  # fmt: skip
        if proc.returncode != 0:
            raise UsageError(f"systemd-ask-password failed ({proc.returncode})")
        return Secret(proc.stdout.rstrip(b"\n"))
    import getpass

    return Secret(getpass.getpass(prompt + " ").encode())


def _which(name: str) -> str | None:
    import shutil

    for d in ("/usr/bin", "/bin", "/usr/sbin", "/sbin"):
        if Path(d, name).exists():
            return str(Path(d, name))
    return shutil.which(name)


# -- the sequence ------------------------------------------------------------------------------


@dataclass
class Outcome:
    unlocked: bool
    recovered: bool
    domains: int
    timings: dict[str, float]


def run(cfg: BootConfig, console: Console) -> Outcome:
    """The boot sequence; raises the error that ended it when even recovery failed.

    Every exit path, a failure or a recovery included, leaves PCR 13 capped: nothing later in
    this boot can unseal the master secret or the proof of a clean boot."""
    container = Path(cfg.container)
    started = time.monotonic()
    try:
        try:
            tpm_dev = _device_of(cfg.tpm)
            wait_for([p for p in (tpm_dev, container) if p is not None], timeout=cfg.timeout,
                     console=console)  # fmt: skip
            return _sequence(cfg, console, container, started)
        except _GaveUp:
            raise
        except Exception as exc:  # every failure, even one we did not foresee: the prompt
            cause = exc if isinstance(exc, QubesSealError) else CorruptState(
                f"the boot sequence failed ({type(exc).__name__}): the container's header or "
                "token may be damaged or hostile"
            )  # fmt: skip
            console.say(f"REFUSED: {cause.diagnostics()}")
            return _recover(cfg, console, container, cause, started)
    except _GaveUp as gave_up:
        raise gave_up.cause from None
    finally:
        _ensure_capped(cfg, console)


class _GaveUp(Exception):
    """The recovery prompt ended without an unlock: ``cause`` ended the boot sequence."""

    def __init__(self, cause: QubesSealError) -> None:
        super().__init__(cause.message)
        self.cause = cause


def _ensure_capped(cfg: BootConfig, console: Console) -> None:
    """Cap PCR 13 unless it is capped already: when it still holds zero (nothing measured)
    or the header's measurement alone (an unlock that failed after measuring it)."""
    from .. import chain
    from ..luks.header import header_digest
    from ..tpm.esys import Esys

    try:
        uncapped = {bytes(32)}
        # No readable header: only zero is known to be uncapped, so anything else is capped.
        with contextlib.suppress(QubesSealError, OSError):
            uncapped.add(chain.pcr13_after_extend(header_digest(Path(cfg.container))))
        with Esys(cfg.tpm) as tpm:
            value = tpm.pcr_read([chain.PCR13])[chain.PCR13]
            if value in uncapped or len(uncapped) == 1:
                chain.cap(tpm)
    except QubesSealError as exc:
        console.say(f"note: PCR 13 not capped ({exc.message})")


def _sequence(cfg: BootConfig, console: Console, container: Path, started: float) -> Outcome:
    from .. import chain
    from ..attest import reveal
    from ..luks.container import Container
    from ..policy import launch_happened
    from ..tpm.esys import Esys
    from .capture import capture_at_boot

    # dom0's boot configuration (measured into PCR 17 with the initramfs) decides whether a
    # measured launch is required, never the token (an evil maid can rewrite it).
    require_launch = not (cfg.unsafe_test_mode and cfg.unsafe_no_measured_launch)
    with Esys(cfg.tpm) as tpm:
        pcr17 = tpm.pcr_read([DRTM_PCR])[DRTM_PCR]
    if require_launch and not launch_happened(pcr17):
        from ..errors import NoMeasuredLaunch

        error: QubesSealError = NoMeasuredLaunch()
        _explain_no_launch(cfg, error, pcr17)
        console.say(f"REFUSED: {error.diagnostics()}")
        return _recover(cfg, console, container, error, started)
    if not require_launch:
        console.say("WARNING: unsafe test mode: no measured launch required")
    capture_at_boot(cfg, console)  # this boot's TXT event log, for reseal; never raises
    try:
        _, token = chain.read_token(Container(container))
    except QubesSealError as exc:  # removed, unknown version, malformed: the recovery prompt
        console.say(f"REFUSED: {exc.diagnostics()}")
        return _recover(cfg, console, container, exc, started)

    shown = {"proof": False}

    def passphrase() -> Secret:
        if token.proof is not None and not shown["proof"]:
            shown["proof"] = True
            value = reveal(token.proof, tcti=cfg.tpm)
            label = "your text" if token.proof.kind == "text" else "TOTP code now"
            # One message: a themed splash shows only its latest, and the advice goes with it.
            console.say(f"proof of a clean boot ({label}): {value}\n{PROOF_ADVICE}",
                        private=True)  # fmt: skip
        try:
            return ask(cfg.ask, "qubes-seal passphrase:", ident="qubes-seal:unlock",
                       splash=console.splash)  # fmt: skip
        finally:
            console.clear_splash()  # the proof and what came before it: answered

    last: QubesSealError | None = None
    for attempt in range(1, max(1, cfg.tries) + 1):
        try:
            console.say("unlocking the container of domain keys")
            unlocked = chain.unlock(container, tcti=cfg.tpm, passphrase=passphrase,
                                    keyring=cfg.keyring, backend=cfg.backend)  # fmt: skip
        except AuthorizationError as exc:
            last = exc
            console.say(f"wrong passphrase (attempt {attempt} of {cfg.tries})")
            continue
        except (MeasurementMismatch, LockoutError, QubesSealError) as exc:
            if isinstance(exc, MeasurementMismatch):
                _explain(cfg, token.sealed, exc)
            console.say(f"REFUSED: {exc.diagnostics()}")
            return _recover(cfg, console, container, exc, started)
        try:
            n = len(unlocked.keystore.list())
            _root_key(cfg, unlocked, console)
            console.say(f"container open: {n} domain key(s); PCR 13 capped; keys handed over")
            timings = dict(unlocked.timings.parts)
            timings["total"] = time.monotonic() - started
            return Outcome(True, False, n, timings)
        finally:
            unlocked.close()
    console.say("too many wrong passphrases")
    return _recover(cfg, console, container, last or AuthorizationError("no attempt"), started)


def _explain(cfg: BootConfig, sealed: Any, exc: MeasurementMismatch) -> None:
    """Attach to a refusal what differs, by component, from the token's records (unread and
    unauthenticated: an evil maid may have written them) and this boot's captured log.  A
    diagnosis shown before the recovery-key prompt; nothing here decides anything, no TPM
    command is sent (the refusal read the PCRs), and no error of it reaches the boot."""
    if exc.current is None:
        return
    try:
        from ..measure.explain import describe_refusal

        exc.explanation = describe_refusal(
            sealed, exc.current, txt_log=cfg.txt_log or None, cmdline_file=cfg.cmdline_file
        )
    except Exception:  # noqa: S110 - a diagnosis never stops the boot
        pass


def _explain_no_launch(cfg: BootConfig, exc: QubesSealError, pcr17: bytes) -> None:
    """No launch: PCR 17 and what TXT's status registers say (read from memory, no TPM)."""
    if not isinstance(exc, MeasurementMismatch):
        return
    try:
        from ..measure import explain, txt_heap

        status = None
        if cfg.txt_mem:
            try:
                state = txt_heap.read_state(cfg.txt_mem)
                regs = state.registers
                status = (
                    f"TXT status: SENTER {'done' if regs.senter_done else 'NOT done'}, "
                    f"ERRORCODE 0x{regs.errorcode:08x} "
                    f"({txt_heap.decode_errorcode(regs.errorcode)})"
                )
            except QubesSealError as err:
                status = f"TXT status not readable: {err.message}"
        exc.explanation = explain.no_launch(pcr17, status)
    except Exception:  # noqa: S110 - a diagnosis never stops the boot
        pass


def _root_key(cfg: BootConfig, unlocked: Any, console: Console) -> None:
    """dom0's root volume key, for systemd-cryptsetup, in a runtime key file (ramfs).  Its
    name comes from the token only once the token's MAC verified (it becomes a file name)."""
    token = unlocked.token
    if token is None:
        console.say(
            "note: the container's token is not authentic: dom0's root volume key is not "
            "handed to systemd-cryptsetup (it will ask for its own passphrase)"
        )
        return
    if not token.root_volume:
        return
    entry = unlocked.keystore.get("dom0")
    keys = Path(cfg.keys_dir)
    keys.mkdir(mode=0o700, parents=True, exist_ok=True)
    if not os.path.ismount(keys):
        # ramfs: never swapped (tmpfs can be); ignore failure where we may not mount.
        subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0700", "ramfs", str(keys)],
                       check=False, capture_output=True)  # fmt: skip
    path = keys / f"{token.root_volume}.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o400)
    with os.fdopen(fd, "wb") as f:
        f.write(entry.key.reveal())
    console.say(f"dom0 root volume key ready for systemd-cryptsetup ({path})")


def _recover(
    cfg: BootConfig, console: Console, container: Path, cause: QubesSealError, started: float
) -> Outcome:
    """The recovery-key prompt; never an automatic reseal."""
    from .. import chain

    advice = "Enter the recovery key to open the container (or press Ctrl-D to stop)."
    # On the splash with the reason: a themed splash shows only its latest message.
    console.say(advice, splash=f"REFUSED: {cause.message}\n{advice}")
    for _attempt in range(max(1, cfg.tries)):
        try:
            rkey = ask(cfg.recovery_ask or cfg.ask, "qubes-seal recovery key:",
                       ident="qubes-seal:recovery", splash=console.splash)  # fmt: skip
        except (EOFError, KeyboardInterrupt, UsageError):
            break
        finally:
            console.clear_splash()
        try:
            unlocked = chain.recover(container, recovery_key=rkey, keyring=cfg.keyring)
        except (UsageError, AuthorizationError) as exc:
            console.say(f"recovery key refused: {exc.message}")
            continue
        finally:
            rkey.wipe()
        try:
            n = len(unlocked.keystore.list())
            # dom0's root volume too: otherwise systemd-cryptsetup asks for its passphrase.
            _root_key(cfg, unlocked, console)
            _cap_after_recovery(cfg, console)
            console.say(
                f"container open with the recovery key: {n} domain key(s). Nothing was "
                "resealed: once you trust this boot, run 'qubes-seal recover --reseal'."
            )
            return Outcome(True, True, n, {"total": time.monotonic() - started})
        finally:
            unlocked.close()
    raise _GaveUp(cause)


def _cap_after_recovery(cfg: BootConfig, console: Console) -> None:
    """Cap PCR 13 after a recovery too, so nothing later in this boot unseals (the proof
    of a clean boot included).  A TPM that cannot be reached (perhaps why we recovered)
    is reported, not fatal: the container is open."""
    from .. import chain
    from ..tpm.esys import Esys

    try:
        with Esys(cfg.tpm) as tpm:
            chain.cap(tpm)
    except QubesSealError as exc:
        console.say(f"note: PCR 13 not capped ({exc.message})")


def forget_root_key(keys_dir: Path) -> list[str]:
    """Remove what :func:`_root_key` wrote: the unit's ExecStop, when the initramfs's units
    stop at the switch-root (dom0's root is open by then) or at a shutdown.  Without it the
    root volume key stays in /run for the whole session.  Only root's read-only ``*.key``
    files (as written here) are touched: overwritten with zeros, then removed; the ramfs
    mounted for them is unmounted once empty.  Returns the names removed."""
    removed: list[str] = []
    try:
        entries = list(keys_dir.iterdir())
    except OSError:
        return removed
    for path in entries:
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if (not path.name.endswith(".key") or not stat.S_ISREG(st.st_mode)
                or st.st_uid != 0 or stat.S_IMODE(st.st_mode) != 0o400):  # fmt: skip
            continue
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
            try:
                os.write(fd, bytes(st.st_size))
            finally:
                os.close(fd)
        except OSError:
            pass  # removed all the same
        with contextlib.suppress(OSError):
            path.unlink()
            removed.append(path.name)
    with contextlib.suppress(OSError):
        if not any(keys_dir.iterdir()) and os.path.ismount(keys_dir):
            subprocess.run(["umount", str(keys_dir)], check=False, capture_output=True,
                           timeout=30)  # fmt: skip
    return removed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qubes_seal.boot", description=__doc__)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument(
        "--forget-root-key", action="store_true",
        help="remove dom0's root volume key file the unlock wrote (the unit's ExecStop)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.forget_root_key:
        try:
            keys_dir = Path(BootConfig.load(args.config).keys_dir)
        except QubesSealError:
            keys_dir = KEYS_DIR
        removed = forget_root_key(keys_dir)
        if removed:
            print(f"qubes-seal: removed {', '.join(removed)} from {keys_dir}", file=sys.stderr)
        return 0
    from ..tpm import _lib

    _lib.quiet_tss_log()
    try:
        cfg = BootConfig.load(args.config)
    except QubesSealError as exc:  # no configuration, no console path: the unit's stderr
        Console(sys.stderr).say(f"RESULT: FAILED: {exc.diagnostics()}")
        return 1
    # Plymouth's client in the image and its daemon running: the splash too (docs/BOOT.md).
    console = Console(path=cfg.console, splash=Plymouth.detect(_which("plymouth")))
    try:
        outcome = run(cfg, console)
        how = "with the recovery key" if outcome.recovered else "with the TPM and passphrase"
        times = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in outcome.timings.items())
        console.say(f"RESULT: unlocked {how}; {times}")
        console.clear_splash()  # the boot goes on; a failure stays on the splash
        return 0
    except QubesSealError as exc:
        console.say(f"RESULT: FAILED: {exc.diagnostics()}")
        return exc.exit_code if exc.exit_code != EXIT_USAGE else 1
    except KeyboardInterrupt:
        console.say("RESULT: FAILED: interrupted")
        return 1
    finally:
        console.close()
