"""Hand-over keys that outlive their use (issue 13), with the real kernel keyring.

An attack run found 15 ``qubes-seal:vk:*`` / ``rs:*`` keys in root's user keyring, left by
unlocks that never locked; an ``rs`` key (master secret and authValue) lets any root process
guess the passphrase offline.  Now the reseal bundle expires (``KEYCTL_SET_TIMEOUT``, 15
minutes by default, ``QUBES_SEAL_HANDOVER_RS_LIFETIME``), ``qubes-seal status`` marks the
keys of other containers and expired ones STALE, and ``qubes-seal lock --stale`` drops them.

Root's user keyring is shared by every root process of this machine (other tests included),
so each test here joins a new anonymous session keyring, which its children inherit, and
uses ``--keyring session``: what it adds and drops is its own.
"""

from __future__ import annotations

import ctypes
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_util import Result, run
from machine import Box

from qubes_seal import handover
from qubes_seal.luks.container import Container
from qubes_seal.secret import Secret

KEYCTL_JOIN_SESSION_KEYRING = 1
KEYCTL_LINK = 8


def new_session_keyring() -> None:
    """Join a new anonymous session keyring, with root's user keyring linked into it as in
    the default (user-session) keyring: through that link this process and its children
    still *possess* the user keyring's keys, which updating or re-permitting a hand-over
    there needs (the other tests of this process use it)."""
    _, keyctl = handover._syscalls()
    handover._call(keyctl, KEYCTL_JOIN_SESSION_KEYRING, ctypes.c_char_p(None))
    handover._call(keyctl, KEYCTL_LINK, ctypes.c_long(handover.KEY_SPEC_USER_KEYRING),
                   ctypes.c_long(handover.KEY_SPEC_SESSION_KEYRING))  # fmt: skip


@pytest.fixture
def own_session_keyring() -> Iterator[None]:
    """A new session keyring for this process and the commands it starts, with no
    hand-over key in it; another new one afterwards (what this test left is dropped)."""
    new_session_keyring()
    assert handover.listing("session") == []
    yield
    new_session_keyring()


def leave(container_uuid: str, kind: str) -> None:
    handover.put(container_uuid, Secret(b"\x01" * 64), keyring="session", kind=kind)


def seconds_left(container_uuid: str, kind: str) -> str:
    [key] = [
        k for k in handover.listing("session")
        if k.container_uuid == container_uuid and k.kind == kind
    ]  # fmt: skip
    return key.expires


def test_the_reseal_bundle_expires(
    own_session_keyring: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    ours = str(uuid.uuid4())
    leave(ours, "vk")
    leave(ours, "rs")
    assert seconds_left(ours, "vk") == "never"  # the key service's, until lock
    assert seconds_left(ours, "rs") in ("15m", "14m")  # default: 900 s
    # Left again (rotate master does): a new lifetime, never "until lock" (add_key resets it).
    monkeypatch.setenv(handover.RS_LIFETIME_ENV, "2")
    leave(ours, "rs")
    assert seconds_left(ours, "rs") in ("2s", "1s")
    bundle = handover.get(ours, keyring="session", kind="rs")
    assert bundle is not None  # readable while it lives, and not revoked by the read
    bundle.wipe()
    assert handover.get(ours, keyring="session", kind="rs") is not None
    time.sleep(3)
    # The attacker's read, after the lifetime: the kernel refuses it.
    assert handover.get(ours, keyring="session", kind="rs") is None
    vk = handover.get(ours, keyring="session")
    assert vk is not None  # the volume key stays
    vk.wipe()
    # Expired keys are stale even for this container; lock --stale's function drops them.
    assert [(k.kind, k.expires) for k in handover.stale(ours, "session")] == [("rs", "expired")]
    assert [k.kind for k in handover.drop_stale(ours, "session")] == ["rs"]
    assert [k.kind for k in handover.listing("session")] == ["vk"]
    # 0: until lock, as before the lifetime; nonsense is refused, not taken for "forever".
    monkeypatch.setenv(handover.RS_LIFETIME_ENV, "0")
    leave(ours, "rs")
    assert seconds_left(ours, "rs") == "never"
    for bad in ("soon", "-5"):
        monkeypatch.setenv(handover.RS_LIFETIME_ENV, bad)
        with pytest.raises(handover.HandoverError, match=handover.RS_LIFETIME_ENV):
            leave(ours, "rs")


def test_other_containers_keys_are_stale(own_session_keyring: None) -> None:
    ours, theirs, older = (str(uuid.uuid4()) for _ in range(3))
    for u in (ours, theirs, older):
        leave(u, "vk")
        leave(u, "rs")
    stale = handover.stale(ours, "session")
    assert sorted((k.container_uuid, k.kind) for k in stale) == sorted(
        (u, kind) for u in (theirs, older) for kind in ("vk", "rs")
    )
    assert handover.stale(None, "session") == []  # no container: no judgement on UUIDs
    doc, lines = handover.summary(ours, "session")
    assert doc["stale"] == 4 and len(doc["keys"]) == 6
    text = "\n".join(lines)
    assert f"STALE qubes-seal:vk:{theirs}" in text and "lock --stale" in text
    assert f"  qubes-seal:vk:{ours} (volume key, until lock)" in text
    handover.drop_stale(ours, "session")
    assert {k.container_uuid for k in handover.listing("session")} == {ours}


def cli(box: Box, *args: str, **env: str) -> Result:
    return run(box.swtpm.tcti, box.dir / "state", *args, "--container", str(box.container),
               env={"QUBES_SEAL_KEYRING": "session", **env})  # fmt: skip


def test_status_shows_and_lock_stale_drops(own_session_keyring: None, box: Box) -> None:
    box.boot()
    res = cli(box, "unlock", "--passphrase-file", str(box.pw),
              **{handover.RS_LIFETIME_ENV: "20"})  # fmt: skip
    left_at = time.monotonic()  # the bundle was left before the command returned
    assert res.code == 0, res.err
    ours = Container(box.container).uuid
    theirs = str(uuid.uuid4())  # a test's, or the container before a re-init
    leave(theirs, "vk")
    leave(theirs, "rs")
    res = cli(box, "status")
    assert res.code == 0, res.err
    assert f"STALE qubes-seal:vk:{theirs}" in res.out
    assert f"STALE qubes-seal:rs:{theirs}" in res.out
    assert f"  qubes-seal:vk:{ours} (volume key, until lock)" in res.out
    assert f"  qubes-seal:rs:{ours} (reseal bundle, expires in " in res.out
    assert "2 stale" in res.out and "'qubes-seal lock --stale'" in res.out
    doc = cli(box, "status", "--json").json()["handover"]
    assert doc["stale"] == 2 and doc["keyring"] == "session"
    # lock --stale with a container it cannot read refuses: a typo must not drop ours.
    res = run(box.swtpm.tcti, box.dir / "state", "lock", "--stale", "--container",
              str(box.dir / "typo.luks"), env={"QUBES_SEAL_KEYRING": "session"})  # fmt: skip
    assert res.code == 2 and "cannot read the UUID" in res.err
    res = cli(box, "lock", "--stale")
    assert res.code == 0, res.err
    assert res.out.count(theirs) == 2
    assert {k.container_uuid for k in handover.listing("session")} == {ours}
    # The reseal bundle of this unlock is gone after its lifetime (20 s here)...
    time.sleep(max(0.0, left_at + 21 - time.monotonic()))
    assert handover.get(ours, keyring="session", kind="rs") is None
    assert "EXPIRED" in cli(box, "status").out
    # ...and a rotation says why it cannot run, instead of failing on PCR 13.
    new = box.dir / "new-passphrase"
    new.write_text("another passphrase\n")
    res = cli(box, "rotate", "passphrase", "--passphrase-file", str(box.pw),
              "--new-passphrase-file", str(new))  # fmt: skip
    assert res.code == 2, res.err
    assert "reseal hand-over has expired" in res.err and "Reboot" in res.err
    # The volume key stays until lock: the key service keeps serving.
    vk = handover.get(ours, keyring="session")
    assert vk is not None
    vk.wipe()
    assert cli(box, "lock").code == 0
    assert handover.listing("session") == []


def test_the_lifetime_is_documented() -> None:
    design = (Path(__file__).resolve().parent.parent / "docs" / "DESIGN.md").read_text()
    assert handover.RS_LIFETIME_ENV in design and "lock --stale" in design
