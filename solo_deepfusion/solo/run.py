"""What every command that runs solo-learn shares: config, hardware, resume, logger, trainer.

* the command line: :class:`CommandParser` (errors are :class:`UsageError`), Hydra's
  ``--config-path/--config-name`` (:func:`config_parser`, :func:`parse_config_args`), the
  projector switch (:func:`rewrite_projector_args`; the ``projector`` config group is
  registered from the projector registry by :func:`solo_deepfusion.solo.register`) and
  composition (:func:`compose_config`);
* the hardware: :func:`prepare_hardware` makes a GPU recipe valid on the CPU;
* resuming: :func:`resume_checkpoint` (checkpoint I/O itself is
  :mod:`solo_deepfusion.solo.checkpoints`);
* the run's logger and trainer: :func:`make_logger`, :func:`make_trainer`,
  :func:`checkpoint_callbacks`, and :func:`dali_module` for ``data.format=dali``.

``pretrain`` (:mod:`solo_deepfusion.solo.launch`), ``linear`` and ``knn``
(:mod:`solo_deepfusion.solo.evaluate`) are built from these.
"""

from __future__ import annotations

import argparse
import csv
import importlib.resources
import inspect
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn

import torch
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import DictConfig, OmegaConf
from solo.utils.checkpointer import Checkpointer
from solo.utils.misc import omegaconf_select

from solo_deepfusion.errors import UsageError
from solo_deepfusion.solo.checkpoints import (
    AtomicCheckpointer,
    SoloCheckpointIO,
    checkpoint_epoch,
    find_resumable,
    unreadable,
)

RECIPES_DIR = Path(str(importlib.resources.files("solo_deepfusion.configs") / "recipes"))
_PROJECTOR_OVERRIDE = re.compile(r"(?:--|\+{1,2})?projector=(.*)")
# fp16 autocast, which Lightning refuses on CPU.
_FP16_MIXED = {16, "16", "16-mixed"}


class CommandParser(argparse.ArgumentParser):
    """An argparse parser whose errors raise :class:`UsageError` (exit status 2 in the CLI)."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


# ---------------------------------------------------------------------------------------------
# Command line and config


def split_projector(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Take the projector choice out of ``argv``: ``(name or None, the other arguments)``.

    Accepts ``--projector X``, ``--projector=X``, ``projector=X``, ``+projector=X`` (and
    ``++projector=X``); the last one given wins, as with Hydra overrides.
    """
    name, rest = None, []
    tokens = iter(argv)
    for token in tokens:
        if token == "--projector":
            name = next(tokens, "")
        elif match := _PROJECTOR_OVERRIDE.fullmatch(token):
            name = match.group(1)
        else:
            rest.append(token)
            continue
        if not name:
            raise UsageError("--projector needs a value (mlp, transformer, mlp_matched, ...)")
    return name, rest


def rewrite_projector_args(argv: Sequence[str]) -> list[str]:
    """``argv`` with its projector choice as the one Hydra accepts on a stock recipe.

    Stock recipes have no ``projector`` in their defaults list, so Hydra's struct mode only takes
    the append form ``+projector=X`` (and its argparse rejects ``--projector``).
    """
    name, rest = split_projector(argv)
    return rest if name is None else [*rest, f"+projector={name}"]


def config_parser(prog: str) -> argparse.ArgumentParser:
    """Hydra's ``--config-path/-cp`` and ``--config-name/-cn``; add a command's own options."""
    parser = CommandParser(prog=prog, allow_abbrev=False)
    parser.add_argument(
        "--config-path", "-cp", type=Path, help=f"recipe folder (default: {RECIPES_DIR})"
    )
    parser.add_argument("--config-name", "-cn", required=True, help="recipe, e.g. simclr.yaml")
    return parser


def parse_config_args(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[argparse.Namespace, list[str]]:
    """Parse the options; the rest are Hydra overrides. Sets ``config_dir`` (absolute)."""
    args, overrides = parser.parse_known_args(list(argv))
    unknown = [token for token in overrides if token.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    config_dir = (args.config_path or RECIPES_DIR).expanduser().resolve()
    if not config_dir.is_dir():
        parser.error(f"--config-path {config_dir} is not a folder")
    args.config_dir = config_dir
    return args, overrides


def hydra_message(err: Exception) -> str:
    """Hydra's multi-line message on one line, without its search path and docs links."""
    lines = []
    for line in str(err).splitlines():
        line = line.strip()
        if line.startswith("Config search path"):
            break
        if line and not line.startswith("See https://"):
            lines.append(line)
    return " ".join(lines) or type(err).__name__


def override_message(override: str, reason: str) -> str:
    """Why Hydra cannot parse ``override``; an ``=`` in its value gets a hint to quote it."""
    message = f"cannot parse the override {override!r}: {reason}"
    key, sep, value = override.partition("=")
    if sep and "=" in value and value[:1] not in ("'", '"'):
        message += f"; its value holds '=': quote it for Hydra, e.g. \"{key}='{value}'\""
    return message


def compose_config(config_dir: Path, config_name: str, overrides: Sequence[str]) -> DictConfig:
    """The recipe with its overrides, as ``@hydra.main`` hands it to ``main_pretrain``.

    Struct mode is off (as ``main_pretrain`` does) and interpolations are resolved, so that
    ``args.json`` records the values the run used (e.g. ``${oc.env:SOLO_DEEPFUSION_DATA}``).
    """
    try:
        with initialize_config_dir(config_dir=str(config_dir), version_base="1.2"):
            cfg = compose(config_name, overrides=list(overrides))
    except MissingConfigException as err:
        group, _, choice = (err.missing_cfg_file or "").partition("/")
        if group == "projector" and err.options:
            raise UsageError(
                f"unknown projector {choice!r}; choose from: {', '.join(sorted(err.options))}"
            ) from err
        if err.missing_cfg_file is None or err.missing_cfg_file == config_name:
            recipes = sorted(p.stem for p in config_dir.glob("*.yaml"))
            raise UsageError(
                f"--config-name {config_name}: no such recipe in {config_dir}; "
                f"choose from: {', '.join(recipes) or 'none there'}"
            ) from err
        raise UsageError(hydra_message(err)) from err
    except OverrideParseException as err:
        raise UsageError(override_message(err.override, hydra_message(err))) from err
    except HydraException as err:
        raise UsageError(hydra_message(err)) from err
    OmegaConf.set_struct(cfg, False)
    OmegaConf.resolve(cfg)
    return cfg


# ---------------------------------------------------------------------------------------------
# Hardware


def device_indices(devices: Any, accelerator: str) -> list[int]:
    """``devices`` as a list of indices, whatever form the recipe or command line used.

    solo-learn's ``parse_cfg`` scales the LR by ``len(devices)``, so an int breaks it, while
    Lightning's CPU accelerator rejects lists: a list is kept in the config and
    :func:`lightning_devices` gives Lightning what it takes. ``auto``/``-1``: every GPU, or one
    CPU process.
    """
    if isinstance(devices, str):
        devices = devices.strip()
        if "," in devices:
            return [int(d) for d in devices.split(",") if d.strip()]
        devices = devices if devices == "auto" else int(devices)
    if devices in (None, "auto", -1):
        count = torch.cuda.device_count() if accelerator != "cpu" else 1
        return list(range(count))
    if isinstance(devices, int):
        return list(range(devices))
    return [int(d) for d in devices]


def lightning_devices(cfg: DictConfig) -> int | list[int]:
    """What ``Trainer(devices=...)`` takes for ``cfg.devices``: a count on CPU, else the list."""
    return len(cfg.devices) if cfg.accelerator == "cpu" else list(cfg.devices)


def prepare_hardware(cfg: DictConfig) -> DictConfig:
    """Make the recipe's Lightning settings valid on this accelerator (call before parse_cfg).

    Stock recipes ask for GPUs with ``sync_batchnorm: True`` and ``precision: 16-mixed``. On
    CPU, SyncBatchNorm needs GPU tensors and Lightning refuses fp16 autocast, so they become
    ``False`` and ``32`` (not ``bf16-mixed``: it is slow on CPUs without bf16 units and changes
    the numbers of a run that only asked for speed). An explicit ``bf16-mixed`` is kept.
    """
    accelerator = omegaconf_select(cfg, "accelerator", "auto")
    if accelerator == "auto":
        accelerator = "gpu" if torch.cuda.is_available() else "cpu"
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"accelerator={accelerator}: no CUDA GPU is visible here; use accelerator=cpu "
            "or accelerator=auto"
        )
    cfg.accelerator = accelerator
    cfg.devices = device_indices(omegaconf_select(cfg, "devices", "auto"), accelerator)
    if accelerator == "cpu":
        cfg.sync_batchnorm = False
        if omegaconf_select(cfg, "precision", 32) in _FP16_MIXED:
            print(f"precision={cfg.precision}: no fp16 autocast on CPU; using precision=32")
            cfg.precision = 32
    return cfg


# ---------------------------------------------------------------------------------------------
# Resuming, logging, the trainer


def resume_checkpoint(cfg: DictConfig, logdir: Path) -> tuple[str | None, str | None]:
    """``(checkpoint to resume or None, its wandb run id)``, as main_pretrain decides it, but
    only from complete checkpoints with their ``args.json`` whose run is the one ``cfg``
    describes (:func:`find_resumable`: the same data, head, seed, batch size, ...)."""
    if cfg.resume_from_checkpoint is not None:
        path = cfg.resume_from_checkpoint
        del cfg.resume_from_checkpoint  # as main_pretrain: not recorded in args.json
        problem = unreadable(Path(path))
        if problem is not None:
            raise UsageError(f"resume_from_checkpoint={path}: {problem}")
        return path, None
    if not cfg.auto_resume.enabled:
        return None, None
    path, run_id = find_resumable(logdir, cfg, cfg.auto_resume.max_hours)
    if path is None:
        return None, None
    print(f"Resuming from previous checkpoint that matches specifications: '{path}'")
    epoch = checkpoint_epoch(path)
    if epoch + 1 >= cfg.max_epochs:
        print(
            f"auto-resume: {path} ends epoch {epoch}, the last of max_epochs={cfg.max_epochs}: "
            "nothing left to train (raise max_epochs to train on)",
            file=sys.stderr,
        )
    return str(path), run_id


def make_logger(
    cfg: DictConfig,
    logdir: Path,
    wandb_run_id: str | None,
    model: LightningModule,
    resumed: str | None = None,
) -> Logger:
    """wandb when the recipe enables it (watching ``model``, as solo-learn's mains), else a CSV
    log in the run's checkpoint folder.

    With no logger, Lightning would start its default one in ``./lightning_logs``; the CSV
    log's version is the folder name solo-learn's Checkpointer gives offline runs, so metrics,
    ``args.json`` and the checkpoint share ``<checkpoint.dir>/<method>/<version>/``. A run
    that resumes a checkpoint of ``<logdir>/<version>/`` (``resumed``) keeps that folder, and
    its ``metrics.csv`` continues the old one.
    """
    if cfg.wandb.enabled:
        logger = WandbLogger(
            name=cfg.name,
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            offline=cfg.wandb.offline,
            resume="allow" if wandb_run_id else None,
            id=wandb_run_id,
        )
        logger.watch(model, log="gradients", log_freq=100)
        logger.log_hyperparams(OmegaConf.to_container(cfg))
        return logger
    if resumed is not None and Path(resumed).resolve().parent.parent == logdir.resolve():
        logger = CSVLogger(logdir.parent, name=logdir.name, version=Path(resumed).parent.name)
        metrics = Path(logger.log_dir) / "metrics.csv"
        if metrics.is_file():  # keep the old rows: the writer rewrites with the union header
            with open(metrics, newline="") as fh:
                logger.experiment.metrics_keys = next(csv.reader(fh), [])
        return logger
    taken = set(os.listdir(logdir)) if logdir.is_dir() else set()
    version = "offline-" + Checkpointer.random_string()
    while version in taken:
        version = "offline-" + Checkpointer.random_string()
    return CSVLogger(save_dir=logdir.parent, name=logdir.name, version=version)


def make_trainer(cfg: DictConfig, logger: Logger, callbacks: Sequence[Callback]) -> Trainer:
    """A Trainer from the config's Trainer keys (as main_pretrain), with the fixes above."""
    valid = inspect.signature(Trainer.__init__).parameters
    kwargs = {k: v for k, v in OmegaConf.to_container(cfg).items() if k in valid}
    strategy = cfg.strategy or "auto"
    kwargs.update(
        devices=lightning_devices(cfg),
        strategy=DDPStrategy(find_unused_parameters=False) if strategy == "ddp" else strategy,
        logger=logger,
        callbacks=[*callbacks, LearningRateMonitor(logging_interval="step")],
        enable_checkpointing=False,
        plugins=[SoloCheckpointIO()],
    )
    return Trainer(**kwargs)


def checkpoint_callbacks(cfg: DictConfig, logdir: Path) -> list[Callback]:
    """solo-learn's Checkpointer (args.json + ckpt) and AutoUMAP, when the recipe enables them."""
    callbacks: list[Callback] = []
    if cfg.checkpoint.enabled:
        callbacks.append(
            AtomicCheckpointer(
                cfg,
                logdir=logdir,
                frequency=cfg.checkpoint.frequency,
                keep_prev=cfg.checkpoint.keep_prev,
            )
        )
    if omegaconf_select(cfg, "auto_umap.enabled", False):
        from solo.utils.auto_umap import AutoUMAP  # needs solo-learn's [umap] extra

        umap_dir = os.path.join(cfg.auto_umap.dir, cfg.method)
        callbacks.append(AutoUMAP(cfg.name, logdir=umap_dir, frequency=cfg.auto_umap.frequency))
    return callbacks


def dali_module(cfg: DictConfig) -> ModuleType:
    """:mod:`solo_deepfusion.solo.dali`, once DALI and ``dali.device`` are known to work here."""
    try:
        from solo_deepfusion.solo import dali

        dali.check_dali_device(cfg.dali.device)
    except (ImportError, ValueError) as err:
        raise UsageError(f"data.format=dali: {err}") from err
    return dali
