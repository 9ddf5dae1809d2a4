"""Helpers shared by the ops: argument checks and autocast handling."""

from __future__ import annotations

import torch

from .. import backend

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FAST_DTYPES = frozenset(FLOAT_DTYPES)  # the CPU fast paths' test (`dtype in FAST_DTYPES`)


def remember_checked(checked: set, shapes: tuple, validate) -> None:
    """The CPU fast paths' slow step: `validate()` (raises, naming the problem) for a set of argument shapes
    not seen before, then remember it (the set is bounded); callers test `shapes not in checked` first."""
    validate()
    if len(checked) > 4096:
        checked.clear()
    checked.add(shapes)


def check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def value_checks(t: torch.Tensor) -> bool:
    """Whether to check the values of index tensor `t` on the host: not for CUDA tensors (that would
    synchronise the stream) and not while torch.compile traces (data-dependent, a graph break)."""
    return t.numel() > 0 and not t.is_cuda and not torch.compiler.is_compiling()


def dense(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The custom ops' output contract: contiguous tensors (a no-op for kernels that write them so).
    Their fake kernels promise the same, so torch.compile's stride assumptions hold for every backend."""
    return tuple(t.contiguous() for t in tensors)


def check_float(name: str, t: torch.Tensor) -> None:
    check(t.dtype in FLOAT_DTYPES, f"{name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}")


def check_projection(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     **params: torch.Tensor) -> tuple[int, int]:
    """The checks every adapted projection shares (floating tensors on one device, a 2-D (N, K)
    weight, x with K features, bias (N,)); returns (N, K)."""
    if x.dim() < 1:
        raise ValueError("x must have at least one dimension")
    for name, t in (("x", x), ("weight", weight), *params.items()):
        check_float(name, t)
    check_same_device(x=x, weight=weight, bias=bias, **params)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} features but the layer's in_features is {k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}; expected ({n},)")
    return n, k


def check_same_device(**tensors: torch.Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force for `device_type`, or None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast_for_autocast(device_type: str, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Cast floating tensors to the autocast dtype, as nn.Linear does under autocast."""
    dtype = autocast_dtype(device_type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def gpu_kernel_supports(*tensors: torch.Tensor | None, forced: bool) -> str | None:
    """Reason a GPU kernel cannot run on these tensors (None when it can).

    Automatic selection needs CUDA tensors; a forced Triton backend also runs CPU tensors when
    TRITON_INTERPRET=1 (that is how CI tests the kernels without a GPU)."""
    import os

    ts = [t for t in tensors if t is not None]
    if all(t.is_cuda for t in ts):
        return None
    if forced and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return "tensors are not on a CUDA device"


def raw_apply(cls: type):
    """`cls.apply` for an autograd.Function minus `Function.apply`'s per-call Python (signature
    inspection, a walk over the arguments for functorch): the C++ apply, which is all an eager call
    needs while no functorch transform is active (check `functorch_active()` first).  These are
    private torch APIs: where a torch release lacks them, the public `cls.apply` serves."""
    raw = getattr(getattr(torch._C, "_FunctionBase", None), "__dict__", {}).get("apply")
    return raw.__get__(None, cls) if raw is not None else cls.apply


functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: True)


def traced_as_aten(x: torch.Tensor) -> bool:
    """Under torch.compile: whether an op is traced as its plain aten decomposition rather than the
    opaque custom op.  On CPU tensors with the automatic or torch backend the custom op would only wrap
    the same aten calls, and opaque it keeps inductor from fusing them and the partitioner from
    recomputing cheap inputs instead of saving them (e.g. IA3's scaled input, a product of two tensors
    the graph saves anyway); on CUDA, or with a forced kernel backend, the custom op runs the kernels."""
    return not x.is_cuda and backend.get_backend() in (None, "torch", "torch_philox")
