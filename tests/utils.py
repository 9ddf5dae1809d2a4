"""Shared test helpers: dtype-scaled comparison and kernel-availability skips."""

import os

import pytest
import torch

# relative-norm tolerances by the dtype the computation runs in
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 4e-3}


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    a, e = actual.double(), expected.double()
    assert a.shape == e.shape, f"shape {tuple(a.shape)} != {tuple(e.shape)}"
    assert torch.isfinite(a).all(), "non-finite values in result"
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype | None = None, scale: float = 1.0,
                 what: str = "") -> None:
    """‖actual − expected‖ / ‖expected‖ within the tolerance of `dtype` (default: actual's dtype) × scale."""
    tol = TOL[dtype or actual.dtype] * scale
    err = rel_err(actual, expected)
    assert err <= tol, f"{what} relative error {err:.3e} > {tol:.1e}"


def triton_device() -> str:
    """'cuda' when a GPU is present, 'cpu' under TRITON_INTERPRET=1; skips the test otherwise."""
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") == "1":
        try:
            import triton  # noqa: F401
        except ImportError:
            pytest.skip("triton is not installed")
        return "cpu"
    pytest.skip("Triton kernels need a GPU or TRITON_INTERPRET=1")


def linear_inputs(device, m: int, k: int, n: int, dtype: torch.dtype, bias: bool = True, w_t: bool = False,
                  x_nc: bool = False, lead: tuple[int, ...] = ()):
    """(x, weight, bias) of a frozen linear layer; w_t: weight a transposed (non-contiguous) view of a
    (k, n) tensor; x_nc: x a strided (non-contiguous) view; lead: extra leading dims of x."""
    if x_nc:
        x = torch.randn(*lead, m, 2 * k, device=device, dtype=dtype)[..., ::2]
    else:
        x = torch.randn(*lead, m, k, device=device, dtype=dtype)
    if w_t:
        weight = (torch.randn(k, n, device=device, dtype=dtype) / k ** 0.5).t()
    else:
        weight = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
    b = torch.randn(n, device=device, dtype=dtype) if bias else None
    return x, weight, b


def launch_ranks(script, args, world: int, timeout: float = 150) -> list[tuple[str, str]]:
    """Run `python script *args` as `world` gloo ranks on this machine (one plain process when world is 1),
    one CPU thread each; fail the test on a timeout or a non-zero exit.  Returns each rank's (stdout, stderr)."""
    results = launch_ranks_any(script, args, world, timeout)
    for code, _, err in results:
        if code is None:
            pytest.fail(f"{world} rank(s) of {script} timed out")
        assert code == 0, err[-3000:]
    return [(out, err) for _, out, err in results]


def launch_ranks_any(script, args, world: int, timeout: float = 150, env: dict | None = None
                     ) -> list[tuple[int, str, str]]:
    """Like `launch_ranks`, but a rank may fail: returns each rank's (exit code, stdout, stderr); a rank
    still running at `timeout` is killed and reported with exit code None."""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(world):
        penv = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", **(env or {}))
        if world > 1:
            penv.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                        MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(script), *map(str, args)], env=penv,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
            results.append((None, out, err))
    return results


# ---- fastpeft._C's kernels on CPU threads (csrc/emulate.h): their logic, tested without a GPU ----------------
def _cuda_home():
    """(include, lib) folders of a CUDA toolkit with cuda_runtime.h and libcudart_static.a, or None."""
    import shutil
    from pathlib import Path

    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    if shutil.which("nvcc"):
        homes.append(str(Path(shutil.which("nvcc")).resolve().parent.parent))
    homes.append("/usr/local/cuda")
    for home in filter(None, homes):
        include = Path(home) / "include"
        libs = [Path(home) / d for d in ("lib64", "lib", "targets/x86_64-linux/lib")]
        lib = next((d for d in libs if (d / "libcudart_static.a").exists()), None)
        if (include / "cuda_runtime.h").exists() and lib is not None:
            return include, lib
    return None


def build_emulated_cext(out_dir, module_name: str, sources: list[str] | None = None):
    """fastpeft._C's sources (csrc/*.cu, or the named ones, plus bindings.cpp) built with the host compiler and
    -DFASTPEFT_EMULATE as module `module_name` in `out_dir`, imported; skips the test without CUDA headers."""
    import subprocess
    import sys
    import sysconfig
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    pybind11 = pytest.importorskip("pybind11")
    found = _cuda_home()
    if found is None:
        pytest.skip("no CUDA toolkit headers (CUDA_HOME or nvcc on PATH) to build the CPU-emulated kernels")
    include, lib = found
    csrc = Path(__file__).resolve().parent.parent / "csrc"
    out = Path(out_dir)
    flags = ["-std=c++20", "-O1", "-fPIC", "-w", "-DFASTPEFT_EMULATE", f"-DFASTPEFT_MODULE_NAME={module_name}",
             '-DFASTPEFT_SASS_ARCHS="80"', f"-I{csrc}", f"-I{include}", f"-I{pybind11.get_include()}",
             f"-I{sysconfig.get_paths()['include']}"]
    cu = sorted(csrc.glob("*.cu")) if sources is None else [csrc / s for s in sources]
    cmds = [["c++", *flags, "-x", "c++", "-c", str(s), "-o", str(out / f"{s.stem}.o")]
            for s in cu + [csrc / "bindings.cpp"]]
    so = out / f"{module_name}{sysconfig.get_config_var('EXT_SUFFIX')}"
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda c: subprocess.run(c, capture_output=True, text=True), cmds))
    link = subprocess.run(["c++", "-shared", *[c[-1] for c in cmds], f"-L{lib}", "-lcudart_static", "-ldl", "-lrt",
                           "-lpthread", "-o", str(so)], capture_output=True, text=True)
    failed = [r for r in results + [link] if r.returncode != 0]
    assert not failed, failed[0].stderr[-3000:]
    sys.path.insert(0, str(out))
    try:
        import importlib

        return importlib.import_module(module_name)
    finally:
        sys.path.remove(str(out))


def cext_on_cpu(emulated, monkeypatch):
    """fastpeft._cext's wrappers driving the CPU-emulated kernels `emulated` on CPU tensors."""
    import contextlib
    import types

    from fastpeft import _cext

    monkeypatch.setattr(_cext, "_C", emulated)
    monkeypatch.setattr(_cext, "_IMPORT_ERROR", None)
    monkeypatch.setattr(_cext, "_on_cuda", lambda **tensors: torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    return _cext
