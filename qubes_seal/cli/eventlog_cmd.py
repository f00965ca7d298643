"""``qubes-seal eventlog show|replay|verify [FILE]``, ``eventlog capture``: TCG and TXT logs.

A thin layer over :mod:`qubes_seal.measure.eventlog`: read one log (the firmware's, a copy
of it, or with ``--txt`` a TXT event log captured from the TXT heap), then list its events,
replay it, or compare its replay with the TPM's PCRs.  The output always says which log was
read and how it was replayed (a TXT log as a dynamic launch: PCR 17-22 start at zero).

The unseal path imports this module when the parser is built, so it imports nothing at
module level beyond the standard typing names: the library is imported inside the command
functions only.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

    from ..measure.eventlog import Event, EventLog

#: Where Linux exposes the firmware's (SRTM) event log; TPM 2.0 logs are crypto-agile.
FIRMWARE_LOG = "/sys/kernel/security/tpm0/binary_bios_measurements"

#: Where ``eventlog capture`` writes this boot's TXT event log (the reseal unit reads it).
CAPTURED_TXT_LOG = "/run/qubes-seal/txt-event.log"

CAPTURE_DESCRIPTION = f"""\
Read this boot's TXT (DRTM) event log from physical memory, as tboot's txt-stat does,
and write it to --out (default {CAPTURED_TXT_LOG}), replayable with
`qubes-seal eventlog replay --txt FILE`.

What is read: the TXT public registers at 0xFED30000 (TXT.STS: was SENTER done?
TXT.ERRORCODE, decoded as tboot decodes it; TXT.HEAP.BASE/SIZE), then the TXT heap
(BiosData, OsMleData, OsSinitData, SinitMleData), the event-log pointer element in
OsSinitData (type 8: TCG crypto-agile log; type 7: tboot's per-bank "legacy TPM2" logs,
written out as one crypto-agile log; type 5: the TPM 1.2 TXT Event Container), and the
log's records from its first to its next record offset. Every size, offset and address is
checked: the log must lie inside the heap; a garbage or hostile heap is refused (exit 7)
and nothing is written.

--mem FILE reads a memory image instead of /dev/mem: byte offset = physical address (a
sparse file with the registers at 0xFED30000 and the heap where TXT.HEAP.BASE points).

Reading /dev/mem needs (exit 1 otherwise, with the reason):
  - root with CAP_SYS_RAWIO: as another user, "permission denied (not root)";
  - no kernel lockdown: under lockdown=integrity or confidentiality (Secure Boot often
    enables it) opening /dev/mem fails, "the kernel is locked down";
  - CONFIG_STRICT_DEVMEM lets /dev/mem reach only what is not System RAM. The TXT
    registers and a heap that tboot reserved in the e820 map qualify; older kernels refuse
    the rest with "operation not permitted", newer ones read it as zeros, which shows as
    a corrupt heap (exit 7).
Under Xen, dom0's /dev/mem reaches these regions. Capture early (the initramfs), once.

The output is written atomically, mode 0644: the log is not secret (PCR values and digests
of public boot files), and the tools that predict the next boot read it.

exit 3: TXT says no measured launch happened (SENTER not done, TXT disabled, or no log
pointer / an empty log). --json prints the facts in every case:
  {{"senter_done": bool, "error_code": int, "error": "tboot's words",
   "log": {{"format": ..., "phys_addr": int, "size": int, ...}} or null,
   "registers": {{...}}, "heap": {{table: {{"phys_addr", "size", "version"}}}}, "out": path}}

examples:
  qubes-seal eventlog capture
  qubes-seal eventlog capture --mem machine.img --out txt.log --json
  qubes-seal eventlog replay --txt /run/qubes-seal/txt-event.log"""

#: Every bank this command can read from a TPM (TPM_ALG_ID names of the TCG registry).
TPM_BANKS = ("sha1", "sha256", "sha384", "sha512", "sm3_256")

DIGEST_CHARS = 16
DATA_CHARS = 48


class LogSource:
    """The log the command reads: its path, whether it is the TXT log, its bytes and parse."""

    __slots__ = ("banks", "data", "drtm", "events", "format", "log", "path", "user_given")

    def __init__(self, path: str, *, drtm: bool, user_given: bool) -> None:
        self.path = path
        self.drtm = drtm
        self.user_given = user_given
        self.data = b""
        self.log: EventLog | None = None
        # What describe() and summary() report: set from the parse, or by the fast replay.
        self.format = ""
        self.banks: list[str] = []
        self.events = 0

    @property
    def kind(self) -> str:
        return "txt" if self.drtm else "firmware"

    def describe(self) -> str:
        """One line naming the log, its format and banks, and how it is replayed."""
        where = (
            f"TXT event log {self.path}" if self.drtm else f"firmware (SRTM) event log {self.path}"
        )
        rule = (
            "replayed as a dynamic launch: PCR 17-22 start at zero"
            if self.drtm
            else "PCR 17-22 start at 0xFF (no dynamic launch)"
        )
        return (
            f"{where}\n  format {self.format}, banks {', '.join(self.banks)}, "
            f"{self.events} events; {rule}"
        )

    def summary(self) -> dict[str, Any]:
        assert self.format, "read() first"
        return {
            "path": self.path,
            "kind": self.kind,
            "drtm": self.drtm,
            "format": self.format,
            "banks": list(self.banks),
            "events": self.events,
            "size": len(self.data),
        }

    @property
    def parsed(self) -> EventLog:
        assert self.log is not None, "read() first"
        return self.log


def register(sub: Any) -> None:
    """Add ``eventlog show|replay|verify`` to the CLI's subparsers."""
    from .main import EXIT_CODES, Formatter, add_command, env

    # The group itself takes no --json: each action has its own (add_command).
    parser = sub.add_parser(
        "eventlog",
        formatter_class=Formatter,
        epilog=EXIT_CODES,
        help="read the firmware's or a TXT event log: capture, list, replay, verify",
        description=(
            "Read a TCG event log and list its events, replay it to PCR values, or compare\n"
            "that replay with the TPM's PCRs.\n\n"
            f"FILE defaults to the firmware (SRTM) log, {FIRMWARE_LOG}.\n"
            "Linux does not expose the TXT (DRTM) event log: `eventlog capture` copies it from\n"
            "the TXT heap (/dev/mem); give that copy with --txt FILE; it is replayed as a\n"
            "dynamic launch (PCR 17-22 start at zero, not 0xFF).\nFormats: TCG crypto-agile "
            "(TCG_PCR_EVENT2), legacy SHA-1 (TCG_PCClientPCREvent), and\ntboot's TPM 1.2 TXT "
            "Event Container.\n\n"
            "examples:\n"
            "  qubes-seal eventlog show\n"
            "  qubes-seal eventlog capture    # -> /run/qubes-seal/txt-event.log\n"
            "  qubes-seal eventlog replay --json --txt txt-log.bin\n"
            "  qubes-seal --tpm swtpm:port=2321 eventlog verify --txt txt-log.bin"
        ),
    )
    actions = parser.add_subparsers(dest="eventlog_action", metavar="ACTION", required=True)
    specs = [
        (
            "show",
            "one line per event: index, PCR, type, digests, data",
            "List the log's events: index, PCR, event type, the digest of each bank\n"
            "(abbreviated; --json gives them in full, with the event data in hex).",
            cmd_show,
        ),
        (
            "replay",
            "the PCR values the log implies, per bank",
            "Replay the log: extend, per bank, every PCR the log measures into, from its\n"
            "reset value. EV_NO_ACTION events are not extended; a StartupLocality event\n"
            "or an H-CRTM event starts PCR 0 at 00..03 / 00..04; a --txt log starts\n"
            'PCR 17-22 at zero. --json: {"pcrs": {bank: {"PCR": "hex"}}}.',
            cmd_replay,
        ),
        (
            "verify",
            "compare the replay with the TPM's PCRs (exit 3 if any differ)",
            "Read from the TPM (--tpm) every PCR the log extends, in every bank it\n"
            "replays (or those of --bank), and say per PCR whether the TPM agrees.\n"
            "Exit 0 when every one agrees, 3 when any differs: the log does not describe\n"
            "the measurements the TPM holds.",
            cmd_verify,
        ),
    ]
    for name, help_, description, func in specs:
        p = add_command(actions, name, help_, description)
        p.add_argument(
            "file", metavar="FILE", nargs="?", default=None,
            help=f"a firmware event log (default {FIRMWARE_LOG}) [QUBES_SEAL_EVENTLOG]",
        )  # fmt: skip
        p.add_argument(
            "--txt", metavar="FILE", default=env("QUBES_SEAL_TXT_LOG", "") or None,
            help="read this TXT event log instead (captured from the TXT heap) "
            "[QUBES_SEAL_TXT_LOG]",
        )  # fmt: skip
        if name == "verify":
            p.add_argument(
                "--bank", metavar="LIST", default=env("QUBES_SEAL_BANK", "") or None,
                help="comma-separated banks to verify (default: every bank the log "
                "replays) [QUBES_SEAL_BANK]",
            )  # fmt: skip
        p.set_defaults(func=func)

    p = add_command(
        actions,
        "capture",
        "read this boot's TXT event log from the TXT heap (/dev/mem) into a file",
        CAPTURE_DESCRIPTION,
    )
    p.add_argument(
        "--mem", metavar="FILE", default=env("QUBES_SEAL_MEM", "/dev/mem"),
        help="physical memory to read, addressed like /dev/mem (default /dev/mem) "
        "[QUBES_SEAL_MEM]",
    )  # fmt: skip
    p.add_argument(
        "--out", metavar="FILE", default=env("QUBES_SEAL_TXT_LOG_OUT", CAPTURED_TXT_LOG),
        help=f"where to write the log (default {CAPTURED_TXT_LOG}) [QUBES_SEAL_TXT_LOG_OUT]",
    )  # fmt: skip
    p.set_defaults(func=cmd_capture)


# -- reading -----------------------------------------------------------------------------------


def read_log(args: argparse.Namespace) -> LogSource:
    """Read and parse the log the arguments name; errors say which file and why."""
    source = read_bytes(args)
    parse_log(source)
    return source


def read_bytes(args: argparse.Namespace) -> LogSource:
    """Read (not parse) the log the arguments name; errors say which file and why."""
    from ..errors import QubesSealError, UsageError

    if args.txt is not None and args.file is not None:
        raise UsageError(
            f"give either FILE ({args.file}) or --txt {args.txt}, not both",
            hint="FILE is a firmware event log; --txt FILE is a TXT event log (replayed with "
            "PCR 17-22 starting at zero). QUBES_SEAL_TXT_LOG sets --txt.",
        )
    if args.txt is not None:
        source = LogSource(args.txt, drtm=True, user_given=True)
    elif args.file is not None:
        source = LogSource(args.file, drtm=False, user_given=True)
    else:
        default = os.environ.get("QUBES_SEAL_EVENTLOG") or FIRMWARE_LOG
        source = LogSource(default, drtm=False, user_given=default != FIRMWARE_LOG)
    what = "TXT event log" if source.drtm else "event log"
    try:
        with open(source.path, "rb") as f:
            source.data = f.read()
    except FileNotFoundError as exc:
        if not source.user_given:
            raise QubesSealError(
                f"no firmware event log at {source.path}",
                hint="securityfs may not be mounted (mount -t securityfs securityfs "
                "/sys/kernel/security), or the kernel exposes no TPM event log (no TPM, a "
                "TPM 1.2 without ACPI log, or a Xen dom0 kernel that was not given it). "
                "Give a copy of the log as FILE, or a TXT log with --txt FILE.",
            ) from exc
        raise UsageError(f"no such {what}: {source.path}") from exc
    except IsADirectoryError as exc:
        raise UsageError(f"{source.path} is a directory, not an {what}") from exc
    except PermissionError as exc:
        raise QubesSealError(
            f"permission denied reading the {what} {source.path}",
            hint="The kernel's event logs are readable by root only: run as root, or give "
            "a copy of the log as FILE.",
        ) from exc
    except OSError as exc:
        raise QubesSealError(f"cannot read the {what} {source.path}: {exc.strerror}") from exc
    return source


def parse_log(source: LogSource) -> None:
    """Parse the bytes read (source.log); errors say which file."""
    import gc

    from ..measure import eventlog

    # A parse allocates a few objects per event and none of them form cycles: the cyclic
    # garbage collector's passes over them cost up to a tenth of a large log's parse.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        if source.data.startswith(eventlog.TXT_EVENT_CONTAINER_SIGNATURE):
            source.log = eventlog.parse_txt_event_container(source.data)
        else:
            source.log = eventlog.parse(source.data)
    except eventlog.EventLogError as exc:
        raise eventlog.EventLogError(f"{source.path}: {exc.message}", hint=exc.hint) from exc
    finally:
        if gc_was_enabled:
            gc.enable()
    log = source.parsed
    source.format, source.banks, source.events = log.format, log.banks, len(log.events)


def fast_replay(source: LogSource) -> tuple[dict[str, dict[int, bytes]], list[str]] | None:
    """:func:`replay` of a crypto-agile log without parsing it into events first.

    None when the log is in another format or is anything but well-formed (errors
    included): then parse it (:func:`parse_log`) and :func:`replay` it, which give the
    answer or the error.
    """
    import gc

    from ..measure import eventlog

    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        fast = eventlog._replay_agile_fast(source.data, source.drtm)
    finally:
        if gc_was_enabled:
            gc.enable()
    if fast is None:
        return None
    values, banks, events = fast
    source.format, source.banks, source.events = eventlog.FORMAT_CRYPTO_AGILE, banks, events
    skipped = [bank for bank in banks if bank not in values]
    return {bank: pcrs for bank, pcrs in values.items() if pcrs}, skipped


def replay(source: LogSource) -> tuple[dict[str, dict[int, bytes]], list[str]]:
    """Replayed values of the banks with at least one extend, and banks not replayable."""
    from ..measure import eventlog

    log = source.parsed
    try:
        values = eventlog.replay(log, drtm=source.drtm)
    except eventlog.EventLogError as exc:
        raise eventlog.EventLogError(f"{source.path}: {exc.message}", hint=exc.hint) from exc
    skipped = [bank for bank in log.banks if bank not in values]
    return {bank: pcrs for bank, pcrs in values.items() if pcrs}, skipped


# -- formatting ----------------------------------------------------------------------------------


def short_data(data: bytes) -> str:
    """The event data as a short readable text: printable ASCII or UTF-16LE, or its size."""
    text = data.rstrip(b"\x00")
    size = f"{len(data)} bytes"
    if not text:
        return size
    printable = None
    if all(32 <= b < 127 or b in (9, 10, 13) for b in text):
        printable = text.decode("ascii")
    elif len(text) >= 2:
        # UEFI strings (EFI variable names, device paths) are UTF-16LE.
        even = text if len(text) % 2 == 0 else text + b"\x00"
        try:
            decoded = even.decode("utf-16-le")
        except UnicodeDecodeError:
            decoded = ""
        if decoded and all(" " <= c <= "~" for c in decoded):
            printable = decoded
    if printable is None:
        return size
    printable = printable.replace("\n", " ").replace("\r", " ").replace("\t", " ")
    if len(printable) > DATA_CHARS:
        printable = printable[: DATA_CHARS - 3] + "..."
    return f"{size} {printable!r}"


def event_line(index: int, event: Event) -> str:
    digests = " ".join(
        f"{bank}:{digest.hex()[:DIGEST_CHARS]}.." for bank, digest in event.digests.items()
    )
    return (
        f"{index:>5}  PCR {event.pcr:>2}  {event.type_name:<34} {digests}  {short_data(event.data)}"
    )


def pcr_doc(values: dict[str, dict[int, bytes]]) -> dict[str, dict[str, str]]:
    return {
        bank: {str(pcr): value.hex() for pcr, value in sorted(pcrs.items())}
        for bank, pcrs in values.items()
    }


# -- commands ------------------------------------------------------------------------------------


def cmd_show(args: argparse.Namespace) -> int:
    from .main import emit

    source = read_log(args)
    events = source.parsed.events
    if args.json:
        doc = {
            "log": source.summary(),
            "events": [
                {
                    "index": i,
                    "pcr": e.pcr,
                    "type": e.event_type,
                    "type_name": e.type_name,
                    "digests": {bank: d.hex() for bank, d in e.digests.items()},
                    "data": e.data.hex(),
                    "data_size": len(e.data),
                }
                for i, e in enumerate(events)
            ],
        }
        emit(args, doc, "")
        return 0
    lines = [source.describe()]
    lines += [event_line(i, e) for i, e in enumerate(events)]
    print("\n".join(lines))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    source = read_bytes(args)
    # A TXT Event Container is never crypto-agile: the fast path declines it.
    result = fast_replay(source)
    if result is None:
        parse_log(source)
        result = replay(source)
    values, skipped = result
    if args.json:
        import json

        doc = {"log": source.summary(), "pcrs": pcr_doc(values), "not_replayed": skipped}
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    lines = [source.describe()]
    for bank, pcrs in values.items():
        lines.append(f"{bank}:")
        lines += [f"  PCR {pcr:>2}: {value.hex()}" for pcr, value in sorted(pcrs.items())]
    for bank in skipped:
        lines.append(f"{bank}: not replayed (no hash implementation for this bank)")
    if not values:
        lines.append("the log extends no PCR")
    print("\n".join(lines))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ..errors import MeasurementMismatch, QubesSealError, UsageError
    from ..tpm.device import Tpm
    from .main import emit

    source = read_log(args)
    values, skipped = replay(source)
    if args.bank is not None:
        wanted = [b.strip() for b in args.bank.split(",") if b.strip()]
        unknown = [b for b in wanted if b not in TPM_BANKS]
        if unknown or not wanted:
            raise UsageError(
                f"invalid --bank {args.bank!r}", hint=f"Banks: {', '.join(TPM_BANKS)}."
            )
        absent = [b for b in wanted if b not in values]
        if absent:
            raise UsageError(
                f"the log extends no PCR in the {', '.join(absent)} bank(s)"
                + (f" (or cannot replay it: {', '.join(skipped)})" if skipped else ""),
                hint=f"The log replays: {', '.join(values) or 'nothing'}.",
            )
        values = {b: values[b] for b in wanted}
    elif skipped:
        raise QubesSealError(
            f"cannot replay the {', '.join(skipped)} bank(s) of {source.path}: no hash "
            "implementation here, so those PCRs cannot be checked",
            hint="Verify the other banks with --bank.",
        )
    if not values:
        raise QubesSealError(
            f"{source.path} extends no PCR: there is nothing to verify",
            hint="An empty selection is never reported as verified.",
        )
    tpm_values: dict[str, dict[int, bytes]] = {}
    with Tpm(args.tpm) as tpm:
        for bank, pcrs in values.items():
            try:
                tpm_values[bank] = tpm.read_pcrs(pcrs, bank=bank)
            except QubesSealError as exc:
                raise QubesSealError(
                    f"cannot read the TPM's {bank} PCRs: {exc.message}",
                    hint="Choose the banks the TPM has with --bank (qubes-seal pcrs --bank).",
                ) from exc
    rows: list[dict[str, Any]] = []
    for bank, pcrs in values.items():
        for pcr, replayed in sorted(pcrs.items()):
            actual = tpm_values[bank].get(pcr)
            rows.append(
                {
                    "bank": bank,
                    "pcr": pcr,
                    "log": replayed.hex(),
                    "tpm": None if actual is None else actual.hex(),
                    "agree": actual is not None and actual == replayed,
                }
            )
    differ = [r for r in rows if not r["agree"]]
    lines = [source.describe(), f"against the TPM at {args.tpm}:"]
    for r in rows:
        lines.append(f"  {r['bank']:<7} PCR {r['pcr']:>2}  {'agree' if r['agree'] else 'DIFFER'}")
        lines.append(f"    log {r['log']}")
        if not r["agree"]:
            lines.append(f"    tpm {r['tpm']}")
    if differ:
        lines.append(f"{len(differ)} of {len(rows)} PCRs DIFFER from the log's replay")
    else:
        lines.append(f"all {len(rows)} PCRs agree with the log's replay")
    doc = {"log": source.summary(), "tpm": args.tpm, "checks": rows, "agree": not differ}
    emit(args, doc, "\n".join(lines))
    if differ:
        names = ", ".join(f"{r['bank']} PCR {r['pcr']}" for r in differ)
        raise MeasurementMismatch(
            f"the TPM's PCRs do not match the {source.kind} event log {source.path}: {names}",
            hint="The log does not describe the measurements the TPM holds: it is not this "
            "boot's log (a TXT log must be the one captured in this boot), it is "
            "incomplete, or something extended these PCRs without logging it. Do not base "
            "a prediction or a policy on it.",
        )
    return 0


def cmd_capture(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..fsutil import atomic_write
    from ..measure import txt_heap
    from .main import emit

    state = txt_heap.read_state(args.mem)
    out = Path(args.out)
    doc = state.to_json()
    doc["out"] = str(out) if state.log else None
    regs = state.registers
    lines = [
        f"TXT registers ({args.mem}): STS 0x{regs.sts:08x} (SENTER done: "
        f"{'yes' if regs.senter_done else 'no'}), ERRORCODE 0x{regs.errorcode:08x} "
        f"({txt_heap.decode_errorcode(regs.errorcode)}), DIDVID 0x{regs.didvid:016x}",
        f"  TXT.HEAP.BASE 0x{regs.heap_base:x}, TXT.HEAP.SIZE 0x{regs.heap_size:x}",
    ]
    lines += [
        f"  {t.name} @0x{t.phys_addr:x}, size 0x{t.size:x}, version {t.version}"
        for t in state.tables
    ]
    if state.no_launch:
        emit(args, doc, "\n".join(lines))
        raise txt_heap.no_launch_error(state)
    pointer = state.pointer
    assert pointer is not None
    # Into a directory of its own (the default /run/qubes-seal) it is private; a directory
    # the user names is left as it is.
    atomic_write(out, state.log, mode=0o644, private_dir=out == Path(CAPTURED_TXT_LOG))
    lines.append(
        f"  event log: {pointer.format} (element type {pointer.element_type}) at "
        f"0x{pointer.phys_addr:x}, records [{pointer.first_record_offset}, "
        f"{pointer.next_record_offset})"
    )
    lines.append(f"wrote {len(state.log)} bytes to {out}")
    emit(args, doc, "\n".join(lines))
    return 0
