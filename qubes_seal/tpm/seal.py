"""Sealing the master secret to the boot's measurements."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import NoMeasuredLaunch, UsageError
from ..policy import sealing_policy, validate_pcrs
from ..secret import Secret
from ..state import PcrState, SealedState
from .device import Tpm

#: tboot with a TPM 2.0 uses the details/authorities mapping: PCR 17 (details) and 18
#: (authorities) hold SINIT's and tboot's measurements, Xen and dom0 included (TBOOT-TXT.md).
DEFAULT_PCRS = (17, 18)
DRTM_PCR = 17
MASTER_SECRET_SIZE = 32


def parse_pcr_list(text: str) -> list[int]:
    """``"17,18"`` -> ``[17, 18]``, with a usage error for anything else."""
    try:
        values = [int(x, 10) for x in text.split(",") if x.strip()]
        return validate_pcrs(values)
    except ValueError as exc:
        raise UsageError(
            f"invalid PCR list {text!r}: {exc}",
            hint="Give comma-separated PCR indices 0-23, e.g. --pcrs 17,18.",
        ) from exc


def launch_happened(value: bytes) -> bool:
    """PCR 17 of all 0xFF is its power-on value: no dynamic launch reset it (TBOOT-TXT.md)."""
    return value != b"\xff" * len(value)


def seal_new_secret(
    tpm: Tpm,
    *,
    pcrs: Sequence[int] = DEFAULT_PCRS,
    bank: str = "sha256",
    extra_states: Sequence[PcrState] = (),
    require_launch: bool = True,
) -> tuple[SealedState, Secret]:
    """Create a random master secret and seal it to the current values of ``pcrs``.

    ``extra_states`` adds accepted states (a predicted next boot): the policy becomes a
    PolicyOR of them all.  Refuses (fail closed) when PCR 17 shows no measured launch, unless
    ``require_launch`` is False (an explicitly unsafe test setting).
    """
    pcrs = validate_pcrs(pcrs)
    current = tpm.read_pcrs(set(pcrs) | {DRTM_PCR}, bank=bank)
    if require_launch and not launch_happened(current[DRTM_PCR]):
        raise NoMeasuredLaunch(
            "refusing to seal: no TXT measured launch happened in this boot (PCR 17 is all 0xFF)"
        )
    states = [PcrState("current", {p: current[p] for p in pcrs}), *extra_states]
    digest, _ = sealing_policy([s.values for s in states], pcrs, bank=bank)
    srk = tpm.ensure_srk()
    secret = Secret.random(MASTER_SECRET_SIZE)
    public, private = tpm.seal(secret, srk=srk, policy_digest=digest)
    state = SealedState(
        srk_handle=srk.handle,
        srk_name=srk.name,
        srk_esys_tr=srk.esys_tr,
        public=public,
        private=private,
        pcr_bank=bank,
        pcrs=pcrs,
        pcr_states=states,
        policy_digest=digest,
        require_launch=require_launch,
    )
    return state, secret
