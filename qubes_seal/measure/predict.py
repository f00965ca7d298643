"""Prediction: the DRTM PCR values of the next boot, from this boot's TXT log and new files.

An update changes what tboot measures as modules (Xen, dom0's kernel, its initramfs, their
command lines), not what SINIT measures nor tboot's policy.  So the next boot's log is this
boot's log with the module events replaced::

    PCR 17 = replay(SINIT's PCR 17 events, tboot's policy event, new module digests)
    PCR 18 = replay(SINIT's PCR 18 events, tboot's policy event)        (unchanged)

tboot's events (type 0x501) into PCR 17 are, in order: the policy digest, then one per
module (TBOOT-TXT.md); the first one is kept, the rest are replaced.

A tboot update (a new ``tboot.gz``, or a new tboot command line) changes one of SINIT's
events: ``MLE_HASH`` (0x404), the MLE range of the new image with its command line
(:mod:`.mle`), recomputed in every bank the event has.  When the new image's MLE header
carries other capabilities, the OsSinitData capabilities event (0x40F, PCR 17 and 18) changes
too: its dword is recomputed by :func:`.mle.os_sinit_caps` (the bits tboot chooses at launch
as this boot chose them, the others from the new header).  Everything else SINIT measures
depends on the platform (SINIT, BIOS, launch policy), not on tboot.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import UsageError
from .eventlog import (
    EVTYPE_MLE_HASH,
    EVTYPE_OSSINITDATA_CAP_HASH,
    Event,
    EventLog,
    replay,
)
from .mle import TbootImage, os_sinit_caps
from .tboot import EVTYPE_TB_MEASUREMENT, _h, module_digest, split_txt_log

DRTM_PCRS = (17, 18)


@dataclass(frozen=True)
class Component:
    """A module as tboot will measure it: its module string and its (decompressed) bytes."""

    name: str
    cmdline: bytes
    image: bytes


@dataclass(frozen=True)
class NextTboot:
    """The tboot of the next boot: its image and the command line GRUB will pass it."""

    image: TbootImage
    cmdline: bytes


def with_tboot(sinit: Sequence[Event], new: NextTboot) -> list[Event]:
    """SINIT's events as a launch of ``new`` on this platform logs them: ``MLE_HASH``
    recomputed, the OsSinitData capabilities event recomputed when the caps differ."""
    out: list[Event] = []
    found = False
    for e in sinit:
        if e.event_type == EVTYPE_MLE_HASH:
            found = True
            digests = {b: new.image.mle_hash(new.cmdline, b) for b in e.digests}
            e = Event(e.pcr, e.event_type, digests, e.data)
        elif e.event_type == EVTYPE_OSSINITDATA_CAP_HASH and len(e.data) == 4:
            current = int.from_bytes(e.data, "little")
            caps = os_sinit_caps(current, new.image.header.capabilities)
            if caps != current:
                if any(d != _h(b, e.data) for b, d in e.digests.items()):
                    raise UsageError(
                        f"the new tboot changes the OsSinitData capabilities ({current:#x} -> "
                        f"{caps:#x}), and this SINIT's capabilities event is not the hash of "
                        "its data: the change cannot be predicted",
                        hint="After the update, unlock with the recovery key and run "
                        "'qubes-seal recover --reseal'.",
                    )
                data = caps.to_bytes(4, "little")
                e = Event(e.pcr, e.event_type, {b: _h(b, data) for b in e.digests}, data)
        out.append(e)
    if not found:
        raise UsageError(
            "the TXT event log has no MLE_HASH event (0x404): this SINIT does not log tboot's "
            "measurement, so a tboot update cannot be predicted",
            hint="Update tboot, then unlock with the recovery key and run "
            "'qubes-seal recover --reseal'.",
        )
    return out


def predict_events(
    log: EventLog,
    components: Sequence[Component],
    *,
    bank: str = "sha256",
    tboot: NextTboot | None = None,
) -> list[Event]:
    """The events (``bank`` only) of a launch of ``components`` on this platform, in the
    order that replays them: SINIT's, tboot's policy, then one per module.

    ``log`` is the current boot's TXT event log: SINIT's events and tboot's policy event are
    taken from it; with ``tboot``, SINIT's MLE_HASH (and capabilities) events are those of
    the new tboot (:func:`with_tboot`).  Raises :class:`UsageError` if the log has no tboot
    policy event for PCR 17 or lacks ``bank``.
    """
    if not components:
        raise UsageError("no boot component to predict (Xen, kernel and initramfs expected)")
    sinit, tboot_events = split_txt_log(log)
    if tboot is not None:
        sinit = with_tboot(sinit, tboot)
    tb17 = [e for e in tboot_events if e.pcr == 17 and bank in e.digests]
    if not tb17:
        raise UsageError(
            f"the TXT event log has no tboot measurement in PCR 17 ({bank} bank)",
            hint="Is it a TXT event log (captured with txt-stat or by our boot hook), and "
            "does tboot extend this bank (extpol=sha256 or agile)?",
        )
    policy = tb17[0]
    kept = [e for e in sinit if bank in e.digests]
    kept += [e for e in tboot_events if e.pcr != 17 and bank in e.digests]
    new = [
        Event(17, EVTYPE_TB_MEASUREMENT, {bank: module_digest(c.cmdline, c.image, bank)}, b"")
        for c in components
    ]
    events = [*kept, policy, *new]
    # Order matters within a PCR only; keep SINIT's first, then tboot's policy, then modules.
    ordered = [e for e in events if e.event_type != EVTYPE_TB_MEASUREMENT]
    ordered += [e for e in events if e.event_type == EVTYPE_TB_MEASUREMENT]
    return [Event(e.pcr, e.event_type, {bank: e.digests[bank]}, e.data) for e in ordered]


def predict_txt(
    log: EventLog,
    components: Sequence[Component],
    *,
    bank: str = "sha256",
    tboot: NextTboot | None = None,
) -> dict[int, bytes]:
    """PCR 17 and 18 (``bank``) of a launch of ``components`` on this platform
    (:func:`predict_events`, replayed)."""
    events = predict_events(log, components, bank=bank, tboot=tboot)
    values = replay(EventLog(events, [bank], log.format), drtm=True)[bank]
    return {p: values[p] for p in DRTM_PCRS if p in values}


def current_txt(log: EventLog, *, bank: str = "sha256") -> dict[int, bytes]:
    """PCR 17 and 18 as the log says this boot measured them."""
    values = replay(log, drtm=True).get(bank, {})
    return {p: values[p] for p in DRTM_PCRS if p in values}


def predict_pcr13(header_digest: bytes, *, bank: str = "sha256") -> bytes:
    """PCR 13 after the unlock extends it once with the container header's digest."""
    size = hashlib.new(bank).digest_size
    return hashlib.new(bank, bytes(size) + header_digest).digest()
