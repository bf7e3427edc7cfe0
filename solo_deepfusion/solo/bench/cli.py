"""``solo-deepfusion bench``: the command line, the study it describes, and the run of its grid."""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig
from solo.methods import METHODS
from solo.methods.base import BaseMomentumMethod
from solo.utils.misc import omegaconf_select

from solo_deepfusion.bench.records import finished_cells
from solo_deepfusion.datasets import prepare_data
from solo_deepfusion.errors import UsageError, exit_status
from solo_deepfusion.heads import list_projectors
from solo_deepfusion.solo import base_method
from solo_deepfusion.solo.analysis import DATA_ENV, EVAL_BATCH_SIZES
from solo_deepfusion.solo.bench.grid import (
    AXES,
    FUSION_SAMPLES,
    KNN_K,
    KNN_TEMPERATURE,
    Cell,
    ProjectorSpec,
    Study,
    describe,
    expand_grid,
    has_override,
)
from solo_deepfusion.solo.bench.jobs import LINEAR_RECIPE, Job, make_job
from solo_deepfusion.solo.bench.runner import (
    Runner,
    run_grid,
    run_job_file,
    run_job_in_process,
    run_job_subprocess,
)
from solo_deepfusion.solo.launch import pretrain_config
from solo_deepfusion.solo.run import RECIPES_DIR, CommandParser, compose_config

PREDICTOR_METHODS = ("byol", "mocov3", "nnbyol", "nnclr", "nnsiam", "simsiam")


def method_fills(method: str) -> dict[str, str]:
    """Keys ``method`` needs that a recipe written for another method may lack."""
    fills = {}
    if method in PREDICTOR_METHODS:
        fills["method_kwargs.pred_hidden_dim"] = "${method_kwargs.proj_hidden_dim}"
    if issubclass(METHODS[method], BaseMomentumMethod):  # solo-learn's BYOL recipe values
        fills.update({"momentum.base_tau": "0.99", "momentum.final_tau": "1.0"})
    return fills


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
        help=f"{', '.join(list_projectors())}, or NAME:key=value,... (e.g. transformer:mask=self)",
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
        "--feature-probe",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="linear probe on cached backbone features of the training and validation splits "
        "(L-BFGS to convergence, seconds)",
    )
    e.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="evaluation device"
    )
    e.add_argument("--eval-workers", type=int, default=2)
    r = p.add_argument_group("running")
    r.add_argument("--results", type=Path, default=Path("benchmarks/results.jsonl"))
    r.add_argument(
        "--work",
        type=Path,
        default=Path("benchmarks/scratch"),
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
    for key, value in method_fills(method).items():
        if omegaconf_select(recipe, key, None) is None and not has_override(given, key):
            fills.append(f"++{key}={value}")
    return fills


def _check_conflicts(args: argparse.Namespace) -> None:
    axis_options = {"batch_size": args.batch_sizes, "temperature": args.temperatures,
                    "weight_decay": args.weight_decays, "depth": args.depths}  # fmt: skip
    taken = {AXES[a] for a, v in axis_options.items() if v}
    taken |= {"max_epochs"} if args.epochs is not None else set()
    taken |= {"data.fraction"} if args.fraction is not None else set()
    taken |= {"seed", "method", "projector"}
    clash = sorted(k for k in taken if has_override(args.overrides, k))
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
    stock = sorted(m for m in METHODS if base_method(m) == m)
    unknown = [m for m in methods if m not in stock]
    if unknown:
        raise UsageError(f"--methods {' '.join(unknown)}: not a solo-learn method; choose from: "
                         f"{', '.join(stock)}")  # fmt: skip
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
        feature_probe=args.feature_probe,
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
            raise UsageError(f"cell {job.cell_id} ({describe(job.key)}): {err}") from err
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
        return run_job_file(Path(argv[1]))
    return exit_status(lambda: run_bench(argv))


def run_bench(argv: Sequence[str]) -> int:
    """The grid of ``argv``: checked, then run (unless ``--dry-run``); 1 if a cell failed."""
    args = parser().parse_args(argv)
    _, cells, recipe = build_study(args)
    if args.dry_run:
        _print_grid(cells, finished_cells(args.results))
    jobs = _jobs(args, cells, recipe, prepare=not args.dry_run)
    if not args.no_check:
        _check_cells(jobs, data_ready=not args.dry_run)
    if args.dry_run:
        return 0
    summary = run_grid(
        jobs,
        args.results,
        _runner(args),
        retry_failed=not args.skip_failed,
        time_budget_s=args.time_budget,
    )
    print(
        f"bench: {len(summary.ran)} ran, {len(summary.skipped)} already done, "
        f"{len(summary.failed)} failed, {len(summary.remaining)} left by the time budget; "
        f"results in {args.results}"
    )
    return 1 if summary.failed else 0
