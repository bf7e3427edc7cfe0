"""The host-free half of the package imports without solo-learn, Lightning or Hydra."""

from __future__ import annotations

import subprocess
import sys

HOST_FREE = [
    "solo_deepfusion.heads",
    "solo_deepfusion.heads.diagnostics",
    "solo_deepfusion.fusion",
    "solo_deepfusion.hub",
    "solo_deepfusion.hub.backbones",
    "solo_deepfusion.bench.report",
    "solo_deepfusion.bench.records",
    "solo_deepfusion.linear_probe",
    "solo_deepfusion.datasets",
    "solo_deepfusion.devices",
    "solo_deepfusion.errors",
    "solo_deepfusion.jsonl",
    "solo_deepfusion.provenance",
    "solo_deepfusion.validation",
]


def test_host_free_modules_import_with_the_host_blocked():
    code = (
        "import importlib, sys\n"
        "for m in ('solo', 'lightning', 'hydra', 'omegaconf'):\n"
        "    sys.modules[m] = None\n"
        f"for name in {HOST_FREE!r}:\n"
        "    importlib.import_module(name)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
