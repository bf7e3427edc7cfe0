"""Checks of configuration values whose errors name the field and what it allows."""

from __future__ import annotations


def check_choice(field: str, value: object, allowed: tuple[str, ...] | list[str]) -> None:
    """Raise a ``ValueError`` naming ``field`` and the allowed values unless ``value`` is one."""
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; choose one of {sorted(allowed)}")


def check_flag(field: str, value: object) -> None:
    """Raise a ``ValueError`` naming ``field`` unless ``value`` is a ``bool``."""
    if not isinstance(value, bool):
        raise ValueError(f"{field}={value!r} is not supported; choose one of [False, True]")
