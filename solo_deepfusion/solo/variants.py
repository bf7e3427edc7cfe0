"""``<method>_<head>`` (``simclr_transformer``, ``byol_mlp_matched``, ...): solo-learn methods with
another registered head.

Each variant subclasses the stock method, lets it build everything as usual, then swaps the
projector (DINO: ``head.mlp``) for the configured head, keeping the method's tail (whatever
follows the stock projector's last ``Linear``: SimSiam's and MoCo v3's ``BatchNorm1d``,
NNCLR's BN, VIbCReg's IterNorm), the recipe's ``proj_output_dim`` and, for momentum methods,
an identical EMA copy of the head. Heads whose registration declares ``joint_context`` get the
joint context from the mixins in :mod:`solo_deepfusion.solo.context`; every head gets its own
optimizer group (:mod:`solo_deepfusion.solo.param_groups`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict
from solo.methods import METHODS
from solo.methods.base import BaseMethod, BaseMomentumMethod
from solo.utils.momentum import initialize_momentum_params
from torch import nn

from solo_deepfusion.heads import (
    DEFAULT_PRESET,
    SOLO_MLP_LAYOUTS,
    build_projector,
    list_projectors,
    projector_entry,
)
from solo_deepfusion.solo.context import (
    ContextProjector,
    JointContextMixin,
    MomentumJointContextMixin,
)
from solo_deepfusion.solo.monitor import MONITOR_DEFAULTS, MONITOR_KEYS
from solo_deepfusion.solo.param_groups import HeadOptimizer, head_rules, split_head_group
from solo_deepfusion.validation import check_choice

# Every solo-learn method with a projection head (all but `mae` and `linear`): the methods whose
# projector layout heads/mlp.py knows. The method table is written there once.
HEAD_METHODS = tuple(sorted(SOLO_MLP_LAYOUTS))
# Keys of `cfg.projector` that configure the variant, not the head itself: the monitors'
# (solo_deepfusion.solo.monitor) and the head's optimizer group (solo_deepfusion.solo.param_groups).
OPTIMIZER_KEYS = tuple(f.name for f in dataclasses.fields(HeadOptimizer))
NON_HEAD_KEYS = ("small_crops", *MONITOR_KEYS, *OPTIMIZER_KEYS)


# The stock method's own head. With a field of its own changed (`projector.output_norm=batch`)
# it is no longer the stock head: the `<method>_mlp` variant builds it from heads/mlp.py.
STOCK = "mlp"


def projectors() -> tuple[str, ...]:
    """Every registered head, ``mlp`` (the stock method) first; every other one becomes
    ``<method>_<head>``. Read from the registry on each call, so later registrations count."""
    return (STOCK, *(p for p in list_projectors() if p != STOCK))


def variant_heads() -> tuple[str, ...]:
    """The heads with ``<method>_<head>`` variants: every registered one, ``mlp`` last (its
    variant trains the stock layout with a field changed)."""
    return (*projectors()[1:], STOCK)


def changes_stock_head(method: str, fields: Mapping[str, Any] | None) -> bool:
    """Whether ``fields`` (a ``projector`` section of ``mlp``) change the stock method's head."""
    entry = projector_entry(STOCK)
    stock = {**entry.defaults, "layout": method}
    given = {k: v for k, v in (fields or {}).items() if k in entry.fields and v is not None}
    return any(stock.get(k) != v for k, v in given.items())


def projector_keys(projector: str) -> tuple[str, ...]:
    """A variant's projector config keys: the head's registered fields and the variant's."""
    fields = projector_entry(projector).fields
    clash = sorted(set(fields) & {"name", *NON_HEAD_KEYS})
    if clash:
        raise ValueError(f"projector {projector!r}: field(s) {clash} are the variant's own keys")
    return ("name", *fields, *NON_HEAD_KEYS)


def projector_defaults(projector: str) -> dict[str, Any]:
    """The variant's defaults: the head's registered ones (its optimizer group's included).
    The preset is the stock method's (:func:`default_preset`), so it is no default here."""
    entry = projector_entry(projector)
    return {
        **{k: v for k, v in entry.defaults.items() if k != "preset"},
        **entry.optimizer,
        "small_crops": False,
    }


# Methods whose heads default to another preset than DEFAULT_PRESET, each where a committed
# study says so:
# - SimCLR: `cosine_tied`, class-aware attention in every layer and +0.6 [+0.1, +1.0] over
#   `stable_bn` on cached features, 6 seeds (benchmarks/regimes/confirm). Under BYOL the same
#   head lost to `stable_bn` (benchmarks/byol), so it is no default beyond what was measured.
# - VICReg: its variance term reads the head's output: an output BatchNorm meets it by
#   construction, and behind it the head collapses (out_proj cosine 0.99999). `stable_centred`
#   removes the shared direction at its sources instead (benchmarks/stability).
METHOD_PRESETS = {"simclr": "cosine_tied", "vicreg": "stable_centred"}


def projector_group_node(projector: str) -> dict[str, Any]:
    """The ``projector`` config group entry of ``projector``: every key, ``None`` where the
    head's own default applies (what ``projector=<name>`` selects on the command line)."""
    if projector == STOCK:  # its own fields only: set one, and the `<method>_mlp` variant trains
        return {"name": STOCK, **dict.fromkeys(projector_entry(STOCK).fields)}
    keys = dict.fromkeys(projector_keys(projector))
    return {
        **keys,
        "name": projector,
        **projector_defaults(projector),
        **{k: MONITOR_DEFAULTS[k] for k in MONITOR_KEYS},
    }


def variant_name(method: str, projector: str, fields: Mapping[str, Any] | None = None) -> str:
    """The METHODS key that trains ``method`` with ``projector`` configured by ``fields`` (its
    ``projector`` section): ``mlp`` is the stock method unless a field changes it."""
    check_choice("projector", projector, projectors())
    if projector == STOCK and not changes_stock_head(method, fields):
        return method
    return f"{method}_{projector}"


def base_method(name: str) -> str:
    """The stock method a (possibly variant) METHODS key is built on. The longest head name it
    ends with is cut, whatever the registry's order: ``simclr_residual_mlp`` is SimCLR with
    ``residual_mlp``, not ``simclr_residual`` with ``mlp``."""
    heads = [projector for projector in variant_heads() if name.endswith(f"_{projector}")]
    return name.removesuffix(f"_{max(heads, key=len)}") if heads else name


def default_preset(method: str) -> str:
    """The preset of a head (and of its MLP twin) under ``method``, a stock or variant name."""
    return METHOD_PRESETS.get(base_method(method), DEFAULT_PRESET)


def projector_config(cfg: DictConfig, projector: str) -> DictConfig:
    """Fill ``cfg.projector`` for ``projector`` with defaults and reject unknown fields."""
    keys = projector_keys(projector)
    with open_dict(cfg):
        if "projector" not in cfg or cfg.projector is None:
            cfg.projector = {"name": projector}
        pcfg = cfg.projector
        if pcfg.get("name", projector) != projector:
            raise ValueError(
                f"projector.name={pcfg.name!r} contradicts method={cfg.method!r}; "
                f"use projector.name={projector!r} or the stock method"
            )
        pcfg.name = projector
        if "preset" in keys and pcfg.get("preset") is None:
            pcfg.preset = default_preset(cfg.method)
        for key, value in projector_defaults(projector).items():
            if pcfg.get(key) is None:
                pcfg[key] = value
    unknown = sorted(set(pcfg) - set(keys))
    if unknown:
        raise ValueError(f"unknown projector field(s) {unknown}; {projector} takes {sorted(keys)}")
    return cfg


def build_head(cfg: DictConfig, in_dim: int, tail: nn.Module | None = None) -> ContextProjector:
    """The head named by ``cfg.projector`` for backbone features of size ``in_dim``, followed
    by ``tail``, with the joint context its registration declares."""
    pcfg = OmegaConf.to_container(cfg.projector, resolve=True)
    name = pcfg.pop("name")
    for key in NON_HEAD_KEYS:
        pcfg.pop(key, None)
    fields = {k: v for k, v in pcfg.items() if v is not None}
    if name == STOCK:
        fields.setdefault("layout", base_method(cfg.method))
    kwargs = cfg.method_kwargs
    head = build_projector(name, in_dim, kwargs.proj_hidden_dim, kwargs.proj_output_dim, **fields)
    return ContextProjector(head, tail, joint=projector_entry(name).wants_joint_context(head))


def method_tail(stock: nn.Module) -> nn.Module | None:
    """What the stock projector applies after its last ``Linear`` (``None`` if nothing)."""
    layers = list(stock.children()) if isinstance(stock, nn.Sequential) else []
    last_linear = max((i for i, m in enumerate(layers) if isinstance(m, nn.Linear)), default=-1)
    tail = layers[last_linear + 1 :]
    if last_linear < 0 or not tail:
        return None
    return copy.deepcopy(tail[0] if len(tail) == 1 else nn.Sequential(*tail))


def _backbone_for(base: str, ctor: Any, method: str, *args: Any, **kwargs: Any) -> nn.Module:
    del method  # the variant's name; backbones look at the stock name (vit_mocov3, vit_mae)
    return ctor(base, *args, **kwargs)


class DeepFusionVariant:
    """Swaps the stock projector of ``BASE_METHOD`` for the head named ``PROJECTOR``."""

    BASE_METHOD: str
    PROJECTOR: str
    context_projector: str
    momentum_context_projector: str

    @property
    def is_momentum(self) -> bool:
        return isinstance(self, BaseMomentumMethod)

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__(cfg)  # the stock method builds its MLP head; replaced below
        online = self.context_projector
        momentum = self.momentum_context_projector if self.is_momentum else None
        stock = self.get_submodule(online)
        head = build_head(self.cfg, self.features_dim, method_tail(stock))
        self._replace(online, head)
        if momentum is not None:
            momentum_head = copy.deepcopy(head)
            self._replace(momentum, momentum_head)
            # DINO's EMA pair is the whole head (with `last_layer`), the others' the projector.
            pair = ("head", "momentum_head") if self.BASE_METHOD == "dino" else (online, momentum)
            initialize_momentum_params(self.get_submodule(pair[0]), self.get_submodule(pair[1]))

    @classmethod
    def add_and_assert_specific_cfg(cls, cfg: DictConfig) -> DictConfig:
        cfg = METHODS[cls.BASE_METHOD].add_and_assert_specific_cfg(cfg)
        cfg = projector_config(cfg, cls.PROJECTOR)
        HeadOptimizer.from_cfg(cfg)  # fail at configuration time, not at fit
        return cfg

    @property
    def learnable_params(self) -> list[dict[str, Any]]:
        """The stock groups, with the head in a group of its own when ``projector`` asks."""
        groups = super().learnable_params
        options = HeadOptimizer.from_cfg(self.cfg)
        head = self.get_submodule(self.context_projector)
        if options.is_default and not head_rules(head):
            return groups
        return split_head_group(groups, head, options, self.lr)

    def _replace(self, path: str, module: nn.Module) -> None:
        parent, _, name = path.rpartition(".")
        setattr(self.get_submodule(parent) if parent else self, name, module)


def make_variant(method: str, projector: str) -> type[BaseMethod]:
    """Build the class ``<Method><Projector>`` for ``METHODS[method]``."""
    stock = METHODS[method]
    momentum = issubclass(stock, BaseMomentumMethod)
    mixin = MomentumJointContextMixin if momentum else JointContextMixin
    online, momentum_path = (
        ("head.mlp", "momentum_head.mlp")
        if method == "dino"
        else ("projector", "momentum_projector")
    )
    name = stock.__name__ + "".join(part.title() for part in projector.split("_"))
    namespace = {
        "BASE_METHOD": method,
        "PROJECTOR": projector,
        "context_projector": online,
        "momentum_context_projector": momentum_path,
        # Backbone constructors receive cfg.method; give them the stock name.
        "_BACKBONES": {
            key: functools.partial(_backbone_for, method, ctor)
            for key, ctor in BaseMethod._BACKBONES.items()
        },
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"solo-learn's {stock.__name__} with the `{projector}` projection head.",
    }
    return type(name, (DeepFusionVariant, stock, mixin), namespace)
