"""Helpers for tests that need solo-learn: method configs from its own CIFAR recipes."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
import yaml

from solo_deepfusion._host import host_problem

HOST_PROBLEM = host_problem()
requires_host = pytest.mark.skipif(HOST_PROBLEM is not None, reason=HOST_PROBLEM or "")


@functools.cache
def recipe_method_kwargs() -> dict[str, dict]:
    """``method -> method_kwargs`` of solo-learn's stock CIFAR recipes."""
    import solo

    folder = Path(solo.__file__).resolve().parents[1] / "scripts" / "pretrain" / "cifar"
    if not folder.is_dir():
        pytest.skip(f"solo-learn's recipes are not next to its package ({folder})")
    recipes = (yaml.safe_load(path.read_text()) for path in folder.glob("*.yaml"))
    return {r["method"]: r["method_kwargs"] for r in recipes if r.get("method") != "mae"}


def method_cfg(method: str, *, batch_size: int = 8, num_small_crops: int = 0, **projector):
    """A cfg for ``method`` (a METHODS key) that solo-learn accepts, sized for CPU tests."""
    from omegaconf import OmegaConf

    from solo_deepfusion.solo import base_method

    kwargs = dict(recipe_method_kwargs()[base_method(method)])
    if "queue_size" in kwargs:
        kwargs["queue_size"] = 32
    if "whitening_size" in kwargs:  # W-MSE whitens batches: needs more samples than dims
        kwargs["whitening_size"] = batch_size
        kwargs["proj_output_dim"] = batch_size // 2
    cfg = {
        "name": "test",
        "method": method,
        "backbone": {"name": "resnet18"},
        "method_kwargs": kwargs,
        "data": {
            "dataset": "cifar10",
            "train_path": ".",
            "format": "image_folder",
            "num_workers": 0,
            "num_large_crops": 2,
            "num_small_crops": num_small_crops,
            "num_classes": 10,
        },
        "optimizer": {
            "name": "sgd",
            "batch_size": batch_size,
            "lr": 0.05,
            "classifier_lr": 0.1,
            "weight_decay": 1e-5,
            "kwargs": {"momentum": 0.9},
        },
        "scheduler": {"name": "none"},
        "max_epochs": 1,
        "devices": "1",
        "accelerator": "cpu",
        "num_nodes": 1,
        "momentum": {"base_tau": 0.9, "final_tau": 1.0},
    }
    if projector:
        cfg["projector"] = projector
    cfg = OmegaConf.create(cfg)
    OmegaConf.set_struct(cfg, False)
    return cfg


class TinyCrops(torch.utils.data.Dataset):
    """``[index, [crops...], label]`` samples of random 16 px images (8 px small crops)."""

    def __init__(self, size: int = 32, num_large: int = 2, num_small: int = 0) -> None:
        self.size, self.num_large, self.num_small = size, num_large, num_small

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        g = torch.Generator().manual_seed(index)
        crops = [torch.randn(3, 16, 16, generator=g) for _ in range(self.num_large)]
        crops += [torch.randn(3, 8, 8, generator=g) for _ in range(self.num_small)]
        return index, crops, index % 10


def tiny_batch(batch_size: int = 8, num_small: int = 0):
    dataset = TinyCrops(batch_size, num_small=num_small)
    return next(iter(torch.utils.data.DataLoader(dataset, batch_size=batch_size)))


def fit(model, *, steps: int = 2, batch_size: int = 8, num_small: int = 0, callbacks=()):
    import lightning.pytorch as pl

    loader = torch.utils.data.DataLoader(
        TinyCrops(batch_size * steps, num_small=num_small), batch_size=batch_size, drop_last=True
    )
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )
    trainer.fit(model, loader)
    return trainer
