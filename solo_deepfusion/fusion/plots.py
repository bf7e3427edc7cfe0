"""Headless Deep Fusion plots: attention heat maps sorted by class, fusion ratio per layer.

Figures are built on matplotlib's ``Agg`` canvas directly (no ``pyplot``, no global state), so
they work without a display and from any thread. PNGs are written atomically: to a temporary
file in the target directory, then ``os.replace``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from solo_deepfusion.atomic import atomic_path

from .metrics import FusionStats, as_attention_maps, expand_labels

__all__ = [
    "attention_heatmap_figure",
    "fusion_ratio_figure",
    "plot_attention_heatmaps",
    "plot_fusion_ratio",
    "save_figure_atomic",
]

_CELL_INCHES = 3.0  # side of one heat map panel, the same with and without per_head
_MAX_TICKED_CLASSES = 30  # more classes than this: boundaries only, no tick labels
_QUANTILE_SAMPLE = 1 << 20  # values used to estimate the robust colour limit


def save_figure_atomic(fig: Figure, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Write ``fig`` as a PNG to ``path`` via a temporary file in the same directory."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    return Path(path)


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# --------------------------------------------------------------------------------------------
# Attention heat maps
# --------------------------------------------------------------------------------------------


def _class_order(labels: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """Stable permutation sorting tokens by label, the sorted class ids and their block sizes."""
    order = torch.argsort(labels, stable=True)
    classes, counts = torch.unique(labels, return_counts=True)  # sorted ascending
    return order, classes.tolist(), counts.tolist()


def _class_name(class_id: int, class_names: Sequence[str] | Mapping[int, str] | None) -> str:
    if class_names is None:
        return str(class_id)
    if isinstance(class_names, Mapping):
        return str(class_names.get(class_id, class_id))
    if not 0 <= class_id < len(class_names):
        raise ValueError(
            f"class_names: has {len(class_names)} entries, no name for class id {class_id}"
        )
    return str(class_names[class_id])


def _colour_limit(image: np.ndarray, robust: bool) -> float:
    """Upper colour limit: the 99th percentile (robust) or the maximum; never 0."""
    flat = image.ravel()
    if robust:
        step = max(1, flat.size // _QUANTILE_SAMPLE)
        vmax = float(np.quantile(flat[::step], 0.99))
    else:
        vmax = float(flat.max())
    return vmax if vmax > 0 else float(flat.max()) or 1.0


def _draw_heatmap(ax: Any, image: np.ndarray, title: str, blocks: dict[str, Any], robust: bool):
    vmax = _colour_limit(image, robust)
    artist = ax.imshow(image, cmap="viridis", vmin=0.0, vmax=vmax, interpolation="nearest")
    for edge in blocks["edges"]:
        ax.axhline(edge, color="white", linewidth=0.6)
        ax.axvline(edge, color="white", linewidth=0.6)
    ax.set_title(title)
    if blocks["ticks"]:
        ax.set_xticks(blocks["centres"], blocks["names"], rotation=90, fontsize=7)
        ax.set_yticks(blocks["centres"], blocks["names"], fontsize=7)
    else:
        ax.set_xticks([])
        ax.set_yticks([])
    return artist


def _blocks(counts: list[int], names: list[str]) -> dict[str, Any]:
    ends = np.cumsum(counts)
    starts = ends - np.asarray(counts)
    return {
        "edges": [float(e) - 0.5 for e in ends[:-1]],
        "centres": [float(s + e - 1) / 2 for s, e in zip(starts, ends, strict=True)],
        "names": names,
        "ticks": len(counts) <= _MAX_TICKED_CLASSES,
    }


def attention_heatmap_figure(
    maps: Sequence[torch.Tensor] | torch.Tensor,
    labels: Any,
    *,
    num_views: int = 1,
    per_head: bool = False,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    robust: bool = True,
) -> Figure:
    """Heat maps of attention with rows and columns sorted by class (stable), one panel per layer.

    Heads are averaged unless ``per_head`` (then one row of panels per layer, one column per
    head, titled "layer k, head h"; else a grid of panels titled "layer k", k 1-based). White
    lines mark class boundaries; Deep Fusion shows as a block-diagonal pattern. Colours run from
    0 to the 99th percentile of each panel (``robust``) or its maximum, so that the self/positive
    entries do not wash the rest out. ``labels`` and ``num_views`` follow
    :func:`~solo_deepfusion.fusion.metrics.fusion_stats`.
    """
    layers = as_attention_maps(maps)
    num_layers, num_heads, num_tokens = len(layers), *layers[0].shape[:2]
    tokens = expand_labels(labels, num_tokens, num_views).cpu()
    order, classes, counts = _class_order(tokens)
    blocks = _blocks(counts, [_class_name(c, class_names) for c in classes])
    if per_head:
        nrows, ncols = num_layers, num_heads
    else:
        ncols = min(num_layers, 4)
        nrows = math.ceil(num_layers / ncols)
    colorbar_room = 1.0 if per_head else 1.2  # averaged panels carry a colour bar each
    fig = _new_figure(_CELL_INCHES * ncols * colorbar_room, _CELL_INCHES * nrows)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for index, layer in enumerate(layers):
        sorted_layer = layer.detach().to("cpu", torch.float32)[:, order][:, :, order]
        if per_head:
            for head in range(num_heads):
                title = f"layer {index + 1}, head {head + 1}"
                _draw_heatmap(axes[index, head], sorted_layer[head].numpy(), title, blocks, robust)
        else:
            ax = axes.flat[index]
            image = sorted_layer.mean(0).numpy()
            artist = _draw_heatmap(ax, image, f"layer {index + 1}", blocks, robust)
            fig.colorbar(artist, ax=ax, shrink=0.8)
    for ax in axes.flat[num_layers * (num_heads if per_head else 1) :]:
        ax.set_visible(False)
    return fig


def plot_attention_heatmaps(
    maps: Sequence[torch.Tensor] | torch.Tensor,
    labels: Any,
    path: str | os.PathLike[str],
    *,
    num_views: int = 1,
    per_head: bool = False,
    class_names: Sequence[str] | Mapping[int, str] | None = None,
    robust: bool = True,
    dpi: int = 100,
) -> Path:
    """Write :func:`attention_heatmap_figure` as a PNG at ``path`` (atomically); return the path."""
    fig = attention_heatmap_figure(
        maps,
        labels,
        num_views=num_views,
        per_head=per_head,
        class_names=class_names,
        robust=robust,
    )
    return save_figure_atomic(fig, path, dpi=dpi)


# --------------------------------------------------------------------------------------------
# Fusion ratio per layer
# --------------------------------------------------------------------------------------------


def _curve_values(name: str, values: Sequence[Any]) -> list[float]:
    """Per-layer fusion ratios from floats (``None`` = missing) or :class:`FusionStats`."""
    if len(values) == 0:
        raise ValueError(f"curves[{name!r}]: expected at least one per-layer value, got none")
    out = []
    for value in values:
        if isinstance(value, FusionStats):
            value = value.fusion_ratio
        out.append(math.nan if value is None else float(value))
    return out


def fusion_ratio_figure(curves: Mapping[str, Sequence[Any]], *, title: str | None = None) -> Figure:
    """Fusion ratio against layer (1-based), one line per curve, a dashed line at chance (1.0).

    ``curves`` maps a label (e.g. ``"epoch 10"``) to per-layer fusion ratios (floats, ``None``
    for missing, or :class:`FusionStats`); missing values leave gaps.
    """
    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("curves: expected a non-empty mapping of label -> per-layer ratios")
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    longest = 1
    for name, values in curves.items():
        ratios = _curve_values(str(name), values)
        layers = np.arange(1, len(ratios) + 1)
        ax.plot(layers, ratios, marker="o", label=str(name))
        longest = max(longest, len(ratios))
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1.0, label="chance (1.0)")
    ax.set_xticks(np.arange(1, longest + 1))
    ax.set_xlabel("layer")
    ax.set_ylabel("fusion ratio (same-class / chance)")
    ax.set_title(title or "Deep Fusion by layer")
    ax.legend(fontsize=8)
    return fig


def plot_fusion_ratio(
    curves: Mapping[str, Sequence[Any]],
    path: str | os.PathLike[str],
    *,
    title: str | None = None,
    dpi: int = 100,
) -> Path:
    """Write :func:`fusion_ratio_figure` as a PNG at ``path`` (atomically); return the path."""
    return save_figure_atomic(fusion_ratio_figure(curves, title=title), path, dpi=dpi)
