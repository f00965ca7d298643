"""The key service command: ``qubes-seal serve`` (the daemon the systemd unit runs)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..service.protocol import DEFAULT_CONFIG, DEFAULT_SOCKET


def register(sub: Any) -> None:
    from .main import add_command, add_container_option, env

    p = add_command(
        sub,
        "serve",
        "run the dom0 key service (disk keys to the storage domains)",
        "Serve per-domain disk keys on a Unix socket to qrexec's qubes.SealGetDiskKey:\n"
        "a key goes only to the storage domain that the configuration names for that\n"
        "domain. The keystore comes from this boot's hand-over (qubes-seal unlock);\n"
        "until then every key request is answered 'locked'. SIGHUP reloads the\n"
        "configuration and the keystore. See docs/KEYSERVICE.md.\n\n"
        "example:  qubes-seal serve --config /etc/qubes-seal/config.toml",
    )
    p.add_argument(
        "--socket", metavar="PATH", type=Path,
        default=Path(env("QUBES_SEAL_SOCKET", DEFAULT_SOCKET)),
        help=f"the socket to listen on (default {DEFAULT_SOCKET}) [QUBES_SEAL_SOCKET]",
    )  # fmt: skip
    p.add_argument(
        "--config", metavar="FILE", type=Path,
        default=Path(env("QUBES_SEAL_CONFIG", DEFAULT_CONFIG)),
        help=f"the configuration (default {DEFAULT_CONFIG}) [QUBES_SEAL_CONFIG]",
    )  # fmt: skip
    add_container_option(p)
    p.add_argument(
        "--keyring", choices=["user", "session"], default=env("QUBES_SEAL_KEYRING", "user"),
        help="the kernel keyring holding the hand-over (default: root's user keyring) "
        "[QUBES_SEAL_KEYRING]",
    )  # fmt: skip
    p.set_defaults(func=cmd_serve)


def cmd_serve(args: argparse.Namespace) -> int:
    from ..service import daemon

    return daemon.serve(
        socket_path=args.socket,
        config_path=args.config,
        container=args.container,
        keyring=args.keyring,
    )
