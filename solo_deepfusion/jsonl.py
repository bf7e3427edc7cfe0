"""Strict JSON for results and logs: no NaN or inf, one complete line per record."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by ``None``, for strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(item) for item in value]
    return value


def append_jsonl(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` to ``path`` as one line of strict JSON (one write, then flush)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(json_safe(record), allow_nan=False) + "\n"
    with path.open("a", encoding="utf-8") as file:
        file.write(line)
        file.flush()
