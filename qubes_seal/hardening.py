"""Process hardening for every process that holds a secret: no core dumps.

A crashing ``qubes-seal`` (or boot sequence, or key daemon) would otherwise leave a core file
holding whatever it had in memory: the recovery key, the volume key, the domain keys.
:func:`no_core_dumps` is called first thing at each entry point (``qubes-seal``, ``python -m
qubes_seal.boot``, the key daemon, ``qubes-seal-storage-agent``):

* ``RLIMIT_CORE`` 0, soft and hard: no core file, and none for the children (cryptsetup) that
  inherit the limit;
* ``prctl(PR_SET_DUMPABLE, 0)``: no core even where ``core_pattern`` pipes to a helper
  (systemd-coredump ignores ``RLIMIT_CORE`` for that), no ``ptrace`` attach and no
  ``/proc/PID/mem`` for another process of the same user; ``/proc/PID/*`` belongs to root.
  An ``execve`` resets it, so every Python entry point calls this itself.

It runs at boot, so it stays cheap: ``resource`` and one libc call through ctypes (which the
hand-over imports anyway): 23 us per call here, plus the imports (ctypes about 2.5 ms).
"""

from __future__ import annotations

import contextlib
import ctypes
import resource

PR_SET_DUMPABLE = 4
PR_GET_DUMPABLE = 3


def _prctl(option: int, arg: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = libc.prctl
    prctl.restype = ctypes.c_int
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    r = int(prctl(option, arg, 0, 0, 0))
    if r < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"prctl({option}) failed")
    return r


def no_core_dumps() -> None:
    """No core file, no ptrace by peers, for this process (and no core for its children).

    Never fails the caller: a kernel that refuses either call leaves the process as it was,
    which is no reason to refuse an unlock."""
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    with contextlib.suppress(OSError, AttributeError):
        _prctl(PR_SET_DUMPABLE, 0)


def dumpable() -> bool:
    """Whether this process may dump core (``PR_GET_DUMPABLE``)."""
    return _prctl(PR_GET_DUMPABLE) != 0
