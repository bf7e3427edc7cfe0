"""``solo-deepfusion pretrain``: solo-learn's ``main_pretrain`` flow, plus the projector switch.

The command line is ``main_pretrain.py``'s (``--config-path DIR --config-name NAME`` and Hydra
overrides) plus the projector choice, in any of these forms::

    --projector transformer | --projector=transformer | projector=transformer | +projector=...

It selects the ``projector`` config group (so ``projector.depth=4``-style overrides work)
and trains ``<method>_<projector>``; with none, the recipe's ``projector`` (if any) or the one its
``method`` names is used, else ``mlp``: the stock method. ``--config-name`` alone looks in the
packaged recipes. What differs from ``main_pretrain``, each for a reason named where it is done:
the CPU settings (:func:`prepare_hardware`), CIFAR kept as an ImageFolder
(:mod:`solo_deepfusion.solo.data`), DALI without GPU (:mod:`solo_deepfusion.solo.dali`), resuming
(:func:`resume_checkpoint`, :mod:`solo_deepfusion.solo.checkpoints`) and the logger
(:func:`make_logger`). The building blocks are shared with :mod:`solo_deepfusion.solo.evaluate`.
"""

from __future__ import annotations

import difflib
import inspect
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from solo.args.pretrain import parse_cfg
from solo.methods import METHODS
from solo.utils.misc import make_contiguous, omegaconf_select

from solo_deepfusion.errors import UsageError, exit_status
from solo_deepfusion.solo import base_method, projector_config, register, variant_name
from solo_deepfusion.solo.checkpoints import check_fits, run_folder_lock
from solo_deepfusion.solo.data import (
    check_data_paths,
    pretrain_loader,
    pretrain_val_loader,
    unpack_data_paths,
)
from solo_deepfusion.solo.model import build_model
from solo_deepfusion.solo.monitor import collapse_monitor_from_cfg, fusion_monitor_from_cfg
from solo_deepfusion.solo.run import (
    checkpoint_callbacks,
    compose_config,
    config_parser,
    dali_module,
    make_logger,
    make_trainer,
    parse_config_args,
    prepare_hardware,
    resume_checkpoint,
    rewrite_projector_args,
)
from solo_deepfusion.solo.summary import pretrain_summary
from solo_deepfusion.solo.variants import build_head
from solo_deepfusion.validation import check_training

__all__ = ["pretrain", "pretrain_config", "run_pretrain", "select_variant"]


# ---------------------------------------------------------------------------------------------
# Pretraining config


def select_variant(cfg: DictConfig) -> DictConfig:
    """Set ``cfg.method`` to the METHODS entry that trains the method with ``cfg.projector``.

    Without a ``projector`` section, the one named by ``cfg.method`` is used (``mlp`` for a
    stock method), so ``method=simclr_transformer`` works on its own.
    """
    base = base_method(cfg.method)
    implied = cfg.method.removeprefix(base).removeprefix("_") or "mlp"
    if omegaconf_select(cfg, "projector", None) is None:
        cfg.projector = {"name": implied}
    name = cfg.projector.name
    if implied != "mlp" and name != implied:
        raise UsageError(f"method={cfg.method} contradicts projector={name}; give one of them")
    try:
        cfg.method = variant_name(base, name, cfg.projector)
    except ValueError as err:
        raise UsageError(str(err)) from err
    if cfg.method not in METHODS:
        if base in METHODS:
            raise UsageError(f"method {base!r} has no projection head to replace with {name!r}")
        stock = sorted(m for m in METHODS if base_method(m) == m)
        raise UsageError(f"unknown method {base!r}; choose from: {', '.join(stock)}")
    if cfg.method != base:  # the defaults in force, the method's preset among them, spelled out
        try:
            projector_config(cfg, name)
        except ValueError as err:
            raise UsageError(str(err)) from err
    return cfg


# Top-level keys something reads: solo-learn (its parse_cfg, methods, data and callbacks),
# Lightning's Trainer (make_trainer passes every one of its arguments) and this plugin.
SOLO_TOP_LEVEL = {
    "accelerator", "accumulate_grad_batches", "augmentations", "auto_augment", "auto_resume",
    "auto_umap", "backbone", "checkpoint", "cutmix", "dali", "data", "debug_augmentations",
    "defaults", "devices", "finetune", "hydra", "knn_eval", "label_smoothing", "max_epochs",
    "method", "method_kwargs", "mixup", "momentum", "name", "num_nodes", "optimizer",
    "performance", "precision", "pretrain_method", "pretrained_feature_extractor",
    "resume_from_checkpoint", "scheduler", "seed", "strategy", "sync_batchnorm", "wandb",
}  # fmt: skip
PLUGIN_TOP_LEVEL = {"projector"}


def check_top_level_keys(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Refuse a top-level key nothing reads when a command-line override sets it
    (``+max_epoch=3``, ``+foo=1``): a typo would train with the recipe's value while the command
    line says otherwise, and no run is right with it. Such keys in the recipe file itself are
    warned about in one line only: some of solo-learn's own recipes carry them (its ImageNet-100
    SimSiam recipe has ``augmentations_cfg`` and ``wandb_cfg``)."""
    known = SOLO_TOP_LEVEL | PLUGIN_TOP_LEVEL | set(inspect.signature(Trainer.__init__).parameters)
    unknown = sorted(str(k) for k in cfg if k not in known)
    typed = {o.lstrip("+~").split("=", 1)[0].split(".", 1)[0] for o in overrides}
    refused = [k for k in unknown if k in typed]
    if refused:
        close = difflib.get_close_matches(refused[0], known, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(
            f"unknown top-level key(s) {refused}{hint}: neither solo-learn, Lightning's Trainer "
            "nor solo-deepfusion reads them"
        )
    if unknown:
        print(
            f"warning: the recipe's top-level key(s) {unknown} are read by nothing", file=sys.stderr
        )


def check_settings(cfg: DictConfig, overrides: Sequence[str] = ()) -> None:
    """Check the run's settings before any folder is made or data read (one line naming the
    key, its value and what is allowed); ``overrides`` are the command line's."""
    check_top_level_keys(cfg, overrides)
    try:
        check_training(lambda key: omegaconf_select(cfg, key, None))
    except ValueError as err:
        raise UsageError(str(err)) from err
    if omegaconf_select(cfg, "checkpoint.enabled", False):
        check_writable_dir("checkpoint.dir", omegaconf_select(cfg, "checkpoint.dir", None))


def check_writable_dir(key: str, value: object) -> None:
    """``value`` is, or can be made, a folder this process may write in."""
    if not isinstance(value, str) or not value:
        raise UsageError(f"{key}={value!r} must be a folder path")
    path = Path(value).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"{key}={value} cannot be a folder: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{key}={value} is not writable ({existing} is read-only here)")


def check_head(cfg: DictConfig) -> None:
    """Build the head on the ``meta`` device (no memory, no time), so a bad field, type or
    size is one line now, not a traceback once data is loaded."""
    if cfg.method == base_method(cfg.method):  # the stock method's own head
        return
    try:
        with torch.device("meta"):
            build_head(cfg, in_dim=8)
    except ValueError as err:
        raise UsageError(str(err)) from err
    except OmegaConfBaseException as err:
        raise missing_key(cfg, err) from err


def missing_key(cfg: DictConfig, err: OmegaConfBaseException) -> UsageError:
    """The one line for a key the method reads and the recipe lacks."""
    key = getattr(err, "full_key", None) or str(err).splitlines()[0]
    return UsageError(f"method={cfg.method} needs {key}, which the recipe lacks")


def pretrain_config(argv: Sequence[str]) -> DictConfig:
    """The parsed pretraining config of a command line (see the module docstring), its
    settings checked (:func:`check_settings`, :func:`check_head`); no folder is made."""
    register()
    args, overrides = parse_config_args(
        config_parser("solo-deepfusion pretrain"), rewrite_projector_args(argv)
    )
    cfg = compose_config(args.config_dir, args.config_name, overrides)
    check_settings(cfg, overrides)
    cfg = parse_cfg(prepare_hardware(unpack_data_paths(cfg)))
    select_variant(cfg)
    check_head(cfg)
    # main_pretrain's crop rule, on the stock name: W-MSE and MAE take any number of crops.
    if cfg.data.num_large_crops != 2 and base_method(cfg.method) not in ("wmse", "mae"):
        raise UsageError(f"{cfg.method} needs 2 large crops, got {cfg.data.num_large_crops}")
    return cfg


def run_pretrain(argv: Sequence[str], callbacks: Sequence[Callback] = ()) -> Trainer:
    """Pretrain as the command line says; returns the fitted Trainer.

    ``callbacks`` are added to the run's own (e.g. a Deep Fusion metrics callback).
    """
    cfg = pretrain_config(argv)
    seed_everything(cfg.seed)
    try:
        model = build_model(cfg)
    except ValueError as err:  # the heads and variants name the bad field and its choices
        raise UsageError(str(err)) from err
    except OmegaConfBaseException as err:  # the method reads a key the recipe lacks
        raise missing_key(cfg, err) from err
    make_contiguous(model)
    if not cfg.performance.disable_channel_last:
        model = model.to(memory_format=torch.channels_last)

    check_data_paths(cfg)
    val_loader = pretrain_val_loader(cfg)
    if cfg.data.format == "dali":
        data = {"datamodule": dali_module(cfg).pretrain_datamodule(cfg, val_loader)}
    else:
        train_loader = pretrain_loader(cfg)
        if len(train_loader) == 0:  # solo-learn drops the last incomplete batch
            raise UsageError(
                f"optimizer.batch_size={cfg.optimizer.batch_size} is larger than the training "
                f"set ({len(train_loader.dataset)} images): not one batch to train on"
            )
        data = {"train_dataloaders": train_loader, "val_dataloaders": val_loader}

    try:
        monitors = [
            fusion_monitor_from_cfg(cfg, val_loader.dataset if val_loader else None),
            collapse_monitor_from_cfg(cfg),
        ]
    except ValueError as err:
        raise UsageError(str(err)) from err
    callbacks = [*callbacks, *(m for m in monitors if m is not None)]

    logdir = Path(cfg.checkpoint.dir) / cfg.method
    explicit = cfg.resume_from_checkpoint is not None
    ckpt_path, wandb_run_id = resume_checkpoint(cfg, logdir)
    if explicit:
        check_fits(Path(ckpt_path), model, cfg)
    logger = make_logger(cfg, logdir, wandb_run_id, model, resumed=ckpt_path)
    trainer = make_trainer(cfg, logger, [*checkpoint_callbacks(cfg, logdir), *callbacks])
    with run_folder_lock(logdir / str(logger.version)):
        trainer.fit(model, ckpt_path=ckpt_path, **data)
    return trainer


def pretrain(argv: Sequence[str], callbacks: Sequence[Callback] = ()) -> int:
    """``solo-deepfusion pretrain``; returns the exit status (2: bad command line or recipe,
    1: a file could not be written or read, e.g. a full disk, reported in one line).

    A finished run ends with :func:`~solo_deepfusion.solo.summary.pretrain_summary`.
    """

    def run() -> Trainer | int:
        try:
            trainer = run_pretrain(argv, callbacks)
        except OSError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if trainer.is_global_zero and not trainer.interrupted:
            print(pretrain_summary(trainer, trainer.lightning_module.cfg), flush=True)
        return trainer

    return exit_status(run)


if __name__ == "__main__":  # `python -m solo_deepfusion.solo.launch`; Lightning's DDP re-runs it
    sys.exit(pretrain(sys.argv[1:]))
