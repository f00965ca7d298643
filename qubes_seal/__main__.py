"""``python -m qubes_seal``: the same as the ``qubes-seal`` command."""

import sys

from .cli.main import main

sys.exit(main())
