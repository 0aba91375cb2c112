"""Triton kernels against the dense float64 oracle (and the reference backend), outputs, lse and all gradients.

Without a GPU the kernels run in Triton's CPU interpreter: ``tests/conftest.py`` sets ``TRITON_INTERPRET=1`` before
anything imports ``triton.language`` (Triton decides interpreted vs compiled when the kernels are decorated), and the
module fixture below checks that it took effect. With a GPU the same tests run on CUDA. Shapes are tiny and
``head_dim`` is mostly 16 to keep the interpreter fast; the interpreter's tiles (``tiling._INTERPRETER_CONFIGS``)
are smaller than the maps so that every kernel walks several, partly filled query and key tiles, and
`test_other_tile_shapes` reruns a few cases with the other tile kinds (one-wide and two-dimensional sub-tiles).
"""

from __future__ import annotations

import importlib
import itertools
import math
import os

import pytest
import torch
import triton
from natzoo.ops.neighborhood.dispatch import use_backend
from natzoo.ops.neighborhood.triton import tiling
from oracle import case_id, dense_mask_and_bias_index, dense_na

from natzoo import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Tolerances against the float64 oracle (docs/kernels.md): (out/lse atol=rtol, dq/dk/dv atol=rtol, d_rpb relative L2)
TOL = {
    torch.float32: (1e-5, 1e-4, 1e-5),
    torch.float16: (2e-3, 1e-2, 5e-3),
    torch.bfloat16: (1.6e-2, 5e-2, 2e-2),
}


@pytest.fixture(scope="module", autouse=True)
def _interpreter():
    """On CPU: makes sure the kernels run in Triton's interpreter (conftest turned it on before any import)."""
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


# (spatial, kernel_size, stride, dilation, is_causal, rpb, batch, heads): every window-arithmetic situation of
# docs/ops.md appears at least once (odd/even k, stride, dilation not dividing the length, causal, L = k, L = k * d).
CASES = [
    ((13,), 3, 1, 1, False, True, 2, 1),  # odd k, rpb, B=2
    ((10,), 4, 4, 1, False, False, 1, 3),  # even k, s = k not dividing L, H=3
    ((10,), 4, 2, 1, True, False, 1, 1),  # 1 < s < k, causal
    ((13,), 3, 1, 4, False, True, 1, 1),  # L=13, d=4 (not divisible), rpb dilated
    ((10,), 3, 1, 3, True, True, 1, 1),  # L=10, d=3, causal rpb dilated
    ((8,), 4, 1, 2, False, True, 1, 1),  # L = k*d: full attention within each group, even k rpb
    ((5,), 5, 5, 1, True, False, 1, 1),  # L = k, s = k, causal
    ((37,), 5, 3, 2, True, False, 1, 1),  # odd length, several 16-query tiles, 1 < s < k, dilation, causal
    ((13, 9), (4, 3), (2, 1), (2, 3), (True, False), False, 1, 1),  # stride and dilation on both axes, mixed causal
    ((9, 11), (3, 4), 1, (2, 1), (False, True), True, 1, 1),  # even/odd k, mixed causal, rpb
    ((7, 6), (7, 2), 1, 1, True, True, 1, 1),  # L = k on axis 0, all causal, rpb
    ((10, 10), (4, 4), (4, 4), 1, False, False, 1, 1),  # s = k not dividing L
    ((4, 5, 6), (2, 4, 3), (1, 2, 3), (2, 1, 2), (True, False, True), False, 1, 1),  # 3D, mixed everything
    ((4, 6, 5), (2, 3, 3), 1, (2, 1, 1), (False, False, True), True, 1, 1),  # 3D rpb, mixed causal, dilation
]


@pytest.mark.parametrize(
    "spatial,kernel_size,stride,dilation,is_causal,rpb,batch,heads",
    # the 3-D cases cost the most in the interpreter: left out of the fast subset (`-m "not slow"`), run by CI
    [pytest.param(*c, id=case_id(c[0], c[1], c[2], c[3], c[4], c[5]),
                  marks=[pytest.mark.slow] if len(c[0]) == 3 else []) for c in CASES],
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
    """Logits around +-30 with a custom scale: the online max subtraction must hold."""
    run_case((11,), 4, 1, 1, False, rpb=True, scale=0.5, q_gain=2.5)
    run_case((9,), 3, 2, 1, True, rpb=False, scale=0.0)


def test_gradient_into_lse_only(nan_empty):
    """Only lse feeds the loss: d_out is None in the backward, so Delta = -dLSE."""
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
    """A forced Triton backend that cannot run a problem names `backend='triton'` and the failing property."""
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_deterministic_drpb_matches_oracle():
    """Under deterministic algorithms (fixed config, per-program partial tables summed in order) d_rpb is exact too."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        run_case((9, 11), (3, 4), 1, (2, 1), (False, True), rpb=True, batch=2, heads=2)
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.fixture
def tile_configs(monkeypatch):
    """Replaces the interpreter's tile configs for one test: ``tile_configs(kind=(tq, tk), ...)`` per rank."""

    def use(rank, **entries):
        for kind, (tq, tk) in entries.items():
            table = {**tiling._INTERPRETER_CONFIGS[kind], rank: [(tq, tk, 1, 1)]}
            monkeypatch.setitem(tiling._INTERPRETER_CONFIGS, kind, table)

    yield use


# The other tile kind of every kernel: two-dimensional key sub-tiles in the forward, one-wide ones in dQ (its rpb
# reduction then runs with contractions below 16, which only the interpreter accepts) and dK/dV.
OTHER_TILES = {
    2: {"fwd": ((2, 4, 1), (4, 4, 1)), "dq": ((2, 8, 1), (1, 8, 1)), "dkdv": ((4, 4, 1), (4, 4, 1))},
    3: {"fwd": ((1, 2, 8), (2, 2, 4)), "dq": ((2, 2, 4), (1, 2, 8)), "dkdv": ((2, 2, 4), (1, 2, 8))},
}


@pytest.mark.slow
@pytest.mark.parametrize(
    "spatial,kernel_size,stride,dilation,is_causal,rpb",
    [((9, 11), (3, 4), 1, (2, 1), (False, True), True), ((13, 9), (4, 3), (2, 1), (2, 3), (True, False), False),
     ((4, 6, 5), (2, 3, 3), 1, (2, 1, 1), (False, False, True), True)],
    ids=["n2-rpb", "n2-stride", "n3-rpb"],
)
def test_other_tile_shapes(nan_empty, tile_configs, spatial, kernel_size, stride, dilation, is_causal, rpb):
    if DEVICE == "cuda":
        pytest.skip("interpreter tile configs")
    tile_configs(len(spatial), **OTHER_TILES[len(spatial)])
    run_case(spatial, kernel_size, stride, dilation, is_causal, rpb, heads=2)


def _rows(mask: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask).flatten().tolist())


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("where,bad", [("v", float("nan")), ("v", float("inf")), ("k", float("nan"))],
                         ids=["v-nan", "v-inf", "k-nan"])
def test_non_finite_key_or_value_stays_in_its_neighbourhood(where, bad):
    """A NaN/inf in one key or value makes non-finite exactly the outputs whose window contains that key.

    The set is computed independently from the oracle's window rule; every other row equals the oracle on the
    sanitised inputs. Gradients follow the chain rule: dQ rows of those queries, dK rows (and dV rows for a bad key)
    of every key in their windows; a bad value leaves dV finite.
    """
    spatial, ks, dil, causal = (7, 9), (3, 4), (2, 1), (False, True)
    batch, heads, dim, bad_b, bad_h, bad_key = 2, 2, 16, 1, 0, (3, 4)
    q, k, v = _inputs((batch, *spatial, heads, dim), torch.float32, "contiguous")
    bias = (torch.randn(heads, 5, 7, device=DEVICE) * 0.5).requires_grad_()
    clean = [t.detach().clone() for t in (q, k, v)]
    with torch.no_grad():
        {"k": k, "v": v}[where][(bad_b, *bad_key, bad_h, 5)] = bad
    out, lse = ops.na2d(q, k, v, ks, dilation=dil, is_causal=causal, rpb=bias, return_lse=True, backend="triton")
    grad_out = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], grad_out)

    mask, _ = dense_mask_and_bias_index(spatial, ks, 1, dil, causal)
    j = bad_key[0] * spatial[1] + bad_key[1]
    attending = mask[:, j]  # queries whose window holds the bad key
    touched = mask[attending].any(0)  # keys in the window of any such query
    expect = {"out": attending, "lse": attending if where == "k" else torch.zeros_like(attending), "dq": attending,
              "dk": touched, "dv": touched if where == "k" else torch.zeros_like(touched)}
    ref = [t.double().requires_grad_() for t in clean]
    ref_out, ref_lse = dense_na(*ref, ks, 1, dil, causal, rpb=bias.detach().double())
    ref_grads = torch.autograd.grad(ref_out, ref, grad_out.double())
    got = {"out": out, "lse": lse[..., None], "dq": dq, "dk": dk, "dv": dv}
    refs = {"out": ref_out, "lse": ref_lse[..., None], "dq": ref_grads[0], "dk": ref_grads[1], "dv": ref_grads[2]}
    for name, tensor in got.items():
        rows = tensor.flatten(1, 2)  # [B, N, H, D]
        bad_rows = ~torch.isfinite(rows).all(-1)
        want = torch.zeros_like(bad_rows)
        want[bad_b, :, bad_h] = expect[name]
        assert _rows(bad_rows[bad_b, :, bad_h]) == _rows(want[bad_b, :, bad_h]), name
        assert not bad_rows[~want].any(), f"{name}: non-finite rows outside the bad key's neighbourhood"
        ref_rows = refs[name].flatten(1, 2)
        torch.testing.assert_close(rows[~want].double(), ref_rows.detach()[~want], atol=1e-4, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


class _LaunchSpy:
    """Records the constexpr flags of every autotuned kernel launch (kernel name -> kwargs)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = triton.runtime.autotuner.Autotuner.run

        def run(tuner, *args, **kwargs):
            self.calls.append((tuner.base_fn.__name__, kwargs))
            return real(tuner, *args, **kwargs)

        monkeypatch.setattr(triton.runtime.autotuner.Autotuner, "run", run)

    def flags(self, kernel: str) -> list[dict]:
        return [kw for name, kw in self.calls if name == kernel]


@pytest.mark.parametrize("needed", [("q",), ("k", "v"), ("rpb",), ("v",)], ids="-".join)
def test_gradients_only_where_needed(monkeypatch, needed):
    """``needs_input_grad`` is honoured: no dQ, d_rpb or dK/dV work unless asked for, the rest still exact."""
    spy = _LaunchSpy(monkeypatch)
    q, k, v = (t.detach() for t in _inputs((1, 6, 7, 2, 16), torch.float32, "contiguous"))
    bias = torch.randn(2, 5, 5, device=DEVICE) * 0.5
    leaves = {"q": q, "k": k, "v": v, "rpb": bias}
    for name in needed:
        leaves[name].requires_grad_()
    out = ops.na2d(q, k, v, 3, dilation=(2, 1), rpb=bias, backend="triton")
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [leaves[n] for n in needed], grad_out)
    ref = {n: t.detach().double().requires_grad_(n in needed) for n, t in leaves.items()}
    ref_out, _ = dense_na(ref["q"], ref["k"], ref["v"], 3, 1, (2, 1), rpb=ref["rpb"])
    ref_grads = torch.autograd.grad(ref_out, [ref[n] for n in needed], grad_out.double())
    for name, got, want in zip(needed, grads, ref_grads):
        _assert_close(name, got, want, 1e-4)
    (dq_flags,) = spy.flags("_na_bwd_dq_kernel")
    assert dq_flags["COMPUTE_DQ"] == ("q" in needed)
    assert dq_flags["COMPUTE_DRPB"] == ("rpb" in needed)
    assert dq_flags["STORE_DELTA"] == bool({"k", "v"} & set(needed))
    dkdv = spy.flags("_na_bwd_dkdv_kernel")
    assert len(dkdv) == int(bool({"k", "v"} & set(needed)))
    for flags in dkdv:
        assert (flags["COMPUTE_DK"], flags["COMPUTE_DV"]) == ("k" in needed, "v" in needed)


def test_autotune_modes(monkeypatch):
    """``NATZOO_NA_AUTOTUNE`` restricts the search space; deterministic algorithms pin the first config."""
    monkeypatch.setattr(tiling, "interpreting", lambda: False)
    full = tiling.config_entries("fwd", 2, "full")
    assert tiling.config_entries("fwd", 2, "quick") == full[:2]
    assert tiling.config_entries("fwd", 2, "off") == full[:1]
    monkeypatch.setenv(tiling.ENV_AUTOTUNE, "quick")
    assert tiling.autotune_mode() == "quick"
    monkeypatch.setenv(tiling.ENV_AUTOTUNE, "fastest")
    with pytest.raises(ValueError, match="NATZOO_NA_AUTOTUNE must be one of full, quick, off, got 'fastest'"):
        tiling.autotune_mode()
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert tiling.autotune_mode() == "off"
    finally:
        torch.use_deterministic_algorithms(previous)


@pytest.mark.parametrize("kind", ["fwd", "dq", "dkdv"])
def test_gpu_config_tables_follow_the_dot_rules(kind):
    """Every GPU config compiles for tl.dot (contractions >= 16, power-of-two tiles, dummy axes one wide), and the
    first dQ config (the quick, off and deterministic choice) can reduce the rpb gradient with tensor-core products."""
    for rank, hd_class in itertools.product((1, 2, 3), tiling.HEAD_DIM_CLASSES):
        entries = tiling.search_space(kind, rank, hd_class)
        for tq, tk, warps, stages, *cap in entries:
            for tile in (tq, tk):
                assert all(t == 1 for t in tile[rank:]), (kind, rank, tile)
                assert all(t & (t - 1) == 0 for t in tile), (kind, rank, tile)
            contraction = math.prod(tq) if kind == "dkdv" else math.prod(tk)
            assert contraction >= 16, (kind, rank, tq, tk)
            assert warps in (1, 2, 4, 8) and stages >= 1 and all(64 <= c <= 255 for c in cap)
            if kind == "dq" and rank > 1 and tiling.rpb_products_ok(tq, tk, rank):
                assert tiling.diagonals(tq, tk, rank) >= 16
        if kind == "dq":
            assert tiling.rpb_products_ok(*entries[0][:2], rank), rank
