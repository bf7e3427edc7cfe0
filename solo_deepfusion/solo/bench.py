"""``solo-deepfusion bench``: transformer head vs feed-forward head, as a matched grid of runs.

Example (CPU-sized)::

    solo-deepfusion bench --config-name cifar10_quick --methods simclr byol \\
        --projectors mlp mlp_matched:preset=small transformer:preset=small \\
        --seeds 0 1 2 --epochs 5 --val-per-class 200 --results benchmarks/cpu.jsonl
    solo-deepfusion bench-report benchmarks/cpu.jsonl --out report.md --plot report.png

Each **cell** of the grid (method x projector x seed x ablation values) is one pretraining run
through the launcher (:func:`~solo_deepfusion.solo.launch.run_pretrain`), on the same recipe and
budget, followed by its evaluations. What is matched, and how:

* **Budget**: every cell gets the same recipe, overrides, epochs, data fraction and subset.
* **Data**: the same images for every cell (``data.fraction`` is solo-learn's fixed, stratified
  split; ``--train-per-class/--val-per-class`` cut the same files, sorted by name). The same
  **order** per seed: the runner reseeds torch, numpy and ``random`` with a function of
  ``(seed, epoch)`` at every epoch start, right before the loader draws its permutation and its
  workers' seeds, so the model's initialisation (which differs between heads) does not shift
  them. Each record holds a hash of the sample indices seen (``run.data_order_sha256``): paired
  runs must agree, and the report checks it. DALI pipelines have their own fixed seed (12 in
  solo-learn), the same for every cell and seed.
* **Initialisation**: ``seed_everything(seed)`` before the model is built; solo-learn builds the
  backbone before the head, so paired cells should start from the same backbone weights. Each
  record holds a hash of them (``run.backbone_init_sha256``) and the report checks pairs.
  (With ``backbone.stem=imagenet|cifar`` the launcher's model builder draws the new stem conv
  after the head, so ``conv1`` differs between heads: the report says so.)

Per cell, one JSON line (schema :data:`SCHEMA`, see :func:`execute_job`) is appended to the
results file: the cell's keys, online linear acc@1 (the run's last validation), offline linear
acc@1 (:func:`~solo_deepfusion.solo.evaluate.run_linear`, ``--linear-epochs``), weighted k-NN
acc@1 on backbone features (:func:`~solo_deepfusion.solo.evaluate.run_knn`), the authors'
"unsupervised accuracy" (leave-one-out 1-NN of head outputs within evaluation batches), the
last-layer fusion ratio (transformer heads), time per epoch, peak memory, head parameters and
forward FLOPs at the training token count, versions and commit. Accuracies are fractions.

An interrupted grid resumes: a cell whose id (a hash of its whole config, :meth:`Cell.key`)
already has an ``ok`` line is skipped; failed cells are retried unless ``--skip-failed``. Each
cell runs in its own folder, ``<work>/runs/<cell id>``, by default in its own Python process
(``--isolation subprocess``: a crash stays in the cell and peak RSS is the cell's own).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import functools
import hashlib
import importlib.metadata
import itertools
import json
import math
import os
import platform
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from solo.utils.checkpointer import Checkpointer
from solo.utils.misc import omegaconf_select
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import DataLoader, Dataset, Subset
from torch.utils.flop_counter import FlopCounterMode
from torchvision.datasets import ImageFolder

from solo_deepfusion.fusion import leave_one_out_1nn_accuracy, summarize
from solo_deepfusion.heads import TransformerProjector, count_parameters
from solo_deepfusion.solo import base_method
from solo_deepfusion.solo.analysis import EVAL_BATCH_SIZES, eval_transform
from solo_deepfusion.solo.context import ContextProjector
from solo_deepfusion.solo.evaluate import run_knn, run_linear, write_json
from solo_deepfusion.solo.launch import (
    RECIPES_DIR,
    CommandParser,
    UsageError,
    compose_config,
    pretrain_config,
    run_pretrain,
)
from solo_deepfusion.solo.monitor import (
    MONITOR_SEED,
    FusionMonitor,
    backbone_features,
    balanced_indices,
    dataset_targets,
    evaluating,
    json_safe,
    load_samples,
    local_attention,
)
from solo_deepfusion.solo.variants import PROJECTOR_KEYS

SCHEMA = "solo-deepfusion/bench/1"
DATA_ENV = "SOLO_DEEPFUSION_DATA"
PROJECTOR_NAMES = ("mlp", "mlp_matched", "transformer")
BASELINE = "mlp"
# Methods whose loss reads `method_kwargs.temperature` (solo-learn 1.0.6; a test checks the
# host's sources). RESSL (temperature_q/_k) and DINO (teacher/student) name theirs differently.
TEMPERATURE_METHODS = frozenset(
    {"all4one", "deepclusterv2", "mocov2plus", "mocov3", "nnclr", "simclr", "supcon", "swav"}
)
# Keys a method needs that a recipe of another method may lack: filled only when missing.
METHOD_FILLS: dict[str, dict[str, str]] = {
    name: {"method_kwargs.pred_hidden_dim": "${method_kwargs.proj_hidden_dim}"}
    for name in ("byol", "mocov3", "nnbyol", "nnclr", "nnsiam", "simsiam")
}
# Grid axis -> the config key it sets.
AXES: dict[str, str] = {
    "batch_size": "optimizer.batch_size",
    "temperature": "method_kwargs.temperature",
    "weight_decay": "optimizer.weight_decay",
    "depth": "projector.depth",
}
LINEAR_RECIPE = "cifar10_linear_quick"
KNN_K = (20, 200)
KNN_TEMPERATURE = 0.07
FUSION_SAMPLES = 256
_FEATURE_BATCH = 256  # images per backbone call when extracting evaluation features

__all__ = [
    "AXES",
    "BASELINE",
    "SCHEMA",
    "TEMPERATURE_METHODS",
    "BenchProbe",
    "Cell",
    "GridSummary",
    "Job",
    "ProjectorSpec",
    "Study",
    "append_record",
    "execute_job",
    "expand_grid",
    "finished_cells",
    "head_cost",
    "main",
    "make_job",
    "parser",
    "prepare_data",
    "read_records",
    "run_grid",
    "run_job_in_process",
    "run_job_subprocess",
    "unsupervised_accuracies",
]


# ---------------------------------------------------------------------------------------------
# Projector specs: `name` or `name:key=value,key=value`


@dataclass(frozen=True)
class ProjectorSpec:
    """A projector of the grid: ``mlp``, ``mlp_matched``, ``transformer``, plus fields."""

    name: str
    fields: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> ProjectorSpec:
        """``transformer:preset=small,mask=positives`` -> name and (sorted) fields."""
        name, _, rest = text.strip().partition(":")
        if name not in PROJECTOR_NAMES:
            raise UsageError(
                f"unknown projector {name!r} in {text!r}; choose from {PROJECTOR_NAMES}"
            )
        fields: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key or not value:
                raise UsageError(f"projector field {item!r} in {text!r}: expected key=value")
            if key in fields:
                raise UsageError(f"projector field {key!r} given twice in {text!r}")
            fields[key] = value
        if fields and name == BASELINE:
            raise UsageError(f"{text!r}: the stock `mlp` head takes no fields (the recipe's)")
        allowed = set(PROJECTOR_KEYS.get(name, ())) - {"name"}
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise UsageError(
                f"{text!r}: unknown field(s) {unknown}; {name} takes {sorted(allowed)}"
            )
        return cls(name, tuple(sorted(fields.items())))

    @property
    def label(self) -> str:
        """The canonical spelling (fields sorted): the projector's key in records."""
        if not self.fields:
            return self.name
        return f"{self.name}:{','.join(f'{k}={v}' for k, v in self.fields)}"

    def has(self, key: str) -> bool:
        return any(k == key for k, _ in self.fields)

    def overrides(self) -> list[str]:
        """Launcher arguments selecting this head."""
        return ["--projector", self.name, *(f"projector.{k}={v}" for k, v in self.fields)]


def axis_applies(axis: str, method: str, projector: ProjectorSpec) -> bool:
    """Whether ``axis`` changes anything for this method and head (else it is ``None``)."""
    if axis == "temperature":
        return method in TEMPERATURE_METHODS
    if axis == "depth":
        return projector.name != BASELINE
    return True


# ---------------------------------------------------------------------------------------------
# The study and its cells


@dataclass
class Study:
    """What every cell shares: recipe, budget and evaluation settings."""

    config_dir: Path
    config_name: str
    max_epochs: int
    overrides: tuple[str, ...] = ()
    method_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    epochs: int | None = None
    fraction: float | None = None
    train_per_class: int | None = None
    val_per_class: int | None = None
    eval_dataset: str = "cifar10"
    linear_epochs: int = 0
    linear_overrides: tuple[str, ...] = ()
    knn_k: tuple[int, ...] = KNN_K
    knn_temperature: float = KNN_TEMPERATURE
    eval_batch_sizes: tuple[int, ...] = EVAL_BATCH_SIZES
    eval_max_images: int | None = None
    fusion_samples: int = FUSION_SAMPLES

    @property
    def recipe_file(self) -> Path:
        name = self.config_name
        return self.config_dir / (name if name.endswith(".yaml") else f"{name}.yaml")

    @functools.cached_property
    def recipe_sha256(self) -> str:
        return hashlib.sha256(self.recipe_file.read_bytes()).hexdigest()

    @property
    def train_epochs(self) -> int:
        return self.epochs if self.epochs is not None else self.max_epochs

    def method_extra(self, method: str) -> tuple[str, ...]:
        """Overrides of ``method`` alone: the user's, then fills for keys the recipe lacks."""
        return self.method_overrides.get(method, ())

    def budget(self, method: str) -> dict[str, Any]:
        return {
            "epochs": self.train_epochs,
            "fraction": self.fraction,
            "train_per_class": self.train_per_class,
            "val_per_class": self.val_per_class,
            "overrides": list(self.overrides),
            "method_overrides": list(self.method_extra(method)),
        }

    def evaluation(self) -> dict[str, Any]:
        return {
            "dataset": self.eval_dataset,
            "linear_epochs": self.linear_epochs,
            "linear_overrides": list(self.linear_overrides),
            "knn_k": list(self.knn_k),
            "knn_temperature": self.knn_temperature,
            "eval_batch_sizes": list(self.eval_batch_sizes),
            "eval_max_images": self.eval_max_images,
            "fusion_samples": self.fusion_samples,
        }


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    study: Study = field(compare=False, repr=False)
    method: str
    projector: ProjectorSpec
    seed: int
    ablation: tuple[tuple[str, Any], ...]  # every axis of AXES, None where it does not apply

    def key(self) -> dict[str, Any]:
        """Everything that defines the run's result (not where its data or files live)."""
        study = self.study
        return {
            "recipe": study.config_name,
            "recipe_sha256": study.recipe_sha256,
            "method": self.method,
            "projector": self.projector.label,
            "seed": self.seed,
            "ablation": dict(self.ablation),
            "budget": study.budget(self.method),
            "eval": study.evaluation(),
        }

    @property
    def cell_id(self) -> str:
        return cell_id(self.key())

    def value(self, axis: str) -> Any:
        return dict(self.ablation)[axis]


def cell_id(key: dict[str, Any]) -> str:
    """A stable id of a cell's key: SHA-256 of its canonical JSON, 16 hex digits."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def expand_grid(
    study: Study,
    methods: Sequence[str],
    projectors: Sequence[ProjectorSpec],
    seeds: Sequence[int],
    axes: dict[str, Sequence[Any]],
) -> list[Cell]:
    """The grid's cells, seed-major (then method, ablation, projector with ``mlp`` first).

    An axis that does not apply to a (method, head) pair (temperature without
    ``method_kwargs.temperature``, depth of the stock MLP) is ``None`` there, and its values
    collapse into one cell. A cut-short grid thus leaves complete pairs of the first seeds.
    """
    for spec in projectors:
        if axes.get("depth") and spec.has("depth"):
            raise UsageError(f"--depths and {spec.label!r} both set the depth")
    order = sorted(projectors, key=lambda p: (p.name != BASELINE, projectors.index(p)))
    cells: list[Cell] = []
    seen: set[str] = set()
    for seed, method in itertools.product(seeds, methods):
        values = [axes.get(axis) or [None] for axis in AXES]
        for combo, spec in itertools.product(itertools.product(*values), order):
            ablation = tuple(
                (axis, value if axis_applies(axis, method, spec) else None)
                for axis, value in zip(AXES, combo, strict=True)
            )
            cell = Cell(study, method, spec, seed, ablation)
            if cell.cell_id not in seen:
                seen.add(cell.cell_id)
                cells.append(cell)
    return cells


# ---------------------------------------------------------------------------------------------
# Data: the shared folder as it is, unpacked, or cut to N images per class


@dataclass(frozen=True)
class DataPaths:
    train: Path
    val: Path


def _split_dir(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _archive(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / f"{n}.tar.gz" for n in names if (root / f"{n}.tar.gz").is_file()), None)


def _pick(names: Iterator[str], per_class: int | None) -> set[str]:
    """``split/class/file`` names: the first ``per_class`` files of each class, by name."""
    by_class: dict[str, list[str]] = {}
    for name in names:
        parts = Path(name).parts
        if len(parts) == 3:
            by_class.setdefault(parts[1], []).append(name)
    return {n for files in by_class.values() for n in sorted(files)[:per_class]}


def _materialise(
    root: Path, split: str, aliases: Sequence[str], per_class: int | None, target: Path
) -> Path:
    """``target/<split>``: the split (or its first ``per_class`` images per class) from
    ``root``'s folder or ``.tar.gz`` (named ``<alias>/<class>/<file>`` inside)."""
    folder, archive = _split_dir(root, aliases), _archive(root, aliases)
    if folder is not None:
        files = (str(Path(split, *p.relative_to(folder).parts)) for p in folder.rglob("*"))
        for name in _pick(files, per_class):
            dest = target / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / Path(name).relative_to(split), dest)
        return target / split
    if archive is None:
        raise UsageError(f"{root} holds neither {aliases[0]}/ nor {aliases[0]}.tar.gz")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        wanted = _pick((m.name for m in members), per_class)
        chosen = [m for m in members if m.name in wanted]  # archive order: one pass
        for member in chosen:
            member.name = str(Path(split, *Path(member.name).parts[1:]))
        tar.extractall(target, members=chosen, filter="data")
    return target / split


def _prepare_split(
    source: Path, work: Path, split: str, aliases: Sequence[str], per_class: int | None
) -> Path:
    """One split as an ImageFolder: in place, or written once under ``work/data``."""
    folder = _split_dir(source, aliases)
    if per_class is None and folder is not None:
        return folder
    target = work / "data" / f"{source.name}-{split}-{per_class or 'all'}"
    if not (target / ".complete").is_file():
        shutil.rmtree(target, ignore_errors=True)
        _materialise(source, split, aliases, per_class, target)
        (target / ".complete").touch()
    return target / split


def prepare_data(
    source: Path, work: Path, train_per_class: int | None = None, val_per_class: int | None = None
) -> DataPaths:
    """``train`` and ``val`` ImageFolders from ``source`` (``train/`` + ``test/`` or ``val/``
    folders, or ``train.tar.gz`` + ``test.tar.gz``), cut to ``*_per_class`` images when given:
    the first ones of each class by file name, the same for every cell.

    Folders are used in place unless cut; archives and cuts are written once under
    ``work/data/`` (a ``.complete`` marker says a split is whole) and shared by every cell.
    """
    source = source.expanduser().resolve()
    return DataPaths(
        _prepare_split(source, work, "train", ("train",), train_per_class),
        _prepare_split(source, work, "val", ("test", "val"), val_per_class),
    )


# ---------------------------------------------------------------------------------------------
# Jobs: what one cell runs


@dataclass
class Job:
    """One cell, ready to run: its key, the launcher and evaluation command lines."""

    cell_id: str
    key: dict[str, Any]
    work_dir: Path
    pretrain_argv: list[str]
    linear_argv: list[str] | None
    knn_argv: list[str] | None
    val_path: str | None
    eval: dict[str, Any]
    keep_checkpoints: bool = False

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "work_dir": str(self.work_dir)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return cls(**{**data, "work_dir": Path(data["work_dir"])})


def _has_override(overrides: Sequence[str], key: str) -> bool:
    return any(o.partition("=")[0].lstrip("+") == key for o in overrides if "=" in o)


def pretrain_argv(cell: Cell, data: DataPaths | None, ckpt_dir: Path) -> list[str]:
    """The launcher's command line for ``cell`` (later arguments win, as in Hydra)."""
    study = cell.study
    epochs = study.train_epochs
    argv = [
        "--config-path", str(study.config_dir), "--config-name", study.config_name,
        *study.overrides, *study.method_extra(cell.method),
        f"method={cell.method}", *cell.projector.overrides(), f"++seed={cell.seed}",
    ]  # fmt: skip
    argv += [f"++{AXES[a]}={v}" for a, v in cell.ablation if v is not None]
    if study.epochs is not None:
        argv.append(f"++max_epochs={study.epochs}")
    if study.fraction is not None:
        argv.append(f"++data.fraction={study.fraction}")
    if data is not None:  # a path the user overrides (e.g. data.val_path=null) stays theirs
        for key, path in (("data.train_path", data.train), ("data.val_path", data.val)):
            if not _has_override(study.overrides, key):
                argv.append(f"++{key}={path}")
    if not _has_override(study.overrides, "check_val_every_n_epoch"):
        argv.append(f"++check_val_every_n_epoch={epochs}")  # validate once, at the end
    if not _has_override(study.overrides, "enable_progress_bar"):
        argv.append("++enable_progress_bar=False")
    argv += [
        "++checkpoint.enabled=True",
        f"++checkpoint.dir={ckpt_dir}",
        f"++checkpoint.frequency={max(1, epochs - 1)}",  # epoch 0 and the last one only
        "++auto_resume.enabled=False",
        "++wandb.enabled=False",
    ]
    return argv


def linear_argv(study: Study, seed: int, data: DataPaths | None, out: Path) -> list[str] | None:
    """``run_linear``'s command line (the packaged quick recipe), or ``None`` when skipped."""
    if study.linear_epochs <= 0:
        return None
    argv = [
        "--config-name", LINEAR_RECIPE, "pretrained_feature_extractor=<run>",
        f"data.dataset={study.eval_dataset}",
    ]  # fmt: skip
    if data is not None:
        argv += [f"data.train_path={data.train}", f"data.val_path={data.val}"]
    return [
        *argv,
        f"max_epochs={study.linear_epochs}",
        f"++seed={seed}",
        f"checkpoint.dir={out}",
        "checkpoint.enabled=False",
        "auto_resume.enabled=False",
        "++enable_progress_bar=False",
        *study.linear_overrides,
    ]


def knn_argv(study: Study, data: DataPaths | None, device: str, workers: int) -> list[str] | None:
    """``run_knn``'s command line (backbone features, cosine), or ``None`` when skipped."""
    if not study.knn_k:
        return None
    argv = ["--checkpoint-dir", "<run>", "--dataset", study.eval_dataset]
    argv += ["--k", *map(str, study.knn_k)]
    if data is not None:
        argv += ["--train-path", str(data.train), "--val-path", str(data.val)]
    return [
        *argv,
        "--temperature", str(study.knn_temperature), "--distance-function", "cosine",
        "--feature-type", "backbone", "--device", device, "--num-workers", str(workers),
    ]  # fmt: skip


def make_job(
    cell: Cell,
    data: DataPaths | None,
    work: Path,
    *,
    default_val: str | None = None,
    device: str = "auto",
    eval_workers: int = 2,
    keep_checkpoints: bool = False,
) -> Job:
    """The :class:`Job` of ``cell``, in ``work/runs/<cell id>``."""
    run_dir = work / "runs" / cell.cell_id
    return Job(
        cell_id=cell.cell_id,
        key=cell.key(),
        work_dir=run_dir,
        pretrain_argv=pretrain_argv(cell, data, run_dir / "ckpt"),
        linear_argv=linear_argv(cell.study, cell.seed, data, run_dir / "linear"),
        knn_argv=knn_argv(cell.study, data, device, eval_workers),
        val_path=str(data.val) if data is not None else default_val,
        eval={**cell.study.evaluation(), "device": device, "workers": eval_workers},
        keep_checkpoints=keep_checkpoints,
    )


# ---------------------------------------------------------------------------------------------
# Results file: one JSON line per cell, appended atomically


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a results file; lines that are not whole JSON objects are skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "cell_id" in record:
            records.append(record)
    return records


def finished_cells(path: Path, *, include_failed: bool = False) -> set[str]:
    """Ids of the cells with an ``ok`` record (and failed ones, if asked)."""
    wanted = {"ok", "failed"} if include_failed else {"ok"}
    return {r["cell_id"] for r in read_records(path) if r.get("status") in wanted}


def append_record(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one line of strict JSON: one ``write`` under an exclusive lock,
    then ``fsync``. A line left incomplete by a crash is closed first, so it stays alone (and
    is skipped by :func:`read_records`)."""
    line = (json.dumps(json_safe(record), allow_nan=False, sort_keys=True) + "\n").encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)  # releases the lock


# ---------------------------------------------------------------------------------------------
# The grid loop

Runner = Callable[[Job], dict[str, Any]]


@dataclass
class GridSummary:
    """What :func:`run_grid` did."""

    ran: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    remaining: list[str] = field(default_factory=list)  # not started: out of time budget


def failure_record(job: Job, error: str) -> dict[str, Any]:
    """The line of a cell that did not finish."""
    return {
        "schema": SCHEMA,
        "cell_id": job.cell_id,
        "status": "failed",
        "error": error[-4000:],
        **job.key,
        "env": environment(),
        "paths": {"work_dir": str(job.work_dir)},
    }


def run_grid(
    jobs: Sequence[Job],
    results: Path,
    runner: Runner,
    *,
    retry_failed: bool = True,
    time_budget_s: float | None = None,
    log: Callable[[str], None] = print,
) -> GridSummary:
    """Run every job whose cell has no finished record, appending one line per cell.

    ``runner(job)`` returns the cell's record (``status: ok``) or raises; an exception becomes a
    ``failed`` line. With ``time_budget_s``, no cell starts once the time used plus the longest
    cell so far would pass the budget; those are left for a later call (which resumes).
    """
    summary = GridSummary()
    done = finished_cells(results, include_failed=not retry_failed)
    start, longest = time.monotonic(), 0.0
    for index, job in enumerate(jobs, 1):
        if job.cell_id in done:
            summary.skipped.append(job.cell_id)
            continue
        elapsed = time.monotonic() - start
        if time_budget_s is not None and elapsed + longest > time_budget_s:
            summary.remaining.append(job.cell_id)
            continue
        log(f"[{index}/{len(jobs)}] {job.cell_id} {describe(job.key)}")
        began = time.monotonic()
        try:
            record = runner(job)
        except Exception as err:  # the cell failed; the grid goes on
            record = failure_record(job, f"{type(err).__name__}: {err}")
        longest = max(longest, time.monotonic() - began)
        append_record(results, record)
        (summary.ran if record.get("status") == "ok" else summary.failed).append(job.cell_id)
        log(f"    {record.get('status')} in {time.monotonic() - began:.0f} s")
    return summary


def describe(key: dict[str, Any]) -> str:
    """``method projector seed=S axis=value ...`` of a cell key (axes that are set)."""
    axes = " ".join(f"{k}={v}" for k, v in key["ablation"].items() if v is not None)
    return f"{key['method']} {key['projector']} seed={key['seed']} {axes}".rstrip()


# ---------------------------------------------------------------------------------------------
# Running one cell: probe callback, evaluations, the record


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


def head_path(model: nn.Module) -> str:
    """Where the projection head lives: the variant's, or the stock method's."""
    path = getattr(model, "context_projector", None)
    if path:
        return path
    return "head.mlp" if base_method(model.cfg.method) == "dino" else "projector"


def momentum_head_path(model: nn.Module) -> str | None:
    """The EMA copy of the head of a momentum method, else ``None``."""
    if not hasattr(model, "momentum_backbone"):
        return None
    path = getattr(model, "momentum_context_projector", None)
    if path:
        return path
    return "momentum_head.mlp" if base_method(model.cfg.method) == "dino" else "momentum_projector"


def _flops(fn: Callable[[], Any]) -> int:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def head_cost(model: nn.Module, cfg: DictConfig) -> dict[str, Any]:
    """Parameters of the (online) head and its forward FLOPs for one training step's tokens.

    ``T = num_large_crops x batch_size`` tokens: one call on all of them for a ``joint``
    transformer (attention over ``T``), one call per crop of ``batch_size`` otherwise. Counted
    with ``torch.utils.flop_counter`` (SDPA on its math backend, multiply-add = 2) in eval mode.
    """
    head = model.get_submodule(head_path(model))
    views, batch = cfg.data.num_large_crops, cfg.optimizer.batch_size
    param = next(head.parameters())
    x = torch.randn(views * batch, model.features_dim, device=param.device, dtype=param.dtype)
    joint = isinstance(head, ContextProjector) and head.joint
    was_training = head.training
    head.eval()
    try:
        if joint:
            flops = _flops(lambda: head.tail(head.head(x, num_views=views)))
        else:
            flops = views * _flops(lambda: head(x[:batch]))
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


def _eval_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _features(model: nn.Module, dataset: Dataset, indices: torch.Tensor, workers: int):
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=_FEATURE_BATCH,
                        num_workers=workers)  # fmt: skip
    return torch.cat([backbone_features(model, images) for images, _ in loader])


def unsupervised_accuracies(
    model: nn.Module,
    feats: torch.Tensor,
    labels: torch.Tensor,
    batch_sizes: Sequence[int],
    train_batch_size: int,
) -> dict[str, float | None]:
    """The authors' "unsupervised accuracy" per evaluation batch size (paper-notes §3.4).

    Head outputs (head and the method's tail, eval mode) are computed one evaluation batch at a
    time over ``feats`` in their fixed order; each sample's nearest other sample of its batch
    (cosine) must share its label; the last incomplete batch is dropped. ``_head`` keys score
    head outputs, ``_backbone`` keys the backbone features within the same batches;
    ``uacc_train_bs_head`` uses the training batch size, as the authors' code does.
    """
    head = model.get_submodule(head_path(model))
    out: dict[str, float | None] = {}
    sizes = [(f"uacc_b{size}", size) for size in batch_sizes]
    for name, size in [*sizes, ("uacc_train_bs", train_batch_size)]:
        scored = feats.shape[0] // size * size
        if scored == 0 or size < 2:
            out[f"{name}_head"] = None
            out[f"{name}_backbone"] = None
            continue
        outputs = torch.cat([head(chunk) for chunk in feats[:scored].split(size)])
        out[f"{name}_head"] = leave_one_out_1nn_accuracy(outputs, labels[:scored], size)
        out[f"{name}_backbone"] = leave_one_out_1nn_accuracy(feats[:scored], labels[:scored], size)
    out.pop("uacc_train_bs_backbone")
    out["backbone_1nn_acc"] = leave_one_out_1nn_accuracy(feats, labels, None)
    return out


def fusion_numbers(model: nn.Module, dataset: Dataset, samples: int) -> dict[str, Any]:
    """Per-layer fusion ratio of a class-balanced batch of ``dataset`` (transformer heads)."""
    head = model.get_submodule(head_path(model))
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


def evaluate_in_memory(model: nn.Module, cfg: DictConfig, job: Job) -> dict[str, Any]:
    """Unsupervised accuracies and fusion ratio of the trained model on the validation split."""
    if job.val_path is None:
        return {}
    settings = job.eval
    device = _eval_device(settings["device"])
    model.to(device)
    transform = eval_transform(OmegaConf.create({"data": {"dataset": settings["dataset"]}}))
    dataset = ImageFolder(job.val_path, transform=transform)
    targets = torch.as_tensor(dataset.targets)
    if settings["eval_max_images"]:
        order = balanced_indices(targets, settings["eval_max_images"], seed=MONITOR_SEED)
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(MONITOR_SEED))
    head = model.get_submodule(head_path(model))
    with evaluating(model), local_attention(head):
        feats = _features(model, dataset, order, settings["workers"])
        labels = targets[order].to(feats.device)
        metrics = unsupervised_accuracies(
            model, feats, labels, settings["eval_batch_sizes"], cfg.optimizer.batch_size
        )
        fusion = fusion_numbers(model, dataset, settings["fusion_samples"])
    return {"metrics": metrics, "fusion": fusion, "eval_images": int(order.numel())}


def _with_run(argv: list[str], run: Path) -> list[str]:
    return [a.replace("<run>", str(run)) for a in argv]


def _offline(job: Job, run: Path) -> dict[str, Any]:
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


def _checkpointer(trainer: pl.Trainer) -> Checkpointer:
    found = [c for c in trainer.callbacks if isinstance(c, Checkpointer)]
    if not found or not getattr(found[0], "last_ckpt", None):
        raise RuntimeError("the run saved no checkpoint (checkpoint.enabled?)")
    return found[0]


def _resolved(cfg: DictConfig) -> dict[str, Any]:
    """Effective values the launcher used (after solo-learn's parse_cfg, e.g. scaled LR)."""
    return {
        "method": cfg.method,
        "batch_size": cfg.optimizer.batch_size,
        "lr": cfg.optimizer.lr,
        "weight_decay": cfg.optimizer.weight_decay,
        "temperature": omegaconf_select(cfg, "method_kwargs.temperature", None),
        "max_epochs": cfg.max_epochs,
        "precision": str(cfg.precision),
        "accelerator": cfg.accelerator,
        "devices": list(cfg.devices),
        "data_format": cfg.data.format,
        "data_fraction": cfg.data.fraction,
        "num_large_crops": cfg.data.num_large_crops,
        "num_workers": cfg.data.num_workers,
        "projector": dict(omegaconf_select(cfg, "projector", {}) or {}),
    }


def execute_job(job: Job) -> dict[str, Any]:
    """Train and evaluate one cell in this process; return its record (``status: ok``).

    Record fields: ``schema``, ``cell_id``, ``status``, the cell key (``recipe``,
    ``recipe_sha256``, ``method``, ``projector``, ``seed``, ``ablation``, ``budget``,
    ``eval``), ``metrics`` (fractions: ``online_linear_acc1``, ``offline_linear_acc1``,
    ``knn_k<k>_acc1``, ``uacc_b<B>_head``/``_backbone``, ``uacc_train_bs_head``,
    ``backbone_1nn_acc``, ``fusion_ratio_last``), ``cost`` (``head_params``, ``head_flops``,
    ``head_tokens``, ``time_per_epoch_s``, ``epoch_times_s``, ``step_time_median_s``,
    ``peak_gpu_bytes``, ``peak_rss_bytes``, ``train_seconds``, ``eval_seconds``), ``run``
    (resolved config, data order hash, online-accuracy epoch, fusion per layer, images),
    ``env`` (versions, commit, device) and ``paths``.
    """
    shutil.rmtree(job.work_dir, ignore_errors=True)  # a cut-short earlier try starts over
    job.work_dir.mkdir(parents=True)
    seed = job.key["seed"]
    probe = BenchProbe(seed)
    began = time.monotonic()
    trainer = run_pretrain(job.pretrain_argv, callbacks=[probe])
    if trainer.interrupted:
        raise RuntimeError("training was interrupted")
    train_seconds = time.monotonic() - began
    model, cfg = trainer.lightning_module, trainer.lightning_module.cfg
    run = Path(_checkpointer(trainer).path)
    online = trainer.callback_metrics.get("val_acc1")
    cost = {**head_cost(model, cfg), **probe.summary(), "train_seconds": train_seconds}

    began = time.monotonic()
    memory = evaluate_in_memory(model, cfg, job)
    metrics = {
        "online_linear_acc1": None if online is None else float(online) / 100,
        **memory.get("metrics", {}),
        **{k: v for k, v in memory.get("fusion", {}).items() if k == "fusion_ratio_last"},
    }
    del model, trainer
    metrics.update(_offline(job, run))
    cost["eval_seconds"] = time.monotonic() - began
    if not job.keep_checkpoints:
        for ckpt in run.glob("*.ckpt"):
            ckpt.unlink()
    fusion = memory.get("fusion", {})
    return json_safe(
        {
            "schema": SCHEMA,
            "cell_id": job.cell_id,
            "status": "ok",
            **job.key,
            "metrics": metrics,
            "cost": cost,
            "run": {
                "resolved": _resolved(cfg),
                "online_linear_epoch": probe.validated_epoch,
                "data_order_sha256": probe.data_order_sha256,
                "data_order_reseeded": True,
                "backbone_init_sha256": probe.backbone_init_sha256,
                "fusion_ratio_layers": fusion.get("fusion_ratio_layers"),
                "fusion_samples": fusion.get("fusion_samples"),
                "eval_images": memory.get("eval_images"),
                "val_path": job.val_path,
            },
            "env": environment(),
            "paths": {"work_dir": str(job.work_dir), "run_dir": str(run)},
        }
    )


def _free_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_job_in_process(job: Job) -> dict[str, Any]:
    """:func:`execute_job` here (peak RSS is then this process's, across cells)."""
    try:
        record = execute_job(job)
    finally:
        _free_memory()
    record["isolation"] = "in-process"
    return record


def run_job_subprocess(job: Job, timeout_s: float | None = None) -> dict[str, Any]:
    """:func:`execute_job` in a fresh Python (``python -m solo_deepfusion.solo.bench``).

    The child's output goes to ``<work dir>.log``; a crash, a timeout or a non-zero exit raise
    with the log's tail.
    """
    job.work_dir.parent.mkdir(parents=True, exist_ok=True)
    spec = job.work_dir.with_suffix(".job.json")
    result = job.work_dir.with_suffix(".result.json")
    log = job.work_dir.with_suffix(".log")
    result.unlink(missing_ok=True)
    write_json(spec, job.to_json())
    command = [sys.executable, "-m", "solo_deepfusion.solo.bench", "--run-job", str(spec)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("w") as out:
        try:
            code = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s, env=env
            ).returncode
        except subprocess.TimeoutExpired as err:
            raise RuntimeError(f"cell timed out after {timeout_s} s; log: {log}") from err
    if code != 0 or not result.is_file():
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"cell exited with status {code}; log {log}:\n{tail}")
    record = json.loads(result.read_text())
    record["isolation"] = "subprocess"
    return record


def _run_job_file(path: Path) -> int:
    """The child side of :func:`run_job_subprocess`."""
    job = Job.from_json(json.loads(path.read_text()))
    try:
        record = execute_job(job)
    except Exception:
        traceback.print_exc()
        return 1
    write_json(job.work_dir.with_suffix(".result.json"), record)
    return 0


# ---------------------------------------------------------------------------------------------
# Environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _dali_version() -> str | None:
    names = (d.metadata["Name"] or "" for d in importlib.metadata.distributions())
    found = sorted({n for n in names if n.lower().startswith("nvidia-dali")})
    return f"{found[0]}=={_version(found[0])}" if found else None


def _git(*args: str) -> str | None:
    repo = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            # --no-optional-locks: `status` must not refresh (write) the index
            ["git", "--no-optional-locks", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def environment() -> dict[str, Any]:
    """Versions, commit and machine of this process (read-only git calls)."""
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    cuda = torch.cuda.is_available()
    return {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": _version("torchvision"),
            "lightning": _version("lightning"),
            "solo-learn": _version("solo-learn"),
            "solo-deepfusion": _version("solo-deepfusion"),
            "dali": _dali_version(),
        },
        "commit": _git("rev-parse", "HEAD") or os.environ.get("SOLO_DEEPFUSION_COMMIT"),
        "dirty": None if dirty is None else bool(dirty),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu",
        "cuda": torch.version.cuda if cuda else None,
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ---------------------------------------------------------------------------------------------
# Command line


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def parser() -> argparse.ArgumentParser:
    """The ``solo-deepfusion bench`` options."""
    p = CommandParser(
        prog="solo-deepfusion bench",
        description="Transformer head vs feed-forward head: a matched grid of pretraining runs.",
        allow_abbrev=False,
    )
    add = p.add_argument
    add("--config-path", "-cp", type=Path, help=f"recipe folder (default: {RECIPES_DIR})")
    add("--config-name", "-cn", required=True, help="recipe, e.g. cifar10_quick")
    add("--methods", nargs="+", help="solo-learn methods (default: the recipe's)")
    add(
        "--projectors",
        nargs="+",
        default=["mlp", "transformer"],
        help="mlp, mlp_matched, transformer, or NAME:key=value,... (e.g. transformer:mask=self)",
    )
    add("--seeds", nargs="+", type=int, default=[0])
    g = p.add_argument_group("ablation axes (each a grid dimension)")
    g.add_argument("--batch-sizes", nargs="+", type=int, help="optimizer.batch_size")
    g.add_argument(
        "--temperatures",
        nargs="+",
        type=_float,
        help="method_kwargs.temperature (methods that have one)",
    )
    g.add_argument("--weight-decays", nargs="+", type=_float, help="optimizer.weight_decay")
    g.add_argument("--depths", nargs="+", type=int, help="projector.depth (not the stock mlp)")
    b = p.add_argument_group("budget (the same for every cell)")
    b.add_argument("--epochs", type=int, help="max_epochs (default: the recipe's)")
    b.add_argument("--fraction", type=_float, help="data.fraction of the training set")
    b.add_argument("--data", type=Path, help=f"CIFAR-style folder (default: ${DATA_ENV})")
    b.add_argument("--train-per-class", type=int, help="cut the training split to N per class")
    b.add_argument("--val-per-class", type=int, help="cut the validation split to N per class")
    b.add_argument(
        "--overrides",
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra overrides for every pretraining run",
    )
    b.add_argument(
        "--method-override",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="a Hydra override for one method's runs (repeatable)",
    )
    e = p.add_argument_group("evaluation")
    e.add_argument(
        "--eval-dataset",
        help="dataset whose evaluation transforms (CIFAR: 32 px) the offline evaluations use "
        "(default: the recipe's data.dataset; give cifar10 when a DALI run sets custom)",
    )
    e.add_argument(
        "--linear-epochs",
        type=int,
        default=0,
        help=f"offline linear probe epochs ({LINEAR_RECIPE}); 0 skips it",
    )
    e.add_argument(
        "--linear-overrides",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help="Hydra overrides of the linear probe",
    )
    e.add_argument("--knn-k", nargs="*", type=int, default=list(KNN_K), help="none skips k-NN")
    e.add_argument("--knn-temperature", type=_float, default=KNN_TEMPERATURE)
    e.add_argument(
        "--eval-batch-sizes",
        nargs="+",
        type=int,
        default=list(EVAL_BATCH_SIZES),
        help="evaluation batch sizes of the unsupervised (1-NN) accuracy",
    )
    e.add_argument("--eval-max-images", type=int, help="validation images for it (class-balanced)")
    e.add_argument("--fusion-samples", type=int, default=FUSION_SAMPLES)
    e.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="evaluation device"
    )
    e.add_argument("--eval-workers", type=int, default=2)
    r = p.add_argument_group("running")
    r.add_argument("--results", type=Path, default=Path("benchmarks/results.jsonl"))
    r.add_argument(
        "--work",
        type=Path,
        default=Path("benchmarks/work"),
        help="cell folders (runs/<cell id>) and prepared data",
    )
    r.add_argument("--isolation", choices=("subprocess", "in-process"), default="subprocess")
    r.add_argument("--cell-timeout", type=_float, help="seconds (subprocess isolation)")
    r.add_argument(
        "--time-budget",
        type=_float,
        help="seconds: start no cell that would not finish in time (resume later)",
    )
    r.add_argument("--skip-failed", action="store_true", help="do not retry failed cells")
    r.add_argument("--keep-checkpoints", action="store_true")
    r.add_argument("--no-check", action="store_true", help="skip composing every cell's config")
    r.add_argument("--dry-run", action="store_true", help="print the grid, run nothing")
    return p  # fmt: skip


def _method_overrides(items: Sequence[str], methods: Sequence[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        method, sep, override = item.partition(":")
        if not sep or "=" not in override or method not in methods:
            raise UsageError(f"--method-override {item!r}: expected METHOD:KEY=VALUE, METHOD in "
                             f"{list(methods)}")  # fmt: skip
        out.setdefault(method, []).append(override)
    return out


def _fills(recipe: DictConfig, method: str, given: Sequence[str]) -> list[str]:
    """Overrides for keys ``method`` needs that the recipe and the user leave unset."""
    fills = []
    for key, value in METHOD_FILLS.get(method, {}).items():
        if omegaconf_select(recipe, key, None) is None and not _has_override(given, key):
            fills.append(f"++{key}={value}")
    return fills


def _check_conflicts(args: argparse.Namespace) -> None:
    axis_options = {"batch_size": args.batch_sizes, "temperature": args.temperatures,
                    "weight_decay": args.weight_decays, "depth": args.depths}  # fmt: skip
    taken = {AXES[a] for a, v in axis_options.items() if v}
    taken |= {"max_epochs"} if args.epochs is not None else set()
    taken |= {"data.fraction"} if args.fraction is not None else set()
    taken |= {"seed", "method", "projector"}
    clash = sorted(k for k in taken if _has_override(args.overrides, k))
    if clash:
        raise UsageError(f"set by the grid's options, not --overrides: {clash}")
    for name, values in axis_options.items():
        if values and len(set(values)) != len(values):
            raise UsageError(f"repeated values in the {name} axis: {values}")


def build_study(args: argparse.Namespace) -> tuple[Study, list[Cell], DictConfig]:
    """The study, its cells, and the recipe as composed with the user's overrides."""
    _check_conflicts(args)
    config_dir = (args.config_path or RECIPES_DIR).expanduser().resolve()
    recipe = compose_config(config_dir, args.config_name, args.overrides)
    methods = args.methods or [base_method(recipe.method)]
    given = _method_overrides(args.method_override, methods)
    extra = {m: (*given.get(m, []), *_fills(recipe, m, given.get(m, []))) for m in methods}
    study = Study(
        config_dir=config_dir,
        config_name=args.config_name.removesuffix(".yaml"),
        max_epochs=int(recipe.max_epochs),
        overrides=tuple(args.overrides),
        method_overrides={m: tuple(v) for m, v in extra.items() if v},
        epochs=args.epochs,
        fraction=args.fraction,
        eval_dataset=args.eval_dataset or str(recipe.data.dataset),
        train_per_class=args.train_per_class,
        val_per_class=args.val_per_class,
        linear_epochs=args.linear_epochs,
        linear_overrides=tuple(args.linear_overrides),
        knn_k=tuple(args.knn_k or ()),
        knn_temperature=args.knn_temperature,
        eval_batch_sizes=tuple(args.eval_batch_sizes),
        eval_max_images=args.eval_max_images,
        fusion_samples=args.fusion_samples,
    )
    if not study.recipe_file.is_file():
        raise UsageError(f"recipe {study.recipe_file} not found")
    projectors = [ProjectorSpec.parse(p) for p in args.projectors]
    if len({p.label for p in projectors}) != len(projectors):
        raise UsageError(f"repeated projectors: {[p.label for p in projectors]}")
    axes = {"batch_size": args.batch_sizes, "temperature": args.temperatures,
            "weight_decay": args.weight_decays, "depth": args.depths}  # fmt: skip
    cells = expand_grid(
        study, methods, projectors, args.seeds, {k: v for k, v in axes.items() if v}
    )
    return study, cells, recipe


def _print_grid(cells: Sequence[Cell], done: set[str]) -> None:
    print(f"{'cell id':<16}  {'status':<6}  cell")
    for cell in cells:
        status = "done" if cell.cell_id in done else "todo"
        print(f"{cell.cell_id:<16}  {status:<6}  {describe(cell.key())}")
    todo = sum(cell.cell_id not in done for cell in cells)
    print(f"{len(cells)} cells, {todo} to run")


def _data_source(args: argparse.Namespace) -> Path | None:
    if args.data is not None:
        return args.data
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else None


def _check_cells(jobs: Sequence[Job], *, data_ready: bool = True) -> None:
    """Compose every cell's pretraining config now, so a bad cell fails before any training.

    Without the data prepared (``--dry-run``), a check that needs the data folder (solo-learn
    counts a custom dataset's classes) is reported and skipped.
    """
    skipped = 0
    for job in jobs:
        try:
            pretrain_config(job.pretrain_argv)
        except OSError as err:
            if data_ready:
                raise UsageError(f"cell {job.cell_id} ({describe(job.key)}): {err}") from err
            skipped += 1
        except (UsageError, AssertionError, ValueError) as err:
            raise UsageError(f"cell {job.cell_id} ({describe(job.key)}): {err!r}") from err
    if skipped:
        print(f"note: {skipped} cell configs not checked: they read data not prepared yet")
    else:
        print(f"the {len(jobs)} cells' configs compose")


def _jobs(args: argparse.Namespace, cells: Sequence[Cell], recipe: DictConfig, prepare: bool):
    """The cells' jobs; with ``prepare``, on the data from ``--data`` (unpacked/cut once)."""
    source = _data_source(args)
    data = None
    if source is not None and prepare:
        data = prepare_data(source, args.work.resolve(), args.train_per_class, args.val_per_class)
    elif source is None and (args.train_per_class or args.val_per_class):
        raise UsageError(f"--train/val-per-class need --data or ${DATA_ENV}")
    default_val = omegaconf_select(recipe, "data.val_path", None)
    return [
        make_job(cell, data, args.work.resolve(), default_val=default_val, device=args.device,
                 eval_workers=args.eval_workers, keep_checkpoints=args.keep_checkpoints)
        for cell in cells
    ]  # fmt: skip


def _runner(args: argparse.Namespace) -> Runner:
    if args.isolation == "subprocess":
        return functools.partial(run_job_subprocess, timeout_s=args.cell_timeout)
    return run_job_in_process


def main(argv: Sequence[str] | None = None) -> int:
    """``solo-deepfusion bench``: 0 when every cell is done (or left to a later call by
    ``--time-budget``), 1 when a cell failed, 2 for a bad command line or cell config.

    ``--dry-run`` prints the grid and composes every cell's config (unless ``--no-check``)
    without preparing data or training.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--run-job"]:
        return _run_job_file(Path(argv[1]))
    try:
        args = parser().parse_args(argv)
        _, cells, recipe = build_study(args)
        results = args.results
        if args.dry_run:
            _print_grid(cells, finished_cells(results))
        jobs = _jobs(args, cells, recipe, prepare=not args.dry_run)
        if not args.no_check:
            _check_cells(jobs, data_ready=not args.dry_run)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    summary = run_grid(
        jobs,
        results,
        _runner(args),
        retry_failed=not args.skip_failed,
        time_budget_s=args.time_budget,
    )
    print(
        f"bench: {len(summary.ran)} ran, {len(summary.skipped)} already done, "
        f"{len(summary.failed)} failed, {len(summary.remaining)} left by the time budget; "
        f"results in {results}"
    )
    return 1 if summary.failed else 0


if __name__ == "__main__":  # the child of run_job_subprocess, or a direct call
    sys.exit(main())
