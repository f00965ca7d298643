"""Prediction before an update, and unlocking after it with no reseal in between (swtpm)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
from cli_util import run
from rpm_util import Package, default_grub_for, packaged

from qubes_seal import state
from qubes_seal.measure import eventlog
from qubes_seal.measure.grub import components_from_entry, find_entry, split_words
from qubes_seal.measure.predict import Component, predict_txt
from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import (
    Module,
    Platform,
    expected_pcrs,
    launch_events,
    sample_modules,
    txt_launch,
)

UPDATES = {
    "xen": dict(xen_version="4.19.1"),
    "xen-cmdline": dict(xen_cmdline="console=none dom0_mem=max:8192M"),
    "kernel": dict(kernel_version="6.12.9-1.qubes"),
    "kernel-cmdline": dict(kernel_cmdline="root=/dev/mapper/qubes_dom0-root ro quiet"),
}


def write_components(modules: list[Module], folder: Path) -> list[str]:
    """The files of ``modules`` in ``folder``, and the options that name them for
    predict/reseal --predict.  dom0 vouches for them, as for an installed update: a private
    RPM database owns the files (--rpm-dbpath) and an /etc/default/grub gives their command
    lines (--etc-default-grub), so the unattended approval accepts them."""
    folder.mkdir(parents=True, exist_ok=True)
    args: list[str] = []
    files: dict[str, bytes] = {}
    for m in modules:
        path = folder / m.name
        data = gzip.compress(m.image) if m.name == "xen" else m.image
        path.write_bytes(data)
        files[str(path.resolve())] = data
        args += [f"--{m.name}", str(path), f"--{m.name}-cmdline", m.cmdline.decode()]
    db = packaged(folder, [Package("boot-components", "1", files)])
    grub = default_grub_for(folder / "default-grub", *(m.cmdline.decode() for m in modules[:2]))
    return [*args, "--rpm-dbpath", str(db), "--etc-default-grub", str(grub)]


def test_predict_matches_the_next_launch_for_each_update(swtpm: Swtpm, tmp_path: Path) -> None:
    log = tmp_path / "txt.log"
    txt_launch(swtpm, sample_modules(), log_path=log)
    parsed = eventlog.parse(log.read_bytes())
    for name, change in UPDATES.items():
        new = sample_modules(**change)
        comps = [Component(m.name, m.cmdline, m.image) for m in new]
        want = expected_pcrs(Platform(), new)
        assert predict_txt(parsed, comps) == {17: want[17], 18: want[18]}, name
        res = run(swtpm.tcti, tmp_path, "predict", "--txt-log", str(log),
                  *write_components(new, tmp_path / name), "--json")  # fmt: skip
        assert res.code == 0, res.err
        assert res.json()["pcrs"]["sha256"] == {"17": want[17].hex(), "18": want[18].hex()}


@pytest.mark.parametrize("update", sorted(UPDATES))
def test_update_then_reboot_unlocks_without_reseal(
    swtpm: Swtpm, tmp_path: Path, update: str
) -> None:
    old, new = sample_modules(), sample_modules(**UPDATES[update])
    log = tmp_path / "txt.log"
    txt_launch(swtpm, old, log_path=log)
    assert run(swtpm.tcti, tmp_path, "seal").code == 0
    res = run(swtpm.tcti, tmp_path, "reseal", "--predict", "--txt-log", str(log),
              *write_components(new, tmp_path / "new"))  # fmt: skip
    assert res.code == 0, res.err
    assert [s.label for s in state.load(tmp_path).pcr_states] == ["current", "predicted"]

    # The update is installed; reboot on it: the unseal works, no reseal happened in between.
    swtpm.reboot()
    txt_launch(swtpm, new, log_path=log)
    assert run(swtpm.tcti, tmp_path, "unseal", "--check").code == 0
    # The old boot is still accepted until the first good boot drops it...
    swtpm.reboot()
    txt_launch(swtpm, old)
    assert run(swtpm.tcti, tmp_path, "unseal", "--check").code == 0
    swtpm.reboot()
    txt_launch(swtpm, new)
    res = run(swtpm.tcti, tmp_path, "reseal")
    assert res.code == 0, res.err
    assert [s.label for s in state.load(tmp_path).pcr_states] == ["current"]
    # ...after which the old components are refused.
    swtpm.reboot()
    txt_launch(swtpm, old)
    res = run(swtpm.tcti, tmp_path, "unseal", "--check")
    assert res.code == 3
    assert "PCR 17" in res.err


def test_component_other_than_predicted_is_refused(swtpm: Swtpm, tmp_path: Path) -> None:
    log = tmp_path / "txt.log"
    txt_launch(swtpm, sample_modules(), log_path=log)
    assert run(swtpm.tcti, tmp_path, "seal").code == 0
    predicted = sample_modules(kernel_version="6.12.9")
    assert run(swtpm.tcti, tmp_path, "reseal", "--predict", "--txt-log", str(log),
               *write_components(predicted, tmp_path / "p")).code == 0  # fmt: skip
    swtpm.reboot()
    txt_launch(swtpm, sample_modules(kernel_version="6.12.9-evil"))
    res = run(swtpm.tcti, tmp_path, "unseal", "--check")
    assert res.code == 3
    assert "PCR 17" in res.err


def test_reseal_needs_an_accepted_boot_and_the_right_log(swtpm: Swtpm, tmp_path: Path) -> None:
    log = tmp_path / "txt.log"
    txt_launch(swtpm, sample_modules(), log_path=log)
    assert run(swtpm.tcti, tmp_path, "seal").code == 0
    before = (tmp_path / "sealed.json").read_bytes()
    # A log of another boot: the prediction would be built on the wrong SINIT values.
    other = tmp_path / "other.log"
    other.write_bytes(eventlog.write(launch_events(
        Platform(sinit=b"another SINIT"), sample_modules()), ["sha256"]))  # fmt: skip
    res = run(swtpm.tcti, tmp_path, "reseal", "--predict", "--txt-log", str(other),
              *write_components(sample_modules(), tmp_path / "c"))  # fmt: skip
    assert res.code == 3
    assert "does not replay" in res.err
    # A boot that does not unseal cannot approve anything (no trust on first use).
    swtpm.reboot()
    txt_launch(swtpm, sample_modules(xen_version="evil"))
    res = run(swtpm.tcti, tmp_path, "reseal")
    assert res.code == 3
    assert (tmp_path / "sealed.json").read_bytes() == before


def test_predict_from_a_grub_entry(swtpm: Swtpm, tmp_path: Path) -> None:
    log = tmp_path / "txt.log"
    txt_launch(swtpm, sample_modules(), log_path=log)
    new = sample_modules(xen_version="4.19.1", kernel_version="6.12.9")
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "xen-4.19.1.gz").write_bytes(gzip.compress(new[0].image))
    (boot / "vmlinuz-6.12.9").write_bytes(new[1].image)
    (boot / "initramfs-6.12.9.img").write_bytes(new[2].image)
    sinit = b"\x02\x00\x00\x00" + b"\x00" * 60  # an ACM header: ModuleType 2 (chipset)
    (boot / "SINIT_51.BIN").write_bytes(sinit)
    cfg = tmp_path / "grub.cfg"
    cfg.write_text(
        "menuentry 'Qubes, with Xen 4.17 (tboot)' --class qubes {\n"
        "  multiboot2 /tboot.gz logging=serial,memory,vga\n"
        "  module2 /xen-old.gz\n"
        "}\n"
        "menuentry 'Qubes, with Xen 4.19.1 and Linux 6.12.9 (tboot)' --class qubes {\n"
        "\tinsmod multiboot2\n"
        "\tmultiboot2 /tboot.gz logging=serial,memory,vga\n"
        f"\tmodule2 /xen-4.19.1.gz {new[0].cmdline.decode()}\n"
        f"\tmodule2 /vmlinuz-6.12.9 {new[1].cmdline.decode()}\n"
        "\tmodule2 --nounzip /initramfs-6.12.9.img\n"
        "\tmodule2 /SINIT_51.BIN\n"
        "}\n"
    )
    title = "Qubes, with Xen 4.19.1 and Linux 6.12.9 (tboot)"
    entry = find_entry(cfg.read_text(), title)
    comps = components_from_entry(entry, boot_dir=boot)
    assert [c.name for c in comps] == ["xen", "kernel", "initramfs"]
    want = expected_pcrs(Platform(), new)
    res = run(swtpm.tcti, tmp_path, "predict", "--txt-log", str(log), "--grub-cfg", str(cfg),
              "--entry", title, "--boot-dir", str(boot), "--json")  # fmt: skip
    assert res.code == 0, res.err
    assert json.loads(res.out)["pcrs"]["sha256"]["17"] == want[17].hex()
    res = run(swtpm.tcti, tmp_path, "predict", "--txt-log", str(log), "--grub-cfg", str(cfg),
              "--entry", "nope", "--boot-dir", str(boot))  # fmt: skip
    assert res.code == 2
    assert "Qubes, with Xen 4.19.1" in res.err


def test_predict_usage_errors(tmp_path: Path) -> None:
    tcti = "swtpm:host=127.0.0.1,port=1"
    assert run(tcti, tmp_path, "predict").code == 2
    res = run(tcti, tmp_path, "predict", "--txt-log", str(tmp_path / "missing.log"))
    assert res.code == 2
    garbage = tmp_path / "garbage.log"
    garbage.write_bytes(b"\x01" * 100)
    res = run(tcti, tmp_path, "predict", "--txt-log", str(garbage), "--xen", "x")
    assert res.code in (2, 7)


def test_grub_word_splitting() -> None:
    assert split_words('module2 /xen.gz a=\'b c\' "d \\" e" f\\ g # comment') == [
        "module2",
        "/xen.gz",
        "a=b c",
        'd " e',
        "f g",
    ]
