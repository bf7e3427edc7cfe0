"""Host-free Deep Fusion metrics: how much a transformer head's batch attention follows the classes.

Input format (what the transformer projection head returns when asked for its attention):

* ``maps``: one tensor per layer, each ``(heads, T, T)`` (a single ``(T, T)`` map counts as one
  head; a ``(layers, heads, T, T)`` tensor is also accepted). Row ``q`` is query ``q``'s softmax
  distribution over the keys, so rows sum to 1; masked keys hold exactly 0.
* Token layout, view-major: with ``B`` samples and ``V`` views, ``T = V * B`` and sample ``i`` of
  view ``v`` is token ``v * B + i``.
* ``labels``: class ids, ``(B,)`` (repeated for every view) or ``(T,)``.

Per query ``q`` (sample ``i``), the *related* keys are ``q`` itself and ``q``'s own other views,
i.e. the tokens ``v * B + i`` for every view ``v``. They always share ``q``'s label, so they are
left out of the class measure and reported separately (``self_mass``, ``positive_mass``).
See :func:`fusion_stats` for the exact definitions.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "FusionStats",
    "as_attention_maps",
    "expand_labels",
    "format_table",
    "fusion_stats",
    "leave_one_out_1nn_accuracy",
    "scalar_metrics",
    "summarize",
]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------------------------
# Input checking
# --------------------------------------------------------------------------------------------


def as_attention_maps(maps: Sequence[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
    """Check the shapes of ``maps`` and return it as a list of ``(heads, T, T)`` tensors.

    Raises ``ValueError`` when there is no layer, or a layer is not 2-D/3-D, not square in its
    last two dimensions, not floating point, or of another shape than the first layer. (The
    values are checked by :func:`fusion_stats`, one head at a time.)
    """
    if isinstance(maps, torch.Tensor):
        if maps.dim() == 4:
            maps = list(maps.unbind(0))
        elif maps.dim() in (2, 3):
            maps = [maps]
        else:
            raise ValueError(
                "maps: expected a list of (heads, T, T) tensors or a (layers, heads, T, T) tensor, "
                f"got a tensor of shape {tuple(maps.shape)}"
            )
    layers = [torch.as_tensor(m) for m in maps]
    if not layers:
        raise ValueError("maps: expected at least one layer, got an empty sequence")
    out = []
    for index, layer in enumerate(layers):
        if layer.dim() == 2:
            layer = layer.unsqueeze(0)
        if layer.dim() != 3 or layer.shape[-1] != layer.shape[-2]:
            raise ValueError(
                f"maps[{index}]: expected a square (heads, T, T) attention map with queries and "
                f"keys in the same token order, got shape {tuple(layer.shape)}"
            )
        if out and layer.shape != out[0].shape:
            raise ValueError(
                f"maps: layers have inconsistent shapes, maps[0] is {tuple(out[0].shape)} but "
                f"maps[{index}] is {tuple(layer.shape)}"
            )
        if not layer.is_floating_point():
            raise ValueError(f"maps[{index}]: expected a floating-point tensor, got {layer.dtype}")
        if layer.numel() == 0:
            raise ValueError(f"maps[{index}]: empty attention map of shape {tuple(layer.shape)}")
        out.append(layer)
    return out


def _check_head(a: torch.Tensor, row_sums: torch.Tensor, tol: float, where: str) -> None:
    """Rows of a float64 head must be finite, non-negative and sum to 1 within ``tol``."""
    if not torch.isfinite(row_sums).all():
        raise ValueError(f"{where}: contains NaN or infinite values")
    if a.min() < 0:
        raise ValueError(f"{where}: contains negative values (expected softmax weights)")
    if ((row_sums - 1).abs() > tol).any():
        raise ValueError(
            f"{where}: rows must sum to 1 (softmax probabilities), got row sums in "
            f"[{row_sums.min().item():.4g}, {row_sums.max().item():.4g}]"
        )


def expand_labels(labels: Any, num_tokens: int, num_views: int = 1) -> torch.Tensor:
    """Return the ``(T,)`` per-token labels for ``T = num_tokens`` view-major tokens.

    ``labels`` may be ``(B,)`` with ``B = T / num_views`` (repeated once per view) or ``(T,)``; a
    ``(T,)`` input must give every view of a sample the same label, else the token layout is wrong.
    """
    if not isinstance(num_views, int) or num_views < 1:
        raise ValueError(f"num_views: expected a positive int, got {num_views!r}")
    if num_tokens % num_views:
        raise ValueError(
            f"num_views: the number of tokens T={num_tokens} is not divisible by "
            f"num_views={num_views}"
        )
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"labels: expected a 1-D tensor, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex():
        raise ValueError(f"labels: expected integer class ids, got dtype {labels.dtype}")
    batch = num_tokens // num_views
    if labels.numel() == batch:
        return labels.repeat(num_views)
    if labels.numel() == num_tokens:
        per_view = labels.view(num_views, batch)
        if not (per_view == per_view[:1]).all():
            raise ValueError(
                "labels: a (T,) label vector must give all views of a sample the same label "
                f"(view-major layout, token v*B+i with B={batch})"
            )
        return labels
    raise ValueError(
        f"labels: expected length B={batch} or T={num_tokens} (num_views={num_views}), "
        f"got {labels.numel()}"
    )


# --------------------------------------------------------------------------------------------
# Per-layer statistics
# --------------------------------------------------------------------------------------------


@dataclass
class FusionStats:
    """Deep Fusion statistics of one layer; ``*_per_head`` are ``(heads,)`` float64 CPU tensors.

    Definitions (query ``q``, attention ``A``, related keys ``R(q)`` = ``q`` and its other views):

    * ``same_class``: mean over heads of ``same_class_per_head[h]``, which is the mean over
      queries of ``S_q = sum_{k not in R(q), y_k = y_q} A[q,k] / sum_{k not in R(q)} A[q,k]``.
      Rows with no attention outside ``R(q)`` are skipped; a head with no usable row is NaN and
      heads that are NaN are left out of the mean (NaN when all are).
    * ``chance``: ``C_q = #{k not in R(q): y_k = y_q} / #{k not in R(q)}``, what uniform attention
      gives, averaged over the same rows as ``S`` per head (all rows when none is usable), then
      over the heads that count for ``same_class``.
    * ``fusion_ratio = same_class / chance`` (1: no class preference; > 1: Deep Fusion).
      ``fusion_ratio_per_head[h] = same_class_per_head[h] / chance_per_head[h]``.
    * ``positive_mass``: mean over queries of the attention on ``q``'s own other views (0 when
      ``num_views == 1``).
    * ``self_mass``: mean of ``A[q,q]``.
    * ``entropy``: mean row entropy ``-sum_k A[q,k] log A[q,k]`` in nats (``0 log 0 = 0``);
      ``normalized_entropy`` divides it by ``log T`` (1 = uniform over all keys).
    * ``valid_fraction``: fraction of (head, query) rows that count for ``same_class``.

    ``layer`` is 1-based.
    """

    layer: int
    num_heads: int
    num_tokens: int
    num_views: int
    same_class_per_head: torch.Tensor
    chance_per_head: torch.Tensor
    fusion_ratio_per_head: torch.Tensor
    positive_mass_per_head: torch.Tensor
    self_mass_per_head: torch.Tensor
    entropy_per_head: torch.Tensor
    same_class: float
    chance: float
    fusion_ratio: float
    positive_mass: float
    self_mass: float
    entropy: float
    normalized_entropy: float
    valid_fraction: float

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values (floats, lists of floats, ints) for JSON; NaN becomes ``None``."""
        out: dict[str, Any] = {}
        for name, value in self.__dict__.items():
            if isinstance(value, torch.Tensor):
                out[name] = [_json_float(v) for v in value.tolist()]
            elif isinstance(value, float):
                out[name] = _json_float(value)
            else:
                out[name] = value
        return out


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else float(value)


@dataclass
class _Tokens:
    """What all heads of a batch share: layout, class indices and per-query chance level."""

    num_views: int
    related: torch.Tensor  # (T, V, 1) column, within its view, of each query's related keys
    own_view: torch.Tensor  # (T, 1) which of the V related keys is the query itself
    classes: torch.Tensor  # (T,) labels mapped to 0..C-1
    num_classes: int
    chance: torch.Tensor  # (T,) float64 C_q


def _tokens(labels: torch.Tensor, num_views: int) -> _Tokens:
    num_tokens = labels.numel()
    batch = num_tokens // num_views
    index = torch.arange(num_tokens, device=labels.device)
    related = (index % batch).view(num_tokens, 1, 1).expand(num_tokens, num_views, 1)
    values, classes, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    unrelated_count = num_tokens - num_views  # the V related keys all share q's label
    if unrelated_count:
        chance = (counts[classes].to(torch.float64) - num_views) / unrelated_count
    else:  # a single sample: no unrelated key at all
        chance = torch.full((num_tokens,), math.nan, dtype=torch.float64, device=labels.device)
    return _Tokens(
        num_views=num_views,
        related=related,
        own_view=(index // batch).unsqueeze(1),
        classes=classes,
        num_classes=values.numel(),
        chance=chance,
    )


def _head_stats(attn: torch.Tensor, tokens: _Tokens, where: str) -> dict[str, float]:
    """Statistics of one ``(T, T)`` head, computed in float64 without a loop over tokens."""
    tol = 5e-2 if attn.dtype in _LOW_PRECISION else 1e-2
    a = attn.to(torch.float64, copy=True)
    num_tokens = a.shape[0]
    _check_head(a, a.sum(-1), tol, where)
    entropy = torch.special.entr(a).sum(-1).mean().item()
    by_view = a.view(num_tokens, tokens.num_views, -1)  # [q, v, i] = A[q, v*B + i]
    related = by_view.gather(2, tokens.related).squeeze(2)  # (T, V)
    own = related.gather(1, tokens.own_view).squeeze(1)  # A[q, q]
    positive = related.sum(1) - own
    by_view.scatter_(2, tokens.related, 0.0)  # from here on `a` holds unrelated keys only
    unrelated = a.sum(-1)
    per_class = a.new_zeros(num_tokens, tokens.num_classes).index_add_(1, tokens.classes, a)
    same = per_class.gather(1, tokens.classes.unsqueeze(1)).squeeze(1)
    valid = unrelated > 0
    if valid.any():
        same_class = (same[valid] / unrelated[valid]).mean().item()
        chance = tokens.chance[valid].mean().item()
    else:
        same_class, chance = math.nan, tokens.chance.mean().item()
    return {
        "same_class": same_class,
        "chance": chance,
        "positive_mass": positive.mean().item(),
        "self_mass": own.mean().item(),
        "entropy": entropy,
        "valid": float(valid.sum().item()),
    }


def _layer_stats(layer: torch.Tensor, tokens: _Tokens, index: int) -> FusionStats:
    heads = [_head_stats(head, tokens, f"maps[{index}][{h}]") for h, head in enumerate(layer)]

    def per_head(key: str) -> torch.Tensor:
        return torch.tensor([h[key] for h in heads], dtype=torch.float64)

    same_h, chance_h = per_head("same_class"), per_head("chance")
    counted = ~torch.isnan(same_h)
    if counted.any():
        same_class = same_h[counted].mean().item()
        chance = chance_h[counted].mean().item()
    else:
        same_class, chance = math.nan, chance_h.mean().item()
    num_heads, num_tokens = layer.shape[0], layer.shape[-1]
    entropy_h = per_head("entropy")
    entropy = entropy_h.mean().item()
    log_t = math.log(num_tokens)
    return FusionStats(
        layer=index + 1,
        num_heads=num_heads,
        num_tokens=num_tokens,
        num_views=tokens.num_views,
        same_class_per_head=same_h,
        chance_per_head=chance_h,
        fusion_ratio_per_head=same_h / chance_h,
        positive_mass_per_head=per_head("positive_mass"),
        self_mass_per_head=per_head("self_mass"),
        entropy_per_head=entropy_h,
        same_class=same_class,
        chance=chance,
        fusion_ratio=_ratio(same_class, chance),
        positive_mass=per_head("positive_mass").mean().item(),
        self_mass=per_head("self_mass").mean().item(),
        entropy=entropy,
        normalized_entropy=entropy / log_t if log_t > 0 else math.nan,
        valid_fraction=per_head("valid").sum().item() / (num_heads * num_tokens),
    )


def _ratio(num: float, den: float) -> float:
    if math.isnan(num) or math.isnan(den) or den == 0:
        return math.nan
    return num / den


@torch.no_grad()
def fusion_stats(
    maps: Sequence[torch.Tensor] | torch.Tensor, labels: Any, num_views: int = 1
) -> list[FusionStats]:
    """Per-layer Deep Fusion statistics of a batch's attention maps (see :class:`FusionStats`).

    ``maps``: one ``(heads, T, T)`` softmax map per layer, tokens view-major (``v * B + i``);
    ``labels``: ``(B,)`` or ``(T,)`` class ids; ``num_views``: ``V`` with ``T = V * B``.

    The class measure leaves out each query's *related* keys (itself and its own other views),
    renormalising over the rest: ``S_q = mass on unrelated same-class keys / mass on unrelated
    keys``; rows with no unrelated mass (e.g. a map that attends only to positives) are skipped.
    ``fusion_ratio = mean S / mean C`` where ``C_q`` is the same-class share of the unrelated keys
    (uniform attention gives exactly 1). Everything is computed in float64, one head at a time
    (no loop over tokens), on the maps' device; results are CPU tensors / python floats.
    """
    layers = as_attention_maps(maps)
    num_tokens = layers[0].shape[-1]
    device = layers[0].device
    tokens = expand_labels(labels, num_tokens, num_views).to(device)
    shared = _tokens(tokens, num_views)
    return [_layer_stats(layer, shared, i) for i, layer in enumerate(layers)]


# --------------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------------

_SUMMARY_KEYS = (
    "same_class",
    "chance",
    "fusion_ratio",
    "positive_mass",
    "self_mass",
    "entropy",
    "normalized_entropy",
)


def summarize(stats: Sequence[FusionStats]) -> dict[str, Any]:
    """JSON-ready summary: one list (over layers) per metric, plus first/last fusion ratios.

    ``fusion_gain`` is ``last / first`` layer fusion ratio (NaN → ``None`` throughout).
    """
    if not stats:
        raise ValueError("stats: expected at least one FusionStats, got an empty sequence")
    first, last = stats[0], stats[-1]
    out: dict[str, Any] = {
        "num_layers": len(stats),
        "num_heads": first.num_heads,
        "num_tokens": first.num_tokens,
        "num_views": first.num_views,
    }
    for key in _SUMMARY_KEYS:
        out[key] = [_json_float(getattr(s, key)) for s in stats]
    out["first_fusion_ratio"] = _json_float(first.fusion_ratio)
    out["last_fusion_ratio"] = _json_float(last.fusion_ratio)
    out["fusion_gain"] = _json_float(_ratio(last.fusion_ratio, first.fusion_ratio))
    out["layers"] = [s.to_dict() for s in stats]
    return out


def scalar_metrics(stats: Sequence[FusionStats], prefix: str = "fusion") -> dict[str, float]:
    """Flat ``{"<prefix>/layer<k>/<metric>": value}`` floats for loggers (NaN kept as NaN)."""
    return {
        f"{prefix}/layer{s.layer}/{key}": float(getattr(s, key))
        for s in stats
        for key in _SUMMARY_KEYS
    }


def format_table(stats: Sequence[FusionStats]) -> str:
    """Fixed-width text table: layer, same-class, chance, fusion ratio, positive mass, entropy."""
    header = ("layer", "same-class", "chance", "fusion ratio", "positive mass", "entropy")
    rows = [
        (
            str(s.layer),
            f"{s.same_class:.4f}",
            f"{s.chance:.4f}",
            f"{s.fusion_ratio:.3f}",
            f"{s.positive_mass:.4f}",
            f"{s.entropy:.3f}",
        )
        for s in stats
    ]
    widths = [max(len(r[c]) for r in (header, *rows)) for c in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    head = "  ".join(cell.rjust(w) for cell, w in zip(header, widths, strict=True))
    return "\n".join([head, "-" * len(head), *lines])


# --------------------------------------------------------------------------------------------
# The authors' "unsupervised accuracy"
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def leave_one_out_1nn_accuracy(
    embeddings: torch.Tensor, labels: Any, batch_size: int | None
) -> float:
    """Leave-one-out 1-NN accuracy by cosine similarity, within evaluation batches.

    ``embeddings`` ``(N, D)`` are head outputs the caller produced batch-wise (the head is
    transductive: an embedding depends on its batch). They are L2-normalised; each sample's
    neighbour is the most similar *other* sample of its batch, i.e. of its consecutive chunk of
    ``batch_size`` rows. As in the authors' code (``drop_last=True``), the last incomplete chunk
    is dropped: only ``(N // batch_size) * batch_size`` samples are scored. ``batch_size=None``
    searches the whole set. Returns the fraction whose neighbour has the same label; ties go
    to the lowest index.
    """
    emb = torch.as_tensor(embeddings)
    if emb.dim() != 2 or not emb.is_floating_point():
        raise ValueError(
            f"embeddings: expected a floating (N, D) tensor, got {emb.dtype} "
            f"of shape {tuple(emb.shape)}"
        )
    labels = torch.as_tensor(labels, device=emb.device)
    if labels.dim() != 1 or labels.numel() != emb.shape[0]:
        raise ValueError(
            f"labels: expected shape ({emb.shape[0]},) to match embeddings, "
            f"got {tuple(labels.shape)}"
        )
    num = emb.shape[0]
    if num < 2:
        raise ValueError(f"embeddings: expected at least 2 rows to find neighbours, got {num}")
    try:
        size = num if batch_size is None else operator.index(batch_size)
    except TypeError:
        size = -1
    if size < 2:
        raise ValueError(f"batch_size: expected an int >= 2 or None, got {batch_size!r}")
    if num < size:
        raise ValueError(
            f"batch_size: no complete batch of {size} among {num} embeddings (the last "
            "incomplete batch is dropped)"
        )
    if emb.dtype != torch.float64:
        emb = emb.float()  # float16/bfloat16 similarities in float32
    emb = F.normalize(emb, dim=1)
    correct = 0
    chunks = num // size
    for c in range(chunks):
        block = slice(c * size, (c + 1) * size)
        correct += _nn_hits(emb[block], labels[block])
    return correct / (chunks * size)


def _nn_hits(emb: torch.Tensor, labels: torch.Tensor, query_block: int = 2048) -> int:
    """Count samples of ``emb`` whose nearest other sample (cosine) has the same label."""
    hits = 0
    for start in range(0, emb.shape[0], query_block):
        sim = emb[start : start + query_block] @ emb.T
        rows = torch.arange(sim.shape[0], device=emb.device)
        sim[rows, rows + start] = -math.inf
        neighbour = sim.argmax(dim=1)
        hits += (labels[neighbour] == labels[start : start + query_block]).sum().item()
    return hits
