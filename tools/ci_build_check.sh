#!/usr/bin/env bash
# Build a fastpeft wheel for sm_80 + sm_90 (FASTPEFT_CUDA_ARCH_LIST="8.0;9.0") into a temporary
# directory and check with tools/check_wheel.py that its fastpeft._C holds SASS for exactly those
# architectures and links neither the CUDA runtime nor libtorch dynamically.
#
# Uses the installed setuptools and pybind11 (--no-isolation: no download);
# FASTPEFT_BUILD_ISOLATION=1 builds in an isolated environment instead (needs PyPI).  Without nvcc
# it says so and exits 0, unless FASTPEFT_FORCE_CUDA=1.  Objects are cached in build/ between
# runs: a cold build takes about a minute on 2 cores, an unchanged one seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! command -v nvcc >/dev/null 2>&1 && [ -z "${CUDA_HOME:-}" ] && [ ! -x /usr/local/cuda/bin/nvcc ]; then
  if [ "${FASTPEFT_FORCE_CUDA:-0}" = 1 ]; then
    echo "ci_build_check: FAIL: no nvcc (FASTPEFT_FORCE_CUDA=1)"; exit 1
  fi
  echo "ci_build_check: SKIP: no nvcc on this machine, the CUDA wheel cannot be built here"; exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
isolation="--no-isolation --skip-dependency-check"  # setuptools >= 70.1 needs no `wheel` package
[ "${FASTPEFT_BUILD_ISOLATION:-0}" = 1 ] && isolation=

start=$(date +%s)
if ! FASTPEFT_CUDA_ARCH_LIST="8.0;9.0" FASTPEFT_FORCE_CUDA=1 "$PYTHON" -m build --wheel $isolation --outdir "$tmp" . \
    >"$tmp/build.log" 2>&1; then
  tail -n 60 "$tmp/build.log"
  echo "ci_build_check: FAIL: the wheel did not build"; exit 1
fi
echo "ci_build_check: built $(basename "$tmp"/fastpeft-*.whl) in $(( $(date +%s) - start )) s"
"$PYTHON" tools/check_wheel.py "$tmp"/fastpeft-*.whl --expect 80,90 --expect-ptx ""
