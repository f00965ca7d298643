"""``python3 -m qubes_seal.boot [--config FILE]``: the initramfs unit's entry point."""

import sys

from ..hardening import no_core_dumps

no_core_dumps()  # first, before the passphrase and the keys: a crash leaves no core file
from .sequence import main  # noqa: E402

sys.exit(main())
