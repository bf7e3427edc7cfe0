"""The built wheel in a clean venv: the zoo without a checkout, weights from a loopback mirror.

Built as ``python -m build`` builds it (an sdist, then a wheel from the unpacked sdist, with
setuptools' PEP 517 hooks; no build isolation, so no network), installed with ``pip install
--no-deps`` into a new venv. The venv sees this interpreter's site-packages through a ``.pth``
line (torch is not installed twice; a ``.pth`` there is not run, so the checkout's editable
install stays out), and the test checks that ``solo_deepfusion`` is imported from the wheel.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
from loopback import serving

from solo_deepfusion import hub
from solo_deepfusion.datasets import extract

sys.path.insert(0, str(Path(__file__).parent / "hub"))

REPO = Path(__file__).resolve().parents[1]
NAMES = hub.list_models(REPO / "zoo" / "manifest.yaml")


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{argv}: {out.stderr[-3000:]}"
    return out.stdout


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without anything that points back at the checkout."""
    drop = ("PYTHONPATH", "SOLO_DEEPFUSION_ZOO_MANIFEST", "SOLO_DEEPFUSION_ZOO_MIRRORS")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    hook = "import sys; from setuptools import build_meta as b; print(b.build_{}(sys.argv[1]))"
    sdist = run([sys.executable, "-c", hook.format("sdist"), str(dist)], REPO, clean_env())
    with tarfile.open(dist / sdist.strip().splitlines()[-1]) as archive:
        extract(archive, dist / "src")  # tarfile's filter= is missing before Python 3.11.4
    (source,) = (dist / "src").iterdir()
    name = run([sys.executable, "-c", hook.format("wheel"), str(dist)], source, clean_env())
    return dist / name.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv")
    run([sys.executable, "-m", "venv", "--without-pip", str(root)], root)
    python = root / "bin" / "python"
    site = run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], root
    )
    (Path(site.strip()) / "_shared_site.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    run([*pip, "--no-deps", "--no-index", str(wheel)], root, clean_env())
    return root


@pytest.fixture
def mirror():
    with serving(REPO / "zoo" / "files") as server:
        yield server


def test_the_wheel_carries_the_zoo_manifest_and_cards_not_the_weights(wheel):
    files = zipfile.ZipFile(wheel).namelist()
    zoo = sorted(f for f in files if f.startswith("solo_deepfusion/hub/zoo/"))
    assert zoo == sorted(
        [
            "solo_deepfusion/hub/zoo/manifest.yaml",
            "solo_deepfusion/hub/zoo/manifest.schema.json",
            *(f"solo_deepfusion/hub/zoo/cards/{name}.md" for name in NAMES),
        ]
    )
    assert not any(f.endswith(".safetensors") for f in files)
    assert wheel.stat().st_size < 1_000_000


def test_the_installed_wheel_runs_the_zoo_from_a_loopback_mirror(venv, mirror, tmp_path):
    env = clean_env(
        SOLO_DEEPFUSION_CACHE=str(tmp_path / "cache"), SOLO_DEEPFUSION_ZOO_MIRRORS=mirror.url
    )
    cli = str(venv / "bin" / "solo-deepfusion")
    listed = run([cli, "zoo", "list"], tmp_path, env)
    assert all(name in listed for name in NAMES)
    info = run([cli, "zoo", "info", NAMES[-1]], tmp_path, env)
    assert "preprocessing:\n  input_size: [3, 32, 32]" in info
    assert f"card: {venv}" in info and f"{mirror.url}/{NAMES[-1]}/" in info

    hub_dir = tmp_path / "hubconf"  # torch.hub.load(source="local") on the repo's hubconf.py
    hub_dir.mkdir()
    shutil.copy2(REPO / "hubconf.py", hub_dir / "hubconf.py")
    script = textwrap.dedent(
        f"""
        import json, torch
        import solo_deepfusion
        from solo_deepfusion import hub
        backbone = hub.load_backbone({NAMES[-1]!r}, progress=False)
        local = torch.hub.load({str(hub_dir)!r}, {NAMES[0].replace("-", "_")!r},
                               source="local", progress=False)
        print(json.dumps({{
            "package": solo_deepfusion.__file__,
            "cfg": {{k: backbone.pretrained_cfg[k] for k in ("input_size", "mean", "stem")}},
            "hub_cfg": local.pretrained_cfg["tag"],
            "features": list(local(torch.zeros(1, 3, 32, 32)).shape),
            "module": type(local).__module__,
        }}))
        """
    )
    got = json.loads(run([str(venv / "bin" / "python"), "-c", script], tmp_path, env))
    assert Path(got["package"]).is_relative_to(venv)
    stem = hub.get_entry(NAMES[-1]).backbone["stem"]
    assert got["cfg"] == {"input_size": [3, 32, 32], "mean": [0.4914, 0.4822, 0.4465],
                          "stem": stem}  # fmt: skip
    assert got["hub_cfg"] == NAMES[0] and got["features"] == [1, 512]
    served = sorted(path.rsplit("/", 1)[-1] for path in mirror.paths)
    loaded = {NAMES[0], NAMES[-1]}  # the entries loaded above, each from the mirror
    assert served == sorted(hub.get_entry(name).file().filename for name in loaded)
