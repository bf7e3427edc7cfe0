"""Where zoo files are cached, and how a cached file is checked.

Layout: ``<cache>/<entry name>/<filename>`` (plus transient ``.part`` and ``.lock`` files), with
``<cache>`` = argument, else ``$SOLO_DEEPFUSION_CACHE``, else ``$XDG_CACHE_HOME/solo-deepfusion``,
else ``~/.cache/solo-deepfusion``.

>>> cached_path(ZooEntry("demo", (ZooFile("backbone", "b.safetensors", 0, "0" * 64),)),
...             cache_dir="/tmp/c")
PosixPath('/tmp/c/demo/b.safetensors')
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .manifest import PathLike, ZooEntry, ZooFile

ENV_CACHE = "SOLO_DEEPFUSION_CACHE"
ENV_OFFLINE = "SOLO_DEEPFUSION_OFFLINE"
HF_ENV_OFFLINE = "HF_HUB_OFFLINE"
_TRUE = {"1", "true", "yes", "on"}
_CHUNK = 1 << 20

Status = Literal["ok", "missing", "corrupted"]


def resolve_cache_dir(cache_dir: PathLike | None = None) -> Path:
    """The cache root (not created here)."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "solo-deepfusion"


def is_offline(offline: bool | None = None) -> bool:
    """An explicit ``offline`` wins; else ``$SOLO_DEEPFUSION_OFFLINE`` or ``$HF_HUB_OFFLINE``."""
    if offline is not None:
        return bool(offline)
    return any(
        os.environ.get(v, "").strip().lower() in _TRUE for v in (ENV_OFFLINE, HF_ENV_OFFLINE)
    )


def safe_component(value: str, what: str) -> str:
    """``value`` if it is a single, harmless path component, else ``ValueError``."""
    if (
        not isinstance(value, str)
        or value in ("", ".", "..")
        or "/" in value
        or "\\" in value
        or "\x00" in value
        or value != value.strip()
        or os.path.isabs(value)
    ):
        raise ValueError(f"{what} {value!r} is not a safe file name (it must stay in the cache)")
    return value


def cached_path(entry: ZooEntry, role: str = "backbone", cache_dir: PathLike | None = None) -> Path:
    """Where ``entry``'s ``role`` file lives in the cache (whether or not it is there)."""
    zf = entry.file(role)
    root = resolve_cache_dir(cache_dir)
    return root / safe_component(entry.name, "entry name") / safe_component(zf.filename, "filename")


def sha256_file(path: PathLike) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class FileCheck:
    """Outcome of comparing a file on disk with its manifest record."""

    status: Status
    size: int | None = None
    sha256: str | None = None
    detail: str = ""


def check_file(path: Path, zf: ZooFile) -> FileCheck:
    """Compare ``path`` with ``zf``: size first (cheap), then the full SHA-256."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return FileCheck("missing", detail=f"{path} does not exist")
    if size != zf.size:
        return FileCheck("corrupted", size, None, f"size {size} bytes, expected {zf.size}")
    digest = sha256_file(path)
    if digest != zf.sha256:
        return FileCheck("corrupted", size, digest, f"sha256 {digest}, expected {zf.sha256}")
    return FileCheck("ok", size, digest)
