#!/usr/bin/env bash
# Install torch into the given virtual environment without pulling a multi-GB
# CUDA build onto a machine that has no GPU.
#   - torch already importable in the venv: nothing to do.
#   - an NVIDIA GPU (nvidia-smi works): the default PyPI build, which is CUDA.
#   - no GPU: a CPU build: a local CPU wheel when pip can see one (find-links),
#     else PyTorch's CPU index.
set -euo pipefail
venv=${1:?usage: install-torch.sh VENV}
pip="$venv/bin/python -m pip"
if "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  exit 0
fi
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  $pip install 'torch>=2.4'
  exit 0
fi
for dir in ${PIP_FIND_LINKS:-} $($pip config get global.find-links 2>/dev/null || true); do
  wheel=$(ls "$dir"/torch-*+cpu-*.whl 2>/dev/null | sort -V | tail -n 1 || true)
  if [ -n "$wheel" ]; then
    version=$(basename "$wheel" | cut -d- -f2 | cut -d+ -f1)
    echo "install-torch: CPU build torch==$version from $dir"
    $pip install "torch==$version"
    exit 0
  fi
done
$pip install torch --index-url https://download.pytorch.org/whl/cpu
