"""``systemctl reload qubes-seal-keyd`` keeps the service group's access to the socket.

systemd resets the owner of ``RuntimeDirectory=`` and its contents to the unit's user and
group (root:root) each time it spawns one of the unit's commands, ``ExecReload=`` included.
In the VM (tests/vm/test_dom0.py) dom0's qrexec service user was refused the socket
(EACCES, exit 6: "key service unreachable") after a reload, until the daemon restarted.
The daemon now gives the socket back to its group on a reload.
"""

from __future__ import annotations

import grp
import os
import threading
import time
from pathlib import Path

import pytest

from qubes_seal.service import config as config_mod
from qubes_seal.service.daemon import KeyService, Server

CONFIG = '[storage-domains]\nsys-storage = ["work"]\n\n[service]\ngroup = "{group}"\n'


def test_reload_gives_the_socket_back_to_its_group(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown the socket")
    group = grp.getgrgid(100).gr_name  # "users": any group but root's
    cfg_path = tmp_path / "config.toml"
    cfg_path.write_text(CONFIG.format(group=group))
    service = KeyService(config_mod.load(cfg_path), container=tmp_path / "absent.luks",
                         config_path=cfg_path)  # fmt: skip
    sock = tmp_path / "run" / "keyd.sock"
    server = Server(service, sock)
    server.bind()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert os.stat(sock).st_gid == 100 and os.stat(sock).st_mode & 0o777 == 0o660
        # What systemd does to RuntimeDirectory= before it runs ExecReload=/bin/kill -HUP.
        os.chown(sock, 0, 0)
        server.request_reload()  # the SIGHUP handler's call
        deadline = time.monotonic() + 10
        while os.stat(sock).st_gid != 100:
            assert time.monotonic() < deadline, "the socket stayed root:root after the reload"
            time.sleep(0.05)
        assert os.stat(sock).st_mode & 0o777 == 0o660
    finally:
        server.stop()
        thread.join(10)
    assert not thread.is_alive()
