"""Heads from elsewhere: registered after import, and the example plugin (examples/batchattn)
installed through its entry point, through the variants, the optimizer group, the launcher
and the bench."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, distribution

import pytest
import torch
from solo_fixtures import HOST_PROBLEM, fit, method_cfg

if HOST_PROBLEM is not None:
    pytest.skip(HOST_PROBLEM, allow_module_level=True)

from solo.methods import METHODS
from torch import nn

from solo_deepfusion.heads import register_projector, registry
from solo_deepfusion.solo import HEAD_METHODS, bench, launch, register
from solo_deepfusion.solo.model import build_model
from solo_deepfusion.solo.param_groups import HEAD_GROUP
from solo_deepfusion.solo.variants import (
    OPTIMIZER_KEYS,
    projector_defaults,
    projector_keys,
    projectors,
)

pytestmark = pytest.mark.host
EXAMPLE = "solo-deepfusion-batchattn"


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


@dataclass(frozen=True)
class SmallCrops:
    small_crops: bool = True


class CallRecorder(nn.Module):
    """A linear head that records the rows and ``num_views`` of every training call."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        self.calls: list[tuple[int, int]] = []

    def forward(self, x: torch.Tensor, *, num_views: int = 1) -> torch.Tensor:
        if self.training:
            self.calls.append((x.shape[0], num_views))
        return self.linear(x)


@pytest.fixture
def late_head(monkeypatch):
    """``late`` (no fields, joint context), registered after ``solo_deepfusion.solo``."""
    monkeypatch.setattr(registry, "_PROJECTORS", dict(registry._PROJECTORS))
    register_projector("late", joint_context=True)(lambda f, h, o: CallRecorder(f, o))
    yield "late"
    for method in HEAD_METHODS:
        METHODS.pop(f"{method}_late", None)


def test_a_head_registered_after_import_trains_with_the_joint_context(late_head):
    assert "simclr_late" not in METHODS
    model = build_model(method_cfg("simclr_late", name="late"))  # register() runs again
    assert type(model) is METHODS["simclr_late"] and "late" in projectors()
    head = model.get_submodule(model.context_projector)
    assert head.joint
    fit(model, steps=2, batch_size=8)
    assert head.head.calls == [(16, 2), (16, 2)]  # both crops in one call, every step
    spec = bench.ProjectorSpec.parse("late").under("simclr")
    assert spec.label == "late:lr_scale=1" and spec.overrides() == [
        "--projector",
        "late",
        "projector.lr_scale=1",
    ]


@pytest.mark.parametrize("projector", ["mlp_matched", "transformer", "late"])
def test_every_registered_head_gets_its_optimizer_group(projector, late_head):
    fields = {"preset": "small"} if projector != "late" else {}
    cfg = method_cfg(f"simclr_{projector}", name=projector, **fields, lr_scale=0.5)
    cfg.optimizer.weight_decay = 1e-4
    cfg.projector.weight_decay = 0.0
    model = build_model(cfg)
    (group,) = [g for g in model.learnable_params if g.get("name") == HEAD_GROUP]
    head = model.get_submodule(model.context_projector)
    assert {id(p) for p in group["params"]} == {id(p) for p in head.parameters()}
    assert group["lr"] == pytest.approx(0.5 * model.lr) and group["weight_decay"] == 0.0


def test_registered_optimizer_defaults_are_the_variants(monkeypatch):
    assert registry.OPTIMIZER_FIELDS == OPTIMIZER_KEYS  # the host-free copy of the keys
    assert projector_defaults("transformer")["lr_scale"] == 0.1
    assert "lr_scale" not in projector_defaults("mlp_matched")
    monkeypatch.setattr(registry, "_PROJECTORS", dict(registry._PROJECTORS))
    register_projector("clash", config=SmallCrops)(lambda f, h, o: nn.Linear(f, o))
    with pytest.raises(ValueError, match=r"'clash': field\(s\) \['small_crops'\] are the"):
        projector_keys("clash")


@requires_example
def test_the_example_plugin_trains_through_the_launcher(quick_args):
    trainer = launch.run_pretrain(quick_args("--projector", "batchattn", "++limit_train_batches=1"))
    model = trainer.lightning_module
    assert type(model) is METHODS["simclr_batchattn"] and trainer.global_step == 1
    head = model.get_submodule(model.context_projector)
    assert head.joint and type(head.head).__module__ == "batchattn_head"
    assert model.cfg.projector.heads == 4 and "preset" not in model.cfg.projector


@requires_example
def test_the_bench_lists_the_example_plugin(tmp_path, capsys):
    register()
    argv = [
        *("--config-name", "cifar10_quick", "--results", str(tmp_path / "r.jsonl")),
        *("--work", str(tmp_path / "work"), "--methods", "simclr", "--dry-run"),
        *("--projectors", "mlp", "batchattn", "batchattn:heads=8", "--depths", "2", "4"),
    ]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    # no preset and no depth: the depth axis collapses for it, its label spells out lr_scale
    assert "3 cells, 3 to run" in out and "the 3 cells' configs compose" in out
    assert "simclr batchattn:lr_scale=1 seed=0" in out
    assert "simclr batchattn:heads=8,lr_scale=1 seed=0" in out
