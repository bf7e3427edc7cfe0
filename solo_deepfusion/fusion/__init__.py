"""Host-free Deep Fusion analysis: per-layer metrics of batch attention, and plots.

Plain PyTorch / NumPy / matplotlib: nothing here imports ``solo``, ``lightning`` or ``hydra``.
"""

from .metrics import (
    FusionStats,
    as_attention_maps,
    expand_labels,
    format_table,
    fusion_stats,
    leave_one_out_1nn_accuracy,
    scalar_metrics,
    summarize,
)
from .plots import (
    attention_heatmap_figure,
    fusion_ratio_figure,
    plot_attention_heatmaps,
    plot_fusion_ratio,
    save_figure_atomic,
)

__all__ = [
    "FusionStats",
    "as_attention_maps",
    "attention_heatmap_figure",
    "expand_labels",
    "format_table",
    "fusion_ratio_figure",
    "fusion_stats",
    "leave_one_out_1nn_accuracy",
    "plot_attention_heatmaps",
    "plot_fusion_ratio",
    "save_figure_atomic",
    "scalar_metrics",
    "summarize",
]
