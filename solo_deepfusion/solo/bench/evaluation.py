"""Measurements of a trained cell: head cost, unsupervised (1-NN) accuracies, the spread of the
head's outputs, fusion ratio, and the offline linear and k-NN evaluations of its saved run."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from solo_deepfusion.devices import resolve_device
from solo_deepfusion.fusion import summarize
from solo_deepfusion.heads import TransformerProjector, count_flops, count_parameters
from solo_deepfusion.heads.diagnostics import output_cosine, output_rank
from solo_deepfusion.linear_probe import linear_probe
from solo_deepfusion.solo.analysis import eval_transform
from solo_deepfusion.solo.bench.jobs import Job
from solo_deepfusion.solo.context import ContextProjector
from solo_deepfusion.solo.evaluate import run_knn, run_linear
from solo_deepfusion.solo.measure import (
    dataset_features,
    evaluating,
    head_module,
    head_outputs,
    local_attention,
    momentum_head_path,
    unsupervised_accuracy,
)
from solo_deepfusion.solo.monitor import (
    MONITOR_SEED,
    FusionMonitor,
    balanced_indices,
    dataset_targets,
    load_samples,
)


def head_cost(model: nn.Module, cfg: DictConfig) -> dict[str, Any]:
    """Parameters of the (online) head and its forward FLOPs for one training step's tokens.

    ``T = num_large_crops x batch_size`` tokens: one call on all of them for a ``joint``
    transformer (attention over ``T``), one call per crop of ``batch_size`` otherwise. Counted
    with :func:`~solo_deepfusion.heads.count_flops` in eval mode.
    """
    head = head_module(model)
    views, batch = cfg.data.num_large_crops, cfg.optimizer.batch_size
    param = next(head.parameters())
    x = torch.randn(views * batch, model.features_dim, device=param.device, dtype=param.dtype)
    joint = isinstance(head, ContextProjector) and head.joint
    was_training = head.training
    head.eval()
    try:
        if joint:
            flops = count_flops(lambda: head.tail(head.head(x, num_views=views)))
        else:
            flops = views * count_flops(lambda: head(x[:batch]))
    finally:
        head.train(was_training)
    momentum = momentum_head_path(model)
    return {
        "head_params": count_parameters(head),
        "head_params_momentum": None
        if momentum is None
        else count_parameters(model.get_submodule(momentum)),
        "head_tokens": views * batch,
        "head_flops": int(flops),
        "head_context": "joint" if joint else "view",
    }


def unsupervised_accuracies(
    model: nn.Module,
    feats: torch.Tensor,
    labels: torch.Tensor,
    batch_sizes: Sequence[int],
    train_batch_size: int,
) -> dict[str, float | None]:
    """The authors' "unsupervised accuracy" (paper-notes §3.4) as record metrics.

    :func:`~solo_deepfusion.solo.measure.unsupervised_accuracy` per evaluation batch size
    (``uacc_b<B>_head`` / ``_backbone``) and at the training batch size, as the authors' code
    does (``uacc_train_bs_head``); ``backbone_1nn_acc`` over the whole set.
    """
    result = unsupervised_accuracy(model, feats, labels, [*batch_sizes, train_batch_size])
    *rows, train = result["per_batch_size"]
    out: dict[str, float | None] = {}
    for row in rows:
        out[f"uacc_b{row['batch_size']}_head"] = row["head"]
        out[f"uacc_b{row['batch_size']}_backbone"] = row["backbone"]
    out["uacc_train_bs_head"] = train["head"]
    out["backbone_1nn_acc"] = result["backbone_all"]
    return out


def output_spread(model: nn.Module, feats: torch.Tensor, batch_size: int) -> dict[str, float]:
    """Mean cosine between different images' head outputs (the method's tail included) and
    their effective rank, per evaluation batch of ``batch_size``, averaged over the batches.

    Measured for every head, so a transformer's collapse diagnostics have the stock MLP head's
    as reference (:mod:`~solo_deepfusion.heads.diagnostics`); empty when no batch is full.
    """
    if feats.shape[0] < batch_size:
        return {}
    batches = head_outputs(model, feats, batch_size).split(batch_size)
    return {
        "eval_output_cosine": sum(map(output_cosine, batches)) / len(batches),
        "eval_output_rank": sum(map(output_rank, batches)) / len(batches),
    }


def fusion_numbers(model: nn.Module, dataset: Dataset, samples: int) -> dict[str, Any]:
    """Per-layer fusion ratio of a class-balanced batch of ``dataset`` (transformer heads)."""
    head = head_module(model)
    if not (isinstance(head, ContextProjector) and isinstance(head.head, TransformerProjector)):
        return {}
    indices = balanced_indices(dataset_targets(dataset), samples, seed=MONITOR_SEED)
    images, labels = load_samples(dataset, indices.tolist())
    stats = FusionMonitor(images, labels).compute(model)
    summary = summarize(stats)
    return {
        "fusion_ratio_last": summary["last_fusion_ratio"],
        "fusion_ratio_layers": [s.fusion_ratio for s in stats],
        "fusion_samples": int(images.shape[0]),
    }


def feature_probe_accuracy(
    model: nn.Module, train: ImageFolder, val: ImageFolder, workers: int
) -> dict[str, Any]:
    """Top-1 of a linear probe on the backbone's features of every training and validation
    image (evaluation transform, no augmentation), fitted to convergence on the model's
    device."""
    feats = [
        dataset_features(model, dataset, torch.arange(len(dataset)), workers=workers)
        for dataset in (train, val)
    ]
    labels = [torch.as_tensor(dataset.targets) for dataset in (train, val)]
    result = linear_probe(feats[0], labels[0], feats[1], labels[1], device=feats[0].device)
    return {"acc1": result.accuracy, "weight_decay": result.weight_decay}


def evaluate_in_memory(model: nn.Module, cfg: DictConfig, job: Job) -> dict[str, Any]:
    """Unsupervised accuracies, output spread, the feature probe and the fusion ratio of the
    trained model."""
    if job.val_path is None:
        return {}
    settings = job.eval
    device = resolve_device(settings["device"])
    model.to(device)
    transform = eval_transform(OmegaConf.create({"data": {"dataset": settings["dataset"]}}))
    dataset = ImageFolder(job.val_path, transform=transform)
    targets = torch.as_tensor(dataset.targets)
    if settings["eval_max_images"]:
        order = balanced_indices(targets, settings["eval_max_images"], seed=MONITOR_SEED)
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(MONITOR_SEED))
    head = head_module(model)
    probe = None
    with evaluating(model), local_attention(head):
        feats = dataset_features(model, dataset, order, workers=settings["workers"])
        labels = targets[order].to(feats.device)
        metrics = unsupervised_accuracies(
            model, feats, labels, settings["eval_batch_sizes"], cfg.optimizer.batch_size
        )
        metrics.update(output_spread(model, feats, cfg.optimizer.batch_size))
        fusion = fusion_numbers(model, dataset, settings["fusion_samples"])
        if settings.get("feature_probe") and job.train_path is not None:
            train = ImageFolder(job.train_path, transform=transform)
            probe = feature_probe_accuracy(model, train, dataset, settings["workers"])
            metrics["feature_linear_acc1"] = probe["acc1"]
    return {
        "metrics": metrics,
        "fusion": fusion,
        "eval_images": int(order.numel()),
        "feature_probe_weight_decay": probe["weight_decay"] if probe else None,
    }


def _with_run(argv: list[str], run: Path) -> list[str]:
    return [a.replace("<run>", str(run)) for a in argv]


def offline_metrics(job: Job, run: Path) -> dict[str, Any]:
    """Offline linear acc@1 and backbone k-NN acc@1 (fractions) from the saved run."""
    metrics: dict[str, Any] = {}
    if job.knn_argv is not None:
        results = run_knn(_with_run(job.knn_argv, run))
        temperatures = {row["temperature"] for row in results["results"]}
        for row in results["results"]:
            suffix = f"_t{row['temperature']:g}" if len(temperatures) > 1 else ""
            metrics[f"knn_k{row['k']}{suffix}_acc1"] = row["acc1"]
    if job.linear_argv is not None:
        metrics["offline_linear_acc1"] = run_linear(_with_run(job.linear_argv, run))["acc1"]
    return metrics
