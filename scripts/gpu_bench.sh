#!/usr/bin/env bash
# The GPU slice of the head-vs-head benchmark (solo-deepfusion bench), sized for one H200 with
# no network: SimCLR on all of CIFAR-10 (50k images, 32 px), mlp vs transformer (the default
# `stable_bn` preset) vs mlp_matched (the transformer's parameter count), paired seeds,
# bf16-mixed, DALI on the GPU.
# Cells run seed-major and stop starting once BUDGET_S is spent, so what finishes is whole
# pairs; a second call resumes (same WORK and results file).
#
#   scripts/gpu_bench.sh --dry-run         print the settings and the grid; needs no GPU (nor data, but for TRAIN_PER_CLASS)
#   scripts/gpu_bench.sh                   run; results.jsonl, report.md/.png, logs in $OUT
#   scripts/gpu_bench.sh --prepare-wheels  on a host with network and the dev venv: fill .whl/
#
# What it brings: no virtual environment is assumed. Wheels in .whl/ (made by --prepare-wheels:
# solo-learn, hydra-core, omegaconf, antlr4, torchmetrics 0.11.4, lightning 2.1.2; about 3 MB)
# are installed to a private folder; the package itself runs from this checkout (PYTHONPATH).
# DALI (nvidia-dali-cuda130, ~500 MB) is too big to carry through a 64 MiB working tree: when it
# does not import, the runs fall back to torchvision loading (data.format=image_folder), which
# every record says (run.resolved.data_format); REQUIRE_DALI=1 stops instead.
# Data: $SOLO_DEEPFUSION_DATA, else shared/data/cifar10 or .data/cifar10 in this checkout (the
# train.tar.gz/test.tar.gz of the shared folder, 19 MB: `mkdir -p .data && cp -r
# ../shared/data/cifar10 .data/` and carry `.data`).
#
# Knobs (environment): EPOCHS [10] SEEDS ["0 1 2"] METHODS [simclr]
#   PROJECTORS ["mlp transformer mlp_matched"] BATCH [512] BUDGET_S [420: the grid's seconds;
#   the project's device tool stops a command at 600 s] LINEAR_EPOCHS [3] WORK [/tmp/sdf-bench]
#   RECIPE [cifar10_quick] EXTRA (more Hydra overrides, e.g. "++backbone.stem=cifar")
#   LINEAR_EXTRA (overrides of the linear probe) DEVICE [cuda: evaluation] PYTHON REQUIRE_DALI [0]
#   SOLO_DEEPFUSION_COMMIT (recorded when the copy has no .git)
#   TRAIN_PER_CLASS [all] (train on the first N images of each class)
#
# The confirm arms of the head study (scripts/study_heads.sh) at zoo scale, 10k images:
#   PROJECTORS="mlp mlp_matched transformer:lr_scale=0.1,mask=positives,norm=pre
#   transformer:lr_scale=0.1,norm=pre" TRAIN_PER_CLASS=1000 BATCH=256 EPOCHS=20
#   SEEDS="0 1 2 3 4 5" OUT=benchmarks/gpu-confirm scripts/gpu_bench.sh
#
# Why DALI runs set data.dataset=custom and data.val_path=null: solo-learn's parse_cfg allows
# DALI only for custom/imagenet datasets, and a `custom` run would validate online on 224 px
# images (chance level for a 32 px model), so online validation is off there and the offline
# evaluations (linear probe, k-NN, unsupervised 1-NN) use CIFAR's 32 px transforms
# (--eval-dataset cifar10). solo-learn's DALI pipeline for `custom` normalises with ImageNet's
# mean/std where the evaluations use CIFAR's: the same for every head, so paired Δ are unbiased.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

mode=run
case "${1:-}" in
  "") ;;
  --dry-run) mode=dry ;;
  --prepare-wheels) mode=wheels ;;
  -h | --help) sed -n '2,40p' "$0"; exit 0 ;;
  *) echo "usage: $0 [--dry-run | --prepare-wheels]" >&2; exit 2 ;;
esac

if [ -n "${PYTHON:-}" ]; then
  py=$PYTHON
elif [ -x .venv/bin/python ] && .venv/bin/python -c "" 2>/dev/null; then
  py=.venv/bin/python
else
  py=python3
fi
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

prepare_wheels() {
  # Pure-Python wheels pinned to this venv's versions (the ones CI tests), plus solo-learn.
  local pins src
  pins=$("$py" - <<'EOF'
import importlib.metadata as m
names = ["hydra-core", "omegaconf", "antlr4-python3-runtime", "torchmetrics", "lightning"]
print(" ".join(f"{n}=={m.version(n)}" for n in names))
EOF
)
  src=${SOLO_LEARN_SRC:-$("$py" -c 'import pathlib, solo; print(pathlib.Path(solo.__file__).parents[1])')}
  mkdir -p .whl
  # shellcheck disable=SC2086
  "$py" -m pip wheel -q --no-deps -w .whl $pins
  "$py" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$src"
  ls -la .whl
  echo "Ignore it in git (echo /.whl/ >> .git/info/exclude) and carry .whl (and .data)."
}

install_wheels() {
  local site=/tmp/sdf-site
  if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$site" .whl/*.whl
    export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "note: no .whl/ folder; assuming solo-learn, hydra-core and DALI are installed"
    export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
  fi
}

find_data() {
  local candidate
  for candidate in "${SOLO_DEEPFUSION_DATA:-}" "$repo/shared/data/cifar10" "$repo/.data/cifar10"; do
    if [ -n "$candidate" ] && { [ -e "$candidate/train.tar.gz" ] || [ -d "$candidate/train" ]; }; then
      echo "$candidate"
      return
    fi
  done
}

if [ "$mode" = wheels ]; then
  prepare_wheels
  exit 0
fi
[ "$mode" = dry ] || install_wheels
[ "$mode" = dry ] && export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"

# Preflight: the host, the GPU, DALI.
"$py" - <<'EOF' || { echo "error: solo-learn or its dependencies do not import (see above); run --prepare-wheels on a networked host and carry .whl" >&2; exit 3; }
import torch
import solo_deepfusion.solo  # noqa: F401  (solo-learn >= 1.0.6, hydra, lightning)
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, GPU: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
EOF
if "$py" -c "import nvidia.dali" 2>/dev/null; then
  dali=1
else
  dali=0
  [ "${REQUIRE_DALI:-0}" = 1 ] && [ "$mode" = run ] && { echo "error: DALI does not import" >&2; exit 3; }
  echo "WARNING: NVIDIA DALI does not import here: training reads JPEGs with torchvision workers"
fi

out=${OUT:-$repo/benchmarks/gpu}
work=${WORK:-/tmp/sdf-bench}
data=$(find_data || true)
if [ -z "$data" ] && [ "$mode" = run ]; then
  echo "error: no CIFAR-10 (train.tar.gz/test.tar.gz or train/ test/): set SOLO_DEEPFUSION_DATA or carry .data/cifar10" >&2
  exit 3
fi

pretrain=(accelerator=gpu devices=1 precision=bf16-mixed data.fraction=-1)
if [ "$dali" = 1 ]; then
  pretrain+=(data.format=dali data.dataset=custom ++dali.device=gpu data.val_path=null data.num_workers=8)
else
  pretrain+=(data.format=image_folder data.num_workers=12)
fi
# shellcheck disable=SC2206
pretrain+=(${EXTRA:-})
# shellcheck disable=SC2206
args=(
  --config-name "${RECIPE:-cifar10_quick}"
  --methods ${METHODS:-simclr}
  --projectors ${PROJECTORS:-mlp transformer mlp_matched}
  --seeds ${SEEDS:-0 1 2}
  --epochs "${EPOCHS:-10}"
  --batch-sizes "${BATCH:-512}"
  --eval-dataset cifar10
  --overrides "${pretrain[@]}"
  --linear-epochs "${LINEAR_EPOCHS:-3}"
  --linear-overrides accelerator=gpu devices=1 precision=bf16-mixed data.num_workers=12
  optimizer.batch_size=512 ${LINEAR_EXTRA:-}
  --knn-k 20 200
  --eval-batch-sizes 64 256 1024
  --device "${DEVICE:-cuda}"
  --eval-workers 12
  --isolation in-process
  --time-budget "${BUDGET_S:-420}"
  --results "$out/results.jsonl"
  ${TRAIN_PER_CLASS:+--train-per-class "$TRAIN_PER_CLASS"}
  --work "$work"
)
[ -n "$data" ] && args+=(--data "$data")

echo "python: $py; data: ${data:-none}; DALI: $dali; out: $out; work: $work"
echo "command: $py -m solo_deepfusion.solo.bench ${args[*]}"
if [ "$mode" = dry ]; then
  "$py" -m solo_deepfusion.solo.bench "${args[@]}" --dry-run
  exit 0
fi

mkdir -p "$out"
{ nvidia-smi || true; "$py" -m pip list 2>/dev/null || true; } >"$out/env.txt" 2>&1
set +e
"$py" -m solo_deepfusion.solo.bench "${args[@]}" 2>&1 | tee "$out/bench.log"
status=${PIPESTATUS[0]}
set -e
if [ -s "$out/results.jsonl" ]; then
  "$py" -m solo_deepfusion.bench.report "$out/results.jsonl" \
    --out "$out/report.md" --plot "$out/report.png" || status=1
  cat "$out/report.md"
fi
exit "$status"
