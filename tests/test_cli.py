"""The console script without the host: version, help, ``--cfg`` parsing, the import graph."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from solo_deepfusion import __version__
from solo_deepfusion.cli import HOST_COMMANDS, LOCAL_COMMANDS, split_cfg_job
from solo_deepfusion.errors import UsageError

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "solo_deepfusion"


def _cli(*args: str, blocked: bool = True) -> subprocess.CompletedProcess:
    """``solo-deepfusion <args>`` in a fresh interpreter; with the host blocked, importing it
    would fail."""
    block = "for m in ('solo', 'lightning', 'hydra', 'omegaconf'): sys.modules[m] = None\n"
    code = (
        "import sys\n"
        f"{block if blocked else ''}"
        "from solo_deepfusion.cli import main\n"
        f"sys.exit(main({list(args)!r}))\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


def test_version_is_the_package_version() -> None:
    out = _cli("--version")
    assert (out.returncode, out.stdout.strip()) == (0, f"solo-deepfusion {__version__}")
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["version"] == __version__


def test_pretrain_help_shows_the_product_without_the_host() -> None:
    out = _cli("pretrain", "--help")
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    first = out.stdout.splitlines()[0]
    assert first.startswith("usage: solo-deepfusion pretrain") and "--projector" in first
    for words in (
        "cosine_tied",
        "stable_bn",
        "stable_centred",
        "paper",
        "small",
        "mlp_matched",
        "key=value",
    ):
        assert words in out.stdout
    assert out.stdout.count("solo-deepfusion pretrain --") + out.stdout.count("pretrain \\") >= 2


def test_linear_help_names_the_checkpoint_override() -> None:
    out = _cli("linear", "-h")
    assert out.returncode == 0, out.stderr
    assert "pretrained_feature_extractor=" in out.stdout and "examples:" in out.stdout


def test_top_level_help_lists_every_command() -> None:
    out = _cli("--help")
    assert out.returncode == 0
    for name in (*HOST_COMMANDS, *LOCAL_COMMANDS):
        assert name in out.stdout


@pytest.mark.parametrize(
    ("argv", "rest"),
    [
        (["--cfg", "job", "a=1"], ["a=1"]),
        (["a=1", "--cfg=job"], ["a=1"]),
        (["-c", "job", "--projector", "transformer"], ["--projector", "transformer"]),
    ],
)
def test_cfg_job_is_taken_out_of_the_command_line(argv: list[str], rest: list[str]) -> None:
    assert split_cfg_job(argv) == (True, rest)


def test_without_cfg_the_command_line_is_unchanged() -> None:
    assert split_cfg_job(["--config-name", "x", "a=1"]) == (False, ["--config-name", "x", "a=1"])


@pytest.mark.parametrize("argv", [["--cfg", "hydra"], ["--cfg"], ["--cfg=all"]])
def test_other_cfg_values_are_refused_in_one_line(argv: list[str]) -> None:
    with pytest.raises(UsageError, match="only --cfg job"):
        split_cfg_job(argv)


def _imports(source: str, module: str, is_package: bool = False) -> set[str]:
    """Absolute names of the modules (and module attributes) that ``source`` imports, relative
    imports resolved as in ``module``."""
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _module(path: Path) -> tuple[str, bool]:
    parts = path.relative_to(ROOT).with_suffix("").parts
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


@pytest.mark.parametrize(
    ("source", "module"),
    [
        ("from solo_deepfusion.cli import exit_status", "solo_deepfusion.solo.launch"),
        ("import solo_deepfusion.cli", "solo_deepfusion.solo.launch"),
        ("from solo_deepfusion import cli", "solo_deepfusion.solo.launch"),
        ("from ..cli import exit_status", "solo_deepfusion.hub.cli"),
        ("from .. import cli", "solo_deepfusion.hub.cli"),
        ("from ...cli import main", "solo_deepfusion.solo.bench.cli"),
    ],
)
def test_the_walk_sees_every_spelling(source: str, module: str) -> None:
    assert "solo_deepfusion.cli" in _imports(source, module)


def test_no_module_imports_the_console_script() -> None:
    """The console script imports the command modules; none of them may import it back (a
    cycle cli -> command -> cli). Errors become exit codes in ``solo_deepfusion.errors``."""
    offenders = [
        str(path.relative_to(ROOT))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "cli.py"
        and "solo_deepfusion.cli" in _imports(path.read_text(), *_module(path))
    ]
    assert offenders == []
