"""Run the ``cryptsetup`` binary: keys through pipes only, errors mapped to our types.

Every call goes through :func:`run`, which

* runs ``cryptsetup --batch-mode [options] ACTION ARGS...`` with a minimal environment
  (``PATH`` and ``LC_ALL=C``: messages are stable English, and nothing of ours is inherited);
* passes a key on **stdin** (the caller adds ``--key-file=-``) and a second key, when an action
  needs one (``luksAddKey``), through an anonymous **pipe** that the child sees as
  ``/dev/fd/N`` (``--new-keyfile=/dev/fd/N``).  Key material is never in argv, in the
  environment or in a file on disk; ``/proc/PID/cmdline`` and ``/proc/PID/environ`` of the
  child hold nothing secret (tests/test_luks.py polls them while cryptsetup runs);
* enforces a timeout (the child is killed, :class:`CryptsetupTimeout` is raised);
* maps cryptsetup's exit codes (cryptsetup(8), "RETURN CODES") to our error types:

  ====  ===============================  ====================================================
  1     wrong parameters                 :class:`CryptsetupError`, or :class:`NotLuksDevice`
                                         (exit code 7) when stderr says the device is not LUKS
  2     no permission (bad passphrase)   :class:`WrongKey`, an :class:`AuthorizationError`
                                         (exit code 4), with one opaque message
  3     out of memory                    :class:`CryptsetupError` (hint: PBKDF memory cost)
  4     wrong device specified           :class:`CryptsetupError`
  5     device already exists or busy    :class:`CryptsetupError`
  ====  ===============================  ====================================================

The summary of stderr kept in an error is at most a few lines; any occurrence of the keys
passed to the call (raw, hex) is redacted from it first, although cryptsetup never prints them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import AuthorizationError, CorruptState, QubesSealError
from ..secret import Secret

#: Default limit for one cryptsetup run.  A recovery keyslot with a 2 s Argon2id cost takes
#: about 2 s to add and as much to test; 120 s leaves room for a loaded machine.
DEFAULT_TIMEOUT = 120.0

#: A pipe created by :func:`os.pipe` holds 64 KiB on Linux (pipe(7)): a key that fits is written
#: before the child starts, so no writer thread is needed.  cryptsetup's own key file limit is
#: 8 MiB, but our keys are 32 bytes and passphrases a few dozen.
MAX_PIPED_KEY = 65536

_STDERR_LINES = 3
_NOT_LUKS = re.compile(r"not a valid LUKS2? device|Unsupported LUKS version")
_STDERR_CHARS = 400


class CryptsetupError(QubesSealError):
    """cryptsetup failed; ``returncode`` and a redacted ``stderr`` summary are kept."""

    def __init__(
        self,
        message: str,
        *,
        hint: str | None = None,
        returncode: int | None = None,
        stderr: str = "",
    ) -> None:
        super().__init__(message, hint=hint)
        self.returncode = returncode
        self.stderr = stderr


class WrongKey(CryptsetupError, AuthorizationError):
    """No keyslot accepted the key or passphrase (cryptsetup exit code 2)."""


class NotLuksDevice(CryptsetupError, CorruptState):
    """The path holds no valid LUKS header."""


class CryptsetupTimeout(CryptsetupError):
    """cryptsetup did not finish in time and was killed."""


class CryptsetupUnavailable(CryptsetupError):
    """The cryptsetup binary is not installed."""


@dataclass(frozen=True)
class Result:
    """What a successful cryptsetup run printed (stdout raw, stderr decoded)."""

    returncode: int
    stdout: bytes
    stderr: str


def binary() -> str:
    """The path of the cryptsetup binary; :class:`CryptsetupUnavailable` if there is none."""
    found = shutil.which("cryptsetup") or shutil.which("cryptsetup", path="/usr/sbin:/sbin")
    if found is None:
        raise CryptsetupUnavailable(
            "cryptsetup is not installed",
            hint="Install the cryptsetup-bin package (Debian) or cryptsetup (Fedora).",
        )
    return found


def _redact(text: bytes, secrets: Sequence[bytes]) -> bytes:
    for raw in secrets:
        if len(raw) < 3:
            continue
        for form in (raw, raw.hex().encode(), raw.hex().upper().encode()):
            text = text.replace(form, b"<redacted>")
    return text


def summarize_stderr(stderr: bytes, *, secrets: Sequence[bytes] = ()) -> str:
    """The last few distinct non-empty lines of ``stderr``, redacted and shortened."""
    text = _redact(stderr, secrets).decode("utf-8", errors="replace")
    lines: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line and line not in lines:
            lines.append(line)
    summary = " / ".join(lines[-_STDERR_LINES:])
    if len(summary) > _STDERR_CHARS:
        summary = summary[: _STDERR_CHARS - 3] + "..."
    return summary


def _error_for(action: str, returncode: int, summary: str) -> CryptsetupError:
    detail = f": {summary}" if summary else ""
    if returncode == 2:
        # One opaque message for every kind of refusal (compare Fernet's InvalidToken).
        return WrongKey(
            "no keyslot of the LUKS container accepted the key",
            hint="Check the passphrase (or use the recovery key).",
            returncode=returncode,
            stderr=summary,
        )
    if _NOT_LUKS.search(summary):
        return NotLuksDevice(
            f"cryptsetup {action}: no valid LUKS2 header{detail}",
            hint="Check the path; if the header was damaged, restore it from a backup "
            "(cryptsetup luksHeaderRestore) or try `cryptsetup repair`.",
            returncode=returncode,
            stderr=summary,
        )
    if returncode == 3:
        return CryptsetupError(
            f"cryptsetup {action} ran out of memory{detail}",
            hint="The keyslot's Argon2 memory cost may exceed the memory available here.",
            returncode=returncode,
            stderr=summary,
        )
    if returncode == 4:
        return CryptsetupError(
            f"cryptsetup {action}: wrong or inaccessible device{detail}",
            returncode=returncode,
            stderr=summary,
        )
    if returncode == 5:
        return CryptsetupError(
            f"cryptsetup {action}: device already exists or is busy{detail}",
            returncode=returncode,
            stderr=summary,
        )
    return CryptsetupError(
        f"cryptsetup {action} failed (exit code {returncode}){detail}",
        returncode=returncode,
        stderr=summary,
    )


def run(
    args: Sequence[str],
    *,
    options: Sequence[str] = (),
    key: Secret | None = None,
    new_key: Secret | None = None,
    stdin: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    check: bool = True,
) -> Result:
    """Run ``cryptsetup --batch-mode OPTIONS... ARGS...`` and return its output.

    ``args`` is the action and its operands (``["luksAddKey", "/path"]``).  ``key`` is written
    to the child's stdin: pass ``--key-file=-`` in ``options``.  ``new_key`` goes through a
    pipe; the option ``--new-keyfile=/dev/fd/N`` naming it is added here.  ``stdin`` (public
    data such as token JSON) is the alternative to ``key``.  With ``check`` (the default) a
    non-zero exit raises the mapped :class:`CryptsetupError`; without, the result is returned
    and only the exit code counts.
    """
    if key is not None and stdin is not None:
        raise ValueError("stdin carries either a key or data, not both")
    if not args:
        raise ValueError("no cryptsetup action given")
    action = args[0] if args[0] != "token" or len(args) < 2 else f"token {args[1]}"
    secrets = [s.reveal() for s in (key, new_key) if s is not None]
    argv = [binary(), "--batch-mode", *options]
    pass_fds: tuple[int, ...] = ()
    read_fd = -1
    if new_key is not None:
        material = new_key.reveal()
        if len(material) > MAX_PIPED_KEY:
            raise ValueError(f"a piped key is limited to {MAX_PIPED_KEY} bytes")
        read_fd, write_fd = os.pipe()
        try:
            os.write(write_fd, material)
        finally:
            os.close(write_fd)
        pass_fds = (read_fd,)
        argv.append(f"--new-keyfile=/dev/fd/{read_fd}")
    argv.extend(args)
    data = key.reveal() if key is not None else (stdin if stdin is not None else b"")
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    try:
        proc = subprocess.run(
            argv,
            input=data,
            capture_output=True,
            pass_fds=pass_fds,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise CryptsetupTimeout(
            f"cryptsetup {action} did not finish within {timeout:g} s and was stopped",
            hint="The machine may be overloaded, or the keyslot's PBKDF cost too high.",
        ) from exc
    except OSError as exc:
        raise CryptsetupError(f"cannot run cryptsetup {action}: {exc.strerror}") from exc
    finally:
        if read_fd >= 0:
            os.close(read_fd)
    summary = summarize_stderr(proc.stderr, secrets=secrets)
    if check and proc.returncode != 0:
        raise _error_for(action, proc.returncode, summary)
    return Result(proc.returncode, proc.stdout, summary)
