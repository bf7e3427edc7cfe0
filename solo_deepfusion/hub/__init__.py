"""Model zoo client: manifest, verified downloads, cache checks and safetensors weights.

>>> from solo_deepfusion import hub
>>> hub.list_models()
['simclr-deepfusion-r18-cifar10', ...]
>>> entry = hub.get_entry("simclr-deepfusion-r18-cifar10")
>>> path = hub.download(entry.name)                       # verified, cached, resumable
>>> state, entry = hub.load_backbone_state(entry.name)    # float32 tensors
>>> [str(r) for r in hub.verify()]                        # ok / missing / corrupted

Importing this package does not import torch (the weight helpers load it on first use), nor
solo-learn, lightning or hydra.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .cache import cached_path, is_offline, resolve_cache_dir, sha256_file
from .download import download
from .errors import DownloadError, ManifestError, NotCachedError, UnknownModelError, ZooError
from .manifest import (
    Metric,
    ZooEntry,
    ZooFile,
    get_entry,
    list_models,
    load_manifest,
    validate_manifest,
)
from .verify import VerifyResult, verify

if TYPE_CHECKING:
    from .weights import load_backbone_state, load_state_dict, read_metadata, save_state_dict

_LAZY = {"load_backbone_state", "load_state_dict", "read_metadata", "save_state_dict"}

__all__ = [
    "DownloadError",
    "ManifestError",
    "Metric",
    "NotCachedError",
    "UnknownModelError",
    "VerifyResult",
    "ZooEntry",
    "ZooError",
    "ZooFile",
    "cached_path",
    "download",
    "get_entry",
    "is_offline",
    "list_models",
    "load_backbone_state",
    "load_manifest",
    "load_state_dict",
    "read_metadata",
    "resolve_cache_dir",
    "save_state_dict",
    "sha256_file",
    "validate_manifest",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:  # torch-dependent helpers, imported on first use
        from . import weights

        return getattr(weights, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
