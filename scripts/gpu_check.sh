#!/usr/bin/env bash
# GPU readiness in one command (under 8 minutes on one H200-class GPU):
#   1. the CUDA-relevant tests (tests that use the device, and the memory bounds);
#   2. one real-shape Mixtral-8x7B layer (scripts/make_real_shape_slice.py; random weights: it measures cost, not
#      accuracy) quantized on CUDA with QESC at 128 x 2048 calibration tokens: time, torch.cuda.max_memory_allocated
#      of the layer loop next to the formula of docs/MEMORY.md (scripts/quantize_peak.py);
#   3. the 24 GB demo (scripts/deploy_24gb.py) on that packed real-shape slice: prefill 4 x 512, decode, peak GPU
#      memory, tokens/s, with and without PESF.
# Results go to $OUT (or runs/gpu_check/) as JSON and logs; summary.txt lists them.
#
#   bash scripts/gpu_check.sh                  # on the GPU machine
#   DEVICE=cpu bash scripts/gpu_check.sh       # dry mode on a CPU: the same steps on tiny dimensions, minutes
#
# Python: $PY if set, else .venv/bin/python when its torch sees the device, else a .venv-gpu made here
# (torch==2.13.0 from PyPI, the CUDA wheel on Linux, and this package with its test extras).
set -euo pipefail
cd "$(dirname "$0")/.."
DEVICE=${DEVICE:-cuda}
RESULTS=${OUT:-runs/gpu_check}
WORK=${WORK:-/tmp/eacmoe-gpu-check}
mkdir -p "$RESULTS" "$WORK"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$PWD
SUMMARY=$RESULTS/summary.txt
: > "$SUMMARY"
note() { echo "$*" | tee -a "$SUMMARY"; }
step() { note "== $1 ($(date -u +%T))"; }

usable() {  # $1: python; true when it imports torch (and, for cuda, sees a GPU)
  [ -x "$1" ] || return 1
  if [ "$DEVICE" = cpu ]; then "$1" -c "import torch, transformers" 2>/dev/null
  else "$1" -c "import torch, transformers; assert torch.cuda.is_available()" 2>/dev/null; fi
}
if [ -n "${PY:-}" ] && usable "$PY"; then :
elif usable .venv/bin/python; then PY=.venv/bin/python
elif usable .venv-gpu/bin/python; then PY=.venv-gpu/bin/python
else
  step "setting up .venv-gpu"
  python3 -m venv .venv-gpu
  .venv-gpu/bin/python -m pip install -q --upgrade pip
  .venv-gpu/bin/python -m pip install -q "torch==2.13.0"
  .venv-gpu/bin/python -m pip install -q -e ".[dev]"
  PY=.venv-gpu/bin/python
  usable "$PY" || { note "error: torch in .venv-gpu does not see a $DEVICE device"; exit 2; }
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee -a "$SUMMARY"

if [ "$DEVICE" = cpu ]; then  # dry mode: the same code path on tiny dimensions
  SLICE_FLAGS=(--set hidden_size=128 --set intermediate_size=256 --set num_attention_heads=4 --set num_key_value_heads=2)
  NSAMPLES=4 SEQLEN=128 ROUTER_STEPS=20 BATCH=1 PROMPT=64 DECODE=4 REPEATS=1
else
  SLICE_FLAGS=()
  NSAMPLES=${NSAMPLES:-128} SEQLEN=${SEQLEN:-2048} ROUTER_STEPS=${ROUTER_STEPS:-1000}
  BATCH=4 PROMPT=512 DECODE=${DECODE:-32} REPEATS=${REPEATS:-2}
fi

step "1. CUDA-relevant tests"
"$PY" -m pytest -q -p no:cacheprovider tests/test_memory_bounds.py tests/test_packing.py -k "cuda or gpu or tiled or bounded or freed or subsamples" \
  2>&1 | tail -n 5 | tee "$RESULTS/tests.log" | tee -a "$SUMMARY"

step "2. real-shape Mixtral-8x7B layer: build, quantize on $DEVICE ($NSAMPLES x $SEQLEN tokens)"
SLICE=$WORK/mixtral-8x7b-1l-$DEVICE
[ -f "$SLICE/slice.json" ] || "$PY" scripts/make_real_shape_slice.py --family mixtral-8x7b --layers 1 --out "$SLICE" \
  --overwrite "${SLICE_FLAGS[@]}" > "$RESULTS/slice.log" 2>&1
QOUT=$WORK/mixtral-8x7b-1l-qesc-w2
"$PY" scripts/quantize_peak.py --model "$SLICE" --out "$QOUT" --device "$DEVICE" --dtype bfloat16 --method qesc \
  --nsamples "$NSAMPLES" --seqlen "$SEQLEN" --router-steps "$ROUTER_STEPS" --json-out "$RESULTS/quantize_peak.json" \
  --threads 1 > "$RESULTS/quantize.log" 2>&1 || { tail -n 20 "$RESULTS/quantize.log"; exit 1; }
grep "layer loop" "$RESULTS/quantize.log" | tee -a "$SUMMARY"

step "3. 24 GB demo on the packed slice (prefill $BATCH x $PROMPT, decode $DECODE; with and without PESF)"
"$PY" scripts/deploy_24gb.py --checkpoint "$QOUT" --device "$DEVICE" --batch "$BATCH" --prompt-len "$PROMPT" \
  --decode-tokens "$DECODE" --repeats "$REPEATS" --json-out "$RESULTS/deploy_24gb.json" --threads 1 \
  > "$RESULTS/deploy.log" 2>&1 || { tail -n 20 "$RESULTS/deploy.log"; exit 1; }
tail -n 12 "$RESULTS/deploy.log" | tee -a "$SUMMARY"
note "results in $RESULTS (real-shape slices measure cost, not accuracy)"
