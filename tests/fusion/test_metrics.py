"""Deep Fusion metrics and plots (host-free): hand-built attention maps with known answers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import torch

from solo_deepfusion.fusion import (
    FusionStats,
    attention_heatmap_figure,
    expand_labels,
    format_table,
    fusion_ratio_figure,
    fusion_stats,
    leave_one_out_1nn_accuracy,
    plot_attention_heatmaps,
    plot_fusion_ratio,
    scalar_metrics,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def related(q: int, k: int, batch: int) -> bool:
    """Key k is q itself or one of q's other views (view-major layout)."""
    return q % batch == k % batch


def rows_from_weights(weights: torch.Tensor) -> torch.Tensor:
    """Normalise non-negative weights into attention rows (float64)."""
    weights = weights.to(torch.float64)
    return weights / weights.sum(-1, keepdim=True)


def block_diagonal_map(labels_t: torch.Tensor, num_views: int) -> torch.Tensor:
    """Uniform attention over same-class keys that are NOT related to the query."""
    num_tokens = labels_t.numel()
    batch = num_tokens // num_views
    weights = torch.zeros(num_tokens, num_tokens)
    for q in range(num_tokens):
        for k in range(num_tokens):
            if labels_t[q] == labels_t[k] and not related(q, k, batch):
                weights[q, k] = 1.0
    return rows_from_weights(weights)


def positives_only_map(num_tokens: int, num_views: int) -> torch.Tensor:
    """Each query attends uniformly to its own other views only."""
    batch = num_tokens // num_views
    weights = torch.zeros(num_tokens, num_tokens)
    for q in range(num_tokens):
        for k in range(num_tokens):
            if k != q and related(q, k, batch):
                weights[q, k] = 1.0
    return rows_from_weights(weights)


def reference_head(attn: torch.Tensor, labels_t: torch.Tensor, num_views: int) -> dict:
    """Direct, loop-based transcription of the documented definitions for one head."""
    num_tokens = attn.shape[0]
    batch = num_tokens // num_views
    a = attn.to(torch.float64).tolist()
    y = labels_t.tolist()
    s_rows, c_rows, c_all, pos, own, ent = [], [], [], [], [], []
    for q in range(num_tokens):
        unrel = [k for k in range(num_tokens) if not related(q, k, batch)]
        same = [k for k in unrel if y[k] == y[q]]
        c_q = len(same) / len(unrel)
        c_all.append(c_q)
        mass = sum(a[q][k] for k in unrel)
        if mass > 0:
            s_rows.append(sum(a[q][k] for k in same) / mass)
            c_rows.append(c_q)
        pos.append(sum(a[q][k] for k in range(num_tokens) if k != q and related(q, k, batch)))
        own.append(a[q][q])
        ent.append(-sum(v * math.log(v) for v in a[q] if v > 0))
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    return {
        "same_class": mean(s_rows) if s_rows else math.nan,
        "chance": mean(c_rows) if c_rows else mean(c_all),
        "positive_mass": mean(pos),
        "self_mass": mean(own),
        "entropy": mean(ent),
        "valid": len(s_rows),
    }


def random_maps(layers: int, heads: int, tokens: int, seed: int, sparsity: float = 0.0):
    """Softmax maps with some keys masked to exactly 0 (never a whole row)."""
    gen = torch.Generator().manual_seed(seed)
    maps = []
    for _ in range(layers):
        logits = torch.randn(heads, tokens, tokens, generator=gen) * 2
        masked = torch.rand(heads, tokens, tokens, generator=gen) < sparsity
        masked[..., 0] = False  # keep one key per row
        logits = logits.masked_fill(masked, -math.inf)
        maps.append(torch.softmax(logits, dim=-1))
    return maps


LABELS_B6 = torch.tensor([0, 1, 0, 2, 1, 2])  # every class twice: block maps are defined


# ---------------------------------------------------------------------------------------------
# Known answers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_views", [1, 2, 3])
def test_uniform_attention_is_chance_with_maximal_entropy(num_views: int) -> None:
    batch = 6
    num_tokens = batch * num_views
    uniform = torch.full((2, num_tokens, num_tokens), 1.0 / num_tokens, dtype=torch.float64)
    (stats,) = fusion_stats([uniform], LABELS_B6, num_views=num_views)
    assert stats.fusion_ratio == pytest.approx(1.0, abs=1e-12)
    assert stats.same_class == pytest.approx(stats.chance, abs=1e-12)
    assert stats.entropy == pytest.approx(math.log(num_tokens), abs=1e-9)
    assert stats.normalized_entropy == pytest.approx(1.0, abs=1e-9)
    assert stats.self_mass == pytest.approx(1.0 / num_tokens)
    assert stats.positive_mass == pytest.approx((num_views - 1) / num_tokens)
    assert stats.valid_fraction == 1.0
    assert torch.allclose(stats.fusion_ratio_per_head, torch.ones(2, dtype=torch.float64))


def test_chance_counts_unrelated_same_class_keys() -> None:
    # labels 0,0,0 | 1,1,1,1 | 2 with one view: C_q = (n_class - 1) / (T - 1).
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2])
    uniform = torch.full((1, 8, 8), 1 / 8)
    (stats,) = fusion_stats([uniform], labels)
    expected = (3 * (2 / 7) + 4 * (3 / 7) + 1 * 0.0) / 8
    assert stats.chance == pytest.approx(expected, abs=1e-12)
    # with two views the query's own other view is excluded from both counts
    labels2 = torch.tensor([0, 0, 1, 1])
    (stats2,) = fusion_stats([torch.full((1, 8, 8), 1 / 8)], labels2, num_views=2)
    assert stats2.chance == pytest.approx(2 / 6, abs=1e-12)  # same class: 2 of the 6 unrelated


@pytest.mark.parametrize("num_views", [1, 2])
def test_block_diagonal_attention_is_full_fusion(num_views: int) -> None:
    labels_t = LABELS_B6.repeat(num_views)
    attn = block_diagonal_map(labels_t, num_views)
    (stats,) = fusion_stats([attn.unsqueeze(0)], LABELS_B6, num_views=num_views)
    assert stats.same_class == pytest.approx(1.0, abs=1e-12)
    assert stats.self_mass == 0.0
    assert stats.positive_mass == pytest.approx(0.0, abs=1e-12)
    assert stats.fusion_ratio == pytest.approx(1.0 / stats.chance, rel=1e-12)
    assert stats.fusion_ratio > 1.5


def test_related_keys_are_excluded_and_the_rest_renormalised() -> None:
    # Half of each row on the query's other view, half spread over different-class keys:
    # the class measure sees only the unrelated half, which is all different-class.
    num_views, labels_t = 2, LABELS_B6.repeat(2)
    batch, num_tokens = 6, 12
    weights = torch.zeros(num_tokens, num_tokens)
    for q in range(num_tokens):
        other = [k for k in range(num_tokens) if labels_t[k] != labels_t[q]]
        weights[q, other] = 0.5 / len(other)
        weights[q, (q + batch) % num_tokens] = 0.5
    (stats,) = fusion_stats([weights.unsqueeze(0)], LABELS_B6, num_views=num_views)
    assert stats.positive_mass == pytest.approx(0.5, abs=1e-12)
    assert stats.same_class == pytest.approx(0.0, abs=1e-12)
    assert stats.fusion_ratio == pytest.approx(0.0, abs=1e-12)
    assert stats.valid_fraction == 1.0


def test_positives_only_rows_are_skipped() -> None:
    attn = positives_only_map(12, 2)
    (stats,) = fusion_stats([attn.unsqueeze(0)], LABELS_B6, num_views=2)
    assert stats.positive_mass == pytest.approx(1.0, abs=1e-12)
    assert stats.self_mass == 0.0
    assert math.isnan(stats.same_class)
    assert math.isnan(stats.fusion_ratio)
    assert stats.valid_fraction == 0.0
    assert stats.entropy == pytest.approx(0.0, abs=1e-12)
    # chance falls back to the label-only value
    (uniform,) = fusion_stats([torch.full((1, 12, 12), 1 / 12)], LABELS_B6, num_views=2)
    assert stats.chance == pytest.approx(uniform.chance, abs=1e-12)
    # JSON export: NaN becomes None, strict JSON works
    data = stats.to_dict()
    assert data["same_class"] is None and data["fusion_ratio_per_head"] == [None]
    json.dumps(summarize([stats]), allow_nan=False)


def test_self_only_attention() -> None:
    (stats,) = fusion_stats([torch.eye(6).unsqueeze(0)], LABELS_B6)
    assert stats.self_mass == 1.0
    assert stats.positive_mass == 0.0
    assert stats.entropy == 0.0
    assert math.isnan(stats.same_class)


def test_self_masked_uniform_is_chance() -> None:
    # mask="self": zeros on the diagonal, uniform over all other keys.
    num_tokens = 6
    attn = rows_from_weights(1 - torch.eye(num_tokens)).unsqueeze(0)
    (stats,) = fusion_stats([attn], LABELS_B6)
    assert stats.self_mass == 0.0
    assert stats.fusion_ratio == pytest.approx(1.0, abs=1e-12)
    assert stats.entropy == pytest.approx(math.log(num_tokens - 1), abs=1e-12)
    assert stats.normalized_entropy == pytest.approx(
        math.log(num_tokens - 1) / math.log(num_tokens), abs=1e-12
    )


def test_per_head_values_differ_when_heads_differ() -> None:
    uniform = torch.full((6, 6), 1 / 6, dtype=torch.float64)
    fused = block_diagonal_map(LABELS_B6, 1)
    (stats,) = fusion_stats([torch.stack([uniform, fused])], LABELS_B6)
    chance = stats.chance
    assert stats.same_class_per_head.tolist() == pytest.approx([chance, 1.0], abs=1e-12)
    assert stats.fusion_ratio_per_head.tolist() == pytest.approx([1.0, 1 / chance], rel=1e-12)
    assert stats.same_class == pytest.approx((chance + 1.0) / 2, abs=1e-12)
    assert stats.entropy_per_head[0] > stats.entropy_per_head[1]
    assert stats.num_heads == 2


def test_layers_are_reported_in_order_one_based() -> None:
    uniform = torch.full((1, 6, 6), 1 / 6)
    fused = block_diagonal_map(LABELS_B6, 1).unsqueeze(0)
    stats = fusion_stats([uniform, fused], LABELS_B6)
    assert [s.layer for s in stats] == [1, 2]
    assert stats[0].fusion_ratio == pytest.approx(1.0) and stats[1].fusion_ratio > 1.5


@pytest.mark.parametrize(("num_views", "sparsity"), [(1, 0.0), (2, 0.0), (2, 0.5), (3, 0.3)])
def test_matches_loop_reference_on_random_maps(num_views: int, sparsity: float) -> None:
    maps = random_maps(layers=2, heads=3, tokens=6 * num_views, seed=num_views, sparsity=sparsity)
    if sparsity:  # one row that attends to related keys only (skipped)
        maps[0][1, 2] = 0.0
        maps[0][1, 2, 2] = 1.0
    labels_t = LABELS_B6.repeat(num_views)
    stats = fusion_stats(maps, LABELS_B6, num_views=num_views)
    for layer, layer_stats in zip(maps, stats, strict=True):
        refs = [reference_head(head, labels_t, num_views) for head in layer]
        for key in ("same_class", "chance", "positive_mass", "self_mass", "entropy"):
            got = getattr(layer_stats, f"{key}_per_head").tolist()
            assert got == pytest.approx([r[key] for r in refs], abs=1e-6), key
        valid = sum(r["valid"] for r in refs) / (3 * 6 * num_views)
        assert layer_stats.valid_fraction == pytest.approx(valid)
    if sparsity:
        assert stats[0].valid_fraction < 1.0


def test_labels_of_length_b_and_t_agree() -> None:
    maps = random_maps(layers=2, heads=2, tokens=12, seed=3)
    from_b = fusion_stats(maps, LABELS_B6, num_views=2)
    from_t = fusion_stats(maps, LABELS_B6.repeat(2), num_views=2)
    assert [s.to_dict() for s in from_b] == [s.to_dict() for s in from_t]
    assert expand_labels([5, 7], 4, 2).tolist() == [5, 7, 5, 7]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_maps_are_computed_in_float64(dtype: torch.dtype) -> None:
    maps = random_maps(layers=1, heads=2, tokens=12, seed=5)
    low = [m.to(dtype) for m in maps]
    got = fusion_stats(low, LABELS_B6, num_views=2)[0]
    exact = fusion_stats([m.to(torch.float64) for m in low], LABELS_B6, num_views=2)[0]
    full = fusion_stats(maps, LABELS_B6, num_views=2)[0]
    assert got.to_dict() == exact.to_dict()  # same values, upcast before any arithmetic
    assert got.fusion_ratio == pytest.approx(full.fusion_ratio, rel=2e-2)
    assert got.same_class_per_head.dtype == torch.float64


def test_four_dimensional_and_single_head_inputs() -> None:
    maps = random_maps(layers=3, heads=2, tokens=6, seed=7)
    as_list = fusion_stats(maps, LABELS_B6)
    as_4d = fusion_stats(torch.stack(maps), LABELS_B6)
    assert [s.to_dict() for s in as_list] == [s.to_dict() for s in as_4d]
    (single,) = fusion_stats([maps[0][1]], LABELS_B6)  # a (T, T) map = one head
    assert single.num_heads == 1
    assert single.same_class == pytest.approx(as_list[0].same_class_per_head[1].item())


def test_large_batch_runs_vectorised() -> None:
    num_tokens, num_views = 4096, 2
    labels = torch.arange(num_tokens // num_views) % 10
    uniform = torch.full((1, num_tokens, num_tokens), 1.0 / num_tokens)
    (stats,) = fusion_stats([uniform], labels, num_views=num_views)
    assert stats.fusion_ratio == pytest.approx(1.0, abs=1e-9)
    assert stats.entropy == pytest.approx(math.log(num_tokens), abs=1e-6)


@pytest.mark.parametrize(
    ("maps", "labels", "num_views", "match"),
    [
        ([], LABELS_B6, 1, "maps: expected at least one layer"),
        ([torch.full((1, 6, 6), 1 / 6), torch.full((1, 4, 4), 1 / 4)], LABELS_B6, 1, "maps:"),
        ([torch.full((1, 6, 5), 1 / 5)], LABELS_B6, 1, r"maps\[0\]: expected a square"),
        ([torch.full((1, 6, 6), 1 / 6)], LABELS_B6, 4, r"num_views: .*not divisible"),
        ([torch.full((1, 6, 6), 1 / 6)], LABELS_B6, 0, "num_views: expected a positive"),
        ([torch.full((1, 6, 6), 1 / 6)], LABELS_B6[:5], 1, "labels: expected length"),
        ([torch.full((1, 6, 6), 1 / 6)], LABELS_B6.view(2, 3), 1, "labels: expected a 1-D"),
        ([torch.full((1, 6, 6), 1 / 6)], LABELS_B6.float(), 1, "labels: expected integer"),
        ([torch.full((1, 6, 6), 1.0)], LABELS_B6, 1, r"maps\[0\]\[0\]: rows must sum to 1"),
        ([torch.full((1, 6, 6), math.nan)], LABELS_B6, 1, r"maps\[0\]\[0\]: contains NaN"),
        ([torch.ones(1, 6, 6, dtype=torch.long)], LABELS_B6, 1, "floating-point"),
        ([torch.ones(1, 1, 6, 6) / 6], LABELS_B6, 1, r"maps\[0\]: expected a square"),
    ],
)
def test_bad_input_raises_value_error(maps, labels, num_views, match) -> None:
    with pytest.raises(ValueError, match=match):
        fusion_stats(maps, labels, num_views=num_views)


def test_negative_weights_and_inconsistent_view_labels_raise() -> None:
    attn = torch.full((1, 6, 6), 1 / 6)
    attn[0, 0, 0], attn[0, 0, 1] = -1 / 6, 3 / 6
    with pytest.raises(ValueError, match="negative"):
        fusion_stats([attn], LABELS_B6)
    labels_t = torch.tensor([0, 1, 0, 0, 1, 1])  # view 2 disagrees with view 1
    with pytest.raises(ValueError, match=r"labels: .*same label"):
        fusion_stats([torch.full((1, 6, 6), 1 / 6)], labels_t, num_views=2)


# ---------------------------------------------------------------------------------------------
# Reporting
# ---------------------------------------------------------------------------------------------


def test_summary_table_and_scalars() -> None:
    uniform = torch.full((2, 6, 6), 1 / 6)
    fused = block_diagonal_map(LABELS_B6, 1).expand(2, 6, 6)
    stats = fusion_stats([uniform, fused], LABELS_B6)
    summary = summarize(stats)
    assert summary["num_layers"] == 2 and summary["num_heads"] == 2
    assert summary["fusion_ratio"] == pytest.approx([1.0, 1 / stats[0].chance])
    assert summary["fusion_gain"] == pytest.approx(stats[1].fusion_ratio)
    assert json.loads(json.dumps(summary, allow_nan=False))["layers"][1]["layer"] == 2
    table = format_table(stats).splitlines()
    assert len(table) == 2 + len(stats)
    for column in ("layer", "same-class", "chance", "fusion ratio", "positive mass", "entropy"):
        assert column in table[0]
    assert table[2].split()[0] == "1" and table[3].split()[3] == f"{stats[1].fusion_ratio:.3f}"
    flat = scalar_metrics(stats, prefix="fz")
    assert flat["fz/layer2/fusion_ratio"] == pytest.approx(stats[1].fusion_ratio)
    assert all(isinstance(v, float) for v in flat.values())
    with pytest.raises(ValueError, match="stats"):
        summarize([])


# ---------------------------------------------------------------------------------------------
# Leave-one-out 1-NN ("unsupervised accuracy")
# ---------------------------------------------------------------------------------------------

# x0 ~ x2 (class 0), x1 ~ x3 (class 1), x4 = -x0 (class 0) is closest to x1 (cosine 0).
NN_EMB = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1], [0.1, 1.0], [-1.0, 0.0]])
NN_LABELS = torch.tensor([0, 1, 0, 1, 0])


@pytest.mark.parametrize(
    ("batch_size", "expected"),
    [
        (2, 0.0),  # chunks {x0,x1}, {x2,x3}: each neighbour is of the other class; x4 dropped
        (3, 2 / 3),  # chunk {x0,x1,x2}: x0<->x2 right, x1 -> x2 wrong; x3, x4 dropped
        (4, 1.0),  # chunk {x0..x3}: pairs found; x4 dropped
        (5, 0.8),  # whole set: x4 -> x1 wrong
        (None, 0.8),
    ],
)
def test_one_nn_accuracy_depends_on_batch(batch_size: int | None, expected: float) -> None:
    acc = leave_one_out_1nn_accuracy(NN_EMB, NN_LABELS, batch_size)
    assert acc == pytest.approx(expected)


def test_one_nn_drops_the_last_incomplete_batch_and_normalises() -> None:
    relabelled = NN_LABELS.clone()
    relabelled[4] = 1  # x4's neighbour x1 is now right: only seen when x4 is scored
    assert leave_one_out_1nn_accuracy(NN_EMB, relabelled, 4) == 1.0
    assert leave_one_out_1nn_accuracy(NN_EMB, relabelled, None) == 1.0
    assert leave_one_out_1nn_accuracy(NN_EMB, NN_LABELS, None) == pytest.approx(0.8)
    scaled = NN_EMB * torch.tensor([[10.0], [0.1], [3.0], [7.0], [2.0]])
    assert leave_one_out_1nn_accuracy(scaled, NN_LABELS, 3) == pytest.approx(2 / 3)


def test_one_nn_bad_input() -> None:
    with pytest.raises(ValueError, match="batch_size"):
        leave_one_out_1nn_accuracy(NN_EMB, NN_LABELS, 1)
    with pytest.raises(ValueError, match="batch_size: no complete batch"):
        leave_one_out_1nn_accuracy(NN_EMB, NN_LABELS, 6)
    with pytest.raises(ValueError, match="labels"):
        leave_one_out_1nn_accuracy(NN_EMB, NN_LABELS[:4], 2)
    with pytest.raises(ValueError, match="embeddings"):
        leave_one_out_1nn_accuracy(NN_EMB[:, 0], NN_LABELS, 2)


# ---------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------


def image_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.images]


def test_heatmap_sorts_by_class_and_draws_boundaries() -> None:
    maps = random_maps(layers=2, heads=3, tokens=12, seed=11)
    fig = attention_heatmap_figure(maps, LABELS_B6, num_views=2)
    axes = image_axes(fig)
    assert [ax.get_title() for ax in axes] == ["layer 1", "layer 2"]
    order = torch.argsort(LABELS_B6.repeat(2), stable=True)
    expected = maps[1].mean(0)[order][:, order].numpy()
    np.testing.assert_allclose(np.asarray(axes[1].images[0].get_array()), expected, rtol=1e-6)
    num_classes = 3
    assert len(axes[0].lines) == 2 * (num_classes - 1)  # one horizontal + one vertical each
    per_head = attention_heatmap_figure(maps, LABELS_B6, num_views=2, per_head=True)
    assert len(image_axes(per_head)) == 2 * 3
    assert image_axes(per_head)[5].get_title() == "layer 2, head 3"


def test_heatmap_class_names() -> None:
    maps = random_maps(layers=1, heads=1, tokens=6, seed=2)
    fig = attention_heatmap_figure(maps, LABELS_B6, class_names=["cat", "dog", "emu"])
    ticks = [t.get_text() for t in image_axes(fig)[0].get_xticklabels()]
    assert ticks == ["cat", "dog", "emu"]
    with pytest.raises(ValueError, match="class_names"):
        attention_heatmap_figure(maps, LABELS_B6, class_names=["cat", "dog"])


def test_heatmap_png_written_atomically(tmp_path) -> None:
    maps = random_maps(layers=2, heads=3, tokens=12, seed=13)
    avg_path = plot_attention_heatmaps(maps, LABELS_B6, tmp_path / "avg.png", num_views=2)
    head_path = plot_attention_heatmaps(
        maps, LABELS_B6, tmp_path / "sub" / "heads.png", num_views=2, per_head=True
    )
    for path in (avg_path, head_path):
        assert path.read_bytes()[:8] == PNG_MAGIC
    avg = matplotlib.image.imread(avg_path)
    heads = matplotlib.image.imread(head_path)
    assert avg.ndim == 3 and avg.shape[0] > 100 and avg.shape[1] > 100
    assert heads.shape[0] > avg.shape[0] and heads.shape[1] > avg.shape[1]
    assert avg.std() > 0  # not a blank canvas
    # overwrite in place, no temporary files left behind
    plot_attention_heatmaps(maps, LABELS_B6, avg_path, num_views=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["avg.png", "sub"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["heads.png"]


def test_fusion_ratio_plot(tmp_path) -> None:
    stats = fusion_stats(random_maps(layers=3, heads=1, tokens=6, seed=4), LABELS_B6)
    curves = {"epoch 1": [1.0, 1.2, None], "epoch 10": stats}
    fig = fusion_ratio_figure(curves)
    (ax,) = fig.axes
    assert len(ax.lines) == 3  # two curves and the chance line
    assert list(ax.lines[0].get_xdata()) == [1, 2, 3]
    assert list(ax.lines[1].get_ydata()) == pytest.approx([s.fusion_ratio for s in stats])
    assert math.isnan(ax.lines[0].get_ydata()[2])
    chance = ax.lines[2]
    assert chance.get_linestyle() == "--" and list(chance.get_ydata()) == [1.0, 1.0]
    assert [t.get_text() for t in ax.get_legend().get_texts()][:2] == ["epoch 1", "epoch 10"]
    path = plot_fusion_ratio(curves, tmp_path / "ratio.png")
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert matplotlib.image.imread(path).shape[:2] == (400, 600)  # 6 x 4 in at 100 dpi
    with pytest.raises(ValueError, match="curves"):
        plot_fusion_ratio({}, tmp_path / "empty.png")
    with pytest.raises(ValueError, match="curves"):
        fusion_ratio_figure({"a": []})
    assert not (tmp_path / "empty.png").exists()


def test_stats_type_is_exported() -> None:
    stats = fusion_stats([torch.full((1, 6, 6), 1 / 6)], LABELS_B6)
    assert isinstance(stats[0], FusionStats)
    assert set(stats[0].to_dict()) >= {"same_class", "chance", "fusion_ratio", "entropy"}


def test_fusion_package_is_host_free() -> None:
    code = (
        "import sys, solo_deepfusion.fusion\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'solo', 'lightning', 'hydra'})\n"
        "assert not bad, bad\n"
    )
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
