#!/usr/bin/env bash
# Set up papa on a fresh machine: a virtual environment in .venv with the pinned packages, the C++/CUDA extension
# built against that torch, and MNIST + Fashion-MNIST fetched offline and checksum-verified. Safe to rerun: each step
# is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch, torchvision, yaml, tqdm, matplotlib, pytest_benchmark" 2>/dev/null; then
  echo "[setup] installing requirements (torch is taken from the local disk where available)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements.txt
fi
# rebuild the extension only when its sources changed
stamp=$(cat setup.py pyproject.toml $(find csrc -type f | sort) | sha256sum | cut -c1-16)
if [ "$(cat build/.ext_stamp 2>/dev/null)" != "$stamp" ] || ! python -c "import papa._C" 2>/dev/null; then
  echo "[setup] building papa and its extension (pip install --no-build-isolation -e .)"
  MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation --no-deps -e .
  mkdir -p build && echo "$stamp" > build/.ext_stamp
fi
python -m papa.data fetch mnist >/dev/null
python -m papa.data fetch fashion_mnist >/dev/null
echo "[setup] ready: $(python -c 'import torch; print("torch", torch.__version__)'), extension $(python -c 'import papa.ops as o; print("built" if o.extension_available() else "MISSING")')"
