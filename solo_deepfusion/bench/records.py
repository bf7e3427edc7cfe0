"""The results file (one JSON line per cell, appended atomically) and the run's environment."""

from __future__ import annotations

import fcntl
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from solo_deepfusion.jsonl import json_safe
from solo_deepfusion.provenance import git_commit

SCHEMA = "solo-deepfusion/bench/1"
_CHECKOUT = Path(__file__).resolve().parents[3]  # the repository, in a source checkout


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a results file; lines that are not whole JSON objects are skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "cell_id" in record:
            records.append(record)
    return records


def finished_cells(path: Path, *, include_failed: bool = False) -> set[str]:
    """Ids of the cells with an ``ok`` record (and failed ones, if asked)."""
    wanted = {"ok", "failed"} if include_failed else {"ok"}
    return {r["cell_id"] for r in read_records(path) if r.get("status") in wanted}


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line of strict JSON: one ``write`` under an exclusive lock,
    then ``fsync``. A line left incomplete by a crash is closed first, so it stays alone (and
    is skipped by :func:`read_records`)."""
    line = (json.dumps(json_safe(record), allow_nan=False, sort_keys=True) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------------------------
# Environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _dali_version() -> str | None:
    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    found = sorted({n for n in names if n.lower().startswith("nvidia-dali")})
    return f"{found[0]}=={_version(found[0])}" if found else None


def _git_dirty() -> bool | None:
    """Whether tracked files of the checkout differ from its commit (``None``: no git)."""
    # --no-optional-locks: `status` must not refresh (write) the index
    git = ["git", "--no-optional-locks", "-C", str(_CHECKOUT)]
    status = [*git, "status", "--porcelain", "--untracked-files=no"]
    try:
        out = subprocess.run(status, capture_output=True, text=True, check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip())


def environment() -> dict[str, Any]:
    """Versions, commit and machine of this process (read-only git calls)."""
    dirty = _git_dirty()
    cuda = torch.cuda.is_available()
    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": _version("torchvision"),
            "lightning": _version("lightning"),
            "solo-learn": _version("solo-learn"),
            "solo-deepfusion": _version("solo-deepfusion"),
            "dali": _dali_version(),
        },
        "commit": git_commit(_CHECKOUT) or os.environ.get("SOLO_DEEPFUSION_COMMIT"),
        "dirty": dirty,
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
