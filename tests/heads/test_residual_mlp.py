"""The residual MLP head (heads/residual_mlp.py): the default transformer's trunk, no attention."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import torch.nn.functional as F

from solo_deepfusion.heads import (
    DEFAULT_PRESET,
    PRESETS,
    ResidualMLPProjector,
    build_projector,
    count_parameters,
    forward_flops,
    projector_entry,
)
from solo_deepfusion.heads.registry import ResidualMLPFields

TINY = {"dim": 32, "depth": 3, "ffn_dim": 64}


def tiny_head(**kwargs) -> ResidualMLPProjector:
    torch.manual_seed(0)
    return ResidualMLPProjector(24, 16, **{**TINY, **kwargs})


def trained_stats(head: ResidualMLPProjector) -> ResidualMLPProjector:
    """``head`` in eval mode with running BatchNorm statistics that are not the initial ones."""
    head.train()
    with torch.no_grad():
        for _ in range(3):
            head(torch.randn(32, 24) * 2 + 1)
    return head.eval()


def reference_forward(head: ResidualMLPProjector, x: torch.Tensor) -> torch.Tensor:
    """The head computed op by op in float64 from its parameters (dropout 0, GELU)."""
    p = {k: v.double() for k, v in head.state_dict().items()}
    h = x.double() @ p["in_proj.weight"].T + p["in_proj.bias"]
    for i in range(len(head.blocks)):
        pre = f"blocks.{i}."
        mean = h.mean(-1, keepdim=True)
        var = h.var(-1, unbiased=False, keepdim=True)
        n = (h - mean) / torch.sqrt(var + 1e-5) * p[pre + "norm.weight"] + p[pre + "norm.bias"]
        hidden = F.gelu(n @ p[pre + "ffn.0.weight"].T + p[pre + "ffn.0.bias"])
        h = h + hidden @ p[pre + "ffn.3.weight"].T + p[pre + "ffn.3.bias"]
    h = F.layer_norm(h, (h.shape[-1],), p["final_norm.weight"], p["final_norm.bias"], 1e-5)
    out = h @ p["out_proj.weight"].T + p["out_proj.bias"]
    if head.training:
        mean, var = out.mean(0), out.var(0, unbiased=False)
    else:
        mean, var = p["output_norm.running_mean"], p["output_norm.running_var"]
    return (out - mean) / torch.sqrt(var + 1e-5)


def test_defaults_are_the_default_transformers_trunk():
    """The registered fields, the module's defaults and the default preset's trunk agree."""
    fields = {f.name: f.default for f in dataclasses.fields(ResidualMLPFields)}
    signature = inspect.signature(ResidualMLPProjector).parameters
    assert fields == {name: signature[name].default for name in fields}
    preset = PRESETS[DEFAULT_PRESET]
    assert fields == {name: getattr(preset, name) for name in fields}
    entry = projector_entry("residual_mlp")
    assert entry.joint_context is False and entry.optimizer == {"lr_scale": 0.1}
    assert entry.fields == tuple(fields)


@pytest.mark.parametrize("output_norm", ["none", "batch"])
@pytest.mark.parametrize("tokens", [2, 7, 64])
def test_output_shape(tokens, output_norm):
    head = tiny_head(output_norm=output_norm)
    out = head(torch.randn(tokens, 24))
    assert out.shape == (tokens, 16) and out.isfinite().all()
    assert build_projector("residual_mlp", 24, 0, 16)(torch.randn(5, 24)).shape == (5, 16)


@pytest.mark.parametrize("output_norm", ["none", "batch"])
def test_permutation_equivariant_and_samples_do_not_interact(output_norm):
    """Without a BatchNorm, or with it in eval mode, each row is a function of its own input."""
    head = tiny_head(output_norm=output_norm)
    head = trained_stats(head) if output_norm == "batch" else head.train()
    x = torch.randn(12, 24)
    out = head(x)
    order = torch.randperm(12)
    torch.testing.assert_close(head(x[order]), out[order])
    changed = x.clone()
    changed[5] = torch.randn(24) * 3
    moved = head(changed)
    assert not torch.allclose(moved[5], out[5])
    torch.testing.assert_close(moved[torch.arange(12) != 5], out[torch.arange(12) != 5])


@pytest.mark.parametrize("training", [False, True])
def test_matches_a_float64_reference(training):
    head = trained_stats(tiny_head()).double().train(training)
    x = torch.randn(10, 24, dtype=torch.float64)
    torch.testing.assert_close(head(x), reference_forward(head, x))


def test_is_the_no_mixing_control_without_its_attention_branch():
    """The default transformer with ``mixing=none`` and its attention output projection zeroed
    computes this head, given the same trunk weights: all that is left of its blocks is
    ``x + FFN(LayerNorm(x))``."""
    torch.manual_seed(0)
    control = build_projector("transformer", 24, 0, 16, mixing="none", heads=4, **TINY)
    head = tiny_head()
    trunk = {
        k.replace("norm2", "norm"): v
        for k, v in control.state_dict().items()
        if ".attn." not in k and ".norm1." not in k
    }
    head.load_state_dict(trunk)
    with torch.no_grad():
        for block in control.blocks:
            block.attn.proj.weight.zero_()
            block.attn.proj.bias.zero_()
    x = torch.randn(12, 24)
    for mode in (True, False):  # the output BatchNorm over the same rows, or its statistics
        torch.testing.assert_close(
            head.train(mode)(x), control.train(mode)(x, num_views=2), rtol=1e-5, atol=1e-5
        )


def test_parameter_count_is_the_stable_bn_transformers_less_its_attention():
    """Per block ``stable_bn`` also has qkv (dim -> 3 dim) and proj (dim -> dim), with biases,
    and a second LayerNorm: 4 dim^2 + 4 dim + 2 dim parameters that this head does not."""
    in_dim, out_dim = 512, 256
    head = build_projector("residual_mlp", in_dim, 2048, out_dim)
    transformer = build_projector("transformer", in_dim, 2048, out_dim, preset="stable_bn")
    d, depth, f = transformer.dim, len(transformer.blocks), 1024
    block = 2 * d + (d * f + f) + (f * d + d)  # LayerNorm, FFN
    formula = in_dim * d + d + depth * block + 2 * d + d * out_dim + out_dim
    assert count_parameters(head) == formula == 5_458_432
    attention = count_parameters(transformer.blocks[0].attn) + 2 * d  # + its norm1
    assert attention == 4 * d * d + 6 * d
    assert count_parameters(head) == count_parameters(transformer) - depth * attention
    assert forward_flops(head, 256) < forward_flops(transformer, 256, num_views=2)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 0}, r"dim must be a positive integer, got 0"),
        ({"dim": 32.0}, r"dim must be a positive integer, got 32.0"),
        ({"ffn_dim": True}, r"ffn_dim must be a positive integer, got True"),
        ({"depth": -1}, r"depth must be an integer >= 0, got -1"),
        ({"activation": "tanh"}, r"activation='tanh' is not supported; choose one of \['gelu'"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\), got 1.0"),
        ({"output_norm": "layer"}, r"output_norm='layer' .*\['batch', 'none'\]"),
    ],
)
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_projector("residual_mlp", 24, 0, 16, **kwargs)


def test_unknown_fields_are_named():
    with pytest.raises(ValueError, match=r"unknown residual_mlp field\(s\) \['heads'\]"):
        build_projector("residual_mlp", 24, 0, 16, heads=4)


@pytest.mark.parametrize("output_norm", ["none", "batch"])
def test_every_parameter_receives_a_gradient(output_norm):
    head = tiny_head(output_norm=output_norm, dropout=0.1).train()
    head(torch.randn(8, 24)).square().sum().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_depth_zero_and_a_tail():
    head = ResidualMLPProjector(24, 16, depth=0, tail=torch.nn.Tanh())
    assert len(head.blocks) == 0
    assert head(torch.randn(4, 24)).abs().max() < 1
