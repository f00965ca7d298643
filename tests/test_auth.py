"""The passphrase half as the sealed object's authValue: the TPM rate-limits guesses."""

from __future__ import annotations

import pytest

from qubes_seal.errors import AuthorizationError, LockoutError, MeasurementMismatch
from qubes_seal.secret import Secret
from qubes_seal.sim.proxy import CountingProxy
from qubes_seal.sim.swtpm import Swtpm, configure_da
from qubes_seal.sim.txt_launch import sample_modules, txt_launch
from qubes_seal.tpm.device import Tpm
from qubes_seal.tpm.seal import current_state, seal_to_states
from qubes_seal.tpm.unseal import unseal

GOOD = Secret(b"\x11" * 32)
BAD = Secret(b"\x22" * 32)


def sealed_with_auth(swtpm: Swtpm):  # type: ignore[no-untyped-def]
    txt_launch(swtpm, sample_modules())
    with Tpm(swtpm.tcti) as tpm:
        now = current_state(tpm, [17, 18])
        secret = Secret.random()
        state = seal_to_states(tpm, secret, pcrs=[17, 18], states=[now], auth=GOOD)
    return state, secret


SIX = ["Load", "StartAuthSession", "PolicyPCR", "PolicyAuthValue", "Unseal", "FlushContext"]


def test_right_auth_unseals_in_six_commands(swtpm: Swtpm, swtpm_proxy: CountingProxy) -> None:
    state, secret = sealed_with_auth(swtpm)
    assert state.auth_value
    swtpm.reboot()  # orderly: the OS sent TPM2_Shutdown
    txt_launch(swtpm, sample_modules())
    swtpm_proxy.reset()
    assert unseal(state, tcti=swtpm_proxy.tcti, auth=GOOD) == secret
    # The first DA-protected authorization after a TPM start: libtpms answers TPM_RC_RETRY
    # once (it clears its orderly flag in NV) and libtss2 resubmits the Unseal.
    assert swtpm_proxy.commands == [*SIX[:5], "Unseal", "FlushContext"]
    swtpm_proxy.reset()
    assert unseal(state, tcti=swtpm_proxy.tcti, auth=GOOD) == secret
    assert swtpm_proxy.commands == SIX


def test_wrong_auth_counts_then_locks_out(swtpm: Swtpm) -> None:
    configure_da(swtpm.tcti, max_tries=3, recovery_time=1000, lockout_recovery=1000)
    state, _ = sealed_with_auth(swtpm)
    for tries in (1, 2, 3):
        with pytest.raises(AuthorizationError):
            unseal(state, tcti=swtpm.tcti, auth=BAD)
        with Tpm(swtpm.tcti) as tpm:
            assert tpm.da_status()["failed_tries"] == tries
    with pytest.raises(LockoutError) as info:
        unseal(state, tcti=swtpm.tcti, auth=GOOD)  # even the right one, while locked out
    assert "lockout" in info.value.message


def test_tampered_launch_refused_even_with_right_auth(swtpm: Swtpm) -> None:
    state, _ = sealed_with_auth(swtpm)
    swtpm.reboot()
    txt_launch(swtpm, sample_modules(xen_version="evil"))
    with pytest.raises(MeasurementMismatch):
        unseal(state, tcti=swtpm.tcti, auth=GOOD)
    with Tpm(swtpm.tcti) as tpm:
        assert tpm.da_status()["failed_tries"] == 0  # a policy failure is not a guess


def test_after_a_power_cut_the_tpm_asks_for_one_retry(
    swtpm: Swtpm, swtpm_proxy: CountingProxy
) -> None:
    """A power cut: the unseal works as after an orderly reboot, and counts no failure."""
    state, secret = sealed_with_auth(swtpm)
    swtpm.reboot(orderly=False)
    txt_launch(swtpm, sample_modules())
    swtpm_proxy.reset()
    assert unseal(state, tcti=swtpm_proxy.tcti, auth=GOOD) == secret
    assert swtpm_proxy.commands.count("Unseal") == 2
    with Tpm(swtpm.tcti) as tpm:
        assert tpm.da_status()["failed_tries"] == 0  # a power cut is not a failed try


#: With the rollback counter (the container flows): PolicyNV between PolicyPCR and
#: PolicyAuthValue; the index comes from the sealed state (no NV_ReadPublic).
SEVEN = ["Load", "StartAuthSession", "PolicyPCR", "PolicyNV", "PolicyAuthValue", "Unseal",
         "FlushContext"]  # fmt: skip


def test_nv_bound_unseal_in_seven_commands_then_revoked(
    swtpm: Swtpm, swtpm_proxy: CountingProxy
) -> None:
    from qubes_seal.errors import RevokedState

    txt_launch(swtpm, sample_modules())
    with Tpm(swtpm.tcti) as tpm:
        nv = tpm.nv_define_counter()
        value = tpm.nv_read_counter(nv)
        now = current_state(tpm, [17, 18])
        secret = Secret.random()
        state = seal_to_states(tpm, secret, pcrs=[17, 18], states=[now], auth=GOOD, nv=nv)
    assert state.nv is not None and state.nv.bound == value + 1
    unseal(state, tcti=swtpm.tcti, auth=GOOD).wipe()  # past libtpms's one TPM_RC_RETRY
    swtpm_proxy.reset()
    assert unseal(state, tcti=swtpm_proxy.tcti, auth=GOOD) == secret
    assert swtpm_proxy.commands == SEVEN
    with Tpm(swtpm.tcti) as tpm:
        tpm.nv_increment(nv)  # counter == bound: still accepted
    assert unseal(state, tcti=swtpm.tcti, auth=GOOD) == secret
    with Tpm(swtpm.tcti) as tpm:
        tpm.nv_increment(nv)  # past the bound: revoked
    swtpm_proxy.reset()
    with pytest.raises(RevokedState) as info:
        unseal(state, tcti=swtpm_proxy.tcti, auth=GOOD)
    assert info.value.exit_code == 3
    assert "rollback refused" in info.value.message
    assert swtpm_proxy.commands[:4] == SEVEN[:4]
    assert "Unseal" not in swtpm_proxy.commands  # refused before any authValue is tried
    with Tpm(swtpm.tcti) as tpm:
        assert tpm.da_status()["failed_tries"] == 0
