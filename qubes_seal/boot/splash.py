"""The graphical boot: the boot's messages and prompts on Plymouth's splash when it runs.

Plymouth (``plymouthd``, started by ``plymouth-start.service`` in the initramfs) holds the
screen during a graphical boot: what the boot writes to ``/dev/console`` goes to its log, not
to the user.  When ``plymouth --ping`` answers, :class:`Plymouth` puts each message of the
boot sequence on the splash (``plymouth display-message --text=...``), hides the obsolete ones
(``hide-message``) and, for ``ask = "tty"``, asks through ``plymouth ask-for-password``
(the answer is read from the client's stdout, never passed in argv).  ``ask = "systemd"`` needs
nothing from here: systemd-ask-password's Plymouth agent answers when Plymouth runs.

Every message passes through :func:`splash_messages` first: control characters (an escape
sequence from a hostile header would otherwise reach the terminal of the ``details`` and
``text`` plugins) and bidirectional overrides become ``?``, long lines are wrapped, and the
lines are grouped into splash messages of at most :data:`MAX_MESSAGE_BYTES`, because
Plymouth's protocol carries an argument's length in one byte (the client asserts
``strlen <= 255`` and aborts past it); at most :data:`MAX_TEXT_BYTES` of one text reach the
splash.  See docs/BOOT.md, "The graphical boot".
"""

from __future__ import annotations

import contextlib
import subprocess
import textwrap
import unicodedata

from ..errors import UsageError
from ..secret import Secret

#: Plymouth's boot protocol sends an argument as ``\\002``, one length byte (strlen + 1), the
#: bytes and a NUL: the client asserts ``strlen(argument) <= UCHAR_MAX``, and a length of 255
#: wraps to 0 in the length byte.  250 bytes of UTF-8 leaves a margin.
MAX_MESSAGE_BYTES = 250
#: At most this much of one text goes to the splash (each message is one client call).
MAX_TEXT_BYTES = 1000
#: Lines longer than this are wrapped (at spaces when there are any).
LINE_CHARS = 100
#: Seconds any one plymouth client call may take (a hung daemon must not stall the boot).
CLIENT_TIMEOUT = 5.0
ELLIPSIS = "..."


def _printable(line: str) -> str:
    """Control, format (bidirectional overrides), surrogate, private-use and unassigned
    characters as ``?``; tabs as spaces."""
    return "".join(
        "?" if unicodedata.category(c) in ("Cc", "Cf", "Cs", "Co", "Cn") else c
        for c in line.replace("\t", " ")
    ).rstrip()


def _cut(text: str, limit: int) -> str:
    """``text`` in at most ``limit`` bytes of UTF-8, cut on a character, ending in ``...``."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - len(ELLIPSIS)].decode("utf-8", "ignore").rstrip() + ELLIPSIS


def splash_text(text: str, *, limit: int = MAX_MESSAGE_BYTES) -> str:
    """``text`` as one safe line or message: printable characters and newlines only, at
    most ``limit`` bytes of UTF-8 (cut on a character boundary, ending in ``...``)."""
    clean = "\n".join(_printable(line) for line in text.splitlines()).strip("\n")
    return _cut(clean, limit)


def splash_messages(text: str) -> list[str]:
    """``text`` as the splash messages that carry it: printable (as :func:`splash_text`),
    lines wrapped at :data:`LINE_CHARS`, grouped into messages of at most
    :data:`MAX_MESSAGE_BYTES` each, :data:`MAX_TEXT_BYTES` in all (the rest cut, ``...``)."""
    lines: list[str] = []
    for raw in text.splitlines():
        line = _printable(raw)
        wrapped = textwrap.wrap(line, LINE_CHARS, break_on_hyphens=False) if line else []
        lines.extend(_cut(part, MAX_MESSAGE_BYTES) for part in wrapped or [""])
    while lines and not lines[-1]:
        lines.pop()
    messages: list[str] = []
    budget = MAX_TEXT_BYTES
    for line in lines:
        size = len(line.encode()) + 1
        if size > budget:
            messages.append(ELLIPSIS)
            break
        budget -= size
        if messages and len(messages[-1].encode()) + size <= MAX_MESSAGE_BYTES:
            messages[-1] += "\n" + line
        else:
            messages.append(line)
    return [m for m in messages if m.strip()]


class Plymouth:
    """The ``plymouth`` client of a running ``plymouthd``; see the module docstring.

    A call that fails (the daemon quit, hung or refused) turns the splash off for the rest of
    the boot: the console goes on as without Plymouth.
    """

    def __init__(self, binary: str, *, timeout: float = CLIENT_TIMEOUT) -> None:
        self.binary = binary
        self.timeout = timeout
        self.alive = True
        self.shown: list[str] = []  # messages on the splash now, in order

    @classmethod
    def detect(cls, binary: str | None) -> Plymouth | None:
        """The client ``binary`` when ``plymouth --ping`` says a daemon runs; else None (no
        client in the image, or no daemon: the console as without Plymouth)."""
        if binary is None:
            return None
        found = cls(binary)
        return found if found._call("--ping") else None

    def _call(self, *args: str) -> bool:
        if not self.alive:
            return False
        try:
            proc = subprocess.run(
                [self.binary, *args], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, timeout=self.timeout, check=False,
            )  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            self.alive = False
            return False
        if proc.returncode != 0:
            self.alive = False
        return proc.returncode == 0

    def display(self, text: str) -> None:
        """Put ``text`` (made safe by :func:`splash_messages`) on the splash."""
        for message in splash_messages(text):
            if message not in self.shown and self._call("display-message", f"--text={message}"):
                self.shown.append(message)

    def hide_all(self) -> None:
        """Take every message shown by :meth:`display` off the splash."""
        shown, self.shown = self.shown, []
        for message in shown:
            self._call("hide-message", f"--text={message}")

    def ask_password(self, prompt: str) -> Secret:
        """A secret typed on the splash (``plymouth ask-for-password``): the answer comes on
        the client's stdout, never in argv.  UsageError when the splash cannot ask."""
        if not self.alive:
            raise UsageError("plymouth is not running any more")
        # The details and text plugins add their own colon after the prompt.
        label = splash_text(prompt.rstrip().rstrip(":"))
        try:  # no timeout: the user types
            proc = subprocess.run(
                [self.binary, "ask-for-password", f"--prompt={label}"],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                check=False,
            )  # fmt: skip
        except OSError as exc:
            self.alive = False
            raise UsageError(f"plymouth ask-for-password failed: {exc.strerror}") from None
        answer = bytearray(proc.stdout)
        try:
            if proc.returncode != 0:
                raise UsageError(f"plymouth ask-for-password failed ({proc.returncode})")
            if answer.endswith(b"\n"):
                del answer[-1]
            return Secret(answer)
        finally:
            with contextlib.suppress(ValueError):
                answer[:] = bytes(len(answer))
