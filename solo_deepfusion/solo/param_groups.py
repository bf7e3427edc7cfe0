"""The head's own optimizer parameter group: ``projector.lr_scale``, ``weight_decay``, ``lars``.

solo-learn's methods list their parameters in ``learnable_params`` (groups that may carry their
own ``lr``, ``weight_decay`` or ``static_lr``); ``configure_optimizers`` then builds one
optimizer and one scheduler over them. A variant moves the head's parameters out of whichever
group held them (SimCLR's ``projector``, DINO's ``head``, ...) into a group of their own:

>>> options = HeadOptimizer(lr_scale=0.1, weight_decay=0.0)
>>> groups = split_head_group(model.learnable_params, model.projector, options, model.lr)

The scheduler scales every group's lr by the same factor, so the head follows the recipe's
warm-up and cosine decay at ``lr_scale`` times the lr of the group it came from (exactly so when
``scheduler.warmup_start_lr`` and ``scheduler.min_lr`` are 0; both are absolute lrs, the same
for every group). With ``HeadOptimizer()`` nothing is moved: the stock groups are used as they
are. Every ``<method>_<head>`` variant takes these keys; a head's registration may declare its
defaults (``register_projector(..., optimizer={"lr_scale": 0.1})``, as ``transformer`` does).
Parameters that a head's ``param_group_rules()`` names (a cosine-attention head's logit
scales, its q/k weights under ``qk_lr_scale``) get groups of their own, derived from the head's.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

from omegaconf import DictConfig
from solo.utils.misc import omegaconf_select
from torch import nn

from solo_deepfusion.heads.transformer import ParamGroupRule

HEAD_GROUP = "deepfusion_head"


@dataclass(frozen=True)
class HeadOptimizer:
    """How the head is optimised, relative to the recipe.

    Attributes:
        lr_scale: the head's lr is this times its stock group's lr (> 0).
        weight_decay: the head's weight decay; ``None`` keeps the recipe's.
        lars: ``False`` lets solo-learn's LARS (with ``clip_lr``) leave the head's update
            unscaled, i.e. momentum SGD with weight decay at the head's lr.
    """

    lr_scale: float = 1.0
    weight_decay: float | None = None
    lars: bool = True

    @classmethod
    def from_cfg(cls, cfg: DictConfig) -> HeadOptimizer:
        """Read and check ``projector.<field>`` (``None``: the default); one-line errors."""
        values = {f.name: omegaconf_select(cfg, f"projector.{f.name}", None) for f in fields(cls)}
        options = cls(**{k: v for k, v in values.items() if v is not None})
        scale, decay = options.lr_scale, options.weight_decay
        if isinstance(scale, bool) or not isinstance(scale, int | float):
            raise ValueError(f"projector.lr_scale must be a number > 0, got {scale!r}")
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"projector.lr_scale must be a number > 0, got {scale!r}")
        if decay is not None and (
            isinstance(decay, bool)
            or not isinstance(decay, int | float)
            or not (math.isfinite(decay) and decay >= 0)
        ):
            raise ValueError(f"projector.weight_decay must be a number >= 0, got {decay!r}")
        if not isinstance(options.lars, bool):
            raise ValueError(f"projector.lars={options.lars!r}; choose one of [False, True]")
        if not options.lars:
            optimizer = omegaconf_select(cfg, "optimizer.name", None)
            if optimizer != "lars" or not omegaconf_select(cfg, "optimizer.kwargs.clip_lr", False):
                raise ValueError(
                    "projector.lars=false needs optimizer.name=lars with "
                    f"optimizer.kwargs.clip_lr=true (got optimizer.name={optimizer!r})"
                )
        return options

    @property
    def is_default(self) -> bool:
        return self == HeadOptimizer()


def split_head_group(
    groups: Iterable[dict[str, Any]], head: nn.Module, options: HeadOptimizer, lr: float
) -> list[dict[str, Any]]:
    """``groups`` with ``head``'s parameters moved into one group named :data:`HEAD_GROUP`.

    The new group keeps the settings of the group the head came from, then applies
    ``options``; ``lr`` is the optimizer's default (for groups that set none).
    """
    head_ids = {id(p) for p in head.parameters()}
    out: list[dict[str, Any]] = []
    head_params: list[nn.Parameter] = []
    owner: dict[str, Any] | None = None
    for group in groups:
        params = list(group["params"])
        mine = [p for p in params if id(p) in head_ids]
        rest = [p for p in params if id(p) not in head_ids]
        if mine:
            if owner is not None and _settings(owner) != _settings(group):
                raise ValueError("the head's parameters sit in groups with different settings")
            owner = group
            head_params += mine
        if rest:
            out.append({**group, "params": rest})
    if owner is None or len(head_params) != len(head_ids):
        raise ValueError("learnable_params does not hold every parameter of the head")
    settings = _settings(owner)
    if settings.get("static_lr") and options.lr_scale != 1:
        raise ValueError("projector.lr_scale cannot scale a head whose group has static_lr")
    head_group = {**settings, "name": HEAD_GROUP, "params": head_params}
    head_group["lr"] = options.lr_scale * settings.get("lr", lr)
    if options.weight_decay is not None:
        head_group["weight_decay"] = options.weight_decay
    if not options.lars:
        # LARS scales an update by min(eta * trust ratio / lr, 1) under clip_lr; an infinite
        # eta makes that factor 1 (solo/utils/lars.py), i.e. plain momentum SGD.
        head_group["eta"] = math.inf
    return [*out, *_rule_groups(head_group, head)]


def head_rules(head: nn.Module) -> list[tuple[ParamGroupRule, list[nn.Parameter]]]:
    """Every :class:`ParamGroupRule` a module of ``head`` declares (``param_group_rules()``),
    with the parameters of that module its pattern matches."""
    found = []
    for module in head.modules():
        declared = getattr(module, "param_group_rules", None)
        for rule in declared() if declared is not None else ():
            params = [p for n, p in module.named_parameters() if fnmatch.fnmatch(n, rule.pattern)]
            if params:
                found.append((rule, params))
    return found


def _rule_groups(head_group: dict[str, Any], head: nn.Module) -> list[dict[str, Any]]:
    """``head_group``, less the parameters its head's rules claim, and one group per rule.

    A rule's group is the head's with the rule's lr multiplier; ``decay=False`` sets weight
    decay 0 and ``exclude_bias_n_norm``, which makes solo-learn's LARS leave a 1-D parameter
    unadapted (LARS would still adapt a 2-D one).
    """
    claimed: set[int] = set()
    groups = []
    for rule, params in head_rules(head):
        mine = [p for p in params if id(p) not in claimed]
        claimed |= {id(p) for p in mine}
        group = {**head_group, "name": f"{HEAD_GROUP}_{rule.name}", "params": mine}
        group["lr"] = rule.lr_scale * head_group["lr"]
        if not rule.decay:
            group.update(weight_decay=0.0, exclude_bias_n_norm=True)
        groups.append(group)
    rest = [p for p in head_group["params"] if id(p) not in claimed]
    return [{**head_group, "params": rest}, *groups] if rest else groups


def _settings(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k not in ("params", "name")}
