"""Packaging: what pyproject.toml declares (runtime dependencies, extras, SPDX license, one version
source), setup.py's build environment (arch lists, +PTX default, MAX_JOBS), tools/check_wheel.py's
tag and build-record checks, and a pure-Python wheel with its package data and license.

The CUDA wheel itself (SASS per arch, auditwheel's manylinux tag, the build record) is built and
checked by tools/ci_build_check.sh, which .ci/run runs where nvcc is found."""

import os
import re
import runpy
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")


@pytest.fixture(scope="module")
def project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@pytest.fixture(scope="module")
def setup_module_globals():
    """setup.py's functions, read with setuptools.setup() replaced by a no-op."""
    import setuptools

    real = setuptools.setup
    setuptools.setup = lambda **kwargs: kwargs
    try:
        return runpy.run_path(str(ROOT / "setup.py"), run_name="fastpeft_setup")
    finally:
        setuptools.setup = real


def _names(reqs):
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_runtime_dependencies_are_only_what_runs(project):
    names = _names(project["dependencies"])
    assert {"torch", "transformers", "safetensors", "tokenizers"} <= names
    assert not names & {"pybind11", "ninja", "peft", "accelerate", "pytest", "build", "setuptools"}
    triton = next(r for r in project["dependencies"] if r.startswith("triton"))
    assert re.match(r"triton>=3\.(\d+)", triton) and int(re.match(r"triton>=3\.(\d+)", triton).group(1)) >= 4


def test_extras(project):
    extras = project["optional-dependencies"]
    assert {"peft", "test", "bench", "dev"} <= set(extras)
    assert _names(extras["peft"]) >= {"peft", "accelerate"}
    assert _names(extras["test"]) >= {"pytest", "peft", "datasets", "tensorboard"}
    assert "build" in _names(extras["dev"]) and "auditwheel" in _names(extras["dev"])


def test_license_and_single_version_source(project):
    import fastpeft

    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "version" not in project and "version" in project["dynamic"]
    dynamic = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["dynamic"]
    assert dynamic["version"] == {"attr": "fastpeft.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", fastpeft.__version__)
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(\d+)", r) and int(r.split(">=")[1]) >= 77 for r in requires)


def test_arch_list_environment(setup_module_globals):
    g = setup_module_globals
    spec, var = g["arch_list_spec"]({})
    sass, ptx = g["parse_arch_list"](spec, var)
    assert ptx == [max(sass)] and sass == sorted(sass)  # +PTX on the newest by default
    assert g["arch_list_spec"]({"TORCH_CUDA_ARCH_LIST": "8.0 9.0+PTX"}) == ("8.0 9.0+PTX", "TORCH_CUDA_ARCH_LIST")
    assert g["arch_list_spec"]({"TORCH_CUDA_ARCH_LIST": "8.0", "FASTPEFT_CUDA_ARCH_LIST": "9.0"}) == \
        ("9.0", "FASTPEFT_CUDA_ARCH_LIST")
    assert g["parse_arch_list"]("8.0;8.6,9.0+PTX") == ([80, 86, 90], [90])
    with pytest.raises(ValueError, match="TORCH_CUDA_ARCH_LIST entry '7.0'"):
        g["parse_arch_list"]("7.0;8.0", "TORCH_CUDA_ARCH_LIST")
    assert g["max_jobs"]({"MAX_JOBS": "3"}) == 3 and g["max_jobs"]({}) >= 1
    with pytest.raises(ValueError, match="MAX_JOBS"):
        g["max_jobs"]({"MAX_JOBS": "many"})
    assert g["cuda_extension_planned"]({"FASTPEFT_SKIP_CUDA": "1"}) is False
    assert g["cuda_extension_planned"]({"FASTPEFT_FORCE_CUDA": "1"}) is True


def test_check_wheel_tags():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import check_wheel
    finally:
        sys.path.pop(0)
    assert check_wheel.wheel_tags("fastpeft-0.1.0-cp311-cp311-manylinux_2_28_x86_64.whl") == \
        ("cp311", "cp311", "manylinux_2_28_x86_64")
    assert check_wheel.manylinux_problem("manylinux_2_28_x86_64") is None
    assert check_wheel.manylinux_problem("manylinux2014_x86_64.manylinux_2_17_x86_64") is None
    assert "not manylinux" in check_wheel.manylinux_problem("linux_x86_64")


def test_pure_python_wheel_carries_package_data_and_license(tmp_path):
    import importlib.util

    if importlib.util.find_spec("build.__main__") is None:  # a checkout's build/ output folder is no `build`
        pytest.skip("the `build` package is not installed (pip install -e '.[dev]')")
    env = {**os.environ, "FASTPEFT_SKIP_CUDA": "1"}
    env.pop("FASTPEFT_FORCE_CUDA", None)
    proc = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--skip-dependency-check",
                           "--outdir", str(tmp_path), str(ROOT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    wheels = list(tmp_path.glob("fastpeft-*.whl"))
    assert len(wheels) == 1 and wheels[0].name.endswith("-py3-none-any.whl"), wheels  # no binary: no platform tag
    with zipfile.ZipFile(wheels[0]) as whl:
        names = set(whl.namelist())
        meta = whl.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert {"fastpeft/training/data/tiny.jsonl", "fastpeft/training/data/tokenizer/tokenizer.json",
            "fastpeft/training/data/tokenizer/tokenizer_config.json", "fastpeft/kernels/lora.py"} <= names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: Apache-2.0" in meta
    import fastpeft

    assert f"Version: {fastpeft.__version__}" in meta
    requires = [line.split(": ", 1)[1] for line in meta.splitlines() if line.startswith("Requires-Dist: ")]
    runtime = [r for r in requires if "extra ==" not in r]
    assert runtime and not any(r.startswith(("pybind11", "ninja")) for r in runtime)
    assert any(r.startswith("build") and 'extra == "dev"' in r for r in requires)
    assert not any(n.endswith(".so") for n in names)
