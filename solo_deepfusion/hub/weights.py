"""Weights on disk: ``safetensors`` only — pickle-based ``.pt``/``.ckpt``/``.pth`` are refused.

>>> save_state_dict(model.backbone.state_dict(), "backbone.safetensors",
...                 {"name": "simclr-deepfusion-r18-cifar10-cpu"}, half=True)
>>> state = load_state_dict("backbone.safetensors")
>>> state, entry = load_backbone_state("simclr-deepfusion-r18-cifar10-cpu")   # float32, verified
>>> backbone.load_state_dict(state, strict=True)
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from solo_deepfusion.atomic import atomic_path

from .download import download
from .manifest import PathLike, ZooEntry, get_entry

SUFFIX = ".safetensors"
_FP16_MAX = torch.finfo(torch.float16).max


def _require_safetensors(path: PathLike) -> Path:
    p = Path(path)
    if not p.name.lower().endswith(SUFFIX):
        raise ValueError(
            f"{p}: only {SUFFIX} files are read or written here; pickle-based checkpoints "
            "(.pt/.pth/.ckpt/.bin) can run code when loaded and are refused"
        )
    return p


def _metadata_str(metadata: Mapping[str, Any] | None) -> dict[str, str]:
    """safetensors metadata is ``str -> str``; other values are stored as JSON."""
    out: dict[str, str] = {}
    for k, v in (metadata or {}).items():
        out[str(k)] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return out


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path: PathLike,
    metadata: Mapping[str, Any] | None = None,
    *,
    half: bool = False,
) -> Path:
    """Write ``state_dict`` atomically (temp file + ``os.replace``) to a ``.safetensors`` file.

    ``half=True`` stores float32/float64 tensors as float16 (a value beyond ±65504 is an error,
    not a silent ``inf``); other dtypes are kept. Non-string metadata values are JSON-encoded.
    Equal tensors and metadata give byte-identical files.
    """
    p = _require_safetensors(path)
    tensors: dict[str, torch.Tensor] = {}
    for key, t in state_dict.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"state_dict[{key!r}] is a {type(t).__name__}, not a tensor")
        t = t.detach().cpu()
        if half and t.dtype in (torch.float32, torch.float64):
            if t.numel() and t.abs().max().item() > _FP16_MAX:
                raise ValueError(
                    f"state_dict[{key!r}] exceeds the float16 range; save with half=False"
                )
            t = t.to(torch.float16)
        tensors[key] = t.contiguous().clone()  # own storage: safetensors refuses shared memory
    with atomic_path(p) as tmp:
        save_file(tensors, tmp, metadata=_metadata_str(metadata))
        _sort_metadata(tmp)
    return p


def _sort_metadata(path: Path) -> None:
    """Write the header's metadata in sorted key order, in place (the header keeps its length).

    safetensors writes the metadata map in hash order, so the same tensors and metadata would
    give files with different SHA-256s; sorted, a rebuilt file hashes the same.
    """
    with open(path, "r+b") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
        if "__metadata__" not in header:
            return
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:  # never: same content, same compact JSON as safetensors writes
            raise RuntimeError(f"{path}: re-serialised safetensors header grew; not rewritten")
        fh.seek(8)
        fh.write(text.ljust(size))


def load_state_dict(path: PathLike, *, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file (anything else: ``ValueError``, never unpickled)."""
    p = _require_safetensors(path)
    try:
        return dict(load_file(p, device=device))
    except SafetensorError as err:
        raise ValueError(f"{p} is not a valid safetensors file: {err}") from err


def read_metadata(path: PathLike) -> dict[str, str]:
    """The ``str -> str`` metadata header of a ``.safetensors`` file."""
    p = _require_safetensors(path)
    try:
        with safe_open(str(p), framework="pt") as fh:
            return dict(fh.metadata() or {})
    except SafetensorError as err:
        raise ValueError(f"{p} is not a valid safetensors file: {err}") from err


def upcast(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """16-bit float tensors → float32; everything else unchanged."""
    return {
        k: v.float() if v.is_floating_point() and v.element_size() < 4 else v
        for k, v in state_dict.items()
    }


def load_backbone_state(
    name: str | ZooEntry,
    cache_dir: PathLike | None = None,
    *,
    offline: bool | None = None,
    progress: bool = True,
    manifest: PathLike | None = None,
) -> tuple[dict[str, torch.Tensor], ZooEntry]:
    """Download (or reuse) an entry's verified backbone file; float32 state dict and the entry."""
    entry = name if isinstance(name, ZooEntry) else get_entry(name, manifest)
    path = download(entry, role="backbone", cache_dir=cache_dir, offline=offline, progress=progress)
    return upcast(load_state_dict(path)), entry
