"""The ``grow`` command: a larger container, the keystore moved to its layout (journalled)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..errors import UsageError

GROW_HELP = """\
Give the keystore more room, crash-safely. The keystore's two copies lie where its own
(authenticated) records say, laid out for the container's size at 'init'; a container
grown or shrunk behind qubes-seal's back is refused (exit 7) until this command adopts
the new size (or the old size is restored).

  a container file:    qubes-seal grow --size 64M     (extends the file, then moves the
                                                       keystore's second copy)
  a logical volume:    lvextend -L 64M VG/LV          (in a boot that unlocked it)
                       qubes-seal grow                (adopts the volume's new size)

Uses this boot's hand-over of the volume key; without one, it unlocks with the
passphrase (only possible before the container changed size) or, with
--recovery-key-file, opens it with the recovery key. Journalled: interrupted, the unlock
still finds every key, and 'qubes-seal grow' or 'qubes-seal repair' finishes it.
A container from before the recorded layout is migrated by 'qubes-seal grow' (no size
change) or by its next keystore write. Shrinking is not supported."""


def register(sub: Any) -> None:
    from .container_cmd import DEFAULT_SIZE, add_unlock_options
    from .main import add_command, add_container_option, env

    p = add_command(sub, "grow", "make the container larger: room for more domain keys",
                    GROW_HELP)  # fmt: skip
    add_container_option(p)
    add_unlock_options(p, kdf=False)
    size = env("QUBES_SEAL_GROW_SIZE", "")
    p.add_argument(
        "--size", default=size or None,
        help="the container file's new total size (e.g. 64M; 'init' made "
        f"{DEFAULT_SIZE} by default); without it, adopt the current size [QUBES_SEAL_GROW_SIZE]",
    )  # fmt: skip
    rk = env("QUBES_SEAL_RECOVERY_KEY_FILE", "")
    p.add_argument(
        "--recovery-key-file", metavar="FILE", type=Path, default=Path(rk) if rk else None,
        help="open the container with the recovery key in FILE when there is no hand-over "
        "(a logical volume grown before this boot's unlock) [QUBES_SEAL_RECOVERY_KEY_FILE]",
    )  # fmt: skip
    p.set_defaults(func=cmd_grow)


def cmd_grow(args: argparse.Namespace) -> int:
    from .. import chain, handover, recovery
    from ..grow import grow
    from ..keystore import ContainerResized
    from ..luks.container import Container
    from ..service import client
    from .container_cmd import _progress, parse_size
    from .main import emit
    from .prompt import ask

    if client.daemon_for(args.container) is not None:
        raise UsageError(
            "the key service is running: 'grow' rewrites the keystore under it",
            hint="Stop the key service (systemctl stop qubes-seal-keyd), grow, start it.",
        )
    size = None if args.size is None else parse_size(args.size)
    container = Container(args.container)
    vk = handover.get(container.uuid, keyring=args.keyring)
    if vk is None and args.recovery_key_file is not None:
        with (
            ask("recovery key", path=args.recovery_key_file) as typed,
            recovery.normalise(typed) as rkey,
        ):
            vk = container.volume_key(rkey)
    if vk is None:
        try:
            unlocked = chain.unlock(
                args.container,
                tcti=args.tpm,
                passphrase=lambda: ask("passphrase", path=args.passphrase_file),
                keyring=args.keyring,
                progress=_progress(args),
            )
        except ContainerResized as exc:
            raise ContainerResized(
                exc.message,
                hint="This boot cannot unlock it: give the recovery key (--recovery-key-file "
                "FILE), or restore the former size, reboot, unlock, then run 'qubes-seal "
                "grow'.",
            ) from exc
        unlocked.keystore.wipe()
        vk = unlocked.volume_key
    with vk:
        result = grow(
            args.container,
            volume_key=vk,
            state_dir=args.state_dir,
            size_bytes=size,
            progress=_progress(args),
        )
    before, after = result.before, result.after
    doc = {
        "grown": bool(result.steps),
        "resumed": result.resumed,
        "steps": result.steps,
        "before": {"payload_size": before.payload_size, "slot_size": before.slot_size},
        "after": {"payload_size": after.payload_size, "slot_size": after.slot_size,
                  "slot_b": after.slot_b},
    }  # fmt: skip
    if not result.steps:
        text = f"nothing to do: the keystore already uses {after.describe()}"
    else:
        text = (
            "finished the interrupted grow: " if result.resumed else "grown: "
        ) + f"the keystore now uses {after.describe()} (before: slots of {before.slot_size} bytes)"
    emit(args, doc, text)
    return 0
