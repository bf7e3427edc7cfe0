"""The grid: projector specs, what every cell shares (:class:`Study`), the cells and their ids.

A cell is one pretraining run: method x projector x seed x ablation values (:data:`AXES`). Its
id hashes everything that defines its result (:meth:`Cell.key`), so a grid resumes by id. An
axis that does not change a (method, head) pair is ``None`` there (:func:`axis_applies`).
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from solo_deepfusion.bench import BASELINE
from solo_deepfusion.errors import UsageError
from solo_deepfusion.heads import projector_entry
from solo_deepfusion.solo.analysis import EVAL_BATCH_SIZES
from solo_deepfusion.solo.param_groups import HeadOptimizer
from solo_deepfusion.solo.variants import (
    default_preset,
    projector_defaults,
    projector_keys,
    projectors,
)

# Methods whose loss reads `method_kwargs.temperature` (solo-learn 1.0.6; a test checks the
# host's sources). RESSL (temperature_q/_k) and DINO (teacher/student) name theirs differently.
TEMPERATURE_METHODS = frozenset(
    {"all4one", "deepclusterv2", "mocov2plus", "mocov3", "nnclr", "simclr", "supcon", "swav"}
)
# Grid axis -> the config key it sets.
AXES: dict[str, str] = {
    "batch_size": "optimizer.batch_size",
    "temperature": "method_kwargs.temperature",
    "weight_decay": "optimizer.weight_decay",
    "depth": "projector.depth",
}
# Fields a cell's label always spells out, default or not, where the head has them, so that a
# record keeps its meaning when the package's defaults change (0.2.0 changed both for
# `transformer`, 0.3.0 the preset).
SPELLED_OUT = ("preset", "lr_scale")
KNN_K = (20, 200)
KNN_TEMPERATURE = 0.07
FUSION_SAMPLES = 256


# ---------------------------------------------------------------------------------------------
# Projector specs: `name` or `name:key=value,key=value`


@dataclass(frozen=True)
class ProjectorSpec:
    """A projector of the grid: a registered head (``mlp``, ``mlp_matched``, ``transformer``, an
    installed plugin's), plus fields."""

    name: str
    fields: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> ProjectorSpec:
        """``transformer:preset=small,mask=positives`` -> name and (sorted) fields, as given."""
        name, _, rest = text.strip().partition(":")
        known = projectors()
        if name not in known:
            raise UsageError(f"unknown projector {name!r} in {text!r}; choose from {list(known)}")
        fields: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, value = item.partition("=")
            if not sep or not key or not value:
                raise UsageError(f"projector field {item!r} in {text!r}: expected key=value")
            if key in fields:
                raise UsageError(f"projector field {key!r} given twice in {text!r}")
            fields[key] = value
        # `mlp` takes its own fields only: set, they select the `<method>_mlp` variant
        own = projector_entry(name).fields if name == BASELINE else projector_keys(name)
        allowed = set(own) - {"name"}
        unknown = sorted(set(fields) - allowed)
        if unknown:
            raise UsageError(
                f"{text!r}: unknown field(s) {unknown}; {name} takes {sorted(allowed)}"
            )
        return cls(name, tuple(sorted(fields.items())))

    def under(self, method: str) -> ProjectorSpec:
        """This head as ``method`` trains it: those of :data:`SPELLED_OUT` it has filled in from
        the current defaults where not given (the preset depends on the method)."""
        if self.name == BASELINE:  # the stock method's head, or its fields as given
            return self
        fields = {**spelled_out_defaults(self.name, method), **dict(self.fields)}
        return ProjectorSpec(self.name, tuple(sorted(fields.items())))

    @property
    def label(self) -> str:
        """The canonical spelling (fields sorted): the projector's key in records."""
        if not self.fields:
            return self.name
        return f"{self.name}:{','.join(f'{k}={v}' for k, v in self.fields)}"

    def has(self, key: str) -> bool:
        return any(k == key for k, _ in self.fields)

    def overrides(self) -> list[str]:
        """Launcher arguments selecting this head."""
        return ["--projector", self.name, *(f"projector.{k}={v}" for k, v in self.fields)]


def spelled_out_defaults(projector: str, method: str) -> dict[str, str]:
    """The current defaults of the :data:`SPELLED_OUT` keys ``projector`` has (its registered
    fields and the variant's), under ``method``, as label text."""
    defaults = {
        "lr_scale": HeadOptimizer().lr_scale,
        "preset": default_preset(method),
        **projector_defaults(projector),
    }
    keys = [key for key in SPELLED_OUT if key in projector_keys(projector)]
    return {
        key: f"{defaults[key]:g}" if isinstance(defaults[key], float) else str(defaults[key])
        for key in keys
    }


def axis_applies(axis: str, method: str, projector: ProjectorSpec) -> bool:
    """Whether ``axis`` changes anything for this method and head (else it is ``None``)."""
    if axis == "temperature":
        return method in TEMPERATURE_METHODS
    if axis == "depth":
        return projector.name != BASELINE and "depth" in projector_keys(projector.name)
    return True


# ---------------------------------------------------------------------------------------------
# The study and its cells


@dataclass
class Study:
    """What every cell shares: recipe, budget and evaluation settings."""

    config_dir: Path
    config_name: str
    max_epochs: int
    overrides: tuple[str, ...] = ()
    method_overrides: dict[str, tuple[str, ...]] = field(default_factory=dict)
    epochs: int | None = None
    fraction: float | None = None
    train_per_class: int | None = None
    val_per_class: int | None = None
    eval_dataset: str = "cifar10"
    linear_epochs: int = 0
    linear_overrides: tuple[str, ...] = ()
    knn_k: tuple[int, ...] = KNN_K
    knn_temperature: float = KNN_TEMPERATURE
    eval_batch_sizes: tuple[int, ...] = EVAL_BATCH_SIZES
    eval_max_images: int | None = None
    fusion_samples: int = FUSION_SAMPLES
    feature_probe: bool = True

    @property
    def recipe_file(self) -> Path:
        name = self.config_name
        return self.config_dir / (name if name.endswith(".yaml") else f"{name}.yaml")

    @functools.cached_property
    def recipe_sha256(self) -> str:
        return hashlib.sha256(self.recipe_file.read_bytes()).hexdigest()

    @property
    def train_epochs(self) -> int:
        return self.epochs if self.epochs is not None else self.max_epochs

    def method_extra(self, method: str) -> tuple[str, ...]:
        """Overrides of ``method`` alone: the user's, then fills for keys the recipe lacks."""
        return self.method_overrides.get(method, ())

    def budget(self, method: str) -> dict[str, Any]:
        return {
            "epochs": self.train_epochs,
            "fraction": self.fraction,
            "train_per_class": self.train_per_class,
            "val_per_class": self.val_per_class,
            "overrides": list(self.overrides),
            "method_overrides": list(self.method_extra(method)),
        }

    def evaluation(self) -> dict[str, Any]:
        return {
            "dataset": self.eval_dataset,
            "linear_epochs": self.linear_epochs,
            "linear_overrides": list(self.linear_overrides),
            "knn_k": list(self.knn_k),
            "knn_temperature": self.knn_temperature,
            "eval_batch_sizes": list(self.eval_batch_sizes),
            "eval_max_images": self.eval_max_images,
            "fusion_samples": self.fusion_samples,
            "feature_probe": self.feature_probe,
        }


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    study: Study = field(compare=False, repr=False)
    method: str
    projector: ProjectorSpec
    seed: int
    ablation: tuple[tuple[str, Any], ...]  # every axis of AXES, None where it does not apply

    def key(self) -> dict[str, Any]:
        """Everything that defines the run's result (not where its data or files live)."""
        study = self.study
        return {
            "recipe": study.config_name,
            "recipe_sha256": study.recipe_sha256,
            "method": self.method,
            "projector": self.projector.label,
            "seed": self.seed,
            "ablation": dict(self.ablation),
            "budget": study.budget(self.method),
            "eval": study.evaluation(),
        }

    @property
    def cell_id(self) -> str:
        return cell_id(self.key())

    def value(self, axis: str) -> Any:
        return dict(self.ablation)[axis]


def cell_id(key: dict[str, Any]) -> str:
    """A stable id of a cell's key: SHA-256 of its canonical JSON, 16 hex digits."""
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def expand_grid(
    study: Study,
    methods: Sequence[str],
    projectors: Sequence[ProjectorSpec],
    seeds: Sequence[int],
    axes: dict[str, Sequence[Any]],
) -> list[Cell]:
    """The grid's cells, seed-major (then method, ablation, projector with ``mlp`` first).

    An axis that does not apply to a (method, head) pair (temperature without
    ``method_kwargs.temperature``, depth of the stock MLP) is ``None`` there, and its values
    collapse into one cell. A cut-short grid thus leaves complete pairs of the first seeds.
    """
    for spec in projectors:
        if axes.get("depth") and spec.has("depth"):
            raise UsageError(f"--depths and {spec.label!r} both set the depth")
    order = sorted(projectors, key=lambda p: (p.name != BASELINE, projectors.index(p)))
    cells: list[Cell] = []
    seen: set[str] = set()
    for seed, method in itertools.product(seeds, methods):
        values = [axes.get(axis) or [None] for axis in AXES]
        for combo, spec in itertools.product(itertools.product(*values), order):
            ablation = tuple(
                (axis, value if axis_applies(axis, method, spec) else None)
                for axis, value in zip(AXES, combo, strict=True)
            )
            cell = Cell(study, method, spec.under(method), seed, ablation)
            if cell.cell_id not in seen:
                seen.add(cell.cell_id)
                cells.append(cell)
    return cells


def describe(key: dict[str, Any]) -> str:
    """``method projector seed=S axis=value ...`` of a cell key (axes that are set)."""
    axes = " ".join(f"{k}={v}" for k, v in key["ablation"].items() if v is not None)
    return f"{key['method']} {key['projector']} seed={key['seed']} {axes}".rstrip()


def has_override(overrides: Sequence[str], key: str) -> bool:
    """Whether ``overrides`` set ``key`` (as ``key=``, ``+key=`` or ``++key=``)."""
    return any(o.partition("=")[0].lstrip("+") == key for o in overrides if "=" in o)
