"""dom0's launch policy: which PCRs an accepted boot is signed over, and that a measured
launch is required.  It comes from dom0's configuration and defaults, never from the token
(an evil maid can rewrite the token: cutting its selection to ``[13]`` or flipping a
``require_launch`` flag there changes nothing any more).

``/etc/qubes-seal/launch.toml`` (optional; ``QUBES_SEAL_LAUNCH_CONFIG`` names another)::

    # PCRs every accepted boot state is signed over (SHA-256 bank).  17 and 18 (tboot's
    # details and authorities PCRs: SINIT, tboot, Xen, dom0) are required; 13 (the
    # container's header) is strongly recommended.  More may be added (19...).
    pcrs = [13, 17, 18]

Weakening it takes a flag on the command line, never a file or a token: a selection without
PCR 17 and 18 needs ``--unsafe-pcr-selection``; signing or sealing a boot without a measured
launch (PCR 17 all 0xFF or all zero) needs ``--unsafe-no-measured-launch``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import CorruptState, NoMeasuredLaunch, UsageError
from .state import PcrState

DEFAULT_CONFIG = Path("/etc/qubes-seal/launch.toml")
DEFAULT_PCRS = (13, 17, 18)
#: tboot's DRTM PCRs under the details/authorities mapping (TBOOT-TXT.md): without both, a
#: boot with another Xen, dom0 kernel or no launch at all could match.
REQUIRED = (17, 18)
DRTM_PCR = 17
BANK = "sha256"


def no_launch(value: bytes) -> bool:
    """PCR 17 as it is without a measured launch: all 0xFF, its power-on value, which only
    a dynamic launch resets (TBOOT-TXT.md); all zero, a value no launch leaves either."""
    return value in (b"\xff" * len(value), bytes(len(value)))


@dataclass(frozen=True)
class LaunchPolicy:
    """What dom0 accepts to sign or seal."""

    pcrs: tuple[int, ...] = DEFAULT_PCRS
    require_launch: bool = True
    unsafe_selection: bool = False
    bank: str = BANK

    def check_selection(self, pcrs: Iterable[int]) -> list[int]:
        """``pcrs`` sorted; refused without 17 and 18 unless ``--unsafe-pcr-selection``."""
        chosen = sorted(set(pcrs))
        missing = [p for p in REQUIRED if p not in chosen]
        if missing and not self.unsafe_selection:
            raise UsageError(
                f"refusing a PCR selection without PCR {', '.join(map(str, missing))}: "
                "tboot's measurements (SINIT, tboot, Xen, dom0) would not be checked, so "
                "another kernel or a boot without any measured launch could unseal",
                hint="Keep 17 and 18 in the selection (default 13,17,18); only a test setup "
                "may pass --unsafe-pcr-selection.",
            )
        return chosen

    def check_states(self, states: Sequence[PcrState]) -> None:
        """Refuse any state that describes a boot without a measured launch."""
        if not self.require_launch:
            return
        for s in states:
            value = s.values.get(DRTM_PCR)
            if value is not None and no_launch(value):
                raise NoMeasuredLaunch(
                    f"refusing to sign the boot state {s.label!r}: its PCR 17 is "
                    f"{value[:4].hex()}…, a boot without a TXT measured launch"
                )

    def check_kept_states(self, pcrs: Sequence[int], states: Sequence[PcrState]) -> None:
        """States kept from the (authenticated) token, to be signed again: they must cover
        dom0's selection and describe measured launches."""
        if sorted(pcrs) != self.selection:
            raise UsageError(
                f"the token's states cover PCR {sorted(pcrs)}, dom0's launch policy selects "
                f"{self.selection}: they cannot simply be signed again",
                hint="Run 'qubes-seal reseal' first (this boot's measurements, dom0's selection).",
            )
        self.check_states(states)

    @property
    def selection(self) -> list[int]:
        """The selection every accepted state is signed over (dom0's, checked)."""
        return self.check_selection(self.pcrs)


def load(
    path: Path | None = None,
    *,
    unsafe_no_measured_launch: bool = False,
    unsafe_pcr_selection: bool = False,
) -> LaunchPolicy:
    """dom0's launch policy: the configuration file if present, else the defaults; the
    ``unsafe_*`` arguments come from command-line flags only."""
    if path is None:
        path = Path(os.environ.get("QUBES_SEAL_LAUNCH_CONFIG") or DEFAULT_CONFIG)
    pcrs: tuple[int, ...] = DEFAULT_PCRS
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = None
    except OSError as exc:
        raise CorruptState(f"cannot read the launch policy {path}: {exc.strerror}") from exc
    if data is not None:
        import tomllib

        try:
            doc = tomllib.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise UsageError(f"{path}: not valid TOML ({exc})") from exc
        unknown = sorted(set(doc) - {"pcrs"})
        if unknown:
            raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)} (known: pcrs)")
        value = doc.get("pcrs", list(DEFAULT_PCRS))
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(p, int) and not isinstance(p, bool) for p in value)
            or not all(0 <= p <= 23 for p in value)
        ):
            raise UsageError(f"{path}: 'pcrs' must be a list of PCR numbers 0-23")
        pcrs = tuple(sorted(set(value)))
    policy = LaunchPolicy(
        pcrs=pcrs,
        require_launch=not unsafe_no_measured_launch,
        unsafe_selection=unsafe_pcr_selection,
    )
    policy.check_selection(pcrs)
    return policy
