"""``solo-deepfusion bench``: transformer head vs feed-forward head, as a matched grid of runs.

Example (CPU-sized)::

    solo-deepfusion bench --config-name cifar10_quick --methods simclr byol \\
        --projectors mlp mlp_matched:preset=small transformer:preset=small \\
        --seeds 0 1 2 --epochs 5 --val-per-class 200 --results benchmarks/cpu.jsonl
    solo-deepfusion bench-report benchmarks/cpu.jsonl --out report.md --plot report.png

Each **cell** of the grid (method x projector x seed x ablation values) is one pretraining run
through the launcher (:func:`~solo_deepfusion.solo.launch.run_pretrain`), on the same recipe and
budget, followed by its evaluations. What is matched, and how:

* **Budget**: every cell gets the same recipe, overrides, epochs, data fraction and subset.
* **Data**: the same images for every cell (``data.fraction`` is solo-learn's fixed, stratified
  split; ``--train-per-class/--val-per-class`` cut the same files, sorted by name). The same
  **order** per seed: the runner reseeds torch, numpy and ``random`` with a function of
  ``(seed, epoch)`` at every epoch start, right before the loader draws its permutation and its
  workers' seeds, so the model's initialisation (which differs between heads) does not shift
  them. Each record holds a hash of the sample indices seen (``run.data_order_sha256``): paired
  runs must agree, and the report checks it. DALI pipelines have their own fixed seed (12 in
  solo-learn), the same for every cell and seed.
* **Initialisation**: ``seed_everything(seed)`` before the model is built; solo-learn builds the
  backbone before the head, so paired cells should start from the same backbone weights. Each
  record holds a hash of them (``run.backbone_init_sha256``) and the report checks pairs.
  (With ``backbone.stem=imagenet|cifar`` the launcher's model builder draws the new stem conv
  after the head, so ``conv1`` differs between heads: the report says so.)

Per cell, one JSON line (schema :data:`SCHEMA`, see :func:`execute_job`) is appended to the
results file: the cell's keys, online linear acc@1 (the run's last validation), offline linear
acc@1 (:func:`~solo_deepfusion.solo.evaluate.run_linear`, ``--linear-epochs``), weighted k-NN
acc@1 on backbone features (:func:`~solo_deepfusion.solo.evaluate.run_knn`), the authors'
"unsupervised accuracy" (leave-one-out 1-NN of head outputs within evaluation batches), the
last-layer fusion ratio (transformer heads), time per epoch, peak memory, head parameters and
forward FLOPs at the training token count, versions and commit. Accuracies are fractions.

An interrupted grid resumes: a cell whose id (a hash of its whole config, :meth:`Cell.key`)
already has an ``ok`` line is skipped; failed cells are retried unless ``--skip-failed``. Each
cell runs in its own folder, ``<work>/runs/<cell id>``, by default in its own Python process
(``--isolation subprocess``: a crash stays in the cell and peak RSS is the cell's own).

The runner's modules: :mod:`.grid` (projector specs, the study, cells and their ids),
:mod:`.data` (the shared data, cut per class), :mod:`.jobs` (a cell's command lines),
:mod:`.probe` (the training callback: times, reseeding, hashes, memory), :mod:`.evaluation`
(head cost, unsupervised accuracies, fusion ratio, offline evaluations), :mod:`.records` (the
results file, the environment), :mod:`.runner` (one cell, here or in a child Python, and the
grid loop) and :mod:`.cli` (the command line).
"""

from __future__ import annotations

from solo_deepfusion.bench.records import SCHEMA, append_record, finished_cells, read_records
from solo_deepfusion.datasets import prepare_data
from solo_deepfusion.errors import UsageError
from solo_deepfusion.solo.bench.cli import main, parser
from solo_deepfusion.solo.bench.evaluation import head_cost, unsupervised_accuracies
from solo_deepfusion.solo.bench.grid import (
    AXES,
    BASELINE,
    TEMPERATURE_METHODS,
    Cell,
    ProjectorSpec,
    Study,
    expand_grid,
)
from solo_deepfusion.solo.bench.jobs import Job, make_job, pretrain_argv
from solo_deepfusion.solo.bench.probe import BenchProbe, state_sha256
from solo_deepfusion.solo.bench.runner import (
    GridSummary,
    execute_job,
    run_grid,
    run_job_in_process,
    run_job_subprocess,
)

__all__ = [
    "AXES",
    "BASELINE",
    "SCHEMA",
    "TEMPERATURE_METHODS",
    "BenchProbe",
    "Cell",
    "GridSummary",
    "Job",
    "ProjectorSpec",
    "Study",
    "UsageError",
    "append_record",
    "execute_job",
    "expand_grid",
    "finished_cells",
    "head_cost",
    "main",
    "make_job",
    "parser",
    "prepare_data",
    "pretrain_argv",
    "read_records",
    "run_grid",
    "run_job_in_process",
    "run_job_subprocess",
    "state_sha256",
    "unsupervised_accuracies",
]
