"""The unseal's TPM command budget, counted on the wire by a proxy in front of swtpm.

Targets (the issue, and ANCHORS.md's floor): the library's unseal issues at most 5 commands
(Load, StartAuthSession, PolicyPCR, Unseal, FlushContext); the whole ``unseal --check``
command at most 6.  clevis needs 29 and systemd-creds (systemd 252) 12.  The container's
unseal adds PolicyAuthValue (the passphrase) and PolicyNV (the rollback counter): 7
(tests/test_auth.py).
"""

from __future__ import annotations

from pathlib import Path

from cli_util import run

from qubes_seal.sim.proxy import CountingProxy
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import sample_modules, txt_launch
from qubes_seal.tpm.device import Tpm
from qubes_seal.tpm.seal import seal_new_secret
from qubes_seal.tpm.unseal import unseal

FLOOR = ["Load", "StartAuthSession", "PolicyPCR", "Unseal", "FlushContext"]


def test_library_unseal_is_the_five_command_floor(swtpm: Swtpm, swtpm_proxy: CountingProxy) -> None:
    txt_launch(swtpm, sample_modules())
    with Tpm(swtpm.tcti) as tpm:
        sealed, secret = seal_new_secret(tpm)
    swtpm_proxy.reset()
    assert unseal(sealed, tcti=swtpm_proxy.tcti) == secret
    assert swtpm_proxy.commands == FLOOR


def test_cli_unseal_check_within_six_commands(
    swtpm: Swtpm, swtpm_proxy: CountingProxy, tmp_path: Path
) -> None:
    txt_launch(swtpm, sample_modules())
    assert run(swtpm.tcti, tmp_path, "seal").code == 0
    swtpm_proxy.reset()
    res = run(swtpm_proxy.tcti, tmp_path, "unseal", "--check")
    assert res.code == 0, res.err
    assert len(swtpm_proxy.commands) <= 6, swtpm_proxy.commands
    assert swtpm_proxy.commands == FLOOR


def test_refused_unseal_flushes_everything(swtpm: Swtpm, swtpm_proxy: CountingProxy) -> None:
    """On a policy failure the object and the session are flushed (the fixture checks)."""
    txt_launch(swtpm, sample_modules())
    with Tpm(swtpm.tcti) as tpm:
        sealed, _ = seal_new_secret(tpm)
    swtpm.reboot()
    txt_launch(swtpm, sample_modules(xen_version="4.19.0"))
    swtpm_proxy.reset()
    try:
        unseal(sealed, tcti=swtpm_proxy.tcti)
    except Exception as exc:
        assert type(exc).__name__ == "MeasurementMismatch"
    else:
        raise AssertionError("unseal succeeded on a different Xen")
    cmds = swtpm_proxy.commands
    assert cmds[:4] == ["Load", "StartAuthSession", "PolicyPCR", "Unseal"]
    assert cmds.count("FlushContext") == 2  # the object and the still-open session
