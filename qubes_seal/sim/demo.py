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
import time
from collections.abc import Iterator
from contextlib import contextmanager
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

    def __init__(self, tcti: str, state_dir: Path, container: Path) -> None:
        self.tcti = tcti
        self.state_dir = state_dir
        self.container = container

    def __call__(self, *args: str, container: bool = True) -> int:
        extra = ["--container", str(self.container)] if container else []
        shown = ["qubes-seal", "--tpm", self.tcti, *args, *extra]
        print(f"$ {shlex.join(shown)}")
        env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
        proc = subprocess.run(
            [sys.executable, "-m", "qubes_seal", "--state-dir", str(self.state_dir), *shown[1:]],
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


PASSPHRASE = "tr0ub4dor & the demo horse"  # noqa: S105 - the demo types it for the user
NEW_PASSPHRASE = "correct horse, new stable"  # noqa: S105 - the demo types it for the user
DEMO_KDF = ["--kdf-time", "250", "--kdf-memory", "65536"]


def run(workdir: Path) -> int:
    failures = 0

    def expect(code: int, wanted: int, what: str) -> None:
        nonlocal failures
        verdict = "as expected" if code == wanted else f"UNEXPECTED (wanted {wanted})"
        print(f"  -> {what}: {verdict}")
        failures += code != wanted

    swtpm = Swtpm(workdir / "tpm")
    swtpm.start()
    container = workdir / "keys.luks"
    pw = workdir / "passphrase"
    pw.write_text(PASSPHRASE + "\n")
    rk = workdir / "recovery-key"
    cli = Cli(swtpm.tcti, workdir / "state", container)
    modules = sample_modules()
    log = workdir / "txt-event.log"
    try:
        say(
            f"""
            qubes-seal keeps the disk keys of a Qubes-style Xen workstation locked unless the
            machine booted exactly the software you approved, and you typed your passphrase.
            This demonstration plays the whole chain on a private software TPM (swtpm, pid
            {swtpm.pid}, ports {swtpm.port}/{swtpm.ctrl_port}) and a LUKS2 container in a
            temporary directory, so it is safe to run anywhere.
            """
        )

        title(1, "power on, but no measured launch")
        say(
            """
            A TPM has Platform Configuration Registers (PCRs): registers that can only be
            *extended* (new = SHA-256(old || measurement)), never set. PCR 17 and 18 are the
            "dynamic" ones: at power-on they hold all 0xFF bytes, and only an Intel TXT
            measured launch (tboot asking the CPU to run GETSEC[SENTER]) can reset them to
            zero and fill them with measurements. No launch happened yet, so qubes-seal
            refuses to set anything up: a secret sealed to 'no launch' would protect nothing.
            """
        )
        cli("pcrs", "--pcrs", "13,17,18", container=False)
        expect(cli("init", "--passphrase-file", str(pw), *DEMO_KDF), 3,
               "init refused without a measured launch")  # fmt: skip

        title(2, "a measured launch of Xen, dom0's kernel and initramfs")
        say(
            """
            GRUB loads tboot with three modules. The CPU measures the SINIT module, SINIT
            measures tboot, and tboot measures each module before running it: Xen, then
            dom0's Linux kernel, then its initramfs, each as SHA-256(SHA-256(command line) ||
            SHA-256(file)), into PCR 17. We simulate exactly that on the software TPM, and keep
            the TXT event log a real launch leaves behind.
            """
        )
        show_launch(swtpm, modules, log)

        title(3, "init: the container of per-domain keys, sealed to this boot")
        say(
            """
            qubes-seal creates a LUKS2 container holding the keystore (one 512-bit key per
            domain). Its key is derived from two halves: a random master secret that only the
            TPM can release, and your passphrase (through Argon2id). The TPM seals the master
            secret to PCR 13 (the container's header), 17 and 18 (tboot's measurements) AND to
            half of the passphrase's Argon2id output: wrong guesses count against the TPM's
            lockout. A recovery key, a plain LUKS passphrase, is shown once.
            """
        )
        expect(cli("init", "--passphrase-file", str(pw), "--recovery-key-file", str(rk),
                   *DEMO_KDF), 0, "container created and master secret sealed")  # fmt: skip
        print(f"  (the recovery key went to {rk.name}: {rk.read_text().strip()})")
        say(
            """
            The boot will first show a proof that it is genuine: here a TOTP code, as a phone
            authenticator shows it. Only a boot with the approved measurements can unseal the
            seed, so a fake boot screen cannot show the right code.
            """
        )
        expect(cli("attest", "setup", "--totp"), 0, "TOTP proof sealed")

        title(4, "reboot: the initramfs shows the proof, asks the passphrase, unlocks")
        swtpm.reboot()
        show_launch(swtpm, modules, log)
        expect(boot(swtpm, container, pw, rk, workdir), 0, "unlocked at boot")
        say(
            """
            PCR 13 is now capped: nothing later in this boot can unseal again. The key
            service gets the keystore through the kernel keyring instead (the hand-over).
            """
        )
        for name in ("work", "personal", "untrusted"):
            cli("domain", "add", name)
        expect(cli("domain", "list"), 0, "domain keys listed (the keys are never printed)")
        failures += key_service_step(cli, container, workdir)
        failures += domain_rotation_step(cli, container, workdir)

        title(5, "a dom0 kernel update: predicted, signed, rebooted into, unlocked")
        say(
            """
            A new Xen and a new dom0 kernel are installed. The sealed object in the TPM does not
            name PCR values: it accepts any boot state signed by the dom0 policy-signing key,
            which lives in the keystore inside the container (only an unlocked dom0 can use
            it). Before the reboot, qubes-seal predicts the PCR values tboot will measure,
            from this boot's TXT event log and the new files, and signs 'this boot' and 'the
            predicted one'. Nothing is unsealed or resealed; the TPM's rollback counter then
            moves on, so every older signature is void.
            """
        )
        new = sample_modules(xen_version="4.19.1", kernel_version="6.12.9-1.qubes")
        args: list[str] = []
        for m in new:
            path = workdir / f"new-{m.name}"
            path.write_bytes(m.image)
            args += [f"--{m.name}", str(path), f"--{m.name}-cmdline", m.cmdline.decode()]
        # The unattended approval takes only what dom0 vouches for: here digests it records
        # (on dom0, the RPM database vouches for Xen and the kernel, kernel-install records
        # the initramfs), and the command lines of its /etc/default/grub.
        grub = workdir / "default-grub"
        grub.write_text(
            f"GRUB_CMDLINE_XEN_DEFAULT='{new[0].cmdline.decode()}'\n"
            "GRUB_QUBES_SEAL_ROOT=/dev/mapper/qubes_dom0-root\n"
            f"GRUB_CMDLINE_LINUX='{new[1].cmdline.decode().split(' ro ', 1)[1]}'\n"
        )
        grub.chmod(0o644)
        files = [str(workdir / f"new-{m.name}") for m in new]
        expect(cli("vouch", "record", *files, container=False), 0,
               "dom0 records the digests of the files it installed")  # fmt: skip
        args += ["--etc-default-grub", str(grub)]
        expect(cli("predict", "--txt-log", str(log), *args, container=False), 0,
               "predicted PCR 17/18 of the next boot")  # fmt: skip
        expect(cli("reseal", "--predict", "--txt-log", str(log), *args), 0,
               "signed the current and the predicted boot (same sealed object)")  # fmt: skip
        expect(cli("status"), 0, "status: the signed states and the rollback counter")
        cli("lock")
        swtpm.reboot()
        show_launch(swtpm, new, log)
        expect(boot(swtpm, container, pw, rk, workdir), 0,
               "rebooted into the update: the signed prediction unlocks")  # fmt: skip
        expect(cli("reseal"), 0, "first good boot on the update: only it stays signed")
        say(
            """
            The passphrase was typed in a café: change it. The current one is checked against
            this boot's unlock (no TPM try spent); the new one gets a new Argon2id salt, so the
            TPM object's authorization and the LUKS key change too. Every step is journalled:
            a power cut in the middle leaves the old or the new passphrase working, and
            'qubes-seal repair' finishes the job.
            """
        )
        new_pw = workdir / "new-passphrase"
        new_pw.write_text(NEW_PASSPHRASE + "\n")
        expect(cli("rotate", "passphrase", "--passphrase-file", str(pw), "--new-passphrase-file",
                   str(new_pw)), 0, "passphrase changed")  # fmt: skip
        pw.write_text(NEW_PASSPHRASE + "\n")  # from now on the user types the new one
        cli("lock")

        title(6, "the evil maid: Xen replaced while the machine was unattended")
        say(
            """
            Someone with a few minutes alone with the laptop swaps Xen for a version that
            logs your passphrase. One byte is enough: PCR 17 changes, the TPM refuses, no
            proof is shown, so you know not to type your passphrase. The boot offers the
            recovery key instead (here the demo types a wrong one) and never reseals by itself.
            """
        )
        swtpm.reboot()
        evil = list(new)
        xen = new[0]
        evil[0] = Module(xen.name, xen.cmdline, xen.image[:-1] + bytes([xen.image[-1] ^ 1]))
        show_launch(swtpm, evil, log)
        expect(boot(swtpm, container, pw, rk, workdir, recovery="wrong"), 3,
               "refused: measurements do not match")  # fmt: skip

        title(7, "the quiet attack: boot without TXT at all")
        say(
            """
            tboot falls back to a normal, unmeasured boot when TXT fails. Qubes Anti Evil
            Maid then simply shows no secret and carries on; qubes-seal refuses loudly, and
            only the recovery key opens the container (here the demo types the right one).
            """
        )
        swtpm.reboot()
        expect(boot(swtpm, container, pw, rk, workdir), 0,
               "refused by the TPM, opened with the recovery key")  # fmt: skip
        cli("lock")

        title(8, "the encrypted storage pool: each qube's volumes under its own key")
        swtpm.reboot()
        show_launch(swtpm, new, log)
        expect(boot(swtpm, container, pw, rk, workdir), 0, "unlocked at boot")
        failures += storage_pool_step(cli, swtpm, container, pw, rk, workdir, new, log)
    finally:
        swtpm.stop()

    print()
    if failures:
        print(f"demo: {failures} step(s) did not behave as expected")
        return 1
    print("demo: every step behaved as expected")
    return 0


def boot(
    swtpm: Swtpm, container: Path, pw: Path, rk: Path, workdir: Path, *, recovery: str = ""
) -> int:
    """Run the initramfs' boot sequence (python -m qubes_seal.boot) and show its console."""
    console = workdir / "console.log"
    console.unlink(missing_ok=True)
    rfile = rk
    if recovery:
        rfile = workdir / "typed-recovery-key"
        rfile.write_text(recovery + "\n")
    cfg = workdir / "boot.toml"
    cfg.write_text(
        "[boot]\n"
        f'container = "{container}"\n'
        f'tpm = "{swtpm.tcti}"\n'
        f'ask = "file:{pw}"\n'
        f'recovery_ask = "file:{rfile}"\n'
        f'console = "{console}"\n'
        f'keys_dir = "{workdir / "cryptsetup-keys.d"}"\n'
        "tries = 1\n"
    )
    print("$ python3 -m qubes_seal.boot   (what the initramfs runs; the demo types for you)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
    proc = subprocess.run(
        [sys.executable, "-m", "qubes_seal.boot", "--config", str(cfg)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    text = console.read_text() if console.exists() else proc.stderr
    for line in text.rstrip().splitlines():
        print(f"  {line}")
    return proc.returncode


SERVICE = Path(__file__).resolve().parents[2] / "qrexec" / "qubes.SealGetDiskKey"


@contextmanager
def key_service(
    container: Path, workdir: Path, *, show: bool = False, dom0: str = ""
) -> Iterator[Path]:
    """``qubes-seal serve`` for the demo (sys-storage serves work and personal; ``dom0``:
    a qube whose volumes dom0's pool opens), running until the block ends; yields its
    socket."""
    from ..service import client

    config = workdir / "config.toml"
    config.write_text('[storage-domains]\nsys-storage = ["work", "personal"]\n'
                      + (f'[dom0-storage]\ndomains = ["{dom0}"]\n' if dom0 else ""))  # fmt: skip
    sock = workdir / "run" / "keyd.sock"
    if show:
        print(f"$ qubes-seal serve --socket {sock} --config {config} --container {container} &")
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
    with open(workdir / "keyd.log", "ab") as log:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "qubes_seal", "serve", "--socket", str(sock), "--config",
             str(config), "--container", str(container)],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while client.status(sock, timeout=1) is None and time.monotonic() < deadline:
                time.sleep(0.05)
            yield sock
        finally:
            daemon.terminate()
            daemon.wait(timeout=10)


def key_service_step(cli: Cli, container: Path, workdir: Path) -> int:
    """The key service: the storage domain gets its domains' keys; a red domain gets nothing."""
    say(
        """
        The dom0 key service holds the keystore (from the hand-over) and answers qrexec calls.
        Its configuration says which storage domain serves which domains: here sys-storage
        serves 'work' and 'personal'. We call the qrexec service exactly as qrexec would,
        with the caller's name in QREXEC_REMOTE_DOMAIN.
        """
    )
    failures = 0
    with key_service(container, workdir, show=True) as sock:
        for caller, domain, wanted in (
            ("sys-storage", "work", 0),
            ("sys-storage", "personal", 0),
            ("untrusted", "work", 4),
            ("sys-storage", "untrusted", 4),
        ):
            print(f"$ qrexec: {caller} calls qubes.SealGetDiskKey+{domain}")
            proc = subprocess.run(
                [str(SERVICE), domain],
                env={"PATH": "/usr/bin:/bin", "QREXEC_REMOTE_DOMAIN": caller,
                     "QREXEC_SERVICE_ARGUMENT": domain, "QUBES_SEAL_SOCKET": str(sock)},
                input=b"", capture_output=True, timeout=30,
            )  # fmt: skip
            if proc.returncode == 0:
                print(f"  received {len(proc.stdout)} key bytes (piped into cryptsetup by the "
                      "storage agent; not shown)")  # fmt: skip
            else:
                print(f"  {proc.stderr.decode().strip()}")
            print(f"  [exit code {proc.returncode}]")
            verdict = "as expected" if proc.returncode == wanted else "UNEXPECTED"
            what = "key delivered" if wanted == 0 else "refused"
            print(f"  -> {what}: {verdict}")
            failures += proc.returncode != wanted
    return failures


#: A stand-in for qrexec-client-vm in the storage domain: it runs the dom0 service exactly as
#: qrexec runs it (its environment, the caller's name); qrexec's policy is not simulated.
FAKE_QREXEC = """#!{python} -I
import os, sys
full = sys.argv[2]
service, _, arg = full.partition("+")
path = os.path.join({rpc!r}, service)
env = {{"PATH": "/usr/bin:/bin", "QUBES_SEAL_SOCKET": {sock!r},
       "QREXEC_REMOTE_DOMAIN": "sys-storage", "QREXEC_SERVICE_FULL_NAME": full,
       "QREXEC_SERVICE_ARGUMENT": arg}}
os.execve(path, [path, arg], env)
"""
#: A cheap PBKDF for the demo's small volume (a real one keeps cryptsetup's default).
FAST_PBKDF = ["--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000"]


def domain_rotation_step(cli: Cli, container: Path, workdir: Path) -> int:
    """A domain key rotation: dom0 rotates, the storage domain re-keys the volume, dom0
    commits; the volume opens with the new key only."""
    from .. import chain

    say(
        """
        A domain key is rotated in three steps. dom0 makes a new key for 'work' and keeps the
        previous one; the storage domain, which alone holds the volume, adds the new key to
        the volume's LUKS header (authorised by the previous key, which the key service
        still serves while the rotation is pending) and removes the previous one; dom0 then
        destroys the previous key, and re-signs its token so that older copies of the
        container, which still hold it, stop unlocking. Keys travel from the key service to
        cryptsetup through pipes: the storage agent never holds one.
        """
    )
    failures = 0
    volume = workdir / "work-volume.img"
    unlocked = chain.open_handed_over(container)
    if unlocked is None:
        print("  (no hand-over in this boot: step skipped)")
        return 1
    try:
        with open(volume, "wb") as f:
            f.truncate(24 << 20)
        old_key = unlocked.keystore.get("work").key.reveal()
        subprocess.run(
            ["cryptsetup", "luksFormat", "--type", "luks2", "--batch-mode", *FAST_PBKDF,
             "--key-file=-", "--keyfile-size=64", str(volume)],
            input=old_key, check=True, capture_output=True,
        )  # fmt: skip
    finally:
        unlocked.keystore.wipe()
        unlocked.close()
    print(f"  (sys-storage's volume for 'work': {volume.name}, LUKS2, opened by the current key)")
    wanted = cli("domain", "rotate", "work")
    failures += wanted != 0
    print(f"  -> new key, previous kept: {'as expected' if wanted == 0 else 'UNEXPECTED'}")
    fake = workdir / "qrexec-client-vm"
    env = {k: v for k, v in os.environ.items() if not k.startswith("QUBES_SEAL_")}
    with key_service(container, workdir) as sock:
        fake.write_text(FAKE_QREXEC.format(python=sys.executable, rpc=str(SERVICE.parent),
                                           sock=str(sock)))  # fmt: skip
        fake.chmod(0o755)
        print(f"$ (in sys-storage) qubes-seal-storage-agent rekey work --volume {volume.name}")
        proc = subprocess.run(
            [sys.executable, "-m", "qubes_seal.service.agent", "rekey", "work", "--volume",
             str(volume), *FAST_PBKDF],
            env={**env, "QUBES_SEAL_QREXEC_CLIENT": str(fake)}, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
    for line in (proc.stdout + proc.stderr).rstrip().splitlines():
        print(f"  {line}")
    print(f"  [exit code {proc.returncode}]")
    ok = proc.returncode == 0
    print(f"  -> volume re-keyed: {'as expected' if ok else 'UNEXPECTED'}")
    failures += not ok
    wanted = cli("domain", "rotate", "work", "--commit")
    failures += wanted != 0
    print(f"  -> previous key destroyed: {'as expected' if wanted == 0 else 'UNEXPECTED'}")
    test = subprocess.run(
        ["cryptsetup", "open", "--test-passphrase", "--key-file=-", "--keyfile-size=64",
         str(volume)],
        input=old_key, capture_output=True,
    )  # fmt: skip
    ok = test.returncode != 0
    print(f"  -> the old key no longer opens the volume: {'as expected' if ok else 'UNEXPECTED'}")
    return failures + (not ok)


def storage_pool_step(
    cli: Cli, swtpm: Swtpm, container: Path, pw: Path, rk: Path, workdir: Path,
    modules: list[Module], log: Path,
) -> int:  # fmt: skip
    """qubesd's own storage code (qubes-core-admin 4.3.50) drives the ``qubes_seal`` pool."""
    from . import demo_pool

    say(
        """
        In a real dom0, qubesd manages every qube's volumes through storage pool drivers. The
        qubes_seal pool wraps another pool: the inner pool keeps only ciphertext, and each
        qube's volumes are LUKS2 volumes opened with that qube's own key from the key
        service, which exists only after a measured boot and the passphrase. Here
        qubes-core-admin's own Storage code drives it, as qubesd would, over a file-reflink
        pool in the demo's directory.
        """
    )
    failures = 0

    def expect(ok: bool, what: str) -> None:
        nonlocal failures
        print(f"  -> {what}: {'as expected' if ok else 'UNEXPECTED'}")
        failures += not ok

    def lock() -> None:
        cli("lock")

    with key_service(container, workdir, dom0=demo_pool.QUBE) as sock:
        demo_pool.pool_step(sock, workdir, lock, expect)
        if demo_pool.pending():
            say("Unlocked again (a new boot), qvm-remove erases the qube: its key is destroyed.")
            swtpm.reboot()
            show_launch(swtpm, modules, log)
            code = boot(swtpm, container, pw, rk, workdir)
            expect(code == 0, "unlocked at boot")
            demo_pool.remove_step(sock, workdir, expect)
    cli("lock")
    return failures


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
