"""GPU suite for the Triton kernels (``pytest -m gpu``; skipped without CUDA).

Correctness at real sizes against the float64 reference backend (the dense oracle is too large there), all dtypes
and gradients; the NAT/DiNAT problem sizes; run-to-run bit equality of forward, dQ, dK, dV; d_rpb bounded in atomic
mode and bit-identical under ``torch.use_deterministic_algorithms(True)``.
"""

from __future__ import annotations

import pytest
import torch

from natzoo import ops

pytestmark = pytest.mark.gpu

TOL = {  # spec 6.4 (vs a float64 ground truth): out/lse, dq/dk/dv, d_rpb relative L2
    torch.float32: (1e-5, 1e-4, 1e-5),
    torch.float16: (2e-3, 1e-2, 5e-3),
    torch.bfloat16: (1.6e-2, 5e-2, 2e-2),
}


def _fn(n):
    return getattr(ops, f"na{n}d")


def _run(n, shape, kernel_size, stride, dilation, is_causal, dtype, rpb, backend):
    """Forward + backward on leaves derived from the fixed inputs; returns out, lse and the gradients."""
    q, k, v, bias, grad_out, grad_lse = shape
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    b = None
    if rpb:
        b = bias.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    out, lse = _fn(n)(*leaves, kernel_size, stride, dilation, is_causal, rpb=b, return_lse=True, backend=backend)
    targets = leaves + ([b] if rpb else [])
    grads = torch.autograd.grad((out.double() * grad_out).sum() + (lse.double() * grad_lse).sum(), targets)
    return out, lse, grads


def _inputs(batch, spatial, heads, head_dim, kernel_size):
    n = len(spatial)
    ks = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * n
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, *spatial, heads, head_dim)
    q, k, v = (torch.randn(shape, device="cuda", generator=g) for _ in range(3))
    bias = torch.randn(heads, *(2 * x - 1 for x in ks), device="cuda", generator=g) * 0.5
    grad_out = torch.randn(shape, device="cuda", generator=g, dtype=torch.float64)
    grad_lse = torch.randn(shape[:-1], device="cuda", generator=g, dtype=torch.float64)
    return q, k, v, bias, grad_out, grad_lse


def _check(got, ref, dtype, rpb):
    tol_out, tol_grad, tol_rpb = TOL[dtype]
    out, lse, grads = got
    ref_out, ref_lse, ref_grads = ref
    for name, a, b, tol in (("out", out, ref_out, tol_out), ("lse", lse, ref_lse, tol_out)):
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol, msg=lambda m, name=name: f"{name}: {m}")
    for name, a, b in zip(("dq", "dk", "dv"), grads[:3], ref_grads[:3]):
        assert not torch.isnan(a).any(), name
        torch.testing.assert_close(
            a.double(), b.double(), atol=tol_grad, rtol=tol_grad, msg=lambda m, name=name: f"{name}: {m}"
        )
    if rpb:
        rel = ((grads[3].double() - ref_grads[3]).norm() / ref_grads[3].norm()).item()
        assert rel <= tol_rpb, f"d_rpb relative L2 error {rel:.3e}"


CASES = [
    # spatial, kernel, stride, dilation, causal, rpb, heads, head_dim
    ((1000,), 13, 1, 3, False, True, 2, 64),
    ((777,), 8, 3, 2, True, False, 3, 128),
    ((57, 43), (7, 6), 1, (2, 3), (False, True), True, 2, 32),
    ((57, 43), (5, 4), (2, 4), (1, 2), (True, True), False, 2, 64),
    ((40, 33), (7, 7), (7, 7), 1, False, False, 1, 16),
    ((9, 17, 19), (3, 5, 4), 1, (1, 2, 3), (True, False, False), True, 2, 64),
    ((8, 16, 16), (3, 7, 7), (1, 2, 3), 1, (False, True, False), False, 2, 128),
    ((33, 31), (5, 5), 1, 1, False, True, 1, 48),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{len(c[0])}-L{'x'.join(map(str, c[0]))}-k{c[1]}-d{c[3]}")
def test_against_reference_float64(case, dtype):
    spatial, ks, st, dil, causal, rpb, heads, head_dim = case
    n = len(spatial)
    inputs = _inputs(2, spatial, heads, head_dim, ks)
    got = _run(n, inputs, ks, st, dil, causal, dtype, rpb, "triton")
    # Ground truth: the reference backend in float64 on the same (rounded) inputs.
    rounded = [t.to(dtype).double() for t in inputs[:3]] + list(inputs[3:])
    ref = _run(n, rounded, ks, st, dil, causal, torch.float64, rpb, "reference")
    _check(got, ref, dtype, rpb)


NAT_SHAPES = [(56, 2, d) for d in (1, 2, 4, 8)] + [(28, 4, d) for d in (1, 2, 4)] + [(14, 8, d) for d in (1, 2)]
NAT_SHAPES += [(7, 16, 1), (96, 2, 13)]


@pytest.mark.parametrize("size,heads,dilation", NAT_SHAPES, ids=lambda v: str(v))
def test_nat_shapes(size, heads, dilation):
    """NAT/DiNAT layer problems (k=7, head_dim 32, rpb) in fp16 against the float64 reference."""
    inputs = _inputs(2, (size, size), heads, 32, 7)
    got = _run(2, inputs, 7, 1, dilation, False, torch.float16, True, "triton")
    rounded = [t.half().double() for t in inputs[:3]] + list(inputs[3:])
    ref = _run(2, rounded, 7, 1, dilation, False, torch.float64, True, "reference")
    _check(got, ref, torch.float16, True)


def test_tf32_is_used_only_when_allowed():
    """With 'highest' precision fp32 matches the float64 reference to 1e-5; with 'high' it still runs (looser)."""
    inputs = _inputs(1, (64, 64), 2, 64, 7)
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        out_tf32 = _run(2, inputs, 7, 1, 1, False, torch.float32, False, "triton")[0]
        torch.set_float32_matmul_precision("highest")
        out_ieee = _run(2, inputs, 7, 1, 1, False, torch.float32, False, "triton")[0]
    finally:
        torch.set_float32_matmul_precision(previous)
    ref = _run(2, list(inputs), 7, 1, 1, False, torch.float64, False, "reference")[0]
    torch.testing.assert_close(out_ieee.double(), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_tf32.double(), ref, atol=5e-3, rtol=5e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_repeats_are_bit_identical(dtype):
    """50 forward+backward runs on odd sizes: out, lse, dq, dk, dv bit-equal (no races, no atomics)."""
    inputs = _inputs(3, (57, 43), 3, 32, (7, 5))
    first = _run(2, inputs, (7, 5), 1, (3, 2), (False, True), dtype, True, "triton")
    bound = None
    for _ in range(50):
        again = _run(2, inputs, (7, 5), 1, (3, 2), (False, True), dtype, True, "triton")
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        for a, b in zip(first[2][:3], again[2][:3]):
            assert torch.equal(a, b)
        # Atomic-mode d_rpb may differ in the last bits only.
        rel = ((again[2][3] - first[2][3]).norm() / first[2][3].norm()).item()
        bound = rel if bound is None else max(bound, rel)
    assert bound <= 1e-5


def test_drpb_deterministic_mode_is_bit_identical():
    inputs = _inputs(4, (56, 56), 2, 32, 7)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_run(2, inputs, 7, 1, 2, False, torch.float16, True, "triton")[2][3] for _ in range(20)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for r in runs[1:]:
        assert torch.equal(runs[0], r)


def test_auto_backend_picks_triton_on_cuda():
    """backend=None uses the kernels on CUDA: the output equals an explicit backend='triton' call bit for bit."""
    q = torch.randn(2, 28, 28, 4, 32, device="cuda", dtype=torch.float16)
    auto = ops.na2d(q, q, q, 7, dilation=2)
    forced = ops.na2d(q, q, q, 7, dilation=2, backend="triton")
    assert torch.equal(auto, forced)


def test_compiled_module_matches_eager():
    torch._dynamo.reset()
    model = ops.NeighborhoodAttention2D(64, 2, 7, dilation=2, rel_pos_bias=True).cuda()
    x = torch.randn(2, 30, 29, 64, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
