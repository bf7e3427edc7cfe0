#!/usr/bin/env bash
# Rehearse the GPU session on this CPU, as the device machine will run it:
#   1. a Python 3.12 environment with the device image's packages (scripts/device-image.txt:
#      torch 2.11, torchvision 0.26, lightning 2.6, torchmetrics 1.9, timm, ...; no hydra, no
#      solo-learn, no jsonschema), never the project's venv;
#   2. the wheels the device lacks (.whl/, made by `gpu_session.sh --prepare-wheels`) and the
#      data (.data/cifar10);
#   3. a copy of what the device tool sends (tracked and untracked-not-ignored files, zoo/files
#      left out, plus .whl and .data), checked against the tool's 64 MiB;
#   4. scripts/gpu_session.sh --scale tiny in that copy, with $OUT;
#   5. $OUT checked against the tool's return limits (8 files, 16 MiB each) and the bundle
#      unpacked: results, report and log must be there.
# The log goes to benchmarks/gpu/rehearsal.log (machine paths replaced).
#
#   scripts/rehearse_gpu_session.sh        # REHEARSAL_VENV [~/.cache/solo-deepfusion/device-py312]
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
venv=${REHEARSAL_VENV:-$HOME/.cache/solo-deepfusion/device-py312}
python312=${PYTHON312:-}
if [ -z "$python312" ]; then  # the first Python 3.12 that runs (a pyenv shim may not)
  for candidate in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 python3.12; do
    if "$candidate" -c "" 2>/dev/null; then python312=$candidate; break; fi
  done
fi
log=$repo/benchmarks/gpu/rehearsal.log
mkdir -p "$(dirname "$log")"
stage=$(mktemp -d /tmp/sdf-rehearsal.XXXXXX)
trap 'rm -rf "$stage"' EXIT

main() {
  echo "== 1. device-like environment: $venv"
  if [ ! -x "$venv/bin/python" ]; then
    "$python312" -m venv "$venv"
  fi
  "$venv/bin/python" -m pip install -q -r scripts/device-image.txt
  if "$venv/bin/python" -c "import hydra" 2>/dev/null; then
    echo "error: $venv has hydra: not the device's image" >&2
    return 1
  fi
  "$venv/bin/python" -c 'import sys, torch, lightning, torchmetrics
print("python", sys.version.split()[0], "torch", torch.__version__, "lightning",
      lightning.__version__, "torchmetrics", torchmetrics.__version__)'

  echo "== 2. wheels and data"
  [ -d .whl ] && [ -d .data/cifar10 ] || bash scripts/gpu_session.sh --prepare-wheels

  echo "== 3. the working tree as the device tool sends it"
  mkdir -p "$stage/tree" "$stage/out"
  git ls-files -co --exclude-standard -z | grep -zv '^zoo/files/' \
    | xargs -0 -I{} cp --parents -P {} "$stage/tree/" 2>/dev/null || true
  cp -r .whl .data "$stage/tree/"
  local bytes
  bytes=$(du -sb "$stage/tree" | cut -f1)
  echo "working tree: $((bytes / 1048576)) MiB (limit 64)"
  [ "$bytes" -le $((64 * 1048576)) ] || { echo "error: over the 64 MiB the tool sends" >&2; return 1; }

  echo "== 4. the session, tiny, on the CPU"
  session() {
    (cd "$stage/tree" && PYTHON="$venv/bin/python" OUT="$stage/out" WORK="$stage/session" \
      SOLO_DEEPFUSION_COMMIT=$(git -C "$repo" rev-parse HEAD) BUDGET_S=${BUDGET_S:-900} \
      bash scripts/gpu_session.sh --scale tiny)
  }
  session
  echo "== 4b. a second call resumes: nothing is measured or trained again; it brings back the"
  echo "   entry whose weights did not fit the first call's 64 MiB"
  mv "$stage/out" "$stage/out1" && mkdir -p "$stage/out"  # the device empties \$OUT each time
  session | tee "$stage/second.log"
  grep -Eq "bench: 0 ran, [1-9][0-9]* already done, 0 failed" "$stage/second.log" \
    || { echo "error: the second call did not resume" >&2; return 1; }

  echo "== 5. what comes back"
  local count=0
  for f in "$stage"/out1/* "$stage"/out/*; do
    count=$((count + 1))
    size=$(stat -c %s "$f")
    echo "  $(basename "$f") $((size / 1024)) KiB"
    [ "$size" -le $((16 * 1048576)) ] || { echo "error: $f is over 16 MiB" >&2; return 1; }
  done
  [ "$count" -le 16 ] || { echo "error: $count files (limit 8 per call)" >&2; return 1; }
  mkdir -p "$stage/bundle"
  cat "$stage"/out1/bundle.tar.* | tar -x -C "$stage/bundle"
  cat "$stage"/out/bundle.tar.* | tar -x -C "$stage/bundle"
  (cd "$stage/bundle" && find . -type f | sort)
  for f in results.jsonl report.md plan.json throughput.json session.log \
    export/simclr-r18-cifar10-gpu/simclr-r18-cifar10-gpu.full.safetensors \
    export/simclr-deepfusion-r18-cifar10-gpu/simclr-deepfusion-r18-cifar10-gpu.full.safetensors; do
    [ -s "$stage/bundle/$f" ] || { echo "error: the bundle has no $f" >&2; return 1; }
  done
  grep -c '"status": "ok"' "$stage/bundle/results.jsonl" | sed 's/^/ok cells: /'
  echo "rehearsal passed"
}

main 2>&1 | sed -u -e "s#$venv#<venv>#g" -e "s#$stage#<stage>#g" -e "s#$repo#<repo>#g" -e "s#$HOME#~#g" | tee "$log"
exit "${PIPESTATUS[0]}"
