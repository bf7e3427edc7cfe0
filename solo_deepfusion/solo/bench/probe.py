"""The probe of a training run: epoch and step times, per-epoch reseeding of the data order, a
hash of the samples seen and of the initial backbone, peak memory."""

from __future__ import annotations

import hashlib
import random
import resource
import statistics
import time
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn


def _epoch_seed(seed: int, epoch: int) -> int:
    digest = hashlib.sha256(f"bench:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


class BenchProbe(pl.Callback):
    """Times epochs and steps, reseeds every epoch, hashes the data order, reads peak memory.

    * Epoch time: from ``on_train_epoch_start`` to the end of its last training batch (data
      loading and steps; validation and checkpointing come after and are left out). On CUDA,
      CUDA events time the GPU's stream, so no step waits for a synchronisation.
    * Reseeding: torch (CPU and CUDA), numpy and ``random`` get ``f(seed, epoch)`` before the
      loader's iterator draws its permutation and worker seeds. Lightning creates epoch 0's
      iterator early (a loader with workers prefetches indices at once): in
      ``configure_optimizers`` when it reads ``trainer.estimated_stepping_batches`` (solo-learn
      does), else after the sanity check. So epoch 0's seed is set in ``setup`` (after the model
      is built, before the optimizers), again after the sanity check, and at the epoch start;
      later epochs' iterators are created after ``on_train_epoch_start``.
    * ``data_order_sha256``: SHA-256 of the training batches' first element (sample indices)
      over all epochs, gathered on the device and hashed once per epoch.
    * Peak memory: ``torch.cuda.max_memory_allocated`` over training (reset at its start) on
      CUDA; the process's max RSS (``getrusage``) always.
    * ``backbone_init_sha256``: SHA-256 of the backbone's weights before training (``setup``).
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.seed = seed
        self.cuda = torch.cuda.is_available()
        self.epoch_seconds: list[float] = []
        self.step_seconds: list[float] = []
        self.validated_epoch: int | None = None
        self.peak_gpu_bytes: int | None = None
        self.peak_rss_bytes: int | None = None
        self.backbone_init_sha256: str | None = None
        self._hash = hashlib.sha256()
        self._indices: list[torch.Tensor] = []
        self._marks: list[Any] = []
        self._epoch_start: Any = None

    def _mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _seconds(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) / 1000 if self.cuda else b - a

    @property
    def data_order_sha256(self) -> str | None:
        return self._hash.hexdigest() if self.epoch_seconds else None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.cuda = pl_module.device.type == "cuda"
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def _reseed(self, epoch: int) -> None:
        seed = _epoch_seed(self.seed, epoch)
        torch.manual_seed(seed)
        np.random.seed(seed)
        random.seed(seed)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        backbone = getattr(pl_module, "backbone", None)
        if backbone is not None and self.backbone_init_sha256 is None:
            self.backbone_init_sha256 = state_sha256(backbone)
        self._reseed(trainer.current_epoch)

    def on_sanity_check_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reseed(trainer.current_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reseed(trainer.current_epoch)
        self._indices, self._marks = [], []
        self._epoch_start = self._mark()

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        first = batch[0] if isinstance(batch, list | tuple) and batch else None
        if isinstance(first, torch.Tensor):
            self._indices.append(first.detach().flatten().clone())
        self._marks.append(self._mark())

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        self._marks.append(self._mark())

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._marks:
            return
        if self.cuda:
            torch.cuda.synchronize(pl_module.device)
        self.epoch_seconds.append(self._seconds(self._epoch_start, self._marks[-1]))
        pairs = zip(self._marks[::2], self._marks[1::2], strict=False)
        self.step_seconds += [self._seconds(a, b) for a, b in pairs]
        if self._indices:
            self._hash.update(torch.cat(self._indices).cpu().numpy().astype(np.int64).tobytes())
        self._indices, self._marks = [], []

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.validated_epoch = trainer.current_epoch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.cuda:
            self.peak_gpu_bytes = int(torch.cuda.max_memory_allocated(pl_module.device))
        self.peak_rss_bytes = peak_rss_bytes()

    def summary(self) -> dict[str, Any]:
        """Time and memory numbers for the record."""
        epochs = self.epoch_seconds
        steady = epochs[1:] if len(epochs) > 1 else epochs  # the first epoch warms up
        return {
            "time_per_epoch_s": statistics.fmean(steady) if steady else None,
            "epoch_times_s": epochs,
            "step_time_median_s": statistics.median(self.step_seconds)
            if self.step_seconds
            else None,
            "steps": len(self.step_seconds),
            "peak_gpu_bytes": self.peak_gpu_bytes,
            "peak_rss_bytes": self.peak_rss_bytes,
        }


def state_sha256(module: nn.Module) -> str:
    """SHA-256 of a module's parameters and buffers (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def peak_rss_bytes() -> int:
    """Max resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
