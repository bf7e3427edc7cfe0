"""Does a Deep Fusion head train stably under solo-learn's stock CIFAR optimizers? Head-only, fast.

For each stock recipe (its method, loss, optimizer, LARS settings, batch size and peak lr) and
each head, the method's own ``training_step`` trains the head alone on cached features of a
trained ResNet-18 (the zoo's ``simclr-r18-cifar10-cpu``), two augmented crops per image, at the
recipe's peak lr (no warm-up, no decay) for ``--steps`` steps. Then the head's collapse
diagnostics are measured on a held-out batch of those features: per-layer attention entropy,
attention logit spread, the mean cosine between different samples' outputs and the effective
rank of those outputs (centred: a direction every output shares does not count). The stock
``mlp`` head is the reference for both: some methods (BYOL) leave a shared direction in any
head's outputs, and some losses (VICReg, Barlow Twins) cannot see one.

    python scripts/bench_stability.py --data <cifar10 folder>          # the table in minutes
    python scripts/bench_stability.py --data <cifar10 folder> --dry-run  # 2 steps, 1 recipe
    python scripts/bench_stability.py --report-only                      # the table, again

Rows go to ``<out>/results.jsonl`` as they finish (a rerun skips finished rows; ``--redo``
trains them again, and the newest row of a recipe and arm is the one reported) and the table
to ``<out>/report.md``, under ``<out>/verdict.md`` when there is one. A head is ``healthy``
when every layer's entropy is above 0.5 nats and the output cosine below 0.5.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import lightning.pytorch as pl
import solo
import torch
import torchvision.transforms.v2 as T
from torch import nn
from torchvision.datasets import ImageFolder

from solo_deepfusion.atomic import write_text
from solo_deepfusion.datasets import prepare_data
from solo_deepfusion.heads.diagnostics import collapse_stats, output_cosine, output_rank
from solo_deepfusion.heads.transformer import NonFiniteOutputError
from solo_deepfusion.hub import load_backbone
from solo_deepfusion.jsonl import append_jsonl
from solo_deepfusion.solo.bench.grid import ProjectorSpec
from solo_deepfusion.solo.launch import pretrain_config
from solo_deepfusion.solo.measure import evaluating, fusion_head, head_tail
from solo_deepfusion.solo.model import build_model

RECIPES = ("simclr", "byol", "mocov3", "barlow", "vicreg", "swav")
ARMS = (  # spelled out in full: `transformer` alone is whatever the default preset is now
    "mlp",  # the recipe's own head: the reference output cosine
    "transformer:lr_scale=1,preset=paper",  # the head as first shipped: post-norm
    "transformer:lr_scale=1,norm=pre,preset=paper",
    "transformer:input_norm=true,lr_scale=1,preset=paper",
    "transformer:lr_scale=1,norm=pre,preset=paper,qk_norm=true",
    "transformer:lr_scale=0.1,norm=pre,preset=paper",
    # = `stable` at lr_scale 0.1: the default in 0.2.0, and under VICReg in 0.3.0
    "transformer:lr_scale=0.1,mask=positives,norm=pre,preset=paper",
    "transformer:input_norm=batch,lr_scale=1,norm=pre,preset=paper",
    "transformer:lr_scale=1,norm=pre,output_norm=batch,preset=paper",
    # = `stable_bn` at lr_scale 0.1: the default since 0.3.0 (but under VICReg)
    "transformer:lr_scale=0.1,mask=positives,norm=pre,output_norm=batch,preset=paper",
    "transformer:lr_scale=0.01,mask=positives,norm=pre,preset=paper",  # VICReg, lower head lr
    # VICReg: the shared direction removed where it arises, in the input and in the attention
    "transformer:centred_attention=true,lr_scale=0.1,mask=positives,norm=pre,preset=paper",
    # = `stable_centred` at lr_scale 0.1: the default under VICReg since 0.4.0
    "transformer:centred_attention=true,input_norm=batch,lr_scale=0.1,mask=positives,norm=pre,preset=paper",
    # The regime search's head, `cosine_tied` (benchmarks/regimes): cosine attention, q = k
    "transformer:attention_logits=cosine,lr_scale=0.1,mask=positives,norm=pre,output_norm=batch,preset=paper,qk_init=tied",
    # ... and on `stable_centred`, for VICReg
    "transformer:attention_logits=cosine,centred_attention=true,input_norm=batch,lr_scale=0.1,mask=positives,norm=pre,preset=paper,qk_init=tied",
)
FEATURES_BACKBONE = "simclr-r18-cifar10-cpu"
HEALTHY_ENTROPY, HEALTHY_COSINE = 0.5, 0.5


def crops() -> T.Compose:
    """SimCLR-style crops of 32 px CIFAR images (what solo-learn's recipes feed the backbone)."""
    return T.Compose(
        [
            T.ToImage(),
            T.RandomResizedCrop(32, scale=(0.08, 1.0), antialias=True),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
            T.RandomGrayscale(p=0.2),
            T.ToDtype(torch.float32, scale=True),
            T.Normalize((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
        ]
    )


@torch.no_grad()
def cached_features(
    data: Path, work: Path, per_class: int, backbone: str = FEATURES_BACKBONE
) -> torch.Tensor:
    """``(2, N, 512)``: two crops of the first ``per_class`` training images of each class,
    through the zoo entry ``backbone``'s backbone."""
    path = work / f"features-{backbone}-{per_class}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    folder = prepare_data(data, work, train_per_class=per_class, val_per_class=1).train
    torch.manual_seed(0)
    images = ImageFolder(str(folder), transform=crops())
    model = load_backbone(backbone, progress=False)
    loader = torch.utils.data.DataLoader(images, batch_size=256)
    views = [torch.cat([model(x) for x, _ in loader]) for _ in range(2)]
    feats = torch.stack(views)
    tmp = path.with_suffix(".tmp")
    torch.save(feats, tmp)
    tmp.replace(path)
    return feats


class FeatureCrops(torch.utils.data.Dataset):
    """solo-learn's ``[index, [crop1, crop2], label]`` samples, with features for crops."""

    def __init__(self, feats: torch.Tensor) -> None:
        self.feats = feats

    def __len__(self) -> int:
        return self.feats.shape[1]

    def __getitem__(self, i: int):
        return i, [self.feats[0, i], self.feats[1, i]], 0


def recipe_config(recipe: str, arm: str, scratch: Path, extra: Sequence[str] = ()):
    """The stock recipe's cfg for ``arm``, on CPU, lr held at its peak; ``extra``: more
    overrides (``method_kwargs.temperature=0.02``)."""
    folder = Path(solo.__file__).resolve().parents[1] / "scripts" / "pretrain" / "cifar"
    spec = ProjectorSpec.parse(arm)
    argv = [
        "--config-path", str(folder), "--config-name", f"{recipe}.yaml", *spec.overrides(),
        *extra,
        "accelerator=cpu", "devices=1", "strategy=auto", "precision=32",
        f"data.train_path={scratch}", f"data.val_path={scratch}", "data.format=image_folder",
        "scheduler.name=none", "++performance.disable_channel_last=true",
        "++checkpoint.enabled=false", "++auto_resume.enabled=false", "++wandb.enabled=false",
    ]  # fmt: skip
    if spec.name != "mlp":  # the monitor would measure the same thing every 50 steps
        argv.append("projector.collapse_monitor_every=0")
    return pretrain_config(argv)


def head_model(recipe: str, arm: str, scratch: Path, extra: Sequence[str] = ()):
    """The recipe's cfg and its model with ``arm``, seeded, taking features for images."""
    cfg = recipe_config(recipe, arm, scratch, extra)
    torch.manual_seed(0)
    model = build_model(cfg)
    for name in ("backbone", "momentum_backbone"):  # features in, features out
        if hasattr(model, name):
            setattr(model, name, nn.Identity())
    return cfg, model


def head_stats(model: nn.Module, arm: str, tokens: torch.Tensor) -> dict:
    """Per-layer attention entropy and logit spread (none for ``mlp``); the cosine of the
    outputs the loss sees (after the head's ``output_norm`` and the method's tail, MoCo v3's
    last BatchNorm); and, for a transformer, that of ``out_proj``'s output before either: a
    BatchNorm can spread outputs that had collapsed to one vector plus tiny noise."""
    with evaluating(model):
        if ProjectorSpec.parse(arm).name == "mlp":
            out = model.projector(tokens)
            return {
                "entropy": [],
                "logit_std": [],
                "output_cosine": output_cosine(out, num_views=2),
                "output_rank": output_rank(out),
            }
        head = fusion_head(model)
        raw = []
        hook = head.out_proj.register_forward_hook(lambda *args: raw.append(args[-1]))
        try:
            stats = collapse_stats(head, tokens, num_views=2, tail=head_tail(model))
        finally:
            hook.remove()
    return {
        "entropy": list(stats.entropy),
        "logit_std": list(stats.logit_std),
        "output_cosine": stats.output_cosine,
        "output_rank": stats.output_rank,
        "head_output_cosine": output_cosine(raw[0], num_views=2),
    }


def held_out_tokens(feats: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Both crops of the last ``batch_size`` images: one batch the head never trains on."""
    return torch.cat([feats[0, -batch_size:], feats[1, -batch_size:]])


def fit_head(
    model: pl.LightningModule,
    feats: torch.Tensor,
    steps: int,
    batch_size: int,
    callbacks: Sequence[pl.Callback] = (),
) -> int | None:
    """Train ``model`` (a :func:`head_model`) ``steps`` steps on random batches of ``feats``
    ``(2, N, F)``; the step at which the head's output stopped being finite, else ``None``."""
    train = FeatureCrops(feats)
    sampler = torch.utils.data.RandomSampler(train, num_samples=steps * batch_size)
    loader = torch.utils.data.DataLoader(
        train, batch_size=batch_size, sampler=sampler, drop_last=True
    )
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=list(callbacks),
    )
    try:
        trainer.fit(model, loader)
    except NonFiniteOutputError:  # the head checks its own output: training diverged
        return trainer.global_step
    return None


def train_head(recipe: str, arm: str, feats: torch.Tensor, steps: int, scratch: Path) -> dict:
    """Fit the head alone with the recipe's method and optimizer; its diagnostics after."""
    cfg, model = head_model(recipe, arm, scratch)
    batch_size = cfg.optimizer.batch_size
    mlp = ProjectorSpec.parse(arm).name == "mlp"  # its BatchNorm has no statistics before
    init_cosine = (
        None if mlp else head_stats(model, arm, held_out_tokens(feats, batch_size))["output_cosine"]
    )
    began = time.monotonic()
    diverged_at = fit_head(model, feats[:, :-batch_size], steps, batch_size)
    seconds = time.monotonic() - began
    stats, healthy = {"entropy": [], "logit_std": [], "output_cosine": None}, False
    if diverged_at is None:
        stats = head_stats(model, arm, held_out_tokens(feats, batch_size))
        healthy = (
            min(stats["entropy"], default=math.inf) > HEALTHY_ENTROPY
            and stats["output_cosine"] < HEALTHY_COSINE
        )
    return {
        "recipe": recipe,
        "arm": ProjectorSpec.parse(arm).label,
        "steps": steps,
        "optimizer": cfg.optimizer.name,
        "lr": cfg.optimizer.lr,
        "batch_size": batch_size,
        **stats,
        "init_cosine": init_cosine,
        "healthy": healthy,
        "diverged_at_step": diverged_at,
        "seconds": seconds,
    }


def cell(row: dict) -> str:
    """``min entropy / cosine before→after · rank ✔`` (the ``mlp`` reference: ``– / cosine
    after · rank``; a head whose output stopped being finite: the step it did). Rows from
    before the rank was measured have none."""
    if row.get("diverged_at_step") is not None:
        return f"diverged (non-finite output) at step {row['diverged_at_step']} ✘"
    rank = "" if row.get("output_rank") is None else f" · {row['output_rank']:.0f}"
    if not row["entropy"]:
        return f"– / {row['output_cosine']:.2f}{rank}"
    verdict = "✔" if row["healthy"] else "✘"
    cosine = f"{row['init_cosine']:.2f}→{row['output_cosine']:.2f}"
    return f"{min(row['entropy']):.2f} / {cosine}{rank} {verdict}"


def report(rows: list[dict], recipes: list[str], verdict: str = "") -> str:
    """One line per arm (:data:`ARMS` first, then any other arm with rows), one column per
    recipe with rows; the per-layer entropies under it."""
    found = {(r["recipe"], r["arm"]): r for r in rows}
    measured = {arm for _, arm in found}
    ordered = dict.fromkeys(
        [*(ProjectorSpec.parse(a).label for a in ARMS), *(r["arm"] for r in rows)]
    )
    labels = [a for a in ordered if a in measured]
    recipes = [r for r in recipes if any(recipe == r for recipe, _ in found)]
    optimizers = {r["recipe"]: f"{r['optimizer']} {r['lr']:g}" for r in rows}
    lines = [
        "# Head stability under solo-learn's CIFAR optimizers (head only, peak lr)",
        "",
        *([verdict.strip(), ""] if verdict.strip() else []),
        "Cell: min layer entropy (nats) after the run / output cosine (of what the loss sees: "
        "after `output_norm` and the method's tail) before→after it · effective rank of those "
        "outputs, centred (where measured); ✔ = every "
        f"layer above {HEALTHY_ENTROPY} nats and cosine below {HEALTHY_COSINE} after the run; "
        "`mlp` (no attention) gives the reference cosine and rank. Column heads: the recipe, "
        "its optimizer and peak lr. Command: `python scripts/bench_stability.py --data <cifar10>`.",
        "",
        "| arm | " + " | ".join(f"{r} ({optimizers[r]})" for r in recipes) + " |",
        "|---|" + "---|" * len(recipes),
    ]
    for label in labels:
        cells = ["–" if (r, label) not in found else cell(found[r, label]) for r in recipes]
        lines.append(f"| `{label}` | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per-layer entropies (nats); the cosine of `out_proj`'s output, before "
        "`output_norm` and the method's tail, where recorded:",
        "",
    ]
    for r in found.values():
        if not r["entropy"]:
            continue
        entropies = ", ".join(f"{h:.2f}" for h in r["entropy"])
        raw = r.get("head_output_cosine")
        before = "" if raw is None else f", `out_proj` output cosine {raw:.3f}"
        lines.append(f"- {r['recipe']} `{r['arm']}`: [{entropies}]{before}, {r['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def run_missing(args: argparse.Namespace, rows: list[dict], results: Path) -> None:
    """Train every (recipe, arm) of ``args`` that ``rows`` lacks; append each row as it ends."""
    args.work.mkdir(parents=True, exist_ok=True)
    scratch = args.work / "empty"
    scratch.mkdir(exist_ok=True)
    feats = cached_features(Path(args.data), args.work, args.per_class)
    done = set() if args.redo else {(r["recipe"], r["arm"], r["steps"]) for r in rows}
    for recipe in args.recipes:
        for arm in args.arms:
            if (recipe, ProjectorSpec.parse(arm).label, args.steps) in done:
                continue
            row = train_head(recipe, arm, feats, args.steps, scratch)
            append_jsonl(results, row)
            rows.append(row)
            print(f"{recipe} {row['arm']}: {cell(row)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.environ.get("SOLO_DEEPFUSION_DATA"))
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--redo", action="store_true", help="train finished rows again")
    parser.add_argument("--per-class", type=int, default=300, help="images per class")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/stability"))
    parser.add_argument("--work", type=Path, default=Path("benchmarks/scratch/stability"))
    parser.add_argument("--dry-run", action="store_true", help="2 steps of the first recipe")
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the report from <out>; train nothing"
    )
    parser.add_argument(
        "--verdict",
        type=Path,
        help="markdown put under the report's title (default: <out>/verdict.md, if there)",
    )
    args = parser.parse_args()
    if not args.data and not args.report_only:
        parser.error("--data (or SOLO_DEEPFUSION_DATA): the CIFAR-10 folder")
    if args.dry_run:
        args.recipes, args.steps, args.out = args.recipes[:1], 2, args.work / "dry-run"
    results = args.out / "results.jsonl"
    rows = (
        [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    )
    if not args.report_only:
        run_missing(args, rows, results)
    rows = [r for r in rows if r["steps"] == args.steps]
    verdict = args.verdict or args.out / "verdict.md"
    text = report(rows, args.recipes, verdict.read_text() if verdict.is_file() else "")
    write_text(args.out / "report.md", text)
    print(text)


if __name__ == "__main__":
    main()
