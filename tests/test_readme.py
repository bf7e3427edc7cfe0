"""The README stays true: its zoo figures are the manifest's, its study figures are the committed
reports', its commands exist (host-free)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from solo_deepfusion.cli import HOST_COMMANDS, LOCAL_COMMANDS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
COMMANDS = {*HOST_COMMANDS, *LOCAL_COMMANDS}


def _section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end > 0 else None]


def _table(text: str) -> list[list[str]]:
    """The body rows of the first Markdown table in ``text``, cells stripped."""
    rows = [line for line in text.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def _manifest_metrics(entry: dict) -> dict[str, float]:
    values = {}
    for metric in entry["metrics"]:
        protocol = metric["protocol"]
        kind = protocol["kind"] if protocol["kind"] != "knn" else f"knn{protocol['k']}"
        values[kind] = metric["value"]
    return values


def test_readme_is_a_front_page() -> None:
    assert len(README.splitlines()) <= 160  # a third of 0.4.0's 453 lines, give or take
    assert "Holm-adjusted" not in README or "p-values" in README


def test_zoo_figures_are_the_manifests() -> None:
    manifest = yaml.safe_load((ROOT / "zoo" / "manifest.yaml").read_text())
    entries = {entry["name"]: _manifest_metrics(entry) for entry in manifest["models"]}
    rows = _table(_section("Use the model zoo"))
    assert {row[0].strip("`") for row in rows} == set(entries)
    for name, _, online, knn200, linear in rows:
        expected = entries[name.strip("`")]
        # the offline probe where the entry has one, else the probe on cached features
        probe = expected.get("offline_linear", expected.get("feature_linear"))
        quoted = [float(value.rstrip("%")) for value in (online, knn200, linear)]
        assert quoted == [expected["online_linear"], expected["knn200"], probe]


def test_commands_table_lists_exactly_the_subcommands() -> None:
    listed = {row[0].strip("`") for row in _table(_section("Commands"))}
    assert listed == COMMANDS


def test_every_command_line_in_the_readme_is_a_real_subcommand() -> None:
    code = r"(?:^|`|\.venv/bin/)solo-deepfusion ([a-z][a-z-]*)"  # in code, not in prose
    used = re.findall(code, README, flags=re.MULTILINE)
    assert used and set(used) <= COMMANDS


def _report_table(report: str) -> dict[str, dict[str, str]]:
    """The report's per-arm table: projector label -> column -> cell."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| method | projector |"))
    header = [cell.strip() for cell in lines[start].strip("|").split("|")]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[1].strip("`")] = dict(zip(header, cells, strict=True))
    return rows


#: A README head -> its projector label in the linked report, and in the step-time table.
STABLE_BN = "lr_scale=0.1,mask=positives,norm=pre,output_norm=batch,preset=paper"
HEADS = {
    "`mlp` + output BatchNorm": ("mlp:output_norm=batch", "mlp:output_norm=batch"),
    "`residual_mlp`": ("residual_mlp:lr_scale=0.1", "residual_mlp"),
    "`stable_bn`, no mixing": (
        f"transformer:{STABLE_BN.replace('mask=positives', 'mask=positives,mixing=none')}",
        "transformer:preset=stable_bn,mixing=none",
    ),
    "`stable_bn`, uniform mixing": (
        f"transformer:{STABLE_BN.replace('mask=positives', 'mask=positives,mixing=mean')}",
        "transformer:preset=stable_bn,mixing=mean",
    ),
    "`stable_bn` (0.4.0's default)": (f"transformer:{STABLE_BN}", "transformer:preset=stable_bn"),
    "transformer (default, `cosine_tied`)": (
        f"transformer:attention_logits=cosine,{STABLE_BN},qk_init=tied",
        "transformer",
    ),
}


def _step_ratios() -> dict[str, str]:
    """benchmarks/cpu/step_time.md's summary: head label -> step × mlp."""
    text = (ROOT / "benchmarks" / "cpu" / "step_time.md").read_text()
    rows = _table(text[text.index("| head | params | step × `mlp` |") :])
    return {head.split("`")[1]: ratio for head, _, ratio in rows}


@pytest.mark.parametrize("row", _table(_section("Which head to use")), ids=lambda r: r[0])
def test_recommendations_quote_their_reports(row: list[str]) -> None:
    head, _, cached, offline, params, ratio, link = row
    label, step_label = HEADS[head]
    report = (ROOT / re.search(r"\((benchmarks/[\w/]+/report\.md)\)", link)[1]).read_text()
    for delta in (cached, offline):  # the paired Δ and its interval, as the report prints them
        assert delta.replace("**", "") in report.replace("**", "")
    arm = _report_table(report)[label]
    assert arm["seeds"] == "6" and params == arm["head params"]
    assert ratio == _step_ratios()[step_label]
