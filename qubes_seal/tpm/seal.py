"""Sealing the master secret to the boot's measurements."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import NoMeasuredLaunch, UsageError
from ..policy import launch_happened, sealing_policy, validate_pcrs
from ..secret import Secret
from ..state import NvBinding, PcrState, SealedState
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


def seal_to_states(
    tpm: Tpm,
    secret: Secret,
    *,
    pcrs: Sequence[int],
    states: Sequence[PcrState],
    bank: str = "sha256",
    require_launch: bool = True,
    auth: Secret | None = None,
    nv: NvBinding | None = None,
) -> SealedState:
    """Seal ``secret`` so that any one of ``states`` (1 to 8 sets of PCR values) unseals it.

    With ``auth``, the unseal also needs that authValue (PolicyAuthValue last).  With ``nv``
    (a rollback counter), it also needs the counter at most its current value + 1
    (PolicyNV): the object works before and after the increment that follows its sealing,
    and no more after the next one.
    """
    pcrs = validate_pcrs(pcrs)
    if not 1 <= len(states) <= 8:
        raise UsageError(f"{len(states)} accepted PCR states: between 1 and 8 are possible")
    if nv is not None:
        nv = NvBinding(nv.handle, nv.name, nv.esys_tr, bound=tpm.nv_read_counter(nv) + 1)
    digest, _ = sealing_policy(
        [s.values for s in states],
        pcrs,
        bank=bank,
        with_auth=auth is not None,
        nv=None if nv is None else (nv.name, nv.bound),
    )
    srk = tpm.ensure_srk()
    public, private = tpm.seal(secret, srk=srk, policy_digest=digest, auth=auth)
    return SealedState(
        srk_handle=srk.handle,
        srk_name=srk.name,
        srk_esys_tr=srk.esys_tr,
        public=public,
        private=private,
        pcr_bank=bank,
        pcrs=pcrs,
        pcr_states=list(states),
        policy_digest=digest,
        require_launch=require_launch,
        auth_value=auth is not None,
        nv=nv,
    )


def current_state(
    tpm: Tpm, pcrs: Sequence[int], *, bank: str = "sha256", require_launch: bool = True
) -> PcrState:
    """The current values of ``pcrs``; fails closed when no measured launch happened."""
    current = tpm.read_pcrs(set(pcrs) | {DRTM_PCR}, bank=bank)
    if require_launch and not launch_happened(current[DRTM_PCR]):
        raise NoMeasuredLaunch(
            "refusing to seal: no TXT measured launch happened in this boot (PCR 17 is all 0xFF)"
        )
    return PcrState("current", {p: current[p] for p in pcrs})


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
    states = [current_state(tpm, pcrs, bank=bank, require_launch=require_launch), *extra_states]
    secret = Secret.random(MASTER_SECRET_SIZE)
    state = seal_to_states(
        tpm, secret, pcrs=pcrs, states=states, bank=bank, require_launch=require_launch
    )
    return state, secret


def reseal(
    state: SealedState,
    *,
    tcti: str,
    extra_states: Sequence[PcrState] = (),
    auth: Secret | None = None,
    fixed: dict[int, bytes] | None = None,
) -> SealedState:
    """Seal the same master secret again: to this boot, plus ``extra_states`` (predicted).

    No trust on first use: the TPM must first release the secret in this boot, so only an
    already-accepted boot can approve the next one.  Without ``extra_states`` this drops every
    other accepted state (after the first good boot on updated components).  ``auth`` is the
    object's authValue when the state needs one; ``fixed`` gives PCR values that are not read
    but predicted (PCR 13: its value at unlock time, not now).
    """
    from .unseal import unseal

    with unseal(state, tcti=tcti, auth=auth) as secret, Tpm(tcti) as tpm:
        now = current_state(
            tpm,
            [p for p in state.pcrs if p not in (fixed or {})],
            bank=state.pcr_bank,
            require_launch=state.require_launch,
        )
        now = PcrState(now.label, {**now.values, **(fixed or {})})
        extra = [s for s in extra_states if s.values != now.values]
        return seal_to_states(
            tpm,
            secret,
            pcrs=state.pcrs,
            states=[now, *extra],
            bank=state.pcr_bank,
            require_launch=state.require_launch,
            auth=auth,
            nv=state.nv,
        )
