"""Measurements: TCG event logs (firmware and Intel TXT) and what tboot measures.

``eventlog`` reads, writes, replays and verifies event logs; ``tboot`` computes the digests
tboot extends into PCR 17/18 (modules, launch policy) and splits a TXT log into SINIT's and
tboot's events.  Both are pure Python (hashlib only) and need no TPM.
"""

from qubes_seal.measure.eventlog import (
    Event,
    EventLog,
    EventLogError,
    PcrCheck,
    SpecId,
    event_type_name,
    parse,
    parse_txt_event_container,
    parse_txt_tpm2_legacy,
    replay,
    verify,
    write,
    write_sha1,
)
from qubes_seal.measure.tboot import (
    DEFAULT_DA_POLICY_OLD,
    default_policy_blob,
    grub_module_string,
    load_module_image,
    module_digest,
    policy_digest,
    split_txt_log,
)

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
