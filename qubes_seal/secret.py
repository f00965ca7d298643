"""A container for secret bytes that does not leak them by accident."""

from __future__ import annotations

import hmac
import os


class Secret:
    """Secret bytes: redacted repr, one explicit accessor, zeroed by :meth:`wipe`.

    The bytes live in a ``bytearray`` so that :meth:`wipe` can overwrite them.  Copies made by
    callers through :meth:`reveal` are theirs to manage.
    """

    __slots__ = ("_buf",)

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._buf = bytearray(data)

    @classmethod
    def random(cls, size: int = 32) -> Secret:
        """A new secret of ``size`` bytes from the operating system's CSPRNG."""
        return cls(os.urandom(size))  # what secrets.token_bytes does, without importing random

    def reveal(self) -> bytes:
        """The secret bytes. Call this only where the bytes are really consumed."""
        if self._buf is None:
            raise ValueError("secret already wiped")
        return bytes(self._buf)

    def __len__(self) -> int:
        return len(self._buf)

    def __repr__(self) -> str:
        return f"Secret(<{len(self._buf)} bytes redacted>)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(bytes(self._buf), bytes(other._buf))

    def __hash__(self) -> int:  # secrets are not hashable keys
        raise TypeError("Secret is not hashable")

    def wipe(self) -> None:
        """Overwrite the bytes with zeros."""
        for i in range(len(self._buf)):
            self._buf[i] = 0

    def __enter__(self) -> Secret:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()
