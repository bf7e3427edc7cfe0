"""The head's own optimizer group (projector.lr_scale, weight_decay, lars), real solo-learn."""

from __future__ import annotations

import math

import pytest
import torch
from solo_fixtures import HOST_PROBLEM, fit, method_cfg

if HOST_PROBLEM is not None:
    pytest.skip(HOST_PROBLEM, allow_module_level=True)

import lightning.pytorch as pl
from solo.methods import METHODS

from solo_deepfusion.solo import HEAD_METHODS
from solo_deepfusion.solo.model import build_model
from solo_deepfusion.solo.param_groups import HEAD_GROUP

SMALL = {"name": "transformer", "preset": "small", "depth": 1, "dim": 32, "heads": 4}
LR, CLASSIFIER_LR = 0.05, 0.1


class LrRecorder(pl.Callback):
    """Every group's (name, lr, weight_decay) before each optimizer step."""

    def __init__(self) -> None:
        self.steps: list[dict[str, tuple[float, float]]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.steps.append(
            {g.get("name", "?"): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups}
        )


def scheduled_cfg(method: str, **projector):
    cfg = method_cfg(method, **projector)
    cfg.scheduler = {
        "name": "warmup_cosine",
        "warmup_epochs": 0.5,
        "warmup_start_lr": 0.0,
        "min_lr": 0.0,
        "interval": "step",
    }
    cfg.optimizer.exclude_bias_n_norm_wd = True
    return cfg


@pytest.mark.parametrize("method", HEAD_METHODS)
def test_head_group_follows_the_schedule_at_its_scale(method):
    """At every step: head = 0.1 x its stock group's lr; every other group as in the recipe."""
    torch.manual_seed(0)
    stock = build_model(method_cfg(f"{method}_transformer", **SMALL)).learnable_params
    static = {g["name"] for g in stock if g.get("static_lr")}
    scale = {g["name"]: g.get("lr", LR) / LR for g in stock if "name" in g}
    cfg = scheduled_cfg(f"{method}_transformer", **SMALL, lr_scale=0.1, weight_decay=0.25)
    model = build_model(cfg)
    head_ids = {id(p) for p in model.get_submodule(model.context_projector).parameters()}
    recorder = LrRecorder()
    fit(model, steps=4, callbacks=[recorder])

    optimizer = model.optimizers().optimizer
    for group in optimizer.param_groups:  # the head's parameters all, and only, in its groups
        in_head = [id(p) in head_ids for p in group["params"]]
        assert all(in_head) if group.get("name", "").startswith(HEAD_GROUP) else not any(in_head)
    backbone_lrs = [step["backbone"][0] for step in recorder.steps]
    assert len({lr for lr in backbone_lrs if lr > 0}) >= 2  # warm-up and decay both seen
    for index, step in enumerate(recorder.steps):
        base = step["backbone"][0]
        assert step[HEAD_GROUP] == (pytest.approx(0.1 * base, rel=1e-9), 0.25)
        assert step[f"{HEAD_GROUP}_no_decay"] == (pytest.approx(0.1 * base, rel=1e-9), 0)
        assert step["classifier"][0] == pytest.approx(base * CLASSIFIER_LR / LR, rel=1e-9)
        for name, (lr, _) in step.items():
            stock_name = name.removesuffix("_no_decay")
            if stock_name.startswith(HEAD_GROUP) or stock_name == "?":
                continue
            if stock_name in static:
                # solo-learn patches static_lr in after the scheduler's constructor set every
                # group to warmup_start_lr, so a static group has it at step 0 (stock too)
                assert lr == (LR if index else 0.0), name
            else:
                assert lr == pytest.approx(base * scale[stock_name], rel=1e-9), name


def test_the_transformer_head_defaults_to_a_tenth_of_its_groups_lr():
    """``transformer`` moves its head to a group at 0.1 x lr by default; ``lr_scale=1`` and the
    ``mlp_matched`` twin keep the stock groups as they are."""
    stock = build_model(method_cfg("dino"))
    stock_names = [g.get("name") for g in stock.learnable_params]
    default = build_model(method_cfg("dino_transformer", **SMALL))
    assert default.cfg.projector.lr_scale == 0.1
    head_group = next(g for g in default.learnable_params if g.get("name") == HEAD_GROUP)
    assert head_group["lr"] == pytest.approx(0.1 * default.lr)
    for model in (
        build_model(method_cfg("dino_transformer", **SMALL, lr_scale=1.0)),
        build_model(method_cfg("dino_mlp_matched", preset="small")),
    ):
        assert [g.get("name") for g in model.learnable_params] == stock_names


def test_lars_off_gives_the_head_a_plain_momentum_sgd_step():
    """LARS scales the backbone's update; with projector.lars=false the head's is unscaled."""
    torch.manual_seed(0)
    cfg = method_cfg("simclr_transformer", **SMALL, lars=False, lr_scale=0.5)
    cfg.optimizer.update(
        name="lars",
        lr=0.4,
        weight_decay=1e-4,
        exclude_bias_n_norm_wd=True,
        kwargs={"momentum": 0.9, "eta": 0.02, "clip_lr": True, "exclude_bias_n_norm": True},
    )
    model = build_model(cfg)
    optimizer = model.configure_optimizers()  # scheduler.name=none: the optimizer alone
    head = model.get_submodule(model.context_projector).head
    weights = {"head": head.in_proj.weight, "backbone": model.backbone.conv1.weight}
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = {k: w.detach().clone() for k, w in weights.items()}
    optimizer.step()
    sgd = {
        k: before[k] - lr * (w.grad + 1e-4 * before[k])
        for k, w, lr in (("head", weights["head"], 0.2), ("backbone", weights["backbone"], 0.4))
    }
    torch.testing.assert_close(weights["head"].detach(), sgd["head"])
    assert not torch.allclose(weights["backbone"].detach(), sgd["backbone"])
    head_group = next(g for g in optimizer.param_groups if g["name"] == HEAD_GROUP)
    assert head_group["lr"] == 0.2 and math.isinf(head_group["eta"])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"lr_scale": 0}, r"projector.lr_scale must be a number > 0, got 0"),
        ({"lr_scale": "fast"}, r"projector.lr_scale must be a number > 0, got 'fast'"),
        ({"weight_decay": -1.0}, r"projector.weight_decay must be a number >= 0, got -1.0"),
        ({"lars": "maybe"}, r"projector.lars='maybe'; choose one of \[False, True\]"),
        ({"lars": False}, r"projector.lars=false needs optimizer.name=lars"),
    ],
)
def test_bad_head_optimizer_fields_name_the_field(fields, message):
    cfg = method_cfg("simclr_transformer", **SMALL, **fields)
    with pytest.raises(ValueError, match=message) as err:
        METHODS["simclr_transformer"].add_and_assert_specific_cfg(cfg)
    assert "\n" not in str(err.value)


def test_logit_scales_and_q_k_get_groups_of_their_own():
    """Cosine logits' scales: no weight decay, no LARS adaptation; q/k at qk_lr_scale x the
    head's lr. Even at ``lr_scale=1``, where the rest of the head keeps the stock settings."""
    torch.manual_seed(0)
    fields = {**SMALL, "attention_logits": "cosine", "qk_lr_scale": 10.0}
    cfg = method_cfg("simclr_transformer", **fields, lr_scale=1.0)
    cfg.optimizer.update(
        name="lars",
        lr=0.4,
        weight_decay=1e-4,
        kwargs={"momentum": 0.9, "eta": 0.02, "clip_lr": True, "exclude_bias_n_norm": False},
    )
    model = build_model(cfg)
    optimizer = model.configure_optimizers()
    groups = {g["name"]: g for g in optimizer.param_groups}
    attn = model.get_submodule(model.context_projector).head.blocks[0].attn
    scales, qk = groups[f"{HEAD_GROUP}_logit_scale"], groups[f"{HEAD_GROUP}_qk"]
    assert [id(p) for p in scales["params"]] == [id(attn.logit_scale)]
    assert {id(p) for p in qk["params"]} == {id(attn.qk.weight), id(attn.qk.bias)}
    assert groups[HEAD_GROUP]["lr"] == 0.4 and qk["lr"] == pytest.approx(4.0)
    assert scales["weight_decay"] == 0 and scales["exclude_bias_n_norm"]
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    before = attn.logit_scale.detach().clone()
    optimizer.step()  # plain momentum SGD: neither decayed nor LARS-scaled
    torch.testing.assert_close(attn.logit_scale.detach(), before - 0.4 * attn.logit_scale.grad)
