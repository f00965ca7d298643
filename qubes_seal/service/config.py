"""``/etc/qubes-seal/config.toml``: which storage domain serves which domains.

::

    [storage-domains]              # required: storage domain = [domains it serves]
    sys-storage = ["work", "personal"]
    sys-storage-2 = ["vault"]

    [dom0-storage]                 # optional: qubes whose volumes dom0 itself opens (the
    domains = ["vault", "mail"]    # qubes_seal pool driver in qubesd, root): caller "dom0"

    [domain-uuids]                 # optional: the qube UUID each domain's key is bound to
    work = "6f1b0b3a-1111-4c4c-9d9d-000000000001"

    [rate-limit]                   # optional: a token bucket per caller, taken by refused
    rate = 20.0                    # and malformed requests only (default 20 per second)
    burst = 100                    # refusals at once (default 100)

    [service]                      # optional
    group = "qubes"                # the group admitted to the socket (default "qubes")
    request-timeout = 2.0          # seconds a client has to send its request (default 2)
    max-connections = 1024         # connections served at once (default 1024)
    max-connections-per-caller = 256  # of them, held by one user (SO_PEERCRED uid; 256)

Every name is checked with Qubes' own rules (:func:`~qubes_seal.keystore.validate_name`).
Fail closed: a domain served by two storage domains, a storage domain that serves itself, an
unknown table or key, a UUID for a domain nobody serves: each is a configuration error, and
the daemon does not start (or, on a reload, keeps the configuration it had).

``dom0`` is the caller name of the pool driver (:mod:`qubes_seal.qubes_pool`, run by qubesd as
root in dom0): it cannot be a storage domain's name, and the daemon serves it only to root.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..keystore.names import name_problem, normalise_uuid

DEFAULT_RATE = 20.0
DEFAULT_BURST = 100
DEFAULT_GROUP = "qubes"
DEFAULT_REQUEST_TIMEOUT = 2.0
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_MAX_CONNECTIONS_PER_CALLER = 256

#: the caller name of dom0's own storage (the pool driver in qubesd, root only)
DOM0 = "dom0"

TABLES = {
    "storage-domains": None,
    "dom0-storage": {"domains"},
    "domain-uuids": None,
    "rate-limit": {"rate", "burst"},
    "service": {"group", "request-timeout", "max-connections", "max-connections-per-caller"},
}


class ConfigError(UsageError):
    """The key service's configuration is invalid: nothing of it is used."""


@dataclass(frozen=True)
class ServiceConfig:
    """The parsed configuration; ``server_of`` maps each served domain to its storage domain."""

    storage_domains: dict[str, tuple[str, ...]] = field(default_factory=dict)
    dom0_domains: tuple[str, ...] = ()
    domain_uuids: dict[str, str] = field(default_factory=dict)
    rate: float = DEFAULT_RATE
    burst: int = DEFAULT_BURST
    group: str = DEFAULT_GROUP
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_connections_per_caller: int = DEFAULT_MAX_CONNECTIONS_PER_CALLER
    source: str = "<defaults>"

    @property
    def server_of(self) -> dict[str, str]:
        served = {d: sd for sd, domains in self.storage_domains.items() for d in domains}
        served.update((d, DOM0) for d in self.dom0_domains)
        return served

    def served_by(self, domain: str) -> str | None:
        """The storage domain that serves ``domain`` (:data:`DOM0`: dom0's pool), or None."""
        for storage, domains in self.storage_domains.items():
            if domain in domains:
                return storage
        if domain in self.dom0_domains:
            return DOM0
        return None

    def public_view(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "storage_domains": {k: list(v) for k, v in self.storage_domains.items()},
            "dom0_storage": list(self.dom0_domains),
            "domain_uuids": dict(self.domain_uuids),
            "rate_limit": {"rate": self.rate, "burst": self.burst},
        }


def _name(value: object, where: str, source: str) -> str:
    problem = name_problem(value)
    if problem:
        raise ConfigError(f"{source}: {where}: invalid qube name {value!r}: {problem}")
    assert isinstance(value, str)
    return value


def _number(value: object, where: str, source: str, *, integer: bool = False) -> float:
    ok_types = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, ok_types):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{source}: {where} must be {kind}, not {value!r}")
    number = float(value)
    if not math.isfinite(number) or number <= 0:
        raise ConfigError(f"{source}: {where} must be positive, not {value!r}")
    return number


def parse(doc: dict[str, Any], *, source: str = "<config>") -> ServiceConfig:
    """Check a parsed TOML document and build the configuration (:class:`ConfigError`)."""
    for table, value in doc.items():
        if table not in TABLES:
            raise ConfigError(
                f"{source}: unknown table [{table}]",
                hint="Known tables: " + ", ".join(f"[{t}]" for t in TABLES) + ".",
            )
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {table} must be a table ([{table}])")
        known = TABLES[table]
        if known is not None:
            for key in value:
                if key not in known:
                    raise ConfigError(f"{source}: unknown key {key!r} in [{table}]")
    if "storage-domains" not in doc:
        raise ConfigError(
            f"{source}: no [storage-domains] table",
            hint='Example:\n[storage-domains]\nsys-storage = ["work", "personal"]',
        )
    storage: dict[str, tuple[str, ...]] = {}
    owner: dict[str, str] = {}
    for sd, domains in doc["storage-domains"].items():
        _name(sd, "[storage-domains]", source)
        if sd == DOM0:
            raise ConfigError(
                f"{source}: [storage-domains] cannot name {DOM0!r}",
                hint="The qubes whose volumes dom0 opens (the qubes_seal pool) go in "
                '[dom0-storage] domains = ["..."].',
            )
        if not isinstance(domains, list):
            raise ConfigError(f"{source}: [storage-domains] {sd} must be a list of qube names")
        for d in domains:
            _name(d, f"[storage-domains] {sd}", source)
            if d == sd:
                raise ConfigError(f"{source}: storage domain {sd!r} cannot serve itself")
            if d in owner:
                where = "twice" if owner[d] == sd else f"by both {owner[d]!r} and {sd!r}"
                raise ConfigError(
                    f"{source}: domain {d!r} is served {where}",
                    hint="Each domain's key goes to exactly one storage domain.",
                )
            owner[d] = sd
        storage[sd] = tuple(domains)
    for sd in storage:
        if sd in owner:
            raise ConfigError(
                f"{source}: {sd!r} is a storage domain and is served by {owner[sd]!r}",
                hint="A storage domain's own disk cannot come from another storage domain here.",
            )
    dom0_domains = doc.get("dom0-storage", {}).get("domains", [])
    if not isinstance(dom0_domains, list):
        raise ConfigError(f"{source}: [dom0-storage] domains must be a list of qube names")
    for d in dom0_domains:
        _name(d, "[dom0-storage] domains", source)
        if d in owner:
            where = "twice" if owner[d] == DOM0 else f"by both {owner[d]!r} and dom0"
            raise ConfigError(
                f"{source}: domain {d!r} is served {where}",
                hint="Each domain's key goes to exactly one storage domain, or to dom0.",
            )
        if d in storage:
            raise ConfigError(f"{source}: {d!r} is a storage domain: dom0 cannot serve it")
        owner[d] = DOM0
    uuids: dict[str, str] = {}
    for d, value in doc.get("domain-uuids", {}).items():
        _name(d, "[domain-uuids]", source)
        if d not in owner:
            raise ConfigError(f"{source}: [domain-uuids] names {d!r}, which nobody serves")
        if not isinstance(value, str):
            raise ConfigError(f"{source}: [domain-uuids] {d} must be a UUID string")
        try:
            uuids[d] = normalise_uuid(value)
        except UsageError as exc:
            raise ConfigError(f"{source}: [domain-uuids] {d}: {exc.message}") from exc
    limits = doc.get("rate-limit", {})
    svc = doc.get("service", {})
    group = svc.get("group", DEFAULT_GROUP)
    if not isinstance(group, str) or not group:
        raise ConfigError(f"{source}: [service] group must be a group name")
    return ServiceConfig(
        storage_domains=storage,
        dom0_domains=tuple(dom0_domains),
        domain_uuids=uuids,
        rate=_number(limits.get("rate", DEFAULT_RATE), "[rate-limit] rate", source),
        burst=int(
            _number(limits.get("burst", DEFAULT_BURST), "[rate-limit] burst", source, integer=True)
        ),
        group=group,
        request_timeout=_number(
            svc.get("request-timeout", DEFAULT_REQUEST_TIMEOUT), "[service] request-timeout", source
        ),
        max_connections=int(
            _number(
                svc.get("max-connections", DEFAULT_MAX_CONNECTIONS),
                "[service] max-connections",
                source,
                integer=True,
            )
        ),
        max_connections_per_caller=int(
            _number(
                svc.get("max-connections-per-caller", DEFAULT_MAX_CONNECTIONS_PER_CALLER),
                "[service] max-connections-per-caller",
                source,
                integer=True,
            )
        ),
        source=source,
    )


def loads(text: str, *, source: str = "<config>") -> ServiceConfig:
    """The configuration from TOML text."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from exc
    return parse(doc, source=source)


def load(path: Path) -> ServiceConfig:
    """The configuration file at ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"no key service configuration at {path}",
            hint="Create it (docs/KEYSERVICE.md): it names the storage domain(s) and the "
            "domains each one serves. Without it no key would go anywhere.",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from exc
    return loads(text, source=str(path))
