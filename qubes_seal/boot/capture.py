"""This boot's TXT event log, captured once in the initramfs and checked against the TPM.

The boot sequence calls :func:`capture_at_boot` right after the launch check.  It reads the
TXT registers and heap from ``txt_mem`` (``/dev/mem``; :mod:`qubes_seal.measure.txt_heap`
checks every size and offset), replays the log as a dynamic launch and compares the replay
with the TPM's PCR 17 and 18 in every bank the log extends (:func:`check_against_tpm`).

- The log replays to the TPM: it is written to ``txt_log``
  (``/run/qubes-seal/txt-event.log``, mode 0644: it holds no secret), where
  ``reseal --predict`` and the reseal-on-update unit read it.
- It does not (a heap written by someone else, a log from another launch): it is kept for
  diagnosis as ``txt_log`` + ``.unverified`` and the trusted name is not written, so
  nothing predicts the next boot from a log the TPM contradicts.
- No launch, no ``/dev/mem``, a corrupt heap, a TPM that does not answer: one console line.

Nothing here can stop the boot: the unlock never depends on the log, so every error,
even one not foreseen, ends as one console line and the sequence goes on.  Only the
ctypes ESAPI (:mod:`qubes_seal.tpm.esys`) and hashlib are used: the initramfs holds neither
tpm2-pytss nor cryptography.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..errors import QubesSealError

if TYPE_CHECKING:
    from .sequence import BootConfig, Console

#: The PCRs a TXT launch extends and the log describes (SINIT details, authorities).
CHECKED_PCRS = (17, 18)
#: Where the boot writes the verified log (the reseal-on-update unit reads it).
DEFAULT_TXT_LOG = "/run/qubes-seal/txt-event.log"
#: Appended to the log's name when it does not replay to the TPM.
UNVERIFIED_SUFFIX = ".unverified"


class PcrReader(Protocol):
    """Esys (boot path) and Tpm (the CLI) both read PCRs this way."""

    def read_pcrs(self, pcrs: list[int], *, bank: str = "sha256") -> dict[int, bytes]: ...


@dataclass(frozen=True)
class LogCheck:
    """A TXT log's replay against the TPM's PCR 17/18."""

    agree: bool
    banks: tuple[str, ...]
    """The banks compared (those the log extends and the TPM has)."""
    detail: str
    """In words: what agrees, or which PCRs differ and why nothing could be compared."""

    def to_json(self) -> dict[str, object]:
        return {"replays": self.agree, "banks": list(self.banks), "detail": self.detail}


def replay_txt(log: bytes) -> dict[str, dict[int, bytes]]:
    """The log replayed as a dynamic launch: {bank: {pcr: value}}, banks with extends only.
    A TPM 1.2 TXT Event Container or a crypto-agile log (as ``eventlog capture`` writes)."""
    from ..measure import eventlog

    if log.startswith(eventlog.TXT_EVENT_CONTAINER_SIGNATURE):
        values = eventlog.replay(eventlog.parse_txt_event_container(log), drtm=True)
    else:
        values = eventlog.replay_bytes(log, drtm=True)
    return {bank: pcrs for bank, pcrs in values.items() if pcrs}


def check_against_tpm(log: bytes, tpm: PcrReader) -> LogCheck:
    """Compare the log's replay of PCR 17 and 18 with the TPM's, bank by bank.

    A PCR the log does not extend must still hold its launch value (zero).  Banks the TPM
    has not allocated are left out; at least one bank must be compared, else the log is not
    verified.  A log that cannot be parsed or replayed raises its :class:`EventLogError`.
    """
    from ..measure import eventlog

    replayed = replay_txt(log)
    compared: list[str] = []
    differ: list[str] = []
    skipped: list[str] = []
    for bank, pcrs in replayed.items():
        if not any(p in pcrs for p in CHECKED_PCRS):
            continue
        try:
            actual = tpm.read_pcrs(list(CHECKED_PCRS), bank=bank)
        except QubesSealError:
            skipped.append(bank)
            continue
        compared.append(bank)
        size = eventlog.digest_size(bank)
        for pcr in CHECKED_PCRS:
            want = pcrs.get(pcr, eventlog.initial_pcr_value(size, pcr, drtm=True))
            if actual.get(pcr) != want:
                differ.append(f"{bank} PCR {pcr}")
    note = f" (not in the TPM: {', '.join(skipped)})" if skipped else ""
    if not compared:
        return LogCheck(False, (), "the log extends no PCR 17/18 bank the TPM has" + note)
    if differ:
        return LogCheck(
            False, tuple(compared), f"the TPM's {', '.join(differ)} differ from the log's replay"
        )
    return LogCheck(
        True, tuple(compared), f"replays to the TPM's PCR 17/18 ({', '.join(compared)}){note}"
    )


def unverified_path(log_path: str | Path) -> Path:
    return Path(f"{log_path}{UNVERIFIED_SUFFIX}")


def _write(path: Path, data: bytes) -> None:
    from ..fsutil import atomic_write

    # /run/qubes-seal is made a private (root, 0700) directory; a directory named in
    # boot.toml is used as it is, as `eventlog capture --out` does.
    private = str(path.parent) == os.path.dirname(DEFAULT_TXT_LOG)
    atomic_write(path, data, mode=0o644, private_dir=private)


def capture_at_boot(cfg: BootConfig, console: Console) -> None:
    """Capture, check and write this boot's TXT event log; one console line, never raises."""
    if not cfg.txt_mem or not cfg.txt_log:
        return  # disabled in boot.toml
    started = time.monotonic()
    good = Path(cfg.txt_log)
    bad = unverified_path(good)
    try:
        # A file left under either name (an earlier run of the sequence) says nothing about
        # this boot: neither may survive a capture that fails.
        for stale in (good, bad):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        from ..measure import txt_heap
        from ..tpm.esys import Esys

        state = txt_heap.read_state(cfg.txt_mem)
        if state.no_launch:
            console.say(f"TXT event log not captured: {txt_heap.no_launch_error(state).message}")
            return
        try:
            with Esys(cfg.tpm) as tpm:
                check = check_against_tpm(state.log, tpm)
        except QubesSealError as exc:
            check = LogCheck(False, (), f"not checked: {exc.message}")
        ms = (time.monotonic() - started) * 1000
        if check.agree:
            _write(good, state.log)
            console.say(
                f"TXT event log captured ({len(state.log)} bytes, {ms:.0f} ms): "
                f"{check.detail}; written to {good}"
            )
        else:
            _write(bad, state.log)
            console.say(
                f"WARNING: the TXT event log in memory does NOT match the TPM ({check.detail}):"
                f" kept for diagnosis as {bad}, not trusted, {good} not written"
            )
    except QubesSealError as exc:
        console.say(f"TXT event log not captured: {exc.message}")
    except Exception as exc:  # never stop the boot: the unlock does not need the log
        console.say(f"TXT event log not captured: unexpected {type(exc).__name__}: {exc}")
