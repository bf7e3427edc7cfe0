#!/usr/bin/env bash
# One GPU session of solo-deepfusion, for the device machine: its own Python and packages
# (torch, torchvision, lightning, torchmetrics, timm, ...) plus the wheels carried in .whl/
# (solo-learn, hydra-core, omegaconf, antlr4, jsonschema and what it needs), installed with
# --target into a private folder. The package runs from this checkout (PYTHONPATH).
# What it does and how it resumes: scripts/gpu_session.py.
#
#   scripts/gpu_session.sh --prepare-wheels   here, with network and the dev venv: fill .whl/
#   scripts/gpu_session.sh --dry-run          the plan, the wheels, time per part; no GPU
#   scripts/gpu_session.sh                    the session (about 9 minutes); files in $OUT
#   scripts/rehearse_gpu_session.sh           all of it on this CPU, in a device-like Python
#
# On the device (the tool copies the working tree; zoo/files is too big to travel, so take it
# out of the index for the call: `git rm -r -q --cached zoo/files` and `git reset -q zoo/files`
# after; .data/cifar10 is a copy of the shared CIFAR-10 folder):
#   run(command="SOLO_DEEPFUSION_COMMIT=<sha> bash scripts/gpu_session.sh",
#       carry=[".whl", ".data"], timeout_s=600)
# Environment: PYTHON [python3], SOLO_DEEPFUSION_DATA [.data/cifar10], OUT [gpu-out],
#   WORK [/tmp/sdf-gpu-session] (a second call resumes from it), BUDGET_S [540].
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

# Pure-Python packages the device lacks, at the versions CI tests (its venv), plus rpds-py's
# CPython 3.12 build; solo-learn as a wheel of the pinned source.
PURE=(hydra-core omegaconf antlr4-python3-runtime jsonschema jsonschema-specifications referencing)
BINARY=(rpds-py)

prepare_wheels() {
  local venv=${SOLO_DEEPFUSION_VENV:-.venv} pins binary src
  pins=$("$venv/bin/python" -c 'import importlib.metadata as m, sys
print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' "${PURE[@]}")
  binary=$("$venv/bin/python" -c 'import importlib.metadata as m, sys
print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' "${BINARY[@]}")
  src=$("$venv/bin/python" -c 'import pathlib, solo; print(pathlib.Path(solo.__file__).parents[1])')
  rm -rf .whl && mkdir -p .whl
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip wheel -q --no-deps -w .whl $pins
  # shellcheck disable=SC2086
  "$venv/bin/python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl $binary
  "$venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation -w .whl "$src"
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >>.git/info/exclude
  grep -qx '/.data/' .gitignore .git/info/exclude 2>/dev/null || echo /.data/ >>.git/info/exclude
  mkdir -p .data && cp -r "${SOLO_DEEPFUSION_SHARED_DATA:-../shared/data/cifar10}" .data/
  ls -la .whl
}

case "${1:-}" in
  --prepare-wheels) prepare_wheels; exit 0 ;;
  -h | --help) sed -n '2,21p' "$0"; exit 0 ;;
esac

site=/tmp/sdf-site
if compgen -G ".whl/*.whl" >/dev/null && [ "${1:-}" != --dry-run ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" .whl/*.whl
  export PYTHONPATH="$site:$repo${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
fi
data=${SOLO_DEEPFUSION_DATA:-$repo/.data/cifar10}
out=${OUT:-$repo/gpu-out}
work=${WORK:-/tmp/sdf-gpu-session}
mkdir -p "$work" "$out"
export SESSION_LOG=$work/session.log.txt
{
  echo "== $(date -u +%FT%TZ) python $("$py" -c 'import sys; print(sys.version.split()[0])')"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
  "$py" -c 'import torch, lightning, torchmetrics, torchvision
print("torch", torch.__version__, "cuda", torch.cuda.is_available(), "torchvision",
      torchvision.__version__, "lightning", lightning.__version__, "torchmetrics",
      torchmetrics.__version__)'
} 2>&1 | tee -a "$SESSION_LOG"
set +e
"$py" scripts/gpu_session.py --data "$data" --work "$work" --out "$out" \
  --budget "${BUDGET_S:-540}" "$@" 2>&1 | tee -a "$SESSION_LOG"
status=${PIPESTATUS[0]}
set -e
tail -c 2000000 "$SESSION_LOG" >"$out/session.log"
exit "$status"
