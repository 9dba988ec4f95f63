#!/usr/bin/env bash
# Creates .venv-peers/ in the repository root with PyTorch and numpy, the CPU peer that the
# benchmarks compare against. PyPI has no CPU-only torch wheel: plain `pip install torch`
# pulls the CUDA build (~2.8 GB download) which runs fine on CPU (MKL, oneDNN).
# Idempotent: does nothing when the venv already imports torch.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="$root/.venv-peers"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c 'import torch, numpy' 2>/dev/null; then
    exit 0
fi
python3 -m venv "$venv"
"$venv/bin/pip" install --upgrade pip >/dev/null
"$venv/bin/pip" install torch numpy
"$venv/bin/python" -c 'import torch; print("torch", torch.__version__, "threads", torch.get_num_threads())'
