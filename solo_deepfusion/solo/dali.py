"""solo-learn's DALI data modules, made to run with ``dali.device=cpu`` on a machine without GPU.

Upstream behaviour worked around here (solo-learn 1.0.6), and nowhere else:

* Both data modules build their pipelines with ``device_id=trainer.local_rank``. DALI refuses that
  without CUDA ("You are trying to create a GPU DALI pipeline while CUDA is not available"); a
  CPU-only pipeline takes ``device_id=None``.
* ``DeepClusterV2.on_train_start`` sizes its memory banks with
  ``len(trainer.train_dataloader.dataset)`` or, failing that, with
  ``trainer.train_dataloader.loaders.dataset_size``: Lightning 1.x's ``CombinedLoader`` API. On
  Lightning 2 the loader is the DALI iterator itself, so ours answers to ``loaders`` too.

Importing this module needs DALI (``pip install nvidia-dali-cuda130``).
"""

from __future__ import annotations

from typing import Any

import torch
from nvidia.dali.plugin.pytorch import LastBatchPolicy
from omegaconf import DictConfig
from solo.data import dali_dataloader as solo_dali
from solo.data.pretrain_dataloader import FullTransformPipeline, NCropAugmentation
from torch.utils.data import DataLoader

__all__ = [
    "ClassificationDALIDataModule",
    "PretrainDALIDataModule",
    "check_dali_device",
    "pretrain_datamodule",
]


def check_dali_device(dali_device: str) -> None:
    """Fail early, and say what to do, when a GPU DALI pipeline is asked for without CUDA."""
    if dali_device == "gpu" and not torch.cuda.is_available():
        raise ValueError("dali.device=gpu needs CUDA; on this machine use ++dali.device=cpu")


class _HostPipeline:
    """Builds a pipeline with ``device_id=None`` when all its operators run on the CPU."""

    device: str

    def pipeline(self, **kwargs: Any) -> Any:
        if self.device == "cpu":
            kwargs["device_id"] = None
        return super().pipeline(**kwargs)


class _PretrainPipelineBuilder(_HostPipeline, solo_dali.PretrainPipelineBuilder):
    pass


class _NormalPipelineBuilder(_HostPipeline, solo_dali.NormalPipelineBuilder):
    pass


class _CustomNormalPipelineBuilder(_HostPipeline, solo_dali.CustomNormalPipelineBuilder):
    pass


_HOST_BUILDERS = {
    solo_dali.NormalPipelineBuilder: _NormalPipelineBuilder,
    solo_dali.CustomNormalPipelineBuilder: _CustomNormalPipelineBuilder,
}


class _PretrainWrapper(solo_dali.PretrainWrapper):
    @property
    def loaders(self) -> _PretrainWrapper:
        """What DeepClusterV2 reads ``dataset_size`` from (Lightning 1.x ``CombinedLoader``)."""
        return self


class PretrainDALIDataModule(solo_dali.PretrainDALIDataModule):
    """solo-learn's pretraining DALI module, CPU-capable; validates on a torchvision loader."""

    def __init__(self, *args: Any, val_loader: DataLoader | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.num_workers = max(1, self.num_workers)  # DALI threads; torchvision's 0 means 1
        if val_loader is not None:
            # As solo-learn's main_pretrain: DALI trains, the torchvision loader validates.
            self.val_dataloader = lambda: val_loader

    def setup(self, stage: str | None = None) -> None:
        # solo-learn's setup, building through the CPU-aware builder and wrapper above.
        check_dali_device(self.dali_device)
        self.device_id = self.trainer.local_rank
        self.shard_id = self.trainer.global_rank
        self.num_shards = self.trainer.world_size
        on_gpu = self.dali_device == "gpu"
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if on_gpu else "cpu")

        builder = _PretrainPipelineBuilder(
            self.train_data_path,
            batch_size=self.batch_size,
            transforms=self.transforms,
            device=self.dali_device,
            device_id=self.device_id,
            shard_id=self.shard_id,
            num_shards=self.num_shards,
            num_threads=self.num_workers,
            no_labels=self.no_labels,
            encode_indexes_into_labels=self.encode_indexes_into_labels,
            data_fraction=self.data_fraction,
        )
        pipeline = builder.pipeline(
            batch_size=builder.batch_size,
            num_threads=builder.num_threads,
            device_id=builder.device_id,
            seed=builder.seed,
        )
        pipeline.build()
        output_map = [
            *(f"large{i}" for i in range(self.num_large_crops)),
            *(f"small{i}" for i in range(self.num_small_crops)),
            "label",
        ]
        self.train_loader = _PretrainWrapper(
            model_batch_size=self.batch_size,
            model_rank=self.device_id,
            model_device=self.device,
            dataset_size=pipeline.epoch_size("Reader"),
            conversion_map=builder.conversion_map if self.encode_indexes_into_labels else None,
            pipelines=pipeline,
            output_map=output_map,
            reader_name="Reader",
            last_batch_policy=LastBatchPolicy.DROP,
            auto_reset=True,
        )


class ClassificationDALIDataModule(solo_dali.ClassificationDALIDataModule):
    """solo-learn's linear-evaluation DALI module, CPU-capable; validates on ``val_loader``."""

    def __init__(self, *args: Any, val_loader: DataLoader | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pipeline_class = _HOST_BUILDERS[self.pipeline_class]
        self.num_workers = max(1, self.num_workers)  # DALI threads; torchvision's 0 means 1
        if val_loader is not None:
            # As solo-learn's main_linear: the torchvision loader validates, to save memory.
            self.val_dataloader = lambda: val_loader

    def setup(self, stage: str | None = None) -> None:
        check_dali_device(self.dali_device)
        super().setup(stage)


def pretrain_datamodule(cfg: DictConfig, val_loader: DataLoader | None) -> PretrainDALIDataModule:
    """The DALI pretraining data of a parsed config, as ``main_pretrain`` builds it."""
    transform = FullTransformPipeline(
        [
            NCropAugmentation(
                solo_dali.build_transform_pipeline_dali(
                    cfg.data.dataset, aug, dali_device=cfg.dali.device
                ),
                aug.num_crops,
            )
            for aug in cfg.augmentations
        ]
    )
    return PretrainDALIDataModule(
        dataset=cfg.data.dataset,
        train_data_path=cfg.data.train_path,
        transforms=transform,
        num_large_crops=cfg.data.num_large_crops,
        num_small_crops=cfg.data.num_small_crops,
        num_workers=cfg.data.num_workers,
        batch_size=cfg.optimizer.batch_size,
        no_labels=cfg.data.no_labels,
        data_fraction=cfg.data.fraction,
        dali_device=cfg.dali.device,
        encode_indexes_into_labels=cfg.dali.encode_indexes_into_labels,
        val_loader=val_loader,
    )
