"""The Deep Fusion projection head: a transformer whose tokens are the samples of the batch.

Example::

    head = TransformerProjector(512, 128, dim=128, depth=4, heads=4, ffn_dim=512)
    feats = torch.randn(2 * 256, 512)          # two views of 256 samples, view-major
    z = head(feats, num_views=2)               # (512, 128); every row attended to all 512 rows
    z, maps = head(feats, num_views=2, return_attention=True)   # maps[l]: (heads, 512, 512)

There is no positional encoding, so the head is permutation-equivariant over samples.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from solo_deepfusion.heads.distributed import distributed_world, gather_tokens
from solo_deepfusion.validation import check_choice, check_flag, check_int, check_number

CONTEXTS = ("joint", "view")
# What normalises the tokens right after ``in_proj`` (``True``/``False``: older configs' spelling).
INPUT_NORMS = {"none": nn.Identity, "layer": nn.LayerNorm, "batch": nn.BatchNorm1d}
LEGACY_INPUT_NORMS = {True: "layer", False: "none"}
# What normalises the output: ``batch`` is MoCo v3's and SimSiam's last BatchNorm (no affine).
OUTPUT_NORMS = {"none": nn.Identity, "batch": functools.partial(nn.BatchNorm1d, affine=False)}
MASKS = ("none", "self", "positives")
# How a token combines the batch: learned softmax ``attention``; ``mean``, fixed uniform weights
# over the keys the mask allows (mixing without selection); ``none``, only its own value (no
# sample sees another). ``mean`` and ``none`` keep every parameter: they are controls.
MIXINGS = ("attention", "mean", "none")
# Attention logits: scaled ``dot`` products, or ``cosine`` similarities of L2-normalised queries
# and keys times a learnable per-head scale (bounded: at most ``MAX_LOGIT_SCALE``).
ATTENTION_LOGITS = ("dot", "cosine")
MAX_LOGIT_SCALE = 100.0
# How W_q and W_k start: ``xavier``; ``identity``, the same orthogonal matrix for both, so that
# W_q^T W_k = I and attention starts as a soft kNN over the features; ``tied``, one matrix for
# both, kept shared (q = k), orthogonal at first.
QK_INITS = ("xavier", "identity", "tied")
BLOCK_NORMS = {"layer": nn.LayerNorm, "batch": nn.BatchNorm1d}
NORMS = ("post", "pre")
ACTIVATIONS: dict[str, type[nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


@dataclass(frozen=True)
class ParamGroupRule:
    """Optimizer settings, relative to the head's group, for the head's parameters whose name
    (as in ``named_parameters()``) matches the ``fnmatch`` ``pattern``: an lr multiplier, and
    ``decay=False`` for no weight decay and no LARS adaptation."""

    name: str
    pattern: str
    lr_scale: float = 1.0
    decay: bool = True


class NonFiniteOutputError(ValueError):
    """The head's output holds NaN or Inf although its input was finite: training diverged,
    or the input's scale overflows the head's dtype."""


@functools.lru_cache(maxsize=16)
def attention_mask(
    mask: str,
    num_tokens: int,
    num_views: int,
    rank: int,
    world_size: int,
    device: torch.device,
) -> torch.Tensor | None:
    """Boolean ``(T_local, T_global)`` mask, ``True`` where a query may attend, or ``None``.

    Rank ``r`` holds tokens ``r*T .. (r+1)*T-1`` of the gathered sequence; within a rank the
    tokens are view-major, so local token ``t`` is sample ``t % (T // num_views)`` of that rank.
    ``self`` hides a token from itself; ``positives`` also hides the other views of its sample.
    """
    if mask == "none":
        return None
    per_view = num_tokens // num_views
    local = torch.arange(num_tokens, device=device)
    keys = torch.arange(num_tokens * world_size, device=device)
    if mask == "self":
        return keys[None, :] != (local + rank * num_tokens)[:, None]
    query_sample = rank * per_view + local % per_view
    key_sample = (keys // num_tokens) * per_view + (keys % num_tokens) % per_view
    return key_sample[None, :] != query_sample[:, None]


class BatchSelfAttention(nn.Module):
    """Multi-head softmax self-attention across the rows (samples) of a ``(T, dim)`` input.

    Queries are this rank's tokens; keys and values are gathered from every rank when
    ``gather_distributed`` is set, so the context is the global batch. ``qk_norm`` applies a
    LayerNorm to each head's queries and keys, which bounds the attention logits however large
    the input grows. ``centred`` subtracts from every query's output the plain mean of the values
    it may attend to: what uniform attention gives, the same batch mean for every token.
    ``mixing`` (:data:`MIXINGS`) replaces the learned weights by uniform ones (``mean``) or by
    each token's own value (``none``); queries and keys are then computed but unused.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        dropout: float,
        gather_distributed: bool,
        qk_norm: bool,
        centred: bool = False,
        mixing: str = "attention",
        attention_logits: str = "dot",
        logit_scale_init: float = 10.0,
        qk_init: str = "xavier",
        split_qk: bool = False,
    ) -> None:
        super().__init__()
        self.heads = heads
        self.mixing = mixing
        self.dropout = dropout
        self.centred = centred
        self.gather_distributed = gather_distributed
        self.tied = qk_init == "tied"
        if split_qk or self.tied:  # q and k in a Linear of their own: a group of their own
            self.qk = nn.Linear(dim, dim if self.tied else 2 * dim)
            self.v = nn.Linear(dim, dim)
            projections = [self.qk, self.v]
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
            projections = [self.qkv]
        self.proj = nn.Linear(dim, dim)
        self.q_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        for linear in projections:  # after `proj`: a seed gives the heads it always gave
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        if qk_init != "xavier":
            with torch.no_grad():
                kernel = nn.init.orthogonal_(torch.empty(dim, dim))
                projections[0].weight[:dim] = kernel
                if not self.tied:
                    projections[0].weight[dim : 2 * dim] = kernel
        # log of each head's logit scale (cosine logits only), so the scale stays positive
        self.logit_scale = (
            nn.Parameter(torch.full((heads,), math.log(logit_scale_init)))
            if attention_logits == "cosine"
            else None
        )

    def _scores(
        self, q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor | None
    ) -> torch.Tensor:
        scores = q @ k.transpose(-2, -1)
        if self.logit_scale is None:
            scores = scores / math.sqrt(q.shape[-1])
        return scores if allowed is None else scores.masked_fill(~allowed, float("-inf"))

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(T, dim)`` queries, keys and values, from the fused or the split projections."""
        if hasattr(self, "qkv"):
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            return q, k, v
        v = self.v(x)
        if self.tied:
            q = self.qk(x)
            return q, q, v
        q, k = self.qk(x).chunk(2, dim=-1)
        return q, k, v

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(heads, T, head_dim)`` queries (this rank's) and keys and values (all ranks').

        Under cosine logits, queries and keys are unit vectors and the queries carry their
        head's logit scale, so ``q @ k^T`` is the logit.
        """
        q, k, v = self._qkv(x)
        if self.gather_distributed:
            k, v = gather_tokens(torch.cat([k, v], dim=-1)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(0, 1) for t in (q, k, v))
        q, k = self.q_norm(q), self.k_norm(k)
        if self.logit_scale is not None:
            scale = self.logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
            q = F.normalize(q, dim=-1) * scale[:, None, None]
            k = F.normalize(k, dim=-1)
        return q, k, v

    @staticmethod
    def _uniform(v: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """What uniform attention over the allowed keys gives: ``(heads, T or 1, head_dim)``."""
        if allowed is None:
            return v.mean(dim=-2, keepdim=True)
        weights = allowed.to(v.dtype)
        return (weights / weights.sum(dim=-1, keepdim=True)) @ v

    @staticmethod
    def _fixed_weights(
        mixing: str, allowed: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor
    ) -> torch.Tensor:
        """The ``(heads, T, S)`` weights of a fixed mixing: uniform over the allowed keys
        (``mean``) or one on the token itself (``none``; under DDP its column in the gathered
        sequence)."""
        heads, tokens, keys = q.shape[0], q.shape[1], k.shape[1]
        if mixing == "mean":
            weights = torch.ones(tokens, keys, dtype=q.dtype, device=q.device)
            if allowed is not None:
                weights = weights * allowed
            weights = weights / weights.sum(dim=-1, keepdim=True)
        else:
            rank = distributed_world()[0] if keys != tokens else 0
            weights = torch.zeros(tokens, keys, dtype=q.dtype, device=q.device)
            weights[torch.arange(tokens), torch.arange(tokens) + rank * tokens] = 1.0
        return weights.expand(heads, tokens, keys)

    def logits(self, x: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
        """The ``(heads, T, S)`` attention scores before the softmax (``-inf`` where masked)."""
        q, k, _ = self._heads(x)
        return self._scores(q, k, allowed)

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor | None, need_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        q, k, v = self._heads(x)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if self.mixing != "attention":
            fixed = self._fixed_weights(self.mixing, allowed, q, k)
            weights = fixed if need_weights else None
            out = F.dropout(fixed, dropout, self.training) @ v
        elif need_weights:
            weights = self._scores(q, k, allowed).softmax(dim=-1)
            out = F.dropout(weights, dropout, self.training) @ v
        else:
            scale = None if self.logit_scale is None else 1.0  # cosine: q carries the scale
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=allowed, dropout_p=dropout, scale=scale
            )
        if self.centred:
            out = out - self._uniform(v, allowed)
        return self.proj(out.transpose(0, 1).flatten(1)), weights


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, ffn_dim: int, activation: str, dropout: float) -> None:
        super().__init__(
            nn.Linear(dim, ffn_dim),
            ACTIVATIONS[activation](),
            nn.Dropout(dropout),
            nn.Linear(ffn_dim, dim),
        )


class FusionBlock(nn.Module):
    """Attention + feed-forward, with residuals unless ``residual`` is off; a norm
    (``block_norm``: LayerNorm or BatchNorm) after (``post``) or before (``pre``) each."""

    def __init__(
        self,
        dim: int,
        heads: int,
        ffn_dim: int,
        norm: str,
        activation: str,
        dropout: float,
        gather_distributed: bool,
        qk_norm: bool,
        centred_attention: bool = False,
        mixing: str = "attention",
        residual: bool = True,
        block_norm: str = "layer",
        **attention: Any,
    ) -> None:
        super().__init__()
        self.pre_norm = norm == "pre"
        self.residual = residual
        self.attn = BatchSelfAttention(
            dim, heads, dropout, gather_distributed, qk_norm, centred_attention, mixing, **attention
        )
        self.ffn = FeedForward(dim, ffn_dim, activation, dropout)
        self.norm1 = BLOCK_NORMS[block_norm](dim)
        self.norm2 = BLOCK_NORMS[block_norm](dim)
        self.drop = nn.Dropout(dropout)

    def attention_input(self, x: torch.Tensor) -> torch.Tensor:
        """What the attention sees: the residual stream, LayerNormed first when ``pre``."""
        return self.norm1(x) if self.pre_norm else x

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor | None, need_weights: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        attended, weights = self.attn(self.attention_input(x), allowed, need_weights)
        if self.pre_norm:
            x = self._skip(x, self.drop(attended))
            return self._skip(x, self.drop(self.ffn(self.norm2(x)))), weights
        x = self.norm1(self._skip(x, self.drop(attended)))
        return self.norm2(self._skip(x, self.drop(self.ffn(x)))), weights

    def _skip(self, x: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return x + branch if self.residual else branch


class TransformerProjector(nn.Module):
    """Deep Fusion head: ``Linear(in_dim, dim)`` -> ``depth`` blocks -> ``Linear(dim, out_dim)``.

    Args:
        in_dim: feature size of the backbone (``F``).
        out_dim: output size; keep the recipe's ``proj_output_dim``.
        dim, depth, heads, ffn_dim: width, number of blocks, attention heads, FFN hidden size.
        norm: ``"post"`` (the authors') or ``"pre"`` LayerNorm placement.
        input_norm: what normalises the tokens right after ``in_proj``: ``"layer"``, a
            LayerNorm, so the first block never sees the backbone's scale (a post-norm head's
            first block attends over raw ``in_proj``); ``"batch"``, a BatchNorm1d that centres
            every feature over the tokens, like the BatchNorm of solo-learn's MLP heads (the
            backbone's non-negative features otherwise share one direction); or ``"none"``.
            ``True``/``False`` mean ``"layer"``/``"none"``.
        output_norm: ``"batch"``, a BatchNorm1d without affine parameters on the output, as
            MoCo v3's and SimSiam's projectors end: it removes the direction that every
            sample's output shares (attention adds the batch mean to every token), which
            BYOL's and MoCo v3's losses do not remove; or ``"none"``.
        qk_norm: a LayerNorm of every attention head's queries and keys (bounded logits).
        centred_attention: subtract from each attention output the plain mean of the values
            its query may attend to, so only attention that departs from uniform moves a
            token. Near-uniform attention otherwise adds the same batch mean to every token,
            a direction that VICReg's loss cannot see and so never removes (the
            ``stable_centred`` preset, VICReg's default; benchmarks/stability).
        mixing: ``"attention"`` (learned softmax weights), or a control that keeps every
            parameter: ``"mean"``, fixed uniform weights over the keys the mask allows (mixing
            with the batch, no selection), or ``"none"``, each token only its own value (no
            sample sees another). They tell what learned attention adds (benchmarks/controls).
        attention_logits: ``"dot"`` (scaled dot products) or ``"cosine"``: L2-normalised
            queries and keys, times a learnable per-head scale (``logit_scale``, ``(heads,)``,
            stored as its log, starting at ``logit_scale_init``, clamped at 100) that has its
            own optimizer group with no weight decay (:meth:`param_group_rules`). Dot logits of
            small spread force near-uniform attention; cosine ones can sharpen, bounded.
        logit_scale_init: the cosine logits' starting scale (> 0).
        qk_init: ``"xavier"``; ``"identity"``, W_q = W_k = one orthogonal matrix (W_q^T W_k =
            I: attention starts as a soft kNN over the features); or ``"tied"``, q = k from one
            shared Linear (orthogonal at first), so the logits stay a similarity kernel.
        qk_lr_scale: lr of the q/k weights relative to the head's group (> 0); other than 1,
            q and k get a Linear (``attn.qk``) and an optimizer group of their own.
        residual: residual connections around attention and the FFN. Without them a stack
            of attention layers must select, or its output collapses to rank 1 (the authors'
            earliest regime).
        block_norm: the blocks' norms: ``"layer"`` (LayerNorm) or ``"batch"`` (BatchNorm1d
            over the tokens, the authors' earliest regime).
        activation: FFN activation, one of ``ACTIVATIONS``.
        dropout: dropout on attention weights, residual branches and the FFN.
        context: which samples share a sequence, read by the host integration: ``"joint"``
            (all large crops of a step) or ``"view"`` (one crop's batch).
        mask: ``"none"``, ``"self"`` (no attention to itself) or ``"positives"`` (nor to the
            other views of its own sample).
        gather_distributed: under ``torch.distributed``, attend over the global batch.
        check_inputs: validate shapes, dtype and finiteness of inputs and outputs on every
            call (two host syncs on GPU).
        tail: optional module applied to the output, e.g. a method's final ``BatchNorm1d``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        dim: int = 256,
        depth: int = 10,
        heads: int = 16,
        ffn_dim: int = 1024,
        norm: str = "post",
        input_norm: str | bool = "none",
        output_norm: str = "none",
        qk_norm: bool = False,
        centred_attention: bool = False,
        mixing: str = "attention",
        attention_logits: str = "dot",
        logit_scale_init: float = 10.0,
        qk_init: str = "xavier",
        qk_lr_scale: float = 1.0,
        residual: bool = True,
        block_norm: str = "layer",
        activation: str = "gelu",
        dropout: float = 0.0,
        context: str = "joint",
        mask: str = "none",
        gather_distributed: bool = True,
        check_inputs: bool = True,
        tail: nn.Module | None = None,
    ) -> None:
        super().__init__()
        check_choice("norm", norm, NORMS)
        check_choice("activation", activation, tuple(ACTIVATIONS))
        check_choice("context", context, CONTEXTS)
        check_choice("mask", mask, MASKS)
        check_choice("mixing", mixing, MIXINGS)
        if isinstance(input_norm, bool):
            input_norm = LEGACY_INPUT_NORMS[input_norm]
        check_choice("input_norm", input_norm, tuple(INPUT_NORMS))
        check_choice("output_norm", output_norm, tuple(OUTPUT_NORMS))
        check_flag("qk_norm", qk_norm)
        check_flag("centred_attention", centred_attention)
        check_choice("attention_logits", attention_logits, ATTENTION_LOGITS)
        check_choice("qk_init", qk_init, QK_INITS)
        check_choice("block_norm", block_norm, tuple(BLOCK_NORMS))
        check_flag("residual", residual)
        for field, value, bound in (
            ("logit_scale_init", logit_scale_init, MAX_LOGIT_SCALE),
            ("qk_lr_scale", qk_lr_scale, math.inf),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{field} must be a number in (0, {bound:g}], got {value!r}")
            if not 0 < value <= bound:
                raise ValueError(f"{field} must be a number in (0, {bound:g}], got {value!r}")
        dims = (("in_dim", in_dim), ("out_dim", out_dim), ("dim", dim), ("ffn_dim", ffn_dim))
        for field, value in (*dims, ("heads", heads)):
            check_int(field, value)  # a bool, float or string is refused, not truncated
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        check_int("depth", depth, minimum=0)
        check_number("dropout", dropout, "in [0, 1)", lambda v: 0.0 <= v < 1.0)
        self.in_dim, self.out_dim, self.dim = in_dim, out_dim, dim
        self.context, self.mask = context, mask
        self.attention_logits, self.qk_lr_scale = attention_logits, qk_lr_scale
        self.gather_distributed = gather_distributed
        self.check_inputs = check_inputs
        self.in_proj = nn.Linear(in_dim, dim)
        self.input_norm = INPUT_NORMS[input_norm](dim)
        self.blocks = nn.ModuleList(
            FusionBlock(
                dim,
                heads,
                ffn_dim,
                norm,
                activation,
                dropout,
                gather_distributed,
                qk_norm,
                centred_attention,
                mixing,
                residual,
                block_norm,
                attention_logits=attention_logits,
                logit_scale_init=logit_scale_init,
                qk_init=qk_init,
                split_qk=qk_lr_scale != 1,
            )
            for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(dim) if norm == "pre" else nn.Identity()
        self.out_proj = nn.Linear(dim, out_dim)
        self.output_norm = OUTPUT_NORMS[output_norm](out_dim)
        self.tail = tail if tail is not None else nn.Identity()

    def param_group_rules(self) -> tuple[ParamGroupRule, ...]:
        """Parameters that need other optimizer settings than the rest of the head: cosine
        logits' scales (no weight decay, no LARS) and, under ``qk_lr_scale``, q and k."""
        rules = []
        if self.attention_logits == "cosine":
            rules.append(ParamGroupRule("logit_scale", "*.logit_scale", decay=False))
        if self.qk_lr_scale != 1:
            rules.append(ParamGroupRule("qk", "*.attn.qk.*", lr_scale=self.qk_lr_scale))
        return tuple(rules)

    def _validate(self, x: torch.Tensor, num_views: int, world_size: int) -> None:
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(
                f"x must be (T, in_dim={self.in_dim}) pooled features, got {tuple(x.shape)}"
            )
        if num_views < 1 or x.shape[0] % num_views:
            raise ValueError(
                f"num_views={num_views} must divide the number of tokens T={x.shape[0]}"
            )
        if self.training and x.shape[0] * world_size < 2:
            raise ValueError(f"training needs at least 2 tokens, got T={x.shape[0]}")
        samples = x.shape[0] * world_size // (num_views if self.mask == "positives" else 1)
        if self.mask != "none" and samples < 2:
            raise ValueError(f"mask={self.mask!r} needs at least 2 samples: every key is masked")
        weight = self.in_proj.weight
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(
                f"x is {x.dtype} but the head's weights are {weight.dtype}: cast one to the "
                "other, or run the head under torch.autocast"
            )
        if not torch.isfinite(x).all():
            raise ValueError("x contains NaN or Inf values")

    def forward(
        self, x: torch.Tensor, *, num_views: int = 1, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        rank, world_size = distributed_world() if self.gather_distributed else (0, 1)
        if self.check_inputs:
            self._validate(x, num_views, world_size)
        allowed = attention_mask(self.mask, x.shape[0], num_views, rank, world_size, x.device)
        maps = []
        h = self.input_norm(self.in_proj(x))
        for block in self.blocks:
            h, weights = block(h, allowed, return_attention)
            maps.append(weights)
        out = self.tail(self.output_norm(self.out_proj(self.final_norm(h))))
        if self.check_inputs and not torch.isfinite(out).all():
            raise NonFiniteOutputError(
                f"the head's output is not finite: inputs up to |x| = {x.abs().max().item():.3g} "
                f"overflow {h.dtype} inside it; normalise or rescale the features"
            )
        return (out, maps) if return_attention else out
