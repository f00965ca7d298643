"""The evil maid's attacks of issue 12, written from her side, kept as a regression suite.

She has the disk while the machine is off: she can rewrite the whole LUKS2 header (our token
included, with cryptsetup's own ``token import``), the data area, and /boot, and boot her own
system.  She can compute PCR 13's expected value offline (the header digest is public code).
She cannot reach the TPM's secrets, dom0's encrypted root, or the volume key.

Each test plays one attack with stock tools (cryptsetup, the TPM left as it is) and checks
that it is refused, and that the boot without a measured launch never unseals anything.
docs/SECURITY.md lists them.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from machine import CHEAP_KDF, Box

from qubes_seal import chain, handover
from qubes_seal.luks.container import Container
from qubes_seal.luks.header import header_digest

FF = "ff" * 32


def token_doc(path: Path) -> tuple[int, dict[str, Any]]:
    """The raw qubes-seal token, as ``cryptsetup token export`` gives it to anyone."""
    (token_id,) = Container(path).find_tokens("qubes-seal")
    out = subprocess.run(
        ["cryptsetup", "token", "export", "--token-id", str(token_id), str(path)],
        capture_output=True, check=True,
    )  # fmt: skip
    return token_id, json.loads(out.stdout)


def plant(path: Path, doc: dict[str, Any], token_id: int) -> None:
    """Write a token with stock cryptsetup, as the evil maid does."""
    subprocess.run(
        ["cryptsetup", "token", "import", "--token-id", str(token_id), "--token-replace",
         "--json-file", "-", str(path)],
        input=json.dumps(doc).encode(), capture_output=True, check=True,
    )  # fmt: skip


def tamper(path: Path, change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    token_id, doc = token_doc(path)
    change(doc)
    plant(path, doc, token_id)
    return token_doc(path)[1]


def no_launch_state(path: Path) -> Callable[[dict[str, Any]], None]:
    """Append an accepted state for a boot without any measured launch (PCR 17 = PCR 18 =
    ff..ff), PCR 13 computed offline from the header, with a copy of a signature."""

    def change(doc: dict[str, Any]) -> None:
        sealed = doc["sealed"]
        pcr13 = chain.pcr13_after_extend(header_digest(path)).hex()
        sealed["pcr_states"].append({"label": "maid", "values": {"13": pcr13, "17": FF, "18": FF}})
        sealed["signed"]["signatures"].append(sealed["signed"]["signatures"][0])

    return change


def boot_without_launch(box: Box) -> None:
    """Her own boot: no TXT launch at all (PCR 17 and 18 stay ff..ff)."""
    chain.lock(box.container)
    box.swtpm.reboot()


@pytest.mark.parametrize(
    "command",
    [
        ["domain", "remove", "work"],
        ["domain", "rotate", "work", "--commit"],
        ["revoke", "--state", "current"],
        ["rotate", "signer"],
        ["attest", "setup", "--text", "heron"],
        ["reseal"],
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_a_forged_state_is_never_signed(box: Box, command: list[str]) -> None:
    """She appends a no-launch state; dom0's routine commands must not sign it (each checks
    the token's MAC first), and her boot without TXT unseals nothing."""
    box.boot()
    assert box.unlock().code == 0
    assert box.cli("domain", "add", "work").code == 0
    if command[:2] == ["domain", "rotate"]:
        assert box.cli("domain", "rotate", "work").code == 0
    keys_before = box.container.read_bytes()[Container(box.container).data_offset :]
    planted = tamper(box.container, no_launch_state(box.container))
    res = box.cli(*command)
    assert res.code == 7, (res.code, res.err)
    assert "not authentic" in res.err
    assert "recover --reseal" in res.err
    assert token_doc(box.container)[1] == planted  # nothing was written: the token ...
    data = box.container.read_bytes()[Container(box.container).data_offset :]
    assert data == keys_before  # ... nor the keystore
    boot_without_launch(box)
    refused(box)


def refused(box: Box) -> None:
    """Her boot unseals nothing: refused by the TPM (3: no state matches; 7: the signature
    she copied does not verify), nothing handed over."""
    res = box.unlock()
    assert res.code in (3, 7), res.err
    assert "Traceback" not in res.err
    assert handover.get(Container(box.container).uuid) is None


def test_a_tampered_token_stops_the_genuine_unlock_before_any_decision(box: Box) -> None:
    """The TPM may still release the secret (her state is not the one this boot matches),
    but the token's MAC fails right after: exit 7, nothing handed over, PCR 13 capped."""
    tamper(box.container, no_launch_state(box.container))
    box.boot()
    res = box.unlock()
    assert res.code == 7, res.err
    assert "not authentic" in res.err
    assert handover.get(Container(box.container).uuid) is None


def test_a_token_cut_to_pcr13_and_the_recovery_reseal(box: Box) -> None:
    """She cuts the selection to [13]; the refusal's own hint (recover --reseal) must seal
    to dom0's selection (13, 17, 18), never to the token's."""

    def cut(doc: dict[str, Any]) -> None:
        sealed = doc["sealed"]
        sealed["pcrs"] = [13]
        for s in sealed["pcr_states"]:
            s["values"] = {"13": s["values"]["13"]}

    tamper(box.container, cut)
    box.boot()
    assert box.unlock().code == 7
    res = box.cli("recover", "--recovery-key-file", str(box.rk), "--reseal", *CHEAP_KDF,
                  pw=box.pw)  # fmt: skip
    assert res.code == 0, res.err
    token = chain.read_token(Container(box.container))[1]
    assert token.sealed.pcrs == [13, 17, 18]
    box.boot()
    assert box.unlock().code == 0
    boot_without_launch(box)
    refused(box)


def test_require_launch_in_the_token_is_ignored(box: Box) -> None:
    """She flips require_launch to false; after a recovery-key unlock in a boot without TXT,
    a reseal refuses to sign that boot (dom0's policy requires a launch)."""

    def flip(doc: dict[str, Any]) -> None:
        doc["sealed"]["require_launch"] = False

    tamper(box.container, flip)
    boot_without_launch(box)
    res = box.cli("recover", "--recovery-key-file", str(box.rk))
    assert res.code == 0, res.err
    assert "WARNING" in res.out and "not used" in res.out
    res = box.cli("reseal")
    assert res.code in (3, 7), res.err  # the MAC fails first; the policy refuses too
    res = box.cli("recover", "--recovery-key-file", str(box.rk), "--reseal", *CHEAP_KDF,
                  pw=box.pw)  # fmt: skip
    assert res.code == 3, res.err
    assert "no TXT measured launch" in res.err


def test_the_keystore_generation_cannot_be_lowered(box: Box) -> None:
    """The generation that refuses an old data area is covered by the MAC."""
    box.boot()
    assert box.unlock().code == 0
    assert box.cli("domain", "add", "work").code == 0
    before = box.container.read_bytes()
    assert box.cli("domain", "remove", "work").code == 0
    # She restores the old data area (with the destroyed key) under the current header, and
    # lowers the token's generation so that the old keystore would pass.
    data = Container(box.container).data_offset
    with open(box.container, "r+b") as f:
        f.seek(data)
        f.write(before[data:])
    tamper(box.container, lambda d: d.__setitem__("keystore_generation", 1))
    box.boot()
    res = box.unlock()
    assert res.code == 7, res.err


def test_a_removed_token_and_an_old_data_area_warn_at_recovery(box: Box) -> None:
    """Without any token the TPM path is closed; the recovery key still opens the container
    and says plainly that the keystore's freshness could not be checked."""
    box.boot()
    assert box.unlock().code == 0
    (token_id,) = Container(box.container).find_tokens("qubes-seal")
    subprocess.run(
        ["cryptsetup", "token", "remove", "--token-id", str(token_id), str(box.container)],
        check=True, capture_output=True,
    )  # fmt: skip
    box.boot()
    assert box.unlock().code == 7
    res = box.cli("recover", "--recovery-key-file", str(box.rk), "--json")
    assert res.code == 0, res.err
    doc = res.json()
    assert doc["token_authentic"] is False and "token_problem" in doc


def test_a_version_1_token_is_refused(box: Box) -> None:
    def downgrade(doc: dict[str, Any]) -> None:
        doc["qubes_seal_version"] = 1
        del doc["mac"]

    tamper(box.container, downgrade)
    box.boot()
    res = box.unlock()
    assert res.code == 7, res.err
    assert "recover --reseal" in res.err


def test_a_root_volume_name_cannot_name_a_path(box: Box) -> None:
    tamper(box.container, lambda d: d.__setitem__("root_volume", "../../etc/shadow"))
    box.boot()
    res = box.unlock()
    assert res.code == 7, res.err


def test_init_refuses_a_selection_without_17_and_18(box: Box, tmp_path: Path) -> None:
    other = tmp_path / "other.luks"
    res = box.cli("init", "--container", str(other), "--pcrs", "13", *CHEAP_KDF, pw=box.pw)
    assert res.code == 2, res.err
    assert "without PCR 17, 18" in res.err and "--unsafe-pcr-selection" in res.err
    assert not other.exists()


def test_the_launch_policy_file_cannot_drop_17(box: Box, tmp_path: Path) -> None:
    conf = tmp_path / "launch.toml"
    conf.write_text("pcrs = [13, 18]\n")
    import os

    env = {**os.environ, "QUBES_SEAL_LAUNCH_CONFIG": str(conf)}
    from cli_util import run

    res = run(box.swtpm.tcti, box.dir / "state", "reseal", "--container", str(box.container),
              env=env)  # fmt: skip
    assert res.code == 2, res.err
    assert "without PCR 17" in res.err


# -- the boot sequence on a hostile token (issue 13): every failure reaches the recovery prompt


def _remove(doc: dict[str, Any]) -> None:
    doc.clear()


HOSTILE: dict[str, Callable[[dict[str, Any]], None]] = {
    "unknown version": lambda d: d.__setitem__("qubes_seal_version", 99),
    "no nv": lambda d: d["sealed"].pop("nv"),
    "malformed signer key": lambda d: d["sealed"]["signed"].__setitem__("signer_public", "AAAA"),
    "signer name mismatch": lambda d: d["sealed"]["signed"].__setitem__("signer_name", "00" * 34),
    "huge Argon2id time cost": lambda d: d["kdf"].__setitem__("time_cost", 2**32 - 1),
    "huge Argon2id memory": lambda d: d["kdf"].__setitem__("memory_kib", 2**40),
    "not JSON-shaped": lambda d: d.__setitem__("sealed", ["x"]),
    "removed": _remove,
}


@pytest.mark.parametrize("how", sorted(HOSTILE))
def test_the_boot_on_a_hostile_token_reaches_the_recovery_prompt(
    swtpm: Any, tmp_path: Path, how: str
) -> None:
    from test_boot import new_machine, shut_down

    from qubes_seal.tpm.device import Tpm

    m = new_machine(swtpm, tmp_path)
    try:
        if how == "removed":
            (token_id,) = Container(m.container).find_tokens("qubes-seal")
            subprocess.run(
                ["cryptsetup", "token", "remove", "--token-id", str(token_id), str(m.container)],
                check=True, capture_output=True,
            )  # fmt: skip
        else:
            tamper(m.container, HOSTILE[how])
        code, out = m.boot()
        assert code == 0, out
        assert "REFUSED" in out
        assert "RESULT: unlocked with the recovery key" in out
        with Tpm(swtpm.tcti) as tpm:  # capped on this path too
            pcr13 = tpm.read_pcrs([13])[13]
        assert pcr13 not in (bytes(32), chain.pcr13_after_extend(header_digest(m.container)))
    finally:
        shut_down(m)


def test_pcr13_is_capped_when_the_boot_sequence_fails(swtpm: Any, tmp_path: Path) -> None:
    """Wrong passphrases and no recovery key: the sequence fails, PCR 13 is capped all the
    same, so the proof of a clean boot cannot be unsealed later in this boot."""
    from test_boot import new_machine, shut_down

    from qubes_seal.tpm.device import Tpm

    m = new_machine(swtpm, tmp_path)
    try:
        assert m.cli("attest", "setup", "--text", "heron").code == 0  # type: ignore[attr-defined]
        m.pw.write_text("wrong passphrase\n")
        m.rk.write_text("")
        code, out = m.boot()
        assert code != 0, out
        with Tpm(swtpm.tcti) as tpm:
            pcr13 = tpm.read_pcrs([13])[13]
        assert pcr13 not in (bytes(32), chain.pcr13_after_extend(header_digest(m.container)))
        res = m.cli("attest", "show")
        assert res.code != 0  # type: ignore[attr-defined]
    finally:
        shut_down(m)


def test_status_says_when_the_token_is_not_authentic(box: Box) -> None:
    box.boot()
    assert box.unlock().code == 0
    res = box.cli("status", "--json")
    assert res.code in (0, 1), res.err
    assert res.json()["container"]["token_authentic"] is True
    tamper(box.container, no_launch_state(box.container))
    res = box.cli("status")
    assert "NOT AUTHENTIC" in res.out, res.out
    assert box.cli("status", "--json").json()["container"]["token_authentic"] is False
