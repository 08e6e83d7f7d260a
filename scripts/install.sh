#!/usr/bin/env bash
# Create .venv and install pchmr with its test tools, CPU-only.
# torch goes first and is pinned for everything after it (constraints.txt): otherwise pip may pick a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
if ! python -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null; then
  python -m pip install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' || true
fi
python -m pip install -q -c constraints.txt -e ".[test]" 2>&1 | grep -v '^WARNING: Location' || true
# CrypTen (secure aggregation's crypten backend) declares torchvision, pandas, sklearn and tensorboard, none
# used at run time: install the pinned release without them (its run-time imports, omegaconf and onnx, are
# pchmr dependencies); pchmr/plugins/privacy/secagg/crypten_compat.py adapts 0.4.1 to torch 2.13.
python -m pip install -q -c constraints.txt --no-deps crypten==0.4.1 2>&1 | grep -v '^WARNING: Location' || true
python -c 'import torch, flwr, pytorch_lightning, anny, pchmr; print(f"pchmr installed: torch {torch.__version__}, flwr {flwr.__version__}")'
