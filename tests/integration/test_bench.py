"""``solo-deepfusion bench`` (grid runner) and ``bench-report`` (host-free tables and plot)."""

from __future__ import annotations

import inspect
import json
import math
import re
import tarfile
from pathlib import Path

import pytest
import torch
from solo_fixtures import HOST_PROBLEM, method_cfg, requires_host

from solo_deepfusion.bench import report as bench_report
from solo_deepfusion.bench.report import (
    chained_differences,
    confidence_interval,
    holm_adjust,
    load_results,
    paired_differences,
    paired_p_value,
    render_markdown,
    t_quantile,
)

# ---------------------------------------------------------------------------------------------
# The report, on hand-written records


def record(
    method, projector, seed, metrics, *, ablation=None, order="same", init="same", budget=None,
    **cost,
):  # fmt: skip
    """A minimal ``ok`` line as the runner writes it."""
    axes = {"batch_size": 256, "temperature": None, "weight_decay": None, "depth": None}
    axes.update(ablation or {})
    cell = f"{method}-{projector}-{seed}-{sorted(axes.items())}-{budget}"
    return {
        "schema": "solo-deepfusion/bench/1",
        "cell_id": cell,
        "status": "ok",
        "recipe": "r",
        "recipe_sha256": "0" * 64,
        "method": method,
        "projector": projector,
        "seed": seed,
        "ablation": axes,
        "budget": budget or {"epochs": 5},
        "eval": {},
        "metrics": metrics,
        "cost": {"head_params": 1000, "head_flops": 2e6, "head_tokens": 512, **cost},
        "run": {"data_order_sha256": f"{order}-{seed}", "backbone_init_sha256": f"{init}-{seed}"},
        "env": {"device": "cpu"},
    }


def write_jsonl(path: Path, records, tail: str = "") -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return path


@pytest.fixture
def three_seeds(tmp_path: Path) -> Path:
    """mlp 50/52/54 %, transformer 51/54/57 %: Δ = 1, 2, 3 pp (mean 2, sd 1)."""
    mlp = [0.50, 0.52, 0.54]
    transformer = [0.51, 0.54, 0.57]
    records = [record("simclr", "mlp", 0, {"offline_linear_acc1": 0.0})]  # superseded below
    for seed in range(3):
        records.append(record("simclr", "mlp", seed, {"offline_linear_acc1": mlp[seed]}))
        records.append(
            record(
                "simclr",
                "transformer:preset=small",
                seed,
                {"offline_linear_acc1": transformer[seed], "fusion_ratio_last": 1.5 + seed},
                time_per_epoch_s=10.0 + seed,
            )
        )
    failed = {**record("byol", "mlp", 0, {}), "status": "failed", "error": "RuntimeError: boom"}
    return write_jsonl(tmp_path / "results.jsonl", [*records, failed], tail='{"cell_id": "torn')


def test_t_quantile_of_known_values():
    assert t_quantile(2) == pytest.approx(4.302653, abs=1e-6)
    assert t_quantile(5) == pytest.approx(2.570582, abs=1e-6)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile(0)


def test_paired_p_value_and_holm_adjustment():
    # Δ = 1, 2, 3: t = 2 / (1 / √3) = 3.464 on 2 df, two-sided p = 0.0742
    assert paired_p_value([1.0, 2.0, 3.0]) == pytest.approx(0.07418, abs=1e-4)
    assert paired_p_value([1.0]) is None and paired_p_value([2.0, 2.0]) is None
    # Holm: sorted p × (m, m-1, ...), made monotone, capped at 1, in the input order.
    assert holm_adjust([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjust([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    assert holm_adjust([]) == []


def test_confidence_interval_of_known_values():
    mean, low, high = confidence_interval([1.0, 2.0, 3.0])
    half = t_quantile(2) / math.sqrt(3)  # sd = 1
    assert (mean, low, high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    assert half == pytest.approx(2.484138, abs=1e-5)
    assert confidence_interval([5.0]) is None


def test_loading_keeps_the_last_ok_record_and_lists_the_rest(three_seeds):
    results = load_results([three_seeds])
    assert len(results.records) == 6
    assert results.bad_lines == 1  # the torn last line
    assert [r["method"] for r in results.failed] == ["byol"]
    mlp0 = next(r for r in results.records if r["projector"] == "mlp" and r["seed"] == 0)
    assert mlp0["metrics"]["offline_linear_acc1"] == 0.50


def test_report_means_and_paired_confidence_interval(three_seeds):
    results = load_results([three_seeds])
    pairs, orphans = paired_differences(results, ["offline_linear_acc1", "fusion_ratio_last"])
    assert orphans == []
    (pair,) = pairs
    deltas = [d for _, d in pair.deltas["offline_linear_acc1"]]
    assert deltas == pytest.approx([0.01, 0.02, 0.03])
    assert "fusion_ratio_last" not in pair.deltas  # the mlp has none: no Δ

    text = render_markdown(results, ["offline_linear_acc1", "fusion_ratio_last"])
    mlp_row = next(line for line in text.splitlines() if line.startswith("| simclr | `mlp`"))
    assert "| 3 | 52.0 ± 2.0 |" in mlp_row
    tf_row = next(line for line in text.splitlines() if "`transformer:preset=small` | 3 |" in line)
    assert "54.0 ± 3.0" in tf_row and "2.500 ± 1.000" in tf_row  # fusion ratio: not in %
    assert "11.0 s" in tf_row  # time per epoch, mean over seeds
    assert "+2.0 [−0.5, +4.5] (n=3, p_Holm=0.074)" in text  # 2 ± 4.303 / √3; one arm: raw p
    assert "Δ fusion ratio" not in text
    assert "failed cells (not in the tables): 1" in text and "RuntimeError: boom" in text
    verdict = "**Verdict:** no difference at n=3."
    lines = render_markdown(results, ["offline_linear_acc1"], verdict=verdict).splitlines()
    assert lines[:3] == [lines[0], "", verdict] and lines[0].startswith("# ")
    assert "sample indices seen): 3 paired runs compared, all identical" in text
    assert "before training): 3 paired runs compared, all identical" in text


def test_axes_the_mlp_lacks_pair_with_any_value(tmp_path):
    records = [record("simclr", "mlp", 0, {"online_linear_acc1": 0.4})]
    for depth, acc in ((2, 0.45), (4, 0.47)):
        records.append(
            record(
                "simclr", "transformer", 0, {"online_linear_acc1": acc}, ablation={"depth": depth}
            )
        )
    records.append(record("byol", "transformer", 0, {"online_linear_acc1": 0.3}))
    results = load_results([write_jsonl(tmp_path / "r.jsonl", records)])
    pairs, orphans = paired_differences(results, ["online_linear_acc1"])
    by_depth = {p.key.axis("depth"): p.deltas["online_linear_acc1"] for p in pairs}
    assert by_depth == {2: [(0, pytest.approx(0.05))], 4: [(0, pytest.approx(0.07))]}
    assert [(k.method, k.projector) for k in orphans] == [("byol", "transformer")]
    text = render_markdown(results, ["online_linear_acc1"])
    assert "| method | projector | depth |" in text  # the varying axis gets a column
    assert "+5.0 (n=1, no CI)" in text


def test_other_budgets_are_not_paired(tmp_path):
    records = [
        record("simclr", "mlp", 0, {"online_linear_acc1": 0.4}),
        record("simclr", "transformer", 0, {"online_linear_acc1": 0.5}, budget={"epochs": 9}),
    ]
    results = load_results([write_jsonl(tmp_path / "r.jsonl", records)])
    pairs, orphans = paired_differences(results, ["online_linear_acc1"])
    assert pairs == [] and len(orphans) == 1


def test_a_different_data_order_or_start_is_flagged(tmp_path):
    records = [
        record("simclr", "mlp", 0, {"online_linear_acc1": 0.4}),
        record("simclr", "transformer", 0, {"online_linear_acc1": 0.5}, order="other"),
        record("simclr", "mlp", 1, {"online_linear_acc1": 0.4}),
        record("simclr", "transformer", 1, {"online_linear_acc1": 0.5}, init="other"),
    ]
    text = render_markdown(
        load_results([write_jsonl(tmp_path / "r.jsonl", records)]), ["online_linear_acc1"]
    )
    assert "sample indices seen): 2 paired runs compared, 1 DIFFER:\n  - simclr" in text
    assert "before training): 2 paired runs compared, 1 DIFFER (not the same start)" in text


def test_metrics_never_measured_are_listed_not_tabled(tmp_path):
    records = [
        record("simclr", "mlp", 0, {"online_linear_acc1": None, "knn_k20_acc1": 0.3}),
        record("simclr", "transformer", 0, {"online_linear_acc1": None, "knn_k20_acc1": None}),
    ]
    results = load_results([write_jsonl(tmp_path / "r.jsonl", records)])
    assert bench_report.metric_names(results) == ["knn_k20_acc1"]
    text = render_markdown(results, bench_report.metric_names(results))
    assert "| online linear |" not in text
    assert "k-NN k=20: not measured in 1 of 2 runs" in text
    assert "not measured in any run (e.g. no validation, a set too small): online linear" in text


def test_a_chain_pairs_each_head_with_the_one_before_and_adds_up(tmp_path):
    accs = {"mlp": (0.50, 0.52), "mlp:bn": (0.51, 0.55), "tf": (0.55, 0.56), "tf:x": (0.6, 0.6)}
    records = [
        record("simclr", head, seed, {"online_linear_acc1": acc[seed]})
        for head, acc in accs.items()
        for seed in (0, 1)
    ]
    results = load_results([write_jsonl(tmp_path / "r.jsonl", records)])
    links = chained_differences(results, ["online_linear_acc1"], ["mlp", "mlp:bn", "tf"])
    assert [(p.key.projector, p.baseline.projector) for p in links] == [
        ("mlp:bn", "mlp"),
        ("tf", "mlp:bn"),
    ]
    steps = [[d for _, d in p.deltas["online_linear_acc1"]] for p in links]
    assert steps == [pytest.approx([0.01, 0.03]), pytest.approx([0.04, 0.01])]
    total = [a + b for a, b in zip(*steps, strict=True)]
    assert total == pytest.approx([0.05, 0.04])  # = tf - mlp, seed by seed
    assert all(set(p.p_holm) == {"online_linear_acc1"} for p in links)  # one family of two
    text = render_markdown(
        results, ["online_linear_acc1"], baseline="mlp:bn", chain=["mlp", "mlp:bn", "tf"]
    )
    assert "Δ: the paired difference to the `mlp:bn` head" in text
    section = text.split("## Decomposition")[1].split("## Checks")[0]
    assert "| simclr | `tf` | `mlp:bn` | +2.5 [" in section and "`tf:x`" not in section


def test_cli_refuses_a_chain_of_unknown_or_single_labels(three_seeds, capsys):
    assert bench_report.main([str(three_seeds), "--chain", "mlp", "nope"]) == 2
    assert "--chain nope: no cell has that projector" in capsys.readouterr().err
    assert bench_report.main([str(three_seeds), "--chain", "mlp"]) == 2
    assert "--chain needs at least two" in capsys.readouterr().err


def test_cli_writes_report_and_plot(three_seeds, tmp_path, capsys):
    out, plot = tmp_path / "out" / "report.md", tmp_path / "out" / "report.png"
    argv = [str(three_seeds), "--out", str(out), "--plot", str(plot)]
    assert bench_report.main(argv) == 0
    assert "## Paired difference to `mlp`" in out.read_text()
    assert "![paired differences](report.png)" in out.read_text()
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.md", "report.png"]
    assert bench_report.main([str(tmp_path / "missing.jsonl")]) == 2
    assert "no such file" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--digits": "-3"}, "argument --digits: must be an integer from 0 to 10, got '-3'"),
        ({"--baseline": "nope"}, "error: --baseline nope: no cell has that projector; present: "),
        ({"--metrics": "nope"}, "error: --metrics nope: not measured in these results; measured"),
        ({"--out": "<file>/report.md"}, "error: --out {file}/report.md: {file} is a file, not a"),
        ({"--plot": "<file>/p.png"}, "error: --plot {file}/p.png: {file} is a file, not a folder"),
        ({"accuracy": 250}, "line 2: metrics.offline_linear_acc1=250 is not an accuracy in [0, 1]"),
        ({"accuracy": "0.9"}, "line 2: metrics.offline_linear_acc1='0.9' is not a number"),
        ({"bytes": b"\xff\xfe not UTF-8\n"}, "no finished (status ok) record in the results (1 "),
        ({"--verdict": "<binary>"}, "error: --verdict {binary} is not UTF-8 text (invalid start"),
    ],
)
def test_cli_bad_report_input_is_one_line(three_seeds, tmp_path, capsys, change, message):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    results = three_seeds
    if "accuracy" in change:
        lines = three_seeds.read_text().splitlines()
        line = json.loads(lines[1])
        line["metrics"]["offline_linear_acc1"] = change.pop("accuracy")
        results = write_jsonl(tmp_path / "bad.jsonl", [json.loads(lines[0]), line])
    if "bytes" in change:
        results = tmp_path / "binary.jsonl"
        results.write_bytes(change.pop("bytes"))
    binary = tmp_path / "verdict.md"
    binary.write_bytes(b"\xff\xfe")
    argv = [str(results)]
    for option, value in change.items():
        argv += [option, value.replace("<file>", str(taken)).replace("<binary>", str(binary))]
    assert bench_report.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message.format(file=taken, binary=binary) in err[-1]
    assert "Traceback" not in "\n".join(err)
    assert taken.read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# The runner (needs solo-learn)


@pytest.fixture
def bench():
    if HOST_PROBLEM is not None:
        pytest.skip(HOST_PROBLEM)
    from solo_deepfusion.solo import bench

    return bench


@pytest.fixture
def study(bench, tmp_path):
    """A study on a fixed recipe file (its hash is part of every cell id)."""
    recipe = tmp_path / "recipes" / "fixed.yaml"
    recipe.parent.mkdir()
    recipe.write_text("method: simclr\nmax_epochs: 5\n")
    evaluation = {"eval_batch_sizes": (64, 256, 1024), "knn_k": (20, 200), "fusion_samples": 256}
    return bench.Study(
        config_dir=recipe.parent,
        config_name="fixed",
        max_epochs=5,
        eval_dataset="cifar10",
        knn_temperature=0.07,
        **evaluation,  # pinned: the ids below must not move with the runner's defaults
    )


def spec(bench, text):
    return bench.ProjectorSpec.parse(text)


@requires_host
def test_projector_specs(bench):
    a = spec(bench, "transformer:preset=small,mask=positives")
    assert a == spec(bench, "transformer: mask=positives, preset=small")
    assert a.label == "transformer:mask=positives,preset=small"
    assert a.under("simclr").label == "transformer:lr_scale=0.1,mask=positives,preset=small"
    assert a.under("simclr").overrides() == [
        "--projector",
        "transformer",
        "projector.lr_scale=0.1",
        "projector.mask=positives",
        "projector.preset=small",
    ]
    # a cell spells out the defaults in force, so a record keeps its meaning when they change
    bare = spec(bench, "transformer")
    assert bare.under("simclr").label == "transformer:lr_scale=0.1,preset=cosine_tied"
    assert bare.under("vicreg").label == "transformer:lr_scale=0.1,preset=stable_centred"
    assert spec(bench, "mlp_matched").under("byol").label == (
        "mlp_matched:lr_scale=1,preset=stable_bn"
    )
    given = spec(bench, "transformer:lr_scale=1,preset=paper")
    assert given.under("vicreg") == given
    assert spec(bench, "mlp").under("simclr").label == "mlp"
    trunk = spec(bench, "residual_mlp:depth=4").under("simclr")  # no preset to spell out
    assert trunk.label == "residual_mlp:depth=4,lr_scale=0.1"
    for bad in ("mlp:preset=small", "transformer:size=3", "convnet", "transformer:depth"):
        with pytest.raises(bench.UsageError):
            spec(bench, bad)


@requires_host
def test_cell_id_is_a_stable_hash_of_the_config(bench, study):
    def cell(seed=0, projector="transformer:preset=small,depth=2", temperature=0.1):
        ablation = (("batch_size", 256), ("temperature", temperature))
        ablation += (("weight_decay", None), ("depth", None))
        return bench.Cell(study, "simclr", spec(bench, projector).under("simclr"), seed, ablation)

    # Fixed by sha256 of the canonical JSON key: the same in every process and Python version.
    assert cell().cell_id == "a0387393c7d33094"
    assert cell(projector="transformer:depth=2,preset=small").cell_id == cell().cell_id
    others = {cell(seed=1), cell(projector="transformer:preset=small"), cell(temperature=0.2)}
    assert cell().cell_id not in {c.cell_id for c in others}
    study.epochs = 7  # the budget is part of the id
    assert cell().cell_id != "a0387393c7d33094"


@requires_host
def test_grid_collapses_axes_that_do_not_apply(bench, study):
    projectors = [spec(bench, "transformer:preset=small"), spec(bench, "mlp")]
    axes = {"temperature": [0.1, 0.2], "depth": [2, 4]}
    cells = bench.expand_grid(study, ["simclr", "byol"], projectors, [0, 1], axes)
    # per seed: simclr 2 mlp + 4 transformer, byol 1 mlp + 2 transformer (no temperature)
    assert len(cells) == 2 * (2 + 4 + 1 + 2)
    assert [c.seed for c in cells[:9]] == [0] * 9  # seed-major: cut short, pairs are whole
    assert cells[0].projector.name == "mlp"  # the baseline comes first
    byol = [c for c in cells if c.method == "byol"]
    assert {c.value("temperature") for c in byol} == {None}
    assert {c.value("depth") for c in byol if c.projector.name == "mlp"} == {None}

    simclr_tf = next(c for c in cells if c.method == "simclr" and c.projector.name != "mlp")
    argv = bench.pretrain_argv(simclr_tf, None, Path("/ckpt"))
    assert "++method_kwargs.temperature=0.1" in argv and "++projector.depth=2" in argv
    assert argv[argv.index("--projector") + 1] == "transformer"
    byol_argv = bench.pretrain_argv(byol[0], None, Path("/ckpt"))
    assert not any("temperature" in a or "depth" in a for a in byol_argv)
    with pytest.raises(bench.UsageError, match="depth"):
        bench.expand_grid(study, ["simclr"], [spec(bench, "transformer:depth=3")], [0], axes)


@requires_host
def test_temperature_methods_match_solo_learn(bench):
    from solo.methods import METHODS

    from solo_deepfusion.solo import HEAD_METHODS

    pattern = re.compile(r"method_kwargs\.temperature\b")  # not RESSL's temperature_q
    reads = {m for m in HEAD_METHODS if pattern.search(inspect.getsource(METHODS[m]))}
    assert reads == bench.TEMPERATURE_METHODS


def fake_jobs(bench, study, tmp_path, seeds=(0, 1)):
    projectors = [spec(bench, "mlp"), spec(bench, "transformer")]
    cells = bench.expand_grid(study, ["simclr"], projectors, list(seeds), {})
    return [bench.make_job(c, None, tmp_path / "work") for c in cells]


class FakeRun:
    """Stands for training: returns a record, or raises for the cells in ``fail``."""

    def __init__(self, fail=()):
        self.calls, self.fail = [], set(fail)

    def __call__(self, job):
        self.calls.append(job.cell_id)
        if job.cell_id in self.fail:
            raise RuntimeError("diverged")
        return {"cell_id": job.cell_id, "status": "ok", **job.key, "metrics": {"x": 1.0}}


@requires_host
def test_interrupted_grid_resumes_without_rerunning_finished_cells(bench, study, tmp_path):
    jobs = fake_jobs(bench, study, tmp_path)
    results = tmp_path / "results.jsonl"
    first = FakeRun(fail={jobs[1].cell_id})
    summary = bench.run_grid(jobs, results, first, log=lambda _: None)
    assert first.calls == [j.cell_id for j in jobs]
    assert summary.failed == [jobs[1].cell_id] and len(summary.ran) == 3
    failed = [r for r in bench.read_records(results) if r["status"] == "failed"]
    assert "RuntimeError: diverged" in failed[0]["error"]

    keep_failed = FakeRun()
    bench.run_grid(jobs, results, keep_failed, retry_failed=False, log=lambda _: None)
    assert keep_failed.calls == []

    again = FakeRun()
    summary = bench.run_grid(jobs, results, again, log=lambda _: None)
    assert again.calls == [jobs[1].cell_id]  # only the failed cell runs again
    assert len(summary.skipped) == 3
    assert bench.finished_cells(results) == {j.cell_id for j in jobs}


@requires_host
def test_time_budget_leaves_cells_for_a_later_call(bench, study, tmp_path, monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(bench.runner.time, "monotonic", lambda: clock[0])

    def slow(job):
        clock[0] += 100.0  # each cell takes 100 s
        return FakeRun()(job)

    jobs = fake_jobs(bench, study, tmp_path)
    results = tmp_path / "results.jsonl"
    summary = bench.run_grid(jobs, results, slow, time_budget_s=250, log=lambda _: None)
    assert len(summary.ran) == 2 and len(summary.remaining) == 2  # 200 s + 100 s > 250 s
    summary = bench.run_grid(jobs, results, slow, time_budget_s=250, log=lambda _: None)
    assert len(summary.ran) == 2 and len(summary.skipped) == 2


@requires_host
def test_append_keeps_a_torn_line_apart(bench, tmp_path):
    results = tmp_path / "results.jsonl"
    results.write_text('{"cell_id": "a", "status": "ok"}\n{"cell_id": "b", "sta')  # a crash
    bench.append_record(results, {"cell_id": "c", "status": "ok", "value": float("nan")})
    lines = results.read_text().splitlines()
    assert lines[1] == '{"cell_id": "b", "sta' and json.loads(lines[2])["value"] is None
    assert [r["cell_id"] for r in bench.read_records(results)] == ["a", "c"]


@requires_host
def test_probe_gives_paired_runs_the_same_data_order(bench):
    import lightning.pytorch as pl

    class Tiny(pl.LightningModule):
        def __init__(self, init_draws: int, estimate: bool) -> None:
            super().__init__()
            torch.rand(init_draws)  # heads of different sizes consume the RNG differently
            self.layer = torch.nn.Linear(1, 1)
            self.estimate = estimate

        def training_step(self, batch, batch_idx):
            return self.layer(batch[1].float().unsqueeze(1)).sum()

        def configure_optimizers(self):
            if self.estimate:  # as solo-learn's schedulers: builds the train iterator now
                assert self.trainer.estimated_stepping_batches == 16
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def order(init_draws: int, reseed: bool, workers: int = 0, estimate=False) -> list[int]:
        torch.manual_seed(0)
        model = Tiny(init_draws, estimate)
        data = torch.utils.data.TensorDataset(torch.arange(32), torch.arange(32))
        loader = torch.utils.data.DataLoader(data, 4, shuffle=True, num_workers=workers)
        seen = []

        class Spy(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                seen.extend(batch[0].tolist())

        callbacks = [Spy(), *([bench.BenchProbe(seed=0)] if reseed else [])]
        trainer = pl.Trainer(
            max_epochs=2, accelerator="cpu", logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
        )  # fmt: skip
        trainer.fit(model, loader)
        return seen

    assert order(1, reseed=False) != order(1000, reseed=False)  # what the probe prevents
    assert order(1, reseed=True) == order(1000, reseed=True)
    # with workers, epoch 0's indices are drawn before on_train_epoch_start: after the sanity
    # check, or in configure_optimizers when it asks for the number of steps
    for estimate in (False, True):
        first = order(1, reseed=True, workers=1, estimate=estimate)
        assert first == order(1000, reseed=True, workers=1, estimate=estimate)


@requires_host
def test_state_hash_tells_weights_apart(bench):
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    b = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    b.load_state_dict(a.state_dict())  # num_batches_tracked: a 0-dim int64 buffer
    assert bench.state_sha256(a) == bench.state_sha256(b)
    with torch.no_grad():
        b[0].weight[0, 0] += 1e-6
    assert bench.state_sha256(a) != bench.state_sha256(b)


@requires_host
def test_head_cost_counts_the_training_tokens(bench):
    from solo_deepfusion.heads import forward_flops
    from solo_deepfusion.solo.model import build_model

    cfg = method_cfg("simclr", batch_size=8)
    model = build_model(cfg)
    cost = bench.head_cost(model, model.cfg)
    (first, second) = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    per_token = first.in_features * first.out_features + second.in_features * second.out_features
    assert cost["head_tokens"] == 16 and cost["head_context"] == "view"
    assert cost["head_flops"] == 2 * 16 * per_token  # two crops of 8, multiply-add = 2
    assert cost["head_params"] == sum(p.numel() for p in model.projector.parameters())

    cfg = method_cfg("simclr_transformer", batch_size=8, name="transformer", preset="small")
    model = build_model(cfg)
    joint = bench.head_cost(model, model.cfg)
    assert joint["head_context"] == "joint" and joint["head_tokens"] == 16
    # one call on both crops' 16 tokens (attention over 16), not two calls on 8
    assert joint["head_flops"] == forward_flops(model.projector.head, 16, num_views=2)
    assert joint["head_flops"] != 2 * forward_flops(model.projector.head, 8)

    cfg.projector.context = "view"
    model = build_model(cfg)
    view = bench.head_cost(model, model.cfg)
    assert view["head_context"] == "view"
    assert view["head_flops"] == 2 * forward_flops(model.projector.head, 8)

    cfg = method_cfg("simclr_residual_mlp", batch_size=8, name="residual_mlp", depth=2)
    model = build_model(cfg)
    trunk = bench.head_cost(model, model.cfg)  # per sample: called once per crop
    assert trunk["head_context"] == "view" and trunk["head_tokens"] == 16
    assert trunk["head_flops"] == 2 * forward_flops(model.projector.head, 8)


@requires_host
def test_prepare_data_cuts_the_same_files_from_an_archive(bench, tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    for split, count in (("train", 5), ("test", 3)):
        with tarfile.open(source / f"{split}.tar.gz", "w:gz") as tar:
            for label in ("cat", "dog"):
                for i in reversed(range(count)):  # archive order is not name order
                    path = tmp_path / f"{label}{i}.jpg"
                    path.write_bytes(f"{split}{label}{i}".encode())
                    tar.add(path, arcname=f"{split}/{label}/{i:04d}.jpg")
    data = bench.prepare_data(source, tmp_path / "work", train_per_class=2, val_per_class=1)
    train = sorted(str(p.relative_to(data.train)) for p in data.train.rglob("*.jpg"))
    assert train == ["cat/0000.jpg", "cat/0001.jpg", "dog/0000.jpg", "dog/0001.jpg"]
    assert data.val.name == "val"
    assert (data.val / "dog" / "0000.jpg").read_bytes() == b"testdog0"
    (source / "train.tar.gz").unlink()  # prepared once: not read again
    assert bench.prepare_data(source, tmp_path / "work", 2, 1) == data


@requires_host
def test_cli_dry_run_and_usage_errors(bench, tmp_path, capsys):
    results, work = tmp_path / "r.jsonl", tmp_path / "work"
    base = ["--config-name", "cifar10_quick", "--results", str(results), "--work", str(work)]
    argv = [*base, "--methods", "simclr", "byol", "--seeds", "0", "1", "--dry-run"]
    assert bench.main([*argv, "--projectors", "mlp", "transformer:preset=small"]) == 0
    out = capsys.readouterr().out
    assert "8 cells, 8 to run" in out and "byol transformer:lr_scale=0.1,preset=small seed=1" in out
    assert not results.exists() and not work.exists()
    # the stock head with an output BatchNorm: `mlp`'s own field, the `<method>_mlp` variant
    assert bench.main([*argv, "--projectors", "mlp", "mlp:output_norm=batch"]) == 0
    out = capsys.readouterr().out
    assert "8 cells, 8 to run" in out and "byol mlp:output_norm=batch seed=1" in out

    bad = (
        ["--projectors", "mlp", "transformer:depth=2", "--depths", "4"],
        ["--overrides", "optimizer.batch_size=8", "--batch-sizes", "16"],
        ["--projectors", "mlp:preset=small"],
        ["--method-override", "dino:method_kwargs.x=1"],
    )
    for extra in bad:
        assert bench.main([*base, "--dry-run", *extra]) == 2
    assert capsys.readouterr().err.count("error:") == len(bad)


@requires_host
def test_output_spread_of_whole_batches_of_head_outputs():
    from torch import nn

    from solo_deepfusion.solo.bench.evaluation import output_spread

    class Model(nn.Module):  # a linear projector: identity, or every output the same vector
        context_projector = "projector"

        def __init__(self, constant: bool) -> None:
            super().__init__()
            self.projector = nn.Linear(6, 6)
            nn.init.zeros_(self.projector.bias)
            nn.init.eye_(self.projector.weight)
            if constant:
                nn.init.zeros_(self.projector.weight)
                nn.init.ones_(self.projector.bias)

    feats = torch.cat([torch.eye(6), torch.eye(6), torch.randn(5, 6)])  # 2 batches of 6 + 5
    spread = output_spread(Model(constant=False), feats, 6)  # the 5 left over are dropped
    assert spread["eval_output_cosine"] == pytest.approx(0.0, abs=1e-6)  # orthogonal outputs
    assert spread["eval_output_rank"] == pytest.approx(5.0)  # 6 points span 5 directions
    collapsed = output_spread(Model(constant=True), feats, 6)
    assert collapsed == {"eval_output_cosine": pytest.approx(1.0), "eval_output_rank": 0.0}
    assert output_spread(Model(constant=False), feats[:5], 6) == {}  # no whole batch


@pytest.mark.slow
@requires_host
def test_one_real_cell_through_the_launcher(bench, cifar_tiny, tmp_path, capsys):
    results = tmp_path / "results.jsonl"
    argv = [
        "--config-name", "cifar10_quick", "--projectors", "mlp", "transformer:preset=small",
        "--seeds", "3", "--epochs", "1", "--batch-sizes", "8", "--data", str(cifar_tiny),
        "--overrides", "data.num_workers=1", "data.fraction=-1", "++limit_train_batches=2",
        "++limit_val_batches=1", "++enable_model_summary=False",
        "--linear-epochs", "1", "--linear-overrides", "data.num_workers=0", "data.fraction=-1",
        "optimizer.batch_size=16", "++limit_train_batches=1", "++enable_model_summary=False",
        "--knn-k", "5", "--eval-batch-sizes", "8", "16", "--eval-workers", "0",
        "--results", str(results), "--work", str(tmp_path / "w"),  # default: a child process
    ]  # fmt: skip
    assert bench.main(argv) == 0
    mlp, rec = (json.loads(line) for line in results.read_text().splitlines())
    assert mlp["projector"] == "mlp" and mlp["cost"]["head_context"] == "view"
    assert "fusion_ratio_last" not in mlp["metrics"]
    assert "collapse_min_entropy" not in mlp["metrics"] and mlp["run"]["collapse"] is None
    # the spread of every head's outputs on the test images, batches of the training size (8)
    for record in (mlp, rec):
        assert -1 <= record["metrics"]["eval_output_cosine"] <= 1
        assert 0 < record["metrics"]["eval_output_rank"] <= 7  # B - 1
    # the same images in the same order, whatever the head's initialisation drew
    assert mlp["run"]["data_order_sha256"] == rec["run"]["data_order_sha256"]
    assert rec["status"] == "ok" and rec["projector"] == "transformer:lr_scale=0.1,preset=small"
    assert rec["isolation"] == "subprocess"
    metrics, cost, run = rec["metrics"], rec["cost"], rec["run"]
    for name in ("online_linear_acc1", "offline_linear_acc1", "feature_linear_acc1",
                 "knn_k5_acc1", "uacc_b8_head", "uacc_b16_head", "uacc_train_bs_head",
                 "backbone_1nn_acc"):  # fmt: skip
        assert 0.0 <= metrics[name] <= 1.0, name
    assert metrics["fusion_ratio_last"] > 0 and len(run["fusion_ratio_layers"]) == 4
    # collapse diagnostics of the last training step (1 of 0..1), on by default
    assert run["collapse"]["step"] == 1 and len(run["collapse"]["entropy"]) == 4
    assert metrics["collapse_min_entropy"] == min(run["collapse"]["entropy"]) > 0
    assert -1 <= metrics["collapse_output_cosine"] == run["collapse"]["output_cosine"] <= 1
    assert 0 <= metrics["collapse_output_rank"] == run["collapse"]["output_rank"] <= 15  # T - 1
    assert (cost["head_tokens"], cost["head_context"], cost["steps"]) == (16, "joint", 2)
    assert cost["head_params"] > 0 and cost["head_flops"] > 0
    assert cost["time_per_epoch_s"] > 0 and cost["peak_rss_bytes"] > 2**20
    assert run["feature_probe_weight_decay"] > 0  # the L2 strength chosen on held-out features
    assert run["online_linear_epoch"] == 0 and len(run["data_order_sha256"]) == 64
    assert len(run["backbone_init_sha256"]) == 64
    assert run["resolved"]["method"] == "simclr_transformer"
    # paths are kept relative to --work (or as their last parts): no folder of this machine
    assert rec["paths"]["work_dir"] == f"runs/{rec['cell_id']}"
    assert rec["paths"]["run_dir"].startswith(f"runs/{rec['cell_id']}/ckpt/simclr_transformer/")
    assert str(tmp_path) not in json.dumps([rec["paths"], run["val_path"], mlp["paths"]])
    assert rec["env"]["versions"]["solo-learn"]
    assert not list((tmp_path / "w").rglob("*.ckpt"))  # checkpoints removed after evaluation

    capsys.readouterr()
    assert bench.main(argv) == 0  # resumed: nothing left to train
    assert "0 ran, 2 already done" in capsys.readouterr().out
    assert len(results.read_text().splitlines()) == 2


@requires_host
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--projectors", "transformer:depth=abc"], "depth must be an integer >= 0, got 'abc'"),
        (["--batch-sizes", "0"], "optimizer.batch_size must be a positive integer, got 0"),
        (["--epochs", "0"], "max_epochs must be a positive integer, got 0"),
        (["--methods", "nope"], "error: --methods nope: not a solo-learn method; choose from: "),
    ],
)
def test_dry_run_checks_every_cell_as_pretrain_does(bench, tmp_path, capsys, extra, message):
    argv = ["--config-name", "cifar10_quick", "--results", str(tmp_path / "r.jsonl")]
    assert bench.main([*argv, "--work", str(tmp_path / "work"), "--dry-run", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Error(" not in err[0]
    assert not (tmp_path / "work").exists()
