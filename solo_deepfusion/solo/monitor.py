"""``FusionMonitor``: Deep Fusion metrics of a fixed labelled batch while a model trains.

Every ``every_n_epochs`` training epochs (and once more when training ends, unless the last
step was just measured) the monitor runs the model's backbone and its transformer head on a
fixed validation batch, in eval mode and without gradients, computes
:func:`~solo_deepfusion.fusion.fusion_stats` per layer, logs
:func:`~solo_deepfusion.fusion.scalar_metrics` (``fusion/layer<k>/<metric>``) to the run's
loggers and appends one JSON line ``{"epoch", "step", "layers"}`` to ``<run dir>/fusion.jsonl``.
``epoch`` is the 0-based index of the epoch just trained, as in the Checkpointer's ``ep=N``
file names; ``layers`` holds one :meth:`FusionStats.to_dict` per layer.

Distributed runs: only rank 0 measures. The head normally gathers keys and values from every
rank, a collective call that would hang with one rank alone, so the monitor switches that off
for its call: attention spans the monitor's own batch, which is the same on every rank. The
other ranks only take part in resolving the run folder (``trainer.log_dir`` is a broadcast).

Turned on from a recipe with ``projector.fusion_monitor=true`` (see
:func:`fusion_monitor_from_cfg`); when off, no callback exists and nothing is computed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from solo.utils.checkpointer import Checkpointer
from solo.utils.misc import omegaconf_select
from torch import nn
from torch.utils.data import Dataset, Subset

from solo_deepfusion.fusion import FusionStats, fusion_stats, scalar_metrics
from solo_deepfusion.heads.diagnostics import CollapseStats, collapse_stats
from solo_deepfusion.jsonl import append_jsonl, json_safe
from solo_deepfusion.solo.measure import (
    backbone_features,
    evaluating,
    fusion_head,
    head_module,
    head_tail,
    local_attention,
)

FUSION_LOG = "fusion.jsonl"
# Keys of `cfg.projector` read by `fusion_monitor_from_cfg` and `collapse_monitor_from_cfg`,
# with their defaults.
MONITOR_DEFAULTS: dict[str, Any] = {
    "fusion_monitor": False,
    "fusion_monitor_every": 1,
    "fusion_monitor_samples": 256,
    "collapse_monitor_every": 50,
}
MONITOR_KEYS = tuple(MONITOR_DEFAULTS)
MONITOR_SEED = 0  # the same batch for every run, whatever its training seed

__all__ = [
    "FUSION_LOG",
    "MONITOR_DEFAULTS",
    "MONITOR_KEYS",
    "CollapseMonitor",
    "FusionMonitor",
    "balanced_indices",
    "collapse_monitor_from_cfg",
    "dataset_targets",
    "fusion_monitor_from_cfg",
    "load_samples",
]


# ---------------------------------------------------------------------------------------------
# A fixed, class-balanced batch


def dataset_targets(dataset: Dataset) -> torch.Tensor:
    """The labels of ``dataset`` as a ``(N,)`` tensor, without loading images when possible.

    Uses ``dataset.targets`` (``ImageFolder``, torchvision's CIFAR) and follows ``Subset``s;
    any other dataset is read sample by sample (``dataset[i][1]``).
    """
    if isinstance(dataset, Subset):
        return dataset_targets(dataset.dataset)[torch.as_tensor(dataset.indices)]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets).flatten()
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])


def balanced_indices(targets: torch.Tensor, num: int, seed: int = 0) -> torch.Tensor:
    """``min(num, N)`` indices spread as evenly over the classes as their sizes allow.

    Each class gives the same count where it can (a small class gives all it has and the
    others share the rest); which samples, and which classes get one more when ``num`` does
    not divide, is drawn with ``seed``. The indices come in a seeded random order.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    generator = torch.Generator().manual_seed(seed)
    targets = torch.as_tensor(targets)
    pools = [
        members[torch.randperm(members.numel(), generator=generator)]
        for members in (torch.nonzero(targets == c).flatten() for c in torch.unique(targets))
    ]
    quota = _class_quota([p.numel() for p in pools], min(num, targets.numel()), generator)
    chosen = torch.cat([pool[:count] for pool, count in zip(pools, quota, strict=True)])
    return chosen[torch.randperm(chosen.numel(), generator=generator)]


def _class_quota(sizes: list[int], num: int, generator: torch.Generator) -> list[int]:
    """How many samples each class gives: water-filling, remainder to random classes."""
    quota = [0] * len(sizes)
    remaining = num
    while remaining > 0:
        open_classes = [c for c, size in enumerate(sizes) if quota[c] < size]
        share = max(1, remaining // len(open_classes))
        for position in torch.randperm(len(open_classes), generator=generator).tolist():
            c = open_classes[position]
            take = min(share, sizes[c] - quota[c], remaining)
            quota[c] += take
            remaining -= take
            if remaining == 0:
                break
    return quota


def load_samples(dataset: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``dataset[i] = (image, label, ...)`` for ``indices``: ``(images, labels)``."""
    samples = [dataset[int(i)] for i in indices]
    images = torch.stack([torch.as_tensor(s[0]) for s in samples])
    return images, torch.tensor([int(s[1]) for s in samples])


# ---------------------------------------------------------------------------------------------
# The callback


class FusionMonitor(pl.Callback):
    """Deep Fusion metrics of a fixed labelled batch every ``every_n_epochs`` epochs.

    Args:
        images: ``(N, C, H, W)`` validation images, already transformed; kept on the CPU and
            moved to the model's device only while measuring.
        labels: ``(N,)`` class ids, used for the metrics only.
        every_n_epochs: measure after epochs ``N-1, 2N-1, ...`` (0-based) and at the end.
        path: where ``fusion.jsonl`` goes when the run has no folder of its own; the run's
            folder is the Checkpointer's, else the first logger's (``trainer.log_dir``).

    ``records`` holds what rank 0 wrote, in order.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: Any,
        every_n_epochs: int = 1,
        path: str | Path | None = None,
    ) -> None:
        super().__init__()
        images = torch.as_tensor(images)
        labels = torch.as_tensor(labels).flatten()
        if images.dim() != 4 or not images.is_floating_point():
            raise ValueError(f"images: expected a float (N, C, H, W) tensor, got {images.shape}")
        if images.shape[0] < 2 or labels.numel() != images.shape[0]:
            raise ValueError(
                f"expected N >= 2 images with one label each, got {images.shape[0]} images "
                f"and {labels.numel()} labels"
            )
        if int(every_n_epochs) < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        self.images = images.detach().cpu()
        self.labels = labels.cpu()
        self.every_n_epochs = int(every_n_epochs)
        self.path = Path(path) if path is not None else None
        self.records: list[dict[str, Any]] = []
        self._epoch = 0
        self._last_step: int | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs == 0:
            self.measure(trainer, pl_module)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._last_step != trainer.global_step:
            self.measure(trainer, pl_module)

    def run_dir(self, trainer: pl.Trainer) -> Path:
        """The Checkpointer's folder, else ``trainer.log_dir``, else ``path``, else the root.

        Call it on every rank: ``trainer.log_dir`` broadcasts from rank 0.
        """
        for callback in trainer.callbacks:
            if isinstance(callback, Checkpointer) and getattr(callback, "path", None):
                return Path(callback.path)
        if trainer.loggers:
            log_dir = trainer.log_dir
            if log_dir:
                return Path(log_dir)
        return self.path if self.path is not None else Path(trainer.default_root_dir)

    def compute(self, pl_module: nn.Module) -> list[FusionStats]:
        """Per-layer statistics of the batch under the model's current weights."""
        head = fusion_head(pl_module)
        with evaluating(pl_module), local_attention(head):
            feats = backbone_features(pl_module, self.images)
            _, maps = head(feats, num_views=1, return_attention=True)
            return fusion_stats(maps, self.labels.to(feats.device), num_views=1)

    def measure(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict | None:
        """Measure, log and append one JSON line (rank 0); return the record (else ``None``)."""
        self._last_step = trainer.global_step
        log_file = self.run_dir(trainer) / FUSION_LOG
        if not trainer.is_global_zero:
            return None
        stats = self.compute(pl_module)
        record = {
            "epoch": self._epoch,
            "step": trainer.global_step,
            "layers": [s.to_dict() for s in stats],
        }
        for logger in trainer.loggers:
            logger.log_metrics(scalar_metrics(stats), step=trainer.global_step)
            logger.save()
        append_jsonl(log_file, record)
        self.records.append(json_safe(record))
        return record


class CollapseMonitor(pl.Callback):
    """Collapse diagnostics of the transformer head on its own training input, every N steps.

    On every ``every_n_steps``-th training step, and on the last, the head's input (the step's
    backbone features, all views) is kept, and after the step the head is run once more on it,
    without gradients and with dropout off, to measure
    :func:`~solo_deepfusion.heads.diagnostics.collapse_stats`, the output cosine and rank after
    the method's tail (what its loss sees): ``collapse/layer<k>/entropy``,
    ``collapse/layer<k>/logit_std``, ``collapse/output_cosine`` and ``collapse/output_rank``
    go to the run's loggers, and the first time a threshold is crossed one warning says which
    (the rank has no threshold). Attention spans this
    process's tokens (no all-gather).
    """

    def __init__(self, every_n_steps: int = 50) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1, got {every_n_steps}")
        self.every_n_steps = every_n_steps
        self.last: CollapseStats | None = None
        self.last_step: int | None = None
        self.warned = False
        self._armed = False
        self._captured: tuple[torch.Tensor, int] | None = None
        self._step = 0
        self._hook: Any = None

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._armed and module.training:
            self._captured = (args[0].detach(), kwargs.get("num_views", 1))
            self._armed = False

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        head = fusion_head(pl_module)
        self._hook = head.register_forward_hook(self._capture, with_kwargs=True)

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._step = trainer.global_step  # the optimizer step this batch makes (0-based)
        last = self._step == int(trainer.estimated_stepping_batches) - 1
        self._armed = last or self._step % self.every_n_steps == 0
        self._captured = None

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._armed = False
        if self._captured is None:
            return
        feats, num_views = self._captured
        self._captured = None
        head = fusion_head(pl_module)
        # Under bf16/fp16 autocast the captured features are half precision; the head's weights
        # are not, and this call runs outside the training step's autocast.
        feats = feats.to(next(head.parameters()).dtype)
        with evaluating(head_module(pl_module)), local_attention(head):  # head and tail
            stats = collapse_stats(head, feats, num_views=num_views, tail=head_tail(pl_module))
        self.last, self.last_step = stats, self._step
        if trainer.is_global_zero:  # straight to the loggers: self.log would repeat old values
            for logger in trainer.loggers:
                logger.log_metrics(stats.scalars(), step=self._step)
        message = stats.warning()
        if message and not self.warned:
            self.warned = True
            pl.utilities.rank_zero_warn(
                f"step {self._step}: {message}. See docs/heads.md, 'When the head "
                "collapses' (projector.norm=pre, projector.qk_norm=true, projector.lr_scale)."
            )


# ---------------------------------------------------------------------------------------------
# From a recipe


def _positive_int(cfg: DictConfig, key: str, minimum: int) -> int:
    value = omegaconf_select(cfg, f"projector.{key}", None)
    value = MONITOR_DEFAULTS[key] if value is None else value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"projector.{key} must be an integer >= {minimum}, got {value!r}")
    return value


def fusion_monitor_from_cfg(
    cfg: DictConfig, val_dataset: Dataset | None = None
) -> FusionMonitor | None:
    """The monitor a recipe asks for with ``projector.fusion_monitor=true``, else ``None``.

    Keys (under ``projector``): ``fusion_monitor`` (default false), ``fusion_monitor_every``
    (epochs between measurements, default 1), ``fusion_monitor_samples`` (batch size, default
    256). The batch is drawn once, class-balanced, from ``val_dataset`` (labelled samples
    ``(image, label)`` with the evaluation transform), with a fixed seed so that every run of a
    comparison is measured on the same images. Needs the ``transformer`` projector.
    """
    if not omegaconf_select(cfg, "projector.fusion_monitor", False):
        return None
    name = omegaconf_select(cfg, "projector.name", None)
    if name != "transformer":
        raise ValueError(
            f"projector.fusion_monitor=true needs the transformer projector, got {name!r}"
        )
    every = _positive_int(cfg, "fusion_monitor_every", 1)
    samples = _positive_int(cfg, "fusion_monitor_samples", 2)
    if val_dataset is None or len(val_dataset) < 2:
        raise ValueError(
            "projector.fusion_monitor=true needs a labelled validation set of >= 2 images "
            "(e.g. data.val_path)"
        )
    indices = balanced_indices(dataset_targets(val_dataset), samples, seed=MONITOR_SEED)
    images, labels = load_samples(val_dataset, indices.tolist())
    return FusionMonitor(images, labels, every_n_epochs=every)


def collapse_monitor_from_cfg(cfg: DictConfig) -> CollapseMonitor | None:
    """The collapse monitor of a ``transformer`` head (on by default), else ``None``.

    ``projector.collapse_monitor_every``: training steps between measurements (default 50;
    0 turns it off).
    """
    if omegaconf_select(cfg, "projector.name", None) != "transformer":
        return None
    every = omegaconf_select(cfg, "projector.collapse_monitor_every", None)
    every = MONITOR_DEFAULTS["collapse_monitor_every"] if every is None else every
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(
            f"projector.collapse_monitor_every must be an integer >= 0 (0: off), got {every!r}"
        )
    return CollapseMonitor(every) if every else None
