"""``solo_deepfusion.devices``: one rule for every command's ``--device``."""

from __future__ import annotations

import pytest
import torch

from solo_deepfusion.devices import resolve_device
from solo_deepfusion.errors import UsageError


def test_auto_prefers_cuda_and_an_absent_cuda_is_a_usage_error():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == resolve_device(None).type == expected
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match=r"--device cuda:1: CUDA is not available here"):
            resolve_device("cuda:1")
