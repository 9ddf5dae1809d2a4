"""Build script: packages fastpeft (with the Triton kernels of kernels/ as fastpeft.kernels) and,
where nvcc is found, the CUDA C++ extension fastpeft._C (see csrc/).

The extension links no libtorch and the CUDA runtime statically, so one build serves every torch
version and needs only the NVIDIA driver.  Environment:

  FASTPEFT_CUDA_ARCH_LIST  GPU architectures to compile SASS for, default "8.0;8.6;8.9;9.0+PTX"
                           (";", "," or spaces between; "X.Y+PTX" also embeds PTX for X.Y, which
                           the driver compiles for GPUs newer than the list)
  TORCH_CUDA_ARCH_LIST     read when FASTPEFT_CUDA_ARCH_LIST is not set (PyTorch's variable)
  MAX_JOBS                 parallel nvcc processes (default: the CPU count)
  FASTPEFT_FORCE_CUDA=1    fail when nvcc is missing instead of skipping the extension
  FASTPEFT_SKIP_CUDA=1     do not build the extension even where nvcc is found
  CUDA_HOME / CUDA_PATH    the CUDA toolkit (else nvcc on PATH)
  CXX                      host compiler for nvcc and the link (default c++)

Without the extension the wheel is pure Python (py3-none-any).  A wheel with it records the CUDA
version and architectures in fastpeft/_build_info.json; `auditwheel repair` gives it the manylinux
tag PyPI needs (tools/ci_build_check.sh does both and checks them with tools/check_wheel.py):

    FASTPEFT_CUDA_ARCH_LIST="8.0;9.0+PTX" python -m build --wheel
    auditwheel repair --exclude 'libcuda.so*' -w dist/ dist/fastpeft-*-linux_x86_64.whl
"""

import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"
DEFAULT_ARCHS = "8.0;8.6;8.9;9.0+PTX"  # SASS for each; PTX of the newest for GPUs past the list
BUILD_INFO = "_build_info.json"       # written next to fastpeft/_C*.so in a (non-editable) build

packages = find_packages(include=["fastpeft", "fastpeft.*"]) + ["fastpeft.kernels"]


def arch_list_spec(env=os.environ) -> tuple[str, str]:
    """(spec, the variable it came from): FASTPEFT_CUDA_ARCH_LIST, else TORCH_CUDA_ARCH_LIST, else the default."""
    for var in ("FASTPEFT_CUDA_ARCH_LIST", "TORCH_CUDA_ARCH_LIST"):
        if env.get(var, "").strip():
            return env[var], var
    return DEFAULT_ARCHS, "the default arch list"


def max_jobs(env=os.environ) -> int:
    """Parallel nvcc processes: MAX_JOBS (as PyTorch's extension builder reads it), else the CPU count."""
    text = env.get("MAX_JOBS", "").strip()
    if not text:
        return max(1, os.cpu_count() or 1)
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"MAX_JOBS={text!r}: expected a positive integer")
    return int(text)


def parse_arch_list(spec: str, var: str = "FASTPEFT_CUDA_ARCH_LIST") -> tuple[list[int], list[int]]:
    """"8.0;9.0+PTX" -> ([80, 90], [90]): SASS archs, and the archs whose PTX is embedded too."""
    sass, ptx = [], []
    for entry in re.split(r"[;,\s]+", spec.strip()):
        if not entry:
            continue
        m = re.fullmatch(r"(\d+)\.?(\d)(\+PTX)?", entry, flags=re.IGNORECASE)
        if m is None:
            raise ValueError(f"{var} entry {entry!r} is not a compute capability like "
                             f"'8.0', '90' or '9.0+PTX' (full list: {spec!r})")
        arch = int(m.group(1)) * 10 + int(m.group(2))
        if arch < 75:
            raise ValueError(f"{var} entry {entry!r}: CUDA 13 builds for compute "
                             f"capability 7.5 and newer")
        if arch not in sass:
            sass.append(arch)
        if m.group(3) and arch not in ptx:
            ptx.append(arch)
    if not sass:
        raise ValueError(f"{var} {spec!r} names no architecture")
    return sass, ptx


def nvcc_version(nvcc: str) -> str | None:
    """"13.0" from `nvcc --version` ("Cuda compilation tools, release 13.0, V13.0.88"), None if unreadable."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


def find_cuda() -> tuple[str | None, Path | None]:
    """(nvcc, toolkit root) — the root is None when only an nvcc wrapper on PATH was found."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        home = os.environ.get(var)
        if home and (Path(home) / "bin" / "nvcc").exists():
            return str(Path(home) / "bin" / "nvcc"), Path(home)
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        home = Path("/usr/local/cuda")
        return (str(home / "bin" / "nvcc"), home) if (home / "bin" / "nvcc").exists() else (None, None)
    for home in (Path(nvcc).resolve().parent.parent, Path("/usr/local/cuda")):
        if (home / "bin" / "nvcc").exists() and _cudart_static(home) is not None:
            return str(home / "bin" / "nvcc"), home
    return nvcc, None


def _cudart_static(home: Path) -> Path | None:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if (home / sub / "libcudart_static.a").exists():
            return home / sub
    return None


class BuildExt(build_ext):
    """Compiles fastpeft._C with nvcc (one process per source, in parallel) and links it with the
    host compiler against the static CUDA runtime; skips it with one line where nvcc is absent."""

    def run(self) -> None:
        self._cuda = self._find_cuda()
        if self._cuda is None:  # drop it before setuptools plans to copy its (missing) output
            self.extensions = [e for e in self.extensions if e.name != "fastpeft._C"]
            for stale in Path(self.build_lib, "fastpeft").glob("_C*.so"):  # left by an earlier build
                stale.unlink()
        super().run()

    def _find_cuda(self):
        force = os.environ.get("FASTPEFT_FORCE_CUDA") == "1"
        if os.environ.get("FASTPEFT_SKIP_CUDA") == "1" and not force:
            print("fastpeft: FASTPEFT_SKIP_CUDA=1: not building the CUDA extension fastpeft._C "
                  "(the Triton and torch backends serve)", flush=True)
            return None
        nvcc, home = find_cuda()
        if nvcc is None:
            msg = ("nvcc not found (set CUDA_HOME or put nvcc on PATH): building fastpeft without its CUDA "
                   "extension fastpeft._C; the Triton and torch backends serve")
            if force:
                raise RuntimeError(f"FASTPEFT_FORCE_CUDA=1 but {msg}")
            print(f"fastpeft: {msg}", flush=True)
            return None
        sass, ptx = parse_arch_list(*arch_list_spec())
        return nvcc, home, sass, ptx

    def build_extension(self, ext: Extension) -> None:
        if ext.name != "fastpeft._C":
            return super().build_extension(ext)
        self._build_cuda(ext, *self._cuda)

    def _build_cuda(self, ext: Extension, nvcc: str, home: Path | None, sass: list[int], ptx: list[int]) -> None:
        import pybind11

        cxx = os.environ.get("CXX", "c++")
        gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in sass]
        gencode += [f"-gencode=arch=compute_{a},code=compute_{a}" for a in ptx]
        includes = [f"-I{CSRC}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}"]
        defines = [f'-DFASTPEFT_SASS_ARCHS="{",".join(map(str, sass))}"',
                   f'-DFASTPEFT_PTX_ARCHS="{",".join(map(str, ptx))}"']
        common = ["-O3", "-std=c++17", f"-ccbin={cxx}", "-Xcompiler=-fPIC,-fvisibility=hidden", *includes]
        cu_flags = [*common, "-lineinfo", "--threads=0", *gencode]

        build_dir = Path(self.build_temp) / "fastpeft_C"
        build_dir.mkdir(parents=True, exist_ok=True)
        headers = sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh"))
        newest_header = max((h.stat().st_mtime for h in headers), default=0.0)
        jobs = []
        for src in (ROOT / s for s in ext.sources):
            flags = cu_flags if src.suffix == ".cu" else [*common, *defines]
            key = hashlib.sha1(" ".join([nvcc, *flags]).encode()).hexdigest()[:10]
            obj = build_dir / f"{src.stem}.{key}.o"
            stale = not obj.exists() or obj.stat().st_mtime < max(src.stat().st_mtime, newest_header)
            jobs.append((obj, [nvcc, *flags, "-c", str(src), "-o", str(obj)] if stale else None))

        archs = " ".join(f"sm_{a}" for a in sass) + "".join(f" +PTX compute_{a}" for a in ptx)
        print(f"fastpeft: building fastpeft._C with {nvcc} for {archs}", flush=True)
        workers = max(1, min(len(jobs), max_jobs()))
        with ThreadPoolExecutor(workers) as pool:
            for cmd, result in zip([c for _, c in jobs], pool.map(_run, [c for _, c in jobs])):
                if result is not None:
                    raise RuntimeError(f"fastpeft: compiling fastpeft._C failed:\n$ {shlex.join(cmd)}\n{result}")

        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        objs = [str(obj) for obj, _ in jobs]
        libdir = _cudart_static(home) if home is not None else None
        if libdir is not None:
            # host link: no device-link step, so no stray default-arch cubin in the binary
            link = [cxx, "-shared", *objs, f"-L{libdir}", "-lcudart_static", "-ldl", "-lrt", "-lpthread",
                    "-o", str(out)]
        else:
            link = [nvcc, "-shared", "-cudart=static", *gencode, *objs, "-o", str(out)]
        error = _run(link)
        if error is not None:
            raise RuntimeError(f"fastpeft: linking fastpeft._C failed:\n$ {shlex.join(link)}\n{error}")
        if not self.inplace:  # the wheel's record of what it was built with (tools/check_wheel.py reads it)
            info = {"cuda": nvcc_version(nvcc), "sass_archs": sass, "ptx_archs": ptx,
                    "arch_list": arch_list_spec()[0], "arch_list_from": arch_list_spec()[1]}
            (out.parent / BUILD_INFO).write_text(json.dumps(info, indent=1) + "\n")


def _run(cmd: list[str] | None) -> str | None:
    """Run a build command; None on success, its output on failure."""
    if cmd is None:
        return None
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.stdout.strip() and proc.returncode == 0:
        sys.stdout.write(proc.stdout)
    return None if proc.returncode == 0 else proc.stdout


def cuda_extension_planned(env=os.environ) -> bool:
    """Whether this build compiles fastpeft._C: with no nvcc (or FASTPEFT_SKIP_CUDA=1) the package has
    no extension at all, so its wheel is pure Python (py3-none-any) instead of a platform wheel without
    the binary.  FASTPEFT_FORCE_CUDA=1 keeps it (and BuildExt fails where nvcc is missing)."""
    if env.get("FASTPEFT_FORCE_CUDA") == "1":
        return True
    if env.get("FASTPEFT_SKIP_CUDA") == "1":
        return False
    return find_cuda()[0] is not None


ext_modules = [
    Extension(
        "fastpeft._C",
        sources=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.cu"))] + ["csrc/bindings.cpp"],
        depends=[str(p.relative_to(ROOT)) for p in sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh"))],
    )
] if cuda_extension_planned() else []
if not ext_modules:
    print("fastpeft: " + ("FASTPEFT_SKIP_CUDA=1" if os.environ.get("FASTPEFT_SKIP_CUDA") == "1" else
                          "nvcc not found (set CUDA_HOME or put nvcc on PATH)")
          + ": building fastpeft without its CUDA extension fastpeft._C (a pure-Python package; the Triton "
          "and torch backends serve)", flush=True)

setup(
    packages=packages,
    package_dir={"fastpeft.kernels": "kernels"},
    # the tiny dataset of the embedded default and the presets' tokenizer
    package_data={"fastpeft.training": ["data/*.jsonl", "data/tokenizer/*"]},
    exclude_package_data={"fastpeft": ["*.so"]},  # an in-place (editable) build is not package data
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
)
