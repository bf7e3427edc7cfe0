"""The Deep Fusion head (heads/transformer.py): shapes, masks, a float64 reference, DDP."""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from solo_deepfusion.heads import (
    DEFAULT_PRESET,
    MASKS,
    PRESETS,
    TransformerProjector,
    build_projector,
)
from solo_deepfusion.heads.diagnostics import output_cosine
from solo_deepfusion.heads.transformer import NonFiniteOutputError, attention_mask

TINY = {"dim": 32, "depth": 2, "heads": 4, "ffn_dim": 64}


def tiny_head(**kwargs) -> TransformerProjector:
    torch.manual_seed(0)
    return TransformerProjector(24, 16, **{**TINY, **kwargs})


def reference_forward(head: TransformerProjector, x: torch.Tensor, num_views: int):
    """The head computed naively in float64: explicit softmax(QK^T/sqrt(d)) V per head."""
    head = head.double()
    x = x.double()
    tokens, per_view = x.shape[0], x.shape[0] // num_views
    sample = torch.arange(tokens) % per_view
    allowed = torch.ones(tokens, tokens, dtype=torch.bool)
    if head.mask == "self":
        allowed = ~torch.eye(tokens, dtype=torch.bool)
    elif head.mask == "positives":
        allowed = sample[:, None] != sample[None, :]
    maps = []
    h = head.in_proj(x)
    if isinstance(head.input_norm, nn.LayerNorm):
        h = nn.functional.layer_norm(
            h, (h.shape[-1],), head.input_norm.weight, head.input_norm.bias, head.input_norm.eps
        )
    elif isinstance(head.input_norm, nn.BatchNorm1d):  # eval mode: the running statistics
        bn = head.input_norm
        h = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    for block in head.blocks:
        attn = block.attn
        inp = block.norm1(h) if block.pre_norm else h
        if hasattr(attn, "qkv"):
            q, k, v = attn.qkv(inp).chunk(3, dim=-1)
        elif attn.tied:
            q, k, v = attn.qk(inp), attn.qk(inp), attn.v(inp)
        else:
            (q, k), v = attn.qk(inp).chunk(2, dim=-1), attn.v(inp)
        hd = q.shape[-1] // attn.heads
        outs, layer_maps = [], []
        for i in range(attn.heads):
            qi, ki, vi = (t[:, i * hd : (i + 1) * hd] for t in (q, k, v))
            if isinstance(attn.q_norm, nn.LayerNorm):  # per-head LayerNorm, written out
                qi, ki = (
                    (t - t.mean(1, keepdim=True))
                    / torch.sqrt(t.var(1, unbiased=False, keepdim=True) + ln.eps)
                    * ln.weight
                    + ln.bias
                    for t, ln in ((qi, attn.q_norm), (ki, attn.k_norm))
                )
            if attn.logit_scale is None:
                scores = (qi @ ki.T) / math.sqrt(hd)
            else:  # cosine similarities times the head's scale, clamped at 100
                cosine = (qi / qi.norm(dim=1, keepdim=True)) @ (ki / ki.norm(dim=1, keepdim=True)).T
                scores = min(math.exp(attn.logit_scale[i].item()), 100.0) * cosine
            scores = scores.masked_fill(~allowed, float("-inf"))
            weights = torch.exp(scores - scores.max(dim=1, keepdim=True).values)
            weights = weights / weights.sum(dim=1, keepdim=True)
            uniform = allowed.double() / allowed.sum(dim=1, keepdim=True)
            if attn.mixing == "mean":
                weights = uniform
            elif attn.mixing == "none":
                weights = torch.eye(tokens, dtype=torch.double)
            layer_maps.append(weights)
            outs.append((weights - uniform) @ vi if attn.centred else weights @ vi)
        attended = attn.proj(torch.cat(outs, dim=1))
        skip = 1.0 if block.residual else 0.0
        if block.pre_norm:
            h = skip * h + attended
            h = skip * h + block.ffn(block.norm2(h))
        else:
            h = block.norm1(skip * h + attended)
            h = block.norm2(skip * h + block.ffn(h))
        maps.append(torch.stack(layer_maps))
    out = head.out_proj(head.final_norm(h))
    if isinstance(head.output_norm, nn.BatchNorm1d):  # eval mode, no affine
        bn = head.output_norm
        out = (out - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps)
    return out, maps


def randomize_norms(head: nn.Module) -> nn.Module:
    """Non-trivial norm affines (and BatchNorm statistics), so the reference also checks where
    each one applies."""
    g = torch.Generator().manual_seed(3)
    for module in head.modules():
        if isinstance(module, nn.LayerNorm | nn.BatchNorm1d) and module.weight is not None:
            module.weight.data = 1 + 0.5 * torch.randn(module.weight.shape, generator=g)
            module.bias.data = 0.5 * torch.randn(module.bias.shape, generator=g)
        if isinstance(module, nn.BatchNorm1d):
            module.running_mean = torch.randn(module.running_mean.shape, generator=g)
            module.running_var = 0.5 + torch.rand(module.running_var.shape, generator=g)
        if getattr(module, "logit_scale", None) is not None:  # a scale per head, one clamped
            scales = torch.tensor([2.0, 10.0, 40.0, 500.0])[: module.heads]
            module.logit_scale.data = scales.log()
    return head


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_to_rank_order(t: torch.Tensor, world: int, views: int) -> torch.Tensor:
    """Rows of a view-major global batch, regrouped rank by rank (each rank view-major)."""
    per_rank = t.shape[0] // (world * views)
    chunks = t.view(views, world, per_rank, *t.shape[1:])
    return chunks.transpose(0, 1).reshape(t.shape)


def _ddp_worker(rank: int, world: int, port: int, fields: dict, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        views, per_rank = 2, 3
        head = nn.parallel.DistributedDataParallel(tiny_head(**fields))
        x_global, w_global = _global_batch(world, views, per_rank)
        rows = slice(rank * views * per_rank, (rank + 1) * views * per_rank)
        x = _global_to_rank_order(x_global, world, views)[rows].clone().requires_grad_()
        w = _global_to_rank_order(w_global, world, views)[rows]
        out = head(x, num_views=views)
        (out * w).sum().backward()
        grads = {n: p.grad * world for n, p in head.module.named_parameters()}  # DDP averages
        torch.save((out.detach(), x.grad, grads), os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _global_batch(world: int, views: int, per_rank: int):
    g = torch.Generator().manual_seed(7)
    tokens = world * views * per_rank
    return torch.randn(tokens, 24, generator=g), torch.randn(tokens, 16, generator=g)


@pytest.mark.parametrize("num_views", [1, 2, 3])
@pytest.mark.parametrize("return_attention", [False, True])
def test_output_and_map_shapes(num_views, return_attention):
    head = tiny_head()
    x = torch.randn(num_views * 5, 24)
    result = head(x, num_views=num_views, return_attention=return_attention)
    out, maps = result if return_attention else (result, None)
    assert out.shape == (num_views * 5, 16)
    if return_attention:
        assert len(maps) == 2
        assert all(m.shape == (4, num_views * 5, num_views * 5) for m in maps)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_the_documented_shapes(preset):
    head = build_projector("transformer", 512, 2048, 256, preset=preset)
    config = PRESETS[preset]
    assert head.dim == config.dim and len(head.blocks) == config.depth
    assert head.blocks[0].attn.heads == config.heads
    assert head.blocks[0].ffn[0].out_features == config.ffn_dim
    assert head(torch.randn(8, 512), num_views=2).shape == (8, 256)


# Checkpoints name their preset, so a published preset's fields may never change: every field
# is written out, so a new default of TransformerHeadConfig cannot move a preset unseen.
_SHARED = {
    "activation": "gelu",
    "dropout": 0.0,
    "context": "joint",
    "input_norm": "none",
    "output_norm": "none",
    "qk_norm": False,
    "centred_attention": False,
    "mixing": "attention",
    "attention_logits": "dot",
    "logit_scale_init": 10.0,
    "qk_init": "xavier",
    "qk_lr_scale": 1.0,
    "residual": True,
    "block_norm": "layer",
    "gather_distributed": True,
}
PAPER_SIZE = {"dim": 256, "depth": 10, "heads": 16, "ffn_dim": 1024}
PUBLISHED_PRESETS = {
    "paper": {**_SHARED, **PAPER_SIZE, "norm": "post", "mask": "none"},  # the authors' setting
    "small": {**_SHARED, "dim": 128, "depth": 4, "heads": 4, "ffn_dim": 512, "norm": "post",
              "mask": "none"},
    "stable": {**_SHARED, **PAPER_SIZE, "norm": "pre", "mask": "positives"},
    "stable_bn": {**_SHARED, **PAPER_SIZE, "norm": "pre", "mask": "positives",
                  "output_norm": "batch"},
    "stable_centred": {**_SHARED, **PAPER_SIZE, "norm": "pre", "mask": "positives",
                       "input_norm": "batch", "centred_attention": True},
    "cosine_tied": {**_SHARED, **PAPER_SIZE, "norm": "pre", "mask": "positives",
                    "output_norm": "batch", "attention_logits": "cosine", "qk_init": "tied"},
}  # fmt: skip


@pytest.mark.parametrize("preset", sorted(PUBLISHED_PRESETS))
def test_published_presets_never_change(preset):
    assert dataclasses.asdict(PRESETS[preset]) == PUBLISHED_PRESETS[preset]


def test_the_default_head_is_the_stable_bn_preset():
    assert DEFAULT_PRESET == "stable_bn"
    head = build_projector("transformer", 512, 2048, 256)
    assert [b.pre_norm for b in head.blocks] == [True] * 10
    assert head.mask == "positives"
    out = head(torch.randn(32, 512) + 5.0)  # in train mode: centred over the batch
    torch.testing.assert_close(out.mean(0), torch.zeros(256), rtol=0, atol=1e-4)


@pytest.mark.parametrize("mask", MASKS)
def test_permutation_equivariance_over_samples(mask):
    head = tiny_head(mask=mask).eval()
    views, per_view = 2, 6
    x = torch.randn(views * per_view, 24)
    perm = torch.randperm(per_view)
    # the same sample permutation in every view keeps the view-major layout
    token_perm = torch.cat([perm + v * per_view for v in range(views)])
    out = head(x, num_views=views)
    out_perm = head(x[token_perm], num_views=views)
    torch.testing.assert_close(out_perm, out[token_perm], rtol=1e-5, atol=1e-5)


def test_unmasked_head_is_equivariant_to_any_token_permutation():
    head = tiny_head().eval()
    x = torch.randn(10, 24)
    perm = torch.randperm(10)
    torch.testing.assert_close(head(x)[perm], head(x[perm]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("num_views", [1, 2])
def test_masked_entries_get_exactly_zero_and_rows_sum_to_one(mask, num_views):
    per_view = 5
    head = tiny_head(mask=mask)
    _, maps = head(
        torch.randn(num_views * per_view, 24), num_views=num_views, return_attention=True
    )
    tokens = num_views * per_view
    sample = torch.arange(tokens) % per_view
    same_token = torch.eye(tokens, dtype=torch.bool)
    same_sample = sample[:, None] == sample[None, :]
    for layer in maps:
        torch.testing.assert_close(layer.sum(-1), torch.ones(4, tokens))
        if mask == "self":
            assert torch.all(layer[:, same_token] == 0)
            assert torch.all(layer[:, ~same_token] > 0)
        elif mask == "positives":
            assert torch.all(layer[:, same_sample] == 0)
            assert torch.all(layer[:, ~same_sample] > 0)
        else:
            assert torch.all(layer > 0)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize(
    "stability",
    [
        {},
        {"input_norm": True},
        {"input_norm": "batch"},
        {"qk_norm": True},
        {"input_norm": True, "qk_norm": True},
        {"output_norm": "batch"},
        {"centred_attention": True},
        {"centred_attention": True, "input_norm": "batch"},
        {"mixing": "mean"},
        {"mixing": "none"},
        {"mixing": "mean", "output_norm": "batch", "qk_norm": True},
        {"attention_logits": "cosine"},
        {"attention_logits": "cosine", "qk_norm": True, "qk_init": "tied"},
        {"qk_init": "identity"},
        {"qk_init": "tied"},
        {"qk_lr_scale": 10.0},
        {"residual": False},
        {"block_norm": "batch"},
        {"residual": False, "block_norm": "batch", "activation": "relu"},
    ],
)
def test_matches_naive_float64_reference(mask, norm, stability):
    fields = {"mask": mask, "norm": norm, **stability}
    head = randomize_norms(tiny_head(**fields)).eval()
    x = 3 * torch.randn(12, 24)
    reference = randomize_norms(tiny_head(**fields)).eval()
    expected, expected_maps = reference_forward(reference, x, 2)
    fused = head(x, num_views=2)
    explicit, maps = head(x, num_views=2, return_attention=True)
    for out in (fused, explicit):
        rel = (out.double() - expected).norm() / expected.norm()
        assert rel < 1e-5
    for got, want in zip(maps, expected_maps, strict=True):
        # float32 maps: cosine logits at scale 10 amplify the residual stream's rounding, up
        # to 1.7e-5 on AMD EPYC's kernels (a wrong mask or scale is off by 1e-2 or more)
        assert (got.double() - want).abs().max() < 5e-5


@pytest.mark.parametrize("mask", MASKS)
def test_centred_attention_adds_nothing_where_attention_is_uniform(mask):
    """Uniform attention gives every token the batch mean of the values; centred, it gives
    nothing, so a token moves only by how its attention departs from uniform."""
    x = 5 + torch.randn(12, 24)  # non-negative-like features: one shared direction
    for centred in (False, True):
        head = tiny_head(mask=mask, centred_attention=centred).eval()
        block = head.blocks[0]
        block.attn.qkv.weight.data[:32] = 0  # queries 0: every allowed key scores the same
        block.attn.qkv.bias.data[:32] = 0
        allowed = attention_mask(mask, 12, 2, 0, 1, x.device)
        with torch.no_grad():
            attended, _ = block.attn(head.in_proj(x), allowed, need_weights=False)
            branch = attended - block.attn.proj.bias
        if centred:
            torch.testing.assert_close(branch, torch.zeros_like(branch), rtol=0, atol=1e-5)
        else:
            assert output_cosine(branch) > 0.99  # the same batch mean in every token


def test_attention_maps_do_not_change_the_output():
    head = tiny_head().eval()
    x = torch.randn(9, 24)
    torch.testing.assert_close(head(x), head(x, return_attention=True)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("stability", [False, True])
def test_every_parameter_receives_a_gradient(norm, mask, stability):
    flags = {"input_norm": stability, "qk_norm": stability, "centred_attention": stability}
    flags["output_norm"] = "batch" if stability else "none"
    head = tiny_head(norm=norm, mask=mask, tail=nn.BatchNorm1d(16), **flags)
    head(torch.randn(8, 24), num_views=2).square().sum().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize(
    "regime",
    [
        {"attention_logits": "cosine"},
        {"qk_init": "identity"},
        {"qk_init": "tied", "attention_logits": "cosine"},
        {"qk_lr_scale": 0.1},
        {"residual": False, "block_norm": "batch", "activation": "relu"},
    ],
)
def test_every_parameter_of_a_regime_receives_a_gradient(norm, regime):
    head = tiny_head(norm=norm, mask="positives", **regime)
    head(torch.randn(8, 24), num_views=2).square().sum().backward()
    missing = [n for n, p in head.named_parameters() if p.grad is None or not p.grad.any()]
    assert missing == []


def test_seeded_construction_and_forward_are_deterministic():
    x = torch.randn(8, 24)
    torch.manual_seed(3)
    a = build_projector("transformer", 24, 0, 16, preset="small", dropout=0.1)
    torch.manual_seed(3)
    b = build_projector("transformer", 24, 0, 16, preset="small", dropout=0.1)
    torch.manual_seed(4)
    out_a = a(x)
    torch.manual_seed(4)
    torch.testing.assert_close(b(x), out_a, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"dim": 30, "heads": 4}, r"dim=30 must be divisible by heads=4"),
        ({"context": "global"}, r"context='global'.*\['joint', 'view'\]"),
        ({"mask": "diag"}, r"mask='diag'.*\['none', 'positives', 'self'\]"),
        ({"norm": "sandwich"}, r"norm='sandwich'.*\['post', 'pre'\]"),
        ({"activation": "tanh"}, r"activation='tanh'"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\)"),
        ({"qk_norm": "yes"}, r"qk_norm='yes'.*\[False, True\]"),
        ({"centred_attention": 1}, r"centred_attention=1.*\[False, True\]"),
        ({"ffn_dim": 0}, r"ffn_dim must be a positive integer, got 0"),
        ({"input_norm": 1}, r"input_norm=1.*\['batch', 'layer', 'none'\]"),
        ({"input_norm": "group"}, r"input_norm='group'.*\['batch', 'layer', 'none'\]"),
        ({"output_norm": "layer"}, r"output_norm='layer'.*\['batch', 'none'\]"),
        ({"mixing": "uniform"}, r"mixing='uniform'.*\['attention', 'mean', 'none'\]"),
        # wrong types are refused, never truncated or cast (True would be 1 head)
        ({"dim": "128"}, r"dim must be a positive integer, got '128'"),
        ({"depth": 2.5}, r"depth must be an integer >= 0, got 2.5"),
        ({"heads": True}, r"heads must be a positive integer, got True"),
        ({"ffn_dim": 1.5}, r"ffn_dim must be a positive integer, got 1.5"),
        ({"dropout": "abc"}, r"dropout must be in \[0, 1\), got 'abc'"),
        ({"dropout": float("nan")}, r"dropout must be in \[0, 1\), got nan"),
        ({"attention_logits": "l2"}, r"attention_logits='l2'.*\['cosine', 'dot'\]"),
        ({"qk_init": "eye"}, r"qk_init='eye'.*\['identity', 'tied', 'xavier'\]"),
        ({"block_norm": "group"}, r"block_norm='group'.*\['batch', 'layer'\]"),
        ({"residual": "no"}, r"residual='no'.*\[False, True\]"),
        ({"logit_scale_init": 0}, r"logit_scale_init must be a number in \(0, 100\], got 0"),
        ({"logit_scale_init": 200.0}, r"logit_scale_init must be .*, got 200.0"),
        ({"qk_lr_scale": -1.0}, r"qk_lr_scale must be a number in \(0, inf\], got -1.0"),
        ({"qk_lr_scale": "10"}, r"qk_lr_scale must be a number in \(0, inf\], got '10'"),
    ],
)
def test_bad_configuration_names_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        tiny_head(**kwargs)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("hidden_dim", [-5, 2.5, True])
def test_every_head_refuses_a_hidden_dim_that_is_not_a_size(hidden_dim):
    from solo_deepfusion.heads.registry import build_projector

    for name in ("transformer", "mlp"):
        with pytest.raises(
            ValueError, match=f"hidden_dim must be an integer >= 0, got {hidden_dim}"
        ):
            build_projector(name, 24, hidden_dim, 16)


def test_bad_inputs_name_the_problem():
    head = tiny_head(mask="positives")
    with pytest.raises(ValueError, match=r"in_dim=24.*\(6, 25\)"):
        head(torch.randn(6, 25))
    with pytest.raises(ValueError, match=r"num_views=4 must divide the number of tokens T=6"):
        head(torch.randn(6, 24), num_views=4)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        head(torch.randn(1, 24))
    with pytest.raises(ValueError, match="needs at least 2 samples"):
        head(torch.randn(2, 24), num_views=2)
    bad = torch.randn(6, 24)
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        head(bad)
    assert tiny_head().eval()(torch.randn(1, 24)).shape == (1, 16)  # fine at inference


@pytest.mark.parametrize(
    "fields",
    [
        {"mask": "none"},
        {"mask": "positives"},
        {"mask": "positives", "centred_attention": True},
        {"mask": "positives", "mixing": "mean"},
        {"mask": "positives", "mixing": "none"},
        {"mask": "positives", "attention_logits": "cosine", "qk_init": "tied"},
    ],
)
def test_two_gloo_processes_match_one_process_over_the_concatenated_batch(fields, tmp_path):
    world, views, per_rank = 2, 2, 3
    mp.spawn(_ddp_worker, args=(world, _free_port(), fields, str(tmp_path)), nprocs=world)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]

    head = tiny_head(**fields)
    x_global, w_global = _global_batch(world, views, per_rank)
    x_global.requires_grad_()
    out = head(x_global, num_views=views)
    (out * w_global).sum().backward()
    out_by_rank = _global_to_rank_order(out.detach(), world, views).chunk(world)
    grad_by_rank = _global_to_rank_order(x_global.grad, world, views).chunk(world)
    for rank in range(world):
        torch.testing.assert_close(results[rank][0], out_by_rank[rank], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(results[rank][1], grad_by_rank[rank], rtol=1e-5, atol=1e-5)
    for name, param in head.named_parameters():
        torch.testing.assert_close(results[0][2][name], param.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_low_precision_input_to_a_float32_head_names_both_dtypes(dtype):
    head = tiny_head()
    with pytest.raises(ValueError, match=rf"x is {dtype} but the head's weights are torch.float32"):
        head(torch.randn(6, 24, dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts for the head: fine
        assert head(torch.randn(6, 24, dtype=dtype)).isfinite().all()


def test_finite_inputs_that_overflow_inside_the_head_are_an_error_not_nan():
    head = tiny_head()
    with pytest.raises(
        NonFiniteOutputError, match=r"output is not finite: inputs up to \|x\| = 1e\+30"
    ):
        head(torch.full((6, 24), 1e30))
    assert head(1e6 * torch.randn(6, 24)).isfinite().all()


def test_input_norm_spellings_build_their_layer():
    for value, layer in [("none", nn.Identity), (False, nn.Identity), ("layer", nn.LayerNorm),
                         (True, nn.LayerNorm), ("batch", nn.BatchNorm1d)]:  # fmt: skip
        assert type(tiny_head(input_norm=value).input_norm) is layer, value


def test_batch_input_norm_centres_every_feature_over_the_tokens():
    """Non-negative features (a ReLU backbone's) share a direction; the BatchNorm removes it."""
    head = tiny_head(input_norm="batch").train()
    seen = []
    head.blocks[0].register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    head(torch.rand(12, 24) + 1.0, num_views=2)
    tokens = seen[0]
    torch.testing.assert_close(tokens.mean(0), torch.zeros(tokens.shape[1]), atol=1e-5, rtol=0)
    assert torch.allclose(tokens.var(0, unbiased=False), torch.ones(tokens.shape[1]), atol=1e-3)


def test_batch_output_norm_removes_the_direction_every_output_shares():
    """Inputs that share a direction (a ReLU backbone's) give outputs that share one; the
    BatchNorm centres each output feature over the tokens, as MoCo v3's projector ends."""
    x = torch.rand(16, 24) + 1.0
    shared = tiny_head(norm="pre").train()(x, num_views=2)
    centred = tiny_head(norm="pre", output_norm="batch").train()(x, num_views=2)
    assert output_cosine(shared, num_views=2) > 0.5
    assert abs(output_cosine(centred, num_views=2)) < 0.1
    torch.testing.assert_close(centred.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    assert list(tiny_head(output_norm="batch").output_norm.parameters()) == []  # no affine


@pytest.mark.parametrize("mask", MASKS)
def test_mixing_none_lets_no_sample_see_another(mask):
    head = tiny_head(mask=mask, mixing="none").eval()
    x = torch.randn(12, 24)
    changed = x.clone()
    changed[1:] = torch.randn(11, 24)  # every other token changes
    torch.testing.assert_close(head(x, num_views=2)[0], head(changed, num_views=2)[0])
    attending = tiny_head(mask=mask).eval()
    assert not torch.allclose(attending(x, num_views=2)[0], attending(changed, num_views=2)[0])


@pytest.mark.parametrize("mask", MASKS)
def test_mixing_mean_ignores_queries_and_keys(mask):
    """Fixed uniform weights: whatever q and k are, the output is the same."""
    x = torch.randn(12, 24)
    head = tiny_head(mask=mask, mixing="mean").eval()
    out = head(x, num_views=2)
    with torch.no_grad():
        for block in head.blocks:
            block.attn.qkv.weight[:64] = torch.randn(64, 32)  # the q and k rows
    torch.testing.assert_close(head(x, num_views=2), out)
    _, maps = head(x, num_views=2, return_attention=True)
    allowed = attention_mask(mask, 12, 2, 0, 1, x.device)
    expected = torch.ones(12, 12) if allowed is None else allowed.float()
    torch.testing.assert_close(maps[0][0], expected / expected.sum(-1, keepdim=True))


@pytest.mark.parametrize("mixing", ["mean", "none"])
def test_mixing_controls_keep_every_parameter_and_leave_only_q_and_k_untrained(mixing):
    control = tiny_head(mixing=mixing)
    assert sum(p.numel() for p in control.parameters()) == sum(
        p.numel() for p in tiny_head().parameters()
    )
    control(torch.randn(8, 24), num_views=2).square().sum().backward()
    for block in control.blocks:
        grad = block.attn.qkv.weight.grad
        assert not grad[:64].any()  # q and k: unused
        assert grad[64:].any()  # v: trained


def test_cosine_logits_are_bounded_by_a_learnable_per_head_scale():
    head = tiny_head(attention_logits="cosine").eval()
    attn = head.blocks[0].attn
    assert attn.logit_scale.shape == (4,)
    torch.testing.assert_close(attn.logit_scale.exp(), torch.full((4,), 10.0))
    x = 1e3 * torch.randn(10, 24)  # large inputs: dot logits would be huge, cosine ones are not
    assert head.blocks[0].attn.logits(head.in_proj(x), None).abs().max() <= 10.0 + 1e-4
    with torch.no_grad():
        attn.logit_scale.fill_(math.log(1e4))  # clamped at 100
    assert attn.logits(head.in_proj(x), None).abs().max() <= 100.0 + 1e-3
    assert tiny_head().blocks[0].attn.logit_scale is None  # dot logits: no scale


def test_identity_qk_init_makes_the_logits_a_similarity_kernel():
    attn = tiny_head(qk_init="identity").blocks[0].attn
    w_q, w_k = attn.qkv.weight[:32], attn.qkv.weight[32:64]
    torch.testing.assert_close(w_q.T @ w_k, torch.eye(32), atol=1e-5, rtol=0)
    assert not torch.equal(w_q, attn.qkv.weight[64:])  # v keeps its own init
    xavier = tiny_head().blocks[0].attn.qkv.weight
    assert not torch.allclose(xavier[:32].T @ xavier[32:64], torch.eye(32), atol=0.1)


def test_tied_qk_shares_one_linear_for_queries_and_keys():
    attn = tiny_head(qk_init="tied").blocks[0].attn
    assert not hasattr(attn, "qkv") and attn.qk.out_features == 32 and attn.v.out_features == 32
    x = torch.randn(6, 32)
    q, k, _ = attn._heads(x)
    torch.testing.assert_close(q, k)
    dot = tiny_head().blocks[0].attn
    assert sum(p.numel() for p in attn.parameters()) == sum(p.numel() for p in dot.parameters()) - (
        32 * 32 + 32
    )  # one matrix and bias fewer


def test_default_heads_keep_the_fused_qkv_of_published_checkpoints():
    """Zoo files hold ``blocks.<i>.attn.qkv.weight``: only a new field splits it."""
    keys = set(tiny_head().state_dict())
    assert "blocks.0.attn.qkv.weight" in keys and "blocks.0.attn.qk.weight" not in keys
    split = set(tiny_head(qk_lr_scale=10.0).state_dict())
    assert {"blocks.0.attn.qk.weight", "blocks.0.attn.v.weight"} <= split
    assert "blocks.0.attn.qkv.weight" not in split


def test_param_group_rules_name_the_logit_scales_and_q_k():
    assert tiny_head().param_group_rules() == ()
    head = tiny_head(attention_logits="cosine", qk_lr_scale=10.0)
    rules = {r.name: r for r in head.param_group_rules()}
    assert not rules["logit_scale"].decay and rules["qk"].lr_scale == 10.0
    names = [n for n, _ in head.named_parameters()]
    assert fnmatch.filter(names, rules["logit_scale"].pattern) == [
        "blocks.0.attn.logit_scale",
        "blocks.1.attn.logit_scale",
    ]
    assert fnmatch.filter(names, rules["qk"].pattern) == [
        f"blocks.{i}.attn.qk.{p}" for i in (0, 1) for p in ("weight", "bias")
    ]


def test_without_residuals_the_output_depends_on_attention():
    """No skip: a block's output is what attention and the FFN made of the tokens."""
    x = torch.randn(12, 24)
    for residual in (True, False):
        head = tiny_head(residual=residual, norm="pre").eval()
        out = head(x, num_views=2)
        with torch.no_grad():
            for block in head.blocks:
                block.attn.proj.weight.zero_()
                block.attn.proj.bias.zero_()
                block.ffn[-1].weight.zero_()
                block.ffn[-1].bias.zero_()
        silenced = head(x, num_views=2)
        assert not torch.allclose(out, silenced)
        constant = torch.allclose(silenced, silenced[:1].expand_as(silenced))
        assert constant == (not residual)  # only the skips carried the tokens
