"""One GPU session: throughput, zoo-scale SimCLR per arm, evaluation, files to publish.

Run through ``scripts/gpu_session.sh`` (it installs the carried wheels and finds the data); the
parts, in order, each recording what it finished under ``--work`` so that a second call
resumes where a first one was stopped (the device tool ends a command at 10 minutes):

1. ``throughput``: SimCLR training steps through the launcher, batch 512, bf16, CIFAR stem, for
   ``mlp`` and the default head side by side: images/s of the step's compute and of the whole
   step (loader wait included), their ratio (which of data loading or the GPU bounds it) and the
   step-time ratio default / ``mlp``.
2. ``train``: the arms as cells of ``solo-deepfusion bench`` (all of CIFAR-10, paired seed, the
   same epochs for every arm, sized from step 1's throughput to fit the time left), each followed
   by k-NN and a cached-feature linear probe on the full test split, on the GPU.
3. ``pack``: the zoo files of the arms that have a zoo entry (fp16), the results, the report and
   the log, as one tar split into parts that fit the device tool's return limits (8 files of
   16 MiB). ``python scripts/build_zoo.py --from-bundle <dir>`` publishes them.

``--dry-run`` prints the plan, the carried wheels and the estimated time per part without a GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import os
import statistics
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ZOO_RECIPES = REPO / "zoo" / "recipes"
RECIPE = "simclr-r18-cifar10-gpu"
MIB = 2**20
# The device tool returns at most 8 files of 16 MiB, 64 MiB in all, from $OUT.
PART_BYTES = 16 * MIB
MAX_BUNDLE_BYTES = 60 * MIB
# Share of the time left that the planned epochs may fill: the bench starts a cell only while the
# time used plus its longest cell so far fits its budget, so a cell that overruns its plan must
# not cost the next arm (the pair).
PLAN_FILL = 0.85


@dataclass(frozen=True)
class Arm:
    """A head trained in the session: its bench projector spec and, if published, its entry."""

    label: str
    projector: str
    zoo_entry: str | None = None


# In priority order: an arm is dropped from the end when the time left would give too few epochs.
ARMS = (
    Arm("mlp", "mlp", "simclr-r18-cifar10-gpu"),
    # `cosine_tied` (0.5.0): q = k, cosine logits with a learnable per-head scale, the regime
    # whose attention is class-aware end to end at CPU scale (benchmarks/regimes/confirm).
    Arm(
        "default",
        "transformer:lr_scale=0.1,preset=cosine_tied",
        "simclr-deepfusion-r18-cifar10-gpu",
    ),
    # SimCLR's default in 0.3.0-0.4.0, whose attention stayed uniform on the first H200 session.
    Arm("stable_bn", "transformer:lr_scale=0.1,preset=stable_bn"),
    # Half of the default's gain at CPU scale, at no cost: the stock MLP with an output
    # BatchNorm (benchmarks/controls). The mixing controls ran on the first session's H200.
    Arm("mlp_bn", "mlp:output_norm=batch"),
)


@dataclass(frozen=True)
class Scale:
    """What the session runs at: ``full`` on the device, ``tiny`` for the CPU rehearsal."""

    batch_size: int = 512
    train_per_class: int | None = None
    val_per_class: int | None = None
    # Past the loader's prefetch (workers x 2 batches): the first session timed 30 steps after 10
    # and read "GPU-bound" where its epochs were loader-bound (benchmarks/gpu/README.md).
    warmup_steps: int = 40
    timed_steps: int = 100
    min_epochs: int = 10
    max_epochs: int = 400
    cell_overhead_s: float = 60.0  # per cell: start-up, evaluation, checkpoint export
    pack_reserve_s: float = 30.0
    accelerator: str = "gpu"


SCALES = {
    "full": Scale(),
    "tiny": Scale(
        batch_size=16,
        train_per_class=8,
        val_per_class=4,
        warmup_steps=1,
        timed_steps=2,
        min_epochs=1,
        max_epochs=1,
        cell_overhead_s=20.0,
        pack_reserve_s=10.0,
        accelerator="cpu",
    ),
}
# Before anything is measured: a guess, for --dry-run only.
ASSUMED_IMAGES_PER_S = 8000.0
ASSUMED_SETUP_S = 40.0
ASSUMED_THROUGHPUT_S = 120.0


def pretrain_overrides(scale: Scale, workers: int) -> list[str]:
    """The Hydra overrides of every training run of the session (throughput and cells)."""
    return [
        f"accelerator={scale.accelerator}",
        "devices=1",
        "precision=bf16-mixed",
        f"optimizer.batch_size={scale.batch_size}",
        f"data.num_workers={workers}",
        "auto_resume.enabled=False",
        "++enable_progress_bar=False",
    ]


# ----------------------------------------------------------------------------- planning


class State:
    """``<work>/state.json``: what each part finished, so that a later call resumes."""

    def __init__(self, work: Path) -> None:
        self.path = work / "state.json"
        self.data: dict[str, Any] = json.loads(self.path.read_text()) if self.path.exists() else {}

    def get(self, part: str) -> Any:
        return self.data.get(part)

    def record(self, part: str, value: Any) -> None:
        self.data[part] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)


def epochs_that_fit(seconds_left: float, arms: int, epoch_s: float, scale: Scale) -> int:
    """Epochs per arm so that ``arms`` cells, their overheads and packing fill
    :data:`PLAN_FILL` of the time left."""
    training = PLAN_FILL * seconds_left - scale.pack_reserve_s - arms * scale.cell_overhead_s
    if training <= 0 or epoch_s <= 0:
        return 0
    return min(scale.max_epochs, math.floor(training / (arms * epoch_s)))


def choose_arms(
    seconds_left: float, epoch_s: float, scale: Scale, arms: Sequence[Arm] = ARMS
) -> tuple[list[Arm], int]:
    """The most arms (two at least, in priority order) whose shared epoch count reaches
    ``scale.min_epochs``; with two arms, whatever fits (at least one epoch)."""
    for count in range(len(arms), 2, -1):
        epochs = epochs_that_fit(seconds_left, count, epoch_s, scale)
        if epochs >= scale.min_epochs:
            return list(arms[:count]), epochs
    return list(arms[:2]), max(1, epochs_that_fit(seconds_left, 2, epoch_s, scale))


def epoch_seconds(train_images: int, images_per_s: float) -> float:
    """One epoch's training time at the measured whole-step rate (10% margin for the epoch's
    start and its last partial batch)."""
    return 1.1 * train_images / images_per_s


def plan_session(
    state: State, throughput: dict[str, Any], seconds_left: float, scale: Scale, device: str
) -> dict[str, Any]:
    """The arms and epochs, from the slowest arm's measured whole-step rate; a plan already
    recorded (an earlier call of the same session) is kept, so a resumed cell trains as the
    first call planned."""
    plan = state.get("plan")
    if plan is None:
        images = 50_000 if scale.train_per_class is None else 10 * scale.train_per_class
        slowest = min(row["images_per_s"] for row in throughput["arms"].values())
        arms, epochs = choose_arms(seconds_left, epoch_seconds(images, slowest), scale)
        plan = {
            "arms": [arm.label for arm in arms],
            "epochs": epochs,
            "train_images": images,
            "device": device,
            "images_per_s": slowest,
        }
        state.record("plan", plan)
        (state.path.parent / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    return plan


# ----------------------------------------------------------------------------- packing


def bundle_members(work: Path, arms: Sequence[Arm], returned: Sequence[str] = ()) -> list[Path]:
    """What goes back, most important first: results, report, log, then each entry's record,
    args and full weights (the backbone file is cut from the full one when publishing), the
    default head's first. Weights a call already ``returned`` (paths relative to ``work``) are
    not sent again: two full files may not fit one call's 64 MiB, so a second call brings the
    rest."""
    names = ["plan.json", "throughput.json", "results.jsonl", "report.md", "session.log"]
    members = [work / n for n in names]
    for arm in sorted(arms, key=lambda a: a.label != "default"):
        if arm.zoo_entry and f"export/{arm.zoo_entry}" not in returned:
            folder = work / "export" / arm.zoo_entry
            members += [folder / "cell.json", folder / f"{arm.zoo_entry}.args.json"]
            members += [folder / f"{arm.zoo_entry}.full.safetensors"]
    return [m for m in members if m.is_file()]


def returned_entries(
    members: Sequence[Path], left_out: Sequence[Path], work: Path, returned: Sequence[str]
) -> list[str]:
    """The entries (``export/<name>``) whose full weights have now come back, this call's
    included; an entry whose record went back but whose weights did not is not among them."""
    sent = {
        m.relative_to(work).parent.as_posix()
        for m in members
        if m.name.endswith(".full.safetensors") and m not in left_out
    }
    return sorted({*returned, *sent})


def pack(
    members: Sequence[Path], root: Path, out: Path, limit: int = MAX_BUNDLE_BYTES
) -> tuple[list[Path], list[Path]]:
    """Tar ``members`` (paths kept relative to ``root``) in order while they fit ``limit``,
    split into ``bundle.tar.NNN`` parts of at most :data:`PART_BYTES` in ``out``; returns the
    parts and the members left out. ``cat bundle.tar.* | tar -x`` restores them."""
    buffer = io.BytesIO()
    left_out: list[Path] = []
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in members:
            # header and padding: at most 1 KiB per member, and 10 KiB of end blocks
            if buffer.tell() + path.stat().st_size + 1024 + 10240 > limit:
                left_out.append(path)
                continue
            tar.add(path, arcname=path.relative_to(root).as_posix())
    data = buffer.getvalue()
    out.mkdir(parents=True, exist_ok=True)
    parts = []
    for index, start in enumerate(range(0, len(data), PART_BYTES)):
        part = out / f"bundle.tar.{index:03d}"
        part.write_bytes(data[start : start + PART_BYTES])
        parts.append(part)
    return parts, left_out


# ----------------------------------------------------------------------------- the parts


def measure_throughput(
    recipe_args: list[str], arms: Sequence[Arm], scale: Scale, workers: int, work: Path
) -> dict[str, Any]:
    """Median compute and whole-step time of each arm's training steps, arms side by side."""
    import lightning.pytorch as pl
    import torch

    from solo_deepfusion.solo.launch import run_pretrain

    class StepClock(pl.Callback):
        def __init__(self) -> None:
            self.compute: list[float] = []
            self.whole: list[float] = []
            self._start = self._last_end = 0.0

        @staticmethod
        def _now() -> float:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self._start = self._now()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            end = self._now()
            if trainer.global_step > scale.warmup_steps:
                self.compute.append(end - self._start)
                self.whole.append(end - self._last_end)
            self._last_end = end

    rows = {}
    for arm in arms:
        clock = StepClock()
        argv = [
            *recipe_args,
            *projector_argv(arm),
            *pretrain_overrides(scale, workers),
            f"+max_steps={scale.warmup_steps + scale.timed_steps + 1}",
            "max_epochs=1",
            "checkpoint.enabled=False",
            "data.val_path=null",
            f"checkpoint.dir={work / 'throughput'}",
        ]
        run_pretrain(argv, callbacks=[clock])
        compute, whole = statistics.median(clock.compute), statistics.median(clock.whole)
        rows[arm.label] = {
            "projector": arm.projector,
            "compute_step_s": compute,
            "whole_step_s": whole,
            "compute_images_per_s": scale.batch_size / compute,
            "images_per_s": scale.batch_size / whole,
            "loader_wait_share": max(0.0, 1 - compute / whole),
            "timed_steps": len(clock.whole),
        }
    base = rows[arms[0].label]
    for row in rows.values():
        row["compute_step_ratio"] = row["compute_step_s"] / base["compute_step_s"]
        row["whole_step_ratio"] = row["whole_step_s"] / base["whole_step_s"]
        row["bound_by"] = "data loading" if row["loader_wait_share"] > 0.15 else "GPU"
    return {"batch_size": scale.batch_size, "workers": workers, "arms": rows}


def projector_argv(arm: Arm) -> list[str]:
    """``--projector NAME projector.key=value ...`` for the launcher, from the bench spec."""
    name, _, fields = arm.projector.partition(":")
    pairs = [f for f in fields.split(",") if f]
    return ["--projector", name, *(f"projector.{pair}" for pair in pairs)]


def bench_argv(
    arms: Sequence[Arm], epochs: int, scale: Scale, workers: int, data: Path, work: Path,
    budget_s: float,
) -> list[str]:  # fmt: skip
    """The ``solo-deepfusion bench`` command line of the session's cells."""
    argv = [
        "--config-path", str(ZOO_RECIPES), "--config-name", RECIPE,
        "--projectors", *(arm.projector for arm in arms),
        "--seeds", "0",
        "--epochs", str(epochs),
        "--data", str(data),
        "--overrides", *pretrain_overrides(scale, workers), f"check_val_every_n_epoch={epochs}",
        "--eval-dataset", "cifar10",
        "--knn-k", "20", "200",
        "--feature-probe",
        "--linear-epochs", "0",
        "--device", "auto",
        "--eval-workers", str(workers),
        "--isolation", "in-process",
        "--keep-checkpoints",
        "--time-budget", f"{budget_s:.0f}",
        "--results", str(work / "results.jsonl"),
        "--work", str(work),  # runs/<cell id>; data/ shared with the throughput part
    ]  # fmt: skip
    if scale.train_per_class:
        argv += ["--train-per-class", str(scale.train_per_class)]
    if scale.val_per_class:
        argv += ["--val-per-class", str(scale.val_per_class)]
    return argv


def export_arms(work: Path, arms: Sequence[Arm]) -> list[str]:
    """Zoo files (fp16) of every published arm whose cell finished; the entries exported."""
    from solo_deepfusion.solo.zoo import export_checkpoint

    records = [json.loads(line) for line in (work / "results.jsonl").read_text().splitlines()]
    done = []
    for arm in arms:
        if arm.zoo_entry is None:
            continue
        record = next(
            (
                r
                for r in reversed(records)
                if r["status"] == "ok" and r["projector"] == arm.projector
            ),
            None,
        )
        if record is None:
            continue
        run = work / record["paths"]["run_dir"]  # relative to the bench's --work
        ckpt = max(run.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)
        folder = work / "export" / arm.zoo_entry
        export_checkpoint(ckpt, run / "args.json", folder, name=arm.zoo_entry)
        (folder / "cell.json").write_text(json.dumps(record, indent=2) + "\n")
        done.append(arm.zoo_entry)
    return done


def write_report(work: Path, throughput: dict[str, Any], plan: dict[str, Any]) -> None:
    """``report.md``: the plan, the throughput table and the bench report of the cells."""
    from solo_deepfusion.bench.report import main as bench_report

    lines = [
        "# GPU session",
        "",
        f"{plan['device']}; {plan['epochs']} epochs per arm on {plan['train_images']} images, "
        f"batch {throughput['batch_size']}, bf16-mixed, CIFAR stem, "
        f"{throughput['workers']} loader workers. Arms: {', '.join(plan['arms'])}.",
        "",
        "## Throughput (median of each arm's timed steps, arms measured in one run)",
        "",
        "| arm | images/s (whole step) | images/s (compute) | loader wait | bound by "
        "| step ratio to mlp (whole, compute) |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in throughput["arms"].items():
        lines.append(
            f"| {label} | {row['images_per_s']:.0f} | {row['compute_images_per_s']:.0f} | "
            f"{row['loader_wait_share']:.0%} | {row['bound_by']} | "
            f"{row['whole_step_ratio']:.2f}, {row['compute_step_ratio']:.2f} |"
        )
    cells = work / "cells.md"
    if (work / "results.jsonl").is_file():
        bench_report([str(work / "results.jsonl"), "--out", str(cells)])
    if cells.is_file():
        lines += ["", "## Cells", "", cells.read_text()]
    (work / "report.md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- driver


def find_data(candidates: Sequence[Path | None]) -> Path | None:
    for folder in candidates:
        if folder and ((folder / "train.tar.gz").is_file() or (folder / "train").is_dir()):
            return folder
    return None


def dry_run(scale: Scale, budget_s: float, wheels: Path) -> None:
    """The plan at the assumed throughput, the carried wheels and what each part should take."""
    wheel_files = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    size = sum(w.stat().st_size for w in wheel_files)
    print(f"wheels ({len(wheel_files)}, {size / MIB:.1f} MiB) from {wheels}:")
    for wheel in wheel_files:
        print(f"  {wheel.name} ({wheel.stat().st_size / MIB:.2f} MiB)")
    images = 50_000 if scale.train_per_class is None else 10 * scale.train_per_class
    left = budget_s - ASSUMED_SETUP_S - ASSUMED_THROUGHPUT_S
    epoch_s = epoch_seconds(images, ASSUMED_IMAGES_PER_S)
    arms, epochs = choose_arms(left, epoch_s, scale)
    print(f"budget {budget_s:.0f} s; at an assumed {ASSUMED_IMAGES_PER_S:.0f} images/s:")
    print(f"  setup (wheels, data)     ~{ASSUMED_SETUP_S:.0f} s")
    print(f"  throughput ({len(ARMS[:2])} arms)     ~{ASSUMED_THROUGHPUT_S:.0f} s")
    for arm in arms:
        cell = epochs * epoch_s + scale.cell_overhead_s
        print(f"  train+eval {arm.label:<12} ~{cell:.0f} s ({epochs} epochs x {epoch_s:.1f} s)")
    print(f"  pack                     ~{scale.pack_reserve_s:.0f} s")
    print("epochs are sized again from the throughput measured at the start of the run")


def run(args: argparse.Namespace, scale: Scale, deadline: float) -> int:
    from solo_deepfusion.solo.bench.cli import run_bench

    work, out = args.work.resolve(), args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    state = State(work)
    data = find_data([args.data])
    if data is None:
        raise SystemExit(f"error: no CIFAR-10 (train.tar.gz or train/) in {args.data}")
    recipe = ["--config-path", str(ZOO_RECIPES), "--config-name", RECIPE]
    workers = args.workers

    throughput = state.get("throughput")
    if throughput is None:
        from solo_deepfusion.datasets import prepare_data

        prepared = prepare_data(data, work, scale.train_per_class, scale.val_per_class)
        recipe += [f"data.train_path={prepared.train}"]
        throughput = measure_throughput(recipe, ARMS[:2], scale, workers, work)
        state.record("throughput", throughput)
        (work / "throughput.json").write_text(json.dumps(throughput, indent=2) + "\n")
    print(json.dumps(throughput, indent=2))

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    plan = plan_session(state, throughput, deadline - time.monotonic(), scale, device)
    print(f"plan: {plan}")
    arms = [arm for arm in ARMS if arm.label in plan["arms"]]

    budget = deadline - time.monotonic() - scale.pack_reserve_s
    status = run_bench(bench_argv(arms, plan["epochs"], scale, workers, data, work, budget))
    results = work / "results.jsonl"
    for line in results.read_text().splitlines() if results.is_file() else []:
        record = json.loads(line)
        if record["status"] != "ok":
            print(f"cell {record['cell_id']} ({record['projector']}) failed: {record['error']}")
    exported = state.get("exported") or []
    if (work / "results.jsonl").is_file():
        todo = [arm for arm in arms if arm.zoo_entry not in exported]
        state.record("exported", [*exported, *export_arms(work, todo)])
    write_report(work, throughput, plan)
    log = Path(os.environ["SESSION_LOG"]) if os.environ.get("SESSION_LOG") else None
    if log is not None and log.is_file():
        (work / "session.log").write_bytes(log.read_bytes()[-2 * MIB :])
    returned = state.get("returned") or []
    members = bundle_members(work, arms, returned)
    parts, left_out = pack(members, work, out)
    state.record("returned", returned_entries(members, left_out, work, returned))
    for name in ("report.md",):
        if (work / name).is_file():
            (out / name).write_bytes((work / name).read_bytes())
    print(f"packed {len(parts)} parts into {out}; left out: {[p.name for p in left_out]}")
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan; needs no GPU")
    parser.add_argument("--scale", choices=sorted(SCALES), default="full")
    parser.add_argument("--budget", type=float, default=540.0, help="seconds for this call")
    parser.add_argument("--data", type=Path, help="CIFAR-10 folder (train/test or .tar.gz)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/sdf-gpu-session"))
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-out")))
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl")
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    args = parser.parse_args(argv)
    deadline = time.monotonic() + args.budget
    scale = SCALES[args.scale]
    if args.dry_run:
        dry_run(scale, args.budget, args.wheels)
        return 0
    return run(args, dataclasses.replace(scale), deadline)


if __name__ == "__main__":
    sys.exit(main())
