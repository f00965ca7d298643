"""``qubes-seal-storage-agent``: the storage domain opens a domain's volume with its key.

::

    qubes-seal-storage-agent open DOMAIN --volume PATH [--name NAME] [--plain]
    qubes-seal-storage-agent close DOMAIN [--name NAME]

``open`` runs ``qrexec-client-vm @adminvm qubes.SealGetDiskKey+DOMAIN`` and connects its
stdout, through a pipe, to the stdin of ``cryptsetup open --key-file=- --keyfile-size=64
PATH NAME``: the 64 key bytes go from qrexec to cryptsetup through the kernel's pipe buffer,
never through this process's memory, never to a file.  ``--plain`` opens a plain dm-crypt
mapping (``--type plain --cipher aes-xts-plain64 --key-size 512``: the key *is* the volume
key) instead of a LUKS volume (the key is its passphrase).  The mapping's name defaults to
``qubes-seal-DOMAIN``.

``QUBES_SEAL_QREXEC_CLIENT`` and ``QUBES_SEAL_CRYPTSETUP`` name other programs for the two
(tests use stand-ins).  Exit codes: those of ``qubes.SealGetDiskKey`` (2 bad argument,
3 no key, 4 refused, 5 rate limited, 6 key service unreachable, 7 locked), 4 also when the
qrexec policy denies the call (qrexec-client-vm exits 126), 1 when cryptsetup fails.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

from .protocol import EXIT_ERROR, EXIT_REFUSED, EXIT_UNREACHABLE, SERVICE_NAME

PROG = "qubes-seal-storage-agent"
QREXEC_REFUSED = 126  # qrexec-client-vm: the policy denied the call
KEY_BYTES = 64

EXIT_MEANING = {
    2: "bad argument",
    3: "no key is stored for this domain",
    4: "refused: this storage domain does not serve that domain",
    5: "rate limited: try again later",
    6: "the dom0 key service is unreachable",
    7: "the dom0 key service is locked (the container was not unlocked in this boot)",
}


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


def open_volume(
    domain: str, volume: str, name: str, *, plain: bool = False, timeout: float = 60.0
) -> None:
    """Open ``volume`` as ``/dev/mapper/NAME`` with ``domain``'s key from dom0."""
    qrexec = os.environ.get("QUBES_SEAL_QREXEC_CLIENT", "qrexec-client-vm")
    cryptsetup = os.environ.get("QUBES_SEAL_CRYPTSETUP", "cryptsetup")
    fetch = [qrexec, "@adminvm", f"{SERVICE_NAME}+{domain}"]
    unlock = [cryptsetup, "open", "--key-file=-", f"--keyfile-size={KEY_BYTES}"]
    if plain:
        unlock += ["--type", "plain", "--cipher", "aes-xts-plain64", "--key-size", "512"]
    unlock += [volume, name]
    try:
        source = subprocess.Popen(fetch, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE)  # fmt: skip
    except OSError as exc:
        raise AgentError(f"cannot run {qrexec}: {exc.strerror}", EXIT_UNREACHABLE) from exc
    assert source.stdout is not None
    try:
        sink = subprocess.Popen(unlock, stdin=source.stdout, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)  # fmt: skip
    except OSError as exc:
        source.kill()
        source.wait()
        raise AgentError(f"cannot run {cryptsetup}: {exc.strerror}", EXIT_ERROR) from exc
    finally:
        source.stdout.close()  # the pipe now belongs to cryptsetup alone
    try:
        _, sink_err = sink.communicate(timeout=timeout)
        _, source_err = source.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for p in (source, sink):
            p.kill()
            p.wait()
        raise AgentError(f"no key within {timeout:.0f} s: gave up", EXIT_UNREACHABLE) from None
    if source.returncode != 0:
        code = source.returncode
        if code == QREXEC_REFUSED:
            raise AgentError(
                f"dom0 refused {SERVICE_NAME}+{domain}: the qrexec policy denies this call",
                EXIT_REFUSED,
            )
        meaning = EXIT_MEANING.get(code, "the key request failed")
        detail = _tail(source_err)
        raise AgentError(
            f"no key for {domain}: {meaning} (exit {code})" + (f": {detail}" if detail else ""),
            code if code in EXIT_MEANING else EXIT_ERROR,
        )
    if sink.returncode != 0:
        raise AgentError(
            f"cryptsetup open {volume} {name} failed (exit {sink.returncode}): {_tail(sink_err)}",
            EXIT_ERROR,
        )


def close_volume(name: str) -> None:
    cryptsetup = os.environ.get("QUBES_SEAL_CRYPTSETUP", "cryptsetup")
    try:
        proc = subprocess.run([cryptsetup, "close", name], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentError(f"cannot run {cryptsetup} close: {exc}", EXIT_ERROR) from exc
    if proc.returncode != 0:
        raise AgentError(f"cryptsetup close {name} failed: {_tail(proc.stderr)}", EXIT_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Open a domain's volume in the storage domain with its key from dom0.",
        epilog="exit codes: 0 ok, 1 error (cryptsetup), 2 bad argument, 3 no key, 4 refused, "
        "5 rate limited, 6 key service unreachable, 7 key service locked",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = sub.add_parser("open", help="fetch DOMAIN's key and open its volume")
    p.add_argument("domain", metavar="DOMAIN", help="the qube whose volume to open")
    p.add_argument("--volume", metavar="PATH", required=True, help="the encrypted volume")
    p.add_argument("--name", help="the mapping's name (default qubes-seal-DOMAIN)")
    p.add_argument("--plain", action="store_true",
                   help="plain dm-crypt (the key is the volume key) instead of LUKS")  # fmt: skip
    p.add_argument("--timeout", type=float, default=60.0, help="seconds (default 60)")
    p = sub.add_parser("close", help="close a domain's mapping")
    p.add_argument("domain", metavar="DOMAIN")
    p.add_argument("--name", help="the mapping's name (default qubes-seal-DOMAIN)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not _name_ok(args.domain):
            raise AgentError(f"invalid qube name {args.domain!r}", 2)
        name = args.name or f"qubes-seal-{args.domain}"
        if args.command == "open":
            open_volume(args.domain, args.volume, name, plain=args.plain, timeout=args.timeout)
            print(f"opened {args.volume} as /dev/mapper/{name}")
        else:
            close_volume(name)
            print(f"closed /dev/mapper/{name}")
    except AgentError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
