"""Reading and writing Lightning checkpoints of solo-learn runs, without running pickled code.

>>> checkpoint = read_checkpoint("trained_models/simsiam/abcd1234/x-ep=4.ckpt")
>>> model.load_state_dict(checkpoint["state_dict"])

Every load is ``torch.load(weights_only=True)``: tensors and plain containers only, so a
``.ckpt`` handed over by someone else cannot run code. One thing beyond that is needed for
solo-learn's own checkpoints: for parameter groups with ``static_lr`` (SimSiam's and NNSiam's
predictor) solo-learn sets ``scheduler.get_lr = partial(static_lr, get_lr=scheduler.get_lr,
...)``, an instance attribute saved with the scheduler's state. The few globals that partial
pickles (``functools.partial``, ``getattr``, the scheduler and optimizer classes) are read as
inert stand-ins (:class:`Dropped`) that call nothing, and the partial is then removed
(:func:`drop_static_lr`): ``configure_optimizers`` rebuilds it on resume. A stand-in found
anywhere else means the file holds objects this loader does not know: it is refused.
"""

from __future__ import annotations

import collections
import json
import os
import pickle
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf
from solo.methods.base import BaseMethod
from solo.utils.checkpointer import Checkpointer
from solo.utils.misc import omegaconf_select

from solo_deepfusion.atomic import atomic_path, write_text
from solo_deepfusion.errors import UsageError


class Dropped:
    """An inert stand-in for an object solo-learn pickled that a resume rebuilds anyway."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs

    def __setstate__(self, state: Any) -> None:
        del state


def _dropped(*args: Any, **kwargs: Any) -> Dropped:
    return Dropped()


def _plain_dict(*args: Any) -> collections.OrderedDict:
    """A ``defaultdict`` read as a dict: its items are kept, its default factory is not."""
    del args
    return collections.OrderedDict()


# What solo-learn's static_lr partial pickles, each read as an inert stand-in.
STATIC_LR_GLOBALS: list[tuple[Callable[..., Any], str]] = [
    (Dropped, "functools.partial"),
    (_dropped, "builtins.getattr"),
    (_dropped, "solo.methods.base.static_lr"),
    (Dropped, "solo.utils.lr_scheduler.LinearWarmupCosineAnnealingLR"),
    (Dropped, "torch.optim.lr_scheduler.MultiStepLR"),
    (Dropped, "solo.utils.lars.LARS"),
    (Dropped, "torch.optim.sgd.SGD"),
    (Dropped, "torch.optim.adam.Adam"),
    (Dropped, "torch.optim.adamw.AdamW"),
    (_plain_dict, "collections.defaultdict"),
    dict,
]
_UNSUPPORTED = re.compile(r"GLOBAL ([\w.]+)")  # torch names the global it refused


def drop_static_lr(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Remove solo-learn's ``static_lr`` partials from the schedulers' saved state.

    Loaded, a partial's bound ``get_lr`` would resolve to the partial itself and the first step
    after resuming would die in a ``RecursionError``; ``configure_optimizers`` rebuilds it.
    """
    for state in checkpoint.get("lr_schedulers", []):
        state.pop("get_lr", None)
    return checkpoint


def _holds_dropped(obj: Any) -> bool:
    if isinstance(obj, Dropped):
        return True
    if isinstance(obj, dict):
        return any(_holds_dropped(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return any(_holds_dropped(v) for v in obj)
    return False


def read_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """A checkpoint's dict, read with ``weights_only=True`` (``ValueError`` names the file).

    solo-learn's ``static_lr`` partials are dropped; any other pickled object is refused.
    """
    try:
        with open(path, "rb") as fh, torch.serialization.safe_globals(STATIC_LR_GLOBALS):
            checkpoint = torch.load(fh, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = _UNSUPPORTED.search(str(err))
        if found is None:  # not a pickle at all
            raise ValueError(f"{path} is not a readable checkpoint (no pickle)") from err
        raise ValueError(f"{path}: refused, it holds more than weights ({found[1]})") from err
    except (RuntimeError, EOFError) as err:  # not a zip archive, truncated, ...
        raise ValueError(f"{path} is not a readable checkpoint: {err}") from err
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    drop_static_lr(checkpoint)
    if _holds_dropped(checkpoint):
        raise ValueError(f"{path}: refused, it holds pickled objects other than weights")
    return checkpoint


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a folder made read-only meanwhile)."""


class SoloCheckpointIO(TorchCheckpointIO):
    """Saves solo-learn checkpoints atomically and reads them with :func:`read_checkpoint`
    (``weights_only=True``); ``static_lr`` partials are dropped both ways."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None
    ) -> None:
        """Local files are written to a temporary file and renamed: a kill leaves no torn file."""
        checkpoint = drop_static_lr(checkpoint)
        if "://" in str(path):  # remote storage: Lightning's own writer
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
        except (OSError, RuntimeError) as err:  # a full disk: the previous checkpoint stays
            # torch's zip writer reports a failed write of a file object as a RuntimeError
            # whose context is the OSError
            cause = err if isinstance(err, OSError) else err.__context__
            if not isinstance(cause, OSError):
                raise
            reason = cause.strerror or str(cause)
            raise CheckpointWriteError(f"cannot write the checkpoint {path}: {reason}") from err

    def load_checkpoint(
        self,
        path: str | Path,
        map_location: Callable | None = lambda storage, loc: storage,
        weights_only: bool | None = None,  # Lightning >= 2.4 passes it; always True here
    ) -> dict[str, Any]:
        del weights_only
        if not get_filesystem(path).exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return keep_new_horizon(read_checkpoint(path, map_location))


def keep_new_horizon(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """Drop the saved length of solo-learn's warm-up cosine schedules, so a resumed run follows
    the relaunch's ``max_epochs`` (a run may grow). The saved one would end the cosine early, and
    a 1-epoch schedule of 1 warm-up epoch dies in ``get_lr`` with a ``ZeroDivisionError``."""
    for state in checkpoint.get("lr_schedulers", []):
        if "warmup_epochs" in state:  # LinearWarmupCosineAnnealingLR
            state.pop("max_epochs", None)
    return checkpoint


class AtomicCheckpointer(Checkpointer):
    """solo-learn's Checkpointer, writing ``args.json`` atomically too (its own writes in place:
    a kill could leave a torn ``args.json`` that no relaunch could read)."""

    def save_args(self, trainer: Any) -> None:
        if trainer.is_global_zero:
            args = OmegaConf.to_container(self.cfg)
            args["wandb_run_id"] = getattr(self, "wandb_run_id", None)
            text = json.dumps(args, default=lambda o: "<not serializable>")
            write_text(self.path / "args.json", text)


# ---------------------------------------------------------------------------------------------
# Which checkpoint a relaunched run resumes

_EPOCH = re.compile(r"-ep=(\d+)\.ckpt$")


def checkpoint_epoch(path: Path) -> int:
    """The epoch in a Checkpointer file name (``<name>-<version>-ep=<N>.ckpt``), else -1."""
    match = _EPOCH.search(path.name)
    return int(match[1]) if match else -1


def unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from (``None``: it can), without running any of it.

    The whole file is read as :func:`read_checkpoint` reads it, so a file cut short by a kill,
    a corrupted one and one holding code are all caught before Lightning opens it.
    """
    try:
        read_checkpoint(path)
    except (ValueError, OSError) as err:
        return str(err).removeprefix(f"{path}: ").removeprefix(f"{path} ")
    return None


def _notice(message: str) -> None:
    print(f"auto-resume: {message}", file=sys.stderr)


# Settings that do not change what a run trains: a relaunch may differ in them and still resume
# (``max_epochs`` only upwards). Everything else in ``args.json`` is the run's identity.
NOT_IDENTITY = (
    "checkpoint",
    "auto_resume",
    "resume_from_checkpoint",
    "wandb_run_id",
    "wandb.enabled",
    "wandb.offline",
    "data.num_workers",
    "enable_progress_bar",
    "enable_model_summary",
    "num_sanity_val_steps",
    "log_every_n_steps",
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.0.c": leaf}`` for nested dicts and lists (an empty container is a leaf)."""
    if isinstance(value, dict) and value:
        items = value.items()
    elif isinstance(value, list) and value:
        items = enumerate(value)
    else:
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in items:
        flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _as_json(cfg: DictConfig | dict) -> dict[str, Any]:
    """``cfg`` as ``args.json`` records it (what JSON cannot hold: ``"<not serializable>"``)."""
    container = OmegaConf.to_container(cfg) if isinstance(cfg, DictConfig) else cfg
    return json.loads(json.dumps(container, default=lambda o: "<not serializable>"))


def identity_differences(args: DictConfig | dict, cfg: DictConfig) -> list[tuple[str, Any, Any]]:
    """``(key, the run's value, the command's value)`` for every setting that makes ``cfg``
    another run than the one ``args`` (its ``args.json``) describes; empty: the same run.

    A missing key equals ``None``; ``max_epochs`` may grow; :data:`NOT_IDENTITY` is ignored.
    """
    old, new = _flatten(_as_json(args)), _flatten(_as_json(cfg))
    differences = []
    for key in sorted(old.keys() | new.keys()):
        if any(key == k or key.startswith(f"{k}.") for k in NOT_IDENTITY):
            continue
        before, now = old.get(key), new.get(key)
        grows = isinstance(before, int) and isinstance(now, int) and now >= before
        if before != now and not (key == "max_epochs" and grows):
            differences.append((key, before, now))
    return differences


def describe_differences(differences: Sequence[tuple[str, Any, Any]], limit: int = 3) -> str:
    """``data.train_path='a' (now 'b'), seed=5 (now 6), and 2 more`` (``None``: ``unset``)."""

    def value(v: Any) -> str:
        return "unset" if v is None else repr(v)

    text = ", ".join(f"{k}={value(old)} (now {value(new)})" for k, old, new in differences[:limit])
    more = len(differences) - limit
    return text + (f", and {more} more" if more > 0 else "")


def find_resumable(
    logdir: Path, cfg: DictConfig, max_hours: float
) -> tuple[Path | None, str | None]:
    """``(checkpoint, wandb run id)`` a relaunch of ``cfg`` resumes, or ``(None, None)``.

    Among the run folders ``<logdir>/<version>/`` whose ``args.json`` describes the same run as
    ``cfg`` (:func:`identity_differences`), the newest complete checkpoint (by epoch, then by
    time, within ``max_hours``) wins. Checkpoints cut short or corrupted, and checkpoints without
    a readable ``args.json`` beside them, are skipped with a one-line notice, never loaded. When
    no run matches but one differs, one line names the closest such run and how it differs.
    """
    if not logdir.is_dir():
        return None, None
    oldest = time.time() - max_hours * 3600
    found: list[tuple[float, Path, DictConfig]] = []
    other: tuple[tuple[int, float], Path, list[tuple[str, Any, Any]]] | None = None
    for folder in sorted(p for p in logdir.iterdir() if p.is_dir()):
        checkpoints = sorted(folder.glob("*.ckpt"), key=checkpoint_epoch, reverse=True)
        if not checkpoints:
            continue
        try:
            args = read_args(folder / "args.json")
        except (UsageError, OSError):
            _notice(f"skipping {folder}: no readable args.json beside its checkpoints")
            continue
        differences = identity_differences(args, cfg)
        if differences:  # the closest such run is named, the newest among equals
            rank = (-len(differences), max(c.stat().st_mtime for c in checkpoints))
            if other is None or rank > other[0]:
                other = (rank, folder, differences)
            continue
        for ckpt in checkpoints:
            problem = unreadable(ckpt)
            if problem is not None:
                _notice(f"skipping {ckpt}: {problem}")
                continue
            if ckpt.stat().st_mtime >= oldest:
                found.append((ckpt.stat().st_mtime, ckpt, args))
            break
    if not found:
        if other is not None:
            _notice(
                f"not resuming {other[1]}: it was trained with "
                f"{describe_differences(other[2])}; starting a new run folder"
            )
        return None, None
    _, ckpt, args = max(found, key=lambda item: item[0])
    return ckpt, omegaconf_select(args, "wandb_run_id", None)


# Settings that decide the model's parameters: a checkpoint of another value cannot be resumed.
MODEL_KEYS = ("method", "backbone", "projector", "method_kwargs")


def check_fits(path: Path, model: torch.nn.Module, cfg: DictConfig) -> None:
    """Raise a one-line :class:`UsageError` unless the checkpoint at ``path`` (named by
    ``resume_from_checkpoint``) is one of the model ``cfg`` trains: the same method, backbone
    and head in its ``args.json`` (when there is one), and the same weights, name by name and
    shape by shape."""
    what = f"resume_from_checkpoint={path}"
    args_file = path.parent / "args.json"
    if args_file.is_file():
        differences = [
            d
            for d in identity_differences(read_args(args_file), cfg)
            if d[0].split(".")[0] in MODEL_KEYS
        ]
        if differences:
            raise UsageError(
                f"{what} is another model: its run has {describe_differences(differences)}; "
                "give the run's settings, or drop resume_from_checkpoint"
            )
    try:
        saved = read_checkpoint(path)["state_dict"]
    except (KeyError, TypeError) as err:
        raise UsageError(f"{what} holds no state_dict") from err
    except ValueError as err:
        raise UsageError(f"{what}: {err}") from err
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(getattr(v, "shape", ())) for k, v in saved.items()}
    problems = [f"missing {k}" for k in expected if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    problems += [
        f"{k} is {found[k]}, the model's {expected[k]}"
        for k in expected
        if k in found and found[k] != expected[k]
    ]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UsageError(
            f"{what} does not fit the model of this command ({cfg.method}): {problems[0]}{more}"
        )


def _is_rank_zero() -> bool:
    """False in the processes Lightning's DDP starts for the other ranks."""
    return os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"


def lock_file(folder: Path) -> Path:
    """The lock a training process holds on its run folder: ``.<folder name>.lock`` beside it
    (inside, it would make a new run's folder before Lightning's logger makes it)."""
    return folder.with_name(f".{folder.name}.lock")


@contextmanager
def run_folder_lock(folder: Path) -> Iterator[None]:
    """Hold :func:`lock_file` of ``folder`` while a process trains in it; a second process that
    would train in it is refused in one line (waiting would resume a run the first one is still
    changing, and both would write its checkpoints and ``metrics.csv``)."""
    if not _is_rank_zero():  # rank 0 holds it for the whole job
        yield
        return
    path = lock_file(folder)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create {path.parent}: {err.strerror}") from err
    lock = FileLock(str(path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise UsageError(
            f"{folder} is in use: another process is training in it (it holds {path}); "
            "refusing to train there too. Wait for it to end, or give another checkpoint.dir"
        ) from None
    try:
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------------------------------------
# A trained run, named by its folder, a checkpoint or a zoo entry


@dataclass(frozen=True)
class PretrainedRun:
    """A run's weights (a ``.ckpt``, or a zoo entry's ``full`` safetensors) and its config."""

    checkpoint: Path
    cfg: DictConfig

    def load(self) -> BaseMethod:
        """The model, weights loaded strictly, in eval mode; never unpickles code (a file that
        holds code, or one cut short, is a :class:`UsageError`)."""
        from solo_deepfusion.hub.weights import load_state_dict, upcast
        from solo_deepfusion.solo.model import build_model, model_from_checkpoint

        try:
            if self.checkpoint.suffix == ".safetensors":
                model = build_model(self.cfg)
                model.load_state_dict(upcast(load_state_dict(self.checkpoint)), strict=True)
            else:
                model = model_from_checkpoint(self.checkpoint, self.cfg, strict=True)
        except ValueError as err:
            raise UsageError(str(err)) from err
        return model.eval()

    @property
    def transformer_head(self) -> bool:
        return omegaconf_select(self.cfg, "projector.name", "mlp") == "transformer"


def find_run(source: str | os.PathLike) -> PretrainedRun:
    """The run ``source`` names: a ``.ckpt`` file, a run folder (its checkpoint of the highest
    epoch, then the newest), or the name of a zoo entry (its verified files, downloaded).

    The config is the ``args.json`` beside the checkpoint (the entry's ``args`` file).
    """
    path = Path(source).expanduser()
    if not path.exists() and _is_zoo_entry(str(source)):
        from solo_deepfusion.solo.zoo import zoo_run_files

        weights, args = zoo_run_files(str(source))
        return PretrainedRun(weights, read_args(args))
    if path.is_dir():
        checkpoints = sorted(
            path.glob("*.ckpt"), key=lambda p: (checkpoint_epoch(p), p.stat().st_mtime)
        )
        if not checkpoints:
            raise UsageError(f"no .ckpt file in {path}")
        path = checkpoints[-1]
    elif not path.is_file():
        raise UsageError(
            f"{source} does not exist: no such checkpoint file, run folder or zoo entry "
            "(`solo-deepfusion zoo list` shows the entries)"
        )
    args = path.parent / "args.json"
    if not args.is_file():
        raise UsageError(f"{path.parent} has no args.json (written next to the checkpoint)")
    return PretrainedRun(path, read_args(args))


def _is_zoo_entry(name: str) -> bool:
    from solo_deepfusion import hub

    try:
        return name in hub.list_models()
    except hub.ZooError:  # no manifest here: not a zoo name either
        return False


def read_args(path: Path) -> DictConfig:
    """A run's ``args.json``: a JSON object naming a method solo-learn knows (one-line errors)."""
    from solo.methods import METHODS

    from solo_deepfusion.solo import register

    try:
        args = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UsageError(f"{path} is not a JSON file: {err}") from err
    if not isinstance(args, dict):
        raise UsageError(f"{path} holds a JSON {type(args).__name__}, not an object (a run's cfg)")
    register()
    method = args.get("method")
    if not isinstance(method, str) or method not in METHODS:
        raise UsageError(f"{path}: method={method!r} is not one of solo-learn's methods")
    cfg = OmegaConf.create(args)
    OmegaConf.set_struct(cfg, False)
    return cfg
