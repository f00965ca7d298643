"""The early-boot unlock, as dom0's initramfs runs it (``python3 -m qubes_seal.boot``).

In order, every step failing closed:

1. wait for the TPM and the container's device (udev events, with a timeout; no sleep loop);
2. check that a TXT measured launch happened (PCR 17 not all 0xFF);
3. extend PCR 13 with the container's header digest;
4. unseal and show the proof of a clean boot (text or TOTP code);
5. ask the passphrase (systemd-ask-password: plymouth or the console agent answers);
6. unseal the master secret, derive the LUKS key, open the container, read the keystore;
7. cap PCR 13, so nothing later in this boot can unseal again;
8. hand the volume key over (kernel keyring) and, if configured, write dom0's root volume key
   to ``/run/cryptsetup-keys.d/NAME.key`` for systemd-cryptsetup.

On a failure: a clear message on the console, the recovery-key prompt, never an automatic
reseal.  See docs/BOOT.md.
"""

from .sequence import BootConfig, Console, run

__all__ = ["BootConfig", "Console", "run"]
