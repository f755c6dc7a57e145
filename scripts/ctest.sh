#!/usr/bin/env bash
# Build csrc/ against libtorch with CMake and run the C++ unit test (ctest). Uses the torch in .venv.
set -euo pipefail
cd "$(dirname "$0")/.."
prefix=$(.venv/bin/python -c 'import torch; print(torch.utils.cmake_prefix_path)')
cmake -S . -B build/cmake -DCMAKE_PREFIX_PATH="$prefix" > build/cmake.log 2>&1 || { cat build/cmake.log; exit 1; }
cmake --build build/cmake -j"${MAX_JOBS:-2}" >> build/cmake.log 2>&1 || { tail -40 build/cmake.log; exit 1; }
ctest --test-dir build/cmake --output-on-failure
