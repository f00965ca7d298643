"""The TXT section of ``qubes-seal status``: what tboot's ``txt-stat`` says, and the log.

Read from ``--mem`` (``/dev/mem``, or a memory image addressed like it): SENTER done,
TXT.ERRORCODE decoded as tboot decodes it, the heap's base and size, the event-log pointer
(format, address, size); then whether the log the boot captured (``--txt-log``) exists
and replays to the TPM's PCR 17/18.  Unreadable memory or a corrupt heap is a line saying
why: ``status`` never fails on it.
"""

from __future__ import annotations

import os
from typing import Any

from ..errors import QubesSealError


def summary(mem: str, txt_log: str, tpm: Any) -> tuple[dict[str, Any], list[str]]:
    """(the ``txt`` JSON section, its text lines); ``tpm`` is an open Tpm."""
    from ..boot.capture import check_against_tpm, unverified_path
    from ..measure import txt_heap

    doc: dict[str, Any] = {"mem": mem, "read_error": None}
    lines: list[str] = []
    state: txt_heap.TxtState | None = None
    regs: txt_heap.TxtRegisters | None = None
    try:
        state = txt_heap.read_state(mem)
        regs = state.registers
    except txt_heap.TxtHeapError as exc:
        doc["read_error"] = exc.message
        try:  # the registers alone still say whether SENTER was done, and why not
            regs = txt_heap.registers_at(mem)
        except QubesSealError:
            regs = None
    except QubesSealError as exc:
        doc["read_error"] = exc.message
    if state is not None:
        doc.update(state.to_json())
    elif regs is not None:
        doc.update(
            senter_done=regs.senter_done,
            error_code=regs.errorcode,
            error=txt_heap.decode_errorcode(regs.errorcode),
            registers=regs.to_json(),
        )
    if regs is None:
        lines.append(f"TXT:             {mem} not readable: {doc['read_error']}")
    else:
        lines.append(
            f"TXT:             SENTER done: {'yes' if regs.senter_done else 'NO'}; "
            f"ERRORCODE 0x{regs.errorcode:08x} ({txt_heap.decode_errorcode(regs.errorcode)})"
            f" [{mem}]"
        )
        lines.append(f"  heap:          base 0x{regs.heap_base:x}, size 0x{regs.heap_size:x}")
        if doc["read_error"]:
            lines.append(f"  heap NOT usable: {doc['read_error']}")
        elif state is not None and state.pointer is not None and state.log:
            p = state.pointer
            lines.append(
                f"  event log:     {p.format} (element type {p.element_type}) at "
                f"0x{p.phys_addr:x}, {len(state.log)} bytes"
            )
        elif state is not None:
            lines.append(f"  event log:     none ({state.no_launch})")
    captured: dict[str, Any] = {
        "path": txt_log,
        "exists": os.path.exists(txt_log),
        "replays": None,
        "detail": None,
        "unverified_exists": os.path.exists(unverified_path(txt_log)),
    }
    if captured["exists"]:
        try:
            with open(txt_log, "rb") as f:
                check = check_against_tpm(f.read(), tpm)
            captured.update(replays=check.agree, detail=check.detail)
        except (OSError, QubesSealError) as exc:
            reason = exc.message if isinstance(exc, QubesSealError) else exc.strerror
            captured.update(replays=False, detail=f"cannot replay: {reason}")
        mark = "replays to the TPM" if captured["replays"] else "does NOT replay to the TPM"
        lines.append(f"  captured log:  {txt_log} {mark}: {captured['detail']}")
    else:
        lines.append(f"  captured log:  none at {txt_log}")
    if captured["unverified_exists"]:
        lines.append(
            f"  UNVERIFIED:    {unverified_path(txt_log)}: the boot found a log the TPM's "
            "PCR 17/18 contradict (kept for diagnosis, not used)"
        )
    doc["captured_log"] = captured
    return doc, lines
