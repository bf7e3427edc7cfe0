#!/usr/bin/env bash
# The head study of issue 9: does a transformer head that trains beat the MLP head?
#
#   scripts/study_heads.sh screen  [ARM ...]        SimCLR, 2,000 images x 6 epochs, 3 seeds
#   scripts/study_heads.sh confirm ARM ...          SimCLR, 5,000 images x 10 epochs, 6 seeds
#   scripts/study_heads.sh horizon ARM              mlp vs ARM at 3x the confirm's epochs, 3 seeds
#   scripts/study_heads.sh byol ARM                 BYOL, mlp vs ARM at the confirm budget, 3 seeds
#   scripts/study_heads.sh vicreg ARM               VICReg, the same
#   scripts/study_heads.sh controls [ARM ...]       the default's fair controls at the confirm
#                                                  budget, 6 seeds, paired with the confirm's
#                                                  own mlp and default cells (copied in once)
#   scripts/study_heads.sh regimes ARM ...          head regimes from the regime search, the same
#                                                  way (benchmarks/regimes/confirm)
#   scripts/study_heads.sh report PHASE             benchmarks/PHASE/report.md and report.png
#                                                  (benchmarks/PHASE/verdict.md on top, if there);
#                                                  for controls also the decomposition mlp ->
#                                                  mlp:output_norm=batch -> mixing=none -> mean
#                                                  -> the default; for controls, regimes/confirm
#                                                  and byol report-vs-default.md, each arm's Δ to
#                                                  the default (regimes/confirm: with the controls)
#
# ARM is a bench projector spec (`transformer:norm=pre,qk_norm=true`); `mlp` is always added.
# Every phase appends to benchmarks/<phase>/results.jsonl and resumes: finished cells are never
# run again, so a phase can be stopped and started again at any time. Each run evaluates on
# the full 10,000-image test split: online linear, the cached-feature linear probe, solo-learn's
# offline linear probe (1 epoch), k-NN (k = 20, 200) and the head-output 1-NN at B = 16, 64.
# Runs use one CPU thread at low priority; SOLO_DEEPFUSION_DATA names the CIFAR-10 folder.
# STUDY_SEEDS="3 4 5" runs a phase on those seeds only, so two shells (each with its own
# SOLO_DEEPFUSION_STUDY_WORK) can share a phase's seeds on a 2-core machine; the results file,
# appended one whole line per cell, is shared. STUDY_TIME_BUDGET=SECONDS starts no cell that would
# not finish within that many seconds of the start (judged by the longest cell so far).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
bench=(nice -n 19 "${SOLO_DEEPFUSION_BIN:-.venv/bin/solo-deepfusion}")
phase="${1:?phase: screen | confirm | controls | regimes | horizon | byol | vicreg | report}"
[ "$phase" = report ] || : "${SOLO_DEEPFUSION_DATA:?set SOLO_DEEPFUSION_DATA to the CIFAR-10 folder}"
shift
work="${SOLO_DEEPFUSION_STUDY_WORK:-benchmarks/scratch}"
common=(
  --config-name cifar10_quick --batch-sizes 128
  --overrides data.num_workers=1 data.fraction=-1
  --linear-epochs 1 --linear-overrides data.num_workers=1 data.fraction=-1 optimizer.batch_size=128
  --eval-batch-sizes 16 64 --eval-workers 1 --work "$work"
  ${STUDY_TIME_BUDGET:+--time-budget "$STUDY_TIME_BUDGET"}
)
screen_arms=(  # spelled out in full: `transformer` alone is the default (`stable_bn`, lr_scale 0.1)
  transformer:lr_scale=1,preset=paper                 # the head as first shipped: post-norm
  transformer:lr_scale=1,norm=pre,preset=paper
  transformer:input_norm=true,lr_scale=1,preset=paper # post-norm + LayerNorm after in_proj
  transformer:lr_scale=0.1,norm=pre,preset=paper
  transformer:lr_scale=1,norm=pre,preset=paper,qk_norm=true
  transformer:lr_scale=0.1,mask=positives,norm=pre,preset=paper  # the best after seeds 0-1, + mask
)
# The confirm's size: 5,000 images x 10 epochs is 4x the screen's images x epochs. One step (batch
# 128, 256 crops of 32 px) takes ~5 s on one core of the 2-core CPU machine, so a cell is ~35 min
# of training + ~5 min of evaluation, and 4 arms x 6 seeds ~16 CPU-hours: the issue's budget.
confirm=(--epochs 10 --train-per-class 500)
# The default (`stable_bn`), spelled as the confirm spelled it, and its controls: the stock MLP
# with the same output BatchNorm, and the same head with no mixing (each sample sees only
# itself) and with fixed uniform mixing.
default_arm=transformer:lr_scale=0.1,mask=positives,norm=pre,output_norm=batch,preset=paper
control_arms=(
  mlp:output_norm=batch
  transformer:lr_scale=0.1,mask=positives,mixing=none,norm=pre,output_norm=batch,preset=paper
  transformer:lr_scale=0.1,mask=positives,mixing=mean,norm=pre,output_norm=batch,preset=paper
)
seeds() { read -ra chosen <<<"${STUDY_SEEDS:-$*}"; echo --seeds "${chosen[@]}"; }
# Copy the confirm's mlp and default cells into results file $1 (once): the same cells, reused.
reuse_confirm() {
  [ -s "$1" ] && return
  mkdir -p "$(dirname "$1")"
  grep -F -e '"projector": "mlp"' -e "\"projector\": \"$default_arm\"" \
    benchmarks/confirm/results.jsonl | grep -F '"status": "ok"' >"$1.tmp"
  mv "$1.tmp" "$1"
}

main() {

case "$phase" in
  screen)
    arms=("${@:-${screen_arms[@]}}")
    "${bench[@]}" bench "${common[@]}" --methods simclr --projectors mlp "${arms[@]}" \
      $(seeds 0 1 2) --epochs 6 --train-per-class 200 --results benchmarks/screen/results.jsonl
    ;;
  confirm)
    (($#)) || { echo "confirm: name the arms" >&2; exit 2; }
    "${bench[@]}" bench "${common[@]}" "${confirm[@]}" --methods simclr \
      --projectors mlp "$@" $(seeds 0 1 2 3 4 5) --results benchmarks/confirm/results.jsonl
    ;;
  controls | regimes)
    results=benchmarks/controls/results.jsonl
    [ "$phase" = regimes ] && results=benchmarks/regimes/confirm/results.jsonl
    [ "$phase" = regimes ] && (($# == 0)) && { echo "regimes: name the arms" >&2; exit 2; }
    reuse_confirm "$results"
    arms=("${@:-${control_arms[@]}}")
    "${bench[@]}" bench "${common[@]}" "${confirm[@]}" --methods simclr \
      --projectors mlp "$default_arm" "${arms[@]}" $(seeds 0 1 2 3 4 5) --results "$results"
    ;;
  horizon)
    (($# == 1)) || { echo "horizon: name one arm" >&2; exit 2; }
    "${bench[@]}" bench "${common[@]}" --epochs 30 --train-per-class 500 --methods simclr \
      --projectors mlp "$1" $(seeds 0 1 2) --results benchmarks/horizon/results.jsonl
    ;;
  byol | vicreg)
    (($# == 1)) || { echo "$phase: name one arm" >&2; exit 2; }
    # (the bench fills what the SimCLR recipe lacks for BYOL: predictor width, momentum taus)
    "${bench[@]}" bench "${common[@]}" "${confirm[@]}" --methods "$phase" \
      --projectors mlp "$1" $(seeds 0 1 2) --results "benchmarks/$phase/results.jsonl"
    ;;
  report)
    dir="benchmarks/${1:?report: name the phase}"
    verdict=()  # the written conclusion, benchmarks/<phase>/verdict.md, goes under the title
    [ -f "$dir/verdict.md" ] && verdict=(--verdict "$dir/verdict.md")
    inputs=("$dir/results.jsonl")  # the regimes' own cells, next to the controls'
    [ "$1" = regimes/confirm ] && inputs+=(benchmarks/controls/results.jsonl)
    "${bench[@]}" bench-report "${inputs[@]}" --out "$dir/report.md" --plot "$dir/report.png" \
      "${verdict[@]}" $([ "$1" = controls ] && echo --chain mlp "${control_arms[@]}" "$default_arm")
    case "$1" in  # every arm's Δ to the default too
      controls | regimes/confirm | byol)
        "${bench[@]}" bench-report "${inputs[@]}" --baseline "$default_arm" \
          --out "$dir/report-vs-default.md"
        ;;
    esac
    ;;
  *)
    echo "unknown phase $phase: screen | confirm | controls | regimes | horizon | byol | vicreg | report" >&2
    exit 2
    ;;
esac
}
# One line, parsed whole before it runs: a copy of this file edited while a study runs cannot
# make the running shell read on into the new text.
main "$@"; exit $?
