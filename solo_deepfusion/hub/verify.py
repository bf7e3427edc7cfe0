"""Check the cache against the manifest, without downloading or deleting anything.

>>> from solo_deepfusion.hub import verify
>>> bad = [r for r in verify() if r.status == "corrupted"]
>>> for r in bad:
...     print(r)   # corrupted  simclr-.../backbone.safetensors  sha256 ..., expected ...
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .cache import Status, cached_path, check_file
from .manifest import PathLike, ZooEntry, get_entry, load_manifest


@dataclass(frozen=True)
class VerifyResult:
    """State of one cached zoo file: ``ok``, ``missing`` or ``corrupted`` (never auto-deleted)."""

    name: str
    role: str
    filename: str
    path: Path
    status: Status
    expected_sha256: str
    actual_sha256: str | None = None
    expected_size: int = 0
    actual_size: int | None = None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def __str__(self) -> str:
        tail = f"  {self.detail}" if self.status == "corrupted" else ""
        return f"{self.status:<9}  {self.name}/{self.filename} ({self.role}){tail}"


def verify(
    name: str | ZooEntry | None = None,
    cache_dir: PathLike | None = None,
    *,
    manifest: PathLike | None = None,
) -> list[VerifyResult]:
    """One :class:`VerifyResult` per file of entry ``name`` (all entries when ``None``)."""
    if name is None:
        entries = list(load_manifest(manifest).values())
    elif isinstance(name, ZooEntry):
        entries = [name]
    else:
        entries = [get_entry(name, manifest)]
    results = []
    for entry in entries:
        for zf in entry.files:
            path = cached_path(entry, zf.role, cache_dir)
            state = check_file(path, zf)
            results.append(
                VerifyResult(
                    name=entry.name,
                    role=zf.role,
                    filename=zf.filename,
                    path=path,
                    status=state.status,
                    expected_sha256=zf.sha256,
                    actual_sha256=state.sha256,
                    expected_size=zf.size,
                    actual_size=state.size,
                    detail=state.detail,
                )
            )
    return results
