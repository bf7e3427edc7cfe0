"""Feed-forward projection heads: solo-learn's layouts and a capacity-matched baseline."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

from torch import nn

from solo_deepfusion.heads.transformer import ACTIVATIONS, OUTPUT_NORMS
from solo_deepfusion.validation import check_choice, check_int


@dataclass(frozen=True)
class MLPLayout:
    """Shape of a solo-learn projector without its method-specific tail (final BN, IterNorm)."""

    num_layers: int = 2
    batch_norm: bool = False
    activation: str = "relu"
    bias: bool = True


# What each solo-learn method builds as ``self.projector`` (solo/methods/<method>.py).
SOLO_MLP_LAYOUTS: dict[str, MLPLayout] = {
    "simclr": MLPLayout(2),
    "supcon": MLPLayout(2),
    "mocov2plus": MLPLayout(2),
    "ressl": MLPLayout(2),
    "byol": MLPLayout(2, batch_norm=True),
    "nnbyol": MLPLayout(2, batch_norm=True),
    "swav": MLPLayout(2, batch_norm=True),
    "deepclusterv2": MLPLayout(2, batch_norm=True),
    "wmse": MLPLayout(2, batch_norm=True),
    "mocov3": MLPLayout(2, batch_norm=True, bias=False),
    "barlow_twins": MLPLayout(3, batch_norm=True),
    "vicreg": MLPLayout(3, batch_norm=True),
    "nnclr": MLPLayout(3, batch_norm=True),
    "all4one": MLPLayout(3, batch_norm=True),
    "simsiam": MLPLayout(3, batch_norm=True, bias=False),
    "nnsiam": MLPLayout(3, batch_norm=True, bias=False),
    "vibcreg": MLPLayout(3, batch_norm=True, activation="gelu"),
    "dino": MLPLayout(3, activation="gelu"),
}


class MLPProjector(nn.Sequential):
    """``num_layers`` linear layers; hidden ones followed by [BatchNorm1d] and an activation.

    ``output_norm="batch"`` ends it with a BatchNorm1d without affine, as the transformer head's
    ``output_norm`` does: the fair control for a transformer that has one.

    Example::

        head = MLPProjector(512, 2048, 256)                 # solo-learn's SimCLR projector
        head = MLPProjector(512, 4096, 256, batch_norm=True)  # BYOL's
        head = MLPProjector(512, 2048, 256, output_norm="batch")  # SimCLR's, centred output
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: int,
        out_dim: int,
        *,
        num_layers: int = 2,
        batch_norm: bool = False,
        activation: str = "relu",
        bias: bool = True,
        output_norm: str = "none",
    ) -> None:
        check_choice("activation", activation, tuple(ACTIVATIONS))
        check_choice("output_norm", output_norm, tuple(OUTPUT_NORMS))
        for field, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
            check_int(field, value)
        check_int("num_layers", num_layers)
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(itertools.pairwise(dims)):
            last = i == num_layers - 1
            layers.append(nn.Linear(d_in, d_out, bias=bias or last))
            if not last:
                if batch_norm:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(ACTIVATIONS[activation]())
        if output_norm != "none":
            layers.append(OUTPUT_NORMS[output_norm](out_dim))
        super().__init__(*layers)
        self.in_dim, self.hidden_dim, self.out_dim = in_dim, hidden_dim, out_dim


def solo_mlp(method: str, in_dim: int, hidden_dim: int, out_dim: int) -> MLPProjector:
    """solo-learn's projector for ``method`` (without its tail)."""
    check_choice("method", method, tuple(SOLO_MLP_LAYOUTS))
    layout = SOLO_MLP_LAYOUTS[method]
    return MLPProjector(in_dim, hidden_dim, out_dim, **layout.__dict__)


def mlp_parameter_count(
    in_dim: int, hidden_dim: int, out_dim: int, num_layers: int, batch_norm: bool
) -> int:
    """Parameters of ``MLPProjector(in_dim, hidden_dim, out_dim, ...)`` with biases."""
    h = hidden_dim
    if num_layers == 1:
        return in_dim * out_dim + out_dim
    per_hidden = h + (2 * h if batch_norm else 0)  # bias + BN affine
    return in_dim * h + per_hidden + (num_layers - 2) * (h * h + per_hidden) + h * out_dim + out_dim


def matched_hidden_dim(
    target_params: int, in_dim: int, out_dim: int, num_layers: int, batch_norm: bool
) -> int:
    """The hidden width whose MLP has the parameter count closest to ``target_params``."""
    if num_layers < 2:
        raise ValueError(f"num_layers must be >= 2 to match a parameter count, got {num_layers}")
    extra = 3 if batch_norm else 1  # per-unit cost of bias (+ BN weight and bias)
    # (L-2) h^2 + (in + out + (L-1) extra) h + out - P = 0
    a = num_layers - 2
    b = in_dim + out_dim + (num_layers - 1) * extra
    c = out_dim - target_params
    h = -c / b if a == 0 else (-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)
    candidates = {max(1, math.floor(h)), max(1, math.ceil(h))}
    return min(
        candidates,
        key=lambda w: abs(
            mlp_parameter_count(in_dim, w, out_dim, num_layers, batch_norm) - target_params
        ),
    )
