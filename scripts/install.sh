#!/usr/bin/env bash
# Create .venv and install pchmr with everything its tests use: pchmr[test] (the crypten, tensorboard,
# mlflow and testing extras, ruff, import-linter, opacus) and CrypTen. pyproject.toml states the ranges
# pchmr supports; constraints.txt pins the exact torch and flwr this installs.
#
# torch is installed first, as an explicit build, and pinned for everything after it (constraints.txt):
#   PCHMR_TORCH=cpu    torch 2.13.0+cpu               (default when no NVIDIA GPU is visible)
#   PCHMR_TORCH=cuda   torch 2.13.0+$PCHMR_CUDA       (default when `nvidia-smi -L` lists a GPU; PCHMR_CUDA=cu128)
#   PCHMR_TORCH=pypi   torch 2.13.0 as PyPI serves it (on Linux the CUDA 13 build with its NVIDIA libraries,
#                      ~4 GB more; it runs on a CPU too): for a Python whose +cpu build no index here has
# The build is looked up in pip's configured indexes first, then in PyTorch's own index for that build
# (https://download.pytorch.org/whl/cpu or .../whl/<cuda>), so pip never picks a build by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
TORCH_VERSION=2.13.0
PCHMR_CUDA=${PCHMR_CUDA:-cu128}
if [ -z "${PCHMR_TORCH:-}" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    PCHMR_TORCH=cuda
  else
    PCHMR_TORCH=cpu
  fi
fi
case "$PCHMR_TORCH" in
  cpu) BUILD=cpu ;;
  cuda) BUILD=$PCHMR_CUDA ;;
  pypi) BUILD= ;;
  *) echo "PCHMR_TORCH must be cpu, cuda or pypi, got '$PCHMR_TORCH'" >&2; exit 2 ;;
esac
TORCH_SPEC="torch==${TORCH_VERSION}${BUILD:++$BUILD}"
TORCH_INDEX="https://download.pytorch.org/whl/${BUILD}"

quiet() { grep -v '^WARNING: Location' || true; }

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | quiet
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__ == '${TORCH_VERSION}${BUILD:++$BUILD}' else 1)" 2>/dev/null; then
  echo "installing ${TORCH_SPEC} (PCHMR_TORCH=${PCHMR_TORCH})"
  if [ -z "$BUILD" ]; then
    python -m pip install -q "$TORCH_SPEC" 2>&1 | quiet
  elif ! python -m pip install -q "$TORCH_SPEC" 2>/dev/null; then
    python -m pip install -q "$TORCH_SPEC" --extra-index-url "$TORCH_INDEX" 2>&1 | quiet
  fi
fi
# pip shows what a local project's build backend warns. setuptools' editable install of this layout (the
# package folder pchmr/ at the repository root: a meta-path finder maps `pchmr` to it) always warns
# "Editable installation ... be careful with folders in your working directory with the same name as
# your package": that folder is the package the install points at. That one notice is filtered, by its
# message, for this command only; every other warning still shows.
PYTHONWARNINGS="${PYTHONWARNINGS:+$PYTHONWARNINGS,}ignore:Editable installation.:UserWarning" \
  python -m pip install -q -c constraints.txt -e ".[test]" 2>&1 | quiet
# CrypTen, secure aggregation's optional crypten backend (--privacy-option backend=crypten), comes last and
# without its declared requirements (--no-deps): they include torchvision, which pins a torch of its own,
# pandas, future and the withdrawn PyPI package 'sklearn', which refuses to install; CrypTen imports none
# of them when pchmr uses it. What it does import is pchmr's crypten extra (omegaconf, onnx), installed
# above through .[test], and packages pchmr needs anyway (torch, numpy, pyyaml).
# pchmr/plugins/privacy/secagg/crypten_compat.py adapts 0.4.1 to torch 2.13. Without CrypTen only that
# backend is refused, naming these two steps: pip install 'pchmr[crypten]' && pip install --no-deps crypten==0.4.1
python -m pip install -q -c constraints.txt --no-deps crypten==0.4.1 2>&1 | quiet
python - "$START" "$(du -sh .venv | cut -f1)" <<'PY'
import importlib.metadata as md
import sys
import time

import flwr, pytorch_lightning, torch  # noqa: F401 - every one must import
import anny, pchmr  # noqa: F401
from pchmr.plugins.privacy.secagg.crypten_compat import ensure_crypten

ensure_crypten()  # CrypTen imports, as the crypten backend imports it

build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
seconds, size = round(time.time() - int(sys.argv[1])), sys.argv[2]
print(f"pchmr {md.version('pchmr')} installed with extras test, crypten, tensorboard, mlflow, testing: "
      f"torch {torch.__version__} ({build}), flwr {flwr.__version__}, crypten {md.version('crypten')}")
print(f".venv: {size}B, {seconds} s")
PY
