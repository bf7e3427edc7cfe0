"""Collapse diagnostics of the transformer head (host-free): entropy, logit spread, cosine, rank."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from solo_deepfusion.heads import TransformerProjector
from solo_deepfusion.heads.diagnostics import (
    MAX_OUTPUT_COSINE,
    MIN_ENTROPY,
    collapse_stats,
    output_cosine,
    output_rank,
)

TINY = {"dim": 32, "depth": 2, "heads": 4, "ffn_dim": 64}


def head(**kwargs) -> TransformerProjector:
    torch.manual_seed(0)
    return TransformerProjector(24, 16, **{**TINY, **kwargs}).eval()


def features(tokens: int = 64, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(tokens, 24, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("mask", "keys"), [("none", 12), ("self", 11), ("positives", 10)])
def test_zero_logits_give_uniform_entropy_and_no_spread(mask, keys):
    model = head(mask=mask, depth=1)
    nn.init.zeros_(model.blocks[0].attn.qkv.weight)  # q = k = 0: every allowed key alike
    stats = collapse_stats(model, features(12), num_views=2)
    assert stats.entropy == (pytest.approx(math.log(keys), abs=1e-5),)
    assert stats.logit_std == (pytest.approx(0.0, abs=1e-6),)


def test_logit_std_matches_the_scores_written_out():
    model = head(depth=1)
    x = features(10)
    q, k, _ = model.blocks[0].attn.qkv(model.in_proj(x)).double().chunk(3, dim=-1)
    spreads = [
        ((qh @ kh.T) / math.sqrt(8)).std(dim=1, unbiased=False).mean()
        for qh, kh in zip(q.split(8, dim=1), k.split(8, dim=1), strict=True)
    ]
    stats = collapse_stats(model, x)
    assert stats.logit_std[0] == pytest.approx(float(torch.stack(spreads).mean()), rel=1e-4)


def test_saturated_first_layer_is_reported_and_qk_norm_prevents_it():
    """The failure of issue 9: a post-norm head fed large features attends one-hot."""
    big = features(64, scale=300.0)
    plain = collapse_stats(head(), big)
    assert plain.entropy[0] < 1e-3 < MIN_ENTROPY and plain.logit_std[0] > 100
    message = plain.warning()
    assert message is not None and "layer 1 attention entropy 0.00 nats" in message
    assert "layer 2" not in message
    for fix in ({"qk_norm": True}, {"input_norm": True}, {"norm": "pre"}):
        healthy = collapse_stats(head(**fix), big)
        assert min(healthy.entropy) > 2.0, fix
        assert healthy.warning() is None, fix


def test_identical_outputs_have_cosine_one_and_are_reported():
    model = head()
    nn.init.zeros_(model.out_proj.weight)
    nn.init.ones_(model.out_proj.bias)
    stats = collapse_stats(model, features(16), num_views=2)
    assert stats.output_cosine == pytest.approx(1.0)
    assert stats.output_rank == 0.0
    assert f"(> {MAX_OUTPUT_COSINE})" in stats.warning()
    spread = collapse_stats(head(), features(16), num_views=2)
    assert abs(spread.output_cosine) < 0.5


def test_output_cosine_is_that_of_the_tail_output():
    """A method's tail (MoCo v3's last BatchNorm) can remove the direction outputs share."""
    model = head()
    nn.init.constant_(model.out_proj.bias, 3.0)  # every output shares one direction
    x = features(16)
    out = model(x, num_views=2)
    tail = nn.BatchNorm1d(16, affine=False).eval()
    tail.running_mean = out.detach().mean(0)
    raw = collapse_stats(model, x, num_views=2)
    centred = collapse_stats(model, x, num_views=2, tail=tail)
    assert raw.output_cosine > 0.9 and abs(centred.output_cosine) < 0.1
    assert centred.output_cosine == pytest.approx(output_cosine(tail(out), num_views=2))
    assert centred.entropy == raw.entropy


def test_scalars_name_every_layer_and_the_head_is_left_as_it_was():
    model = head().train()
    stats = collapse_stats(model, features(8))
    assert sorted(stats.scalars()) == [
        "collapse/layer1/entropy",
        "collapse/layer1/logit_std",
        "collapse/layer2/entropy",
        "collapse/layer2/logit_std",
        "collapse/output_cosine",
        "collapse/output_rank",
    ]
    assert model.training and all(not m._forward_pre_hooks for m in model.modules())


def test_output_cosine_leaves_out_a_samples_other_views():
    """Four orthogonal samples, two identical views each: only the views would agree."""
    views = torch.cat([torch.eye(4), torch.eye(4)])
    assert output_cosine(views, num_views=2) == pytest.approx(0.0)
    # read as 8 distinct samples, the 8 view pairs (of 56 ordered pairs) count: 1/7
    assert output_cosine(views) == pytest.approx(8 / 56)


def test_output_rank_counts_the_directions_of_the_spread_not_a_shared_one():
    """``±e_1 .. ±e_k``: k equal directions of spread, whatever vector every output shares."""
    k = 3
    spread = torch.cat([torch.eye(8)[:k], -torch.eye(8)[:k]])
    shared = spread + 10 * torch.eye(8)[7]
    assert output_rank(spread) == pytest.approx(k)
    assert output_rank(shared) == pytest.approx(k)
    assert output_cosine(shared) > 0.9  # the cosine reads the shared direction as collapse
    line = torch.linspace(-1, 1, 6)[:, None] * torch.ones(1, 8) + 5.0
    assert output_rank(line) == pytest.approx(1.0)
    unequal = torch.cat([spread[:, :k] * torch.tensor([1.0, 0.1, 0.1]), torch.zeros(2 * k, 5)], 1)
    assert 1.0 < output_rank(unequal) < k


def test_output_rank_is_that_of_the_tail_output():
    model = head()
    x = features(16)
    tail = nn.Linear(16, 16, bias=False)
    nn.init.zeros_(tail.weight)
    tail.weight.data[0, 0] = 1.0  # keeps one coordinate of the head's output
    stats = collapse_stats(model, x, num_views=2, tail=tail)
    assert stats.output_rank == pytest.approx(1.0)
    assert collapse_stats(model, x, num_views=2).output_rank > 2.0
