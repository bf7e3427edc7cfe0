"""Data for the launchers: solo-learn's loaders, plus CIFAR kept as an ImageFolder.

solo-learn reads ``data.dataset=cifar10|cifar100`` from torchvision's pickles whatever
``data.format`` says, and with ``data.dataset=custom`` it validates on 224 px ImageNet crops: a
model trained on 32 px CIFAR crops is then evaluated at chance. Here a CIFAR dataset whose path is
a folder of class sub-folders is read with ``ImageFolder`` and CIFAR's own 32 px transforms, for
pretraining and evaluation alike; every other dataset goes through solo-learn unchanged.

The trick is one function, :func:`builder_dataset`: solo-learn's dataset builders get ``custom``
(their ``ImageFolder`` branch) while the transforms are still chosen with the real dataset name.

A split shipped as an archive (``<path>.tar.gz`` next to where ``<path>`` would be, as in the
project's CIFAR-10 copy) is unpacked once into the cache by
:func:`solo_deepfusion.datasets.unpacked`.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig
from solo.data.classification_dataloader import prepare_data, prepare_dataloaders
from solo.data.classification_dataloader import prepare_datasets as classification_datasets
from solo.data.classification_dataloader import prepare_transforms as classification_transforms
from solo.data.pretrain_dataloader import (
    FullTransformPipeline,
    NCropAugmentation,
    build_transform_pipeline,
    prepare_dataloader,
)
from solo.data.pretrain_dataloader import prepare_datasets as pretrain_datasets
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import CIFAR10, CIFAR100, STL10, DatasetFolder
from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

from solo_deepfusion.datasets import unpacked
from solo_deepfusion.errors import UsageError

CIFAR = ("cifar10", "cifar100")
# What torchvision's CIFAR root holds: never mistaken for a class folder.
_TORCHVISION_CIFAR_DIRS = {CIFAR10.base_folder, CIFAR100.base_folder}
# Datasets solo-learn reads through torchvision with download=True, and the folder it unpacks.
TORCHVISION_LAYOUT = {
    "cifar10": CIFAR10.base_folder,
    "cifar100": CIFAR100.base_folder,
    "stl10": STL10.base_folder,
}

__all__ = [
    "CIFAR",
    "BadImageError",
    "MissingDataError",
    "builder_dataset",
    "check_local_data",
    "classification_loaders",
    "eval_datasets",
    "is_cifar_folder",
    "is_image_folder",
    "pretrain_loader",
    "pretrain_transform",
    "pretrain_val_loader",
    "unpack_data_paths",
    "unpacked",
]


class MissingDataError(UsageError):
    """A data path that holds no data (and would make torchvision download some)."""


def check_local_data(dataset: str, path: str | os.PathLike | None, field: str) -> None:
    """Refuse a path where solo-learn would make torchvision download ``dataset``.

    For CIFAR and STL-10 solo-learn calls torchvision with ``download=True``: a typo in the path
    would silently fetch (and train on) other data. A folder of class sub-folders, or
    torchvision's own layout already there, is fine; anything else is a ``ValueError`` naming
    ``field`` (a :class:`MissingDataError`), unless the user opted in with
    ``data.download=true``.
    """
    if dataset not in TORCHVISION_LAYOUT or path is None or is_image_folder(path):
        return
    if (Path(path) / TORCHVISION_LAYOUT[dataset]).is_dir():
        return
    why = "does not exist" if not Path(path).exists() else "holds no class sub-folders"
    raise MissingDataError(
        f"{field}={path} {why}: no {dataset} there (class folders or torchvision's "
        f"{TORCHVISION_LAYOUT[dataset]}/); to let torchvision download it, add ++data.download=true"
    )


def unpack_data_paths(cfg: DictConfig) -> DictConfig:
    """Apply :func:`unpacked` to ``data.train_path`` and ``data.val_path``."""
    for key in ("train_path", "val_path"):
        if key in cfg.data:
            cfg.data[key] = unpacked(cfg.data[key])
    return cfg


def check_data_paths(cfg: DictConfig) -> None:
    """:func:`check_local_data` of ``data.train_path`` and ``data.val_path``, before any loader
    is built (skipped with ``data.download=true``)."""
    if cfg.data.get("download", False):
        return
    for key in ("train_path", "val_path"):
        if key in cfg.data:
            check_local_data(cfg.data.dataset, cfg.data[key], f"data.{key}")
            if cfg.data.get("format") == "image_folder" and is_image_folder(cfg.data[key]):
                check_class_folders(cfg.data[key], f"data.{key}")


def _holds_an_image(folder: str) -> bool:
    """Whether ``folder`` (or a folder below it) holds a file ``ImageFolder`` would read."""
    for _, _, files in os.walk(folder, followlinks=True):
        if any(name.lower().endswith(IMG_EXTENSIONS) for name in files):
            return True
    return False


def check_class_folders(path: str | os.PathLike, field: str) -> None:
    """Refuse an image folder with a class folder that holds no image: ``ImageFolder`` would stop
    with a traceback (names only are listed, no image is read)."""
    classes = sorted(entry.path for entry in os.scandir(path) if entry.is_dir())
    empty = [Path(c).name for c in classes if not _holds_an_image(c)]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise UsageError(
            f"{field}={path}: class folder(s) {shown} hold no image "
            f"({', '.join(IMG_EXTENSIONS)}); remove them or add images"
        )


class BadImageError(UsageError):
    """A file of an image folder that PIL cannot read (empty, truncated, not an image)."""


def checked_image_loader(path: str):
    """``ImageFolder``'s loader, with a :class:`BadImageError` naming the file it cannot read."""
    try:
        return default_loader(path)
    except (OSError, ValueError, SyntaxError) as err:  # PIL's UnidentifiedImageError: OSError
        raise BadImageError(f"{path} is not a readable image ({err})") from None


def guard_images(dataset: Dataset) -> Dataset:
    """Give an image folder dataset :func:`checked_image_loader`; others are left as they are."""
    if isinstance(dataset, DatasetFolder):
        dataset.loader = checked_image_loader
    return dataset


def is_image_folder(path: str | os.PathLike | None) -> bool:
    """Whether ``path`` is a directory of class sub-folders (and not torchvision's CIFAR root)."""
    if path is None or not Path(path).is_dir():
        return False
    subdirs = {entry.name for entry in os.scandir(path) if entry.is_dir()}
    return bool(subdirs) and not subdirs & _TORCHVISION_CIFAR_DIRS


def is_cifar_folder(dataset: str, path: str | os.PathLike | None) -> bool:
    """CIFAR-10/100 kept as an ImageFolder (read here with CIFAR's 32 px transforms)."""
    return dataset in CIFAR and is_image_folder(path)


def builder_dataset(dataset: str, path: str | os.PathLike | None) -> str:
    """The dataset name to hand solo-learn's dataset builders for data at ``path``.

    ``custom`` makes them build an ``ImageFolder``; transforms are picked with ``dataset``.
    """
    return "custom" if is_cifar_folder(dataset, path) else dataset


def pretrain_transform(cfg: DictConfig) -> FullTransformPipeline:
    """The recipe's multi-crop augmentations (``cfg.augmentations``), as ``main_pretrain``."""
    return FullTransformPipeline(
        [
            NCropAugmentation(build_transform_pipeline(cfg.data.dataset, aug), aug.num_crops)
            for aug in cfg.augmentations
        ]
    )


def pretrain_loader(cfg: DictConfig) -> DataLoader:
    """The torchvision pretraining loader: batches of ``[index, [crops...], label]``."""
    dataset = pretrain_datasets(
        builder_dataset(cfg.data.dataset, cfg.data.train_path),
        pretrain_transform(cfg),
        train_data_path=cfg.data.train_path,
        data_format=cfg.data.format,
        no_labels=cfg.data.no_labels,
        data_fraction=cfg.data.fraction,
    )
    return prepare_dataloader(
        guard_images(dataset), batch_size=cfg.optimizer.batch_size, num_workers=cfg.data.num_workers
    )


def classification_loaders(
    cfg: DictConfig, data_format: str | None = None, auto_augment: bool = False
) -> tuple[DataLoader, DataLoader]:
    """Labelled train (shuffled, augmented) and validation loaders, as ``main_linear`` builds.

    ``data_format`` defaults to ``cfg.data.format``; ``auto_augment`` is timm's 224 px
    RandAugment, which solo-learn offers for ImageNet-sized data only.
    """
    data_format = data_format or cfg.data.format
    common = {"batch_size": cfg.optimizer.batch_size, "num_workers": cfg.data.num_workers}
    if not is_cifar_folder(cfg.data.dataset, cfg.data.train_path):
        loaders = prepare_data(
            cfg.data.dataset,
            train_data_path=cfg.data.train_path,
            val_data_path=cfg.data.val_path,
            data_format=data_format,
            data_fraction=cfg.data.fraction,
            auto_augment=auto_augment,
            **common,
        )
        for loader in loaders:
            guard_images(loader.dataset)
        return loaders
    if auto_augment:
        raise ValueError("auto_augment is a 224 px pipeline; it does not apply to 32 px CIFAR")
    train_transform, val_transform = classification_transforms(cfg.data.dataset)
    train, val = classification_datasets(
        "custom",
        train_transform,
        val_transform,
        train_data_path=cfg.data.train_path,
        val_data_path=cfg.data.val_path,
        data_format=data_format,
        data_fraction=cfg.data.fraction,
    )
    return prepare_dataloaders(guard_images(train), guard_images(val), **common)


def pretrain_val_loader(cfg: DictConfig) -> DataLoader | None:
    """The online-evaluation loader of a pretraining run, or ``None`` (as ``main_pretrain``)."""
    if cfg.data.val_path is None and (
        cfg.data.dataset in ("custom", "imagenet", "imagenet100")
        or is_cifar_folder(cfg.data.dataset, cfg.data.train_path)
    ):
        return None
    if cfg.data.dataset == "custom" and cfg.data.no_labels:
        return None
    # solo-learn validates DALI runs with the torchvision loader, as does this.
    data_format = "image_folder" if cfg.data.format == "dali" else cfg.data.format
    return classification_loaders(cfg, data_format=data_format)[1]


def eval_datasets(
    dataset: str,
    train_path: str | os.PathLike | None,
    val_path: str | os.PathLike | None,
    data_format: str = "image_folder",
) -> tuple[Dataset, Dataset]:
    """Train and validation sets, both with the validation transform (feature extraction)."""
    _, val_transform = classification_transforms(dataset)
    train, val = classification_datasets(
        builder_dataset(dataset, train_path),
        val_transform,
        val_transform,
        train_data_path=train_path,
        val_data_path=val_path,
        data_format=data_format,
    )
    return guard_images(train), guard_images(val)
