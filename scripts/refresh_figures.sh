#!/usr/bin/env bash
# Re-measure every figure that depends on the bundled checkpoints, after they were retrained.
#
#   bash scripts/refresh_figures.sh                  # all stages (about 4 h on 2 CPU cores, the QESC matrix is 3 h)
#   bash scripts/refresh_figures.sh cards suite      # only these stages
#   PRINT=1 bash scripts/refresh_figures.sh          # print the commands, run nothing
#
# Stages: cards (model cards, usage plots), suite (docs/baseline.md), quantize (the default runs quoted in
# README.md; replaces out/), pesf (docs/pesf/), router (router-calibration sweep, written to runs/figures/ for
# docs/ROUTER_SWEEP.md), runtime (docs/BENCHMARKS.md and the 24 GB demo; needs the quantize stage's export),
# qesc (the matrix in docs/qesc_results/, resumable: rows already in results.jsonl are skipped).
# Two lanes run side by side, one model per CPU core; each stage's log is in runs/figures/<lane>.log. Results depend
# on the torch thread count, so every command states it (--threads 1; OMP_NUM_THREADS=1 for anything else).
# The prose around the numbers in README.md and docs/*.md is not rewritten: read the new tables and update it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
STAGES=${*:-cards suite quantize pesf router runtime qesc}
LOG=runs/figures
mkdir -p "$LOG"
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

wants() { [[ " $STAGES " == *" $1 "* ]]; }
run() {  # print the command; run it unless PRINT is set
  echo "+ $*"
  [ -n "${PRINT:-}" ] || "$@"
}
qesc_rows() {  # the QESC matrix of one model, one bit width at a time so an interruption loses little
  local model=$1; shift
  for bits in 2 2.5 3; do
    run $PY scripts/qesc_experiments.py --models "$model" --bits "$bits" --seeds 0 1 2 --settings experts attn4 \
      --suite-limit 200 "$@" --threads 1 --out docs/qesc_results
  done
}

lane_mixtral() {
  if wants cards; then run $PY scripts/model_card.py eacmoe/assets/models/tiny-mixtral --seqlen 256 --threads 1; fi
  if wants suite; then
    run $PY eval/run_suite.py --models tiny-mixtral tiny-qwen-moe --unigram --threads 1 --out docs/baseline.md
  fi
  if wants quantize; then
    run /usr/bin/time -v $PY -m eacmoe.quantize --threads 1 --overwrite
    run /usr/bin/time -v $PY -m eacmoe.quantize --bits auto:2.5 --threads 1 --overwrite
  fi
  if wants runtime; then
    run $PY scripts/benchmark_runtime.py --threads 1 --out docs/BENCHMARKS.md
    run $PY scripts/deploy_24gb.py --threads 1
  fi
  if wants pesf; then run $PY scripts/pesf_sweep.py --model tiny-mixtral --threads 1 --out docs/pesf/tiny-mixtral; fi
  if wants router; then
    run $PY scripts/router_sweep.py --model tiny-mixtral --objectives auto tokens --threads 1 \
      --out "$LOG/router_sweep_mixtral.md"
  fi
  if wants qesc; then qesc_rows tiny-mixtral; fi
}

lane_qwen() {
  if wants cards; then run $PY scripts/model_card.py eacmoe/assets/models/tiny-qwen-moe --seqlen 256 --threads 1; fi
  if wants quantize; then
    run /usr/bin/time -v $PY -m eacmoe.quantize --model tiny-qwen-moe --bits auto:2.5 --group-size 64 --threads 1 \
      --overwrite
  fi
  if wants pesf; then run $PY scripts/pesf_sweep.py --model tiny-qwen-moe --threads 1 --out docs/pesf/tiny-qwen-moe; fi
  if wants router; then
    run $PY scripts/router_sweep.py --model tiny-qwen-moe --group-size 64 --threads 1 --out "$LOG/router_sweep_qwen.md"
  fi
  if wants qesc; then qesc_rows tiny-qwen-moe --group-size 64; fi
}

lane_mixtral >"$LOG/tiny-mixtral.log" 2>&1 &
mixtral=$!
lane_qwen >"$LOG/tiny-qwen-moe.log" 2>&1 &
qwen=$!
status=0
wait $mixtral || { echo "tiny-mixtral lane failed: $LOG/tiny-mixtral.log"; status=1; }
wait $qwen || { echo "tiny-qwen-moe lane failed: $LOG/tiny-qwen-moe.log"; status=1; }
[ -n "${PRINT:-}" ] && cat "$LOG/tiny-mixtral.log" "$LOG/tiny-qwen-moe.log"
exit $status
