"""Qube names and UUIDs as Qubes itself accepts them.

The name rules are those of ``validate_name`` in qubes-core-admin ``qubes/vm/__init__.py``.
"""

from __future__ import annotations

import re
import uuid

from ..errors import UsageError

MAX_NAME_LENGTH = 31
NAME_PATTERN = re.compile(r"\A[a-zA-Z][a-zA-Z0-9_.-]*\Z")
RESERVED_NAMES = frozenset({"Domain-0", "none", "default"})
FORBIDDEN_SUFFIX = "-dm"  # Xen's device-model stub domains are named "<qube>-dm"


def name_problem(name: object) -> str:
    """Which Qubes name rule ``name`` breaks, or ``""`` if it is a valid qube name."""
    if not isinstance(name, str):
        return f"a qube name must be a string, not {type(name).__name__}"
    if len(name) > MAX_NAME_LENGTH:
        return f"a qube name has at most {MAX_NAME_LENGTH} characters ({len(name)} given)"
    if NAME_PATTERN.match(name) is None:
        return (
            "a qube name starts with an ASCII letter and contains only ASCII letters, "
            "digits, '_', '.' and '-'"
        )
    if name in RESERVED_NAMES:
        return "a qube name cannot be 'Domain-0', 'none' or 'default'"
    if name.endswith(FORBIDDEN_SUFFIX):
        return f"a qube name cannot end with {FORBIDDEN_SUFFIX!r}"
    return ""


def validate_name(name: str) -> str:
    """Return ``name`` if it is a valid qube name; otherwise raise :class:`UsageError`."""
    problem = name_problem(name)
    if problem:
        # The rejected name is echoed with repr() so control characters cannot reach the
        # terminal raw; a name is not secret.
        raise UsageError(f"invalid qube name {name!r}: {problem}")
    return name


def normalise_uuid(value: str) -> str:
    """The canonical lowercase ``8-4-4-4-12`` form of a qube UUID; :class:`UsageError` if bad.

    Only the canonical layout is accepted (in either case): no braces, no ``urn:uuid:``.
    """
    if not isinstance(value, str) or len(value) != 36:
        raise UsageError(f"invalid qube UUID {value!r}: expected 8-4-4-4-12 hexadecimal digits")
    try:
        canonical = str(uuid.UUID(value))
    except ValueError as exc:
        raise UsageError(
            f"invalid qube UUID {value!r}: expected 8-4-4-4-12 hexadecimal digits"
        ) from exc
    if canonical != value.lower():
        raise UsageError(f"invalid qube UUID {value!r}: expected 8-4-4-4-12 hexadecimal digits")
    return canonical
