"""Host-free projection heads: plain PyTorch, usable in any training loop."""

from solo_deepfusion.heads.cost import count_flops, count_parameters, forward_flops
from solo_deepfusion.heads.distributed import gather_tokens
from solo_deepfusion.heads.mlp import SOLO_MLP_LAYOUTS, MLPLayout, MLPProjector, solo_mlp
from solo_deepfusion.heads.registry import (
    DEFAULT_PRESET,
    PRESETS,
    TransformerHeadConfig,
    build_projector,
    list_projectors,
    projector_entry,
    register_projector,
    transformer_config,
)
from solo_deepfusion.heads.residual_mlp import ResidualMLPProjector
from solo_deepfusion.heads.transformer import (
    CONTEXTS,
    MASKS,
    MIXINGS,
    NORMS,
    ParamGroupRule,
    TransformerProjector,
    attention_mask,
)

__all__ = [
    "CONTEXTS",
    "DEFAULT_PRESET",
    "MASKS",
    "MIXINGS",
    "NORMS",
    "PRESETS",
    "SOLO_MLP_LAYOUTS",
    "MLPLayout",
    "MLPProjector",
    "ParamGroupRule",
    "ResidualMLPProjector",
    "TransformerHeadConfig",
    "TransformerProjector",
    "attention_mask",
    "build_projector",
    "count_flops",
    "count_parameters",
    "forward_flops",
    "gather_tokens",
    "list_projectors",
    "projector_entry",
    "register_projector",
    "solo_mlp",
    "transformer_config",
]
