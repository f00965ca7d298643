"""``python3 -m qubes_seal.boot [--config FILE]``: the initramfs unit's entry point."""

import sys

from .sequence import main

sys.exit(main())
