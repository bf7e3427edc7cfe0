"""The projector registry (heads/registry.py) and the MLP heads it builds (heads/mlp.py)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from solo_deepfusion.heads import (
    PRESETS,
    MLPProjector,
    build_projector,
    count_parameters,
    list_projectors,
    solo_mlp,
    transformer_config,
)

TINY = {"dim": 32, "depth": 2, "heads": 4, "ffn_dim": 64}


def test_registry_lists_builtins_and_rejects_unknown_names():
    assert {"mlp", "mlp_matched", "transformer"} <= set(list_projectors())
    with pytest.raises(ValueError, match=r"unknown projector 'mlpp'.*mlp_matched"):
        build_projector("mlpp", 8, 8, 8)


def test_preset_fields_are_overridable_and_validated():
    config = transformer_config("small", depth=6, mask="positives", heads=None)
    assert (config.depth, config.mask, config.heads) == (6, "positives", PRESETS["small"].heads)
    with pytest.raises(ValueError, match=r"preset='huge'.*'small', 'stable', 'stable_bn'"):
        transformer_config("huge")
    with pytest.raises(ValueError, match=r"unknown transformer field\(s\) \['layers'\]"):
        build_projector("transformer", 8, 8, 8, layers=3)


def test_mlp_builders_follow_solo_learn_layouts():
    simclr = build_projector("mlp", 512, 2048, 256)
    assert [type(m) for m in simclr] == [nn.Linear, nn.ReLU, nn.Linear]
    byol = solo_mlp("byol", 512, 4096, 256)
    assert [type(m) for m in byol] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert count_parameters(byol) == 512 * 4096 + 4096 + 2 * 4096 + 4096 * 256 + 256
    with pytest.raises(ValueError, match="layout='mae'"):
        build_projector("mlp", 8, 8, 8, layout="mae")


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("num_layers", [2, 3, 4])
def test_mlp_matched_has_the_transformers_parameter_count(preset, num_layers):
    transformer = build_projector("transformer", 512, 2048, 256, preset=preset)
    matched = build_projector("mlp_matched", 512, 2048, 256, preset=preset, num_layers=num_layers)
    assert isinstance(matched, MLPProjector)
    ratio = count_parameters(matched) / count_parameters(transformer)
    assert abs(ratio - 1) < 0.05
    assert matched(torch.randn(4, 512)).shape == (4, 256)


@pytest.mark.parametrize("name", list_projectors())
def test_every_registered_projector_keeps_the_contract(name):
    """(T, in_dim) features -> (T, out_dim), every parameter trained; declared defaults are
    among its declared fields (the integration builds configs from them)."""
    from solo_deepfusion.heads import projector_entry

    entry = projector_entry(name)
    assert set(entry.defaults) <= set(entry.fields)
    torch.manual_seed(0)
    head = build_projector(name, 24, 32, 16, **entry.defaults)
    x = torch.randn(8, 24)
    out = head(x)
    assert out.shape == (8, 16) and out.isfinite().all()
    out.square().sum().backward()
    assert all(p.grad is not None for p in head.parameters())


def test_mlp_output_norm_centres_the_output_without_parameters():
    plain = build_projector("mlp", 24, 32, 16)
    normed = build_projector("mlp", 24, 32, 16, output_norm="batch")
    assert count_parameters(normed) == count_parameters(plain)
    assert isinstance(normed[-1], nn.BatchNorm1d) and normed[-1].weight is None
    out = normed.train()(torch.rand(16, 24) + 1.0)  # non-negative inputs share a direction
    torch.testing.assert_close(out.mean(0), torch.zeros(16), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"output_norm='layer'.*\['batch', 'none'\]"):
        build_projector("mlp", 24, 32, 16, output_norm="layer")


def test_mlp_matched_ends_with_a_batchnorm_only_when_asked():
    """The preset's output BatchNorm counts no parameters; the twin takes it when it is given,
    so a published `mlp_matched` (no BatchNorm) keeps its meaning."""
    stock = build_projector("mlp_matched", 512, 2048, 256, **TINY)
    fair = build_projector("mlp_matched", 512, 2048, 256, output_norm="batch", **TINY)
    assert not isinstance(stock[-1], nn.BatchNorm1d)
    assert isinstance(fair[-1], nn.BatchNorm1d)
    assert count_parameters(fair) == count_parameters(stock)
