"""Every refusal explained by component (issue 15, items 3 and 4), from the attacker's side.

Each accepted boot state carries the record of the events it was approved from; a refused
unseal compares this boot's captured TXT log with the closest state and says in words what
differs, at the boot prompt (before the recovery-key prompt), in ``unlock``, ``status`` and
``unseal --check`` (and their ``--json``).  The machine is laid out like a real one: the
launch writes the memory image (TXT registers and heap) the boot captures its log from,
and a file stands in for ``/proc/cmdline``.

The explanation is a diagnosis from unauthenticated data: a forged record may make it wrong,
never change what the boot does (the refusal, the exit code, the recovery prompt), and its
text reaches the console escaped.
"""

from __future__ import annotations

import functools
import gzip
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cli_util import Result, run
from hypothesis import given, settings
from hypothesis import strategies as st
from machine import CHEAP_KDF, PASSPHRASE
from rpm_util import Package, default_grub_for, packaged

from qubes_seal import chain
from qubes_seal.measure import explain
from qubes_seal.sim import txt_launch as tl
from qubes_seal.sim.swtpm import Swtpm

KERNEL_CMDLINE = "root=/dev/mapper/qubes_dom0-root ro rhgb quiet"
FILE_NAMES = {"xen": "xen-{v}.gz", "kernel": "vmlinuz-{v}", "initramfs": "initramfs-{v}.img"}


class Machine:
    """A swtpm machine whose launches leave the TXT heap in a memory image, with a container
    initialised after a captured launch (so its first state has a record)."""

    def __init__(self, swtpm: Swtpm, root: Path) -> None:
        self.swtpm = swtpm
        self.root = root
        self.container = root / "keys.luks"
        self.pw = root / "pw"
        self.pw.write_text(PASSPHRASE + "\n")
        self.rk = root / "rk"
        self.console = root / "console.log"
        self.image = root / "mem.img"
        self.log = root / "run" / "txt-event.log"
        self.log.parent.mkdir()
        self.cmdline = root / "cmdline"
        self.state = root / "state"

    def launch(self, *, platform: tl.Platform | None = None, **changes: str) -> tl.LaunchResult:
        """A reboot and a TXT launch; the memory image and /proc/cmdline as it leaves them."""
        if self.container.exists():
            chain.lock(self.container)
        self.swtpm.reboot()
        modules = tl.sample_modules(**changes)
        launch = tl.txt_launch(self.swtpm, modules, platform=platform)
        tl.write_memory_image(self.image, launch.events)
        self.cmdline.write_text(modules[1].cmdline.decode() + "\n")
        return launch

    def cli(self, *args: str, container: bool = True) -> Result:
        env = {"QUBES_SEAL_TXT_LOG": str(self.log),
               "QUBES_SEAL_KERNEL_CMDLINE_FILE": str(self.cmdline)}  # fmt: skip
        extra = ["--container", str(self.container)] if container else []
        return run(self.swtpm.tcti, self.state, *args, *extra, env=env)

    def unlock(self, *extra: str) -> Result:
        return self.cli("unlock", "--passphrase-file", str(self.pw), *extra)

    def boot(self, *, launch: bool = True, platform: tl.Platform | None = None,
             **changes: str) -> tuple[int, str]:  # fmt: skip
        """Reboot, launch (or not), run the boot sequence; (exit code, console)."""
        if launch:
            self.launch(platform=platform, **changes)
        else:
            chain.lock(self.container)
            self.swtpm.reboot()
            regs = tl.machine_registers(senter_done=False, errorcode=0xC0000C01)
            tl.write_image(self.image, regs)
        return self.run_sequence()

    def run_sequence(self) -> tuple[int, str]:
        values = {
            "container": str(self.container), "tpm": self.swtpm.tcti,
            "ask": f"file:{self.pw}", "recovery_ask": f"file:{self.rk}",
            "console": str(self.console), "keys_dir": str(self.root / "keys"), "timeout": 5.0,
            "txt_mem": str(self.image), "txt_log": str(self.log),
            "cmdline_file": str(self.cmdline),
        }  # fmt: skip
        config = self.root / "boot.toml"
        toml = "".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items())
        config.write_text("[boot]\n" + toml)
        if self.console.exists():
            self.console.unlink()
        proc = subprocess.run(
            [sys.executable, "-m", "qubes_seal.boot", "--config", str(config)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc.returncode, self.console.read_text()

    def token(self) -> dict[str, Any]:
        from test_attacks import token_doc

        return token_doc(self.container)[1]

    def write_components(self, folder: Path, **changes: str) -> list[str]:
        """The next boot's files, named as /boot names them, vouched for as an installed
        update (a private RPM database, /etc/default/grub), and the options naming them."""
        folder.mkdir(parents=True, exist_ok=True)
        versions = {"xen": changes.get("xen_version", "4.17.5"),
                    "kernel": changes.get("kernel_version", "6.6.63-1.qubes"),
                    "initramfs": changes.get("kernel_version", "6.6.63-1.qubes")}  # fmt: skip
        args: list[str] = []
        files: dict[str, bytes] = {}
        modules = tl.sample_modules(**changes)
        for m in modules:
            path = folder / FILE_NAMES[m.name].format(v=versions[m.name])
            data = gzip.compress(m.image) if m.name == "xen" else m.image
            path.write_bytes(data)
            files[str(path.resolve())] = data
            args += [f"--{m.name}", str(path), f"--{m.name}-cmdline", m.cmdline.decode()]
        db = packaged(folder, [Package("boot-components", "1", files)])
        grub = default_grub_for(folder / "default-grub", *(m.cmdline.decode() for m in modules[:2]))
        return [*args, "--rpm-dbpath", str(db), "--etc-default-grub", str(grub)]


@pytest.fixture
def machine(swtpm: Swtpm, tmp_path: Path):  # type: ignore[no-untyped-def]
    m = Machine(swtpm, tmp_path)
    m.log.write_bytes(m.launch().log)  # the log as the boot captures it
    res = m.cli("init", "--passphrase-file", str(m.pw), "--recovery-key-file", str(m.rk),
                *CHEAP_KDF)  # fmt: skip
    assert res.code == 0, res.err
    yield m
    chain.lock(m.container)


def refused(result: tuple[int, str]) -> str:
    """The console of a boot the TPM refused: the recovery key (given) opened it."""
    code, out = result
    assert code == 0 and "REFUSED" in out and "unlocked with the recovery key" in out, out
    return out


def why(console: str) -> str:
    """The explanation as the boot prompt showed it: after REFUSED, before the recovery
    prompt (which must follow it)."""
    start = console.index("why the TPM refused")
    end = console.index("the TPM's refusal stands either way.", start) + 36
    assert end < console.index("Enter the recovery key"), console
    return console[start:end]


def prepare_rich_records(m: Machine) -> None:
    """A kernel update approved with reseal --predict (files named as /boot names them),
    booted, and 'reseal': this boot's state now carries the files' names and digests."""
    assert m.run_sequence()[0] == 0
    comps = m.write_components(m.root / "update", kernel_version="6.6.99-1.qubes")
    res = m.cli("reseal", "--predict", "--txt-log", str(m.log), *comps)
    assert res.code == 0, res.err
    code, out = m.boot(kernel_version="6.6.99-1.qubes")
    assert code == 0 and "with the TPM and passphrase" in out, out
    assert m.cli("reseal").code == 0
    (state,) = m.token()["sealed"]["pcr_states"]
    rows = state["events"]["modules"]
    assert [r.get("file") for r in rows] == ["xen-4.17.5.gz", "vmlinuz-6.6.99-1.qubes",
                                             "initramfs-6.6.99-1.qubes.img"]  # fmt: skip
    assert all(len(r["sha256"]) == 64 for r in rows)


# -- what is recorded ----------------------------------------------------------------------------


def test_each_state_records_its_events_small(machine: Machine) -> None:
    (state,) = machine.token()["sealed"]["pcr_states"]
    record = state["events"]
    assert record["v"] == 1 and record["bank"] == "sha256"
    assert {"17.402", "17.40a", "18.410"} <= set(record["sinit"])
    assert len(record["modules"]) == 3
    assert record["modules"][1]["cmdline"] == KERNEL_CMDLINE  # /proc/cmdline, at init
    assert len(json.dumps(record, separators=(",", ":"))) < 800
    prepare_rich_records(machine)
    (state,) = machine.token()["sealed"]["pcr_states"]
    assert len(json.dumps(state["events"], separators=(",", ":"))) < 1200
    # The whole token stays far below the LUKS2 JSON area (64 KiB metadata: 60 KiB of JSON).
    size = len(json.dumps(machine.token(), separators=(",", ":")))
    print(f"token {size} bytes")
    assert size < 8 * 1024


# -- at the boot prompt ----------------------------------------------------------------------------


def test_kernel_cmdline_change_named_old_and_new(machine: Machine) -> None:
    prepare_rich_records(machine)
    new = KERNEL_CMDLINE + " init=/bin/sh"
    out = refused(machine.boot(kernel_version="6.6.99-1.qubes", kernel_cmdline=new))
    text = why(out)
    assert f"the dom0 kernel's command line changed: '{KERNEL_CMDLINE}' -> '{new}'" in text
    assert "its image (vmlinuz-6.6.99-1.qubes) is the approved one, the log confirms" in text
    assert "Xen" not in text and "SINIT" not in text and "initramfs" not in text
    assert explain.DISCLAIMER in text


def test_kernel_cmdline_change_without_file_records(machine: Machine) -> None:
    """The init's state knows the kernel's command line from /proc/cmdline only."""
    new = "root=/dev/mapper/qubes_dom0-root rw single"
    out = refused(machine.boot(kernel_cmdline=new))
    assert f"command line changed: '{KERNEL_CMDLINE}' -> '{new}'" in why(out)


def test_xen_image_change(machine: Machine) -> None:
    prepare_rich_records(machine)
    out = refused(machine.boot(xen_version="4.19.1", kernel_version="6.6.99-1.qubes"))
    text = why(out)
    assert "Xen image or its command line differs (xen-4.17.5.gz)" in text, text
    assert "kernel" not in text and "SINIT" not in text


def test_initramfs_and_kernel_image_change(machine: Machine) -> None:
    out = refused(machine.boot(kernel_version="6.6.70-1.qubes"))
    text = why(out)
    assert "the dom0 kernel image differs; its command line is the approved one" in text
    assert "dom0's initramfs image or its command line differs" in text


def test_tboot_cmdline_change(machine: Machine) -> None:
    out = refused(machine.boot(platform=tl.Platform(tboot_cmdline=b"logging=serial")))
    text = why(out)
    assert "tboot or its command line changed (SINIT's MLE_HASH differs)" in text
    assert "SINIT's own measurements" not in text and "Xen" not in text


def test_no_measured_launch(machine: Machine) -> None:
    out = refused(machine.boot(launch=False))
    text = why(out)
    assert "no measured launch: PCR 17 is all 0xFF" in text
    assert "SENTER NOT done" in text and "0xc0000c01" in text


def test_header_change_pcr13(machine: Machine) -> None:
    subprocess.run(  # a token of another type: the JSON metadata PCR 13 measures changes
        ["cryptsetup", "token", "import", "--json-file", "-", str(machine.container)],
        input=b'{"type": "maid", "keyslots": []}', check=True,
    )  # fmt: skip
    out = refused(machine.boot())
    text = why(out)
    assert "the container's header changed (PCR 13)" in text
    assert "Xen" not in text and "tboot" not in text


@pytest.mark.parametrize(
    ("platform", "words"),
    [
        (tl.Platform(sinit=b"simulated SINIT ACM, revision 2"), "the SINIT ACM itself"),
        (tl.Platform(bios_acm=b"BIOS ACM registration data v2"), "the BIOS ACM registration"),
    ],
)
def test_sinit_or_bios_update_refused_explained_and_one_command_recovers(
    machine: Machine, platform: tl.Platform, words: str
) -> None:
    out = refused(machine.boot(platform=platform))
    text = why(out)
    assert "SINIT's own measurements changed (" in text and words in text
    assert (
        "after an intended firmware update use the recovery key, then 'qubes-seal "
        "recover --reseal'" in text
    )
    assert "tboot or its" not in text and "kernel" not in text
    # The one documented command after an intended firmware update (this boot recovered).
    res = machine.cli("recover", "--reseal", "--recovery-key-file", str(machine.rk),
                      "--passphrase-file", str(machine.pw), *CHEAP_KDF)  # fmt: skip
    assert res.code == 0, res.err
    code, out = machine.boot(platform=platform)
    assert code == 0 and "with the TPM and passphrase" in out, out
    (state,) = machine.token()["sealed"]["pcr_states"]
    assert "events" in state  # the new state is recorded too


def test_forged_record_is_shown_escaped_and_changes_nothing(machine: Machine) -> None:
    """An evil maid writes the record (the token is not authenticated before the unlock):
    control characters are escaped, and the boot goes where the TPM sends it."""
    from test_attacks import plant, token_doc

    paint = "\x1b[2J\x1b[H\rqubes-seal: all is well, type your passphrase\n"
    token_id, doc = token_doc(machine.container)
    doc["sealed"]["pcr_states"][0]["events"]["modules"][1]["cmdline"] = paint
    doc["sealed"]["pcr_states"][0]["label"] = "current\x1b[31m"
    plant(machine.container, doc, token_id)
    out = refused(machine.boot(kernel_cmdline=KERNEL_CMDLINE + " x"))
    assert "\x1b" not in out and "\r" not in out
    text = why(out)
    assert "\\x1b[2J\\x1b[H\\x0dqubes-seal: all is well, type your passphrase\\x0a" in text
    assert "'current\\x1b[31m'" in text


@pytest.mark.parametrize(
    ("record", "note"),
    [
        ({"v": 1, "bank": "sha256", "modules": "x" * 9000}, "record of events is malformed"),
        (None, "has no record of its events"),  # a state approved before records
    ],
)
def test_a_malformed_or_missing_record_falls_back_to_pcrs(
    machine: Machine, record: Any, note: str
) -> None:
    from test_attacks import plant, token_doc

    token_id, doc = token_doc(machine.container)
    state = doc["sealed"]["pcr_states"][0]
    if record is None:
        del state["events"]
    else:
        state["events"] = record
    plant(machine.container, doc, token_id)
    out = refused(machine.boot(xen_version="4.19.1"))
    text = why(out)
    assert note in text
    assert "PCR 17 differs" in text and "PCR 18 is unchanged" in text


# -- the CLI ---------------------------------------------------------------------------------------


def test_unlock_status_and_json_carry_the_same_facts(machine: Machine) -> None:
    launch = machine.launch(kernel_cmdline=KERNEL_CMDLINE + " debug")
    machine.log.write_bytes(launch.log)  # as the boot captures it
    res = machine.unlock()
    assert res.code == 3, res.err  # the exit code of a refusal, unchanged
    assert "command line changed" in res.err and explain.DISCLAIMER in res.err
    res = machine.unlock("--json")
    assert res.code == 3
    doc = json.loads(res.out)
    assert doc["refused"] is True and doc["unlocked"] is False and doc["exit_code"] == 3
    exp = doc["explanation"]
    assert exp["authoritative"] is False and exp["basis"] == "log"
    (change,) = exp["changes"]
    assert change["component"] == "kernel" and change["change"] == "cmdline"
    assert (change["old"], change["new"]) == (KERNEL_CMDLINE, KERNEL_CMDLINE + " debug")
    res = machine.cli("status", "--json", "--mem", str(machine.image))
    assert res.code == 0, res.err
    status = json.loads(res.out)["container"]
    assert status["matching_states"] == []
    assert status["explanation"]["changes"] == exp["changes"]
    assert "command line changed" in machine.cli("status", "--mem", str(machine.image)).out


def test_unseal_check_explains_from_pcrs(machine: Machine) -> None:
    machine.launch()
    assert machine.cli("seal", container=False).code == 0
    machine.launch(platform=tl.Platform(sinit_pubkey=b"another signing key"))
    res = machine.cli("unseal", "--check", "--json", container=False)
    assert res.code == 3
    exp = json.loads(res.out)["explanation"]
    assert exp["basis"] == "pcrs"  # sealed.json states carry no record
    (change,) = exp["changes"]
    assert change["component"] == "pcr-18" and "SINIT ACM or BIOS update" in change["text"]
    assert "SINIT ACM or BIOS update" in machine.cli("unseal", "--check", container=False).err


# -- the parser ------------------------------------------------------------------------------------

JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(
    doc=st.fixed_dictionaries(
        {"v": st.sampled_from([1, 2, "1"]), "bank": st.sampled_from(["sha256", "md5"])},
        optional={"sinit": JSONISH, "modules": JSONISH, "mle": JSONISH, "tboot": JSONISH},
    )
    | JSONISH
)
def test_record_parser_never_raises(doc: Any) -> None:
    parsed = explain.parse_record(doc)
    if parsed is not None:
        for m in parsed.modules:
            assert m.cmdline is None or len(m.cmdline) <= explain.MAX_TEXT


@given(st.text(max_size=300))
def test_escape_is_printable_ascii(text: str) -> None:
    shown = explain.escape(text)
    assert all(" " <= c <= "~" for c in shown)
    if text.isascii() and text.isprintable() and "\\" not in text and len(text) <= 256:
        assert shown == text


@functools.cache
def _launches() -> tuple[dict[str, Any], tuple[Any, ...], dict[int, bytes], dict[int, bytes]]:
    """The approved launch's record and PCRs, and a launch with another kernel command line
    (its events and PCRs): computed once."""
    from qubes_seal.measure import eventlog

    platform, approved = tl.Platform(), tl.sample_modules()
    changed = tl.sample_modules(kernel_cmdline="changed")
    record = explain.record_from_events(tl.launch_events(platform, approved))
    assert record is not None
    data = eventlog.write(tl.launch_events(platform, changed), ["sha256"])
    events = tuple(eventlog.parse(data).events)
    return record, events, tl.expected_pcrs(platform, approved), tl.expected_pcrs(platform, changed)


@settings(max_examples=150, deadline=None)
@given(
    module=st.fixed_dictionaries(
        {"d": st.sampled_from(["00" * 6, "ab" * 6])},
        optional={
            "role": st.sampled_from(["xen", "kernel", "initramfs", "\x1b[31m"]),
            "file": st.text(max_size=40),
            "cmdline": st.text(max_size=60),
            "sha256": st.sampled_from(["11" * 32, "zz"]),
        },
    ),
    now_cmdline=st.none() | st.text(max_size=60),
)
def test_any_record_gives_printable_words(module: dict[str, Any], now_cmdline: str | None) -> None:
    """Whatever a forged record holds, the explanation is built and every line is printable
    ASCII (pure: the simulated launch's events, no TPM)."""
    from qubes_seal.state import PcrState, SealedState

    approved, events, values, now = _launches()
    record = {**approved, "modules": [*approved["modules"][:1], module, *approved["modules"][2:]]}
    state = PcrState("current", {17: values[17], 18: values[18]}, record)
    sealed = SealedState(0, b"", b"", b"", b"", "sha256", [17, 18], [state], b"")
    log = explain.ThisBoot(events, True, "log")
    why_ = explain.explain(sealed, {17: now[17], 18: now[18]}, this_boot=log,
                           kernel_cmdline=now_cmdline)  # fmt: skip
    assert why_.changes
    for line in why_.lines():
        assert all(" " <= c <= "~" for c in line), line


def _explained(approved: dict[str, Any], platform: tl.Platform, **changes: str) -> Any:
    """The pure explanation of a launch of ``platform`` against one state recording
    ``approved`` (the approved launch's PCRs are irrelevant: this boot's differ)."""
    from qubes_seal.measure import eventlog
    from qubes_seal.state import PcrState, SealedState

    events = tl.launch_events(platform, tl.sample_modules(**changes))
    now = tl.expected_pcrs(platform, tl.sample_modules(**changes))
    state = PcrState("predicted", {17: b"\1" * 32, 18: b"\1" * 32}, approved)
    sealed = SealedState(0, b"", b"", b"", b"", "sha256", [17, 18], [state], b"")
    data = eventlog.write(events, ["sha256"])
    log = explain.ThisBoot(tuple(eventlog.parse(data).events), True, "log")
    return explain.explain(sealed, {17: now[17], 18: now[18]}, this_boot=log)


def test_a_predicted_tboot_is_named_and_firmware_is_told_apart() -> None:
    """reseal --predict of a new tboot records its file and command line; a boot with
    another command line names them; a BIOS update alone is flagged as firmware."""
    from qubes_seal.measure import eventlog
    from qubes_seal.measure.mle import TbootImage
    from qubes_seal.measure.predict import Component, NextTboot, predict_events

    base = tl.Platform()
    log = eventlog.parse(eventlog.write(tl.launch_events(base, tl.sample_modules()), ["sha256"]))
    mods = tl.sample_modules()
    comps = [Component(m.name, m.cmdline, m.image) for m in mods]
    new = NextTboot(TbootImage.from_bytes(base.tboot_image), b"logging=serial")
    events = predict_events(log, comps, tboot=new)
    facts = [explain.facts(m.name, f"/boot/{m.name}", m.cmdline, m.image) for m in mods]
    record = explain.predicted_record(events, facts, tboot_file="tboot.gz",
                                      tboot_cmdline=b"logging=serial")  # fmt: skip
    assert record is not None and record["tboot"] == {"file": "tboot.gz",
                                                      "cmdline": "logging=serial"}  # fmt: skip
    # The predicted events are those of the launch (tboot's own measurement included).
    predicted = tl.Platform(tboot_cmdline=b"logging=serial")
    assert explain.record_from_events(tl.launch_events(predicted, mods)) == {
        k: v for k, v in record.items() if k not in ("tboot", "modules")
    } | {"modules": [{"d": m["d"]} for m in record["modules"]]}
    # The same events, yet other PCRs (the state's values are made up here): said so.
    assert [c.component for c in _explained(record, predicted).changes] == ["log"]
    why_ = _explained(record, tl.Platform(tboot_cmdline=b"logging=vga"))
    (change,) = why_.changes
    assert change.component == "tboot" and "approved: tboot.gz with 'logging=serial'" in change.text
    assert why_.firmware_update is False
    why_ = _explained(record, tl.Platform(tboot_cmdline=b"logging=serial", bios_acm=b"v2"))
    assert [c.component for c in why_.changes] == ["sinit"] and why_.firmware_update is True
    why_ = _explained(record, predicted, xen_version="4.19.1")
    (change,) = why_.changes
    assert change.text == "Xen image or its command line differs (xen)"


def test_a_state_without_a_launch_is_explained_by_what_it_covers() -> None:
    """A state sealed to PCR 13 alone, or accepted without a launch (the explicitly unsafe
    test setups, as in the VM), refused for its header: the header is named, not a missing
    launch the state never expected."""
    from qubes_seal.measure import explain as ex
    from qubes_seal.state import PcrState, SealedState

    old, new = bytes(32), b"\x01" * 32
    state = PcrState("current", {13: old})
    sealed = SealedState(0, b"", b"", b"", b"", "sha256", [13], [state], b"")
    why = ex.explain(sealed, {13: new, 17: b"\xff" * 32})
    assert [c.component for c in why.changes] == ["header"], why
    # Accepted with no launch (unsafe), refused for its header: the header, again.
    ff = b"\xff" * 32
    state = PcrState("current", {13: old, 17: ff, 18: ff})
    sealed = SealedState(0, b"", b"", b"", b"", "sha256", [13, 17, 18], [state], b"")
    why = ex.explain(sealed, {13: new, 17: ff, 18: ff})
    assert [c.component for c in why.changes] == ["header"], why
