"""The key service's pure parts: configuration, rate limiter, decisions, and the service
executable's constants and name check (which must agree with the package's)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qubes_seal import rotate
from qubes_seal.keystore import Keystore, name_problem
from qubes_seal.service import config, daemon, protocol
from qubes_seal.service.daemon import KeyService, Peer, Server
from qubes_seal.service.ratelimit import RateLimiter

SERVICE = Path(__file__).resolve().parent.parent / "qrexec" / "qubes.SealGetDiskKey"
PREVIOUS_SERVICE = SERVICE.parent / "qubes.SealGetPreviousDiskKey"
U1 = "6f1b0b3a-1111-4c4c-9d9d-000000000001"


def load_service() -> ModuleType:
    loader = importlib.machinery.SourceFileLoader("sealgetdiskkey", str(SERVICE))
    spec = importlib.util.spec_from_loader("sealgetdiskkey", loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_the_example_config() -> None:
    cfg = config.loads(
        '[storage-domains]\nsys-storage = ["work", "personal"]\nsys-b = []\n'
        f'[domain-uuids]\nwork = "{U1.upper()}"\n[rate-limit]\nrate = 5\nburst = 10\n'
    )
    assert cfg.served_by("work") == "sys-storage"
    assert cfg.served_by("vault") is None
    assert cfg.domain_uuids == {"work": U1}
    assert (cfg.rate, cfg.burst) == (5.0, 10)
    assert cfg.server_of == {"work": "sys-storage", "personal": "sys-storage"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no [storage-domains]"),
        ('[storage-domains]\na = ["x"]\nb = ["x"]', "served by both 'a' and 'b'"),
        ('[storage-domains]\na = ["x", "x"]', "served twice"),
        ('[storage-domains]\na = ["a"]', "cannot serve itself"),
        ('[storage-domains]\na = ["b"]\nb = ["c"]', "is a storage domain and is served"),
        ('[storage-domains]\na = ["x-dm"]', "invalid qube name"),
        ('[storage-domains]\n"_a" = ["x"]', "invalid qube name"),
        ('[storage-domains]\na = "x"', "must be a list"),
        ('[storage-domain]\na = ["x"]', "unknown table"),
        ('[storage-domains]\na = ["x"]\n[rate-limit]\nrate = -1', "must be positive"),
        ('[storage-domains]\na = ["x"]\n[rate-limit]\nburst = 1.5', "must be an integer"),
        ('[storage-domains]\na = ["x"]\n[rate-limit]\nbursts = 1', "unknown key"),
        ('[storage-domains]\na = ["x"]\n[domain-uuids]\ny = "' + U1 + '"', "nobody serves"),
        ('[storage-domains]\na = ["x"]\n[domain-uuids]\nx = "nope"', "invalid qube UUID"),
        ("[storage-domains\n", "not valid TOML"),
    ],
)
def test_bad_configs_are_refused(text: str, message: str) -> None:
    with pytest.raises(config.ConfigError) as info:
        config.loads(text)
    assert message in info.value.message


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(config.ConfigError, match="no key service configuration"):
        config.load(tmp_path / "config.toml")


def test_token_bucket() -> None:
    now = [0.0]
    rl = RateLimiter(rate=2.0, burst=3, clock=lambda: now[0])
    assert [rl.allow("a") for _ in range(4)] == [True, True, True, False]
    assert rl.allow("b")  # per caller
    now[0] += 0.5  # one token back
    assert rl.allow("a") and not rl.allow("a")
    now[0] += 100
    assert sum(rl.allow("a") for _ in range(10)) == 3  # never more than the burst


def test_rate_limiter_memory_is_bounded() -> None:
    from qubes_seal.service import ratelimit

    rl = RateLimiter(rate=1.0, burst=1, clock=lambda: 0.0)
    for i in range(ratelimit.MAX_CALLERS + 100):
        rl.allow(f"q{i}")
    assert len(rl) <= ratelimit.MAX_CALLERS


class FakeUnlocked:
    def __init__(self) -> None:
        self.keystore = Keystore()
        self.saved = 0

    def save(self) -> None:
        self.saved += 1

    def close(self) -> None:
        pass


def service_with(tmp_path: Path) -> tuple[KeyService, FakeUnlocked]:
    cfg = config.loads('[storage-domains]\nsys-storage = ["work"]\n')
    unlocked = FakeUnlocked()
    svc = KeyService(cfg, container=tmp_path / "c", opener=lambda path: unlocked)
    svc._unlocked = unlocked
    svc.refresh = lambda: True  # type: ignore[method-assign]
    return svc, unlocked


def test_admin_requests_only_for_root(tmp_path: Path) -> None:
    svc, unlocked = service_with(tmp_path)
    user = Peer(1, 1000, 1000)
    for op in sorted(protocol.ADMIN_OPS):
        answer = svc.handle({"op": op, "name": "work"}, user, admin=False)
        assert answer["error"] == "forbidden", op
    assert unlocked.keystore.list() == []
    root = Peer(1, 0, 0)
    answer = svc.handle({"op": "add", "name": "work", "qube_uuid": U1}, root, admin=True)
    assert answer["ok"] and unlocked.saved == 1
    key = unlocked.keystore.get("work", qube_uuid=U1).key.reveal()
    # No UUID in the configuration, a UUID in the store: refused (fail closed).
    answer = svc.handle({"op": "get-key", "caller": "sys-storage", "domain": "work"}, user,
                        admin=False)  # fmt: skip
    assert answer["error"] == "refused"
    answer = svc.handle({"op": "show", "name": "work", "qube_uuid": U1, "show_key": True},
                        root, admin=True)  # fmt: skip
    assert bytes.fromhex(answer["key"]) == key
    assert svc.handle({"op": "remove", "name": "work"}, root, admin=True)["ok"]
    assert unlocked.saved == 2 and unlocked.keystore.list() == []


def test_previous_key_requests(tmp_path: Path) -> None:
    svc, unlocked = service_with(tmp_path)
    svc.limiter = RateLimiter(rate=0.001, burst=4)
    user, root = Peer(1, 1000, 1000), Peer(1, 0, 0)
    ks = unlocked.keystore
    old = ks.add("work").key.reveal()

    def ask(which: object, caller: str = "sys-storage") -> dict[str, Any]:
        request = {"op": "get-key", "caller": caller, "domain": "work", "which": which}
        return svc.handle(request, user, admin=False)

    # No rotation pending: a clear refusal; "current" is the default.
    answer = ask("previous")
    assert answer["error"] == "no-key" and "no rotation is pending" in answer["message"]
    assert answer["exit"] == protocol.EXIT_NO_KEY
    default = {"op": "get-key", "caller": "sys-storage", "domain": "work"}
    assert svc.handle(default, user, admin=False)["which"] == "current"
    assert (
        svc.handle({"op": "show", "name": "work"}, root, admin=True)["domain"]["rotation_pending"]
        is None
    )
    for bad in ("older", None, 1, ["previous"]):
        assert ask(bad)["error"] == "bad-request"
    # Pending: the previous key, to the storage domain only; show/list say so.
    entry = rotate.rotate_domain(ks, "work")
    answer = ask("previous")
    assert answer["ok"] and answer["which"] == "previous"
    assert bytes.fromhex(answer["key"]) == old and answer["key_id"] != entry.key_id
    assert bytes.fromhex(ask("current")["key"]) == entry.key.reveal() != old
    assert ask("previous", caller="sys-other")["error"] == "refused"
    view = svc.handle({"op": "list"}, root, admin=True)["domains"][0]
    assert view["generation"] == 2
    assert view["rotation_pending"]["previous_key_id"] == answer["key_id"]
    assert view["rotation_pending"]["previous_generation"] == 1
    assert old.hex() not in str(view)
    # The authorised caller is never rate-limited (issue 14); refusals are, one bucket for
    # both keys of a caller: sys-other's refusal above, three more, then rate-limited.
    assert all(ask("previous")["ok"] for _ in range(10))
    assert [ask(w, caller="sys-other")["error"] for w in ("current", "previous", "current")] == [
        "refused"
    ] * 3
    assert ask("previous", caller="sys-other")["error"] == "rate-limited"
    assert ask("previous")["ok"]
    svc.limiter = RateLimiter(rate=1000.0, burst=1000)
    # A malformed previous key: an internal error, without the value or a traceback.
    entry.extra["previous"]["key"] = "zz" * 64
    answer = ask("previous")
    assert answer["error"] == "internal" and "zz" not in answer["message"]
    entry.extra["previous"]["key"] = old.hex()
    # Committed: refused again.
    rotate.commit_domain(ks, "work")
    assert ask("previous")["error"] == "no-key"
    assert (
        svc.handle({"op": "show", "name": "work"}, root, admin=True)["domain"]["rotation_pending"]
        is None
    )


def test_group_members_are_admitted_but_not_admins(tmp_path: Path) -> None:
    svc, _ = service_with(tmp_path)
    server = Server(svc, tmp_path / "run" / "s.sock")
    server.gid = 4242
    assert server._admitted(Peer(1, 0, 0))
    assert server._admitted(Peer(1, 99999, 4242))
    assert not server._admitted(Peer(1, 99999, 99999))
    assert not server._is_admin(Peer(1, 99999, 4242)) or os.geteuid() == 99999


def test_executable_agrees_with_the_protocol() -> None:
    exe = load_service()
    assert exe.DEFAULT_SOCKET == protocol.DEFAULT_SOCKET
    assert exe.MAX_RESPONSE == protocol.MAX_RESPONSE
    assert set(exe.KNOWN_EXITS) == set(protocol.ERRORS.values()) | {protocol.EXIT_UNREACHABLE}
    assert (exe.EXIT_ERROR, exe.EXIT_BAD_ARGUMENT, exe.EXIT_UNREACHABLE) == (
        protocol.EXIT_ERROR, protocol.EXIT_BAD_ARGUMENT, protocol.EXIT_UNREACHABLE,
    )  # fmt: skip
    assert os.access(SERVICE, os.X_OK)
    assert SERVICE.read_text().startswith("#!/usr/bin/python3 -IS\n")
    assert "import qubes_seal" not in SERVICE.read_text()
    # One executable, two service names: the second is a symlink to the first.
    assert exe.SERVICES == protocol.SERVICES
    assert set(exe.SERVICES.values()) == set(protocol.WHICH_KEYS)
    assert protocol.SERVICES[protocol.SERVICE_NAME] == protocol.CURRENT
    assert PREVIOUS_SERVICE.name == protocol.PREVIOUS_SERVICE_NAME
    assert PREVIOUS_SERVICE.is_symlink() and os.readlink(PREVIOUS_SERVICE) == SERVICE.name
    assert os.access(PREVIOUS_SERVICE, os.X_OK)
    # The daemon reads the previous key where 'domain rotate' keeps it.
    assert daemon.PREVIOUS_KEY == rotate.PREVIOUS


QREXEC_ARG = st.text(alphabet="abcXYZ019._-+_", max_size=40)


@given(st.one_of(QREXEC_ARG, st.text(max_size=40)))
def test_executable_name_check_is_the_package_check(name: str) -> None:
    exe = _EXE
    assert exe.valid_name(name) == (name_problem(name) == "")


_EXE = load_service()


@given(st.binary(max_size=200))
def test_decode_fuzz(data: bytes) -> None:
    try:
        doc: Any = protocol.decode(data)
    except protocol.ProtocolError:
        return
    assert isinstance(doc, dict)


def test_dom0_caller_is_root_only_attack(tmp_path: Path) -> None:
    # Attacker: a member of the service group (dom0's qrexec service user, or a process of
    # that uid) sends "caller": "dom0" to get a [dom0-storage] qube's key.  Refused: dom0 is
    # served to root only; and refusals, unlike root's valid burst, are rate-limited.
    cfg = config.loads(
        '[storage-domains]\nsys-storage = ["work"]\n[dom0-storage]\ndomains = ["vault"]\n'
        "[rate-limit]\nrate = 0.001\nburst = 3\n"
    )
    unlocked = FakeUnlocked()
    svc = KeyService(cfg, container=tmp_path / "c", opener=lambda path: unlocked)
    svc._unlocked = unlocked
    svc.refresh = lambda: True  # type: ignore[method-assign]
    key = unlocked.keystore.add("vault", qube_uuid=U1).key.reveal()
    member, root = Peer(7, 1000, 1000), Peer(1, 0, 0)
    ask = {"op": "get-key", "caller": "dom0", "domain": "vault", "qube_uuid": U1}
    answers = [svc.handle(ask, member, admin=False) for _ in range(5)]
    assert [a["error"] for a in answers] == ["refused"] * 3 + ["rate-limited"] * 2
    assert "only root" in answers[0]["message"]
    # root: every one of a burst far beyond the bucket, with the qube's UUID
    for _ in range(50):
        answer = svc.handle(ask, root, admin=True)
        assert answer["ok"] and bytes.fromhex(answer["key"]) == key
    # without the UUID the key bound to it stays refused (fail closed), as is another UUID
    no_uuid = {k: v for k, v in ask.items() if k != "qube_uuid"}
    assert svc.handle(no_uuid, root, admin=True)["error"] == "refused"
    assert svc.handle({**ask, "qube_uuid": U1[:-1] + "2"}, root, admin=True)["error"] == "refused"
    # a storage domain cannot ask for a dom0 qube, nor root as dom0 for a storage domain's
    assert svc.handle({**ask, "caller": "sys-storage"}, member, admin=False)["error"] == "refused"
    work = {"op": "get-key", "caller": "dom0", "domain": "work"}
    assert svc.handle(work, root, admin=True)["error"] == "refused"  # the impostor's refusals
    # were charged to its uid, not to dom0's bucket
