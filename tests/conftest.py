"""Shared fixtures: a tiny CIFAR-10 ImageFolder cut from ``$SOLO_DEEPFUSION_DATA``.

``$SOLO_DEEPFUSION_DATA`` is a folder holding CIFAR-10 as ``train.tar.gz``/``test.tar.gz`` or as
the unpacked ``train/`` and ``test/`` ImageFolder trees. Tests that need it skip without it.
"""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from solo_deepfusion.datasets import prepare_data

# One intra-op thread: the suite runs several processes at once (DDP tests, subprocess
# launchers) and oversubscribed OpenMP threads make torch many times slower on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

DATA_ENV = "SOLO_DEEPFUSION_DATA"
TRAIN_PER_CLASS = 8
VAL_PER_CLASS = 4


@pytest.fixture(scope="session")
def cifar_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with ``train/`` (10 classes x 8 images) and ``val/`` (10 x 4) CIFAR-10 JPEGs."""
    source = Path(os.environ.get(DATA_ENV, "")).expanduser()
    has_split = any((source / name).exists() for name in ("train", "train.tar.gz"))
    if not os.environ.get(DATA_ENV) or not has_split:
        pytest.skip(f"set {DATA_ENV} to a folder holding CIFAR-10 train/test (.tar.gz or folders)")
    root = tmp_path_factory.mktemp("cifar10_tiny")
    try:  # the first images of each class by name, as the bench and the zoo cut them
        data = prepare_data(source, root / "work", TRAIN_PER_CLASS, VAL_PER_CLASS)
    except (OSError, tarfile.TarError) as err:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"could not read CIFAR-10 from {DATA_ENV}={source}: {err}")
    data.train.rename(root / "train")
    data.val.rename(root / "val")
    return root


@pytest.fixture
def quick_args(cifar_tiny: Path, tmp_path: Path):
    """``argv`` for the packaged ``cifar10_quick`` recipe, shrunk to seconds on the tiny folder.

    Call it with extra arguments; checkpoints go to ``<tmp_path>/ckpt``.
    """

    def make(*extra: str) -> list[str]:
        return [
            "--config-name",
            "cifar10_quick",
            f"data.train_path={cifar_tiny / 'train'}",
            f"data.val_path={cifar_tiny / 'val'}",
            "data.num_workers=0",
            "data.fraction=-1",
            "optimizer.batch_size=8",
            "max_epochs=1",
            f"checkpoint.dir={tmp_path / 'ckpt'}",
            "++enable_progress_bar=False",
            "++enable_model_summary=False",
            "++num_sanity_val_steps=0",
            "++limit_val_batches=1",
            *extra,
        ]

    return make


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """With ``SOLO_DEEPFUSION_NO_SKIP=1`` (CI), a skipped test fails the run.

    CI installs the host, DALI and the data, so a skip there means a broken setup, not a
    machine without them.
    """
    if os.environ.get("SOLO_DEEPFUSION_NO_SKIP") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped and exitstatus == 0:
        reporter.write_line(f"SOLO_DEEPFUSION_NO_SKIP=1: {len(skipped)} test(s) skipped", red=True)
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
