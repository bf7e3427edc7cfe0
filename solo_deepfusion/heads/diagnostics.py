"""Signs that a Deep Fusion head is collapsing, measured on one batch of its own input.

>>> stats = collapse_stats(head, feats, num_views=2)       # feats: what the head was fed
>>> stats.entropy, stats.logit_std, stats.output_cosine   # per layer, per layer, one number
>>> stats.output_rank                                      # effective rank of the outputs
>>> stats.warning()                                        # a sentence, or None when healthy

A saturated layer has row entropy near 0 nats (each query attends to one key) and a large
spread of attention logits; a collapsed head maps every sample to nearly the same vector
(mean cosine between different samples' outputs near 1). A uniform layer has entropy
``log(keys)``. Thresholds: :data:`MIN_ENTROPY` and :data:`MAX_OUTPUT_COSINE`.

The cosine cannot tell a collapse from a direction that every output shares on top of real
spread, and some losses never see such a direction (VICReg's and Barlow Twins' terms are the
same if one vector is added to every output). The effective rank of the centred outputs sees
only the spread: near 1 when the outputs vary along one line, larger the more directions
they use. It has no threshold: compare it with the stock MLP head's under the same recipe.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from solo_deepfusion.heads.transformer import TransformerProjector

MIN_ENTROPY = 0.5  # nats: below it a layer's attention is close to one-hot
MAX_OUTPUT_COSINE = 0.9  # above it different samples' outputs are close to one vector


@dataclass(frozen=True)
class CollapseStats:
    """Per-layer mean attention row entropy (nats) and logit std; the outputs' mean cosine
    and effective rank."""

    entropy: tuple[float, ...]
    logit_std: tuple[float, ...]
    output_cosine: float
    output_rank: float

    def warning(self) -> str | None:
        """One sentence naming what crossed its threshold, or ``None``."""
        problems = [
            f"layer {i} attention entropy {h:.2f} nats (< {MIN_ENTROPY})"
            for i, h in enumerate(self.entropy, start=1)
            if h < MIN_ENTROPY
        ]
        if self.output_cosine > MAX_OUTPUT_COSINE:
            problems.append(
                f"mean cosine of different samples' outputs {self.output_cosine:.2f} "
                f"(> {MAX_OUTPUT_COSINE})"
            )
        if not problems:
            return None
        return "the Deep Fusion head is collapsing: " + "; ".join(problems)

    def scalars(self, prefix: str = "collapse") -> dict[str, float]:
        """Flat ``{name: value}`` for a logger: ``<prefix>/layer<k>/entropy`` and so on."""
        out = {
            f"{prefix}/output_cosine": self.output_cosine,
            f"{prefix}/output_rank": self.output_rank,
        }
        for i, (h, s) in enumerate(zip(self.entropy, self.logit_std, strict=True), start=1):
            out[f"{prefix}/layer{i}/entropy"] = h
            out[f"{prefix}/layer{i}/logit_std"] = s
        return out


def _row_entropy(weights: torch.Tensor) -> float:
    """Mean over heads and rows of ``-sum_j w_ij log w_ij`` (``0 log 0 = 0``)."""
    return float(-(weights * weights.clamp_min(1e-30).log()).sum(-1).mean())


def _logit_std(logits: torch.Tensor) -> float:
    """Mean over heads and rows of the std of the allowed (finite) logits across keys."""
    allowed = torch.isfinite(logits)
    count = allowed.sum(-1).clamp_min(1)
    values = logits.masked_fill(~allowed, 0.0)
    mean = values.sum(-1) / count
    var = ((values - mean[..., None]) * allowed).square().sum(-1) / count
    return float(var.sqrt().mean())


def output_cosine(out: torch.Tensor, num_views: int = 1) -> float:
    """Mean cosine between outputs of different samples (other views of a sample excluded).

    ``out`` holds ``num_views`` blocks of the same samples in the same order; any head's output
    can be measured, so an MLP head gives the reference for a transformer's.
    """
    tokens = out.shape[0]
    sample = torch.arange(tokens, device=out.device) % (tokens // num_views)
    different = sample[:, None] != sample[None, :]
    if not different.any():
        return float("nan")
    unit = F.normalize(out.float(), dim=-1)
    return float((unit @ unit.T)[different].mean())


def output_rank(out: torch.Tensor) -> float:
    """Effective rank of the centred outputs: ``exp`` of the entropy of their normalised
    singular values (Roy & Vetterli, 2007; RankMe, Garrido et al., 2023, without centring).

    Between 1 (every output on one line through their mean) and ``min(T - 1, D)``; 0 when all
    outputs are the same vector. Centring leaves out the direction they all share.
    """
    out = out.double()
    singular = torch.linalg.svdvals(out - out.mean(dim=0))
    total = singular.sum()
    if total <= 1e-12 * torch.linalg.matrix_norm(out):  # rounding, not spread
        return 0.0
    p = singular / total
    return float(torch.exp(-(p * p.clamp_min(1e-300).log()).sum()))


@torch.no_grad()
def collapse_stats(
    head: TransformerProjector,
    x: torch.Tensor,
    *,
    num_views: int = 1,
    tail: nn.Module | None = None,
) -> CollapseStats:
    """Run ``head`` once on ``x`` (no gradients) and measure every layer and the output.

    ``tail`` is what the method applies to the head's output before its loss (MoCo v3's last
    BatchNorm); the output cosine and rank are measured after it, on what the loss sees.
    """
    inputs: list[tuple[torch.Tensor, Any]] = []
    hooks = [
        block.register_forward_pre_hook(lambda _, args: inputs.append(args[:2]))
        for block in head.blocks
    ]
    try:
        out = head(x, num_views=num_views)
    finally:
        for hook in hooks:
            hook.remove()
    entropy, logit_std = [], []
    for block, (h, allowed) in zip(head.blocks, inputs, strict=True):
        logits = block.attn.logits(block.attention_input(h), allowed)
        entropy.append(_row_entropy(logits.softmax(dim=-1)))
        logit_std.append(_logit_std(logits))
    if tail is not None:
        out = tail(out)
    return CollapseStats(
        tuple(entropy), tuple(logit_std), output_cosine(out, num_views), output_rank(out)
    )
