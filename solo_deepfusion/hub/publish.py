"""Publishing side of the zoo: file records, the code commit, and manifest updates.

>>> rec = file_record("zoo/files/m/m.backbone.safetensors", "backbone",
...                   ["files/m/m.backbone.safetensors"])          # size + sha256 measured
>>> entry = {"name": "m", "files": [rec], ...}                      # the other manifest fields
>>> update_manifest("zoo/manifest.yaml", entry)                     # validated, atomic

Used by ``scripts/build_zoo.py``; nothing here imports torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from solo_deepfusion.atomic import atomic_path

from .cache import sha256_file
from .manifest import PathLike, _plain, read_yaml, validate_manifest

SCHEMA_VERSION = 1


def file_record(path: PathLike, role: str, urls: Sequence[str]) -> dict[str, Any]:
    """The manifest record of the file at ``path``: role, name, measured size and SHA-256, URLs."""
    p = Path(path)
    return {
        "role": role,
        "filename": p.name,
        "size": p.stat().st_size,
        "sha256": sha256_file(p),
        "urls": list(urls),
    }


def _header(text: str) -> str:
    """The leading comment block of a YAML file (kept when the file is rewritten)."""
    lines = []
    for line in text.splitlines(keepends=True):
        if not line.startswith("#"):
            break
        lines.append(line)
    return "".join(lines)


def update_manifest(path: PathLike, entry: Mapping[str, Any]) -> Path:
    """Add ``entry`` to the manifest at ``path``, replacing the entry of the same name.

    The whole manifest is validated before it is written (atomically); a missing file is
    created. The leading comment block is kept; other comments are not.
    """
    p = Path(path)
    text = p.read_text(encoding="utf-8") if p.is_file() else ""
    doc = _plain(read_yaml(text)) if text.strip() else None
    doc = doc or {"schema_version": SCHEMA_VERSION, "models": []}
    models = [m for m in doc["models"] if m.get("name") != entry["name"]]
    at = next((i for i, m in enumerate(doc["models"]) if m.get("name") == entry["name"]), None)
    models.insert(len(models) if at is None else at, _plain(dict(entry)))
    doc["models"] = models
    validate_manifest(doc, str(p))
    with atomic_path(p) as tmp:
        body = yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100)
        tmp.write_text(_header(text) + body, encoding="utf-8")
    return p
