"""Triton kernels against the dense float64 oracle (and the reference backend), outputs, lse and all gradients.

Without a GPU the kernels run in Triton's CPU interpreter: this module sets ``TRITON_INTERPRET=1`` for its own
duration, before the kernel package is first imported (Triton decides interpreted vs compiled when the kernels are
decorated). With a GPU the same tests run on CUDA. Shapes are tiny and ``head_dim`` is mostly 16 to keep the
interpreter fast; the interpreter's tiles (see ``tiling._INTERPRETER_CONFIGS``) are smaller than the maps so that
every kernel walks several, partly filled query and key tiles.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
from oracle import case_id, dense_na

from natzoo import ops
from natzoo.ops.neighborhood.dispatch import use_backend

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# spec 6.4: (out/lse atol=rtol, dq/dk/dv atol=rtol, d_rpb relative L2)
TOL = {
    torch.float32: (1e-5, 1e-4, 1e-5),
    torch.float16: (2e-3, 1e-2, 5e-3),
    torch.bfloat16: (1.6e-2, 5e-2, 2e-2),
}


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    """Turns the Triton interpreter on for this module (CPU only) and imports the kernels under it."""
    if DEVICE == "cuda":
        importlib.import_module("natzoo.ops.neighborhood.triton")
        yield
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    forward = importlib.import_module("natzoo.ops.neighborhood.triton.forward")
    kernel = forward._na_fwd_kernel
    assert type(kernel).__name__ == "InterpretedFunction", "kernels were imported before TRITON_INTERPRET was set"
    yield
    if previous is None:
        del os.environ["TRITON_INTERPRET"]
    else:
        os.environ["TRITON_INTERPRET"] = previous


def _inputs(shape, dtype, layout):
    """q, k, v leaves of `shape` ``[B, *S, H, D]`` with the requested memory layout."""
    batch, *spatial, heads, dim = shape
    if layout == "qkv":
        # The modules' layout: views of one fused [B, *S, 3*H*D] projection (non-contiguous, shared storage).
        qkv = torch.randn(batch, *spatial, 3 * heads * dim, device=DEVICE).to(dtype)
        views = qkv.unflatten(-1, (3, heads, dim)).unbind(-3)
    elif layout == "transposed":
        views = [torch.randn(batch, heads, *spatial, dim, device=DEVICE).to(dtype).movedim(1, -2) for _ in range(3)]
    else:
        views = [torch.randn(shape, device=DEVICE).to(dtype) for _ in range(3)]
    leaves = [t.detach().requires_grad_() for t in views]
    if layout != "contiguous":
        assert not any(t.is_contiguous() for t in leaves)
    return leaves


def _report(name, got, ref):
    diff = (got.double() - ref).abs()
    rel_rms = (diff.norm() / ref.norm().clamp_min(1e-30)).item()
    return f"{name}: max abs err {diff.max().item():.3e}, relative RMS err {rel_rms:.3e}"


def _assert_close(name, got, ref, tol):
    assert not torch.isnan(got).any(), f"{name} has NaNs (unwritten tile?)"
    torch.testing.assert_close(got.double(), ref, atol=tol, rtol=tol, msg=lambda m: _report(name, got, ref) + "\n" + m)


def _assert_rel_l2(name, got, ref, tol):
    assert not torch.isnan(got).any(), f"{name} has NaNs"
    rel = ((got.double() - ref).norm() / ref.norm()).item()
    assert rel <= tol, _report(name, got, ref)


def run_case(spatial, kernel_size, stride=1, dilation=1, is_causal=False, rpb=False, dtype=torch.float32, batch=1,
             heads=1, head_dim=16, layout="contiguous", scale=None, rpb_dtype=torch.float32, q_gain=1.0):
    n = len(spatial)
    fn = getattr(ops, f"na{n}d")
    q, k, v = _inputs((batch, *spatial, heads, head_dim), dtype, layout)
    ks = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * n
    bias = None
    if rpb:
        bias = (torch.randn(heads, *(2 * x - 1 for x in ks), device=DEVICE) * 0.5).to(rpb_dtype).requires_grad_()
    with torch.no_grad():
        q.mul_(q_gain)
        k.mul_(q_gain)
    args = (kernel_size, stride, dilation, is_causal, scale)
    out, lse = fn(q, k, v, *args, rpb=bias, return_lse=True, backend="triton")
    assert out.dtype == dtype and lse.dtype == torch.float32
    assert out.shape == q.shape and lse.shape == q.shape[:-1] and out.is_contiguous() and lse.is_contiguous()
    grad_out = torch.randn(out.shape, device=DEVICE).to(dtype)
    grad_lse = torch.randn(lse.shape, device=DEVICE)
    leaves = [q, k, v] + ([bias] if rpb else [])
    grads = torch.autograd.grad((out.float() * grad_out.float()).sum() + (lse * grad_lse).sum(), leaves)

    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    ref_bias = ref_leaves[3] if rpb else None
    ref_out, ref_lse = dense_na(*ref_leaves[:3], *args, rpb=ref_bias)
    ref_grads = torch.autograd.grad((ref_out * grad_out.double()).sum() + (ref_lse * grad_lse.double()).sum(),
                                    ref_leaves)

    tol_out, tol_grad, tol_rpb = TOL[dtype]
    _assert_close("out", out, ref_out.detach(), tol_out)
    _assert_close("lse", lse, ref_lse.detach(), tol_out)
    for name, got, ref in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert got.dtype == dtype
        _assert_close(name, got, ref, tol_grad)
    if rpb:
        assert grads[3].dtype == rpb_dtype
        _assert_rel_l2("d_rpb", grads[3], ref_grads[3], tol_rpb)
    # The reference backend (gather-based) agrees on the forward as well.
    with torch.no_grad():
        ref2_out, ref2_lse = fn(q, k, v, *args, rpb=bias, return_lse=True, backend="reference")
    _assert_close("out vs reference", out, ref2_out.double(), tol_out)
    _assert_close("lse vs reference", lse, ref2_lse.double(), tol_out)


# (spatial, kernel_size, stride, dilation, is_causal, rpb, batch, heads): every row of the spec 6.2 case matrix that
# concerns the window arithmetic appears at least once.
CASES = [
    ((13,), 3, 1, 1, False, True, 2, 1),  # odd k, rpb, B=2
    ((10,), 4, 4, 1, False, False, 1, 3),  # even k, s = k not dividing L, H=3
    ((10,), 4, 2, 1, True, False, 1, 1),  # 1 < s < k, causal
    ((13,), 3, 1, 4, False, True, 1, 1),  # L=13, d=4 (not divisible), rpb dilated
    ((10,), 3, 1, 3, True, True, 1, 1),  # L=10, d=3, causal rpb dilated
    ((8,), 4, 1, 2, False, True, 1, 1),  # L = k*d: full attention within each group, even k rpb
    ((5,), 5, 5, 1, True, False, 1, 1),  # L = k, s = k, causal
    ((37,), 5, 3, 2, True, False, 1, 1),  # odd length, several 16-query tiles, 1 < s < k, dilation, causal
    ((13, 9), (4, 3), (2, 1), (2, 3), (True, False), False, 1, 1),  # spec id example, mixed causal
    ((9, 11), (3, 4), 1, (2, 1), (False, True), True, 1, 1),  # even/odd k, mixed causal, rpb
    ((7, 6), (7, 2), 1, 1, True, True, 1, 1),  # L = k on axis 0, all causal, rpb
    ((10, 10), (4, 4), (4, 4), 1, False, False, 1, 1),  # s = k not dividing L
    ((4, 5, 6), (2, 4, 3), (1, 2, 3), (2, 1, 2), (True, False, True), False, 1, 1),  # 3D, mixed everything
    ((4, 6, 5), (2, 3, 3), 1, (2, 1, 1), (False, False, True), True, 1, 1),  # 3D rpb, mixed causal, dilation
]


@pytest.mark.parametrize(
    "spatial,kernel_size,stride,dilation,is_causal,rpb,batch,heads",
    CASES,
    ids=[case_id(c[0], c[1], c[2], c[3], c[4], c[5]) for c in CASES],
)
def test_matches_oracle_fp32(nan_empty, spatial, kernel_size, stride, dilation, is_causal, rpb, batch, heads):
    run_case(spatial, kernel_size, stride, dilation, is_causal, rpb, batch=batch, heads=heads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "spatial,kernel_size,dilation,is_causal",
    [((13,), 4, 2, False), ((6, 7), (3, 2), (2, 1), (False, True))],
    ids=["n1-L13-k4-d2", "n2-L6x7-k3x2-d2x1-c01"],
)
def test_half_precision_with_fp32_rpb(nan_empty, dtype, spatial, kernel_size, dilation, is_causal):
    run_case(spatial, kernel_size, 1, dilation, is_causal, rpb=True, dtype=dtype, heads=2)


@pytest.mark.parametrize("layout", ["qkv", "transposed"])
def test_non_contiguous_inputs(nan_empty, layout):
    run_case((4, 5), (3, 4), 1, 1, (False, True), rpb=True, batch=2, heads=2, layout=layout)


@pytest.mark.parametrize("head_dim", [32, 48])
def test_head_dims(nan_empty, head_dim):
    """32 (NAT) and 48 (not a power of two: the 64-wide block is masked on loads)."""
    run_case((12,), 5, 1, 2, False, rpb=True, head_dim=head_dim)


def test_custom_scale_and_large_logits(nan_empty):
    """Logits around +-30 (spec 6.2 extreme values) with a custom scale: the online max subtraction must hold."""
    run_case((11,), 4, 1, 1, False, rpb=True, scale=0.5, q_gain=2.5)
    run_case((9,), 3, 2, 1, True, rpb=False, scale=0.0)


def test_gradient_into_lse_only(nan_empty):
    """Only lse feeds the loss: d_out is None in the backward, Delta = -dLSE (spec 2.7)."""
    q, k, v = _inputs((1, 11, 2, 16), torch.float32, "contiguous")
    bias = (torch.randn(2, 5) * 0.5).to(DEVICE).requires_grad_()
    _, lse = ops.na1d(q, k, v, 3, dilation=2, rpb=bias, return_lse=True, backend="triton")
    grads = torch.autograd.grad(lse.square().sum(), [q, k, bias])
    ref = [t.detach().double().requires_grad_() for t in (q, k, v, bias)]
    _, ref_lse = dense_na(*ref[:3], 3, dilation=2, rpb=ref[3])
    ref_grads = torch.autograd.grad(ref_lse.square().sum(), [ref[0], ref[1], ref[3]])
    _assert_close("dq", grads[0], ref_grads[0], 1e-4)
    _assert_close("dk", grads[1], ref_grads[1], 1e-4)
    _assert_rel_l2("d_rpb", grads[2], ref_grads[2], 1e-5)


def test_expanded_output_gradient(nan_empty):
    """``out.sum()`` hands the backward a stride-0 (expanded) dO; it is read through its strides, not copied."""
    q, k, v = _inputs((1, 9, 2, 16), torch.float32, "contiguous")
    out = ops.na1d(q, k, v, 3, backend="triton")
    grads = torch.autograd.grad(out.sum(), [q, k, v])
    ref = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref_grads = torch.autograd.grad(dense_na(*ref, 3)[0].sum(), ref)
    for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
        _assert_close(name, got, want, 1e-4)


def test_unsupported_problems_name_the_property():
    """V19: a forced Triton backend names `backend='triton'` and the failing property."""
    q = torch.randn(1, 9, 2, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"backend='triton'.*dtype=torch.float64"):
        ops.na1d(q.double(), q.double(), q.double(), 3, backend="triton")
    q24 = torch.randn(1, 9, 2, 24, device=DEVICE)
    with pytest.raises(ValueError, match=r"backend='triton'.*head_dim=24 not in supported set"):
        ops.na1d(q24, q24, q24, 3, backend="triton")
    with use_backend("triton"), pytest.raises(ValueError, match=r"head_dim=24"):
        ops.na1d(q24, q24, q24, 3)


def _fwd_bwd(q, k, v, bias):
    out, lse = ops.na1d(q, k, v, 4, dilation=3, rpb=bias, return_lse=True, backend="triton")
    grads = torch.autograd.grad(out.square().sum() + lse.sum(), [q, k, v, bias])
    return [out, lse, *grads]


def test_repeated_runs_are_bit_identical():
    """Forward and dq/dk/dv bit-equal across runs; d_rpb bit-equal in deterministic mode and close to atomic mode."""
    q, k, v = _inputs((1, 13, 2, 16), torch.float32, "contiguous")  # odd length, not divisible by d=3
    bias = (torch.randn(2, 7, device=DEVICE) * 0.5).requires_grad_()
    first = _fwd_bwd(q, k, v, bias)
    again = _fwd_bwd(q, k, v, bias)
    for a, b in zip(first[:5], again[:5]):
        assert torch.equal(a, b)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        det = [_fwd_bwd(q, k, v, bias) for _ in range(2)]
    finally:
        torch.use_deterministic_algorithms(previous)
    assert torch.equal(det[0][5], det[1][5])
    torch.testing.assert_close(det[0][5], first[5], atol=1e-6, rtol=1e-5)


class _TinyNA(torch.nn.Module):
    def __init__(self, dim=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(dim, 3 * dim)
        self.rpb = torch.nn.Parameter(torch.randn(heads, 5, 3) * 0.5)
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(-3)
        out = ops.na2d(q, k, v, (3, 2), dilation=(2, 1), is_causal=(False, True), rpb=self.rpb, backend="triton")
        return self.proj(out.flatten(-2))


def test_torch_compile_fullgraph():
    """The custom ops trace without graph breaks (fullgraph=True) and match eager, gradients included."""
    torch._dynamo.reset()
    model = _TinyNA().to(DEVICE)
    x = torch.randn(1, 6, 5, 32, device=DEVICE)
    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    eager_out = model(x)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), [model.qkv.weight, model.rpb])
    out = compiled(x)
    grads = torch.autograd.grad(out.square().sum(), [model.qkv.weight, model.rpb])
    torch.testing.assert_close(out, eager_out, atol=1e-5, rtol=1e-5)
    for got, ref in zip(grads, eager_grads):
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    assert math.isfinite(out.sum().item())
