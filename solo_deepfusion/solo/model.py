"""Build and load solo-learn models (stock or variant) from a cfg, with the stem option."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from solo.methods import METHODS
from solo.methods.base import BaseMethod
from solo.utils.misc import omegaconf_select
from solo.utils.momentum import initialize_momentum_params

from solo_deepfusion.hub.backbones import RESNET_STEMS, set_resnet_stem
from solo_deepfusion.solo.checkpoints import read_checkpoint
from solo_deepfusion.validation import check_choice

STEMS = ("auto", *RESNET_STEMS)


def apply_stem(model: BaseMethod, stem: str, seed: int = 0) -> None:
    """Give ResNet backbones the ``imagenet`` or ``cifar`` stem; ``auto`` keeps solo-learn's.

    solo-learn picks the CIFAR stem exactly when ``data.dataset`` is cifar10/100; this option
    decouples the stem from the data so CPU-scale recipes can choose.
    """
    check_choice("backbone.stem", stem, STEMS)
    if stem == "auto" or not model.backbone_name.startswith("resnet"):
        return
    # Draw the new stem from its own seed: the global RNG has been advanced by however many
    # parameters the method's heads drew, so an MLP run and a transformer run of one seed would
    # otherwise start from different stems.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        set_resnet_stem(model.backbone, stem)
    if hasattr(model, "momentum_backbone"):
        set_resnet_stem(model.momentum_backbone, stem)
        initialize_momentum_params(model.backbone, model.momentum_backbone)


def build_model(cfg: DictConfig) -> BaseMethod:
    """``METHODS[cfg.method](cfg)`` with the plugin's variants registered and the stem applied."""
    from solo_deepfusion.solo import register

    register()
    if cfg.method not in METHODS:
        raise ValueError(f"method={cfg.method!r} is not one of {sorted(METHODS)}")
    model = METHODS[cfg.method](cfg)
    apply_stem(model, omegaconf_select(cfg, "backbone.stem", "auto"), cfg.get("seed", 0))
    return model


def model_from_checkpoint(
    ckpt_path: str | Path, cfg: DictConfig, *, strict: bool = True
) -> BaseMethod:
    """Rebuild the model of ``cfg`` and load a Lightning checkpoint's weights into it.

    The file is read with ``weights_only=True`` (:func:`~solo_deepfusion.solo.checkpoints.
    read_checkpoint`): a checkpoint that holds code is refused with a ``ValueError``.
    """
    model = build_model(cfg)
    checkpoint = read_checkpoint(ckpt_path)
    model.load_state_dict(checkpoint["state_dict"], strict=strict)
    return model
