"""The few lines a finished ``pretrain`` prints: what it made, and the commands that come next."""

from __future__ import annotations

import shlex
from pathlib import Path

from lightning.pytorch import Trainer
from omegaconf import DictConfig
from solo.utils.checkpointer import Checkpointer

from solo_deepfusion.solo.measure import fusion_head
from solo_deepfusion.solo.monitor import CollapseMonitor
from solo_deepfusion.solo.run import RECIPES_DIR

__all__ = ["pretrain_summary"]

#: The packaged linear recipe that fits a packaged pretraining recipe's data.
LINEAR_RECIPES = {"cifar10": "cifar10_linear_quick"}


def _run_folder(trainer: Trainer) -> tuple[Path | None, Path | None]:
    """The Checkpointer's run folder and its last checkpoint (``None`` where there is none)."""
    for callback in trainer.callbacks:
        if isinstance(callback, Checkpointer) and getattr(callback, "path", None):
            last = getattr(callback, "last_ckpt", None)
            return Path(callback.path), Path(last) if last else None
    return None, None


def _online_accuracy(trainer: Trainer) -> str:
    value = trainer.callback_metrics.get("val_acc1")
    return "not measured (no validation set)" if value is None else f"{float(value):.1f}%"


def _collapse(trainer: Trainer) -> str | None:
    monitor = next((c for c in trainer.callbacks if isinstance(c, CollapseMonitor)), None)
    if monitor is None or monitor.last is None:
        return None
    stats = monitor.last
    entropy = ", ".join(f"{h:.2f}" for h in stats.entropy)
    return (
        f"step {monitor.last_step}: attention entropy per layer {entropy} nats; "
        f"output cosine {stats.output_cosine:.2f}; effective rank {stats.output_rank:.1f}"
    )


def _linear_command(cfg: DictConfig, run: str) -> str:
    recipe = LINEAR_RECIPES.get(str(cfg.data.dataset))
    data = f"data.train_path={shlex.quote(str(cfg.data.train_path))}"
    if recipe is not None and (RECIPES_DIR / f"{recipe}.yaml").is_file():
        val = f"data.val_path={shlex.quote(str(cfg.data.val_path))}"
        return f"solo-deepfusion linear --config-name {recipe} {run} {data} {val}"
    return (
        "solo-deepfusion linear --config-path <solo-learn>/scripts/linear/<dataset> "
        f"--config-name <recipe>.yaml {run}"
    )


def pretrain_summary(trainer: Trainer, cfg: DictConfig) -> str:
    """Run folder and checkpoint, last online accuracy, the collapse monitor's last reading,
    and the exact ``knn``, ``linear`` and ``fusion`` commands for this run."""
    folder, checkpoint = _run_folder(trainer)
    lines = [f"pretrain done: {cfg.method}, {trainer.current_epoch} epoch(s)"]
    if folder is None:
        lines.append("  no checkpoint written (checkpoint.enabled=false): nothing to evaluate")
        return "\n".join(lines)
    lines += [
        f"  run folder       {folder}",
        f"  checkpoint       {checkpoint or 'none yet'}",
        f"  online linear    {_online_accuracy(trainer)} (val_acc1, last validation)",
    ]
    collapse = _collapse(trainer)
    if collapse is not None:
        lines.append(f"  collapse monitor {collapse}")
    run = shlex.quote(str(folder))
    lines += [
        "next:",
        f"  solo-deepfusion knn --checkpoint-dir {run}",
        f"  {_linear_command(cfg, f'pretrained_feature_extractor={run}')}",
    ]
    try:
        fusion_head(trainer.lightning_module)
    except ValueError:
        lines.append(f"  (no fusion: the {cfg.projector.name} head has no attention to analyse)")
    else:
        val = cfg.data.val_path
        data = shlex.quote(str(val)) if val else "<labelled image folder>"
        lines.append(f"  solo-deepfusion fusion --checkpoint {run} --data {data}")
    return "\n".join(lines)
