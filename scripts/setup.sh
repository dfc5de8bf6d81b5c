#!/usr/bin/env bash
# Create .venv with eacmoe and its test dependencies. On a machine without a CUDA GPU torch comes from the
# CPU wheel (torch==2.13.0, a local wheel on the project's build machines) so pip never pulls a multi-GB CUDA
# build; with a GPU (nvidia-smi present) the default torch wheel is used.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if command -v nvidia-smi >/dev/null 2>&1; then
  python -m pip install -q "torch>=2.4"
else
  python -m pip install -q "torch==2.13.0" || python -m pip install -q "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu
fi
python -m pip install -q -e ".[dev]"
# GPTQModel is the independent reference our GPTQ is tested against; it builds against the installed torch.
GPTQMODEL_CPU_WORKERS=2 python -m pip install -q --no-build-isolation "gptqmodel==7.6.0" "torch==$(python -c 'import torch; print(torch.__version__.split("+")[0])')"
