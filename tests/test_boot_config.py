"""boot.toml is typed: every key's TOML type and range is checked, unknown keys refused.

The attack run found that ``unsafe_test_mode = "false"`` (a quoted string) counted as true;
these tests write each wrong type and check the refusal names the key and the type.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from qubes_seal.boot.sequence import CONFIG_KEYS, BootConfig
from qubes_seal.errors import UsageError


@pytest.fixture(autouse=True)
def _no_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in CONFIG_KEYS:
        monkeypatch.delenv(f"QUBES_SEAL_BOOT_{name.upper()}", raising=False)


def load(tmp_path: Path, body: str) -> BootConfig:
    path = tmp_path / "boot.toml"
    path.write_text("[boot]\n" + body + "\n")
    return BootConfig.load(path)


def test_defaults_and_a_full_valid_file(tmp_path: Path) -> None:
    assert BootConfig.load(tmp_path / "absent.toml") == BootConfig()
    cfg = load(
        tmp_path,
        'container = "/dev/sda3"\ntpm = "device:/dev/tpmrm0"\nkeyring = "session"\n'
        'timeout = 30\ntries = 5\nask = "systemd"\nbackend = "userspace"\n'
        'recovery_ask = "tty"\nunsafe_no_measured_launch = false\nunsafe_test_mode = false\n'
        'keys_dir = "/run/k"\nconsole = "/dev/console"',
    )
    assert cfg.timeout == 30.0 and isinstance(cfg.timeout, float)  # an integer is a number
    assert (cfg.tries, cfg.keyring, cfg.backend) == (5, "session", "userspace")
    assert cfg.unsafe_test_mode is False


# One wrong value per key and per kind of mistake: (line, key, expected type in the message).
WRONG = [
    ('unsafe_test_mode = "false"', "unsafe_test_mode", "a boolean"),  # the attack run's case
    ('unsafe_no_measured_launch = "true"', "unsafe_no_measured_launch", "a boolean"),
    ("unsafe_test_mode = 0", "unsafe_test_mode", "a boolean"),
    ("unsafe_test_mode = 1", "unsafe_test_mode", "a boolean"),
    ('tries = "3"', "tries", "an integer"),
    ("tries = 3.0", "tries", "an integer"),
    ("tries = true", "tries", "an integer"),
    ('timeout = "30"', "timeout", "a number"),
    ("timeout = true", "timeout", "a number"),
    ("timeout = [30]", "timeout", "a number"),
    ("container = 7", "container", "a string"),
    ("container = true", "container", "a string"),
    ('tpm = ["device:/dev/tpmrm0"]', "tpm", "a string"),
    ("keyring = 1", "keyring", "a string"),
    ("ask = false", "ask", "a string"),
    ("backend = {}", "backend", "a string"),
    ("recovery_ask = 1.5", "recovery_ask", "a string"),
    ("keys_dir = 2024-01-01", "keys_dir", "a string"),  # a TOML date
    ("console = 0", "console", "a string"),
    ("txt_mem = false", "txt_mem", "a string"),
    ('txt_log = ["/run/qubes-seal/txt-event.log"]', "txt_log", "a string"),
    ("cmdline_file = false", "cmdline_file", "a string"),
]


@pytest.mark.parametrize(("line", "key", "expected"), WRONG)
def test_each_wrong_type_is_refused_naming_key_and_type(
    tmp_path: Path, line: str, key: str, expected: str
) -> None:
    with pytest.raises(UsageError) as info:
        load(tmp_path, line)
    assert f"{key} must be {expected}" in info.value.message


def test_every_key_is_typed_and_has_a_wrong_type_test() -> None:
    assert set(CONFIG_KEYS) == {f.name for f in fields(BootConfig)}
    assert {key for _, key, _ in WRONG} == set(CONFIG_KEYS)
    for f in fields(BootConfig):  # the defaults have the declared types
        assert type(getattr(BootConfig(), f.name)) is CONFIG_KEYS[f.name][0], f.name


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("tries = 0", "tries must be from 1 to 100"),
        ("tries = -1", "tries must be from 1 to 100"),
        ("tries = 101", "tries must be from 1 to 100"),
        ("timeout = 0", "timeout must be from"),
        ("timeout = -5.0", "timeout must be from"),
        ("timeout = inf", "timeout must be from"),
        ("timeout = nan", "timeout must be from"),
        ('backend = "dmcrypt"', "backend must be one of auto, dm-crypt, userspace"),
        ('keyring = "none"', "keyring must be one of user, session"),
        ('container = "/dev/sda\\u0000"', "NUL"),
    ],
)
def test_out_of_range_values_are_refused(tmp_path: Path, line: str, words: str) -> None:
    with pytest.raises(UsageError, match=words):
        load(tmp_path, line)


def test_unknown_keys_and_a_non_table_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"unknown setting\(s\) \['unsafe_mode'\]"):
        load(tmp_path, "unsafe_mode = true")
    path = tmp_path / "b.toml"
    path.write_text('boot = "yes"\n')
    with pytest.raises(UsageError, match="must be a table"):
        BootConfig.load(path)


def test_environment_overrides_are_checked_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("QUBES_SEAL_BOOT_TRIES", "many")
    with pytest.raises(UsageError, match="QUBES_SEAL_BOOT_TRIES"):
        load(tmp_path, "")
    monkeypatch.setenv("QUBES_SEAL_BOOT_TRIES", "0")
    with pytest.raises(UsageError, match="tries must be from 1"):
        load(tmp_path, "")
    monkeypatch.setenv("QUBES_SEAL_BOOT_TRIES", "2")
    assert load(tmp_path, "").tries == 2


def test_the_boot_refuses_a_quoted_false_before_doing_anything(tmp_path: Path) -> None:
    # End to end: the initramfs entry point exits 1 with the message on stderr; with the old
    # loader this file enabled the unsafe test mode (a non-empty string is true).
    path = tmp_path / "boot.toml"
    path.write_text(
        '[boot]\nunsafe_test_mode = "false"\nunsafe_no_measured_launch = "false"\n'
        f'container = "{tmp_path / "none"}"\ntimeout = 0.1\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "qubes_seal.boot", "--config", str(path)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "unsafe_test_mode must be a boolean (true or false, unquoted), not str" in proc.stderr
    assert "Traceback" not in proc.stderr
