"""Where to compute: one rule for every command's ``--device`` (host-free)."""

from __future__ import annotations

import torch

from solo_deepfusion.errors import UsageError


def resolve_device(name: str | None = "auto") -> torch.device:
    """``auto`` (or ``None``): CUDA when available, else the CPU; an explicit ``cuda`` that is
    not available is a :class:`~solo_deepfusion.errors.UsageError`."""
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here")
    return device
