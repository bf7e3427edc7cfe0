"""Model zoo client: manifest, verified downloads, cache checks and safetensors weights.

>>> from solo_deepfusion import hub
>>> hub.list_models()
['simclr-deepfusion-r18-cifar10-cpu', ...]
>>> entry = hub.get_entry("simclr-deepfusion-r18-cifar10-cpu")
>>> path = hub.download(entry.name)                       # verified, cached, resumable
>>> state, entry = hub.load_backbone_state(entry.name)    # float32 tensors
>>> [str(r) for r in hub.verify()]                        # ok / missing / corrupted
>>> backbone = hub.load_backbone(entry.name)              # nn.Module: images -> features
>>> backbone.pretrained_cfg["input_size"], hub.eval_transform(entry.name)  # its preprocessing
>>> model = hub.load_model(entry.name)                    # the whole solo-learn model
>>> folder = hub.export_solo(entry.name, "solo_ckpts")    # for solo-learn's main_linear/main_knn

Importing this package does not import torch (the weight helpers, ``load_backbone`` and
``eval_transform`` load it on first use). Those need torch and torchvision only; ``load_model`` and
``export_solo`` come from :mod:`solo_deepfusion.solo.zoo` on first use and need solo-learn.
"""

from __future__ import annotations

import importlib
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
    from solo_deepfusion.solo.zoo import export_solo, load_model

    from .backbones import eval_transform, load_backbone
    from .weights import load_backbone_state, load_state_dict, read_metadata, save_state_dict

# name -> module that defines it, imported on first use (torch; solo-learn for the last two)
_LAZY = {
    "load_backbone_state": "solo_deepfusion.hub.weights",
    "load_state_dict": "solo_deepfusion.hub.weights",
    "read_metadata": "solo_deepfusion.hub.weights",
    "save_state_dict": "solo_deepfusion.hub.weights",
    "load_backbone": "solo_deepfusion.hub.backbones",
    "eval_transform": "solo_deepfusion.hub.backbones",
    "load_model": "solo_deepfusion.solo.zoo",
    "export_solo": "solo_deepfusion.solo.zoo",
}

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
    "eval_transform",
    "export_solo",
    "get_entry",
    "is_offline",
    "list_models",
    "load_backbone",
    "load_backbone_state",
    "load_manifest",
    "load_model",
    "load_state_dict",
    "read_metadata",
    "resolve_cache_dir",
    "save_state_dict",
    "sha256_file",
    "validate_manifest",
    "verify",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
