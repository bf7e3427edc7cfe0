"""FusionMonitor (Deep Fusion metrics while training) and the checkpoint analysis, on solo-learn."""

from __future__ import annotations

import csv
import json
import math
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from solo_fixtures import HOST_PROBLEM, TinyCrops, method_cfg

if HOST_PROBLEM is not None:
    pytest.skip(HOST_PROBLEM, allow_module_level=True)

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import CSVLogger
from omegaconf import OmegaConf
from PIL import Image
from solo.utils.checkpointer import Checkpointer
from torch import nn

from solo_deepfusion.fusion import fusion_stats, leave_one_out_1nn_accuracy
from solo_deepfusion.heads.diagnostics import collapse_stats
from solo_deepfusion.solo.analysis import analyse_checkpoint, main
from solo_deepfusion.solo.measure import (
    evaluating,
    fusion_head,
    head_tail,
    local_attention,
    unsupervised_accuracy,
)
from solo_deepfusion.solo.model import build_model
from solo_deepfusion.solo.monitor import (
    FUSION_LOG,
    CollapseMonitor,
    FusionMonitor,
    balanced_indices,
    collapse_monitor_from_cfg,
    fusion_monitor_from_cfg,
)

SMALL = {"name": "transformer", "preset": "small", "depth": 2, "dim": 32, "heads": 4}
# A ViT on 16 px images (4 patches): ~5x faster on CPU than a ResNet-18
TINY_VIT = {"name": "vit_tiny", "kwargs": {"img_size": 16, "patch_size": 8}}
DEPTH, MONITOR_SAMPLES, MONITOR_CLASSES = 2, 12, 3
METRICS = ("same_class", "chance", "fusion_ratio", "positive_mass", "self_mass", "entropy")


class Before(pl.Callback):
    """Keeps the model's state and train flags just before the monitor's hooks run."""

    def snapshot(self, trainer, pl_module) -> None:
        self.state = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.modes = [m.training for m in pl_module.modules()]

    on_train_epoch_end = on_train_end = snapshot


class After(pl.Callback):
    """Compares the model with ``Before``'s snapshot just after the monitor's hooks ran."""

    def __init__(self, before: Before) -> None:
        self.before, self.calls, self.changes = before, 0, []

    def compare(self, trainer, pl_module) -> None:
        self.calls += 1
        state = pl_module.state_dict()
        self.changes += [k for k, v in self.before.state.items() if not torch.equal(v, state[k])]
        if [m.training for m in pl_module.modules()] != self.before.modes:
            self.changes.append("train/eval flags")

    on_train_epoch_end = on_train_end = compare


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny simclr_transformer fitted 3 epochs of 1 step, monitored every 2 epochs."""
    root = tmp_path_factory.mktemp("runs")
    torch.manual_seed(0)
    cfg = method_cfg("simclr_transformer", **SMALL)
    cfg.backbone = TINY_VIT
    model = build_model(cfg)
    head_calls = []  # (training, grad enabled, gathers) of every call that asks for attention

    def probe(module, args, kwargs) -> None:
        if kwargs.get("return_attention"):
            head_calls.append(
                (module.training, torch.is_grad_enabled(), module.blocks[0].attn.gather_distributed)
            )

    fusion_head(model).register_forward_pre_hook(probe, with_kwargs=True)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(MONITOR_SAMPLES, 3, 16, 16, generator=generator)
    labels = torch.arange(MONITOR_SAMPLES) % MONITOR_CLASSES
    monitor = FusionMonitor(images, labels, every_n_epochs=2)
    before = Before()
    after = After(before)
    checkpointer = Checkpointer(model.cfg, logdir=root / "simclr_transformer", frequency=1)
    logger = CSVLogger(save_dir=root / "csv", name="simclr_transformer", version="v0")
    trainer = pl.Trainer(
        max_epochs=3,
        accelerator="cpu",
        devices=1,
        logger=logger,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[before, monitor, after, checkpointer],
    )
    loader = torch.utils.data.DataLoader(TinyCrops(8), batch_size=8, drop_last=True)
    trainer.fit(model, loader)
    return SimpleNamespace(
        model=model,
        monitor=monitor,
        head_calls=head_calls,
        after=after,
        run_dir=Path(checkpointer.path),
        log_dir=Path(logger.log_dir),
        images=images,
        labels=labels,
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------------------
# The callback


def test_monitor_appends_a_line_every_n_epochs_and_at_the_end(run):
    lines = read_jsonl(run.run_dir / FUSION_LOG)
    assert [(r["epoch"], r["step"]) for r in lines] == [(1, 2), (2, 3)]  # epoch 1, then the end
    assert lines == run.monitor.records
    assert not (run.log_dir / FUSION_LOG).exists()  # the Checkpointer's folder comes first
    for record in lines:
        assert set(record) == {"epoch", "step", "layers"}
        assert [layer["layer"] for layer in record["layers"]] == list(range(1, DEPTH + 1))
        for layer in record["layers"]:
            assert layer["num_tokens"] == MONITOR_SAMPLES and layer["num_views"] == 1
            assert 0.0 <= layer["same_class"] <= 1.0
            assert layer["chance"] == pytest.approx(3 / 11)  # 3 other same-class of 11 others
            assert layer["fusion_ratio"] == pytest.approx(layer["same_class"] / layer["chance"])
            assert layer["positive_mass"] == 0.0  # one view: no other views to attend to
            assert 0.0 < layer["self_mass"] < 1.0
            assert 0.0 < layer["entropy"] <= math.log(MONITOR_SAMPLES) + 1e-9


def test_monitor_logs_per_layer_scalars_to_the_runs_logger(run):
    with (run.log_dir / "metrics.csv").open() as file:
        rows = list(csv.DictReader(file))
    lines = read_jsonl(run.run_dir / FUSION_LOG)
    for layer in range(1, DEPTH + 1):
        for metric in METRICS:
            key = f"fusion/layer{layer}/{metric}"
            logged = [r for r in rows if r.get(key)]
            assert [int(r["step"]) for r in logged] == [line["step"] for line in lines]
            expected = [line["layers"][layer - 1][metric] for line in lines]
            assert [float(r[key]) for r in logged] == pytest.approx(expected)


def test_monitor_leaves_weights_buffers_and_train_mode_as_they_were(run):
    assert run.after.calls == 4  # 3 epoch ends + the end of training
    assert run.after.changes == []
    assert run.model.training


def test_monitor_runs_the_head_in_eval_mode_without_grad_on_the_local_batch(run):
    assert run.head_calls == [(False, False, False)] * 2


def test_monitor_measures_the_eval_mode_model(run):
    model = run.model
    with evaluating(model):
        _, maps = fusion_head(model)(model.backbone(run.images), return_attention=True)
    expected = [s.fusion_ratio for s in fusion_stats(maps, run.labels)]
    measured = [layer["fusion_ratio"] for layer in run.monitor.records[-1]["layers"]]
    assert measured == pytest.approx(expected, rel=1e-5)


def test_end_of_training_is_measured_once_and_only_on_rank_zero(run, tmp_path):
    monitor = FusionMonitor(run.images, run.labels, every_n_epochs=1, path=tmp_path)
    trainer = SimpleNamespace(
        current_epoch=0, global_step=5, callbacks=[], loggers=[], is_global_zero=True
    )
    monitor.on_train_epoch_start(trainer, run.model)
    monitor.on_train_epoch_end(trainer, run.model)
    monitor.on_train_end(trainer, run.model)  # step 5 was just measured
    assert [(r["epoch"], r["step"]) for r in read_jsonl(tmp_path / FUSION_LOG)] == [(0, 5)]
    other = FusionMonitor(run.images, run.labels, path=tmp_path / "rank1")
    other.on_train_end(SimpleNamespace(**{**vars(trainer), "is_global_zero": False}), run.model)
    assert other.records == [] and not (tmp_path / "rank1").exists()


def test_run_dir_is_the_loggers_folder_else_the_given_path(tmp_path):
    monitor = FusionMonitor(torch.zeros(2, 3, 4, 4), [0, 1], path=tmp_path / "given")
    logged = pl.Trainer(logger=CSVLogger(tmp_path, name="csv", version="v1"), accelerator="cpu")
    assert monitor.run_dir(logged) == tmp_path / "csv" / "v1"
    plain = pl.Trainer(logger=False, accelerator="cpu", default_root_dir=tmp_path / "root")
    assert monitor.run_dir(plain) == tmp_path / "given"
    assert FusionMonitor(torch.zeros(2, 3, 4, 4), [0, 1]).run_dir(plain) == tmp_path / "root"


def test_evaluating_restores_each_modules_own_mode():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2), nn.Dropout(0.5))
    model[2].eval()  # a module deliberately left in eval mode
    with evaluating(model):
        assert not any(m.training for m in model.modules())
        assert not model[0](torch.ones(1, 2)).requires_grad
    assert [m.training for m in model.modules()] == [True, True, True, False]


def test_local_attention_turns_the_gather_off_for_the_call_only(run):
    head = fusion_head(run.model)

    def flags() -> set[bool]:
        return {m.gather_distributed for m in head.modules() if hasattr(m, "gather_distributed")}

    assert flags() == {True}
    with local_attention(head):
        assert flags() == {False}
    assert flags() == {True}


def test_monitor_rejects_a_model_without_transformer_head():
    model = build_model(method_cfg("simclr_mlp_matched", name="mlp_matched"))
    with pytest.raises(ValueError, match="no transformer projection head"):
        FusionMonitor(torch.zeros(2, 3, 16, 16), [0, 1]).compute(model)


# ---------------------------------------------------------------------------------------------
# From a recipe


class Labelled(torch.utils.data.Dataset):
    """``(image, label)`` samples; ``targets`` only when asked; counts every image read."""

    def __init__(self, labels: list[int], with_targets: bool = True, broken: bool = False):
        self.labels, self.broken, self.reads = labels, broken, 0
        if with_targets:
            self.targets = list(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        if self.broken:
            raise AssertionError("the dataset must not be read")
        self.reads += 1
        return torch.full((3, 8, 8), float(index)), self.labels[index]


def monitor_cfg(**projector):
    cfg = OmegaConf.create({"projector": {"name": "transformer", **projector}})
    OmegaConf.set_struct(cfg, False)
    return cfg


def test_from_cfg_is_none_when_off_and_reads_nothing():
    broken = Labelled([0, 1], broken=True)
    assert fusion_monitor_from_cfg(OmegaConf.create({"method": "simclr"}), broken) is None
    assert fusion_monitor_from_cfg(monitor_cfg(), broken) is None
    assert fusion_monitor_from_cfg(monitor_cfg(fusion_monitor=False), broken) is None


@pytest.mark.parametrize("with_targets", [True, False])
def test_from_cfg_samples_a_fixed_class_balanced_batch(with_targets):
    labels = [0] * 10 + [1] * 10 + [2] * 10 + [3] * 2
    cfg = monitor_cfg(fusion_monitor=True, fusion_monitor_every=3, fusion_monitor_samples=14)
    dataset = Labelled(labels, with_targets=with_targets)
    monitor = fusion_monitor_from_cfg(cfg, dataset)
    assert monitor.every_n_epochs == 3
    assert torch.bincount(monitor.labels).tolist() == [4, 4, 4, 2]  # class 3 gives all it has
    assert monitor.images.shape == (14, 3, 8, 8)
    indices = monitor.images[:, 0, 0, 0].long()  # each image holds its dataset index
    assert len(set(indices.tolist())) == 14
    assert monitor.labels.tolist() == [labels[i] for i in indices]
    again = fusion_monitor_from_cfg(cfg, Labelled(labels, with_targets=with_targets))
    assert torch.equal(again.images, monitor.images)
    default = fusion_monitor_from_cfg(monitor_cfg(fusion_monitor=True), dataset)
    assert default.every_n_epochs == 1 and default.images.shape[0] == len(labels)  # 256 > 32


def test_from_cfg_rejects_what_cannot_work():
    dataset = Labelled([0, 1, 0, 1])
    with pytest.raises(ValueError, match="validation set"):
        fusion_monitor_from_cfg(monitor_cfg(fusion_monitor=True), None)
    with pytest.raises(ValueError, match="needs the transformer projector"):
        fusion_monitor_from_cfg(monitor_cfg(fusion_monitor=True, name="mlp_matched"), dataset)
    with pytest.raises(ValueError, match=r"fusion_monitor_samples must be an integer >= 2"):
        fusion_monitor_from_cfg(monitor_cfg(fusion_monitor=True, fusion_monitor_samples=1), dataset)


def test_a_transformer_recipe_with_the_monitor_on_builds():
    cfg = method_cfg("simclr_transformer", **SMALL, fusion_monitor=True, fusion_monitor_every=2)
    model = build_model(cfg)
    monitor = fusion_monitor_from_cfg(model.cfg, Labelled([0, 1, 2, 0, 1, 2]))
    assert monitor.every_n_epochs == 2 and monitor.images.shape[0] == 6


def test_balanced_indices_spreads_classes_and_depends_on_the_seed():
    targets = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    picks = balanced_indices(targets, 31, seed=0)
    counts = torch.bincount(targets[picks]).tolist()
    assert sorted(counts) == [10, 10, 11] and len(set(picks.tolist())) == 31
    assert torch.equal(picks, balanced_indices(targets, 31, seed=0))
    assert not torch.equal(picks, balanced_indices(targets, 31, seed=1))
    assert balanced_indices(targets, 500).sort().values.tolist() == list(range(100))


# ---------------------------------------------------------------------------------------------
# The analysis


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """4 classes x 6 random 16 px PNGs (the test model's ViT takes 16 px)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for c in range(4):
        (root / f"class{c}").mkdir()
        for i in range(6):
            pixels = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def analysis(run, image_folder, tmp_path_factory) -> tuple[dict, Path]:
    """``analyse_checkpoint`` of the run folder: (its result, its output folder)."""
    out = tmp_path_factory.mktemp("analysis")
    result = analyse_checkpoint(
        run.run_dir, image_folder, batch_size=12, out_dir=out, eval_batch_sizes=(4, 8, 64)
    )
    return result, out


def test_analyse_checkpoint_writes_plots_and_numbers(run, analysis):
    result, out = analysis
    assert json.loads((out / "fusion.json").read_text()) == result
    assert min(png_size(out / "heatmaps.png")) > 100 and min(png_size(out / "fusion_ratio.png"))
    assert result["batch_size"] == 12 and result["batch_class_counts"] == [3, 3, 3, 3]
    assert result["checkpoint"].endswith("ep=2.ckpt")
    assert len(result["fusion_ratio"]) == DEPTH
    assert all(math.isfinite(r) and r >= 0 for r in result["fusion_ratio"])
    assert result["fusion"]["num_tokens"] == 12
    monitored = read_jsonl(run.run_dir / FUSION_LOG)
    assert [m["epoch"] for m in result["monitor"]] == [1, 2]
    assert result["monitor"][-1]["fusion_ratio"] == [
        layer["fusion_ratio"] for layer in monitored[-1]["layers"]
    ]
    accuracy = result["unsupervised_accuracy"]
    assert accuracy["num_images"] == 24 and 0.0 <= accuracy["backbone_all"] <= 1.0
    rows = {row["batch_size"]: row for row in accuracy["per_batch_size"]}
    assert [rows[b]["scored"] for b in (4, 8, 64)] == [24, 24, 0]
    for b in (4, 8):
        assert 0.0 <= rows[b]["head"] <= 1.0 and 0.0 <= rows[b]["backbone"] <= 1.0
    assert rows[64]["head"] is None and rows[64]["backbone"] is None


def test_unsupervised_accuracy_scores_whole_batches_of_projector_outputs():
    class Model(nn.Module):  # an identity projector: its 1-NN is the features' own
        context_projector = "projector"

        def __init__(self) -> None:
            super().__init__()
            self.projector = nn.Linear(4, 4, bias=False)
            nn.init.eye_(self.projector.weight)

    noise = 0.01 * torch.randn(12, 4, generator=torch.Generator().manual_seed(0))
    feats = torch.eye(4).repeat(3, 1) + noise  # 4 classes x 3 samples, classes interleaved
    labels = torch.arange(4).repeat(3)
    result = unsupervised_accuracy(Model(), feats, labels, [5, 12])
    assert result["backbone_all"] == leave_one_out_1nn_accuracy(feats, labels, None)
    rows = result["per_batch_size"]
    assert [r["scored"] for r in rows] == [10, 12]  # the last incomplete batch is dropped
    assert rows[0]["head"] == leave_one_out_1nn_accuracy(feats[:10], labels[:10], 5) < 1.0
    assert rows[1]["head"] == rows[1]["backbone"] == 1.0


def test_cli_writes_per_head_heatmaps_and_prints_tables(
    run, image_folder, analysis, tmp_path, capsys
):
    ckpt = next(run.run_dir.glob("*.ckpt"))
    out = tmp_path / "cli"
    argv = ["--checkpoint", str(ckpt), "--data", str(image_folder), "--batch-size", "8"]
    assert main([*argv, "--per-head", "--out", str(out), "--eval-batch-sizes", "4"]) == 0
    printed = capsys.readouterr().out
    assert "fusion ratio" in printed and "head 1-NN" in printed
    assert json.loads((out / "fusion.json").read_text())["per_head"] is True
    # 2 layers x 4 heads of panels are wider than the heads-averaged 2 panels
    assert png_size(out / "heatmaps.png")[0] > png_size(analysis[1] / "heatmaps.png")[0]
    assert main(["--checkpoint", str(tmp_path / "missing"), "--data", str(image_folder)]) == 2
    assert "no such checkpoint" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The collapse monitor


class HeadInputs(pl.Callback):
    """The online head's training inputs of every step, and the state before the step."""

    def __init__(self) -> None:
        self.inputs: list[tuple[torch.Tensor, int]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        def keep(module, args, kwargs) -> None:
            if module.training:
                self.inputs.append((args[0].detach().clone(), kwargs.get("num_views", 1)))

        fusion_head(pl_module).register_forward_pre_hook(keep, with_kwargs=True)


def fit_with_collapse_monitor(
    every: int, collapse: bool, tmp_path: Path, method: str = "simclr_transformer"
):
    torch.manual_seed(0)
    cfg = method_cfg(method, **SMALL)
    cfg.backbone = TINY_VIT
    cfg.optimizer.lr = 0.0  # the head stays as built, so its stats can be recomputed after
    model = build_model(cfg)
    if collapse:  # every output the same vector
        out = fusion_head(model).out_proj
        nn.init.zeros_(out.weight)
        nn.init.ones_(out.bias)
    inputs, monitor = HeadInputs(), CollapseMonitor(every)
    logger = CSVLogger(save_dir=tmp_path, name="run", version="v0")
    trainer = pl.Trainer(
        max_steps=3,
        accelerator="cpu",
        devices=1,
        logger=logger,
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[inputs, monitor],
    )
    loader = torch.utils.data.DataLoader(TinyCrops(24), batch_size=8, drop_last=True)
    trainer.fit(model, loader)
    return model, monitor, inputs, Path(logger.log_dir) / "metrics.csv"


@pytest.mark.parametrize("method", ["simclr_transformer", "mocov3_transformer"])
def test_collapse_monitor_measures_the_heads_own_input_every_n_steps(tmp_path, method):
    model, monitor, inputs, metrics = fit_with_collapse_monitor(3, False, tmp_path, method)
    assert monitor.last_step == 2 and len(inputs.inputs) == 3  # step 0, then the last
    feats, views = inputs.inputs[2]
    assert views == 2 and feats.shape[0] == 16  # both views of the batch, one joint call
    head, tail = fusion_head(model).eval(), head_tail(model).eval()
    # The output cosine is that of what the loss sees: after MoCo v3's last BatchNorm.
    assert isinstance(tail, nn.BatchNorm1d) == (method == "mocov3_transformer")
    assert monitor.last == collapse_stats(head, feats, num_views=2, tail=tail)
    rows = list(csv.DictReader(metrics.open()))
    for key in ("collapse/layer2/logit_std", "collapse/output_rank"):
        assert [r["step"] for r in rows if r.get(key)] == ["0", "2"], key
    last = [float(r["collapse/output_rank"]) for r in rows if r.get("collapse/output_rank")][-1]
    assert last == pytest.approx(monitor.last.output_rank)
    assert not monitor.warned and monitor.last.warning() is None


def test_collapse_monitor_warns_once_when_outputs_collapse(tmp_path):
    with pytest.warns(UserWarning, match=r"step 0: the Deep Fusion head is collapsing") as seen:
        _, monitor, _, _ = fit_with_collapse_monitor(1, True, tmp_path)
    assert monitor.warned and monitor.last.output_cosine == pytest.approx(1.0)
    assert sum("collapsing" in str(w.message) for w in seen) == 1


def test_collapse_monitor_is_on_by_default_for_the_transformer_head():
    on = collapse_monitor_from_cfg(method_cfg("simclr_transformer", **SMALL))
    assert isinstance(on, CollapseMonitor) and on.every_n_steps == 50
    twin = {"name": "mlp_matched", "preset": "small"}
    assert collapse_monitor_from_cfg(method_cfg("simclr_mlp_matched", **twin)) is None
    off = method_cfg("simclr_transformer", **SMALL, collapse_monitor_every=0)
    assert collapse_monitor_from_cfg(off) is None
    for bad in (-1, "often", True):
        cfg = method_cfg("simclr_transformer", **SMALL, collapse_monitor_every=bad)
        with pytest.raises(ValueError, match=r"projector.collapse_monitor_every must be an"):
            collapse_monitor_from_cfg(cfg)
