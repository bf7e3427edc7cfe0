"""Checks of configuration values whose errors name the field, the value and what is allowed.

Host-free: the heads use them on their arguments, the launchers on a run's settings before any
folder is made or data read (:func:`check_training`).
"""

from __future__ import annotations

import math
from collections.abc import Callable


def check_choice(field: str, value: object, allowed: tuple[str, ...] | list[str]) -> None:
    """Raise a ``ValueError`` naming ``field`` and the allowed values unless ``value`` is one."""
    if value not in allowed:
        raise ValueError(f"{field}={value!r} is not supported; choose one of {sorted(allowed)}")


def check_flag(field: str, value: object) -> None:
    """Raise a ``ValueError`` naming ``field`` unless ``value`` is a ``bool``."""
    if not isinstance(value, bool):
        raise ValueError(f"{field}={value!r} is not supported; choose one of [False, True]")


def check_int(field: str, value: object, minimum: int = 1) -> None:
    """Raise a ``ValueError`` unless ``value`` is an ``int`` (not a ``bool``, ``float`` or
    string) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{field} must be {allowed}, got {value!r}")


def check_number(field: str, value: object, allowed: str, ok: Callable[[float], bool]) -> None:
    """Raise a ``ValueError`` naming ``allowed`` (e.g. ``"in [0, 1)"``) unless ``value`` is a
    finite real number (not a ``bool`` or string) for which ``ok(value)`` holds."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{field} must be {allowed}, got {value!r}")


def check_training(get: Callable[[str], object]) -> None:
    """The settings of a training run every launcher checks first; ``get(key)`` is the value of
    a dotted key (``None`` when unset). A ``ValueError`` names the first bad one."""
    check_int("max_epochs", get("max_epochs"))
    check_int("optimizer.batch_size", get("optimizer.batch_size"))
    check_number("optimizer.lr", get("optimizer.lr"), "a number > 0", lambda v: v > 0)
    weight_decay = get("optimizer.weight_decay")
    if weight_decay is not None:
        check_number("optimizer.weight_decay", weight_decay, "a number >= 0", lambda v: v >= 0)
    fraction = get("data.fraction")
    if fraction is not None:
        check_number(
            "data.fraction", fraction, "-1 (all) or in (0, 1]", lambda v: v == -1 or 0 < v <= 1
        )
    workers = get("data.num_workers")
    if workers is not None:
        check_int("data.num_workers", workers, minimum=0)
