"""The recovery key: a plain LUKS passphrase that stock cryptsetup accepts.

192 random bits, written as 8 groups of 6 characters from the "modhex" alphabet
(``cbdefghijklnrtuv``: 16 letters, 4 bits each, chosen to read the same on every keyboard
layout, as systemd-cryptenroll's recovery keys do)::

    fkdvhu-ricgtj-...-nlbcre      (8 groups, 55 characters with the dashes)

The exact string, dashes included, is the LUKS passphrase of the recovery keyslot: a user can
rescue the data with ``cryptsetup open`` alone if qubes-seal is gone.  What a user types is
normalised (case, spaces, missing dashes) before use.
"""

from __future__ import annotations

import secrets

from .errors import UsageError
from .secret import Secret

ALPHABET = "cbdefghijklnrtuv"
GROUPS = 8
GROUP_LEN = 6
BITS = GROUPS * GROUP_LEN * 4  # 192


def generate() -> Secret:
    """A new recovery key (the formatted string, as bytes)."""
    chars = [ALPHABET[secrets.randbelow(16)] for _ in range(GROUPS * GROUP_LEN)]
    groups = ["".join(chars[i : i + GROUP_LEN]) for i in range(0, len(chars), GROUP_LEN)]
    return Secret("-".join(groups).encode())


def normalise(typed: Secret) -> Secret:
    """The recovery key as stored, from what a user typed; a clear error for a malformed one."""
    text = typed.reveal().decode("utf-8", "replace").strip().lower()
    compact = "".join(c for c in text if c not in " -\t\r\n")
    if len(compact) != GROUPS * GROUP_LEN or any(c not in ALPHABET for c in compact):
        raise UsageError(
            f"this is not a recovery key: it has {GROUPS} groups of {GROUP_LEN} letters "
            f"from '{ALPHABET}'",
            hint="Type it as shown at 'qubes-seal init', dashes optional.",
        )
    return Secret(
        "-".join(compact[i : i + GROUP_LEN] for i in range(0, len(compact), GROUP_LEN)).encode()
    )
