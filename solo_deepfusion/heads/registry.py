"""Projector registry: ``build_projector(name, in_dim, hidden_dim, out_dim, **cfg)``.

Example::

    head = build_projector("transformer", 512, 2048, 256, preset="small", depth=6)
    mlp = build_projector("mlp", 512, 2048, 256, layout="byol")
    twin = build_projector("mlp_matched", 512, 2048, 256, preset="paper")  # same #params
    trunk = build_projector("residual_mlp", 512, 2048, 256)  # the default's, no attention

A head is a registration: a builder, a dataclass of the fields a recipe may set, and declared
properties. The solo-learn integration derives ``--projector <name>``, the ``<method>_<name>``
variants, the ``projector`` config group, the bench's checks and the contract tests from it::

    @register_projector("my_head", config=MyHeadFields, joint_context=True)
    def my_head(in_dim, hidden_dim, out_dim, **fields) -> nn.Module: ...

The head contract (``docs/plugins.md``):

- ``build(in_dim, hidden_dim, out_dim, **fields)``: ``fields`` are the config's (its non-``None``
  defaults filled in); ``hidden_dim`` and ``out_dim`` are the recipe's ``proj_hidden_dim`` and
  ``proj_output_dim``. The module maps ``(T, in_dim)`` features to ``(T, out_dim)``.
- ``joint_context``: ``True`` (or a predicate of the built head) has the head called once per
  training step as ``head(x, num_views=V)`` on every large crop's features, view-major (rows
  ``v * B`` to ``(v + 1) * B - 1`` are crop ``v``; row ``i`` of each crop is the same image).
  Otherwise it is called as ``head(x)`` once per crop of ``B`` rows.
- ``return_attention``: only the ``transformer`` head is asked for ``(out, maps)`` (the fusion
  and collapse monitors, ``analyze``); every other head opts out of those monitors.
- ``optimizer``: defaults of the head's optimizer group (``lr_scale``, ``weight_decay``,
  ``lars``; :mod:`solo_deepfusion.solo.param_groups`), which every registered head has.

Heads from other packages register in the entry-point group :data:`ENTRY_POINT_GROUP`; its
modules are imported the first time the registry is read. A head registered later still
reaches ``solo_deepfusion.solo``: its variants are added whenever one is asked for.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from torch import nn

from solo_deepfusion.heads.cost import count_parameters
from solo_deepfusion.heads.mlp import (
    SOLO_MLP_LAYOUTS,
    MLPProjector,
    matched_hidden_dim,
)
from solo_deepfusion.heads.residual_mlp import ResidualMLPProjector
from solo_deepfusion.heads.transformer import TransformerProjector
from solo_deepfusion.validation import check_choice, check_int

ProjectorBuilder = Callable[..., nn.Module]
JointContext = bool | Callable[[nn.Module], bool]
ENTRY_POINT_GROUP = "solo_deepfusion.projectors"
OPTIMIZER_FIELDS = ("lr_scale", "weight_decay", "lars")


@dataclass(frozen=True)
class ProjectorEntry:
    """A registered head: its builder, the config keys a recipe may set (with defaults), whether
    it wants the joint context and its optimizer group's defaults."""

    build: ProjectorBuilder
    fields: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    joint_context: JointContext = False
    optimizer: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def wants_joint_context(self, head: nn.Module) -> bool:
        """Whether ``head``, built by this entry, is called once over every view."""
        joint = self.joint_context
        return bool(joint(head) if callable(joint) else joint)


_PROJECTORS: dict[str, ProjectorEntry] = {}
_plugins_loaded = False


@dataclass(frozen=True)
class TransformerHeadConfig:
    """Every field of ``TransformerProjector`` that a config may set."""

    dim: int = 256
    depth: int = 10
    heads: int = 16
    ffn_dim: int = 1024
    norm: str = "post"
    input_norm: str = "none"
    output_norm: str = "none"
    qk_norm: bool = False
    centred_attention: bool = False
    mixing: str = "attention"
    attention_logits: str = "dot"
    logit_scale_init: float = 10.0
    qk_init: str = "xavier"
    qk_lr_scale: float = 1.0
    residual: bool = True
    block_norm: str = "layer"
    activation: str = "gelu"
    dropout: float = 0.0
    context: str = "joint"
    mask: str = "none"
    gather_distributed: bool = True


PRESETS: dict[str, TransformerHeadConfig] = {
    # The default (but under SimCLR and VICReg: solo_deepfusion.solo.variants.METHOD_PRESETS):
    # `stable` with its outputs centred over the batch, which beat `mlp` by 2-3 points on every
    # linear and k-NN metric where `stable` was level (benchmarks/confirm).
    "stable_bn": TransformerHeadConfig(norm="pre", mask="positives", output_norm="batch"),
    # The authors' size, made to train under solo-learn's LARS recipes. Post-norm saturates its
    # first layer and collapses; pre-norm does not, and masking a sample's own other views was
    # the screen's best (benchmarks/stability, benchmarks/screen).
    "stable": TransformerHeadConfig(norm="pre", mask="positives"),
    # The default under VICReg, whose loss cannot see a direction every output shares. `stable`
    # keeps two: the non-negative backbone features' (centred here over the batch, as the stock
    # MLP's BatchNorm does) and the batch mean that near-uniform attention adds to every token
    # (subtracted here). Output cosine 0.60 -> 0.22, effective rank 54 -> 123
    # (benchmarks/stability).
    "stable_centred": TransformerHeadConfig(
        norm="pre", mask="positives", input_norm="batch", centred_attention=True
    ),
    # SimCLR's default since 0.5.0: `stable_bn` with cosine attention logits (a learnable
    # per-head scale, from 10) and k = q (k shares q's weights), so attention starts as a soft
    # kNN over the tokens. The regime search's one whose attention prefers a query's class in
    # every layer (last-layer fusion ratio 1.56 against 1.00), +0.6 [+0.1, +1.0] over
    # `stable_bn` on cached features under SimCLR, 6 seeds (benchmarks/regimes/confirm).
    "cosine_tied": TransformerHeadConfig(
        norm="pre", mask="positives", output_norm="batch", attention_logits="cosine", qk_init="tied"
    ),
    # The authors' TransFusionModel defaults (paper-notes §1.2).
    "paper": TransformerHeadConfig(),
    # Cheap enough for CPU runs; 4 layers still show how attention changes with depth.
    "small": TransformerHeadConfig(dim=128, depth=4, heads=4, ffn_dim=512),
}
# A checkpoint records its preset by name, so a preset, once published, never changes.
DEFAULT_PRESET = "stable_bn"


def transformer_config(preset: str = DEFAULT_PRESET, **overrides: Any) -> TransformerHeadConfig:
    """The ``preset`` with ``overrides`` applied; ``None`` values keep the preset's value."""
    check_choice("preset", preset, tuple(PRESETS))
    check_known_fields("transformer", TransformerHeadConfig, overrides)
    return dataclasses.replace(
        PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}
    )


def check_known_fields(head: str, config: type, given: Mapping[str, Any]) -> None:
    """Raise a ``ValueError`` listing the fields of ``given`` that dataclass ``config`` lacks."""
    fields = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(given) - fields)
    if unknown:
        raise ValueError(f"unknown {head} field(s) {unknown}; known fields: {sorted(fields)}")


def register_projector(
    name: str,
    *,
    config: type | None = None,
    joint_context: JointContext = False,
    optimizer: Mapping[str, Any] | None = None,
) -> Callable[[ProjectorBuilder], ProjectorBuilder]:
    """Decorator adding a builder ``fn(in_dim, hidden_dim, out_dim, **cfg)`` under ``name``.

    ``config`` is a dataclass of what a recipe may set (``projector.<field>``); its non-``None``
    defaults are filled in when a recipe sets none. ``joint_context`` is ``True`` for a head that
    mixes samples across views (or a predicate of the built head), ``optimizer`` the defaults of
    its optimizer group (keys among :data:`OPTIMIZER_FIELDS`). The solo-learn integration
    derives its variants, config group and checks from the registration.
    """
    fields = dataclasses.fields(config) if config is not None else ()
    names = tuple(f.name for f in fields)
    defaults = {f.name: f.default for f in fields if f.default is not None}
    if not isinstance(joint_context, bool) and not callable(joint_context):
        raise ValueError(f"joint_context={joint_context!r}; choose True, False or a predicate")
    unknown = sorted(set(optimizer or {}) - set(OPTIMIZER_FIELDS))
    if unknown:
        raise ValueError(f"optimizer field(s) {unknown}; choose from {list(OPTIMIZER_FIELDS)}")
    clash = sorted(set(names) & set(OPTIMIZER_FIELDS))
    if clash:
        raise ValueError(f"config field(s) {clash} of {name!r} are the optimizer group's keys")
    options = dict(optimizer or {})

    def add(fn: ProjectorBuilder) -> ProjectorBuilder:
        if name in _PROJECTORS and _PROJECTORS[name].build is not fn:
            raise ValueError(f"projector {name!r} is already registered")
        _PROJECTORS[name] = ProjectorEntry(fn, names, defaults, joint_context, options)
        return fn

    return add


def load_plugins() -> None:
    """Import the modules of the entry-point group :data:`ENTRY_POINT_GROUP` (once).

    A plugin package declares, in its ``pyproject.toml``::

        [project.entry-points."solo_deepfusion.projectors"]
        my_head = "my_package.heads"   # a module that calls register_projector
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            ep.load()
        except Exception as err:
            raise ImportError(
                f"projector plugin {ep.name!r} ({ep.value}) failed to load: "
                f"{type(err).__name__}: {err}"
            ) from err


def projector_entry(name: str) -> ProjectorEntry:
    """The registration of ``name`` (``ValueError`` lists the known ones)."""
    load_plugins()
    if name not in _PROJECTORS:
        raise ValueError(f"unknown projector {name!r}; known projectors: {list_projectors()}")
    return _PROJECTORS[name]


def list_projectors() -> list[str]:
    """Every registered head's name, installed plugins' included."""
    load_plugins()
    return sorted(_PROJECTORS)


def build_projector(name: str, in_dim: int, hidden_dim: int, out_dim: int, **cfg: Any) -> nn.Module:
    """Build the projector registered as ``name``. The sizes are checked for every head, also
    for one that ignores ``hidden_dim`` (0 there means "none")."""
    check_int("in_dim", in_dim)
    check_int("hidden_dim", hidden_dim, minimum=0)
    check_int("out_dim", out_dim)
    return projector_entry(name).build(in_dim, hidden_dim, out_dim, **cfg)


def _optional(config: type) -> list[tuple[str, Any, Any]]:
    """``config``'s fields as optional ones: ``None`` keeps the preset's value."""
    return [(f.name, f.type, dataclasses.field(default=None)) for f in dataclasses.fields(config)]


# What a recipe may set for each head: the `transformer` preset and any of its fields; the MLP
# twin the same plus its depth; the host-free `mlp` builder the solo-learn layout it copies.
TransformerFields = dataclasses.make_dataclass(
    "TransformerFields",
    [("preset", str, dataclasses.field(default=DEFAULT_PRESET)), *_optional(TransformerHeadConfig)],
    frozen=True,
)
MLPMatchedFields = dataclasses.make_dataclass(
    "MLPMatchedFields",
    [
        ("num_layers", int, dataclasses.field(default=3)),
        *(
            (f.name, f.type, dataclasses.field(default=f.default))
            for f in dataclasses.fields(TransformerFields)
        ),
    ],
    frozen=True,
)


@dataclass(frozen=True)
class ResidualMLPFields:
    """Every field of ``ResidualMLPProjector`` that a config may set; the defaults are the
    default transformer's trunk (``stable_bn``'s and ``cosine_tied``'s)."""

    dim: int = 256
    depth: int = 10
    ffn_dim: int = 1024
    activation: str = "gelu"
    dropout: float = 0.0
    output_norm: str = "batch"


@dataclass(frozen=True)
class MLPFields:
    layout: str | None = None  # a solo-learn method's layout; None: the method being trained's
    output_norm: str = "none"


# Trained at a tenth of its stock group's lr: at the full lr of solo-learn's LARS recipes,
# pre-norm heads diverge under Barlow Twins and VICReg (benchmarks/stability).
@register_projector(
    "transformer",
    config=TransformerFields,
    joint_context=lambda head: head.context == "joint",
    optimizer={"lr_scale": 0.1},
)
def transformer(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    *,
    preset: str = DEFAULT_PRESET,
    tail: nn.Module | None = None,
    **fields: Any,
) -> TransformerProjector:
    """The Deep Fusion head; ``hidden_dim`` is unused (the width is the preset's ``dim``)."""
    del hidden_dim
    config = transformer_config(preset, **fields)
    return TransformerProjector(in_dim, out_dim, tail=tail, **dataclasses.asdict(config))


@register_projector("mlp", config=MLPFields)
def mlp(
    in_dim: int, hidden_dim: int, out_dim: int, *, layout: str | None = None, **fields: Any
) -> MLPProjector:
    """solo-learn's projector of method ``layout`` (default ``simclr``); ``fields`` override
    the layout (``output_norm="batch"``: an output BatchNorm, the fair twin of a head that has
    one)."""
    layout = "simclr" if layout is None else layout
    check_choice("layout", layout, tuple(SOLO_MLP_LAYOUTS))
    kwargs = {**dataclasses.asdict(SOLO_MLP_LAYOUTS[layout]), **fields}
    return MLPProjector(in_dim, hidden_dim, out_dim, **kwargs)


@register_projector("mlp_matched", config=MLPMatchedFields)
def mlp_matched(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    *,
    num_layers: int = 3,
    batch_norm: bool = True,
    activation: str = "relu",
    preset: str = DEFAULT_PRESET,
    **fields: Any,
) -> MLPProjector:
    """An MLP with as many parameters as ``transformer(preset, **fields)`` (within 5%).

    ``hidden_dim`` is replaced by the width that matches the transformer's parameter count,
    so accuracy gains of the transformer can be told apart from added capacity. An
    ``output_norm`` given here ends the MLP too (the fair twin of a head that has one); the
    preset's alone does not, so a published ``mlp_matched`` keeps its meaning.
    """
    del hidden_dim
    fields.pop("tail", None)
    twin = transformer(in_dim, 0, out_dim, preset=preset, **fields)
    width = matched_hidden_dim(count_parameters(twin), in_dim, out_dim, num_layers, batch_norm)
    return MLPProjector(
        in_dim,
        width,
        out_dim,
        num_layers=num_layers,
        batch_norm=batch_norm,
        activation=activation,
        output_norm=fields.get("output_norm") or "none",
    )


# Per sample, so called once per crop as `mlp` is. At a tenth of the lr, in the head group, as
# the `mixing=none` control of the default whose trunk it is was trained (benchmarks/controls).
@register_projector(
    "residual_mlp", config=ResidualMLPFields, joint_context=False, optimizer={"lr_scale": 0.1}
)
def residual_mlp(
    in_dim: int, hidden_dim: int, out_dim: int, *, tail: nn.Module | None = None, **fields: Any
) -> ResidualMLPProjector:
    """The default transformer's blocks without attention; ``hidden_dim`` is unused (the width
    is ``dim``)."""
    del hidden_dim
    check_known_fields("residual_mlp", ResidualMLPFields, fields)
    return ResidualMLPProjector(in_dim, out_dim, tail=tail, **fields)
