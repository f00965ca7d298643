"""The demonstration: the whole boot chain on a private software TPM, narrated.

Run with ``./run-demo`` (or ``python -m qubes_seal.sim.demo``).  Nothing here touches the
machine's real TPM or disks: a swtpm process in a temporary directory plays the TPM, and
small deterministic files play Xen, dom0's kernel and its initramfs.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

from .swtpm import Swtpm
from .txt_launch import Module, sample_modules, txt_launch

WIDTH = 78


def say(text: str) -> None:
    print()
    for para in textwrap.dedent(text).strip().split("\n\n"):
        print(textwrap.fill(" ".join(para.split()), WIDTH))
        print()


def title(n: int, text: str) -> None:
    print()
    print(f"== Step {n}: {text} ".ljust(WIDTH, "="))


class Cli:
    """Runs the real ``qubes-seal`` command and shows it as a user would type it."""

    def __init__(self, tcti: str, state_dir: Path) -> None:
        self.tcti = tcti
        self.state_dir = state_dir

    def __call__(self, *args: str) -> int:
        shown = ["qubes-seal", "--tpm", self.tcti, "--state-dir", str(self.state_dir), *args]
        print(f"$ {shlex.join(shown)}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
        proc = subprocess.run(
            [sys.executable, "-m", "qubes_seal", *shown[1:]],
            capture_output=True,
            text=True,
            env=env,
        )
        for line in (proc.stdout + proc.stderr).rstrip().splitlines():
            print(f"  {line}")
        print(f"  [exit code {proc.returncode}]")
        return proc.returncode


def show_launch(swtpm: Swtpm, modules: list[Module], log: Path) -> None:
    result = txt_launch(swtpm, modules, log_path=log)
    for m in modules:
        print(
            f"  measured {m.name:<9} {len(m.image):>7} bytes, command line {m.cmdline.decode()!r}"
        )
    print(f"  PCR 17 = {result.expected[17].hex()}")
    print(f"  PCR 18 = {result.expected[18].hex()}")
    print(f"  TXT event log: {len(result.events)} events written to {log.name}")


def run(workdir: Path) -> int:
    failures = 0

    def expect(code: int, wanted: int, what: str) -> None:
        nonlocal failures
        verdict = "as expected" if code == wanted else f"UNEXPECTED (wanted {wanted})"
        print(f"  -> {what}: {verdict}")
        failures += code != wanted

    swtpm = Swtpm(workdir / "tpm")
    swtpm.start()
    cli = Cli(swtpm.tcti, workdir / "state")
    try:
        say(
            f"""
            qubes-seal keeps the keys of a Qubes-style Xen workstation locked unless the
            machine booted exactly the software you approved. This demonstration plays a
            whole boot chain on a private software TPM (swtpm, pid {swtpm.pid}, ports
            {swtpm.port}/{swtpm.ctrl_port}), so it is safe to run anywhere.
            """
        )

        title(1, "power on, but no measured launch")
        say(
            """
            A TPM has Platform Configuration Registers (PCRs): registers that can only be
            *extended* (new = SHA-256(old || measurement)), never set. PCR 17 and 18 are the
            "dynamic" ones: at power-on they hold all 0xFF bytes, and only an Intel TXT
            measured launch (tboot asking the CPU to run GETSEC[SENTER]) can reset them to
            zero and fill them with measurements. Right now no launch happened, so qubes-seal
            refuses to seal anything: a secret sealed to 'no launch' would protect nothing.
            """
        )
        cli("pcrs", "--pcrs", "17,18")
        expect(cli("seal"), 3, "seal refused without a measured launch")

        title(2, "a measured launch of Xen, dom0's kernel and initramfs")
        say(
            """
            GRUB loads tboot with three modules. The CPU measures the SINIT module, SINIT
            measures tboot, and tboot measures each module before running it: Xen, then
            dom0's Linux kernel, then its initramfs, each as SHA-256(SHA-256(command line) ||
            SHA-256(file)), into PCR 17. We simulate exactly that on the software TPM.
            """
        )
        modules = sample_modules()
        show_launch(swtpm, modules, workdir / "txt-1.log")

        title(3, "seal the master secret to these measurements")
        say(
            """
            qubes-seal creates a random 32-byte master secret and asks the TPM to seal it:
            the TPM encrypts it under its storage root key (SRK) with a policy that says
            'release only when PCR 17 and 18 hold these values'. The encrypted blob is kept on
            disk; it is useless on any other TPM or in any other boot state.
            """
        )
        expect(cli("seal"), 0, "sealed")

        title(4, "reboot, the same launch: the TPM releases the secret")
        say(
            """
            A reboot resets PCR 17/18 to 0xFF; the next launch of the same software measures
            the same values, so the unseal works. The request is made over a session salted
            with the pinned SRK and the answer is encrypted: someone probing the TPM bus
            sees nothing useful. Five TPM commands in all.
            """
        )
        swtpm.reboot()
        show_launch(swtpm, modules, workdir / "txt-2.log")
        expect(cli("unseal", "--check"), 0, "unsealed")
        cli("status")

        title(5, "the evil maid: Xen replaced while the machine was unattended")
        say(
            """
            Someone with a few minutes alone with the laptop swaps Xen for a version that
            logs your passphrase. One byte is enough: PCR 17 changes, and the TPM refuses.
            qubes-seal says which register differs and does not carry on.
            """
        )
        swtpm.reboot()
        evil = list(modules)
        xen = modules[0]
        evil[0] = Module(xen.name, xen.cmdline, xen.image[:-1] + bytes([xen.image[-1] ^ 1]))
        show_launch(swtpm, evil, workdir / "txt-3.log")
        expect(cli("unseal", "--check"), 3, "refused: measurements do not match")

        title(6, "the quiet attack: boot without TXT at all")
        say(
            """
            tboot falls back to a normal, unmeasured boot when TXT fails. Qubes Anti Evil
            Maid then simply shows no secret and carries on; qubes-seal refuses loudly.
            """
        )
        swtpm.reboot()
        expect(cli("unseal", "--check"), 3, "refused: no measured launch")

        title(7, "back to the genuine software")
        swtpm.reboot()
        show_launch(swtpm, modules, workdir / "txt-4.log")
        expect(cli("unseal", "--check"), 0, "unsealed again")
    finally:
        swtpm.stop()

    print()
    if failures:
        print(f"demo: {failures} step(s) did not behave as expected")
        return 1
    print("demo: every step behaved as expected")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="run-demo",
        description="Demonstrate qubes-seal's boot chain on a private software TPM.",
    )
    parser.add_argument(
        "--keep", metavar="DIR", type=Path, help="work in DIR and keep it (default: a temp dir)"
    )
    args = parser.parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        return run(args.keep)
    with tempfile.TemporaryDirectory(prefix="qubes-seal-demo.") as tmp:
        return run(Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
