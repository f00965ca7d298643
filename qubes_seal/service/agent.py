"""``qubes-seal-storage-agent``: the storage domain opens and re-keys a domain's volume.

::

    qubes-seal-storage-agent open DOMAIN --volume PATH [--name NAME] [--plain] [--previous]
    qubes-seal-storage-agent close DOMAIN [--name NAME]
    qubes-seal-storage-agent rekey DOMAIN --volume PATH [--pbkdf ...]

``open`` runs ``qrexec-client-vm @adminvm qubes.SealGetDiskKey+DOMAIN`` and connects its
stdout, through a pipe, to the stdin of ``cryptsetup open --key-file=- --keyfile-size=64
PATH NAME``: the 64 key bytes go from qrexec to cryptsetup through the kernel's pipe buffer,
never through this process's memory, never to a file.  ``--plain`` opens a plain dm-crypt
mapping (``--type plain --cipher aes-xts-plain64 --key-size 512``: the key *is* the volume
key) instead of a LUKS volume (the key is its passphrase).  The mapping's name defaults to
``qubes-seal-DOMAIN``.  ``--previous`` opens with the key the domain had before
``qubes-seal domain rotate`` (service ``qubes.SealGetPreviousDiskKey``), while that rotation
is pending: to copy a plain volume to a new one.

``rekey`` moves a LUKS volume from the previous key to the current one after ``qubes-seal
domain rotate DOMAIN`` in dom0: it adds the current key as a new keyslot, authorised by the
previous key (``cryptsetup luksAddKey``), then wipes the previous key's keyslot, authorised
by the current key (``cryptsetup luksKillSlot``: cryptsetup itself checks that the current
key opens a keyslot that remains).  The volume key and the data stay as they are, so the
volume may be open meanwhile; other keyslots are not touched.  Each key comes from its own
``qrexec-client-vm`` through a pipe whose read end cryptsetup gets as ``/dev/fd/N``
(``--key-file=/dev/fd/N --keyfile-size=64``, ``--new-keyfile=/dev/fd/M
--new-keyfile-size=64``): never through this process's memory, argv, environment or a file.
Which keyslot a key opens is asked with ``cryptsetup open --test-passphrase`` (no
device-mapper needed).  Every step is checked first, so ``rekey`` can be run again after an
interruption: a volume that already opens with the current key and not with the previous one
is left as it is (exit 0); one that opens with both (interrupted after the add) only loses
the previous keyslot.  Then dom0 destroys the previous key: ``qubes-seal domain rotate
DOMAIN --commit``.  A plain dm-crypt volume cannot be re-keyed in place (its key is the volume
key, and ``cryptsetup reencrypt`` works on LUKS volumes only): ``rekey --plain`` refuses
(exit 2) and says how to copy it to a new volume instead.

``QUBES_SEAL_QREXEC_CLIENT`` and ``QUBES_SEAL_CRYPTSETUP`` name other programs for the two
(tests use stand-ins).  Exit codes: those of ``qubes.SealGetDiskKey`` (2 bad argument,
3 no key, 4 refused, 5 rate limited, 6 key service unreachable, 7 locked), 4 also when the
qrexec policy denies the call (qrexec-client-vm exits 126), 3 also when ``--previous`` or
``rekey`` needs a previous key and no rotation is pending, 2 also for a volume ``rekey``
cannot re-key (not LUKS, or ``--plain``), 1 when cryptsetup fails or neither key opens the
volume, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Callable, Sequence

from .protocol import (
    CURRENT,
    EXIT_BAD_ARGUMENT,
    EXIT_ERROR,
    EXIT_NO_KEY,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    PREVIOUS,
    PREVIOUS_SERVICE_NAME,
    SERVICE_NAME,
)

PROG = "qubes-seal-storage-agent"
QREXEC_REFUSED = 126  # qrexec-client-vm: the policy denied the call
KEY_BYTES = 64
EXIT_INTERRUPTED = 130
LUKS2_MAX_KEYSLOTS = 32
CRYPTSETUP_BAD_PASSPHRASE = 2  # cryptsetup's exit status: no keyslot opens with this key
CRYPTSETUP_NOT_LUKS = 1  # cryptsetup isLuks: a readable device without a LUKS header

EXIT_MEANING = {
    2: "bad argument",
    3: "no key is stored for this domain",
    4: "refused: this storage domain does not serve that domain",
    5: "rate limited: try again later",
    6: "the dom0 key service is unreachable",
    7: "the dom0 key service is locked (the container was not unlocked in this boot)",
}

SERVICE_OF = {CURRENT: SERVICE_NAME, PREVIOUS: PREVIOUS_SERVICE_NAME}
#: exit statuses of a key request that are an answer (a refusal), not an accident
_SERVICE_EXITS = frozenset(EXIT_MEANING) | {QREXEC_REFUSED}

PLAIN_REFUSAL = (
    "{volume} is a plain dm-crypt volume: it cannot be re-keyed in place. Its key is the "
    "volume key itself, and 'cryptsetup reencrypt' works on LUKS volumes only. Copy it to a "
    "new volume instead, while the rotation is pending: '{prog} open {domain} --plain "
    "--previous --volume {volume} --name old-{domain}' (the previous key), '{prog} open "
    "{domain} --plain --volume NEW' (the current key), copy /dev/mapper/old-{domain} to "
    "/dev/mapper/qubes-seal-{domain}, close both, put NEW in the old volume's place, then in "
    "dom0: qubes-seal domain rotate {domain} --commit (docs/KEYSERVICE.md)"
)


class AgentError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _name_ok(name: str) -> bool:
    from ..keystore.names import name_problem

    return not name_problem(name)


def _tail(data: bytes) -> str:
    text = data.decode(errors="replace").strip()
    return text[-500:]


def _detail(data: bytes) -> str:
    """``": TEXT"`` for the end of a program's message, or nothing when it said nothing."""
    text = _tail(data)
    return f": {text}" if text else ""


def _qrexec() -> str:
    return os.environ.get("QUBES_SEAL_QREXEC_CLIENT", "qrexec-client-vm")


def _cryptsetup() -> str:
    return os.environ.get("QUBES_SEAL_CRYPTSETUP", "cryptsetup")


def _cryptsetup_env() -> dict[str, str]:
    """cryptsetup's environment: this one, with untranslated messages (``Key slot N``)."""
    return {**os.environ, "LC_ALL": "C"}


def _fetch(domain: str, which: str) -> subprocess.Popen[bytes]:
    """``qrexec-client-vm @adminvm SERVICE+DOMAIN``: the key on its stdout (a pipe)."""
    qrexec = _qrexec()
    try:
        return subprocess.Popen(
            [qrexec, "@adminvm", f"{SERVICE_OF[which]}+{domain}"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
    except OSError as exc:
        raise AgentError(f"cannot run {qrexec}: {exc.strerror}", EXIT_UNREACHABLE) from exc


def _fetch_failed(domain: str, which: str, code: int, stderr: bytes) -> AgentError:
    """The error for a key request that exited with ``code``."""
    service = SERVICE_OF[which]
    if code == QREXEC_REFUSED:
        return AgentError(
            f"dom0 refused {service}+{domain}: the qrexec policy denies this call", EXIT_REFUSED
        )
    meaning = EXIT_MEANING.get(code, "the key request failed")
    if which == PREVIOUS and code == EXIT_NO_KEY:
        meaning = "no previous key (is a rotation pending?)"
    detail = _tail(stderr)
    what = "no key" if which == CURRENT else "no previous key"
    return AgentError(
        f"{what} for {domain}: {meaning} (exit {code})" + (f": {detail}" if detail else ""),
        code if code in EXIT_MEANING else EXIT_ERROR,
    )


def _kill_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


def _with_keys(
    domain: str,
    which: Sequence[str],
    command: Callable[[list[str]], list[str]],
    *,
    timeout: float,
) -> subprocess.CompletedProcess[bytes]:
    """Run ``cryptsetup COMMAND`` with the keys ``which`` of ``domain``.

    Each key comes from its own ``qrexec-client-vm`` through a pipe; ``command`` gets the
    pipes' read ends as ``/dev/fd/N`` paths (handed to cryptsetup with ``pass_fds``) and
    returns cryptsetup's arguments.  This process never reads a key byte.  A failed key
    request raises :class:`AgentError` whatever cryptsetup did (a refusal with its own exit
    code; another failure, when cryptsetup failed too, as a cryptsetup error), so that an
    empty pipe is never taken for "this key does not open the volume".  Otherwise
    cryptsetup's own result is returned (its exit status, stdout and stderr; never a key).
    """
    sources: list[subprocess.Popen[bytes]] = []
    try:
        for w in which:
            sources.append(_fetch(domain, w))
    except AgentError:
        _kill_all(sources)
        raise
    fds = []
    for p in sources:
        assert p.stdout is not None
        fds.append(p.stdout.fileno())
    argv = [_cryptsetup(), *command([f"/dev/fd/{fd}" for fd in fds])]
    try:
        sink = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            pass_fds=fds, env=_cryptsetup_env(),
        )  # fmt: skip
    except OSError as exc:
        _kill_all(sources)
        raise AgentError(f"cannot run {argv[0]}: {exc.strerror}", EXIT_ERROR) from exc
    finally:
        for p in sources:
            assert p.stdout is not None
            p.stdout.close()  # the pipes now belong to cryptsetup alone
    try:
        out, err = sink.communicate(timeout=timeout)
        errors = [p.communicate(timeout=timeout)[1] for p in sources]
    except subprocess.TimeoutExpired:
        _kill_all([*sources, sink])
        raise AgentError(f"cryptsetup {argv[1]} did not finish within {timeout:.0f} s (no key "
                         "from dom0?): gave up", EXIT_UNREACHABLE) from None  # fmt: skip
    for w, p, e in zip(which, sources, errors, strict=True):
        if p.returncode == 0:
            continue
        if sink.returncode != 0 and p.returncode not in _SERVICE_EXITS:
            # Not a refusal of the key service: most likely the request lost its reader,
            # cryptsetup having stopped first. Both are said; never "the key does not open".
            raise AgentError(
                f"cryptsetup {argv[1]} failed (exit {sink.returncode}){_detail(err)}; the key "
                f"request {SERVICE_OF[w]}+{domain} ended with exit {p.returncode}",
                EXIT_ERROR,
            )
        raise _fetch_failed(domain, w, p.returncode, e)
    return subprocess.CompletedProcess(argv, sink.returncode, out, err)


# -- open, close -----------------------------------------------------------------------------


def open_volume(
    domain: str,
    volume: str,
    name: str,
    *,
    plain: bool = False,
    which: str = CURRENT,
    timeout: float = 60.0,
) -> None:
    """Open ``volume`` as ``/dev/mapper/NAME`` with ``domain``'s key from dom0 (``which``:
    its current key, or the previous one while a rotation is pending)."""
    cryptsetup = _cryptsetup()
    unlock = [cryptsetup, "open", "--key-file=-", f"--keyfile-size={KEY_BYTES}"]
    if plain:
        unlock += ["--type", "plain", "--cipher", "aes-xts-plain64", "--key-size", "512"]
    unlock += [volume, name]
    source = _fetch(domain, which)
    assert source.stdout is not None
    try:
        sink = subprocess.Popen(unlock, stdin=source.stdout, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)  # fmt: skip
    except OSError as exc:
        _kill_all([source])
        raise AgentError(f"cannot run {cryptsetup}: {exc.strerror}", EXIT_ERROR) from exc
    finally:
        source.stdout.close()  # the pipe now belongs to cryptsetup alone
    try:
        _, sink_err = sink.communicate(timeout=timeout)
        _, source_err = source.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_all([source, sink])
        raise AgentError(f"no key within {timeout:.0f} s: gave up", EXIT_UNREACHABLE) from None
    if source.returncode != 0:
        raise _fetch_failed(domain, which, source.returncode, source_err)
    if sink.returncode != 0:
        raise AgentError(
            f"cryptsetup open {volume} {name} failed (exit {sink.returncode}): {_tail(sink_err)}",
            EXIT_ERROR,
        )


def close_volume(name: str) -> None:
    cryptsetup = _cryptsetup()
    try:
        proc = subprocess.run([cryptsetup, "close", name], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentError(f"cannot run {cryptsetup} close: {exc}", EXIT_ERROR) from exc
    if proc.returncode != 0:
        raise AgentError(f"cryptsetup close {name} failed: {_tail(proc.stderr)}", EXIT_ERROR)


# -- rekey -----------------------------------------------------------------------------------

_SLOT = re.compile(rb"^Key slot (\d+) unlocked", re.MULTILINE)


def _require_luks(volume: str) -> None:
    cryptsetup = _cryptsetup()
    try:
        proc = subprocess.run([cryptsetup, "isLuks", volume], capture_output=True, timeout=60,
                              stdin=subprocess.DEVNULL, env=_cryptsetup_env())  # fmt: skip
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentError(f"cannot run {cryptsetup} isLuks: {exc}", EXIT_ERROR) from exc
    if proc.returncode == CRYPTSETUP_NOT_LUKS:
        raise AgentError(
            f"{volume} is not a LUKS volume: only a LUKS volume can be re-keyed in place (a "
            "plain dm-crypt volume: see 'rekey --plain')",
            EXIT_BAD_ARGUMENT,
        )
    if proc.returncode != 0:
        raise AgentError(
            f"cannot read {volume} (cryptsetup isLuks: exit {proc.returncode})"
            + _detail(proc.stderr),
            EXIT_BAD_ARGUMENT,
        )


def slot_of(domain: str, which: str, volume: str, *, timeout: float = 60.0) -> int | None:
    """The keyslot of ``volume`` that ``domain``'s ``which`` key opens, or None."""

    def test(fd: list[str]) -> list[str]:
        return ["open", "--test-passphrase", "--verbose", f"--key-file={fd[0]}",
                f"--keyfile-size={KEY_BYTES}", volume]  # fmt: skip

    proc = _with_keys(domain, [which], test, timeout=timeout)
    if proc.returncode == CRYPTSETUP_BAD_PASSPHRASE:
        return None
    m = _SLOT.search(proc.stdout)
    if proc.returncode != 0 or m is None:
        raise AgentError(
            f"cryptsetup open --test-passphrase {volume} failed (exit {proc.returncode})"
            + _detail(proc.stderr or proc.stdout),
            EXIT_ERROR,
        )
    return int(m.group(1))


def _next_step(domain: str) -> str:
    return (
        f"next, in dom0: qubes-seal domain rotate {domain} --commit  (add --uuid UUID if "
        f"{domain}'s key is bound to its qube UUID): the previous key is then destroyed"
    )


def rekey_volume(
    domain: str,
    volume: str,
    *,
    pbkdf: Sequence[str] = (),
    timeout: float = 60.0,
    say: Callable[[str], None] = print,
) -> bool:
    """Move the LUKS ``volume`` from ``domain``'s previous key to its current key.

    Returns True when the volume changed, False when there was nothing to do (it already
    opens with the current key and not with the previous one, or no rotation is pending and
    the current key opens it).  ``pbkdf``: cryptsetup options for the new keyslot.
    """
    _require_luks(volume)
    new = slot_of(domain, CURRENT, volume, timeout=timeout)
    try:
        old = slot_of(domain, PREVIOUS, volume, timeout=timeout)
    except AgentError as exc:
        if exc.code == EXIT_NO_KEY and new is not None:
            say(f"{volume} opens with the current key of {domain} (keyslot {new}) and no "
                "rotation is pending: nothing to do")  # fmt: skip
            return False
        if exc.code == EXIT_NO_KEY:
            raise AgentError(
                f"the current key of {domain} does not open {volume}, and there is no "
                f"previous key to re-key it from: {exc}",
                EXIT_NO_KEY,
            ) from None
        raise
    if new is None and old is None:
        raise AgentError(
            f"neither the current nor the previous key of {domain} opens {volume}: is it "
            f"{domain}'s volume?",
            EXIT_ERROR,
        )
    if old is None:
        say(f"{volume} already opens with the current key of {domain} (keyslot {new}) and "
            "not with the previous one: nothing to do")  # fmt: skip
        say(_next_step(domain))
        return False
    if new is None:
        say(f"{volume}: the previous key of {domain} opens keyslot {old}; adding the current "
            "key")  # fmt: skip

        def add(fd: list[str]) -> list[str]:  # fd: the previous key, the current key
            return ["luksAddKey", f"--key-file={fd[0]}", f"--keyfile-size={KEY_BYTES}",
                    f"--new-keyfile={fd[1]}", f"--new-keyfile-size={KEY_BYTES}", *pbkdf,
                    volume]  # fmt: skip

        try:
            proc = _with_keys(domain, [PREVIOUS, CURRENT], add, timeout=timeout)
        except AgentError as exc:
            raise AgentError(f"{exc}; the previous keyslot {old} is kept", exc.code) from None
        if proc.returncode != 0:
            raise AgentError(
                f"cryptsetup luksAddKey {volume} failed (exit {proc.returncode})"
                f"{_detail(proc.stderr)}; the previous keyslot {old} is kept",
                EXIT_ERROR,
            )
        new = slot_of(domain, CURRENT, volume, timeout=timeout)
        if new is None:
            raise AgentError(
                f"the current key of {domain} does not open {volume} after luksAddKey: the "
                f"previous keyslot {old} is kept",
                EXIT_ERROR,
            )
        say(f"{volume}: added the current key of {domain} as keyslot {new}")
    else:
        say(f"{volume} opens with both keys of {domain} (current: keyslot {new}, previous: "
            f"keyslot {old}): removing the previous one")  # fmt: skip
    for _ in range(LUKS2_MAX_KEYSLOTS):
        if old is None:
            break
        if old == new:
            raise AgentError(
                f"the current and the previous key of {domain} open the same keyslot {old} of "
                f"{volume}: refusing to remove it",
                EXIT_ERROR,
            )
        slot = old

        def kill(fd: list[str], slot: int = slot) -> list[str]:  # fd: the current key
            return ["luksKillSlot", f"--key-file={fd[0]}", f"--keyfile-size={KEY_BYTES}",
                    volume, str(slot)]  # fmt: skip

        proc = _with_keys(domain, [CURRENT], kill, timeout=timeout)
        if proc.returncode != 0:
            raise AgentError(
                f"cryptsetup luksKillSlot {volume} {slot} failed (exit {proc.returncode})"
                + _detail(proc.stderr),
                EXIT_ERROR,
            )
        say(f"{volume}: removed keyslot {slot} (the previous key of {domain})")
        old = slot_of(domain, PREVIOUS, volume, timeout=timeout)
    if old is not None:
        raise AgentError(f"the previous key of {domain} still opens {volume}", EXIT_ERROR)
    say(f"re-keyed {volume}: it opens with the current key of {domain} only (keyslot {new})")
    say(_next_step(domain))
    return True


# -- the command line ------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Open, close or re-key a domain's volume in the storage domain, with its "
        "key from dom0 (qrexec: qubes.SealGetDiskKey, qubes.SealGetPreviousDiskKey).",
        epilog="exit codes: 0 ok, 1 error (cryptsetup; rekey: neither key opens the volume), "
        "2 bad argument (rekey: not a LUKS volume, or --plain), 3 no key (--previous, rekey: "
        "no rotation pending), 4 refused (by the key service or the qrexec policy), "
        "5 rate limited, 6 key service unreachable, 7 key service locked, 130 interrupted",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("open", help="fetch DOMAIN's key and open its volume")
    p.add_argument("domain", metavar="DOMAIN", help="the qube whose volume to open")
    p.add_argument("--volume", metavar="PATH", required=True, help="the encrypted volume")
    p.add_argument("--name", help="the mapping's name (default qubes-seal-DOMAIN)")
    p.add_argument("--plain", action="store_true",
                   help="plain dm-crypt (the key is the volume key) instead of LUKS")  # fmt: skip
    p.add_argument("--previous", action="store_true",
                   help="with the key before 'qubes-seal domain rotate', while that rotation "
                   "is pending (to copy a plain volume to a new one)")  # fmt: skip
    p.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    p = sub.add_parser("close", help="close a domain's mapping")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--name", help="the mapping's name (default qubes-seal-DOMAIN)")
    p = sub.add_parser(
        "rekey",
        help="after 'qubes-seal domain rotate DOMAIN' in dom0: move DOMAIN's LUKS volume "
        "from the previous key to the current one",
        description="After 'qubes-seal domain rotate DOMAIN' in dom0: add DOMAIN's current "
        "key to its LUKS volume (authorised by the previous key), then remove the previous "
        "key's keyslot (authorised by the current key). The keys go from qrexec to "
        "cryptsetup through pipes. Safe to run again after an interruption; a volume that "
        "already opens with the current key only is left alone (exit 0). Then, in dom0: "
        "'qubes-seal domain rotate DOMAIN --commit'. The volume key and the data do not "
        "change (the volume may be open meanwhile). A plain dm-crypt volume (--plain) cannot "
        "be re-keyed in place: refused, with how to copy it to a new volume.",
    )
    p.add_argument("domain", metavar="DOMAIN", help="the qube whose volume to re-key")
    p.add_argument("--volume", metavar="PATH", required=True, help="the LUKS volume")
    p.add_argument("--plain", action="store_true",
                   help="the volume is plain dm-crypt: refused (exit 2), see above")  # fmt: skip
    p.add_argument("--pbkdf", choices=("argon2id", "argon2i", "pbkdf2"),
                   help="PBKDF of the new keyslot (default: cryptsetup's). The key is 512 "
                   "random bits: 'pbkdf2 --pbkdf-force-iterations 1000' loses nothing and "
                   "opens fast")  # fmt: skip
    p.add_argument("--pbkdf-force-iterations", type=_positive_int, metavar="N",
                   help="PBKDF iterations of the new keyslot (no benchmark)")  # fmt: skip
    p.add_argument("--pbkdf-memory", type=_positive_int, metavar="KIB",
                   help="argon2 memory of the new keyslot, KiB")  # fmt: skip
    p.add_argument("--iter-time", type=_positive_int, metavar="MS",
                   help="PBKDF time of the new keyslot, milliseconds")  # fmt: skip
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds per cryptsetup step (default 60)")  # fmt: skip
    return parser


def _pbkdf_options(args: argparse.Namespace) -> list[str]:
    opts = []
    for flag, value in (
        ("--pbkdf", args.pbkdf),
        ("--pbkdf-force-iterations", args.pbkdf_force_iterations),
        ("--pbkdf-memory", args.pbkdf_memory),
        ("--iter-time", args.iter_time),
    ):
        if value is not None:
            opts.append(f"{flag}={value}")
    return opts


def _std_fds_open() -> None:
    """Make sure fds 0-2 are open, so that no key pipe is given one of their numbers."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # takes the lowest free number: fd


def main(argv: Sequence[str] | None = None) -> int:
    from ..hardening import no_core_dumps

    no_core_dumps()  # the keys pass through pipes, never this process; still: no core
    args = build_parser().parse_args(argv)
    _std_fds_open()
    try:
        if not _name_ok(args.domain):
            raise AgentError(f"invalid qube name {args.domain!r}", 2)
        name = getattr(args, "name", None) or f"qubes-seal-{args.domain}"
        if args.command == "open":
            which = PREVIOUS if args.previous else CURRENT
            open_volume(args.domain, args.volume, name, plain=args.plain, which=which,
                        timeout=args.timeout)  # fmt: skip
            key = "the previous key" if args.previous else "the key"
            print(f"opened {args.volume} as /dev/mapper/{name} with {key} of {args.domain}")
        elif args.command == "rekey":
            if args.plain:
                raise AgentError(
                    PLAIN_REFUSAL.format(volume=args.volume, domain=args.domain, prog=PROG),
                    EXIT_BAD_ARGUMENT,
                )
            rekey_volume(args.domain, args.volume, pbkdf=_pbkdf_options(args),
                         timeout=args.timeout)  # fmt: skip
        else:
            close_volume(name)
            print(f"closed /dev/mapper/{name}")
    except AgentError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted: run the same command again to finish", file=sys.stderr)
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
