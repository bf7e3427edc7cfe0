"""Zoo backbones for plain PyTorch: torchvision ResNets with the stem the entry records.

>>> backbone = load_backbone("simclr-r18-cifar10-cpu")   # verified download; images -> 512-d
>>> backbone.pretrained_cfg["mean"], backbone.pretrained_cfg["input_size"]
((0.4914, 0.4822, 0.4465), (3, 32, 32))
>>> features = backbone(eval_transform("simclr-r18-cifar10-cpu")(image)[None])  # (1, 512)

Needs torch and torchvision only: solo-learn builds its ResNets from torchvision's, drops ``fc``
and, for the CIFAR stem, swaps ``conv1`` and ``maxpool`` (``solo/methods/base.py``); this module
builds the same module, so the zoo's backbone weights load into it strictly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torchvision
from torch import nn
from torchvision import transforms

from .download import download
from .manifest import PathLike, ZooEntry, get_entry
from .weights import load_state_dict, upcast

RESNETS: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
}
RESNET_STEMS = ("imagenet", "cifar")


def set_resnet_stem(resnet: nn.Module, stem: str) -> None:
    """Give ``resnet`` solo-learn's CIFAR stem (3x3 conv, no max-pool) or torchvision's own."""
    if stem not in RESNET_STEMS:
        raise ValueError(f"backbone.stem={stem!r} is not supported; choose one of {RESNET_STEMS}")
    if stem == "cifar":
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
        resnet.maxpool = nn.Identity()
    else:  # ~8x fewer activations at 32 px (the authors' setting)
        resnet.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        resnet.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)


def build_resnet(name: str, stem: str, kwargs: Mapping[str, Any] | None = None) -> nn.Module:
    """solo-learn's ResNet backbone ``name`` (no ``fc``: images -> pooled features)."""
    if name not in RESNETS:
        raise ValueError(
            f"backbone.name={name!r} is not a torchvision ResNet; choose one of "
            f"{sorted(RESNETS)}, or load the whole model with solo-learn (hub.load_model)"
        )
    resnet = RESNETS[name](**dict(kwargs or {}))
    resnet.fc = nn.Identity()
    set_resnet_stem(resnet, stem)
    return resnet


def load_backbone(
    name: str | ZooEntry,
    *,
    cache_dir: PathLike | None = None,
    offline: bool | None = None,
    manifest: PathLike | None = None,
    progress: bool = True,
) -> nn.Module:
    """The entry's backbone with its verified weights, loaded strictly, float32, in eval mode.

    Built from the entry's ``backbone`` record (name, kwargs, stem) without solo-learn. Files
    come verified from the cache (see :func:`solo_deepfusion.hub.download`). Its
    ``pretrained_cfg`` (timm's convention) says what input it expects: see
    :func:`eval_transform`.
    """
    entry = name if isinstance(name, ZooEntry) else get_entry(name, manifest)
    backbone = entry_backbone(entry)
    path = download(entry, role="backbone", cache_dir=cache_dir, offline=offline, progress=progress)
    backbone.load_state_dict(upcast(load_state_dict(path)), strict=True)
    return backbone.eval()


def entry_backbone(entry: ZooEntry) -> nn.Module:
    """The entry's architecture (untrained), with the entry's ``pretrained_cfg`` attached."""
    record = entry.backbone
    if "name" not in record or "stem" not in record:
        raise ValueError(f"zoo entry {entry.name!r}: its backbone record lacks name or stem")
    backbone = build_resnet(record["name"], record["stem"], record.get("kwargs"))
    backbone.pretrained_cfg = entry.pretrained_cfg
    return backbone


def eval_transform(name: str | ZooEntry, *, manifest: PathLike | None = None) -> Callable:
    """The torchvision transform of the entry's preprocessing, PIL image -> normalised tensor:
    resize the shorter side, centre-crop to ``input_size``, scale to [0, 1], normalise."""
    entry = name if isinstance(name, ZooEntry) else get_entry(name, manifest)
    p = entry.preprocessing
    if not p:
        raise ValueError(f"zoo entry {entry.name!r} records no preprocessing (manifest field)")
    _, height, width = p["input_size"]
    mode = transforms.InterpolationMode(p["interpolation"])
    return transforms.Compose(
        [
            transforms.Resize(height if height == width else (height, width), interpolation=mode),
            transforms.CenterCrop((height, width)),
            transforms.ToTensor(),
            transforms.Normalize(p["mean"], p["std"]),
        ]
    )
