"""The zoo on the solo-learn side: export a run's weights, load an entry, hand it to solo-learn.

>>> files = export_checkpoint("trained_models/simclr_transformer/abcd1234/x-ep=4.ckpt",
...                           "trained_models/simclr_transformer/abcd1234/args.json",
...                           "zoo/files/my-entry", name="my-entry")
>>> model = load_model("simclr-deepfusion-r18-cifar10-cpu")          # the whole BaseMethod
>>> folder = export_solo("simclr-deepfusion-r18-cifar10-cpu", "solo_ckpts")
>>> # python main_knn.py --pretrained_checkpoint_dir solo_ckpts/simclr_transformer ...

Zoo files of an entry called ``<name>``: ``<name>.backbone.safetensors`` (the backbone's state
dict, keys without ``backbone.``), ``<name>.full.safetensors`` (the whole model's state dict) and
``<name>.args.json`` (the training cfg, which rebuilds the model with
:func:`~solo_deepfusion.solo.model.build_model`). Weights are safetensors, never pickle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning
import torch
from omegaconf import DictConfig, OmegaConf
from solo.methods.base import BaseMethod
from solo.utils.misc import omegaconf_select

from solo_deepfusion.atomic import atomic_path, write_json
from solo_deepfusion.hub.download import download
from solo_deepfusion.hub.manifest import PathLike, ZooEntry, get_entry
from solo_deepfusion.hub.weights import load_state_dict, save_state_dict, upcast
from solo_deepfusion.provenance import git_commit
from solo_deepfusion.solo import variant_name
from solo_deepfusion.solo.checkpoints import PretrainedRun, read_args
from solo_deepfusion.solo.data import CIFAR
from solo_deepfusion.solo.measure import head_module
from solo_deepfusion.solo.model import model_from_checkpoint

BACKBONE_PREFIX = "backbone."

__all__ = [
    "export_checkpoint",
    "export_solo",
    "load_model",
    "param_counts",
    "solo_args",
    "zoo_filenames",
]


def zoo_filenames(name: str) -> dict[str, str]:
    """``{role: filename}`` of the zoo files of entry ``name``."""
    return {
        "backbone": f"{name}.backbone.safetensors",
        "full": f"{name}.full.safetensors",
        "args": f"{name}.args.json",
    }


def param_counts(model: BaseMethod) -> dict[str, int]:
    """Parameters of the backbone and of the projection head."""
    return {
        "backbone": sum(p.numel() for p in model.backbone.parameters()),
        "head": sum(p.numel() for p in head_module(model).parameters()),
    }


def export_checkpoint(
    ckpt_path: PathLike,
    args_json: PathLike,
    out_dir: PathLike,
    *,
    name: str,
    half: bool = True,
) -> list[Path]:
    """Turn a Checkpointer run (``.ckpt`` + ``args.json``) into the zoo files of entry ``name``.

    The model is rebuilt from ``args.json`` and the checkpoint loaded strictly, so the files
    always rebuild the same model. ``half`` stores floating tensors as float16 (loaders upcast).
    The safetensors headers record ``name``, ``role``, ``method``, ``projector``, ``backbone``,
    ``stem``, ``params`` and ``code_commit`` (when this package is a git checkout). Each file is
    written atomically; returns the backbone, full and args paths.

    The ``.ckpt`` is read with ``weights_only=True`` (see
    :func:`~solo_deepfusion.solo.model.model_from_checkpoint`): one that holds code is refused.
    """
    cfg = read_args(Path(args_json))
    model = model_from_checkpoint(ckpt_path, cfg, strict=True)
    state = model.state_dict()
    backbone = {
        k.removeprefix(BACKBONE_PREFIX): v
        for k, v in state.items()
        if k.startswith(BACKBONE_PREFIX)
    }
    metadata = {
        "name": name,
        "method": cfg.method,
        "projector": omegaconf_select(cfg, "projector.name", "mlp"),
        "backbone": cfg.backbone.name,
        "stem": omegaconf_select(cfg, "backbone.stem", "auto"),
        "params": param_counts(model),
    }
    commit = git_commit()
    if commit:
        metadata["code_commit"] = commit
    out, files = Path(out_dir), zoo_filenames(name)
    return [
        save_state_dict(
            backbone, out / files["backbone"], {**metadata, "role": "backbone"}, half=half
        ),
        save_state_dict(state, out / files["full"], {**metadata, "role": "full"}, half=half),
        write_json(out / files["args"], OmegaConf.to_container(cfg, resolve=True)),
    ]


# ----------------------------------------------------------------------------- loading


def _entry(name: str | ZooEntry, manifest: PathLike | None) -> ZooEntry:
    return name if isinstance(name, ZooEntry) else get_entry(name, manifest)


def _cfg(entry: ZooEntry, **download_kwargs: Any) -> DictConfig:
    return read_args(download(entry, role="args", **download_kwargs))


def zoo_run_files(name: str | ZooEntry, **download_kwargs: Any) -> tuple[Path, Path]:
    """``(full weights, args.json)`` of an entry, verified in the cache (downloaded if needed)."""
    entry = _entry(name, None)
    return (
        download(entry, role="full", **download_kwargs),
        download(entry, role="args", **download_kwargs),
    )


def load_model(
    name: str | ZooEntry,
    *,
    cache_dir: PathLike | None = None,
    offline: bool | None = None,
    manifest: PathLike | None = None,
    progress: bool = True,
) -> BaseMethod:
    """The entry's whole model (backbone, head, online classifier), loaded strictly, eval mode."""
    kwargs = {"cache_dir": cache_dir, "offline": offline, "progress": progress}
    weights, args = zoo_run_files(_entry(name, manifest), **kwargs)
    return PretrainedRun(weights, read_args(args)).load()


# ----------------------------------------------------------------------------- solo-learn export


def solo_args(cfg: DictConfig) -> dict[str, Any]:
    """``cfg`` as solo-learn's ``METHODS[method](cfg)`` must see it to rebuild the trained stem.

    solo-learn gives a ResNet the CIFAR stem exactly when ``data.dataset`` is cifar10/100; when
    the run chose the other stem (``backbone.stem``), ``data.dataset`` is set to one that makes
    solo-learn build it (``custom`` / ``cifar10``). main_knn takes its data from its own
    ``--dataset``, so only the model construction sees this.
    """
    args = OmegaConf.to_container(cfg, resolve=True)
    stem = omegaconf_select(cfg, "backbone.stem", "auto")
    if stem != "auto" and cfg.backbone.name.startswith("resnet"):
        cifar = cfg.data.dataset in CIFAR
        if stem == "imagenet" and cifar:
            args["data"]["dataset"] = "custom"
        elif stem == "cifar" and not cifar:
            args["data"]["dataset"] = "cifar10"
    return args


def check_method(entry: ZooEntry, cfg: DictConfig) -> None:
    """A ``ValueError`` unless the entry's ``args.json`` trains the method the manifest says
    (``method`` with its ``projector``): the export is named and rebuilt from it."""
    projector = entry.projector.get("name", "mlp") if entry.projector else "mlp"
    try:
        expected = variant_name(entry.method, projector)
    except ValueError:
        expected = entry.method
    if cfg.method not in (expected, entry.method):
        raise ValueError(
            f"{entry.name}: its args.json trains method={cfg.method}, the manifest says "
            f"{expected} (method={entry.method}, projector={projector}); not exported"
        )


def check_loads(entry: ZooEntry, cfg: DictConfig, state: dict[str, torch.Tensor]) -> None:
    """A ``ValueError`` unless ``state`` loads strictly into the model solo-learn builds from
    the exported ``args.json`` (what ``main_knn.py`` will do), names and shapes alike."""
    from solo_deepfusion.solo.model import build_model

    model_cfg = OmegaConf.create(solo_args(cfg))
    OmegaConf.set_struct(model_cfg, False)
    try:
        build_model(model_cfg).load_state_dict(state, strict=True)
    except RuntimeError as err:  # torch lists missing/unexpected keys and shape mismatches
        reason = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise ValueError(
            f"{entry.name}: its full weights do not load into the {cfg.method} model its "
            f"args.json describes ({reason[:300]}); not exported"
        ) from err


def export_solo(
    name: str | ZooEntry,
    out_dir: PathLike,
    *,
    cache_dir: PathLike | None = None,
    offline: bool | None = None,
    manifest: PathLike | None = None,
    progress: bool = True,
) -> Path:
    """Write ``<out_dir>/<method>/{<name>.ckpt, args.json}`` for solo-learn's own scripts.

    The ``.ckpt`` holds only ``{"state_dict": {key: float32 tensor}, "pytorch-lightning_version":
    str}`` (loadable with ``torch.load(..., weights_only=True)``): ``main_linear.py`` reads its
    ``backbone.*`` keys, ``main_knn.py`` calls ``METHODS[args["method"]].load_from_checkpoint``
    (a ``<method>_transformer`` needs ``import solo_deepfusion.solo`` first). Returns the folder
    (``--pretrained_checkpoint_dir`` of main_knn). Refuses a folder holding another ``.ckpt``,
    since main_knn takes the first one it lists, an ``args.json`` of another method than the
    entry's (:func:`check_method`), and weights that do not strictly load into the model it
    describes (:func:`check_loads`); nothing is written before these checks pass.
    """
    entry = _entry(name, manifest)
    kwargs = {"cache_dir": cache_dir, "offline": offline, "progress": progress}
    cfg = _cfg(entry, **kwargs)
    check_method(entry, cfg)
    folder = Path(out_dir) / cfg.method
    ckpt = folder / f"{entry.name}.ckpt"
    others = sorted(p.name for p in folder.glob("*.ckpt") if p != ckpt)
    if others:
        raise FileExistsError(f"{folder} already holds {others}; export to another folder")
    state = upcast(load_state_dict(download(entry, role="full", **kwargs)))
    check_loads(entry, cfg, state)
    checkpoint = {"state_dict": state, "pytorch-lightning_version": lightning.__version__}
    with atomic_path(ckpt) as tmp:
        torch.save(checkpoint, tmp)
    write_json(folder / "args.json", solo_args(cfg))
    return folder
