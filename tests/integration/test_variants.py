"""solo-learn variants: every method with the transformer head, the joint context, EMA heads."""

from __future__ import annotations

import copy

import pytest
import torch
from solo_fixtures import HOST_PROBLEM, fit, method_cfg, tiny_batch

if HOST_PROBLEM is not None:
    pytest.skip(HOST_PROBLEM, allow_module_level=True)

import lightning.pytorch as pl
from solo.methods import METHODS
from solo.methods.base import BaseMomentumMethod
from torch import nn

from solo_deepfusion.heads import MLPProjector, ResidualMLPProjector, TransformerProjector
from solo_deepfusion.solo import HEAD_METHODS, base_method, projectors, register, variant_name
from solo_deepfusion.solo.context import ContextProjector
from solo_deepfusion.solo.model import build_model
from solo_deepfusion.solo.param_groups import HEAD_GROUP
from solo_deepfusion.solo.variants import method_tail

SMALL = {"name": "transformer", "preset": "small", "depth": 2, "dim": 32, "heads": 4}


def head_of(model, momentum: bool = False) -> ContextProjector:
    path = model.momentum_context_projector if momentum else model.context_projector
    return model.get_submodule(path)


class GradientProbe(pl.Callback):
    """Records head parameters without a gradient at every optimizer step."""

    def __init__(self) -> None:
        self.missing: list[list[str]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        head = head_of(pl_module)
        self.missing.append([n for n, p in head.named_parameters() if p.grad is None])


def test_register_adds_every_variant_once():
    names = register()
    assert register() == names
    # every registered head, `mlp` included (its variant: the stock layout with a field changed)
    assert len(names) == len(projectors()) * len(HEAD_METHODS) and len(HEAD_METHODS) == 18
    assert "mae_transformer" not in METHODS and "linear_transformer" not in METHODS
    assert METHODS["simclr_transformer"].__mro__[2].__name__ == "SimCLR"


@pytest.mark.parametrize("context", ["joint", "view"])
@pytest.mark.parametrize("method", HEAD_METHODS)
def test_every_variant_trains_two_steps(method, context):
    torch.manual_seed(0)
    model = build_model(method_cfg(variant_name(method, "transformer"), **SMALL, context=context))
    head = head_of(model)
    assert isinstance(head.head, TransformerProjector)
    assert head.head.out_proj.out_features == model.cfg.method_kwargs.proj_output_dim
    before = copy.deepcopy(head.state_dict())
    probe = GradientProbe()
    fit(model, callbacks=[probe])
    assert probe.missing == [[], []]  # every head parameter, every step
    changed = [k for k, v in head.state_dict().items() if not torch.equal(v, before[k])]
    assert any(k.startswith("head.blocks.1.") for k in changed)


@pytest.mark.parametrize("method", ["simclr", "byol", "simsiam", "mocov3", "vibcreg", "dino"])
def test_mlp_matched_variant_trains(method):
    model = build_model(method_cfg(variant_name(method, "mlp_matched"), name="mlp_matched"))
    assert isinstance(head_of(model).head, MLPProjector)
    probe = GradientProbe()
    fit(model, callbacks=[probe])
    assert probe.missing == [[], []]


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_residual_mlp_variant_trains_per_crop(method):
    name = variant_name(method, "residual_mlp")
    assert name == f"{method}_residual_mlp" and base_method(name) == method
    cfg = method_cfg(name, name="residual_mlp", dim=32, depth=2, ffn_dim=64)
    model = build_model(cfg)
    head = head_of(model)
    assert isinstance(head.head, ResidualMLPProjector) and not head.joint
    (group,) = [g for g in model.learnable_params if g.get("name") == HEAD_GROUP]
    assert group["lr"] == pytest.approx(0.1 * model.lr)  # the registered default
    probe = GradientProbe()
    fit(model, callbacks=[probe])
    assert probe.missing == [[], []]


@pytest.mark.parametrize(
    ("method", "tail"),
    [("simsiam", "BatchNorm1d"), ("mocov3", "BatchNorm1d"), ("nnclr", "BatchNorm1d"),
     ("simclr", "Identity"), ("byol", "Identity"), ("dino", "Identity")],
)  # fmt: skip
def test_method_tail_is_kept(method, tail):
    model = build_model(method_cfg(variant_name(method, "transformer"), **SMALL))
    assert type(head_of(model).tail).__name__ == tail


def test_vibcreg_keeps_iternorm():
    cfg = method_cfg("vibcreg_transformer", **SMALL)
    cfg.method_kwargs.iternorm = True
    assert type(head_of(build_model(cfg)).tail).__name__ == "IterNorm"


def _count_calls(module: torch.nn.Module, calls: list) -> None:
    module.register_forward_hook(lambda m, args, out: calls.append((args[0], out)))


@pytest.mark.parametrize("method", ["simclr", "byol", "dino"])
def test_joint_context_projects_all_large_crops_at_once(method):
    model = build_model(method_cfg(variant_name(method, "transformer"), **SMALL))
    momentum = isinstance(model, BaseMomentumMethod)
    backbone_calls, head_calls, momentum_calls = [], [], []
    _count_calls(model.backbone, backbone_calls)
    _count_calls(head_of(model).head, head_calls)
    served = []
    _count_calls(head_of(model), served)
    if momentum:
        _count_calls(model.momentum_backbone, momentum_calls)
    batch = tiny_batch(8)
    model.training_step(batch, 0)

    assert len(backbone_calls) == 2  # one backbone pass per crop
    assert len(head_calls) == 1  # one head pass over both crops
    tokens, z = head_calls[0]
    feats = torch.cat([out for _, out in backbone_calls])
    assert torch.equal(tokens, feats)
    # what the method got for each crop is the joint output's rows
    assert [s[1].shape[0] for s in served] == [8, 8]
    tail = head_of(model).tail
    joint = tail(z) if isinstance(tail, torch.nn.Identity) else None
    if joint is not None:
        assert torch.equal(torch.cat([s[1] for s in served]), joint)
    if momentum:
        assert len(momentum_calls) == 2


def test_view_context_projects_each_crop_alone():
    model = build_model(method_cfg("simclr_transformer", **SMALL, context="view"))
    head_calls = []
    _count_calls(head_of(model).head, head_calls)
    model.training_step(tiny_batch(8), 0)
    assert [tokens.shape[0] for tokens, _ in head_calls] == [8, 8]


def test_small_crops_join_the_joint_context_on_request():
    for small_crops, expected in ((True, [32]), (False, [16, 8, 8])):
        model = build_model(
            method_cfg("simclr_transformer", num_small_crops=2, **SMALL, small_crops=small_crops)
        )
        head_calls = []
        _count_calls(head_of(model).head, head_calls)
        model.training_step(tiny_batch(8, num_small=2), 0)
        assert [tokens.shape[0] for tokens, _ in head_calls] == expected


class EMAProbe(pl.Callback):
    def __init__(self) -> None:
        self.snapshots = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.snapshots.append(
            (
                pl_module.momentum_updater.cur_tau,
                copy.deepcopy(head_of(pl_module).state_dict()),
                copy.deepcopy(head_of(pl_module, momentum=True).state_dict()),
            )
        )


@pytest.mark.parametrize("method", ["byol", "mocov2plus", "dino"])
def test_momentum_head_is_an_identical_ema_copy(method):
    model = build_model(method_cfg(variant_name(method, "transformer"), **SMALL))
    online, target = head_of(model), head_of(model, momentum=True)
    assert isinstance(target.head, TransformerProjector)
    assert online.state_dict().keys() == target.state_dict().keys()
    for p_online, p_target in zip(online.parameters(), target.parameters(), strict=True):
        assert torch.equal(p_online, p_target) and not p_target.requires_grad
    probe = EMAProbe()
    fit(model, steps=3, callbacks=[probe])
    (tau, _, target0), (_, online1, target1) = probe.snapshots[1], probe.snapshots[2]
    weights = [n for n, _ in target.named_parameters()]
    for name in weights:
        expected = tau * target0[name] + (1 - tau) * online1[name]
        torch.testing.assert_close(target1[name], expected)
    assert any(not torch.equal(target1[n], target0[n]) for n in weights)


@pytest.mark.parametrize("method", ["simclr", "byol", "dino"])
def test_checkpoint_loads_strictly_through_methods(method, tmp_path):
    name = variant_name(method, "transformer")
    cfg = method_cfg(name, **SMALL)
    model = build_model(cfg)
    trainer = fit(model, steps=1)
    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = METHODS[name].load_from_checkpoint(path, strict=True, cfg=cfg)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    # solo-learn's main_linear keeps keys containing "backbone"/"encoder": none may be the head's
    head_keys = [k for k in model.state_dict() if "projector" in k or "head." in k]
    assert head_keys and not any("backbone" in k or "encoder" in k for k in head_keys)


def test_variant_keeps_method_specific_backbones():
    cfg = method_cfg("mocov3_transformer", **SMALL)
    cfg.backbone = {"name": "vit_tiny", "kwargs": {"img_size": 16, "patch_size": 8}}
    model = build_model(cfg)
    assert type(model.backbone).__name__ == "VisionTransformerMoCo"  # not timm's default ViT


def test_projector_fields_are_validated():
    with pytest.raises(ValueError, match=r"unknown projector field\(s\) \['layers'\]"):
        build_model(method_cfg("simclr_transformer", name="transformer", layers=3))
    with pytest.raises(ValueError, match=r"mask='both'.*positives"):
        build_model(method_cfg("simclr_transformer", name="transformer", mask="both"))
    with pytest.raises(ValueError, match=r"projector.name='mlp' contradicts"):
        build_model(method_cfg("simclr_transformer", name="mlp"))


@pytest.mark.parametrize("projector", ["transformer", "mlp_matched"])
def test_the_default_preset_is_the_methods(projector):
    def preset(method, **fields):
        cfg = METHODS[variant_name(method, projector)].add_and_assert_specific_cfg(
            method_cfg(variant_name(method, projector), name=projector, **fields)
        )
        return cfg.projector.preset

    assert preset("byol") == preset("mocov3") == "stable_bn"
    # class-aware attention under SimCLR; not under BYOL
    assert preset("simclr") == "cosine_tied"
    head = build_model(method_cfg("simclr_transformer", name="transformer")).projector.head
    assert all(b.attn.tied and b.attn.logit_scale is not None for b in head.blocks)
    # an output BatchNorm would meet VICReg's variance term: its head removes the shared
    # direction where it arises
    assert preset("vicreg") == "stable_centred"
    assert preset("vicreg", preset="stable_bn") == "stable_bn"  # a user's choice stands
    head = build_model(method_cfg("vicreg_transformer", name="transformer")).projector.head
    assert isinstance(head.output_norm, torch.nn.Identity)
    assert isinstance(head.input_norm, torch.nn.BatchNorm1d)
    assert all(block.attn.centred for block in head.blocks)


def test_stem_option_decouples_stem_from_dataset():
    cfg = method_cfg("byol_transformer", **SMALL)
    cfg.backbone.stem = "imagenet"
    model = build_model(cfg)
    for backbone in (model.backbone, model.momentum_backbone):
        assert backbone.conv1.kernel_size == (7, 7)
        assert isinstance(backbone.maxpool, torch.nn.MaxPool2d)
    assert torch.equal(model.backbone.conv1.weight, model.momentum_backbone.conv1.weight)
    assert build_model(method_cfg("simclr", **{})).backbone.conv1.kernel_size == (3, 3)


def test_stem_is_drawn_the_same_whatever_the_head():
    weights = []
    for method in ("simclr", "simclr_transformer", "simclr_mlp_matched"):
        torch.manual_seed(0)
        cfg = method_cfg(method, **(SMALL if method.endswith("transformer") else {}))
        cfg.backbone.stem, cfg.seed = "imagenet", 5
        weights.append(build_model(cfg).backbone.conv1.weight)
    assert torch.equal(weights[0], weights[1]) and torch.equal(weights[0], weights[2])


def test_every_registered_head_is_a_variant_with_a_config_group_entry():
    """The registry drives the integration: variants, config keys and command-line group."""
    from hydra.core.config_store import ConfigStore

    from solo_deepfusion.heads import list_projectors, projector_entry
    from solo_deepfusion.solo.variants import OPTIMIZER_KEYS, projector_keys, projectors

    assert set(projectors()) == set(list_projectors()) and projectors()[0] == "mlp"
    repo = ConfigStore.instance().repo["projector"]
    for projector in projectors()[1:]:
        node = repo[f"{projector}.yaml"].node
        assert sorted(node) == sorted(projector_keys(projector))
        assert set(projector_entry(projector).fields) | set(OPTIMIZER_KEYS) <= set(node)
        assert all(variant_name(m, projector) in METHODS for m in HEAD_METHODS)
    # `mlp` alone is the stock method; its own fields, when set, select `<method>_mlp`
    assert dict(repo["mlp.yaml"].node) == {"name": "mlp", "layout": None, "output_norm": None}
    assert variant_name("simclr", "mlp", {"output_norm": None}) == "simclr"
    assert variant_name("simclr", "mlp", {"output_norm": "none", "layout": "simclr"}) == "simclr"
    assert variant_name("byol", "mlp", {"output_norm": "batch"}) == "byol_mlp" in METHODS


@pytest.mark.parametrize("method", ["simclr", "byol", "simsiam", "dino"])
def test_mlp_with_an_output_batchnorm_is_the_stock_layout_plus_it(method):
    """`--projector mlp projector.output_norm=batch`: the method's own MLP, the method's tail,
    and a BatchNorm1d without affine on the MLP's output (the fair control of `stable_bn`)."""
    torch.manual_seed(0)
    stock = build_model(method_cfg(method, name="mlp"))
    torch.manual_seed(0)
    model = build_model(method_cfg(f"{method}_mlp", name="mlp", output_norm="batch"))
    head = model.get_submodule(model.context_projector)
    stock_head = stock.get_submodule(model.context_projector)
    layers = [type(m) for m in head.head]
    assert layers[-1] is nn.BatchNorm1d and head.head[-1].weight is None
    stock_layers = [type(m) for m in stock_head]
    tail = method_tail(stock_head)
    assert layers[:-1] == stock_layers[: len(layers) - 1]
    assert type(head.tail) is (nn.Identity if tail is None else type(tail))
    shapes = [p.shape for p in head.parameters()]
    assert shapes == [p.shape for p in stock_head.parameters()]  # BatchNorm without affine


def test_every_variant_class_pickles_by_reference():
    import pickle

    for name in register():
        cls = METHODS[name]
        assert pickle.loads(pickle.dumps(cls)) is cls, name
