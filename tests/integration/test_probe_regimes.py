"""The regime probe's parts (scripts/probe_regimes.py): arms, the held-out split, the
measurements and the target, on real heads and solo-learn's SimCLR recipe."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from solo_fixtures import HOST_PROBLEM

if HOST_PROBLEM is not None:
    pytest.skip(HOST_PROBLEM, allow_module_level=True)

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


@pytest.fixture(scope="module")
def probe():
    sys.path.insert(0, str(SCRIPTS))  # it imports bench_stability, its neighbour
    try:
        yield importlib.import_module("probe_regimes")
    finally:
        sys.path.remove(str(SCRIPTS))


def test_an_arm_replaces_or_adds_to_the_default_fields(probe):
    assert probe.ARMS["default"].spec == probe.DEFAULT
    cosine = probe.Arm("attention_logits=cosine,lr_scale=0.01").spec
    assert cosine == "transformer:attention_logits=cosine,lr_scale=0.01,preset=stable_bn"


def test_held_out_images_are_balanced_shuffled_and_never_trained_on(probe):
    labels = torch.arange(5).repeat_interleave(20)  # an ImageFolder's order: class by class
    train, held = probe.class_split(labels, 4)
    assert set(train.tolist()).isdisjoint(held.tolist()) and len(train) + len(held) == 100
    assert torch.bincount(labels[held]).tolist() == [4] * 5
    assert len(set(labels[held[:5]].tolist())) > 1  # a batch's first rows mix the classes


def test_measure_reports_every_layer_of_a_real_head(probe, tmp_path):
    _, model = probe.head_model("simclr", probe.ARMS["cosine"].spec, tmp_path)
    feats = torch.randn(2, 2, 16, 512).relu()  # (batches, crops, images, features)
    labels = torch.arange(4).repeat(4).expand(2, 16)
    stats = probe.measure(model, feats, labels)
    for key in ("fusion_ratio", "positive_mass", "entropy", "logit_std"):
        assert len(stats[key]) == 10, key
    assert all(p == 0 for p in stats["positive_mass"])  # stable_bn masks own views
    assert 0 <= stats["nn_accuracy"] <= 1 and stats["output_rank"] > 1


def test_a_kernel_on_clustered_features_prefers_its_class(probe):
    centres = 5 * torch.randn(4, 32)
    labels = torch.arange(4).repeat(8)
    clustered = centres[labels] + torch.randn(2, 32, 32)
    ratios = probe.kernel_fusion(clustered[None], labels[None], (1, 30))
    assert ratios["30"] > 2.5 and ratios["30"] > ratios["1"] > 1.0
    noise = probe.kernel_fusion(torch.randn(1, 2, 32, 32), labels[None], (30,))
    assert abs(noise["30"] - 1) < 0.5


def test_the_target_needs_rising_fusion_high_entropy_and_no_collapse(probe):
    row = {"fusion_ratio": [1.1, 1.6], "entropy": [3.0, 2.0], "output_cosine": 0.1}
    assert probe.reached(row)
    assert not probe.reached(row | {"fusion_ratio": [1.7, 1.6]})  # falls with depth
    assert not probe.reached(row | {"entropy": [3.0, 0.4]})
    assert not probe.reached(row | {"output_cosine": 0.9})
    assert not probe.reached(row | {"diverged_at_step": 3})


def test_class_bias_moves_the_loss_only_through_same_class_keys(probe, tmp_path):
    _, model = probe.head_model("simclr", probe.ARMS["default"].spec, tmp_path)
    feats = torch.randn(1, 2, 16, 512).relu()
    labels = torch.arange(4).repeat(4)[None]
    deltas = probe.class_bias_losses(model, feats, labels, (0.0, 3.0))
    assert deltas["class"][0] == pytest.approx(0, abs=1e-6)  # no bias, no change
    assert abs(deltas["class"][1]) > 1e-4 and abs(deltas["random"][1]) > 1e-4
    # one group holding every sample shifts every allowed logit alike: softmax ignores it
    one_group = probe.class_bias_losses(model, feats, torch.zeros_like(labels), (3.0,))
    assert one_group["class"][0] == pytest.approx(0, abs=1e-5)
    attn = probe.fusion_head(model).blocks[0].attn
    assert "_scores" not in vars(attn) and "forward" not in vars(attn)  # restored
    _, mean = probe.head_model("simclr", probe.ARMS["mean"].spec, tmp_path)
    assert probe.class_bias_losses(mean, feats, labels) is None


def test_a_trained_row_reports_without_training_columns(probe):
    row = {
        "arm": "zoo:x",
        "spec": "name=transformer",
        "recipe_overrides": [],
        "steps": 0,
        "batch_size": 256,
        "temperature": 0.2,
        "features_nn_accuracy": 0.5,
        "fusion_ratio": [1.2, 1.0],
        "positive_mass": [0.0, 0.0],
        "entropy": [5.0, 5.0],
        "logit_std": [0.3, 0.2],
        "output_cosine": 0.1,
        "output_rank": 60.0,
        "nn_accuracy": 0.4,
        "class_bias_loss": {"class": [0.0, 0.0, 0.03, 0.1], "random": [0.0, 0.0, -0.01, 0.0]},
    }
    line = probe.table_row(row)
    assert "| –→1.00 |" in line and "| +0.030 / -0.010 | – | ✘ |" in line
    text = probe.report([row])
    assert "trained end to end" in text and "--trained" in text
