"""fastpeft._C without a GPU: it imports, every entry point checks its arguments before any launch
(bad dtype code, size, null or misaligned pointer, inconsistent sizes, out-of-range stride ->
ValueError naming the problem), a valid call on a machine with no GPU fails as a checked launch
(RuntimeError), and the dispatch falls back to the reference where the CUDA kernels don't apply.

The pointers below are fake: only invalid calls reach the extension where a GPU could run them."""

import io

import pytest
import torch

import fastpeft
from fastpeft import _cext, backend

needs_ext = pytest.mark.skipif(not _cext.available(), reason=f"fastpeft._C not built: {_cext.why_unavailable()}")

PTR = 1 << 20  # a fake, 16-byte-aligned device address: never dereferenced by these tests


def fwd_args(**over):
    B, T, P, H, V, N = 2, 5, 3, 16, 100, 4
    args = dict(out=PTR, out_dtype=2, weight=PTR * 2, input_ids=PTR * 3, table=PTR * 4, table_dtype=0,
                prompt_index=PTR * 5, bad_index=PTR * 6, B=B, T=T, P=P, H=H, V=V, N=N, ids_stride_b=T,
                ids_stride_t=1, weight_stride_v=H, weight_stride_h=1, table_stride_n=P * H, table_stride_p=H,
                table_stride_h=1, pidx_stride=1, stream=0)
    args.update(over)
    return args


def table_bwd_args(**over):
    args = dict(d_table=PTR, table_dtype=0, dout=PTR * 2, dout_dtype=2, prompt_index=0, B=2, S=8, P=3, H=16, N=1,
                dout_stride_b=8 * 16, dout_stride_s=16, dout_stride_h=1, pidx_stride=0, stream=0)
    args.update(over)
    return args


def weight_bwd_args(**over):
    args = dict(d_weight=PTR, dout=PTR * 2, dout_dtype=1, input_ids=PTR * 3, bad_index=0, B=2, S=8, T=5, P=3,
                H=16, V=100, ids_stride_b=5, ids_stride_t=1, dout_stride_b=8 * 16, dout_stride_s=16,
                dout_stride_h=1, stream=0)
    args.update(over)
    return args


def sorted_bwd_args(**over):
    args = weight_bwd_args()
    for k in ("input_ids", "ids_stride_b", "ids_stride_t"):
        del args[k]
    args.update(weight_dtype=2, sorted_ids=PTR * 4, order=PTR * 5)
    args.update(over)
    return args


def ia3_args(**over):
    args = dict(out=PTR, out_dtype=0, a=PTR * 2, b=PTR * 3, in_dtype=2, M=64, N=32, a_stride_m=32, a_stride_n=1,
                b_stride_m=32, b_stride_n=1, stream=0)
    args.update(over)
    return args


BAD_FWD = [
    ("bad dtype code", dict(out_dtype=7), "dtype code 7 for the embedding weight"),
    ("bad table dtype code", dict(table_dtype=-1), "dtype code -1 for the prompt table"),
    ("zero hidden size", dict(H=0), "hidden size H must be positive, got 0"),
    ("negative batch", dict(B=-2), "batch size B must be positive, got -2"),
    ("negative seq", dict(T=-1), "sequence length T must be >= 0, got -1"),
    ("zero prompt tokens", dict(P=0), "num_virtual_tokens P must be positive"),
    ("zero vocab", dict(V=0), "vocabulary size V must be positive"),
    ("null out", dict(out=0), "null pointer for out"),
    ("null weight", dict(weight=0), "null pointer for embedding_weight"),
    ("null table", dict(table=0), "null pointer for prompt_table"),
    ("null input_ids", dict(input_ids=0), "null pointer for input_ids"),
    ("misaligned weight", dict(weight=PTR + 1), "pointer for embedding_weight is not aligned"),
    ("misaligned prompt_index", dict(prompt_index=PTR + 4), "pointer for prompt_index is not aligned"),
    ("shared table with N > 1", dict(prompt_index=0, N=3), "inconsistent sizes: prompt_index is null"),
    ("overlapping weight rows", dict(weight_stride_v=15), "row stride is 15 but must be at least 16"),
    ("negative stride", dict(ids_stride_t=-1), "negative strides are not supported"),
    ("huge stride", dict(weight_stride_v=1 << 62), "out of range"),
    ("non-unit hidden stride", dict(table_stride_h=2), "hidden dimension must be contiguous"),
    ("too many elements", dict(B=1 << 30, T=1 << 30, H=1 << 10), "too many elements"),
]


@needs_ext
def test_extension_facts():
    C = _cext._C
    assert C.CUDA_ARCHS and all(isinstance(a, int) and a >= 75 for a in C.CUDA_ARCHS)
    assert all(a in range(75, 200) for a in C.PTX_ARCHS)
    assert C.DTYPE_CODES == {"float32": 0, "float16": 1, "bfloat16": 2}
    assert {k: _cext.DTYPE_CODES[getattr(torch, k)] for k in C.DTYPE_CODES} == C.DTYPE_CODES
    assert C.CUDA_RUNTIME_VERSION >= 12000
    count, why = C.device_count()
    assert (count > 0) == (why is None)
    assert _cext.archs() == list(C.CUDA_ARCHS)


@needs_ext
@pytest.mark.parametrize("case,over,message", BAD_FWD, ids=[c[0] for c in BAD_FWD])
def test_forward_argument_checks(case, over, message):
    with pytest.raises(ValueError, match=message) as err:
        _cext._C.soft_prompt_fwd(**fwd_args(**over))
    assert str(err.value).startswith("soft_prompt_fwd: ")


BAD_TABLE_BWD = [
    ("bad dtype code", dict(dout_dtype=3), "dtype code 3 for dout"),
    ("dout shorter than the prompt", dict(S=2), "inconsistent sizes: dout has 2 positions per row, fewer than the 3"),
    ("shared with N > 1", dict(N=2), "inconsistent sizes: prompt_index is null"),
    ("zero num_prompts", dict(N=0), "num_prompts N must be positive"),
    ("null d_table", dict(d_table=0), "null pointer for d_table"),
    ("overlapping dout rows", dict(dout_stride_s=8), "dout's sequence stride is 8 but must be at least 16"),
    ("huge batch stride", dict(dout_stride_b=1 << 62), "dout's batch stride is .* out of range"),
]


@needs_ext
@pytest.mark.parametrize("case,over,message", BAD_TABLE_BWD, ids=[c[0] for c in BAD_TABLE_BWD])
def test_table_backward_argument_checks(case, over, message):
    with pytest.raises(ValueError, match=message):
        _cext._C.soft_prompt_table_bwd(**table_bwd_args(**over))


BAD_WEIGHT_BWD = [
    ("P + T != S", dict(T=4), r"inconsistent sizes: dout has 8 positions per row but P \+ T = 3 \+ 4 = 7"),
    ("zero vocab", dict(V=0), "vocabulary size V must be positive"),
    ("null dout", dict(dout=0), "null pointer for dout"),
    ("null input_ids", dict(input_ids=0), "null pointer for input_ids"),
    ("negative ids stride", dict(ids_stride_b=-5), "input_ids' batch stride is -5"),
    ("misaligned bad_index", dict(bad_index=PTR + 2), "bad_index is not aligned"),
]


@needs_ext
@pytest.mark.parametrize("case,over,message", BAD_WEIGHT_BWD, ids=[c[0] for c in BAD_WEIGHT_BWD])
def test_weight_backward_argument_checks(case, over, message):
    with pytest.raises(ValueError, match=message):
        _cext._C.soft_prompt_weight_bwd(**weight_bwd_args(**over))


@needs_ext
@pytest.mark.parametrize("over,message", [
    (dict(order=0), "null pointer for order"),
    (dict(sorted_ids=0), "null pointer for sorted_ids"),
    (dict(weight_dtype=5), "dtype code 5 for the embedding gradient"),
    (dict(S=9), "inconsistent sizes"),
])
def test_sorted_weight_backward_argument_checks(over, message):
    with pytest.raises(ValueError, match=message):
        _cext._C.soft_prompt_weight_bwd_sorted(**sorted_bwd_args(**over))


BAD_IA3 = [
    ("bad out dtype", dict(out_dtype=9), "dtype code 9 for dl"),
    ("bad input dtype", dict(in_dtype=-3), "dtype code -3 for a and b"),
    ("zero columns", dict(N=0), r"N \(columns, the size of dl\) must be positive, got 0"),
    ("negative rows", dict(M=-1), r"M \(rows summed over\) must be >= 0, got -1"),
    ("null out", dict(out=0), "null pointer for out"),
    ("null a", dict(a=0), "null pointer for a"),
    ("null b", dict(b=0), "null pointer for b"),
    ("misaligned a", dict(a=PTR + 1), "pointer for a is not aligned to its 2-byte elements"),
    ("negative stride", dict(b_stride_n=-1), "b's column stride is -1; negative strides"),
    ("huge stride", dict(a_stride_m=1 << 61), "a's row stride is .* out of range"),
]


@needs_ext
@pytest.mark.parametrize("case,over,message", BAD_IA3, ids=[c[0] for c in BAD_IA3])
def test_ia3_scale_grad_argument_checks(case, over, message):
    with pytest.raises(ValueError, match=message) as err:
        _cext._C.ia3_scale_grad(**ia3_args(**over))
    assert str(err.value).startswith("ia3_scale_grad: ")


@needs_ext
@pytest.mark.skipif(torch.cuda.is_available(), reason="a valid call with fake pointers would really launch on a GPU")
@pytest.mark.parametrize("fn,args", [("soft_prompt_fwd", fwd_args), ("ia3_scale_grad", ia3_args),
                                     ("soft_prompt_table_bwd", table_bwd_args)])
def test_launch_failure_is_an_exception(fn, args):
    """Valid arguments pass the checks; with no GPU the launch check turns the failure into RuntimeError."""
    with pytest.raises(RuntimeError, match=f"{fn}: kernel launch failed: cuda"):
        getattr(_cext._C, fn)(**args())


@needs_ext
def test_wrappers_reject_cpu_tensors_and_bad_dtypes():
    ids = torch.randint(0, 10, (2, 3))
    w, t = torch.randn(10, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="input_ids is on cpu; the CUDA kernels need CUDA tensors"):
        _cext.soft_prompt_forward(ids, w, t)
    with pytest.raises(ValueError, match="a and b must be 2-D of one shape"):
        _cext.ia3_scale_grad(torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match="has dtype torch.float64; the CUDA kernels take"):
        _cext._code(torch.float64, "prompt_table")


def test_unbuilt_extension_is_explained(monkeypatch):
    monkeypatch.setattr(_cext, "_C", None)
    monkeypatch.setattr(_cext, "_IMPORT_ERROR", "the CUDA extension fastpeft._C is not built (test)")
    assert not _cext.available() and "not built" in _cext.why_unavailable()
    ids = torch.randint(0, 10, (2, 3))
    assert "not built" in backend.why_not("soft_prompt_embed", "cuda", ids, torch.randn(10, 8), torch.randn(4, 8), None)
    with pytest.raises(RuntimeError, match="not built"):
        _cext.soft_prompt_forward(ids, torch.randn(10, 8), torch.randn(4, 8))
    report = fastpeft.info(file=None)
    assert report["backends"]["cuda"] == {"usable": False, "built": False, "reason": _cext.why_unavailable()}


def test_cuda_backend_falls_back_on_cpu():
    ids = torch.randint(0, 10, (2, 3))
    w, t = torch.randn(10, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    assert "cuda" in backend.available("soft_prompt_embed")
    reason = backend.why_not("soft_prompt_embed", "cuda", ids, w, t, None)
    assert reason is not None and ("CUDA device" in reason or "not built" in reason)
    out = fastpeft.ops.soft_prompt_embed(ids, w, t)
    assert backend.last_backend("soft_prompt_embed") == "torch"
    out.sum().backward()
    assert t.grad.shape == t.shape and w.grad.shape == w.shape


def test_cuda_backend_rejects_float64(monkeypatch):
    from fastpeft.ops.soft_prompt import _cuda_supports

    if not _cext.available():
        pytest.skip(f"fastpeft._C not built: {_cext.why_unavailable()}")
    # pretend the tensors are on a GPU: the dtype check comes next
    t64 = torch.randn(4, 8, dtype=torch.float64)
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    reason = _cuda_supports(torch.zeros(2, 3, dtype=torch.long), torch.randn(10, 8), t64, None)
    assert "prompt_table is torch.float64" in reason


def test_info_mentions_every_backend():
    buf = io.StringIO()
    report = fastpeft.info(file=buf)
    text = buf.getvalue()
    for name in ("torch", "triton", "cuda"):
        assert f"\n{name}:" in text, text
        assert name in report["backends"]
        entry = report["backends"][name]
        assert entry["usable"] or entry["reason"], entry
    assert report["backends"]["torch"]["usable"]
    assert "soft_prompt_embed" in report["ops"] and "cuda" in report["ops"]["soft_prompt_embed"]
    if _cext.available():
        assert report["backends"]["cuda"]["archs"] == [f"sm_{a}" for a in _cext.archs()]
        assert "sm_" in text
    if not torch.cuda.is_available():
        assert not report["backends"]["cuda"]["usable"] and "no GPU" in report["backends"]["cuda"]["reason"]


def test_python_m_fastpeft_info():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "fastpeft.info"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "torch:" in proc.stdout and "triton:" in proc.stdout and "cuda:" in proc.stdout


def test_fastpeft_info_command_prints_json(capsys):
    import json

    from fastpeft.cli import main

    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["backends"]) == {"torch", "triton", "cuda"} and report["fastpeft"] == fastpeft.__version__
