"""The projector registry (heads/registry.py) and the MLP heads it builds (heads/mlp.py)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution

import pytest
import torch
from torch import nn

from solo_deepfusion.heads import (
    PRESETS,
    MLPProjector,
    build_projector,
    count_parameters,
    list_projectors,
    projector_entry,
    register_projector,
    registry,
    solo_mlp,
    transformer_config,
)

TINY = {"dim": 32, "depth": 2, "heads": 4, "ffn_dim": 64}
EXAMPLE = "solo-deepfusion-batchattn"  # examples/batchattn, installed by CI


def example_installed() -> bool:
    try:
        distribution(EXAMPLE)
    except PackageNotFoundError:
        return False
    return True


requires_example = pytest.mark.skipif(
    not example_installed(),
    reason=f"the example plugin {EXAMPLE} is not installed: "
    "pip install --no-deps --no-build-isolation examples/batchattn",
)


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
    among its declared fields (the integration builds configs from them). A head that asks
    for the joint context takes every view at once, view-major: reordering the samples the
    same way in every view reorders its outputs alike (docs/plugins.md)."""
    entry = projector_entry(name)
    assert set(entry.defaults) <= set(entry.fields)
    assert set(entry.optimizer) <= set(registry.OPTIMIZER_FIELDS)
    torch.manual_seed(0)
    head = build_projector(name, 24, 32, 16, **entry.defaults)
    x = torch.randn(8, 24)
    out = head(x)
    assert out.shape == (8, 16) and out.isfinite().all()
    out.square().sum().backward()
    assert all(p.grad is not None for p in head.parameters())
    if entry.wants_joint_context(head):
        views = torch.randn(2, 6, 24)
        order = torch.randperm(6)
        joint = head(views.flatten(0, 1), num_views=2)
        reordered = head(views[:, order].flatten(0, 1), num_views=2)
        assert joint.shape == (12, 16)
        torch.testing.assert_close(reordered, joint.unflatten(0, (2, 6))[:, order].flatten(0, 1))


@requires_example
def test_the_example_plugin_is_registered_through_its_entry_point():
    assert "batchattn" in list_projectors()
    entry = projector_entry("batchattn")
    assert entry.fields == ("heads",) and entry.build.__module__ == "batchattn_head"
    assert entry.joint_context is True
    with pytest.raises(ValueError, match=r"projector.heads=3 must divide .*=32"):
        build_projector("batchattn", 24, 32, 16, heads=3)


def write_plugin(site, dist: str, module: str, source: str) -> None:
    """A distribution on ``site`` (no install): its module and its entry point."""
    (site / f"{module}.py").write_text(source)
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\n{module} = {module}\n")


@pytest.fixture
def fresh_registry(tmp_path, monkeypatch):
    """A copy of the registry whose plugins are loaded again; ``tmp_path`` on ``sys.path``."""
    monkeypatch.setattr(registry, "_PROJECTORS", dict(registry._PROJECTORS))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for module in ("demo_head_plugin", "broken_head_plugin"):
        sys.modules.pop(module, None)


def test_an_installed_entry_point_registers_its_head_on_first_read(fresh_registry):
    write_plugin(
        fresh_registry,
        "demo-head",
        "demo_head_plugin",
        "from torch import nn\n"
        "from solo_deepfusion.heads import register_projector\n\n"
        "@register_projector('demo_head', joint_context=True, optimizer={'lr_scale': 0.5})\n"
        "def demo_head(in_dim, hidden_dim, out_dim):\n"
        "    return nn.Linear(in_dim, out_dim)\n",
    )
    assert "demo_head" in list_projectors()
    entry = projector_entry("demo_head")
    assert entry.fields == () and entry.optimizer == {"lr_scale": 0.5}
    assert entry.wants_joint_context(build_projector("demo_head", 4, 8, 2))


def test_a_broken_plugin_fails_with_one_line_naming_it(fresh_registry):
    write_plugin(fresh_registry, "broken", "broken_head_plugin", "raise RuntimeError('boom')\n")
    message = r"projector plugin 'broken_head_plugin' \(broken_head_plugin\) .*RuntimeError: boom"
    with pytest.raises(ImportError, match=message):
        list_projectors()


@dataclass(frozen=True)
class ClashingFields:
    lr_scale: float = 1.0


def test_registration_checks_its_declared_properties():
    with pytest.raises(ValueError, match=r"optimizer field\(s\) \['lr'\]; choose from"):
        register_projector("x", optimizer={"lr": 0.1})
    with pytest.raises(ValueError, match=r"joint_context='yes'; choose True, False or"):
        register_projector("x", joint_context="yes")
    with pytest.raises(ValueError, match=r"config field\(s\) \['lr_scale'\] of 'x'"):
        register_projector("x", config=ClashingFields)
    with pytest.raises(ValueError, match="projector 'mlp' is already registered"):
        register_projector("mlp")(lambda *args: nn.Identity())
    assert not projector_entry("transformer").wants_joint_context(
        build_projector("transformer", 8, 8, 8, preset="small", context="view")
    )


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
