"""Atomic file writes: readers see the old content or the complete new one, never a torn file.

>>> with atomic_path("zoo/manifest.yaml") as tmp:
...     tmp.write_text(text)          # replaces zoo/manifest.yaml only if this block succeeds
>>> write_json("run/fusion.json", {"fusion_ratio": [1.0, 1.4]})
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PathLike = str | os.PathLike[str]


@contextmanager
def atomic_path(path: PathLike, mode: int = 0o644) -> Iterator[Path]:
    """A temporary file next to ``path``, renamed onto it (``os.replace``) when the block succeeds.

    The parent folder is created; on any exception the temporary file is removed and ``path`` is
    left as it was. The result gets permissions ``mode`` (``mkstemp`` would leave 0600).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: PathLike, data: Any, *, allow_nan: bool = False) -> Path:
    """``data`` as indented JSON; strict by default (a NaN or infinity is an error)."""
    return write_text(path, json.dumps(data, indent=2, allow_nan=allow_nan) + "\n")
