"""``solo-deepfusion linear`` and ``solo-deepfusion knn``: offline evaluation of a pretraining run.

Both read a run as solo-learn's Checkpointer leaves it (a folder holding ``args.json`` and a
``.ckpt``) and rebuild its model with
:func:`~solo_deepfusion.solo.model.model_from_checkpoint`, strictly: a variant's head is loaded,
never silently left random. Both run on CPU or GPU and read CIFAR kept as an ImageFolder with
CIFAR's 32 px transforms (:mod:`solo_deepfusion.solo.data`).

* ``linear``: ``main_linear``'s command line (``--config-path/--config-name`` + Hydra overrides,
  ``pretrained_feature_extractor=<checkpoint or run folder>``) and flow (solo-learn's
  ``parse_cfg``, ``LinearModel``, Checkpointer in ``<checkpoint.dir>/linear``), with the backbone
  (name, stem, weights) taken from the run. Then one validation pass gives the accuracies.
* ``knn``: ``main_knn``'s weighted k-NN (solo-learn's ``WeightedKNNClassifier``) on backbone and
  projector features, minus its CUDA-only feature extraction.

``--output-json PATH`` writes the results (atomically) besides printing them; accuracies are
fractions in [0, 1] (solo-learn logs percentages).
"""

from __future__ import annotations

import argparse
import itertools
import math
from argparse import Namespace
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import seed_everything
from omegaconf import DictConfig
from solo.args.linear import parse_cfg
from solo.methods.base import BaseMethod
from solo.methods.linear import LinearModel
from solo.utils.knn import WeightedKNNClassifier
from solo.utils.misc import make_contiguous, omegaconf_select
from timm.data.mixup import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import Metric
from tqdm.auto import tqdm

from solo_deepfusion.atomic import write_json
from solo_deepfusion.devices import resolve_device
from solo_deepfusion.errors import UsageError, exit_status
from solo_deepfusion.solo.checkpoints import PretrainedRun, find_run
from solo_deepfusion.solo.data import (
    check_data_paths,
    check_local_data,
    classification_loaders,
    eval_datasets,
    unpack_data_paths,
    unpacked,
)
from solo_deepfusion.solo.run import (
    CommandParser,
    checkpoint_callbacks,
    compose_config,
    config_parser,
    dali_module,
    make_logger,
    make_trainer,
    parse_config_args,
    prepare_hardware,
    resume_checkpoint,
)

FEATURE_TYPES = ("backbone", "projector")
DISTANCES = ("cosine", "euclidean")
# Eval batches are shuffled with this seed: ImageFolder order is class-sorted, and a batch of one
# class would leak labels into batch-dependent (transformer) projector features.
EVAL_SEED = 0

__all__ = [
    "PretrainedRun",
    "extract_features",
    "find_run",
    "knn",
    "knn_accuracy",
    "knn_parser",
    "linear",
    "linear_config",
    "run_knn",
    "run_linear",
]


def _report(results: dict[str, Any], output: Path | None) -> None:
    if output is not None:
        write_json(output, results)
        print(f"results written to {output}")


# ---------------------------------------------------------------------------------------------
# Linear evaluation


def linear_config(argv: Sequence[str]) -> tuple[DictConfig, PretrainedRun, Path | None]:
    """The parsed linear-evaluation config, the run it evaluates and ``--output-json``."""
    parser = config_parser("solo-deepfusion linear")
    parser.add_argument("--output-json", type=Path, help="also write the results here")
    args, overrides = parse_config_args(parser, argv)
    cfg = compose_config(args.config_dir, args.config_name, overrides)
    source = omegaconf_select(cfg, "pretrained_feature_extractor", None)
    if source is None:
        raise UsageError("set pretrained_feature_extractor=<checkpoint, or its run folder>")
    run = find_run(source)
    cfg.pretrained_feature_extractor = str(run.checkpoint)
    # The run decides the backbone (name, kwargs, stem); a recipe's backbone keys are replaced.
    cfg.backbone = run.cfg.backbone
    cfg.pretrain_method = run.cfg.method
    return parse_cfg(prepare_hardware(unpack_data_paths(cfg))), run, args.output_json


def _loss_and_mixup(cfg: DictConfig) -> tuple[nn.Module, Mixup | None]:
    """main_linear's choice: mixup/cutmix (soft targets), label smoothing or cross-entropy."""
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            cutmix_minmax=None,
            prob=1.0,
            switch_prob=0.5,
            mode="batch",
            label_smoothing=cfg.label_smoothing,
            num_classes=cfg.data.num_classes,
        )
        return SoftTargetCrossEntropy(), mixup
    if cfg.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=cfg.label_smoothing), None
    return nn.CrossEntropyLoss(), None


def _linear_data(cfg: DictConfig) -> tuple[dict[str, Any], DataLoader]:
    """``trainer.fit`` data arguments and the validation loader (torchvision, as main_linear)."""
    dali = cfg.data.format == "dali"
    if dali and cfg.auto_augment:
        raise UsageError("auto_augment is not available with data.format=dali")
    train_loader, val_loader = classification_loaders(
        cfg, data_format="image_folder" if dali else None, auto_augment=cfg.auto_augment
    )
    if not dali:
        return {"train_dataloaders": train_loader, "val_dataloaders": val_loader}, val_loader
    datamodule = dali_module(cfg).ClassificationDALIDataModule(
        dataset=cfg.data.dataset,
        train_data_path=cfg.data.train_path,
        val_data_path=cfg.data.val_path,
        num_workers=cfg.data.num_workers,
        batch_size=cfg.optimizer.batch_size,
        data_fraction=cfg.data.fraction,
        dali_device=cfg.dali.device,
        val_loader=val_loader,
    )
    return {"datamodule": datamodule}, val_loader


def run_linear(argv: Sequence[str]) -> dict[str, Any]:
    """Train a linear probe on the run's frozen backbone (or finetune it); return the results."""
    cfg, run, output = linear_config(argv)
    seed_everything(cfg.seed)
    loss, mixup = _loss_and_mixup(cfg)
    model = LinearModel(run.load().backbone, loss_func=loss, mixup_func=mixup, cfg=cfg)
    make_contiguous(model)
    if not cfg.performance.disable_channel_last:
        model = model.to(memory_format=torch.channels_last)
    check_data_paths(cfg)
    data, val_loader = _linear_data(cfg)

    logdir = Path(cfg.checkpoint.dir) / "linear"
    ckpt_path, wandb_run_id = resume_checkpoint(cfg, logdir)
    logger = make_logger(cfg, logdir, wandb_run_id, model, resumed=ckpt_path)
    trainer = make_trainer(cfg, logger, checkpoint_callbacks(cfg, logdir))
    trainer.fit(model, ckpt_path=ckpt_path, **data)
    metrics = trainer.validate(model, dataloaders=val_loader, verbose=False)[0]

    results = {
        "checkpoint": str(run.checkpoint),
        "method": run.cfg.method,
        "dataset": cfg.data.dataset,
        "epochs": cfg.max_epochs,
        "finetune": cfg.finetune,
        "acc1": metrics["val_acc1"] / 100,
        "acc5": metrics["val_acc5"] / 100,
        "loss": metrics["val_loss"],
    }
    if trainer.is_global_zero:
        print(f"\nlinear evaluation of {run.checkpoint} ({run.cfg.method}) on {cfg.data.dataset}")
        print(f"  val acc@1  {results['acc1']:.4f}\n  val acc@5  {results['acc5']:.4f}")
        _report(results, output)
    return results


def linear(argv: Sequence[str]) -> int:
    """``solo-deepfusion linear``; returns the exit status (2: bad command line or recipe)."""
    return exit_status(lambda: run_linear(argv))


# ---------------------------------------------------------------------------------------------
# k-NN


def _positive(kind: type) -> Callable[[str], Any]:
    """An argparse ``type``: a number of ``kind`` above 0 (the message names the value)."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


# solo-learn's weighted k-NN weighs a neighbour by exp(cosine / T) in float32: below this T,
# exp(1 / T) overflows to inf, the weights become inf/NaN and the accuracy falls to chance.
MIN_TEMPERATURE = 1 / 80


def _temperature(text: str) -> float:
    """An argparse ``type``: a finite temperature of at least :data:`MIN_TEMPERATURE`."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value >= MIN_TEMPERATURE):
        raise argparse.ArgumentTypeError(
            f"must be a finite number >= {MIN_TEMPERATURE:g} (exp(1/T) overflows float32 "
            f"below it), got {text}"
        )
    return value


def knn_parser() -> CommandParser:
    """``main_knn``'s options (its ``_`` spellings are accepted too), with defaults from the run."""
    parser = CommandParser(
        prog="solo-deepfusion knn",
        description="Weighted k-NN accuracy of a pretraining run's backbone and projector "
        "features (CPU or GPU); data paths default to the run's.",
        epilog="examples:\n"
        "  solo-deepfusion knn --checkpoint-dir trained_models/simclr_transformer/<version>\n"
        "  solo-deepfusion knn --checkpoint-dir <run> --k 20 200 --feature-type backbone \\\n"
        "      --device cpu --output-json knn.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    add = parser.add_argument
    add(
        "--checkpoint-dir",
        "--pretrained_checkpoint_dir",
        type=Path,
        required=True,
        help="a pretraining run folder (args.json + .ckpt), or its checkpoint",
    )
    add("--dataset", help="default: the run's data.dataset")
    add("--train-path", "--train_data_path", help="default: the run's data.train_path")
    add("--val-path", "--val_data_path", help="default: the run's data.val_path")
    add("--data-format", "--data_format", default="image_folder", choices=("image_folder", "h5"))
    add("--k", type=_positive(int), nargs="+", default=[20])
    add(
        "--temperature",
        type=_temperature,
        nargs="+",
        default=[0.07],
        help="cosine distance only",
    )
    add(
        "--distance-function",
        "--distance_function",
        nargs="+",
        default=["cosine"],
        choices=DISTANCES,
    )
    add(
        "--feature-type",
        "--feature_type",
        nargs="+",
        default=list(FEATURE_TYPES),
        choices=FEATURE_TYPES,
    )
    add(
        "--batch-size",
        "--batch_size",
        type=_positive(int),
        default=256,
        help="also the attention context of a transformer projector's features",
    )
    add("--num-workers", "--num_workers", type=int, default=4)
    add("--device", default="auto", choices=("auto", "cpu", "cuda"))
    add("--output-json", type=Path, help="also write the results here")
    return parser


def extract_features(
    model: BaseMethod, dataset: Dataset, batch_size: int, num_workers: int, device: torch.device
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Backbone (``feats``) and projector (``z``) features of ``dataset``, and its labels.

    Batches are shuffled with a fixed seed (see ``EVAL_SEED``).
    """
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(EVAL_SEED),
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
    )
    features: dict[str, list[torch.Tensor]] = {name: [] for name in FEATURE_TYPES}
    labels = []
    model.eval()
    with torch.no_grad():
        for x, y in tqdm(loader, desc="features", unit="batch", leave=False, disable=None):
            out = model(x.to(device, non_blocking=True))
            features["backbone"].append(out["feats"])
            features["projector"].append(out["z"])
            labels.append(y.to(device))
    return {name: torch.cat(feats) for name, feats in features.items()}, torch.cat(labels)


class WeightedKNN(WeightedKNNClassifier):
    """solo-learn's weighted k-NN classifier, built without ``compute_on_step``.

    solo-learn's ``__init__`` passes ``compute_on_step=False`` to torchmetrics, which removed
    the argument in 0.12 (solo-learn pins ``<0.12``; newer images, such as the GPU machine's,
    carry 1.x). Only ``update`` and ``compute`` are called here, so the argument (no compute in
    ``forward``) changes nothing. The other settings are solo-learn's defaults.
    """

    def __init__(self, k: int, T: float | None, distance_fx: str) -> None:
        Metric.__init__(self)
        self.k, self.T, self.distance_fx = k, T, distance_fx
        self.max_distance_matrix_size, self.epsilon = int(5e6), 1e-5
        for name in ("train_features", "train_targets", "test_features", "test_targets"):
            self.add_state(name, default=[], persistent=False)


def knn_accuracy(
    train: tuple[torch.Tensor, torch.Tensor],
    test: tuple[torch.Tensor, torch.Tensor],
    k: int,
    temperature: float | None,
    distance: str,
) -> tuple[float, float]:
    """Weighted k-NN acc@1 and acc@5 (fractions) of ``(features, labels)`` pairs."""
    classifier = WeightedKNN(k=k, T=temperature, distance_fx=distance)
    classifier.update(
        train_features=train[0], train_targets=train[1], test_features=test[0], test_targets=test[1]
    )
    acc1, acc5 = classifier.compute()
    return acc1 / 100, acc5 / 100


def _knn_settings(args: Namespace) -> Iterator[tuple[str, str, int, float | None]]:
    """``(feature, distance, k, temperature)`` combinations; the temperature is cosine's only."""
    combinations = itertools.product(args.feature_type, args.distance_function, args.k)
    for feature, distance, k in combinations:
        for temperature in args.temperature if distance == "cosine" else [None]:
            yield feature, distance, k, temperature


def run_knn(argv: Sequence[str]) -> dict[str, Any]:
    """k-NN accuracies of the run's features for every requested combination; the results."""
    args = knn_parser().parse_args(list(argv))
    run = find_run(args.checkpoint_dir)
    data = run.cfg.data
    dataset = args.dataset or data.dataset
    train_path = unpacked(args.train_path or data.train_path)
    val_path = unpacked(args.val_path or data.val_path)
    if val_path is None:
        raise UsageError("the run has no data.val_path: give --val-path")
    check_local_data(dataset, train_path, "--train-path")
    check_local_data(dataset, val_path, "--val-path")
    device = resolve_device(args.device)

    model = run.load().to(device)
    splits = eval_datasets(dataset, train_path, val_path, data_format=args.data_format)
    train, test = (
        extract_features(model, split, args.batch_size, args.num_workers, device)
        for split in splits
    )
    rows, notes = [], []
    num_train = len(train[1])
    for k in sorted({k for k in args.k if k > num_train}):
        notes.append(f"k={k} is more than the {num_train} training images: k={num_train} is used")
    for feature, distance, k, temperature in _knn_settings(args):
        used = min(k, num_train)  # what solo-learn's classifier uses; reported as such
        acc1, acc5 = knn_accuracy(
            (train[0][feature], train[1]), (test[0][feature], test[1]), used, temperature, distance
        )
        rows.append(
            {
                "feature": feature,
                "distance": distance,
                "k": used,
                "k_requested": k,
                "temperature": temperature,
                "acc1": acc1,
                "acc5": acc5,
            }
        )
    if run.transformer_head and "projector" in args.feature_type:
        notes.append(
            "projector features come from a transformer head attending across each eval batch "
            f"({args.batch_size} images, seeded shuffle): they depend on the batch size"
        )
    results = {
        "checkpoint": str(run.checkpoint),
        "method": run.cfg.method,
        "dataset": dataset,
        "train_images": len(splits[0]),
        "val_images": len(splits[1]),
        "batch_size": args.batch_size,
        "device": str(device),
        "results": rows,
        "notes": notes,
    }
    _print_knn(results)
    _report(results, args.output_json)
    return results


def _print_knn(results: dict[str, Any]) -> None:
    print(
        f"\nk-NN of {results['checkpoint']} ({results['method']}) on {results['dataset']}: "
        f"{results['train_images']} train / {results['val_images']} val images, "
        f"{results['device']}"
    )
    print(f"{'feature':<10} {'distance':<10} {'k':>5} {'T':>6} {'acc@1':>7} {'acc@5':>7}")
    for row in results["results"]:
        temperature = "-" if row["temperature"] is None else f"{row['temperature']:g}"
        print(
            f"{row['feature']:<10} {row['distance']:<10} {row['k']:>5} {temperature:>6} "
            f"{row['acc1']:>7.4f} {row['acc5']:>7.4f}"
        )
    for note in results["notes"]:
        print(f"note: {note}")


def knn(argv: Sequence[str]) -> int:
    """``solo-deepfusion knn``; returns the exit status (2: bad command line)."""
    return exit_status(lambda: run_knn(argv))
