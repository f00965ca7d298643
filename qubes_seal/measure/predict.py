"""Prediction: the DRTM PCR values of the next boot, from this boot's TXT log and new files.

An update changes what tboot measures as modules (Xen, dom0's kernel, its initramfs, their
command lines), not what SINIT measures nor tboot's policy.  So the next boot's log is this
boot's log with the module events replaced::

    PCR 17 = replay(SINIT's PCR 17 events, tboot's policy event, new module digests)
    PCR 18 = replay(SINIT's PCR 18 events, tboot's policy event)        (unchanged)

tboot's events (type 0x501) into PCR 17 are, in order: the policy digest, then one per
module (TBOOT-TXT.md); the first one is kept, the rest are replaced.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UsageError
from .eventlog import Event, EventLog, replay
from .tboot import EVTYPE_TB_MEASUREMENT, module_digest, split_txt_log

DRTM_PCRS = (17, 18)


@dataclass(frozen=True)
class Component:
    """A module as tboot will measure it: its module string and its (decompressed) bytes."""

    name: str
    cmdline: bytes
    image: bytes


def predict_txt(
    log: EventLog, components: Sequence[Component], *, bank: str = "sha256"
) -> dict[int, bytes]:
    """PCR 17 and 18 (``bank``) of a launch of ``components`` on this platform.

    ``log`` is the current boot's TXT event log: SINIT's events and tboot's policy event are
    taken from it.  Raises :class:`UsageError` if the log has no tboot policy event for PCR 17
    or lacks ``bank``.
    """
    if not components:
        raise UsageError("no boot component to predict (Xen, kernel and initramfs expected)")
    sinit, tboot = split_txt_log(log)
    tb17 = [e for e in tboot if e.pcr == 17 and bank in e.digests]
    if not tb17:
        raise UsageError(
            f"the TXT event log has no tboot measurement in PCR 17 ({bank} bank)",
            hint="Is it a TXT event log (captured with txt-stat or by our boot hook), and "
            "does tboot extend this bank (extpol=sha256 or agile)?",
        )
    policy = tb17[0]
    kept = [e for e in sinit if bank in e.digests]
    kept += [e for e in tboot if e.pcr != 17 and bank in e.digests]
    new = [
        Event(17, EVTYPE_TB_MEASUREMENT, {bank: module_digest(c.cmdline, c.image, bank)}, b"")
        for c in components
    ]
    events = [*kept, policy, *new]
    # Order matters within a PCR only; keep SINIT's first, then tboot's policy, then modules.
    ordered = [e for e in events if e.event_type != EVTYPE_TB_MEASUREMENT]
    ordered += [e for e in events if e.event_type == EVTYPE_TB_MEASUREMENT]
    values = replay(EventLog(ordered, [bank], log.format), drtm=True)[bank]
    return {p: values[p] for p in DRTM_PCRS if p in values}


def current_txt(log: EventLog, *, bank: str = "sha256") -> dict[int, bytes]:
    """PCR 17 and 18 as the log says this boot measured them."""
    values = replay(log, drtm=True).get(bank, {})
    return {p: values[p] for p in DRTM_PCRS if p in values}


def predict_pcr13(header_digest: bytes, *, bank: str = "sha256") -> bytes:
    """PCR 13 after the unlock extends it once with the container header's digest."""
    size = hashlib.new(bank).digest_size
    return hashlib.new(bank, bytes(size) + header_digest).digest()
