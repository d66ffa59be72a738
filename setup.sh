#!/usr/bin/env bash
# Set-up on a fresh CPU machine, into a project-local .venv (make tiny / make test run it once): torch's CPU
# wheel first (so nothing pulls a CUDA build), then vLLM's CPU build and the rest, then remove the CUDA-built
# extras that break `import vllm` on CPU.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
PY=.venv/bin/python
$PY -m pip install --quiet torch==2.13.0
$PY -m pip install --quiet -r requirements.txt
$PY -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
$PY -c "import torch, transformers, vllm; print('set-up ok: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
