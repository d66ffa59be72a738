#!/usr/bin/env bash
# One-command set-up on a fresh CPU machine: torch's CPU wheel first (so nothing pulls a CUDA build),
# then vLLM's CPU build and the rest, then remove the CUDA-built extras that break `import vllm` on CPU.
set -euo pipefail
cd "$(dirname "$0")"
python -m pip install --quiet torch==2.13.0
python -m pip install --quiet -r requirements.txt
python -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
python -c "import torch, transformers, vllm; print('set-up ok: torch', torch.__version__, '| transformers', transformers.__version__, '| vllm', vllm.__version__)"
