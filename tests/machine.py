"""One simulated machine for the container tests: a swtpm, a state dir, a container, the
passphrase and recovery key files, and the CLI run on them (the ``box`` fixture of conftest
gives one, initialised)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from cli_util import Result, run

from qubes_seal.sim.swtpm import Swtpm
from qubes_seal.sim.txt_launch import sample_modules, txt_launch

PASSPHRASE = "correct horse battery staple"
U1 = "6f1b0b3a-1111-4c4c-9d9d-000000000001"
U2 = "6f1b0b3a-2222-4c4c-9d9d-000000000002"
CHEAP_KDF = ["--kdf-memory", "8192", "--kdf-time", "20"]


@dataclass
class Box:
    """One machine: a swtpm, a state dir, a container, the passphrase and recovery key files."""

    swtpm: Swtpm
    dir: Path

    @property
    def container(self) -> Path:
        return self.dir / "keys.luks"

    @property
    def pw(self) -> Path:
        return self.dir / "passphrase"

    @property
    def rk(self) -> Path:
        return self.dir / "recovery-key"

    def cli(self, *args: str, pw: Path | None = None) -> Result:
        extra = ["--container", str(self.container)]
        if pw is not None:
            extra += ["--passphrase-file", str(pw)]
        return run(self.swtpm.tcti, self.dir / "state", *args, *extra)

    def boot(self, **changes: str) -> None:
        """A reboot: the TPM restarts, a new launch, and root's keyring starts empty (this
        boot's hand-over is gone, as a real reboot clears the kernel keyring)."""
        if self.container.exists():
            from qubes_seal import chain
            from qubes_seal.errors import QubesSealError

            with contextlib.suppress(QubesSealError):  # a test may have broken the header
                chain.lock(self.container)
        self.swtpm.reboot()
        txt_launch(self.swtpm, sample_modules(**changes))

    def unlock(self, pw: Path | None = None) -> Result:
        return self.cli("unlock", "--json", pw=pw or self.pw)


def initialised(swtpm: Swtpm, directory: Path) -> Box:
    """A measured launch, then ``init`` with a cheap KDF and a recovery key file."""
    b = Box(swtpm, directory)
    b.pw.write_text(PASSPHRASE + "\n")
    txt_launch(swtpm, sample_modules())
    res = b.cli("init", *CHEAP_KDF, "--recovery-key-file", str(b.rk), pw=b.pw)
    assert res.code == 0, res.err
    return b
