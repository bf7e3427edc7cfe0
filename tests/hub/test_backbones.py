"""Zoo backbones for plain PyTorch users: ``hub.load_backbone`` and ``hubconf.py`` (torch.hub).

Every check that claims "no solo-learn" runs in a subprocess where ``import solo`` (and
lightning, hydra) fails, so a stray import of the host on this path fails the test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from solo_deepfusion import hub
from solo_deepfusion.hub.backbones import build_resnet
from solo_deepfusion.hub.entrypoints import hub_name
from solo_deepfusion.hub.publish import file_record, update_manifest
from solo_deepfusion.hub.weights import save_state_dict

pytestmark = pytest.mark.timeout(180)

REPO = Path(__file__).resolve().parents[2]
ZOO_NAMES = list(hub.list_models(REPO / "zoo" / "manifest.yaml"))
BLOCK_HOST = "import sys\nfor m in ('solo', 'lightning', 'hydra'):\n    sys.modules[m] = None\n"


def run_without_host(code: str, tmp_path: Path) -> dict:
    """Run ``code`` (which prints one JSON line last) with solo-learn unimportable."""
    env = {**os.environ, "SOLO_DEEPFUSION_CACHE": str(tmp_path / "cache")}
    env.pop("SOLO_DEEPFUSION_ZOO_MANIFEST", None)
    script = BLOCK_HOST + textwrap.dedent(code)
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=170,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def cifar_stem_zoo(folder: Path) -> tuple[Path, torch.nn.Module]:
    """A one-entry zoo holding a random CIFAR-stem ResNet-18 (float16 file, as the zoo's)."""
    torch.manual_seed(0)
    model = build_resnet("resnet18", "cifar").eval()
    weights = save_state_dict(
        model.state_dict(), folder / "files" / "r18.backbone.safetensors", half=True
    )
    entry = {
        "name": "tiny-r18-cifar",
        "method": "simclr",
        "projector": {"name": "mlp"},
        "backbone": {"name": "resnet18", "kwargs": {}, "stem": "cifar"},
        "dataset": "cifar10",
        "epochs": 1,
        "recipe": "zoo/recipes/none.yaml",
        "metrics": [{"name": "acc1", "value": 10.0, "protocol": {"kind": "knn", "k": 20}}],
        "params": {"backbone": 11_173_962, "head": 0},
        "files": [file_record(weights, "backbone", ["files/r18.backbone.safetensors"])],
        "license": "MIT",
        "date": "2026-12-02",
        "code_commit": "0123abc",
    }
    return update_manifest(folder / "manifest.yaml", entry), model


def test_load_backbone_without_solo_learn_matches_the_saved_model(tmp_path):
    manifest, model = cifar_stem_zoo(tmp_path / "zoo")
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    torch.save(images, tmp_path / "images.pt")
    got = run_without_host(
        f"""
        import json, torch
        from solo_deepfusion import hub
        backbone = hub.load_backbone("tiny-r18-cifar", manifest={str(manifest)!r}, progress=False)
        images = torch.load("images.pt", weights_only=True)
        with torch.no_grad():
            torch.save(backbone(images), "features.pt")
        host = sorted(m for m in sys.modules if m.split(".")[0] in ("solo", "lightning", "hydra")
                      and sys.modules[m] is not None)
        print(json.dumps({{"training": backbone.training, "host": host,
                          "conv1": list(backbone.conv1.kernel_size),
                          "maxpool": type(backbone.maxpool).__name__}}))
        """,
        tmp_path,
    )
    assert got == {"training": False, "host": [], "conv1": [3, 3], "maxpool": "Identity"}
    with torch.no_grad():
        expected = model(images)
    features = torch.load(tmp_path / "features.pt", weights_only=True)
    assert features.shape == (3, 512) and features.dtype == torch.float32
    torch.testing.assert_close(features, expected, rtol=2e-2, atol=2e-2)  # float16 file


def test_load_backbone_refuses_tampered_weights(tmp_path):
    manifest, _ = cifar_stem_zoo(tmp_path / "zoo")
    weights = tmp_path / "zoo" / "files" / "r18.backbone.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(hub.DownloadError, match="tiny-r18-cifar"):
        hub.load_backbone("tiny-r18-cifar", manifest=manifest, cache_dir=tmp_path / "c")


@pytest.mark.parametrize(
    ("name", "stem", "field"),
    [("vit_small", "imagenet", "backbone.name='vit_small'"), ("resnet18", "x", "backbone.stem")],
)
def test_build_resnet_names_the_bad_field(name, stem, field):
    with pytest.raises(ValueError, match=field.replace("(", r"\(")) as err:
        build_resnet(name, stem)
    assert "\n" not in str(err.value) and "choose one of" in str(err.value)


def test_hubconf_lists_and_loads_every_zoo_entry_without_solo_learn(tmp_path):
    """``torch.hub`` from the checkout (source="local") and from its GitHub-cache layout."""
    hub_dir = tmp_path / "torch_hub"
    hub_dir.mkdir()
    (hub_dir / "owner_solo-deepfusion_main").symlink_to(REPO, target_is_directory=True)
    got = run_without_host(
        f"""
        import json, torch
        from solo_deepfusion.hub.weights import load_state_dict, upcast
        from solo_deepfusion import hub
        torch.hub.set_dir({str(hub_dir)!r})
        # the GitHub path, on the folder torch.hub would have downloaded (no network)
        listed = torch.hub.list("owner/solo-deepfusion:main", trust_repo=True, verbose=False)
        same = {{}}
        for name in {ZOO_NAMES!r}:
            entry = name.replace("-", "_")
            local = torch.hub.load({str(REPO)!r}, entry, source="local", progress=False)
            github = torch.hub.load("owner/solo-deepfusion:main", entry, trust_repo=True,
                                    verbose=False, progress=False)
            state = upcast(load_state_dict(hub.download(name, progress=False)))
            same[name] = [
                all(torch.equal(m.state_dict()[k], v) for k, v in state.items())
                and m.state_dict().keys() == state.keys() and not m.training
                for m in (local, github)
            ]
        blank = torch.hub.load({str(REPO)!r}, entry, source="local", pretrained=False)
        differs = any(not torch.equal(blank.state_dict()[k], v) for k, v in state.items())
        doc = torch.hub.help("owner/solo-deepfusion:main", entry, trust_repo=True)
        host = sorted(m for m in sys.modules if m.split(".")[0] in ("solo", "lightning", "hydra")
                      and sys.modules[m] is not None)
        print(json.dumps({{"listed": listed, "same": same, "differs": differs,
                          "doc": doc, "host": host}}))
        """,
        tmp_path,
    )
    assert sorted(got["listed"]) == sorted(hub_name(n) for n in ZOO_NAMES)
    assert got["same"] == {name: [True, True] for name in ZOO_NAMES}
    assert got["differs"] and got["host"] == []
    assert ZOO_NAMES[-1] in got["doc"] and "pretrained=False" in got["doc"]


def test_hub_names_are_identifiers_and_unique():
    names = [hub_name(n) for n in ZOO_NAMES]
    assert all(n.isidentifier() for n in names) and len(set(names)) == len(names)
    doc = yaml.safe_load((REPO / "zoo" / "manifest.yaml").read_text())
    assert len(names) == len(doc["models"]) > 0
