"""GPU suite for the Triton kernels (skipped without CUDA).

``pytest -m gpu tests/test_gpu.py``: every entry of every kernel's search space, forced one at a time, against the
float64 reference (``configcheck``: forward; dQ without rpb, with the atomic and the deterministic rpb gradient;
dK/dV with and without rpb; bf16, fp16, fp32; every head-dim class; 1-D, 2-D and 3-D), about 1170 cases, so
autotuning in ``full`` mode can never pick a config that no check covered; then a short subset (autotuning off
unless ``NATZOO_NA_AUTOTUNE`` says otherwise): NAT/DiNAT layer problems in bf16, a general 2-D case in fp16 and fp32,
run-to-run bit equality, deterministic d_rpb, non-finite inputs, automatic backend selection. From a cold Triton
cache the sweep compiles about as many binaries as it has cases; prefill the cache in parallel with
``python benchmarks/gpu_kit.py --steps precompile,correctness`` (which also checks the cases) when time is short.

``pytest -m gpu_long tests/test_gpu.py``: the longer checks (the full case matrix in every dtype, all NAT/DiNAT
stage shapes, TF32 policy, 50 repeats, ``torch.compile`` with inductor).

Ground truth at these sizes is the reference backend in float64 on the same (rounded) inputs; the dense oracle is
too large here.
"""

from __future__ import annotations

import os

import pytest
import torch

from natzoo import ops

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Tolerances against a float64 ground truth (docs/kernels.md): out/lse, dq/dk/dv, d_rpb relative L2.
TOL = {
    torch.float32: (1e-5, 1e-4, 1e-5),
    torch.float16: (2e-3, 1e-2, 5e-3),
    torch.bfloat16: (1.6e-2, 5e-2, 2e-2),
}


@pytest.fixture(autouse=True)
def _one_config(monkeypatch):
    """Autotuning off by default: one compiled config per kernel keeps the run short."""
    if "NATZOO_NA_AUTOTUNE" not in os.environ:
        monkeypatch.setenv("NATZOO_NA_AUTOTUNE", "off")


def _fn(n):
    return getattr(ops, f"na{n}d")


def _run(n, inputs, kernel_size, stride, dilation, is_causal, dtype, rpb, backend):
    """Forward + backward on leaves derived from the fixed inputs; returns out, lse and the gradients."""
    q, k, v, bias, grad_out, grad_lse = inputs
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    b = None
    if rpb:
        b = bias.detach().to(torch.float64 if dtype == torch.float64 else torch.float32).requires_grad_()
    out, lse = _fn(n)(*leaves, kernel_size, stride, dilation, is_causal, rpb=b, return_lse=True, backend=backend)
    targets = leaves + ([b] if rpb else [])
    grads = torch.autograd.grad((out.double() * grad_out).sum() + (lse.double() * grad_lse).sum(), targets)
    return out, lse, grads


def _inputs(batch, spatial, heads, head_dim, kernel_size, layout="contiguous"):
    n = len(spatial)
    ks = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * n
    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (batch, *spatial, heads, head_dim)
    if layout == "qkv":  # the modules' views of one fused projection
        qkv = torch.randn(*shape[:-2], 3 * heads * head_dim, device="cuda", generator=g)
        q, k, v = qkv.unflatten(-1, (3, heads, head_dim)).unbind(-3)
    else:
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


def _against_reference(n, inputs, ks, st, dil, causal, dtype, rpb):
    got = _run(n, inputs, ks, st, dil, causal, dtype, rpb, "triton")
    rounded = [t.to(dtype).double() for t in inputs[:3]] + list(inputs[3:])
    ref = _run(n, rounded, ks, st, dil, causal, torch.float64, rpb, "reference")
    _check(got, ref, dtype, rpb)


# ------------------------------------------------------------------------------- every config of every kernel (-m gpu)


def _all_cases():
    from natzoo.ops.neighborhood.triton import configcheck

    return configcheck.cases()


@pytest.mark.gpu
@pytest.mark.parametrize("case", _all_cases(), ids=lambda case: case.name)
def test_every_search_space_entry_against_float64(case):
    """One search-space entry forced on its kernel (the others at their first entry) against the float64 reference:
    out, lse and, for backward variants, dq, dk, dv and d_rpb within the dtype's tolerance; a compile or launch
    failure fails the case with Triton's message."""
    from natzoo.ops.neighborhood.triton import configcheck

    row = configcheck.run_case(case, "cuda")
    assert row["error"] is None, row["error"]
    errors = {k: v for k, v in row.items() if k.endswith(("_max_abs", "_rel_l2"))}
    assert row["passed"], f"{case.name}: {errors} (tolerances out/lse {row['tol_out']}, grads {row['tol_grad']}, "\
                          f"d_rpb {row['tol_rpb']})"


# ------------------------------------------------------------------------------------------- short subset (-m gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("size,heads,dilation", [(56, 2, 1), (56, 2, 8), (7, 16, 1)], ids=str)
def test_nat_layers_bf16(size, heads, dilation):
    """NAT/DiNAT layer problems (k=7, head_dim 32, rpb, the modules' fused-qkv layout) in bf16."""
    inputs = _inputs(2, (size, size), heads, 32, 7, layout="qkv")
    _against_reference(2, inputs, 7, 1, dilation, False, torch.bfloat16, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_general_2d(dtype):
    """Mixed kernel sizes, dilation not dividing the length, one causal axis, rpb, head_dim 64."""
    inputs = _inputs(2, (57, 43), 2, 64, (7, 6))
    _against_reference(2, inputs, (7, 6), 1, (2, 3), (False, True), dtype, True)


@pytest.mark.gpu
def test_repeats_are_bit_identical():
    """10 forward+backward runs on odd sizes: out, lse, dq, dk, dv bit-equal; atomic-mode d_rpb within 1e-5."""
    inputs = _inputs(3, (57, 43), 3, 32, (7, 5))
    first = _run(2, inputs, (7, 5), 1, (3, 2), (False, True), torch.float16, True, "triton")
    for _ in range(10):
        again = _run(2, inputs, (7, 5), 1, (3, 2), (False, True), torch.float16, True, "triton")
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        for a, b in zip(first[2][:3], again[2][:3]):
            assert torch.equal(a, b)
        rel = ((again[2][3] - first[2][3]).norm() / first[2][3].norm()).item()
        assert rel <= 1e-5


@pytest.mark.gpu
def test_drpb_deterministic_mode_is_bit_identical():
    inputs = _inputs(4, (56, 56), 2, 32, 7, layout="qkv")
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        runs = [_run(2, inputs, 7, 1, 2, False, torch.bfloat16, True, "triton")[2][3] for _ in range(5)]
    finally:
        torch.use_deterministic_algorithms(previous)
    for r in runs[1:]:
        assert torch.equal(runs[0], r)


@pytest.mark.gpu
def test_non_finite_value_stays_in_its_neighbourhood():
    """On the GPU too (tensor-core NaN handling, fmax semantics): a NaN value poisons only its own queries."""
    q, k, v = (torch.randn(1, 40, 40, 2, 32, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    v[0, 20, 20, 1, 3] = float("nan")
    out = ops.na2d(q, k, v, 7, dilation=2, backend="triton")
    bad = ~torch.isfinite(out).all(-1)  # [1, 40, 40, 2]
    coords = torch.arange(40, device="cuda")
    # On each axis query x attends key 20 (in-group index 10 of group 0, length 20) iff x is in group 0 and its
    # window [start, start + 7) covers 10, start = clamp(x // 2 - 3, 0, 20 - 7).
    start = torch.clamp(coords // 2 - 3, 0, 20 - 7)
    axis = (coords % 2 == 0) & (start <= 10) & (10 < start + 7)
    expected = axis[:, None] & axis[None, :]
    assert torch.equal(bad[0, :, :, 1], expected)
    assert not bad[0, :, :, 0].any()


@pytest.mark.gpu
def test_auto_backend_picks_triton_on_cuda():
    """backend=None uses the kernels on CUDA: the output equals an explicit backend='triton' call bit for bit."""
    q = torch.randn(2, 28, 28, 4, 32, device="cuda", dtype=torch.float16)
    auto = ops.na2d(q, q, q, 7, dilation=2)
    forced = ops.na2d(q, q, q, 7, dilation=2, backend="triton")
    assert torch.equal(auto, forced)


# --------------------------------------------------------------------------------------- long checks (-m gpu_long)

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


@pytest.mark.gpu_long
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{len(c[0])}-L{'x'.join(map(str, c[0]))}-k{c[1]}-d{c[3]}")
def test_against_reference_float64(case, dtype):
    spatial, ks, st, dil, causal, rpb, heads, head_dim = case
    _against_reference(len(spatial), _inputs(2, spatial, heads, head_dim, ks), ks, st, dil, causal, dtype, rpb)


NAT_SHAPES = [(56, 2, d) for d in (1, 2, 4, 8)] + [(28, 4, d) for d in (1, 2, 4)] + [(14, 8, d) for d in (1, 2)]
NAT_SHAPES += [(7, 16, 1), (96, 2, 13)]


@pytest.mark.gpu_long
@pytest.mark.parametrize("size,heads,dilation", NAT_SHAPES, ids=str)
def test_nat_shapes(size, heads, dilation):
    """NAT/DiNAT layer problems (k=7, head_dim 32, rpb) in fp16 against the float64 reference."""
    _against_reference(2, _inputs(2, (size, size), heads, 32, 7, layout="qkv"), 7, 1, dilation, False,
                       torch.float16, True)


@pytest.mark.gpu_long
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


@pytest.mark.gpu_long
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_50_repeats_are_bit_identical(dtype):
    inputs = _inputs(3, (57, 43), 3, 32, (7, 5))
    first = _run(2, inputs, (7, 5), 1, (3, 2), (False, True), dtype, True, "triton")
    for _ in range(50):
        again = _run(2, inputs, (7, 5), 1, (3, 2), (False, True), dtype, True, "triton")
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        for a, b in zip(first[2][:3], again[2][:3]):
            assert torch.equal(a, b)


@pytest.mark.gpu_long
def test_compiled_module_matches_eager():
    torch._dynamo.reset()
    model = ops.NeighborhoodAttention2D(64, 2, 7, dilation=2, rel_pos_bias=True).cuda()
    x = torch.randn(2, 30, 29, 64, device="cuda")
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), atol=1e-5, rtol=1e-5)
