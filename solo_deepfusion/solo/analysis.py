"""``solo-deepfusion fusion``: Deep Fusion analysis of a trained ``<method>_transformer`` run.

Example::

    solo-deepfusion fusion --checkpoint trained_models/simclr_transformer/offline-ab12cd34 \\
        --data "$SOLO_DEEPFUSION_DATA/test" --batch-size 256 --out fusion-report

It rebuilds the model from the run's ``args.json`` and checkpoint, runs a seeded, class-balanced
batch of images from an ``ImageFolder`` through backbone and head (eval mode) and writes:

* ``heatmaps.png``: attention per layer (heads averaged, or per head), sorted by class;
* ``fusion_ratio.png``: fusion ratio against layer for the checkpoint, plus one line per
  measured epoch when the run folder has the monitor's ``fusion.jsonl``;
* ``fusion.json``: the numbers (written atomically), also returned by :func:`analyse_checkpoint`.

It also reports the authors' "unsupervised accuracy": leave-one-out 1-NN accuracy (cosine) of
the projector outputs within evaluation batches. The head makes an output depend on its batch,
so outputs are computed batch by batch, for each evaluation batch size, over one fixed seeded
order of the evaluation images (the whole folder, or ``--max-images`` of it, class-balanced);
the last incomplete batch is dropped. Next to it: the backbone features' 1-NN accuracy within
the same batches, and over all evaluation images at once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from solo.data.classification_dataloader import prepare_transforms
from solo.methods.base import BaseMethod
from torch import nn
from torchvision.datasets import ImageFolder

from solo_deepfusion.atomic import write_json
from solo_deepfusion.devices import resolve_device
from solo_deepfusion.errors import UsageError, exit_status
from solo_deepfusion.fusion import (
    format_table,
    plot_attention_heatmaps,
    plot_fusion_ratio,
    summarize,
)
from solo_deepfusion.jsonl import json_safe
from solo_deepfusion.solo.checkpoints import find_run
from solo_deepfusion.solo.data import guard_images
from solo_deepfusion.solo.measure import (
    attention,
    dataset_features,
    evaluating,
    fusion_head,
    local_attention,
    unsupervised_accuracy,
)
from solo_deepfusion.solo.monitor import FUSION_LOG, balanced_indices, load_samples

DATA_ENV = "SOLO_DEEPFUSION_DATA"
EVAL_BATCH_SIZES = (64, 256, 1024)
MAX_EPOCH_CURVES = 8  # monitor epochs drawn in fusion_ratio.png (first, last, evenly between)
# Datasets whose evaluation transform solo-learn knows; others get CIFAR's 32 px one.
_KNOWN_DATASETS = ("cifar10", "cifar100", "stl10", "imagenet", "imagenet100", "custom")

__all__ = [
    "DATA_ENV",
    "EVAL_BATCH_SIZES",
    "accuracy_table",
    "analyse_checkpoint",
    "eval_transform",
    "load_for_analysis",
    "main",
    "monitor_curves",
    "parser",
    "read_monitor_log",
]


# ---------------------------------------------------------------------------------------------
# The run: checkpoint, config, monitor log


def load_for_analysis(checkpoint: str | os.PathLike) -> tuple[BaseMethod, DictConfig, Path]:
    """The model (strictly loaded, eval mode, CPU), its config and its weights file.

    ``checkpoint`` is a ``.ckpt`` file, a run folder, or the name of a zoo entry (its verified
    ``full`` weights are downloaded into the cache).
    """
    run = find_run(checkpoint)
    model, cfg, weights = run.load(), run.cfg, run.checkpoint
    fusion_head(model)  # fail early, with the reason, for a model without a transformer head
    return model.eval(), cfg, weights


def read_monitor_log(run_dir: Path) -> list[dict[str, Any]]:
    """``{"epoch", "step", "fusion_ratio"}`` per epoch of the monitor's ``run_dir/fusion.jsonl``.

    The last record of an epoch wins; lines that are not complete records (e.g. cut by a
    crash) are skipped.
    """
    path = run_dir / FUSION_LOG
    if not path.is_file():
        return []
    by_epoch: dict[int, dict[str, Any]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
            epoch = int(record["epoch"])
            ratios = [layer["fusion_ratio"] for layer in record["layers"]]
        except (ValueError, KeyError, TypeError):
            continue
        by_epoch[epoch] = {"epoch": epoch, "step": record.get("step"), "fusion_ratio": ratios}
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def monitor_curves(records: list[dict[str, Any]], limit: int = MAX_EPOCH_CURVES) -> dict:
    """``{"epoch N (monitor)": per-layer fusion ratios}`` for at most ``limit`` epochs."""
    if len(records) > limit:
        picks = sorted({round(i * (len(records) - 1) / (limit - 1)) for i in range(limit)})
        records = [records[i] for i in picks]
    return {f"epoch {r['epoch']} (monitor)": r["fusion_ratio"] for r in records}


# ---------------------------------------------------------------------------------------------
# Data and measurements


def eval_transform(cfg: DictConfig) -> nn.Module:
    """The evaluation transform of the run's dataset (CIFAR's 32 px one when unknown)."""
    dataset = cfg.data.dataset if cfg.data.dataset in _KNOWN_DATASETS else "cifar10"
    return prepare_transforms(dataset)[1]


def accuracy_table(result: dict[str, Any]) -> str:
    """The 1-NN accuracies as a small fixed-width table."""
    header = ("eval batch", "scored", "head 1-NN", "backbone 1-NN")
    rows = [
        (
            str(r["batch_size"]),
            str(r["scored"]),
            *(f"{r[key]:.4f}" if r[key] is not None else "-" for key in ("head", "backbone")),
        )
        for r in result["per_batch_size"]
    ]
    widths = [max(len(row[c]) for row in (header, *rows)) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    head = "  ".join(cell.rjust(w) for cell, w in zip(header, widths, strict=True))
    total = f"backbone 1-NN over all {result['num_images']} images: {result['backbone_all']:.4f}"
    return "\n".join([head, "-" * len(head), *lines, total])


# ---------------------------------------------------------------------------------------------
# The analysis


def analyse_checkpoint(
    checkpoint: str | os.PathLike,
    data: str | os.PathLike,
    *,
    batch_size: int = 256,
    per_head: bool = False,
    out_dir: str | os.PathLike | None = None,
    num_views: int = 1,
    eval_batch_sizes: Sequence[int] = EVAL_BATCH_SIZES,
    seed: int = 0,
    max_images: int | None = None,
    device: str | None = None,
    num_workers: int = 0,
) -> dict[str, Any]:
    """Analyse a checkpoint on an ``ImageFolder``; write the plots and ``fusion.json``.

    ``checkpoint``: a ``.ckpt`` file next to its ``args.json``, or the run folder.
    ``batch_size``: images in the attention batch (class-balanced, drawn with ``seed``);
    ``num_views``: the batch's features repeated as that many identical views (the joint
    context's sequence length). ``max_images``: evaluation images for the 1-NN accuracies
    (default: the whole folder). Returns what ``fusion.json`` holds.
    """
    if batch_size < 2 or num_views < 1 or any(size < 2 for size in eval_batch_sizes):
        raise ValueError("batch_size and eval_batch_sizes must be >= 2, num_views >= 1")
    model, cfg, ckpt = load_for_analysis(checkpoint)
    out = Path(out_dir) if out_dir is not None else default_out_dir(checkpoint, ckpt)
    check_out_dir(out)
    model.to(resolve_device(device))
    dataset = guard_images(ImageFolder(str(data), transform=eval_transform(cfg)))
    if len(dataset) < 2:
        raise ValueError(f"{data}: need at least 2 images, found {len(dataset)}")
    targets = torch.as_tensor(dataset.targets)
    batch = balanced_indices(targets, batch_size, seed=seed)
    images, labels = load_samples(dataset, batch.tolist())
    if max_images is None:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    else:
        order = balanced_indices(targets, max_images, seed=seed)
    head = fusion_head(model)
    with evaluating(model), local_attention(head):
        maps, stats = attention(model, images, labels, num_views)
        feats = dataset_features(model, dataset, order, workers=num_workers)
        accuracy = unsupervised_accuracy(model, feats, targets[order], eval_batch_sizes)

    monitor = read_monitor_log(ckpt.parent)
    curves = {f"checkpoint ({ckpt.stem})": stats, **monitor_curves(monitor)}
    files = {"heatmaps": "heatmaps.png", "fusion_ratio": "fusion_ratio.png", "json": "fusion.json"}
    plot_attention_heatmaps(
        maps,
        labels,
        out / files["heatmaps"],
        num_views=num_views,
        per_head=per_head,
        class_names=dataset.classes,
    )
    plot_fusion_ratio(curves, out / files["fusion_ratio"], title=f"Deep Fusion: {cfg.method}")
    summary = summarize(stats)
    result = {
        "checkpoint": str(ckpt),
        "method": cfg.method,
        "data": str(data),
        "classes": list(dataset.classes),
        "batch_size": images.shape[0],
        "batch_class_counts": torch.bincount(labels, minlength=len(dataset.classes)).tolist(),
        "num_views": num_views,
        "per_head": per_head,
        "seed": seed,
        "fusion_ratio": summary["fusion_ratio"],
        "fusion": summary,
        "unsupervised_accuracy": accuracy,
        "monitor": monitor,
        "files": files,
    }
    result = json_safe(result)
    write_json(out / "fusion.json", json_safe(result))
    print(format_table(stats))
    print()
    print(accuracy_table(accuracy))
    return result


# ---------------------------------------------------------------------------------------------
# Command line


def _default_data() -> str | None:
    """``$SOLO_DEEPFUSION_DATA/test`` (or ``/val``) when that is a folder."""
    root = os.environ.get(DATA_ENV)
    for split in ("test", "val"):
        if root and (Path(root) / split).is_dir():
            return str(Path(root) / split)
    return None


def parser() -> argparse.ArgumentParser:
    """The ``solo-deepfusion fusion`` options."""
    p = argparse.ArgumentParser(
        prog="solo-deepfusion fusion",
        description="Deep Fusion analysis of a <method>_transformer checkpoint: attention heat "
        "maps per layer sorted by class, fusion ratio per layer, 1-NN accuracy per batch size.",
        epilog="examples:\n"
        "  solo-deepfusion fusion --checkpoint trained_models/simclr_transformer/<version> \\\n"
        "      --data <cifar10 folder>/test\n"
        "  solo-deepfusion fusion --checkpoint simclr-deepfusion-r18-cifar10-cpu --per-head "
        "--max-images 2000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help=".ckpt file or run folder with args.json")
    p.add_argument(
        "--data", default=None, help=f"ImageFolder of labelled images (default: ${DATA_ENV}/test)"
    )
    p.add_argument("--batch-size", type=int, default=256, help="images in the attention batch")
    p.add_argument("--per-head", action="store_true", help="one heat map per head")
    p.add_argument(
        "--out", type=Path, default=None, help="default: <run>/fusion, ./fusion/<zoo entry>"
    )
    p.add_argument("--num-views", type=int, default=1, help="identical views per image")
    p.add_argument(
        "--eval-batch-sizes",
        type=int,
        nargs="+",
        default=list(EVAL_BATCH_SIZES),
        help="evaluation batch sizes of the 1-NN accuracy",
    )
    p.add_argument("--max-images", type=int, default=None, help="evaluation images (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--workers", type=int, default=0, help="data loading workers")
    return p


def safe_name(name: str) -> str:
    """``name`` as one harmless path component: only letters, digits, ``.``, ``-`` and ``_``,
    no leading dot (``../../x`` -> ``x``; never empty)."""
    return re.sub(r"[^\w.-]+", "_", name).lstrip("._") or "checkpoint"


def default_out_dir(checkpoint: str | os.PathLike, weights: Path) -> Path:
    """``<run>/fusion`` for a run's ``.ckpt``; ``./fusion/<name>`` for a zoo entry (its name)
    or a ``.safetensors`` file (its stem): a sanitised name, never the path as given, so
    ``..``, absolute paths and symlinks cannot lead the output out of ``./fusion``."""
    if weights.suffix == ".safetensors":  # never write into the download cache
        name = Path(str(checkpoint)).name
        return Path("fusion") / safe_name(name.removesuffix(".safetensors"))
    return weights.parent / "fusion"


def check_out_dir(out: Path) -> None:
    """A :class:`UsageError` unless ``out`` is, or can be made, a folder."""
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            where = "" if folder == out else f" (--out {out} is under it)"
            raise UsageError(f"--out {folder} is a file, not a folder{where}")


def run_fusion(args: argparse.Namespace) -> int:
    """``solo-deepfusion fusion`` with parsed ``args``; bad input is a :class:`UsageError`, a
    zoo entry that cannot be fetched exit status 1."""
    from solo_deepfusion.hub import ZooError

    data = args.data or _default_data()
    if data is None:
        raise UsageError(f"give --data or set {DATA_ENV} to a folder with test/")
    if args.out is not None:
        check_out_dir(args.out)
    try:
        result = analyse_checkpoint(
            args.checkpoint,
            data,
            batch_size=args.batch_size,
            per_head=args.per_head,
            out_dir=args.out,
            num_views=args.num_views,
            eval_batch_sizes=args.eval_batch_sizes,
            seed=args.seed,
            max_images=args.max_images,
            device=args.device,
            num_workers=args.workers,
        )
    except UsageError:
        raise
    except ZooError as err:  # a zoo entry that could not be fetched (offline, mirrors down)
        print(f"error: {str(err).splitlines()[0]}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as err:  # the analysis names what is wrong
        raise UsageError(str(err)) from err
    except OSError as err:  # the output folder cannot be written
        raise UsageError(f"cannot write the analysis: {err}") from err
    out = args.out or default_out_dir(args.checkpoint, Path(result["checkpoint"]))
    print(f"\nwrote {out}/heatmaps.png, fusion_ratio.png, fusion.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``solo-deepfusion fusion``; returns 0, or 2 for bad arguments or inputs."""
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    return exit_status(lambda: run_fusion(args))


if __name__ == "__main__":
    sys.exit(main())
