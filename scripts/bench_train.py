"""Training speed through the launcher: stock solo-learn SimCLR vs the plugin's heads.

Rows (same recipe, batch, backbone and data):

- ``stock simclr``: solo-learn's own ``SimCLR`` class in a plain Lightning ``Trainer``
  (no plugin code on the path);
- ``--projector mlp``: ``solo-deepfusion pretrain`` with the stock head (the plugin's tax);
- ``--projector transformer`` with the ``paper`` and ``small`` presets (at ``lr_scale=1``, as
  first measured; the default ``stable_bn`` preset has ``paper``'s size).

Only the compute of a step is timed (``on_train_batch_start`` -> ``on_train_batch_end``: forward,
backward, optimizer, EMA), after warm-up steps, so the data loader does not blur the comparison.

Usage::

    SOLO_DEEPFUSION_DATA=<cifar10 folder> python scripts/bench_train.py [--batch-size 256]
        [--steps 6] [--warmup 2] [--stem imagenet|cifar] [--accelerator cpu|gpu] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
from solo.methods import METHODS
from solo.utils.misc import make_contiguous

from solo_deepfusion.atomic import write_json
from solo_deepfusion.heads import count_parameters
from solo_deepfusion.solo.data import pretrain_loader
from solo_deepfusion.solo.launch import pretrain_config, run_pretrain
from solo_deepfusion.solo.model import apply_stem


class StepTimer(pl.Callback):
    """Wall time of each training step's compute (the loader's wait excluded)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.times, self._start = warmup, [], 0.0

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync()
        if trainer.global_step > self.warmup:
            self.times.append(time.perf_counter() - self._start)


def recipe_argv(args: argparse.Namespace, projector: Sequence[str]) -> list[str]:
    return [
        "--config-name",
        "cifar10_quick",
        *projector,
        f"optimizer.batch_size={args.batch_size}",
        f"+max_steps={args.warmup + args.steps}",
        "max_epochs=1",
        f"backbone.stem={args.stem}",
        f"accelerator={args.accelerator}",
        "devices=1",
        "checkpoint.enabled=False",
        "data.val_path=null",
        f"checkpoint.dir={args.work}",
    ]


def stock_simclr(argv: Sequence[str], timer: StepTimer) -> torch.nn.Module:
    """solo-learn's SimCLR in a plain Trainer: the same cfg, none of the plugin's training code.

    Only the stem is swapped as the plugin's runs have it (``backbone.stem``), so that both
    rows train the same network.
    """
    cfg = pretrain_config(argv)
    pl.seed_everything(cfg.seed)
    model = METHODS["simclr"](cfg)
    apply_stem(model, cfg.backbone.stem, cfg.seed)
    make_contiguous(model)  # as solo-learn's main_pretrain.py does
    model = model.to(memory_format=torch.channels_last)
    trainer = pl.Trainer(
        accelerator=cfg.accelerator,
        devices=1,
        max_steps=cfg.max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[timer],
    )
    trainer.fit(model, pretrain_loader(cfg))
    return model


def through_launcher(argv: Sequence[str], timer: StepTimer) -> torch.nn.Module:
    return run_pretrain(argv, callbacks=[timer]).lightning_module


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--stem", choices=["imagenet", "cifar"], default="imagenet")
    parser.add_argument("--accelerator", choices=["cpu", "gpu"], default="cpu")
    parser.add_argument("--work", default="/tmp/bench_train")
    parser.add_argument("--json", help="also write the rows here (atomic)")
    args = parser.parse_args(argv)

    rows = [
        ("stock simclr (solo-learn class)", stock_simclr, ["--projector", "mlp"]),
        ("--projector mlp", through_launcher, ["--projector", "mlp"]),
        (
            "--projector transformer (paper)",
            through_launcher,
            ["--projector", "transformer", "projector.preset=paper", "projector.lr_scale=1"],
        ),
        (
            "--projector transformer (small)",
            through_launcher,
            ["--projector", "transformer", "projector.preset=small", "projector.lr_scale=1"],
        ),
    ]
    results = []
    for label, run, projector in rows:
        timer = StepTimer(args.warmup)
        model = run(recipe_argv(args, projector), timer)
        step = statistics.median(timer.times)
        results.append(
            {
                "run": label,
                "head_params": count_parameters(model.projector),
                "step_s": step,
                "steps_per_s": 1 / step,
                "timed_steps": len(timer.times),
            }
        )
    stock = results[0]["step_s"]
    print(
        f"# bench_train: batch {args.batch_size} x 2 crops, ResNet-18 ({args.stem} stem, 32 px), "
        f"{args.accelerator}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"median of {args.steps} steps after {args.warmup} warm-up\n"
    )
    print("| run | head params (M) | step (s) | steps/s | vs stock |")
    print("|---|---|---|---|---|")
    for row in results:
        row["vs_stock"] = row["step_s"] / stock - 1
        print(
            f"| {row['run']} | {row['head_params'] / 1e6:.2f} | {row['step_s']:.3f} | "
            f"{row['steps_per_s']:.3f} | {row['vs_stock']:+.1%} |"
        )
    if args.json:
        write_json(args.json, {"args": vars(args), "rows": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
