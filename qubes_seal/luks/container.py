"""Our LUKS2 container: made and managed with cryptsetup, read with :mod:`.header`.

Layout (:meth:`Container.format`)
---------------------------------
``luksFormat --type luks2 --cipher aes-xts-plain64 --key-size 512 --sector-size 512
--luks2-metadata-size 64k --luks2-keyslots-size 2m``:

* **aes-xts-plain64, 512-bit key**: AES-256 in XTS mode, the cipher dm-crypt and cryptsetup
  default to, and the one :mod:`.payload` decrypts in user space.
* **512-byte sectors**: the IV is the 512-byte sector number on every kernel and every
  cryptsetup version; the container holds small key files, so 4 KiB sectors would gain nothing.
* **64 KiB per metadata copy** (JSON area 60 KiB instead of the default 12 KiB): our token holds
  a TPM sealed object, its policy and public parameters (a few KiB of base64) and must be
  replaceable by a larger one (token import first, then removal of the old one).
* **2 MiB keyslots area**: one keyslot for a 512-bit volume key is 4000 AF stripes x 64 bytes
  = 258048 bytes, so 2 MiB holds 8 keyslots: the TPM-derived key, the recovery passphrase,
  and room to add the new ones of a rotation before the old ones are killed.  cryptsetup warns
  that the area is "very small"; 8 slots are four times what we keep at rest.
  The data area starts at 3 MiB (2 x 64 KiB + 2 MiB, aligned to 1 MiB by cryptsetup).

Keyslot 0 holds ``key`` (256 random bits, derived from the TPM-sealed secret and the
passphrase): a slow PBKDF adds nothing to 256 bits of entropy, so it is PBKDF2 with the minimum
1000 iterations, as systemd-cryptenroll does for its TPM2 keyslots.  Keyslot 1 holds the
recovery passphrase, typed by a human: Argon2id with the cost given (:class:`PbkdfCost`).

The volume key (:meth:`Container.volume_key`)
--------------------------------------------
Obtained through **libcryptsetup** called with ctypes (``crypt_init``, ``crypt_load``,
``crypt_volume_key_get``, ``crypt_free``): libcryptsetup is the code cryptsetup itself runs, so
the result is the same, but no process is started, no text is parsed, and the key never leaves
our memory (no pipe, no stdout buffer).  When the library cannot be loaded, the fallback is
``cryptsetup luksDump --dump-volume-key --batch-mode --key-file=-``, with the passphrase on
stdin and the key parsed from stdout (a pipe): correct, but slower and the key then passes
through the kernel's pipe buffer and an immutable ``bytes`` object of ours.

Tokens
------
Imported and exported with ``cryptsetup token import/export`` (JSON on stdin / stdout); the
list of tokens is read from the verified header (:func:`.header.read_header`).
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import CorruptState, QubesSealError, UsageError
from ..secret import Secret
from . import _libcryptsetup, cryptsetup
from .header import MAGIC_PRIMARY, Luks2Header, read_header

#: The LUKS2 limits (lib/luks2/luks2.h: LUKS2_KEYSLOTS_MAX, LUKS2_TOKENS_MAX).
KEYSLOTS_MAX = 32
TOKENS_MAX = 32
LABEL_MAX = 47  # 48 bytes with the NUL

METADATA_SIZE = 64 * 1024
KEYSLOTS_SIZE = 2 * 1024 * 1024
#: Header region: 2 x METADATA_SIZE + KEYSLOTS_SIZE, aligned by cryptsetup to 1 MiB.
HEADER_REGION = 3 * 1024 * 1024
MIN_SIZE = HEADER_REGION + 1024 * 1024

#: A key given to a minimal-PBKDF keyslot must be at least this long (256 bits).
RANDOM_KEY_MIN_BYTES = 32


@dataclass(frozen=True, kw_only=True)
class PbkdfCost:
    """The cost of a keyslot's PBKDF, as cryptsetup's ``--pbkdf*`` options express it.

    Give either ``time_ms`` (cryptsetup benchmarks to reach that unlock time, ``--iter-time``)
    or ``iterations`` (forced, ``--pbkdf-force-iterations``: reproducible, and cheap in tests).
    ``memory_kib`` and ``parallelism`` apply to Argon2 only.
    """

    algorithm: Literal["argon2id", "argon2i", "pbkdf2"] = "argon2id"
    time_ms: int | None = None
    iterations: int | None = None
    memory_kib: int = 1024 * 1024
    parallelism: int = 4

    def __post_init__(self) -> None:
        if (self.time_ms is None) == (self.iterations is None):
            raise UsageError("give exactly one of time_ms and iterations for a PBKDF cost")
        if self.time_ms is not None and self.time_ms < 1:
            raise UsageError("the PBKDF time must be at least 1 ms")
        if self.iterations is not None:
            floor = 1000 if self.algorithm == "pbkdf2" else 4
            if self.iterations < floor:
                raise UsageError(f"{self.algorithm} needs at least {floor} iterations")
        if self.algorithm != "pbkdf2":
            if not 32 <= self.memory_kib <= 4 * 1024 * 1024:
                raise UsageError("the Argon2 memory cost must be between 32 KiB and 4 GiB")
            if not 1 <= self.parallelism <= 4:
                raise UsageError("the Argon2 parallelism must be between 1 and 4")

    @classmethod
    def minimal(cls) -> PbkdfCost:
        """PBKDF2 with 1000 iterations: only for keys of 256 random bits (see module doc)."""
        return cls(algorithm="pbkdf2", iterations=1000)

    @property
    def is_minimal(self) -> bool:
        return self.algorithm == "pbkdf2" and self.iterations is not None

    def options(self) -> list[str]:
        """The cryptsetup options that select this cost."""
        opts = [f"--pbkdf={self.algorithm}"]
        if self.iterations is not None:
            opts.append(f"--pbkdf-force-iterations={self.iterations}")
        else:
            opts.append(f"--iter-time={self.time_ms}")
        if self.algorithm != "pbkdf2":
            opts += [f"--pbkdf-memory={self.memory_kib}", f"--pbkdf-parallel={self.parallelism}"]
        return opts


def _has_luks_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(6) == MAGIC_PRIMARY


def _check_slot(slot: int) -> None:
    if not 0 <= slot < KEYSLOTS_MAX:
        raise UsageError(f"keyslot {slot} out of range (0..{KEYSLOTS_MAX - 1})")


class Container:
    """The LUKS2 container at ``path`` (a file or a block device)."""

    def __init__(self, path: Path, *, timeout: float = cryptsetup.DEFAULT_TIMEOUT) -> None:
        self.path = Path(path)
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"Container({str(self.path)!r})"

    # -- creation -------------------------------------------------------------------------

    @classmethod
    def format(
        cls,
        path: Path,
        *,
        size_bytes: int | None,
        key: Secret,
        recovery: Secret,
        recovery_pbkdf: PbkdfCost,
        label: str = "qubes-seal",
        force: bool = False,
        timeout: float = cryptsetup.DEFAULT_TIMEOUT,
    ) -> Container:
        """Create the container: keyslot 0 = ``key`` (minimal PBKDF), 1 = ``recovery``.

        A regular file is created with ``size_bytes`` (sparse, mode 0600).  An existing
        non-empty file, or a block device that already has a LUKS header, is refused unless
        ``force``.  For a block device, ``size_bytes`` must be None or its size.
        """
        path = Path(path)
        if len(key) < RANDOM_KEY_MIN_BYTES:
            raise UsageError(
                f"keyslot 0 uses a minimal PBKDF: its key must be at least "
                f"{RANDOM_KEY_MIN_BYTES} random bytes"
            )
        if not recovery:
            raise UsageError("the recovery passphrase is empty")
        if len(label.encode()) > LABEL_MAX:
            raise UsageError(f"the LUKS2 label is limited to {LABEL_MAX} bytes")
        created = False
        try:
            st = path.stat()
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise QubesSealError(f"cannot inspect {path}: {exc.strerror}") from exc
        if st is not None and stat.S_ISBLK(st.st_mode):
            with open(path, "rb") as f:
                dev_size = f.seek(0, os.SEEK_END)
            if size_bytes is not None and size_bytes != dev_size:
                raise UsageError(f"{path} is a block device of {dev_size} bytes")
            if _has_luks_magic(path) and not force:
                raise UsageError(
                    f"{path} already holds a LUKS header",
                    hint="Formatting destroys it and every key in it; pass force to do so.",
                )
        else:
            if st is not None and not stat.S_ISREG(st.st_mode):
                raise UsageError(f"{path} is neither a regular file nor a block device")
            if st is not None and st.st_size > 0 and not force:
                raise UsageError(
                    f"{path} exists and is not empty",
                    hint="Formatting destroys its content; pass force to do so.",
                )
            if size_bytes is None:
                raise UsageError("give the size of the container file")
            if size_bytes < MIN_SIZE or size_bytes % 512:
                raise UsageError(
                    f"the container size must be a multiple of 512 and at least {MIN_SIZE}"
                )
            try:
                flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | (0 if st else os.O_EXCL)
                fd = os.open(path, flags, 0o600)
                created = st is None
                try:
                    os.ftruncate(fd, 0)
                    os.ftruncate(fd, size_bytes)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise QubesSealError(f"cannot create {path}: {exc.strerror}") from exc
        container = cls(path, timeout=timeout)
        try:
            cryptsetup.run(
                ["luksFormat", str(path)],
                options=[
                    "--type=luks2",
                    "--cipher=aes-xts-plain64",
                    "--key-size=512",
                    "--sector-size=512",
                    f"--luks2-metadata-size={METADATA_SIZE}",
                    f"--luks2-keyslots-size={KEYSLOTS_SIZE}",
                    f"--label={label}",
                    "--key-slot=0",
                    *PbkdfCost.minimal().options(),
                    "--key-file=-",
                ],
                key=key,
                timeout=timeout,
            )
            container.add_key(key, recovery, slot=1, pbkdf=recovery_pbkdf)
        except BaseException:
            if created:
                path.unlink(missing_ok=True)
            raise
        return container

    # -- header ---------------------------------------------------------------------------

    def header(self) -> Luks2Header:
        """The verified header as it is now on disk (read anew at every call)."""
        return read_header(self.path)

    @property
    def uuid(self) -> str:
        return self.header().uuid

    @property
    def label(self) -> str:
        return self.header().label

    @property
    def data_offset(self) -> int:
        """Where the encrypted data area starts, in bytes."""
        return self.header().data_offset

    @property
    def data_size(self) -> int:
        """The size of the encrypted data area, in bytes."""
        return self.header().data_size

    @property
    def sector_size(self) -> int:
        return self.header().sector_size

    @property
    def cipher(self) -> str:
        return self.header().cipher

    def slots(self) -> list[int]:
        """The ids of the keyslots in use, ascending."""
        return sorted(self.header().keyslots)

    # -- keyslots -------------------------------------------------------------------------

    def _key_options(self, slot: int | None) -> list[str]:
        opts = ["--key-file=-"]
        if slot is not None:
            _check_slot(slot)
            opts.append(f"--key-slot={slot}")
        return opts

    def add_key(
        self,
        existing: Secret,
        new: Secret,
        *,
        slot: int | None = None,
        pbkdf: PbkdfCost | None = None,
    ) -> int:
        """Add ``new`` in ``slot`` (default: the lowest free one), unlocking with ``existing``.

        ``pbkdf`` None lets cryptsetup benchmark its default (Argon2id, 2 s).  A minimal PBKDF
        (:meth:`PbkdfCost.minimal`) is accepted only for keys of 32 bytes or more.
        Returns the keyslot used.  Wrong ``existing``: :class:`cryptsetup.WrongKey`.
        """
        if not new:
            raise UsageError("the new key is empty")
        if pbkdf is not None and pbkdf.is_minimal and len(new) < RANDOM_KEY_MIN_BYTES:
            raise UsageError(
                "a minimal PBKDF is only for random keys of at least "
                f"{RANDOM_KEY_MIN_BYTES} bytes, not for passphrases"
            )
        used = set(self.slots())
        if slot is None:
            free = [s for s in range(KEYSLOTS_MAX) if s not in used]
            if not free:
                raise UsageError("every keyslot is in use")
            slot = free[0]
        _check_slot(slot)
        if slot in used:
            raise UsageError(f"keyslot {slot} is already in use")
        options = ["--key-file=-", f"--new-key-slot={slot}"]
        if pbkdf is not None:
            options += pbkdf.options()
        cryptsetup.run(
            ["luksAddKey", str(self.path)],
            options=options,
            key=existing,
            new_key=new,
            timeout=self.timeout,
        )
        return slot

    def kill_slot(self, slot: int, *, existing: Secret) -> None:
        """Wipe keyslot ``slot``; ``existing`` must open another keyslot of the container.

        cryptsetup asks for "any remaining passphrase": the key of the slot being killed is
        refused (:class:`cryptsetup.WrongKey`), so a kill proves that access remains.  The last
        keyslot is never killed (that would destroy the data for good).
        """
        _check_slot(slot)
        used = self.slots()
        if slot not in used:
            raise UsageError(f"keyslot {slot} is not in use")
        if used == [slot]:
            raise UsageError(f"keyslot {slot} is the last one: killing it would lose the data")
        # In batch mode, cryptsetup luksKillSlot checks a key only if one is given: always give.
        cryptsetup.run(
            ["luksKillSlot", str(self.path), str(slot)],
            options=["--key-file=-"],
            key=existing,
            timeout=self.timeout,
        )

    def test_key(self, key: Secret, *, slot: int | None = None) -> bool:
        """True if ``key`` opens the container (keyslot ``slot`` only, if given)."""
        result = cryptsetup.run(
            ["open", "--test-passphrase", str(self.path)],
            options=["--type=luks2", "--disable-external-tokens", *self._key_options(slot)],
            key=key,
            timeout=self.timeout,
            check=False,
        )
        if result.returncode == 0:
            return True
        if result.returncode == 2:
            return False
        raise cryptsetup._error_for("open --test-passphrase", result.returncode, result.stderr)

    # -- the volume key -------------------------------------------------------------------

    def volume_key(
        self,
        key: Secret,
        *,
        backend: Literal["auto", "libcryptsetup", "cli"] = "auto",
    ) -> Secret:
        """The volume key (64 bytes for aes-xts-plain64 with a 512-bit key).

        ``auto`` uses libcryptsetup through ctypes and falls back to the cryptsetup CLI only
        when the library cannot be loaded (module docstring).  Wrong key:
        :class:`cryptsetup.WrongKey` (an ``AuthorizationError``).
        """
        # Fail closed on a damaged header or disagreeing copies, which libcryptsetup would
        # silently repair from the other copy.
        self.header()
        if backend in ("auto", "libcryptsetup"):
            try:
                return _libcryptsetup.volume_key(self.path, key)
            except _libcryptsetup.LibcryptsetupUnavailable:
                if backend == "libcryptsetup":
                    raise
        return self._volume_key_cli(key)

    def _volume_key_cli(self, key: Secret) -> Secret:
        result = cryptsetup.run(
            ["luksDump", "--dump-volume-key", str(self.path)],
            options=["--key-file=-", "--disable-external-tokens"],
            key=key,
            timeout=self.timeout,
        )
        return parse_volume_key_dump(result.stdout)

    # -- tokens ---------------------------------------------------------------------------

    def import_token(
        self, token: dict[str, Any], *, token_id: int | None = None, replace: bool = False
    ) -> int:
        """Import ``token`` (a LUKS2 token object); returns its id.

        Without ``token_id`` the lowest free id is used.  An id in use is refused unless
        ``replace``.
        """
        _validate_token(token)
        tokens = self.header().tokens
        if token_id is None:
            free = [t for t in range(TOKENS_MAX) if t not in tokens]
            if not free:
                raise UsageError("every LUKS2 token id is in use")
            token_id = free[0]
        if not 0 <= token_id < TOKENS_MAX:
            raise UsageError(f"token id {token_id} out of range (0..{TOKENS_MAX - 1})")
        if token_id in tokens and not replace:
            raise UsageError(f"LUKS2 token {token_id} is already in use")
        options = ["--json-file=-", f"--token-id={token_id}"]
        if replace and token_id in tokens:
            options.append("--token-replace")
        cryptsetup.run(
            ["token", "import", str(self.path)],
            options=options,
            stdin=json.dumps(token, separators=(",", ":")).encode("utf-8"),
            timeout=self.timeout,
        )
        return token_id

    def export_token(self, token_id: int) -> dict[str, Any]:
        """The token ``token_id``; :class:`UsageError` if there is none."""
        if not 0 <= token_id < TOKENS_MAX:
            raise UsageError(f"token id {token_id} out of range (0..{TOKENS_MAX - 1})")
        result = cryptsetup.run(
            ["token", "export", str(self.path)],
            options=[f"--token-id={token_id}", "--disable-external-tokens"],
            timeout=self.timeout,
            check=False,
        )
        if result.returncode != 0:
            if token_id not in self.header().tokens:
                raise UsageError(f"the LUKS2 container has no token {token_id}")
            raise cryptsetup._error_for("token export", result.returncode, result.stderr)
        try:
            token = json.loads(result.stdout.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise CorruptState(f"LUKS2 token {token_id} is not valid JSON") from exc
        if not isinstance(token, dict) or not isinstance(token.get("type"), str):
            raise CorruptState(f"LUKS2 token {token_id} has no type")
        return token

    def find_tokens(self, type_: str) -> dict[int, dict[str, Any]]:
        """Every token of type ``type_``, by id (from the verified header)."""
        return {
            tid: tok
            for tid, tok in sorted(self.header().tokens.items())
            if isinstance(tok, dict) and tok.get("type") == type_
        }


def _validate_token(token: object) -> None:
    """Refuse what cryptsetup would refuse, with a message that says why."""
    if not isinstance(token, dict):
        raise UsageError("a LUKS2 token is a JSON object")
    if not isinstance(token.get("type"), str) or not token["type"]:
        raise UsageError("a LUKS2 token needs a non-empty string 'type'")
    slots = token.get("keyslots")
    if not isinstance(slots, list) or not all(isinstance(s, str) and s.isdigit() for s in slots):
        raise UsageError("a LUKS2 token needs 'keyslots': a list of keyslot ids as strings")
    try:
        json.dumps(token, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"the LUKS2 token is not serialisable as JSON: {exc}") from exc


_DUMP_KEY = re.compile(rb"^(?:MK dump|Volume key):(.*)$")
_DUMP_BITS = re.compile(rb"^(?:MK bits|Volume key bits):\s*(\d+)")


def parse_volume_key_dump(stdout: bytes) -> Secret:
    """The key printed by ``cryptsetup luksDump --dump-volume-key`` (hex, over lines)."""
    lines = stdout.splitlines()
    bits = None
    for line in lines:
        m = _DUMP_BITS.match(line)
        if m:
            bits = int(m.group(1))
    hexdigits = bytearray()
    for i, line in enumerate(lines):
        m = _DUMP_KEY.match(line)
        if not m:
            continue
        chunk = [m.group(1)]
        for cont in lines[i + 1 :]:
            if not cont[:1].isspace() or b":" in cont:
                break
            chunk.append(cont)
        for part in chunk:
            hexdigits += bytes(c for c in part if c not in b" \t")
        break
    try:
        key = Secret(bytes.fromhex(hexdigits.decode("ascii")))
    except ValueError as exc:
        raise CorruptState("cannot parse the volume key printed by cryptsetup") from exc
    finally:
        hexdigits[:] = bytes(len(hexdigits))
    if not key or (bits is not None and len(key) * 8 != bits):
        raise CorruptState("cryptsetup printed a volume key of an unexpected size")
    return key
