"""Measurements of a solo-learn model: where its head is, its features and head outputs, the
head-output 1-NN, attention maps. The monitor, the fusion analysis and the bench all use these.

>>> head = head_module(model)                        # the variant's head, or the stock MLP
>>> with evaluating(model), local_attention(fusion_head(model)):
...     feats = dataset_features(model, dataset, torch.arange(len(dataset)))
...     rows = unsupervised_accuracy(model, feats, labels, [64, 256])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from solo_deepfusion.fusion import FusionStats, fusion_stats, leave_one_out_1nn_accuracy
from solo_deepfusion.heads import TransformerProjector

LOADER_BATCH = 256  # images per backbone call when extracting evaluation features


def _is_dino(model: nn.Module) -> bool:
    return hasattr(model, "head") and hasattr(model.head, "mlp")


def head_path(model: nn.Module) -> str:
    """Where the projection head lives: the variant's, or the stock method's (DINO: head.mlp)."""
    path = getattr(model, "context_projector", None)
    if path:
        return path
    return "head.mlp" if _is_dino(model) else "projector"


def momentum_head_path(model: nn.Module) -> str | None:
    """The EMA copy of the head of a momentum method, else ``None``."""
    if not hasattr(model, "momentum_backbone"):
        return None
    path = getattr(model, "momentum_context_projector", None)
    if path:
        return path
    return "momentum_head.mlp" if _is_dino(model) else "momentum_projector"


def head_module(model: nn.Module) -> nn.Module:
    """The projection head (with the method's tail for a variant)."""
    return model.get_submodule(head_path(model))


def fusion_head(model: nn.Module) -> TransformerProjector:
    """The ``TransformerProjector`` of a ``<method>_transformer`` model."""
    path = getattr(model, "context_projector", None)
    head = model.get_submodule(path) if path else None
    head = getattr(head, "head", head)
    if not isinstance(head, TransformerProjector):
        raise ValueError(
            f"{type(model).__name__} has no transformer projection head (found "
            f"{type(head).__name__}); Deep Fusion needs a <method>_transformer model"
        )
    return head


def head_tail(model: nn.Module) -> nn.Module:
    """What a ``<method>_transformer`` model applies to its head's output before the loss
    (MoCo v3's last BatchNorm; ``nn.Identity`` for most methods)."""
    fusion_head(model)  # the same error for a model without a transformer head
    return head_module(model).tail


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients; each module's own train/eval flag is restored after."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes:
            module.training = mode


@contextmanager
def local_attention(head: nn.Module) -> Iterator[None]:
    """Attend within this process's tokens only (no all-gather), restored after."""
    modules = [m for m in head.modules() if hasattr(m, "gather_distributed")]
    saved = [m.gather_distributed for m in modules]
    for module in modules:
        module.gather_distributed = False
    try:
        yield
    finally:
        for module, value in zip(modules, saved, strict=True):
            module.gather_distributed = value


def backbone_features(model: nn.Module, images: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Pooled ``model.backbone`` features of ``images``, ``chunk`` images at a time."""
    weight = next(model.backbone.parameters())
    return torch.cat(
        [
            model.backbone(images[start : start + chunk].to(weight.device, weight.dtype))
            for start in range(0, images.shape[0], chunk)
        ]
    )


def dataset_features(
    model: nn.Module,
    dataset: Dataset,
    indices: torch.Tensor,
    batch_size: int = LOADER_BATCH,
    workers: int = 0,
) -> torch.Tensor:
    """Backbone features of ``dataset[indices]``, in that order (a progress bar on a terminal)."""
    loader = DataLoader(
        Subset(dataset, indices.tolist()), batch_size=batch_size, num_workers=workers
    )
    batches = tqdm(loader, desc="backbone features", unit="batch", leave=False, disable=None)
    return torch.cat([backbone_features(model, images) for images, _ in batches])


def head_outputs(model: nn.Module, feats: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Head outputs (the method's tail included) of ``feats``, one batch of ``batch_size`` at a
    time (a transformer head attends within it); the last incomplete batch is dropped."""
    head = head_module(model)
    usable = feats.shape[0] // batch_size * batch_size
    return torch.cat([head(chunk) for chunk in feats[:usable].split(batch_size)])


def unsupervised_accuracy(
    model: nn.Module, feats: torch.Tensor, labels: torch.Tensor, batch_sizes: Sequence[int]
) -> dict[str, Any]:
    """The authors' "unsupervised accuracy": leave-one-out 1-NN of head outputs (and, for
    comparison, of backbone features) within each evaluation batch, per batch size.

    ``feats`` are the backbone features of the evaluation images in their fixed order. A batch
    size that scores nothing (larger than the set, or below 2) has ``None`` accuracies.
    """
    rows = []
    for size in batch_sizes:
        scored = feats.shape[0] // size * size if size >= 2 else 0
        row: dict[str, Any] = {"batch_size": size, "scored": scored, "head": None, "backbone": None}
        if scored:
            outputs = head_outputs(model, feats, size)
            row["head"] = leave_one_out_1nn_accuracy(outputs, labels[:scored], size)
            row["backbone"] = leave_one_out_1nn_accuracy(feats[:scored], labels[:scored], size)
        rows.append(row)
    return {
        "num_images": feats.shape[0],
        "backbone_all": leave_one_out_1nn_accuracy(feats, labels, None),
        "per_batch_size": rows,
    }


def attention(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_views: int = 1
) -> tuple[list[torch.Tensor], list[FusionStats]]:
    """Attention maps (on the CPU) and statistics of one batch, its features repeated
    ``num_views`` times (the joint context's sequence)."""
    feats = backbone_features(model, images).repeat(num_views, 1)
    _, maps = fusion_head(model)(feats, num_views=num_views, return_attention=True)
    maps = [m.cpu() for m in maps]
    return maps, fusion_stats(maps, labels, num_views=num_views)
