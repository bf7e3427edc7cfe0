"""The console script with the host: quiet imports, ``--cfg job``, the end-of-run summary."""

from __future__ import annotations

import shlex
import subprocess
import sys

import pytest
import yaml

from solo_deepfusion._host import host_problem

if host_problem() is not None:
    pytest.skip(host_problem(), allow_module_level=True)

from solo_deepfusion.cli import THIRD_PARTY_WARNINGS, main

pytestmark = pytest.mark.host
SMALL = ("--projector", "transformer", "projector.preset=small")


def _import_host(quiet: bool) -> str:
    """stderr of a fresh interpreter importing the solo-learn integration, then warning once
    itself."""
    code = (
        "import warnings\n"
        "from solo_deepfusion.cli import quiet_third_party_warnings\n"
        f"{'quiet_third_party_warnings()' if quiet else ''}\n"
        "import solo_deepfusion.solo.launch, solo_deepfusion.solo.evaluate\n"
        "warnings.warn('our own warning', UserWarning)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    return out.stderr


def test_third_party_import_warnings_are_filtered_and_ours_kept() -> None:
    loud, quiet = _import_host(quiet=False), _import_host(quiet=True)
    assert "our own warning" in quiet
    for words in ("pkg_resources", "Importing from timm", "in registry", "custom_fwd"):
        assert words in loud  # each filter has something to filter here
        assert words not in quiet
    assert len(THIRD_PARTY_WARNINGS) == 5


def test_cfg_job_prints_the_composed_config_and_trains_nothing(quick_args, tmp_path, capsys):
    assert main(["pretrain", *quick_args(*SMALL), "--cfg", "job"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["method"], cfg["projector"]["preset"]) == ("simclr_transformer", "small")
    assert not (tmp_path / "ckpt").exists()


def test_cfg_job_names_a_bad_head_in_one_line(quick_args, capsys):
    assert main(["pretrain", *quick_args("--projector", "mlpp"), "--cfg", "job"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "mlpp" in err and "\n" not in err


def test_pretrain_ends_with_a_summary_whose_next_command_runs(quick_args, tmp_path, capsys):
    assert main(["pretrain", *quick_args(*SMALL, "++limit_train_batches=2")]) == 0
    out = capsys.readouterr().out
    summary = out[out.index("pretrain done: simclr_transformer") :]
    (run,) = {p.parent for p in (tmp_path / "ckpt" / "simclr_transformer").glob("*/*.ckpt")}
    assert f"run folder       {run}" in summary
    assert "online linear" in summary and "%" in summary
    assert "collapse monitor step" in summary and "output cosine" in summary
    commands = [line.strip() for line in summary.splitlines() if "solo-deepfusion " in line]
    assert [shlex.split(c)[1] for c in commands] == ["knn", "linear", "fusion"]
    assert f"pretrained_feature_extractor={run}" in commands[1]
    knn = shlex.split(commands[0])[1:]
    assert main([*knn, "--num-workers", "0", "--device", "cpu", "--batch-size", "16"]) == 0
    assert f"k-NN of {run}" in capsys.readouterr().out


def test_an_mlp_run_names_no_fusion_command(quick_args, capsys):
    assert main(["pretrain", *quick_args("++limit_train_batches=1")]) == 0
    summary = capsys.readouterr().out.split("pretrain done:")[1]
    assert "no fusion" in summary and "solo-deepfusion fusion" not in summary
    assert "collapse monitor" not in summary
