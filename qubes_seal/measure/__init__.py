"""Measurements: TCG event logs (firmware and Intel TXT) and what tboot measures.

``eventlog`` reads, writes, replays and verifies event logs; ``tboot`` computes the digests
tboot extends into PCR 17/18 (modules, launch policy) and splits a TXT log into SINIT's and
tboot's events.  Both are pure Python (hashlib only) and need no TPM.
"""

from typing import Any

# The names below are resolved on first use (PEP 562): importing ``qubes_seal.measure`` to
# read an event log must not pay for tboot's gzip and lzma imports, nor the reverse.
_FROM_EVENTLOG = frozenset(
    {"Event", "EventLog", "EventLogError", "PcrCheck", "SpecId", "event_type_name", "parse",
     "parse_txt_event_container", "parse_txt_tpm2_legacy", "replay", "verify", "write",
     "write_sha1"}
)  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _FROM_EVENTLOG:
        from qubes_seal.measure import eventlog

        return getattr(eventlog, name)
    if name in __all__:
        from qubes_seal.measure import tboot  # not on the boot path

        return getattr(tboot, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_DA_POLICY_OLD",
    "Event",
    "EventLog",
    "EventLogError",
    "PcrCheck",
    "SpecId",
    "default_policy_blob",
    "event_type_name",
    "grub_module_string",
    "load_module_image",
    "module_digest",
    "parse",
    "parse_txt_event_container",
    "parse_txt_tpm2_legacy",
    "policy_digest",
    "replay",
    "split_txt_log",
    "verify",
    "write",
    "write_sha1",
]
