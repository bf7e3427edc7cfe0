"""Running cells: one cell trained and evaluated into its record (here or in a child Python),
and the grid loop that runs the unfinished ones and appends their records."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from omegaconf import DictConfig
from solo.utils.checkpointer import Checkpointer
from solo.utils.misc import omegaconf_select

from solo_deepfusion.atomic import write_json
from solo_deepfusion.bench.records import SCHEMA, append_record, environment, finished_cells
from solo_deepfusion.jsonl import json_safe
from solo_deepfusion.solo.bench.evaluation import evaluate_in_memory, head_cost, offline_metrics
from solo_deepfusion.solo.bench.grid import describe
from solo_deepfusion.solo.bench.jobs import Job
from solo_deepfusion.solo.bench.probe import BenchProbe
from solo_deepfusion.solo.launch import run_pretrain
from solo_deepfusion.solo.monitor import CollapseMonitor

# ---------------------------------------------------------------------------------------------
# One cell: train, evaluate, record


def portable_path(path: str | os.PathLike | None, work_dir: Path) -> str | None:
    """``path`` as a record keeps it: relative to the bench's ``--work`` folder (the parent of
    ``runs/<cell>``) when inside it, else its last two parts, so committed results name no
    folder of the machine that produced them."""
    if path is None:
        return None
    path, work = Path(path).resolve(), work_dir.resolve().parent.parent
    if path.is_relative_to(work):
        return path.relative_to(work).as_posix()
    return Path(*path.parts[-2:]).as_posix()


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
    trainer_callbacks = trainer.callbacks
    del model, trainer
    metrics.update(offline_metrics(job, run))
    cost["eval_seconds"] = time.monotonic() - began
    if not job.keep_checkpoints:
        for ckpt in run.glob("*.ckpt"):
            ckpt.unlink()
    fusion = memory.get("fusion", {})
    collapse = next((c for c in trainer_callbacks if isinstance(c, CollapseMonitor)), None)
    if collapse is not None and collapse.last is not None:
        metrics["collapse_min_entropy"] = min(collapse.last.entropy, default=None)
        metrics["collapse_output_cosine"] = collapse.last.output_cosine
        metrics["collapse_output_rank"] = collapse.last.output_rank
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
                "feature_probe_weight_decay": memory.get("feature_probe_weight_decay"),
                "collapse": None
                if collapse is None or collapse.last is None
                else {"step": collapse.last_step, **dataclasses.asdict(collapse.last)},
                "val_path": portable_path(job.val_path, job.work_dir),
            },
            "env": environment(),
            "paths": {
                "work_dir": portable_path(job.work_dir, job.work_dir),
                "run_dir": portable_path(run, job.work_dir),
            },
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
    write_json(spec, job.to_json(), allow_nan=True)
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


def run_job_file(path: Path) -> int:
    """The child side of :func:`run_job_subprocess`."""
    job = Job.from_json(json.loads(path.read_text()))
    try:
        record = execute_job(job)
    except Exception:
        traceback.print_exc()
        return 1
    write_json(job.work_dir.with_suffix(".result.json"), record, allow_nan=True)
    return 0


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
        "paths": {"work_dir": portable_path(job.work_dir, job.work_dir)},
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
