"""Why the TPM refused: this boot's TXT log compared, component by component, with the
measured events each accepted boot state was approved from.

**A diagnosis, never an authority.**  The TPM's refusal stands whatever this module says, and
nothing in the boot or the CLI decides anything from it.  Its inputs are unauthenticated:
the record travels in the container's token (MAC-checked only after an unlock, so at the
boot prompt an evil maid may have written it), the TXT log comes from memory (checked here
against the TPM's PCR 17/18, which the refusal read anyway), and the kernel's command line
from ``/proc/cmdline``.  So every field of a record is treated as hostile: parsed with
bounded sizes and types (a malformed record is ignored, never an error), and every text is
shown through :func:`escape` (printable ASCII only), so that a forged record cannot paint
messages on the console.

**The record** (``events`` beside ``values`` in each accepted state of the token, docs
STATE.md), a few hundred bytes; digests are the state's bank, shortened (a diagnosis needs
to tell two values apart, not to resist collisions)::

    {"v": 1, "bank": "sha256",
     "sinit": {"17.40a": "<12 hex>", ...},   SINIT's own events (PCR.type), not MLE_HASH
                                             nor the OsSinitData capabilities
     "mle": "<12 hex>", "caps": "<12 hex>",  tboot as SINIT measured it (image + cmdline)
     "tboot": {"file": "tboot.gz", "cmdline": "..."},      (when known: a prediction)
     "policy": "<12 hex>",                   tboot's launch policy (first 0x501 in PCR 17)
     "modules": [{"d": "<12 hex>", "role": "kernel", "file": "vmlinuz-6.6.63",
                  "cmdline": "root=...", "size": 123, "sha256": "<64 hex>"}, ...]}

``role``, ``file``, ``cmdline``, ``size``, ``sha256`` are known for a predicted boot (the
files ``reseal --predict`` read); for this boot's state they are carried over from an earlier
record with the same module digest, and dom0's kernel gets ``/proc/cmdline``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import QubesSealError
from .eventlog import (
    EV_NO_ACTION,
    EVTYPE_BIOSAC_REG_DATA,
    EVTYPE_HASH_START,
    EVTYPE_LCP_AUTHORITIES_HASH,
    EVTYPE_LCP_CONTROL_HASH,
    EVTYPE_LCP_DETAILS_HASH,
    EVTYPE_LCP_HASH,
    EVTYPE_MLE_HASH,
    EVTYPE_OSSINITDATA_CAP_HASH,
    EVTYPE_SINIT_PUBKEY_HASH,
    EVTYPE_STM_HASH,
    EVTYPE_TB_MEASUREMENT,
    Event,
    event_type_name,
)

if TYPE_CHECKING:
    from ..state import PcrState, SealedState

RECORD_VERSION = 1
SHORT = 6  # bytes of a digest kept in a record (12 hex characters)
MAX_TEXT = 256  # characters of a command line or file name kept (and shown)
MAX_MODULES = 8
MAX_SINIT = 40
MAX_RECORD_JSON = 4096  # a record larger than this is ignored
PCR13 = 13
DRTM = (17, 18)
ROLES = ("xen", "kernel", "initramfs")
ROLE_WORDS = {"xen": "Xen", "kernel": "the dom0 kernel", "initramfs": "dom0's initramfs"}
SINIT_WORDS = {
    EVTYPE_HASH_START: "the SINIT ACM itself",
    EVTYPE_SINIT_PUBKEY_HASH: "SINIT's signing key",
    EVTYPE_BIOSAC_REG_DATA: "the BIOS ACM registration data",
    EVTYPE_STM_HASH: "the SMI transfer monitor",
    EVTYPE_LCP_CONTROL_HASH: "the launch control policy",
    EVTYPE_LCP_HASH: "the launch control policy",
    EVTYPE_LCP_DETAILS_HASH: "the launch control policy",
    EVTYPE_LCP_AUTHORITIES_HASH: "the launch control policy",
}
FIRMWARE_ADVICE = (
    "a SINIT ACM or BIOS update; after an intended firmware update use the recovery key, "
    "then 'qubes-seal recover --reseal'"
)
DISCLAIMER = (
    "This explanation comes from this boot's TXT event log and the container's header, "
    "neither authenticated before the unlock; the TPM's refusal stands either way."
)


def _short(digest: bytes) -> str:
    return digest[:SHORT].hex()


def escape(text: str, limit: int = MAX_TEXT) -> str:
    """``text`` as printable ASCII: a backslash, a control or non-ASCII character becomes an
    escape (``\\x1b``, ``\\u202e``), so that nothing from a record or a log can move the
    cursor, clear the console or pose as a message of ours; cut at ``limit`` characters."""
    out: list[str] = []
    for c in text[:limit]:
        if " " <= c <= "~" and c != "\\":
            out.append(c)
        elif c == "\\":
            out.append("\\\\")
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}")
    return "".join(out) + ("..." if len(text) > limit else "")


# -- records -----------------------------------------------------------------------------------


def record_from_events(events: Sequence[Event], bank: str = "sha256") -> dict[str, Any] | None:
    """The record of a launch whose TXT log holds ``events`` (None: nothing in ``bank``)."""
    sinit: dict[str, list[bytes]] = {}
    record: dict[str, Any] = {"v": RECORD_VERSION, "bank": bank}
    tboot17: list[bytes] = []
    for e in events:
        digest = e.digests.get(bank)
        if digest is None or e.event_type == EV_NO_ACTION:
            continue
        if e.event_type == EVTYPE_TB_MEASUREMENT:
            if e.pcr == 17:
                tboot17.append(digest)
            continue
        if e.event_type == EVTYPE_MLE_HASH:
            record["mle"] = _short(digest)
        elif e.event_type == EVTYPE_OSSINITDATA_CAP_HASH:
            record["caps"] = _short(digest)
        else:
            sinit.setdefault(f"{e.pcr}.{e.event_type:x}", []).append(digest)
    if not sinit and not tboot17 and "mle" not in record:
        return None
    record["sinit"] = {
        k: _short(v[0] if len(v) == 1 else hashlib.sha256(b"".join(v)).digest())
        for k, v in sorted(sinit.items())[:MAX_SINIT]
    }
    if tboot17:
        record["policy"] = _short(tboot17[0])
    record["modules"] = [{"d": _short(d)} for d in tboot17[1 : 1 + MAX_MODULES]]
    return record


@dataclass(frozen=True)
class ModuleFacts:
    """What is known of one module besides its measured digest (a prediction's files)."""

    role: str
    file: str
    cmdline: bytes
    size: int
    sha256: bytes


def add_facts(
    record: dict[str, Any],
    modules: Sequence[ModuleFacts],
    *,
    tboot_file: str | None = None,
    tboot_cmdline: bytes | None = None,
) -> dict[str, Any]:
    """``record`` with the modules' names, command lines, sizes and image digests."""
    out = dict(record)
    rows = [dict(m) for m in record.get("modules", [])]
    for row, facts in zip(rows, modules, strict=False):
        row.update(
            role=facts.role[:32], file=facts.file[:MAX_TEXT],
            cmdline=facts.cmdline.decode(errors="replace")[:MAX_TEXT],
            size=facts.size, sha256=facts.sha256.hex(),
        )  # fmt: skip
    out["modules"] = rows
    if tboot_file is not None or tboot_cmdline is not None:
        out["tboot"] = {
            **({"file": tboot_file[:MAX_TEXT]} if tboot_file is not None else {}),
            **(
                {"cmdline": tboot_cmdline.decode(errors="replace")[:MAX_TEXT]}
                if tboot_cmdline is not None
                else {}
            ),
        }
    return out


def carry_over(
    record: dict[str, Any], earlier: Sequence[Mapping[str, Any] | None], kernel_cmdline: str | None
) -> dict[str, Any]:
    """This boot's record with what earlier records knew of the same modules (same digest:
    the predicted boot that is now this one), and dom0's kernel command line as the running
    kernel got it when nothing better is known."""
    known: dict[str, dict[str, Any]] = {}
    for doc in earlier:
        parsed = parse_record(doc)
        if parsed is not None:
            for m in parsed.modules:
                if m.role is not None:
                    known.setdefault(m.digest, m.as_json())
            same_tboot = parsed.mle is not None and parsed.mle == record.get("mle")
            if same_tboot and parsed.tboot and "tboot" not in record:
                record = {**record, "tboot": dict(parsed.tboot)}
    rows = []
    for i, row in enumerate(record.get("modules", [])):
        new = dict(known.get(row["d"], row))
        if i == 1 and "cmdline" not in new and kernel_cmdline is not None:
            new.update(role="kernel", cmdline=kernel_cmdline[:MAX_TEXT])
        rows.append(new)
    return {**record, "modules": rows}


@dataclass(frozen=True)
class ModuleRecord:
    digest: str
    role: str | None = None
    file: str | None = None
    cmdline: str | None = None
    size: int | None = None
    sha256: str | None = None

    def as_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"d": self.digest}
        for k in ("role", "file", "cmdline", "size", "sha256"):
            if getattr(self, k) is not None:
                doc[k] = getattr(self, k)
        return doc


@dataclass(frozen=True)
class Record:
    """A parsed, bounded record (:func:`parse_record`)."""

    bank: str
    sinit: dict[str, str]
    mle: str | None
    caps: str | None
    policy: str | None
    modules: tuple[ModuleRecord, ...]
    tboot: dict[str, str] = field(default_factory=dict)


_HEX = frozenset("0123456789abcdef")


def _hex(value: Any, size: int) -> str:
    if not isinstance(value, str) or len(value) != size * 2 or not set(value) <= _HEX:
        raise ValueError("not a digest")
    return value


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > MAX_TEXT:
        raise ValueError("not a bounded text")
    return value


def parse_record(doc: Any) -> Record | None:
    """A record from its JSON, or None when it is absent, malformed or too large: a forged
    record is input like any other, and its only power is to make the explanation wrong."""
    if not isinstance(doc, Mapping):
        return None
    try:
        if len(json.dumps(doc)) > MAX_RECORD_JSON or doc.get("v") != RECORD_VERSION:
            return None
        bank = doc.get("bank")
        if bank not in ("sha1", "sha256", "sha384", "sha512"):
            return None
        sinit_doc = doc.get("sinit", {})
        if not isinstance(sinit_doc, Mapping) or len(sinit_doc) > MAX_SINIT:
            return None
        sinit: dict[str, str] = {}
        for k, v in sinit_doc.items():
            pcr, _, kind = str(k).partition(".")
            if pcr not in ("17", "18") or not 0 < len(kind) <= 8 or not set(kind) <= _HEX:
                return None
            sinit[f"{pcr}.{kind}"] = _hex(v, SHORT)
        rows = doc.get("modules", [])
        if not isinstance(rows, list) or len(rows) > MAX_MODULES:
            return None
        modules = []
        for row in rows:
            if not isinstance(row, Mapping):
                return None
            size = row.get("size")
            if size is not None and (
                not isinstance(size, int) or isinstance(size, bool) or not 0 <= size < 1 << 40
            ):
                return None
            role = _text(row.get("role"))
            modules.append(
                ModuleRecord(
                    digest=_hex(row.get("d"), SHORT),
                    role=role if role in ROLES or role is None else "module",
                    file=_text(row.get("file")),
                    cmdline=_text(row.get("cmdline")),
                    size=size,
                    sha256=None if row.get("sha256") is None else _hex(row.get("sha256"), 32),
                )
            )
        tboot_doc = doc.get("tboot", {})
        if not isinstance(tboot_doc, Mapping):
            return None
        tboot = {k: t for k in ("file", "cmdline") if (t := _text(tboot_doc.get(k))) is not None}
        opt = {
            k: (None if doc.get(k) is None else _hex(doc.get(k), SHORT))
            for k in ("mle", "caps", "policy")
        }
        return Record(bank, sinit, opt["mle"], opt["caps"], opt["policy"], tuple(modules), tboot)
    except (ValueError, TypeError):
        return None


# -- this boot's log ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ThisBoot:
    """This boot's TXT log as far as it can be read: its events and whether it replays to the
    TPM's PCR 17/18 (as the refusal read them)."""

    events: tuple[Event, ...]
    replays: bool
    source: str

    def digest_of_module(self, index: int, bank: str) -> bytes | None:
        mods = [e for e in self.events if e.event_type == EVTYPE_TB_MEASUREMENT and e.pcr == 17]
        mods = [e for e in mods if bank in e.digests][1:]
        return mods[index].digests[bank] if index < len(mods) else None


def read_log(path: str | Path | None, current: Mapping[int, bytes], bank: str) -> ThisBoot | None:
    """This boot's log from ``path`` (or its ``.unverified`` twin, see
    :mod:`qubes_seal.boot.capture`); None when neither can be read or parsed."""
    if not path:
        return None
    from ..boot.capture import replay_txt, unverified_path
    from . import eventlog

    for candidate in (Path(path), unverified_path(path)):
        try:
            data = candidate.read_bytes()[: 4 * 1024 * 1024]
            if data.startswith(eventlog.TXT_EVENT_CONTAINER_SIGNATURE):
                log = eventlog.parse_txt_event_container(data)
            else:
                log = eventlog.parse(data)
            replayed = replay_txt(data).get(bank, {})
        except (OSError, ValueError, QubesSealError):
            continue
        replays = all(p in current and replayed.get(p) == current[p] for p in DRTM) and any(
            p in replayed for p in DRTM
        )
        return ThisBoot(tuple(log.events), replays, str(candidate))
    return None


# -- the explanation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """One difference, in words: ``component`` (launch, sinit, tboot, tboot-policy, xen,
    kernel, initramfs, module, modules, header, pcr-N), ``change`` (a short code), ``old``
    and ``new`` when there are values to show (already escaped)."""

    component: str
    change: str
    text: str
    old: str | None = None
    new: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"component": self.component, "change": self.change, "text": self.text,
                "old": self.old, "new": self.new}  # fmt: skip


@dataclass(frozen=True)
class Explanation:
    state: str | None  # the label of the closest accepted state (escaped)
    basis: str  # "log" | "log-unverified" | "pcrs" | "launch"
    changes: tuple[Change, ...]
    firmware_update: bool = False
    notes: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        head = "why the TPM refused, by component"
        if self.state is not None:
            head += f" (compared with the accepted boot state '{self.state}')"
        out = [head + ":"]
        out += [f"  - {c.text}" for c in self.changes] or ["  - nothing the log can name"]
        out += [f"  note: {n}" for n in self.notes]
        out.append(DISCLAIMER)
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "basis": self.basis,
            "changes": [c.to_json() for c in self.changes],
            "firmware_update": self.firmware_update,
            "notes": list(self.notes),
            "authoritative": False,
            "disclaimer": DISCLAIMER,
        }


def _launch_missing(value: bytes | None) -> str | None:
    if value is None:
        return None
    if value == b"\xff" * len(value):
        return "all 0xFF"
    if value == bytes(len(value)):
        return "all zero"
    return None


def no_launch(pcr17: bytes | None = None, txt_status: str | None = None) -> Explanation:
    """The explanation of a boot without a measured launch."""
    what = _launch_missing(pcr17) or "not a launch value"
    text = f"no measured launch: PCR 17 is {what} (tboot did not perform an Intel TXT launch)"
    notes = () if txt_status is None else (escape(txt_status),)
    return Explanation(None, "launch", (Change("launch", "absent", text),), notes=notes)


def explain(
    sealed: SealedState,
    current: Mapping[int, bytes],
    *,
    this_boot: ThisBoot | None = None,
    kernel_cmdline: str | None = None,
    txt_status: str | None = None,
) -> Explanation:
    """What differs between this boot (``current`` PCR values of the state's bank, and its
    log) and the closest accepted state of ``sealed``.  PCRs missing from ``current`` are not
    compared (``status`` leaves out PCR 13: capped after the unlock)."""
    # "No launch" only where the accepted states expect one: a state sealed without PCR 17,
    # or accepted with this same no-launch value (both explicitly unsafe test setups), is
    # compared by what it covers.
    pcr17 = current.get(17)
    missing = _launch_missing(pcr17) if 17 in sealed.pcrs else None
    if missing is not None and all(s.values.get(17) != pcr17 for s in sealed.pcr_states):
        return no_launch(current.get(17), txt_status)
    bank = sealed.pcr_bank
    ours = None
    if this_boot is not None:
        ours = parse_record(record_from_events(this_boot.events, bank))

    def pcr_diffs(s: PcrState) -> list[int]:
        return [p for p, v in sorted(s.values.items()) if p in current and current[p] != v]

    def compare(s: PcrState) -> list[Change]:
        return _compare(s, pcr_diffs(s), ours, this_boot, kernel_cmdline, bank)

    scored = [(len(compare(s)), len(pcr_diffs(s)), i) for i, s in enumerate(sealed.pcr_states)]
    best = sealed.pcr_states[min(scored)[2]]
    changes = compare(best)
    notes: list[str] = []
    recorded = parse_record(best.record)
    if best.record is not None and recorded is None:
        notes.append("the accepted state's record of events is malformed: ignored")
    basis = "pcrs"
    if this_boot is not None and recorded is not None and ours is not None:
        basis = "log" if this_boot.replays else "log-unverified"
        if not this_boot.replays:
            notes.append(
                f"this boot's TXT log ({escape(this_boot.source)}) does NOT replay to the TPM's "
                "PCR 17/18: the components named above may be wrong"
            )
    elif any(p in DRTM for p in pcr_diffs(best)):
        if best.record is None:
            notes.append("the accepted state has no record of its events (approved before "
                         "records, or a record dropped): only PCRs compared")  # fmt: skip
        if this_boot is None:
            notes.append("this boot's TXT log was not captured: only PCRs compared")
    firmware = any(c.component == "sinit" for c in changes) and not any(
        c.component in ("tboot", "tboot-policy", "module", "modules", *ROLES) for c in changes
    )
    return Explanation(escape(best.label, 64), basis, tuple(changes), firmware, tuple(notes))


def _compare(
    state: PcrState,
    diffs: list[int],
    ours: Record | None,
    this_boot: ThisBoot | None,
    kernel_cmdline: str | None,
    bank: str,
) -> list[Change]:
    changes: list[Change] = []
    if PCR13 in diffs:
        changes.append(Change("header", "changed", "the container's header changed (PCR 13): "
                              "its keyslots or metadata were rewritten since this state was "
                              "approved"))  # fmt: skip
    for p in diffs:
        if p not in (PCR13, *DRTM):
            changes.append(Change(f"pcr-{p}", "changed", f"PCR {p} differs"))
    drtm = [p for p in diffs if p in DRTM]
    if not drtm:
        return changes
    recorded = parse_record(state.record)
    if recorded is None or ours is None or recorded.bank != ours.bank:
        changes += _pcr_only(drtm)
        return changes
    found = _components(recorded, ours, this_boot, kernel_cmdline, bank)
    if not found:
        found = [Change("log", "inconsistent", "PCR " + " and ".join(map(str, drtm)) +
                        " differ, yet this boot's log shows the recorded events: the log or "
                        "the record does not describe its boot")]  # fmt: skip
    return changes + found


def _pcr_only(drtm: list[int]) -> list[Change]:
    out = []
    if 17 in drtm:
        out.append(Change("pcr-17", "changed", "PCR 17 differs: SINIT's details, tboot or its "
                          "command line, Xen, the dom0 kernel, its initramfs, or their "
                          "command lines changed"))  # fmt: skip
    if 18 in drtm:
        text = (
            "PCR 18 differs: SINIT's authorities (a SINIT ACM or BIOS update) or tboot's "
            "policy or capabilities changed"
        )
        out.append(Change("pcr-18", "changed", text))
    elif 17 in drtm:
        out.append(Change("pcr-18", "unchanged", "PCR 18 is unchanged: SINIT's signing key "
                          "and launch policy are the same"))  # fmt: skip
    return out


def _components(
    old: Record, new: Record, this_boot: ThisBoot | None, kernel_cmdline: str | None, bank: str
) -> list[Change]:
    out: list[Change] = []
    sinit = sorted(
        k for k in set(old.sinit) | set(new.sinit) if old.sinit.get(k) != new.sinit.get(k)
    )
    tboot_changed = old.mle != new.mle
    caps_changed = old.caps != new.caps
    if sinit or (caps_changed and not tboot_changed):
        names: list[str] = []
        for k in sinit:
            kind = int(k.partition(".")[2], 16)
            word = SINIT_WORDS.get(kind, event_type_name(kind))
            if word not in names:
                names.append(word)
        if caps_changed and not tboot_changed:
            names.append("the OS-SINIT capabilities")
        out.append(Change("sinit", "changed", "SINIT's own measurements changed (" +
                          ", ".join(names) + "): " + FIRMWARE_ADVICE))  # fmt: skip
    if tboot_changed:
        was, now = old.tboot.get("cmdline"), None
        text = "tboot or its command line changed (SINIT's MLE_HASH differs)"
        if old.tboot.get("file"):
            text += f"; approved: {escape(old.tboot['file'])}"
            if was is not None:
                text += f" with '{escape(was)}'"
        out.append(Change("tboot", "changed", text, None if was is None else escape(was), now))
    if old.policy != new.policy:
        out.append(Change("tboot-policy", "changed", "tboot's launch policy changed"))
    n_old, n_new = len(old.modules), len(new.modules)
    if n_old != n_new:
        out.append(Change("modules", "count", f"tboot measured {n_new} modules, the approved "
                          f"boot {n_old}", str(n_old), str(n_new)))  # fmt: skip
    for i, (was_m, now_m) in enumerate(zip(old.modules, new.modules, strict=False)):
        if was_m.digest != now_m.digest:
            out.append(_module(i, was_m, this_boot, kernel_cmdline, bank))
    return out


def _module(
    i: int, m: ModuleRecord, this_boot: ThisBoot | None, kernel_cmdline: str | None, bank: str
) -> Change:
    role = m.role or (ROLES[i] if i < len(ROLES) else "module")
    word = ROLE_WORDS.get(role, f"module {i + 1}")
    name = f" ({escape(m.file)})" if m.file else ""
    now = None if kernel_cmdline is None or role != "kernel" else kernel_cmdline.strip()
    if now is not None and m.cmdline is not None and now != m.cmdline:
        old_s, new_s = escape(m.cmdline), escape(now)
        confirmed = False
        if m.sha256 is not None and this_boot is not None and bank == "sha256":
            measured = this_boot.digest_of_module(i, bank)
            h = hashlib.sha256
            candidate = h(h(now.encode()).digest() + bytes.fromhex(m.sha256)).digest()
            confirmed = measured is not None and measured == candidate
        text = f"{word}'s command line changed: '{old_s}' -> '{new_s}'"
        if confirmed:
            text += f"; its image{name} is the approved one, the log confirms"
        else:
            text += f"; its image{name} may differ too"
        return Change(role, "cmdline", text, old_s, new_s)
    if now is not None and m.cmdline is not None:
        return Change(role, "image", f"{word} image differs{name}; its command line is the "
                      "approved one")  # fmt: skip
    text = f"{word} image or its command line differs{name}"
    if role == "xen" and m.file:
        text = f"Xen image or its command line differs{name}"
    return Change(role, "changed", text, None if m.cmdline is None else escape(m.cmdline))


def describe_refusal(
    sealed: SealedState,
    current: Mapping[int, bytes],
    *,
    txt_log: str | Path | None,
    cmdline_file: str | Path | None = "/proc/cmdline",
    txt_status: str | None = None,
) -> Explanation:
    """:func:`explain` with this boot's log and kernel command line read from their files
    (each optional: unreadable means unknown).  Never raises on hostile input: an unexpected
    error gives the PCR-only explanation."""
    this_boot = read_log(txt_log, current, sealed.pcr_bank)
    cmdline = read_cmdline(cmdline_file)
    try:
        return explain(sealed, current, this_boot=this_boot, kernel_cmdline=cmdline,
                       txt_status=txt_status)  # fmt: skip
    except Exception:  # a diagnosis must never turn into a failure: the PCRs alone
        try:
            return explain(sealed, current, txt_status=txt_status)
        except Exception:
            return Explanation(None, "pcrs", (), notes=("the refusal could not be explained",))


def read_cmdline(path: str | Path | None) -> str | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()[:4096].decode(errors="replace").strip()
    except OSError:
        return None


# -- recording, when a state is approved -------------------------------------------------------


DEFAULT_TXT_LOG = "/run/qubes-seal/txt-event.log"


def this_boot_record(
    now: Mapping[int, bytes],
    *,
    bank: str = "sha256",
    txt_log: str | Path | None = None,
    cmdline_file: str | Path | None = "/proc/cmdline",
    earlier: Sequence[Mapping[str, Any] | None] = (),
) -> dict[str, Any] | None:
    """The record of this boot, for the state approved from ``now`` (its PCR values): from the
    TXT log the boot captured, only if it replays to ``now``'s PCR 17/18 (else None: a
    record must describe the state it sits in).  ``QUBES_SEAL_TXT_LOG`` and
    ``QUBES_SEAL_KERNEL_CMDLINE_FILE`` override the paths (tests, unusual layouts)."""
    import os

    txt_log = txt_log or os.environ.get("QUBES_SEAL_TXT_LOG") or DEFAULT_TXT_LOG
    cmdline_file = os.environ.get("QUBES_SEAL_KERNEL_CMDLINE_FILE", str(cmdline_file or ""))
    try:
        data = Path(txt_log).read_bytes()
        from ..boot.capture import replay_txt
        from . import eventlog

        replayed = replay_txt(data).get(bank, {})
        if not all(p in now and replayed.get(p) == now[p] for p in DRTM):
            return None
        events = eventlog.parse(data).events
        record = record_from_events(events, bank)
    except (OSError, ValueError, QubesSealError):
        return None
    if record is None:
        return None
    return carry_over(record, earlier, read_cmdline(cmdline_file))


def predicted_record(
    events: Sequence[Event],
    modules: Sequence[ModuleFacts],
    *,
    bank: str = "sha256",
    tboot_file: str | None = None,
    tboot_cmdline: bytes | None = None,
) -> dict[str, Any] | None:
    """The record of a predicted boot: its events (:func:`.predict.predict_events`) and the
    files they were computed from."""
    record = record_from_events(events, bank)
    if record is None:
        return None
    return add_facts(record, modules, tboot_file=tboot_file, tboot_cmdline=tboot_cmdline)


def facts(role: str, path: Path | str, cmdline: bytes, image: bytes) -> ModuleFacts:
    return ModuleFacts(role, Path(path).name, cmdline, len(image), hashlib.sha256(image).digest())
