"""What one cell runs: its key, and the launcher's and evaluations' command lines."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from solo_deepfusion.datasets import DataPaths
from solo_deepfusion.solo.bench.grid import AXES, Cell, Study, has_override

LINEAR_RECIPE = "cifar10_linear_quick"


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
    train_path: str | None = None
    keep_checkpoints: bool = False

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "work_dir": str(self.work_dir)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        return cls(**{**data, "work_dir": Path(data["work_dir"])})


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
            if not has_override(study.overrides, key):
                argv.append(f"++{key}={path}")
    if not has_override(study.overrides, "check_val_every_n_epoch"):
        argv.append(f"++check_val_every_n_epoch={epochs}")  # validate once, at the end
    if not has_override(study.overrides, "enable_progress_bar"):
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
        train_path=str(data.train) if data is not None else None,
        eval={**cell.study.evaluation(), "device": device, "workers": eval_workers},
        keep_checkpoints=keep_checkpoints,
    )
