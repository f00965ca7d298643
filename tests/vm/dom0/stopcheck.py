"""TEST ONLY: ExecStop of dom0vm-stopcheck.service (tests/vm/test_dom0.py), run at the VM's
orderly shutdown after qubes-seal-keyd.service has stopped (the unit is ordered Before= it).

Prints ``[dom0vm] STOPPED {json}`` on the console: the key service's state and exit, its
runtime directory, and what of the keys is left in the kernel's keyrings (/proc/keys, read
as root: every key root may view) and in /run/cryptsetup-keys.d.
"""

import json
import subprocess
import sys
import traceback
from pathlib import Path


def main():
    res = {}
    try:
        out = subprocess.run(
            ["systemctl", "show", "-p", "ActiveState,SubState,Result,ExecMainStatus,"
             "ExecMainCode", "qubes-seal-keyd.service"],
            capture_output=True, text=True, timeout=30,
        ).stdout  # fmt: skip
        res["keyd"] = dict(line.partition("=")[::2] for line in out.splitlines())
        run = Path("/run/qubes-seal")
        res["runtime_dir"] = sorted(p.name for p in run.iterdir()) if run.is_dir() else None
        keys = Path("/proc/keys").read_text().splitlines()
        res["proc_keys_qubes_seal"] = [line for line in keys if "qubes-seal" in line]
        keyfiles = Path("/run/cryptsetup-keys.d")
        res["cryptsetup_key_files"] = sorted(p.name for p in keyfiles.iterdir()) if (
            keyfiles.is_dir()) else []  # fmt: skip
        res["system_state"] = subprocess.run(["systemctl", "is-system-running"],
                                             capture_output=True, text=True,
                                             timeout=30).stdout.strip()  # fmt: skip
    except BaseException:
        res["error"] = traceback.format_exc()[-2000:]
    with open("/dev/console", "w") as out:
        out.write("[dom0vm] STOPPED " + json.dumps(res, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
