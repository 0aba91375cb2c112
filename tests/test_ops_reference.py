"""The reference, cpu and dense backends against the dense float64 oracle: outputs, LSE and every gradient.

The Triton backend runs the same oracle comparisons in tests/test_triton.py (in the interpreter on CPU).
"""

from __future__ import annotations

import logging
import math
import random
import threading

import pytest
import torch

from natzoo import ops
from natzoo.ops.neighborhood import cpu
from natzoo.ops.neighborhood.dispatch import forced_backend, use_backend
from oracle import case_id, dense_mask_and_bias_index, dense_na

FNS = {1: ops.na1d, 2: ops.na2d, 3: ops.na3d}
TOL = {  # (out/lse atol=rtol, grad atol=rtol, d_rpb relative L2) against the float64 oracle
    torch.float64: (1e-10, 1e-9, 1e-10),
    torch.float32: (1e-5, 1e-4, 1e-5),
    torch.float16: (2e-3, 1e-2, 5e-3),
    torch.bfloat16: (1.6e-2, 5e-2, 2e-2),
}


def random_case(rng: random.Random):
    n = rng.choice((1, 1, 2, 2, 2, 3))
    max_tokens = {1: 24, 2: 60, 3: 72}[n]
    while True:
        ks, ds, ls, ss, cs = [], [], [], [], []
        for _ in range(n):
            k = rng.randint(2, 5 if n < 3 else 3)
            d = rng.choice((1, 1, 2, 3))
            length = k * d + rng.choice((0, 0, 1, 2, 3, 5))
            ks.append(k), ds.append(d), ls.append(length)
            ss.append(rng.choice((1, 1, rng.randint(1, k), k)))
            cs.append(rng.random() < 0.3)
        tokens = 1
        for length in ls:
            tokens *= length
        if tokens <= max_tokens:
            break
    use_rpb = all(s == 1 for s in ss) and rng.random() < 0.6
    return tuple(ls), tuple(ks), tuple(ss), tuple(ds), tuple(cs), use_rpb


CASES = [random_case(random.Random(seed)) for seed in range(240)]
# Fixed cases from the spec's case matrix that random sampling might miss.
CASES += [
    ((10,), (3,), (1,), (3,), (False,), True),
    ((13,), (3,), (1,), (4,), (True,), True),
    ((10,), (4,), (4,), (1,), (False,), False),
    ((10,), (4,), (4,), (1,), (True,), False),
    ((13, 9), (4, 3), (2, 1), (2, 3), (True, False), False),
    ((6, 8), (3, 3), (1, 1), (1, 2), (False, False), True),
    ((4, 6), (4, 3), (1, 1), (1, 2), (False, True), True),
    ((4, 5, 3), (2, 5, 3), (1, 1, 1), (2, 1, 1), (True, False, False), True),
    ((7, 7), (7, 7), (1, 1), (1, 1), (False, False), True),
]


def make_inputs(spatial, heads, head_dim, dtype, batch=2, requires_grad=True):
    shape = (batch, *spatial, heads, head_dim)
    tensors = [torch.randn(shape, dtype=dtype).requires_grad_(requires_grad) for _ in range(3)]
    return tensors


def rel_l2(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


BACKENDS = ["reference", "cpu", "dense"]


def _out_only_matches(fn, q, k, v, ks, ss, ds, cs, rpb, backend, tol, gtol, rtol_rpb):
    """The call without lse (the dense backend's fused scaled_dot_product_attention path) and its gradients."""
    out = fn(q, k, v, ks, stride=ss, dilation=ds, is_causal=cs, rpb=rpb, backend=backend)
    ref_out, _ = dense_na(q, k, v, ks, ss, ds, cs, rpb=rpb)
    torch.testing.assert_close(out.double(), ref_out.double(), atol=tol, rtol=tol)
    d_out = torch.randn(out.shape, dtype=torch.float64)
    inputs = [q, k, v] + ([rpb] if rpb is not None else [])
    grads = torch.autograd.grad((out.double() * d_out).sum(), inputs)
    ref_grads = torch.autograd.grad((ref_out.double() * d_out).sum(), inputs)
    for g, r, x in zip(grads, ref_grads, inputs):
        assert g.dtype == x.dtype
    for name, g, r in zip(("dq", "dk", "dv"), grads[:3], ref_grads[:3]):
        torch.testing.assert_close(g.double(), r.double(), atol=gtol, rtol=gtol, msg=lambda m, name=name: f"{name}: {m}")
    if rpb is not None:
        assert rel_l2(grads[3], ref_grads[3]) < rtol_rpb


# The dense backend on every fourth random case and every fixed one (CI time), the cpu backend on every second; the
# reference on all of them.
ORACLE_PARAMS = [pytest.param(c, "reference", id=case_id(*c[:5], c[5]) + "-reference") for c in CASES] + [
    pytest.param(c, name, id=case_id(*c[:5], c[5]) + f"-{name}") for name, every in (("dense", 4), ("cpu", 2))
    for i, c in enumerate(CASES) if i % every == 0 or i >= 240
]


@pytest.mark.parametrize("case,backend", ORACLE_PARAMS)
def test_reference_matches_oracle_float64(case, backend):
    spatial, ks, ss, ds, cs, use_rpb = case
    n = len(spatial)
    heads = 1 + (hash(case) % 3)
    q, k, v = make_inputs(spatial, heads, 4, torch.float64)
    rpb = None
    if use_rpb:
        rpb = (torch.randn(heads, *(2 * x - 1 for x in ks), dtype=torch.float64) * 0.5).requires_grad_()
    out, lse = FNS[n](q, k, v, ks, stride=ss, dilation=ds, is_causal=cs, rpb=rpb, return_lse=True, backend=backend)
    ref_out, ref_lse = dense_na(q, k, v, ks, ss, ds, cs, rpb=rpb)
    atol, gtol, rtol_rpb = TOL[torch.float64]
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=atol)
    torch.testing.assert_close(lse, ref_lse, atol=atol, rtol=atol)
    d_out, d_lse = torch.randn_like(out), torch.randn_like(lse)
    inputs = [q, k, v] + ([rpb] if rpb is not None else [])
    grads = torch.autograd.grad((out * d_out).sum() + (lse * d_lse).sum(), inputs)
    ref_grads = torch.autograd.grad((ref_out * d_out).sum() + (ref_lse * d_lse).sum(), inputs)
    for name, g, r in zip(("dq", "dk", "dv"), grads[:3], ref_grads[:3]):
        torch.testing.assert_close(g, r, atol=gtol, rtol=gtol, msg=lambda m: f"{name}: {m}")
    if rpb is not None:
        assert rel_l2(grads[3], ref_grads[3]) < rtol_rpb
    if backend == "dense":
        _out_only_matches(FNS[n], q, k, v, ks, ss, ds, cs, rpb, backend, atol, gtol, rtol_rpb)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES[-9:], ids=[case_id(*c[:5], c[5]) for c in CASES[-9:]])
def test_reference_low_precision(case, dtype, backend):
    spatial, ks, ss, ds, cs, use_rpb = case
    n = len(spatial)
    q, k, v = make_inputs(spatial, 3, 8, dtype)
    # float32 rpb under half inputs, as with a float32 parameter under autocast.
    rpb = (torch.randn(3, *(2 * x - 1 for x in ks)) * 0.5).requires_grad_() if use_rpb else None
    out, lse = FNS[n](q, k, v, ks, stride=ss, dilation=ds, is_causal=cs, rpb=rpb, return_lse=True, backend=backend)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = dense_na(q, k, v, ks, ss, ds, cs, rpb=rpb)
    tol, gtol, rtol_rpb = TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)
    d_out = torch.randn(out.shape, dtype=torch.float64)
    inputs = [q, k, v] + ([rpb] if rpb is not None else [])
    grads = torch.autograd.grad((out.double() * d_out).sum(), inputs)
    ref_grads = torch.autograd.grad((ref_out * d_out).sum(), inputs)
    for g, r, x in zip(grads, ref_grads, inputs):
        assert g.dtype == x.dtype
    for g, r in zip(grads[:3], ref_grads[:3]):
        torch.testing.assert_close(g.double(), r.double(), atol=gtol, rtol=gtol)
    if rpb is not None:
        assert rel_l2(grads[3], ref_grads[3]) < rtol_rpb
    if backend == "dense":
        _out_only_matches(FNS[n], q, k, v, ks, ss, ds, cs, rpb, backend, tol, gtol, rtol_rpb)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "n,spatial,ks,ds,cs",
    [(1, (7,), 3, 2, False), (2, (4, 5), (2, 3), (2, 1), (False, True)), (3, (2, 4, 2), 2, (1, 2, 1), True)],
)
def test_gradcheck_float64(n, spatial, ks, ds, cs, backend):
    q, k, v = make_inputs(spatial, 2, 2, torch.float64, batch=1)
    kt = (ks,) * n if isinstance(ks, int) else ks
    rpb = torch.randn(2, *(2 * x - 1 for x in kt), dtype=torch.float64, requires_grad=True)

    def fn(q, k, v, rpb):
        out, lse = FNS[n](q, k, v, ks, dilation=ds, is_causal=cs, rpb=rpb, return_lse=True, backend=backend)
        return out, lse

    assert torch.autograd.gradcheck(fn, (q, k, v, rpb))
    # Second order is costly (quadratic in the input size): the smallest case covers it. The cpu backend's backward
    # operator has no backward of its own (second order needs backend='reference').
    if n == 1 and backend != "cpu":
        assert torch.autograd.gradgradcheck(fn, (q, k, v, rpb))


def test_non_contiguous_inputs_and_extreme_logits():
    """Slices of a fused qkv tensor and transposed views; logits around +-30 stay finite and exact."""
    base = torch.randn(2, 9, 3, 2, 5, dtype=torch.float64) * 4.0
    q, k, v = base.unbind(2)  # [2, 9, 2, 5], non-contiguous
    assert not q.is_contiguous()
    out, lse = ops.na1d(q, k, v, 3, dilation=2, scale=1.0, return_lse=True)
    ref_out, ref_lse = dense_na(q, k, v, 3, 1, 2, False, scale=1.0)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)
    assert float(lse.abs().max()) > 20.0 and out.is_contiguous() and lse.is_contiguous()
    xt = torch.randn(1, 2, 6, 5, 4, dtype=torch.float64).permute(0, 3, 2, 1, 4)  # [1, 5, 6, 2, 4] view
    out = ops.na2d(xt, xt, xt, (3, 2), dilation=(1, 3))
    torch.testing.assert_close(out, dense_na(xt, xt, xt, (3, 2), 1, (1, 3), False)[0], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scale_zero_is_used_as_given(backend):
    q, k, v = make_inputs((6,), 1, 4, torch.float64, requires_grad=False)
    out = ops.na1d(q * 100, k, v, 3, scale=0.0, backend=backend)
    torch.testing.assert_close(out, dense_na(q, k, v, 3, scale=0.0)[0])
    torch.testing.assert_close(out, dense_na(q * 100, k, v, 3, scale=0.0)[0])


def test_empty_batch_returns_empty_outputs():
    q = torch.randn(0, 5, 6, 2, 4)
    out, lse = ops.na2d(q, q, q, 3, return_lse=True)
    assert out.shape == (0, 5, 6, 2, 4) and lse.shape == (0, 5, 6, 2) and lse.dtype == torch.float32


@pytest.mark.parametrize("n", [1, 2, 3])
def test_empty_batch_flows_through_backward(n):
    """An empty batch is part of the autograd graph: backward gives gradients of the input shapes (rpb: zeros)."""
    spatial, heads = (6, 5, 4)[:n], 2
    q, k, v = (torch.randn(0, *spatial, heads, 8, requires_grad=True) for _ in range(3))
    rpb = torch.randn(heads, *(5,) * n, requires_grad=True)
    out, lse = FNS[n](q, k, v, 3, rpb=rpb, return_lse=True)
    (out.sum() + lse.sum()).backward()
    for t in (q, k, v):
        assert t.grad is not None and t.grad.shape == t.shape
    assert rpb.grad is not None and rpb.grad.shape == rpb.shape and not rpb.grad.any()


BAD_VALUE_CASES = [  # (spatial, kernel_size, stride, dilation, is_causal, bad token)
    ((32,), 5, 1, 1, False, (10,)),
    ((32,), 5, 1, 1, False, (1,)),
    ((20,), 3, 1, 3, True, (7,)),
    ((8, 8), 3, 1, 1, False, (4, 4)),
    ((9, 10), (3, 4), (1, 2), (2, 1), (False, True), (3, 0)),
    ((5, 6, 6), 3, 1, (1, 2, 1), False, (2, 3, 5)),
]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("where", ["key", "value"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("case", BAD_VALUE_CASES, ids=[case_id(*c[:5], False) for c in BAD_VALUE_CASES])
def test_non_finite_input_stays_inside_its_neighbourhood(case, bad, where, backend):
    """A NaN/inf in one key or value row reaches only the queries whose window holds that key (the oracle's mask).

    A NaN (or an inf value) makes exactly those queries non-finite; an inf key may leave some of them finite (the
    softmax then puts all weight on it), but never touches another query.
    """
    spatial, ks, ss, ds, cs, token = case
    q, k, v = make_inputs(spatial, 1, 4, torch.float64, batch=1, requires_grad=False)
    target = k if where == "key" else v
    target[(0, *token, 0, 1)] = bad
    out = FNS[len(spatial)](q, k, v, ks, stride=ss, dilation=ds, is_causal=cs, backend=backend)
    if backend != "reference":  # the same rows non-finite as the reference's, and the same values elsewhere
        ref = FNS[len(spatial)](q, k, v, ks, stride=ss, dilation=ds, is_causal=cs, backend="reference")
        torch.testing.assert_close(out, ref, equal_nan=True)
    mask, _ = dense_mask_and_bias_index(spatial, ks, ss, ds, cs)
    flat = 0
    for coord, length in zip(token, spatial):
        flat = flat * length + coord
    seeing = mask[:, flat]  # [N]: queries whose window holds the bad key
    nonfinite = ~torch.isfinite(out).all(-1).reshape(-1)
    assert not (nonfinite & ~seeing).any(), "a query outside the bad key's neighbourhood became non-finite"
    if where == "value" or bad != math.inf:
        assert torch.equal(nonfinite, seeing)
    else:
        assert nonfinite.any()


@pytest.mark.parametrize("where", ["key", "value", "rpb"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("case", BAD_VALUE_CASES, ids=[case_id(*c[:5], False) for c in BAD_VALUE_CASES])
def test_non_finite_input_gives_the_references_output_and_lse_on_cpu(case, bad, where):
    """The cpu backend's output and lse equal the reference's, NaN and +-inf included, for a NaN or an infinity in a
    key, a value or the rpb (logsumexp of a row holding a +inf logit is +inf, not NaN)."""
    if cpu.unavailable_reason() is not None:
        pytest.skip(cpu.unavailable_reason())
    spatial, ks, ss, ds, cs, token = case
    q, k, v = make_inputs(spatial, 2, 4, torch.float64, batch=1, requires_grad=False)
    n = len(spatial)
    kernel = (ks,) * n if isinstance(ks, int) else ks
    if ss not in (1, (1,) * n):  # rpb is defined for stride 1 only
        if where == "rpb":
            pytest.skip("rpb needs stride 1")
        ss = 1
    rpb = torch.randn(2, *(2 * kk - 1 for kk in kernel), dtype=torch.float64)
    if where == "rpb":
        rpb[(0, *(kk - 1 for kk in kernel))] = bad  # the centre offset: every query whose window holds itself
    else:
        (k if where == "key" else v)[(0, *token, 0, 1)] = bad
    args = dict(stride=ss, dilation=ds, is_causal=cs, rpb=rpb, return_lse=True)
    out, lse = FNS[n](q, k, v, ks, backend="cpu", **args)
    ref_out, ref_lse = FNS[n](q, k, v, ks, backend="reference", **args)
    torch.testing.assert_close(out, ref_out, equal_nan=True)
    torch.testing.assert_close(lse, ref_lse, equal_nan=True)


def test_backend_switch_and_debug_log(caplog, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the interpreter would let Triton accept CPU tensors
    q = torch.randn(1, 8, 1, 4)
    with caplog.at_level(logging.DEBUG, logger="natzoo.ops.neighborhood"):
        ops.na1d(q, q, q, 3)
    auto = "cpu" if cpu.unavailable_reason() is None else "reference"
    assert f"{auto} backend (auto" in caplog.text
    with pytest.raises(ValueError, match=r"use_backend\('triton'\) asks for the Triton backend.*device=cpu"):
        with use_backend("triton"):
            ops.na1d(q, q, q, 3)
    with pytest.raises(ValueError, match=r"backend='triton' asks for the Triton backend"):
        ops.na1d(q, q, q, 3, backend="triton")
    monkeypatch.setenv("NATZOO_NA_BACKEND", "triton")
    with pytest.raises(ValueError, match=r"NATZOO_NA_BACKEND=triton \(environment variable\) asks for the Triton"):
        ops.na1d(q, q, q, 3)
    with use_backend("reference"):
        ops.na1d(q, q, q, 3)
    ops.na1d(q, q, q, 3, backend="reference")
    monkeypatch.setenv("NATZOO_NA_BACKEND", "bogus")
    with pytest.raises(ValueError, match="NATZOO_NA_BACKEND"):
        ops.na1d(q, q, q, 3)
    with pytest.raises(ValueError, match="use_backend"):
        with use_backend("cuda"):
            pass


def test_use_backend_does_not_leak_across_threads():
    """A use_backend() block in one thread leaves the choice of every other thread alone."""
    entered, release = threading.Event(), threading.Event()
    seen = {}

    def hold():
        with use_backend("triton"):
            seen["inside"] = forced_backend()
            entered.set()
            release.wait(10)

    worker = threading.Thread(target=hold)
    worker.start()
    try:
        assert entered.wait(10)
        seen["main"] = forced_backend()
        with use_backend("reference"):
            seen["main_nested"] = forced_backend()
    finally:
        release.set()
        worker.join(10)
    assert seen == {"inside": "triton", "main": None, "main_nested": "reference"}
    assert forced_backend() is None


@pytest.mark.parametrize("tile_kind", ["one", "two", "whole"])
@pytest.mark.parametrize("case", CASES[-9:], ids=[case_id(*c[:5], c[5]) for c in CASES[-9:]])
def test_reference_any_tiling_matches_oracle(case, tile_kind):
    """The reference's query tiling (halo gather) is exact for every tile size, not just the default one."""
    from natzoo.ops.neighborhood.reference import na_reference
    from natzoo.ops.neighborhood.validation import check_problem

    spatial, ks, ss, ds, cs, use_rpb = case
    n = len(spatial)
    q, k, v = make_inputs(spatial, 2, 4, torch.float64, requires_grad=False)
    rpb = torch.randn(2, *(2 * x - 1 for x in ks), dtype=torch.float64) if use_rpb else None
    tile = {"one": (1,) * n, "two": (2,) * n, "whole": tuple(length // d for length, d in zip(spatial, ds))}[tile_kind]
    problem = check_problem("test", n, q, k, v, ks, ss, ds, cs, None, rpb, None)
    out, lse = na_reference(problem, q, k, v, rpb, tile=tile)
    ref_out, ref_lse = dense_na(q, k, v, ks, ss, ds, cs, rpb=rpb)
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(lse, ref_lse, atol=1e-10, rtol=1e-10)


def test_meta_device_call_does_not_poison_the_table_cache():
    """A shape-only call under ``torch.device("meta")`` leaves real CPU tables for later calls of the same shape."""
    with torch.device("meta"):
        q = torch.randn(1, 9, 7, 1, 8)
        assert ops.na2d(q, q, q, 3, dilation=2).is_meta
    q, k, v = make_inputs((9, 7), 1, 8, torch.float64, batch=1, requires_grad=False)
    out = ops.na2d(q, k, v, 3, dilation=2)
    torch.testing.assert_close(out, dense_na(q, k, v, 3, 1, 2)[0])
