"""``python3 -m qubes_seal.qubes_pool rekey QUBE --uuid UUID --volume PATH``: dom0's re-key.

After ``qubes-seal domain rotate QUBE --uuid UUID`` (a new key, the previous one kept), the
pool driver re-keys each of the qube's origin volumes at its next start.  This command does
the same for one inner volume of a halted qube (its file or block device, e.g.
``/var/lib/qubes/appvms/work/private.img`` under file-reflink), with the keys of the running
key service (asked as ``dom0``, root only): a keyslot for the current key added, the previous
key's keyslot killed, each key on a pipe (``/dev/fd/N``).  It can be run again after an
interruption (decided from the header: which keyslot each key opens).  Each volume it
re-keys is recorded in the keystore as on the current key (found by its LUKS2 UUID:
:mod:`qubes_seal.keystore.volumes`).  Then ``qubes-seal domain rotate QUBE --uuid UUID
--commit`` destroys the previous key; it is refused while a volume is recorded on the
previous key.  Exit codes: 0 done (or
nothing to do), 1 error, 2 usage.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from ..errors import QubesSealError
from ..service.protocol import DEFAULT_SOCKET
from .pool import CALLER, PoolError, rekey_path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python3 -m qubes_seal.qubes_pool",
        description="Re-key a qubes_seal pool volume from the qube's previous key to its "
        "current one, after 'qubes-seal domain rotate QUBE' (dom0, root).",
        epilog="example: python3 -m qubes_seal.qubes_pool rekey work --uuid 6f1b... "
        "--volume /var/lib/qubes/appvms/work/private.img",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("rekey", help="add the current key, remove the previous key's keyslot")
    p.add_argument("qube", help="the qube whose key was rotated (a template: its root too)")
    p.add_argument("--uuid", required=True, help="the qube's UUID (qvm-prefs QUBE uuid)")
    p.add_argument("--volume", required=True, action="append", type=Path,
                   help="an inner volume (file or block device) of the halted qube; "
                   "repeat for each")  # fmt: skip
    p.add_argument("--socket", type=Path, default=Path(DEFAULT_SOCKET),
                   help=f"the key service's socket (default {DEFAULT_SOCKET})")  # fmt: skip
    args = parser.parse_args(argv)
    return asyncio.run(_rekey(args))


async def _rekey(args: argparse.Namespace) -> int:
    from ..service import client

    try:
        found = await asyncio.to_thread(
            client.get_key_answer, args.socket, args.qube, caller=CALLER, qube_uuid=args.uuid
        )
    except (client.ServiceRefused, client.ServiceUnreachable) as exc:
        print(f"error: the current key of {args.qube}: {exc.message}", file=sys.stderr)
        return 1
    current = found.key
    try:
        if not found.rotation_pending:
            print(f"no rotation of {args.qube} is pending: nothing to do")
            return 0
        try:
            previous, _ = await asyncio.to_thread(
                client.get_key_info, args.socket, args.qube, caller=CALLER,
                qube_uuid=args.uuid, which="previous",
            )  # fmt: skip
        except (client.ServiceRefused, client.ServiceUnreachable) as exc:
            print(f"error: the previous key of {args.qube}: {exc.message}", file=sys.stderr)
            return 1
        try:
            for volume in args.volume:
                changed = await rekey_path(str(volume), previous=previous, current=current,
                                           where=args.qube)  # fmt: skip
                print(f"{volume}: " + ("re-keyed: it opens with the current key only"
                                       if changed else "already opens with the current key "
                                       "only: nothing to do"))  # fmt: skip
                print(await _record(args, volume, found.key_id))
        except PoolError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            previous.wipe()
    finally:
        current.wipe()
    print(f"next: qubes-seal domain rotate {args.qube} --uuid {args.uuid} --commit (once every "
          f"volume of {args.qube} is re-keyed: the previous key is then destroyed)")  # fmt: skip
    return 0


async def _record(args: argparse.Namespace, volume: Path, key_id: str) -> str:
    """Tell the key service that ``volume`` now opens with the current key (the record
    ``domain rotate --commit`` checks: :mod:`qubes_seal.keystore.volumes`); what came of it."""
    from ..luks.header import read_header
    from ..service import client

    try:
        luks_uuid = (await asyncio.to_thread(read_header, volume)).uuid
        answer = await asyncio.to_thread(
            client.note_volume, args.socket, args.qube, qube_uuid=args.uuid, volume=None,
            luks_uuid=luks_uuid, key_id=key_id,
        )  # fmt: skip
    except (QubesSealError, OSError) as exc:
        return f"{volume}: not recorded as re-keyed ({exc}): the commit may refuse"
    if answer.get("volume") is None:
        return (f"{volume}: no pool volume of {args.qube} has LUKS2 UUID {luks_uuid} on "
                "record (recorded at the qube's next start)")  # fmt: skip
    return f"{volume}: recorded as {args.qube}'s volume {answer['volume']}, on the current key"


if __name__ == "__main__":
    sys.exit(main())
