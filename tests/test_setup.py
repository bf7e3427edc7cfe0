"""``scripts/setup.sh``: every checkout gets its own environment, under one HOME too."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "scripts" / "setup.sh"

if shutil.which("bash") is None or shutil.which("sha256sum") is None:
    pytest.skip("setup.sh needs bash and sha256sum", allow_module_level=True)


def _clone(path: Path) -> Path:
    (path / "scripts").mkdir(parents=True)
    shutil.copy(SETUP, path / "scripts" / "setup.sh")
    return path


def _link(checkout: Path, home: Path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "SOLO_DEEPFUSION_VENV"}
    return subprocess.run(
        ["bash", "scripts/setup.sh", "--link"],
        cwd=checkout,
        env={**environ, "HOME": str(home), **env},
        capture_output=True,
        text=True,
        check=False,
    )


def test_two_clones_under_one_home_get_their_own_environments(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first = _clone(tmp_path / "work.v1" / "solo-deepfusion")  # a dot above the checkout
    second = _clone(tmp_path / "other" / "solo-deepfusion")  # the same folder name
    venvs = []
    for checkout in (first, second):
        result = _link(checkout, home)
        assert result.returncode == 0, result.stderr
        venv = Path(result.stdout.strip())
        assert venv.parent == home / ".cache" / "solo-deepfusion" / "venvs"
        assert venv.name.startswith("solo-deepfusion-")
        assert os.readlink(checkout / ".venv") == str(venv)
        venvs.append(venv)
    assert venvs[0] != venvs[1]
    assert _link(first, home).stdout.strip() == str(venvs[0])  # stable across runs


def test_a_link_to_a_shared_environment_is_repointed_with_a_notice(tmp_path: Path) -> None:
    home = tmp_path / "home"
    checkout = _clone(tmp_path / "clone")
    shared = home / ".cache" / "solo-deepfusion" / "venv"  # where 0.4.0 put every checkout's
    (checkout / ".venv").symlink_to(shared)
    result = _link(checkout, home)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("\n") == 1 and str(shared) in result.stderr
    assert os.readlink(checkout / ".venv") == result.stdout.strip() != str(shared)


def test_a_real_venv_folder_in_the_checkout_is_used(tmp_path: Path) -> None:
    checkout = _clone(tmp_path / "clone")
    (checkout / ".venv").mkdir()
    result = _link(checkout, tmp_path / "home")
    assert Path(result.stdout.strip()) == (checkout / ".venv").resolve()


def test_an_unknown_interpreter_fails_in_one_line(tmp_path: Path) -> None:
    result = _link(_clone(tmp_path / "clone"), tmp_path / "home", PYTHON="no-such-python3")
    assert result.returncode == 2
    assert result.stderr.strip() == "PYTHON=no-such-python3: no such interpreter"
    assert not (tmp_path / "clone" / ".venv").exists()
