"""Which head regime makes the attention learn? Head-only, on a trained backbone's features.

Each arm trains a Deep Fusion head alone, as scripts/bench_stability.py does: the stock recipe's
own ``training_step`` (SimCLR's NT-Xent loss by default; ``--recipe byol``: BYOL's, with its
predictor and momentum head) and optimizer (LARS, the head in its own group) at the recipe's
peak lr, on cached features of two augmented crops of CIFAR-10 training images by the zoo's
``simclr-r18-cifar10-cpu`` (``--backbone``: another entry's). Then, on held-out images (the
same class-balanced batches for every arm), it measures per layer the fusion ratio (same-class
attention mass over what uniform attention gives, a query's own views left out;
solo_deepfusion/fusion/metrics.py), the mass on the positive (the query's own other view) apart
from it, the row entropy and the logit spread; the outputs' mean cosine, effective rank and
leave-one-out 1-NN accuracy within a batch; and how the method's loss changes when every
layer's attention is pushed towards the query's class (:func:`class_bias_losses`).

    python scripts/probe_regimes.py --data <cifar10 folder>               # every arm
    python scripts/probe_regimes.py --data <cifar10 folder> --arms cosine tied
    python scripts/probe_regimes.py --data <cifar10 folder> --dry-run     # 2 steps, 1 arm
    python scripts/probe_regimes.py --report-only                         # the table, again
    python scripts/probe_regimes.py --data <cifar10 folder> --trained <zoo entry>  # its own head

Rows go to ``<out>/results.jsonl`` as arms finish (a rerun skips finished arms at the same
steps; ``--redo`` trains them again, and the newest row is reported), the table to
``<out>/report.md``, under ``<out>/verdict.md`` when there is one. The target (issue 23): the
last layer's fusion ratio >= 1.5 and rising with depth, every layer's entropy above 0.5 nats,
and no output collapse (mean output cosine below 0.5).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch
from bench_stability import (
    FEATURES_BACKBONE,
    HEALTHY_COSINE,
    HEALTHY_ENTROPY,
    cached_features,
    fit_head,
    head_model,
)
from torch import nn
from torchvision.datasets import ImageFolder

from solo_deepfusion.atomic import write_text
from solo_deepfusion.datasets import prepare_data
from solo_deepfusion.fusion import fusion_stats, leave_one_out_1nn_accuracy
from solo_deepfusion.heads.diagnostics import collapse_stats
from solo_deepfusion.heads.transformer import BatchSelfAttention
from solo_deepfusion.hub.manifest import get_entry
from solo_deepfusion.jsonl import append_jsonl
from solo_deepfusion.solo.bench.grid import ProjectorSpec
from solo_deepfusion.solo.measure import evaluating, fusion_head, head_tail
from solo_deepfusion.solo.zoo import load_model

RECIPES = ("simclr", "byol")  # a loss with negatives, and one without
DEFAULT = "transformer:lr_scale=0.1,preset=stable_bn"  # the default head, spelled out
EARLIEST = "residual=false,block_norm=batch,activation=relu,heads=4,norm=post"
T002 = "method_kwargs.temperature=0.02"


@dataclass(frozen=True)
class Arm:
    """A regime: head fields that replace or add to the default's, and recipe overrides."""

    fields: str = ""
    recipe: tuple[str, ...] = ()

    @property
    def spec(self) -> str:
        default = ProjectorSpec.parse(DEFAULT)
        fields = dict(default.fields) | dict(
            ProjectorSpec.parse(f"transformer:{self.fields}").fields
        )
        return ProjectorSpec(default.name, tuple(sorted(fields.items()))).label


ARMS = {  # in the order they run: the likeliest answers first, diverging arms cost seconds
    "default": Arm(),
    "cosine": Arm("attention_logits=cosine"),
    "tied": Arm("qk_init=tied"),
    "cosine_tied": Arm("attention_logits=cosine,qk_init=tied"),
    # the authors' earliest regime (paper-notes §9): no skips, BatchNorm in the blocks, ReLU,
    # 4 heads, post-norm, no mask, NT-Xent temperature 0.02
    "earliest": Arm(f"{EARLIEST},mask=none", (T002,)),
    "earliest_positives": Arm(EARLIEST, (T002,)),
    # the same with attention that starts selective, at the recipe's temperature (0.2): at
    # 0.02 it diverges within 10 steps too
    "earliest_cosine_tied_t0.2": Arm(f"{EARLIEST},mask=none,attention_logits=cosine,qk_init=tied"),
    "identity": Arm("qk_init=identity"),
    "mask_none": Arm("mask=none"),
    # a query may attend to its own other view (the authors' setting), with attention that
    # starts as a soft kNN: does same-class mass come with the positive's?
    "tied_mask_none": Arm("mask=none,qk_init=tied"),
    "view": Arm("context=view"),
    "qk_lr_10": Arm("qk_lr_scale=10"),
    "qk_lr_0.1": Arm("qk_lr_scale=0.1"),
    "no_residual": Arm("residual=false"),
    "cosine_no_residual": Arm("attention_logits=cosine,residual=false"),
    "mean": Arm("mixing=mean"),  # no selection at all: the floor of every number
}


def class_split(labels: torch.Tensor, held_out_per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Training indices, and held-out ones: the last ``held_out_per_class`` images of each
    class, shuffled once (seed 0) so that every held-out batch mixes the classes."""
    held = torch.cat(
        [(labels == c).nonzero().flatten()[-held_out_per_class:] for c in labels.unique()]
    )
    train = torch.ones(len(labels), dtype=torch.bool)
    train[held] = False
    order = torch.randperm(len(held), generator=torch.Generator().manual_seed(0))
    return train.nonzero().flatten(), held[order]


def feature_labels(data: Path, work: Path, per_class: int) -> torch.Tensor:
    """The class of each image of :func:`cached_features` (its ImageFolder's order)."""
    folder = prepare_data(data, work, train_per_class=per_class, val_per_class=1).train
    return torch.tensor(ImageFolder(str(folder)).targets)


def measure(model: pl.LightningModule, feats: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per-layer fusion statistics and logit spread, and the outputs' cosine, rank and 1-NN
    accuracy, averaged over held-out batches ``feats`` ``(batches, 2, B, F)``. A ``view``
    head sees each crop's batch alone (as it trains); a ``joint`` one both crops."""
    head = fusion_head(model)
    rows = []
    with evaluating(model):
        for batch, batch_labels in zip(feats, labels, strict=True):
            views = 2 if head.context == "joint" else 1
            tokens = torch.cat(list(batch[:views]))
            out, maps = head(tokens, num_views=views, return_attention=True)
            out = head_tail(model)(out)
            layers = fusion_stats(maps, batch_labels, num_views=views)
            collapse = collapse_stats(head, tokens, num_views=views, tail=head_tail(model))
            rows.append(
                {
                    "fusion_ratio": [s.fusion_ratio for s in layers],
                    "positive_mass": [s.positive_mass for s in layers],
                    "entropy": [s.entropy for s in layers],
                    "logit_std": list(collapse.logit_std),
                    "output_cosine": collapse.output_cosine,
                    "output_rank": collapse.output_rank,
                    # the first crop's outputs alone: a token's own other view is no neighbour
                    "nn_accuracy": leave_one_out_1nn_accuracy(
                        out[: len(batch_labels)], batch_labels, None
                    ),
                }
            )
    return {key: _mean([row[key] for row in rows]) for key in rows[0]}


CLASS_BIASES = (0.25, 0.5, 1.0, 2.0)


def _grouped_scores(attn: BatchSelfAttention, groups: torch.Tensor, beta: float):
    """``attn``'s own score function plus ``beta`` where query and key share a group but are
    not views of one sample; ``groups`` per sample, tokens view-major (as many views as the
    call's tokens hold)."""
    scores = type(attn)._scores.__get__(attn)

    def biased(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        views = q.shape[-2] // len(groups)
        sample = torch.arange(len(groups)).repeat(views)
        tokens = groups.repeat(views)
        same = (tokens[:, None] == tokens[None, :]) & (sample[:, None] != sample[None, :])
        return scores(q, k, allowed) + beta * same.to(q.dtype)

    return biased


@contextmanager
def class_bias(model: nn.Module, groups: torch.Tensor | None, beta: float) -> Iterator[None]:
    """Every attention module of ``model`` (a momentum copy's too) with ``beta`` added to its
    logits where query and key share a group (:func:`_grouped_scores`); nothing if ``None``."""
    modules = [m for m in model.modules() if isinstance(m, BatchSelfAttention)]
    if groups is not None:
        for attn in modules:  # the explicit softmax, where the scores can be changed
            attn._scores = _grouped_scores(attn, groups, beta)
            attn.forward = functools.partial(_with_weights, attn)
    try:
        yield
    finally:
        for attn in modules:
            attn.__dict__.pop("_scores", None)
            attn.__dict__.pop("forward", None)


def _with_weights(attn: BatchSelfAttention, x, allowed, need_weights):
    return type(attn).forward(attn, x, allowed, True)


@contextmanager
def _not_logging(model: pl.LightningModule) -> Iterator[None]:
    """``training_step`` called outside a fit: its ``self.log`` calls do nothing."""
    model.log = model.log_dict = lambda *args, **kwargs: None
    try:
        yield
    finally:
        del model.log, model.log_dict


def class_bias_losses(
    model: pl.LightningModule,
    feats: torch.Tensor,
    labels: torch.Tensor,
    betas: tuple[float, ...] = CLASS_BIASES,
) -> dict[str, list[float]] | None:
    """Does the loss reward attention that prefers the query's class? The method's own loss
    (its ``training_step``, eval mode) on the held-out batches ``feats`` ``(batches, 2, B, F)``
    when every layer's logits get ``+beta`` on the keys of the query's class (its own sample's
    views aside), minus the loss without, per ``beta``; and the same for random groups of the
    classes' sizes (any block structure, no class meaning). Positive: the objective penalises
    that preference. ``None`` for a fixed mixing."""
    head = fusion_head(model)
    if any(block.attn.mixing != "attention" for block in head.blocks):
        return None
    shuffle = torch.Generator().manual_seed(0)

    def loss(batch: torch.Tensor, targets: torch.Tensor, groups, beta: float) -> float:
        with class_bias(model, groups, beta), _not_logging(model):
            indexes = torch.arange(batch.shape[1])
            return float(model.training_step([indexes, list(batch), targets], 0))

    deltas: dict[str, list[list[float]]] = {"class": [], "random": []}
    with evaluating(model):
        for batch, batch_labels in zip(feats, labels, strict=True):
            base = loss(batch, batch_labels, None, 0.0)
            groups = {
                "class": batch_labels,
                "random": batch_labels[torch.randperm(len(batch_labels), generator=shuffle)],
            }
            for kind, g in groups.items():
                deltas[kind].append([loss(batch, batch_labels, g, b) - base for b in betas])
    return {kind: _mean(rows) for kind, rows in deltas.items()}


def kernel_fusion(feats: torch.Tensor, labels: torch.Tensor, scales: tuple[float, ...]) -> dict:
    """The fusion ratio of attention that is a softmax of ``scale`` x the cosine similarity of
    the backbone's features (both crops, own views masked): what a head that only reads the
    features' kNN structure would show, by ``scale``."""
    out = {}
    for scale in scales:
        ratios = []
        for batch, batch_labels in zip(feats, labels, strict=True):
            unit = torch.nn.functional.normalize(torch.cat(list(batch)), dim=-1)
            tokens = len(unit)
            sample = torch.arange(tokens) % (tokens // 2)
            logits = (scale * unit @ unit.T).masked_fill(
                sample[:, None] == sample[None, :], float("-inf")
            )
            ratios.append(fusion_stats([logits.softmax(-1)], batch_labels, num_views=2)[0])
        out[f"{scale:g}"] = sum(r.fusion_ratio for r in ratios) / len(ratios)
    return out


def _mean(values: list) -> float | list[float]:
    if isinstance(values[0], list):
        return [sum(column) / len(column) for column in zip(*values, strict=True)]
    return sum(values) / len(values)


class Trajectory(pl.Callback):
    """The last layer's fusion ratio, entropy and positive mass every ``every`` steps."""

    def __init__(self, every: int, feats: torch.Tensor, labels: torch.Tensor) -> None:
        self.every, self.feats, self.labels = every, feats, labels
        self.points: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, *_) -> None:
        if trainer.global_step % self.every == 0:
            stats = measure(pl_module, self.feats[:1], self.labels[:1])
            self.points.append(
                {"step": trainer.global_step}
                | {k: stats[k][-1] for k in ("fusion_ratio", "entropy", "positive_mass")}
            )


def held_out_batches(
    feats: torch.Tensor, labels: torch.Tensor, per_class: int, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(training indices, held-out features (batches, 2, B, F), their labels (batches, B))``."""
    train_idx, held_idx = class_split(labels, per_class)
    batches = len(held_idx) // batch_size
    held = held_idx[: batches * batch_size].view(batches, batch_size)
    return train_idx, feats[:, held].transpose(0, 1), labels[held]


def feature_baselines(held_feats: torch.Tensor, held_labels: torch.Tensor) -> dict:
    """What the backbone's features alone give on the held-out batches: their 1-NN accuracy
    within a batch (first crop), and the fusion ratio of a kernel over them
    (:func:`kernel_fusion`)."""
    nn_accuracy = [
        leave_one_out_1nn_accuracy(f[0], y, None)
        for f, y in zip(held_feats, held_labels, strict=True)
    ]
    return {
        "features_nn_accuracy": sum(nn_accuracy) / len(nn_accuracy),
        "features_kernel_fusion": kernel_fusion(held_feats, held_labels, (10, 30, 100)),
    }


def trained_row(entry: str, feats: torch.Tensor, labels: torch.Tensor, args) -> dict:
    """Zoo entry ``entry``'s own head, trained end to end with its backbone (whose features
    ``feats`` are), measured on the held-out batches as an arm is after training."""
    model = load_model(entry, progress=False)
    model.backbone = torch.nn.Identity()  # features in
    _, held_feats, held_labels = held_out_batches(
        feats, labels, args.held_out_per_class, args.batch_size
    )
    return {
        "arm": f"zoo:{entry}",
        "backbone": entry,
        "spec": ",".join(f"{k}={v}" for k, v in sorted(get_entry(entry).projector.items())),
        "recipe_overrides": [],
        "steps": 0,
        "batch_size": args.batch_size,
        "temperature": getattr(model, "temperature", None),
        "held_out_batches": len(held_feats),
        **feature_baselines(held_feats, held_labels),
        **measure(model, held_feats, held_labels),
        "class_bias_loss": class_bias_losses(model, held_feats, held_labels),
    }


def train_arm(name: str, feats: torch.Tensor, labels: torch.Tensor, args, scratch: Path) -> dict:
    """Fit arm ``name``'s head alone and measure it on the held-out batches, before and after."""
    arm = ARMS[name]
    cfg, model = head_model(args.recipe, arm.spec, scratch, arm.recipe)
    batch_size = cfg.optimizer.batch_size
    train_idx, held_feats, held_labels = held_out_batches(
        feats, labels, args.held_out_per_class, batch_size
    )
    batches = len(held_feats)
    before = measure(model, held_feats, held_labels)
    trajectory = Trajectory(max(args.steps // 8, 1), held_feats, held_labels)
    began = time.monotonic()
    diverged_at = fit_head(model, feats[:, train_idx], args.steps, batch_size, [trajectory])
    seconds = time.monotonic() - began
    after = {}
    if diverged_at is None:
        after = measure(model, held_feats, held_labels)
        after["class_bias_loss"] = class_bias_losses(model, held_feats, held_labels)
        heads = scratch.parent / "heads"
        heads.mkdir(exist_ok=True)  # for analyses after the fact (scratch, never committed)
        torch.save(fusion_head(model).state_dict(), heads / f"{name}-{args.steps}.pt")
    return {
        "arm": name,
        "backbone": args.backbone,
        "recipe": args.recipe,
        "spec": ProjectorSpec.parse(arm.spec).label,
        "recipe_overrides": list(arm.recipe),
        "steps": args.steps,
        "lr": cfg.optimizer.lr,
        "batch_size": batch_size,
        "temperature": cfg.method_kwargs.get("temperature"),  # BYOL has none
        "held_out_batches": batches,
        **feature_baselines(held_feats, held_labels),
        "before": before,
        **after,
        "trajectory": trajectory.points,
        "diverged_at_step": diverged_at,
        "seconds": seconds,
    }


def reached(row: dict) -> bool:
    """The issue's target: last layer's fusion ratio >= 1.5 and above the first's, every
    layer's entropy above 0.5 nats, output cosine below 0.5."""
    if row.get("diverged_at_step") is not None:
        return False
    ratio = row["fusion_ratio"]
    return (
        ratio[-1] >= 1.5
        and ratio[-1] > ratio[0]
        and min(row["entropy"]) > HEALTHY_ENTROPY
        and row["output_cosine"] < HEALTHY_COSINE
    )


def _layers(values: list[float], digits: int = 2) -> str:
    return " ".join(f"{v:.{digits}f}" for v in values)


def table_row(r: dict) -> str:
    """``r``'s line of the report's table."""
    if r.get("diverged_at_step") is not None:
        return f"| `{r['arm']}` | diverged at step {r['diverged_at_step']} ||||||||| ✘ |"
    return (
        f"| `{r['arm']}` | {_layers(r['fusion_ratio'])} | {_layers(r['positive_mass'])} "
        f"| {_layers(r['entropy'])} | {_layers(r['logit_std'])} "
        f"| {_before(r)}→{r['fusion_ratio'][-1]:.2f} "
        f"| {r['output_cosine']:.2f} · {r['output_rank']:.0f} | {r['nn_accuracy']:.3f} "
        f"| {_class_bias(r)} | {_minutes(r)} | {'✔' if reached(r) else '✘'} |"
    )


def _class_bias_table(rows: list[dict]) -> list[str]:
    """The loss change of a class bias minus that of random groups, by bias: what the class
    adds to a push that makes any attention sparser."""
    rows = [r for r in rows if r.get("class_bias_loss")]
    if not rows:
        return []
    lines = [
        "",
        "Δ loss of the class bias minus that of the random groups' bias, by bias β (positive: "
        "the loss penalises attention to the query's class beyond any sparser attention):",
        "",
        "| arm | " + " | ".join(f"β = {b:g}" for b in CLASS_BIASES) + " |",
        "|---|" + "---|" * len(CLASS_BIASES),
    ]
    for r in rows:
        deltas = r["class_bias_loss"]
        diff = [c - g for c, g in zip(deltas["class"], deltas["random"], strict=True)]
        lines.append(f"| `{r['arm']}` | " + " | ".join(f"{d:+.3f}" for d in diff) + " |")
    return lines


def _minutes(r: dict) -> str:
    return f"{r['seconds'] / 60:.0f}" if "seconds" in r else "–"


def _before(r: dict) -> str:
    """The last layer's fusion ratio before training (none for a zoo entry's trained head)."""
    return f"{r['before']['fusion_ratio'][-1]:.2f}" if "before" in r else "–"


def _class_bias(r: dict) -> str:
    """The loss change at a class bias of 1, and at a random groups' bias of 1."""
    deltas = r.get("class_bias_loss")
    if not deltas:
        return "–"
    at = CLASS_BIASES.index(1.0)
    return f"{deltas['class'][at]:+.3f} / {deltas['random'][at]:+.3f}"


def write_report(out: Path, rows: list[dict], steps: int) -> str:
    """``<out>/report.md`` from the rows at ``steps``, under ``<out>/verdict.md`` if there."""
    verdict = out / "verdict.md"
    text = report(  # steps 0: zoo entries' own trained heads (--trained)
        [r for r in rows if r["steps"] in (steps, 0)],
        verdict.read_text() if verdict.is_file() else "",
    )
    write_text(out / "report.md", text)
    return text


def _ceiling(rows: list[dict]) -> list[str]:
    """The report's line on what the features allow (from the newest row that has it)."""
    known = [r["features_kernel_fusion"] for r in rows if "features_kernel_fusion" in r]
    if not known:
        return []
    ratios = ", ".join(f"{v:.2f} at scale {k}" for k, v in known[-1].items())
    return [
        "",
        "What the features allow: attention that is a softmax of the scaled cosine similarity "
        f"of the backbone's features themselves has fusion ratio {ratios}.",
    ]


def report(rows: list[dict], verdict: str = "") -> str:
    """One line per arm (newest row), in :data:`ARMS` order."""
    newest = {r["arm"]: r for r in rows}
    backbone = rows[0].get("backbone", FEATURES_BACKBONE) if rows else FEATURES_BACKBONE
    recipe = rows[0].get("recipe", "simclr") if rows else "simclr"
    option = "" if backbone == FEATURES_BACKBONE else f" --backbone {backbone}"
    if any(r["steps"] == 0 for r in rows):
        option = f" --trained {backbone}"
    option += "" if recipe == "simclr" else f" --recipe {recipe}"
    method = {"simclr": "SimCLR", "byol": "BYOL"}.get(recipe, recipe)
    order = [a for a in ARMS if a in newest] + [a for a in newest if a not in ARMS]
    lines = [
        f"# Regime search: does the head's attention learn? (head only, {method}, CIFAR-10)",
        "",
        *([verdict.strip(), ""] if verdict.strip() else []),
        f"Features of the zoo's `{backbone}` backbone. "
        "Held-out, class-balanced batches of 256 images (both crops: 512 tokens; a `view` head: "
        "one crop's 256). Per layer, first to last: fusion ratio (1 = no class preference), "
        "mass on the positive (own other view), row entropy (nats; uniform over the 510 keys a "
        "`positives`-masked query sees: 6.23), logit std across keys. Then the last layer's "
        "fusion ratio before → after "
        "training, the outputs' mean cosine and effective rank, the leave-one-out 1-NN "
        "accuracy of the outputs within a batch (first crop; the backbone's features give "
        f"{rows[0]['features_nn_accuracy'] if rows else float('nan'):.3f}); the change of "
        f"{method}'s loss on those batches when every layer's logits get +1 on the query's "
        "class (own views aside), and +1 on random groups of the same sizes instead "
        "(positive: the loss penalises that preference; – for a fixed mixing); and ✔ where the "
        "issue's target is met "
        "(last layer ≥ 1.5 and above the first, entropy > 0.5, cosine < 0.5). "
        f"Command: `python scripts/probe_regimes.py --data <cifar10>{option}`.",
        *_ceiling(rows),
        "",
        "| arm | fusion ratio | positive mass | entropy | logit std | last: before→after "
        "| cos · rank | 1-NN | Δ loss: class / random bias | min | target |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [table_row(newest[name]) for name in order]
    lines += _class_bias_table([newest[name] for name in order])
    lines += ["", "Arms (the head's fields, and recipe overrides):", ""]
    for name in order:
        r = newest[name]
        extra = f"; {', '.join(r['recipe_overrides'])}" if r["recipe_overrides"] else ""
        if r["steps"] == 0:
            lines.append(
                f"- `{name}`: the entry's own head ({r['spec']}), trained end to end with its "
                f"backbone (batch {r['batch_size']}{_temperature(r)})"
            )
            continue
        lines.append(
            f"- `{name}`: `{r['spec']}`{extra}; {r['steps']} steps at the recipe's lr {r['lr']:g} "
            "(the head's: x `lr_scale`) "
            f"(batch {r['batch_size']}{_temperature(r)})"
        )
    return "\n".join(lines) + "\n"


def _temperature(r: dict) -> str:
    return "" if r["temperature"] is None else f", temperature {r['temperature']:g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("SOLO_DEEPFUSION_DATA"))
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument(
        "--recipe", default="simclr", choices=RECIPES, help="whose loss and optimizer"
    )
    parser.add_argument(
        "--steps", type=int, help="default 1000; with --report-only, the newest row's"
    )
    parser.add_argument("--per-class", type=int, default=1000, help="images per class")
    parser.add_argument("--held-out-per-class", type=int, default=100)
    parser.add_argument(
        "--backbone",
        default=FEATURES_BACKBONE,
        help=f"the zoo entry whose backbone makes the features (default {FEATURES_BACKBONE})",
    )
    parser.add_argument(
        "--trained",
        metavar="ENTRY",
        help="measure this zoo entry's own end-to-end-trained head (on features of its own "
        "backbone; implies --backbone ENTRY) instead of training arms",
    )
    parser.add_argument("--batch-size", type=int, default=256, help="with --trained")
    parser.add_argument("--redo", action="store_true", help="train finished arms again")
    parser.add_argument(
        "--out", type=Path, help="default benchmarks/regimes, /<backbone> for another backbone"
    )
    parser.add_argument("--work", type=Path, default=Path("benchmarks/scratch/regimes"))
    parser.add_argument("--dry-run", action="store_true", help="2 steps of the first arm")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the report from <out>; train nothing"
    )
    args = parser.parse_args()
    if not args.data and not args.report_only:
        parser.error("--data (or SOLO_DEEPFUSION_DATA): the CIFAR-10 folder")
    if args.trained:
        args.backbone = args.trained
    if args.out is None:
        args.out = Path("benchmarks/regimes")
        if args.backbone != FEATURES_BACKBONE:
            args.out /= args.backbone
        if args.recipe != "simclr":
            args.out /= args.recipe
    if args.dry_run:
        args.arms, args.steps, args.out = args.arms[:1], 2, args.work / "dry-run"
    results = args.out / "results.jsonl"
    rows = (
        [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    )
    if args.steps is None:
        args.steps = rows[-1]["steps"] if args.report_only and rows else 1000
    if not args.report_only:
        args.work.mkdir(parents=True, exist_ok=True)
        scratch = args.work / "empty"
        scratch.mkdir(exist_ok=True)
        feats = cached_features(Path(args.data), args.work, args.per_class, args.backbone)
        labels = feature_labels(Path(args.data), args.work, args.per_class)
        if args.trained:
            row = trained_row(args.trained, feats, labels, args)
            append_jsonl(results, row)
            rows.append(row)
        done = set() if args.redo else {(r["arm"], r["steps"]) for r in rows}
        for name in [] if args.trained else args.arms:
            if (name, args.steps) in done:
                continue
            row = train_arm(name, feats, labels, args, scratch)
            append_jsonl(results, row)
            rows.append(row)
            write_report(args.out, rows, args.steps)
            print(table_row(row), flush=True)
    print(write_report(args.out, rows, args.steps))


if __name__ == "__main__":
    main()
