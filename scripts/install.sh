#!/usr/bin/env bash
# Create .venv and install pchmr with its test tools.
#
# torch is installed first, as an explicit build, and pinned for everything after it (constraints.txt):
#   PCHMR_TORCH=cpu    torch 2.13.0+cpu               (default when no NVIDIA GPU is visible)
#   PCHMR_TORCH=cuda   torch 2.13.0+$PCHMR_CUDA       (default when `nvidia-smi -L` lists a GPU; PCHMR_CUDA=cu128)
# The build is looked up in pip's configured indexes first, then in PyTorch's own index for that build
# (https://download.pytorch.org/whl/cpu or .../whl/<cuda>), so pip never picks a build by accident.
set -euo pipefail
cd "$(dirname "$0")/.."
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
  *) echo "PCHMR_TORCH must be cpu or cuda, got '$PCHMR_TORCH'" >&2; exit 2 ;;
esac
TORCH_SPEC="torch==${TORCH_VERSION}+${BUILD}"
TORCH_INDEX="https://download.pytorch.org/whl/${BUILD}"

quiet() { grep -v '^WARNING: Location' || true; }

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | quiet
if ! python -c "import torch, sys; sys.exit(0 if torch.__version__ == '${TORCH_VERSION}+${BUILD}' else 1)" 2>/dev/null; then
  echo "installing ${TORCH_SPEC} (PCHMR_TORCH=${PCHMR_TORCH})"
  if ! python -m pip install -q "$TORCH_SPEC" 2>/dev/null; then
    python -m pip install -q "$TORCH_SPEC" --extra-index-url "$TORCH_INDEX" 2>&1 | quiet
  fi
fi
python -m pip install -q -c constraints.txt -e ".[test]" 2>&1 | quiet
# CrypTen (secure aggregation's crypten backend) declares torchvision, pandas, sklearn and tensorboard, none
# used at run time: install the pinned release without them (its run-time imports, omegaconf and onnx, are
# pchmr dependencies); pchmr/plugins/privacy/secagg/crypten_compat.py adapts 0.4.1 to torch 2.13.
python -m pip install -q -c constraints.txt --no-deps crypten==0.4.1 2>&1 | quiet
python - <<'PY'
import flwr, pytorch_lightning, torch  # noqa: F401 - every one must import
import anny, pchmr  # noqa: F401
build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "CPU"
print(f"pchmr installed: torch {torch.__version__} ({build}), flwr {flwr.__version__}")
PY
