"""The cpu backend beyond the shared oracle tests of tests/test_ops_reference.py: dispatch, the build and its
fallback, threads, non-contiguous inputs, empty batches, ``torch.compile`` and ``torch.export``.

The kernels are compiled once per machine (cached); the fallback tests build into temporary folders.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from natzoo.ops.neighborhood import cpu, dispatch
from natzoo.ops.neighborhood.cpu import build
from natzoo.ops.neighborhood.dispatch import select_backend, use_backend
from natzoo.ops.neighborhood.validation import check_problem
from oracle import dense_na

from natzoo import ops

needs_kernels = pytest.mark.skipif(cpu.unavailable_reason() is not None, reason="the CPU kernels did not build")


def _problem(q, ks=3, dropout_p=0.0):
    n = q.dim() - 3
    return check_problem(f"na{n}d", n, q, q, q, ks, 1, 1, False, None, None, None)


@needs_kernels
def test_auto_picks_cpu_and_leaves_dropout_meta_and_export_to_the_reference(caplog):
    q = torch.randn(1, 9, 2, 8)
    with caplog.at_level(logging.DEBUG, logger="natzoo.ops.neighborhood"):
        assert select_backend(_problem(q), None) == "cpu"
        assert select_backend(_problem(q), None, dropout_p=0.1) == "reference"
    assert "na1d: cpu backend (auto)" in caplog.text and "reference backend (dropout_p=0.1)" in caplog.text
    assert select_backend(_problem(q.to("meta")), None) == "reference"
    with pytest.raises(ValueError, match=r"backend='cpu' asks for the cpu backend, which cannot run this problem: "
                                         r"device=meta is not the CPU"):
        select_backend(_problem(q.to("meta")), "cpu")
    with pytest.raises(ValueError, match=r"use_backend\('cpu'\) asks for the cpu backend, which has no attention "
                                         r"dropout"), use_backend("cpu"):
        select_backend(_problem(q), None, dropout_p=0.1)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs_and_threads(dtype):
    """Slices of a fused qkv tensor; the result is independent of torch's thread count (forward bit for bit)."""
    base = torch.randn(2, 7, 9, 3, 2, 8).to(dtype)
    q, k, v = base.unbind(3)  # [2, 7, 9, 2, 8], non-contiguous
    rpb = torch.randn(2, 5, 5)
    want = dense_na(q, k, v, 3, 1, (2, 1), False, rpb=rpb)[0]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb, backend="cpu")
        torch.set_num_threads(2)
        two = ops.na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb, backend="cpu")
    finally:
        torch.set_num_threads(before)
    assert one.dtype == dtype and torch.equal(one, two)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(one.double(), want, atol=tol, rtol=tol)


# Shapes that reach every branch of the vector kernels in float32 (the float64 oracle suite has small maps): rows
# wider than one lane tile (16 floats) with a partial last tile, row blocks of 3 with one or two rows left over,
# border tiles with up to 2k-1 shifts, whole-window units (kernel = map: 7x7; 28x28 with dilation 4; uneven dilation
# groups of which some are whole), stride, causal, 1-D and 3-D, head_dim not a multiple of 8.
LAYER_CASES = [  # spatial, kernel, stride, dilation, causal, rpb, head_dim
    ((23, 37), 7, 1, 1, False, True, 32),
    ((28, 28), 7, 1, 4, False, True, 32),
    ((7, 7), 7, 1, 1, False, True, 32),
    ((17, 22), (5, 3), (2, 3), (3, 2), (True, False), False, 20),
    ((10, 41), 5, 1, (2, 1), (False, True), False, 16),
    ((6, 12, 19), 3, 1, (1, 4, 6), False, True, 12),
    ((200,), 13, 1, 3, False, True, 24),
]


@needs_kernels
@pytest.mark.parametrize("case", LAYER_CASES, ids=[f"{c[0]}-k{c[1]}-s{c[2]}-d{c[3]}" for c in LAYER_CASES])
def test_layer_shapes_float32_against_the_oracle(case):
    spatial, ks, st, dil, causal, use_rpb, head_dim = case
    n, heads = len(spatial), 2
    fn = getattr(ops, f"na{n}d")
    kernel = ks if isinstance(ks, tuple) else (ks,) * n
    gen = torch.Generator().manual_seed(len(spatial) * 1000 + sum(spatial))
    base = torch.randn(2, *spatial, 3, heads, head_dim, generator=gen, dtype=torch.float64)
    rpb = torch.randn(heads, *(2 * k - 1 for k in kernel), generator=gen, dtype=torch.float64) if use_rpb else None
    d_out = torch.randn(2, *spatial, heads, head_dim, generator=gen, dtype=torch.float64)
    d_lse = torch.randn(2, *spatial, heads, generator=gen, dtype=torch.float64)
    inputs = [t.requires_grad_() for t in (base.clone(), *([rpb.clone()] if use_rpb else []))]
    q, k, v = inputs[0].unbind(-3)
    want = dense_na(q, k, v, ks, st, dil, causal, rpb=inputs[1] if use_rpb else None)
    want_grads = torch.autograd.grad((want[0] * d_out).sum() + (want[1] * d_lse).sum(), inputs)
    # float32 views of one packed [B, *S, 3, H, D] tensor, as a qkv projection gives them (read in place)
    got_inputs = [t.detach().float().requires_grad_() for t in inputs]
    q32, k32, v32 = got_inputs[0].unbind(-3)
    assert not q32.is_contiguous()
    out, lse = fn(q32, k32, v32, ks, stride=st, dilation=dil, is_causal=causal,
                  rpb=got_inputs[1] if use_rpb else None, return_lse=True, backend="cpu")
    grads = torch.autograd.grad((out.double() * d_out).sum() + (lse.double() * d_lse).sum(), got_inputs)
    torch.testing.assert_close(out.double(), want[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), want[1], atol=1e-5, rtol=1e-5)
    for name, g, r in zip(("dqkv", "d_rpb"), grads, want_grads):
        scale = float(r.abs().max())
        torch.testing.assert_close(g.double() / scale, r / scale, atol=2e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


@needs_kernels
def test_scratch_kept_between_calls_never_leaks_into_the_next_call():
    """The kernels keep their packed buffers between calls and zero them only when the layout changes: a call with
    head_dim 4 after one with head_dim 8 (the same padded layout) must not see the earlier call's values."""
    gen = torch.Generator().manual_seed(3)
    for head_dim in (8, 4, 8, 3):
        q, k, v = (torch.randn(1, 9, 21, 2, head_dim, generator=gen) * 4 for _ in range(3))
        out = ops.na2d(q, k, v, 5, backend="cpu")
        torch.testing.assert_close(out.double(), dense_na(q, k, v, 5)[0], atol=1e-5, rtol=1e-5)


@needs_kernels
@pytest.mark.parametrize("n", [1, 2, 3])
def test_empty_batch(n):
    spatial, heads = (6, 5, 4)[:n], 2
    q, k, v = (torch.randn(0, *spatial, heads, 8, requires_grad=True) for _ in range(3))
    rpb = torch.randn(heads, *(5,) * n, requires_grad=True)
    out, lse = getattr(ops, f"na{n}d")(q, k, v, 3, rpb=rpb, return_lse=True, backend="cpu")
    assert out.shape == q.shape and lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    (out.sum() + lse.sum()).backward()
    assert all(t.grad.shape == t.shape for t in (q, k, v)) and rpb.grad.shape == rpb.shape and not rpb.grad.any()


@needs_kernels
def test_second_order_gradients_are_refused_not_wrong():
    q, k, v = (torch.randn(1, 8, 1, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = ops.na1d(q, k, v, 3, backend="cpu")
    (gq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(gq.sum(), k)


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """An empty kernel cache and a cleared loader: the next dispatch builds again (then the real cache is reloaded)."""
    monkeypatch.setenv("NATZOO_CACHE_DIR", str(tmp_path))
    build.load.cache_clear()
    yield tmp_path
    build.load.cache_clear()


def _fallback_runs_the_reference():
    q = torch.randn(1, 9, 2, 8, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert select_backend(_problem(q), None) == "reference"
        out = ops.na1d(q, q, q, 3)
        with pytest.raises(RuntimeError, match=r"backend='cpu' asks for the cpu backend, which is unavailable: the "
                                               r"CPU kernels could not be built"):
            ops.na1d(q, q, q, 3, backend="cpu")
    torch.testing.assert_close(out, dense_na(q, q, q, 3)[0])
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "backend='reference' instead" in messages[0], messages
    return messages[0]


def test_missing_compiler_gives_one_warning_and_the_reference(fresh_build, monkeypatch):
    monkeypatch.setenv("CXX", str(fresh_build / "no-such-compiler"))
    assert "no-such-compiler" in _fallback_runs_the_reference()
    assert not list(fresh_build.rglob("*.so"))


def test_compile_error_gives_one_warning_and_the_reference(fresh_build, monkeypatch):
    if build.find_compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    broken = fresh_build / "broken.cpp"
    broken.write_text("this is not C++;\n")
    monkeypatch.setattr(build, "SOURCE", broken)
    monkeypatch.delenv("NATZOO_CPU_ARCH", raising=False)
    assert "failed (exit" in _fallback_runs_the_reference()
    assert not [p for p in fresh_build.rglob("*") if p.name != "broken.cpp" and p.is_file()]  # no temporary left


def test_a_cpu_arch_the_compiler_refuses_is_named_in_the_one_warning(fresh_build, monkeypatch):
    if build.find_compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    monkeypatch.setenv("NATZOO_CPU_ARCH", "not-a-cpu")
    assert "failed with NATZOO_CPU_ARCH='not-a-cpu' (-march=not-a-cpu) (exit" in _fallback_runs_the_reference()


@needs_kernels
def test_build_is_cached_by_source_and_written_once(tmp_path):
    compiler = build.find_compiler()
    source = build.SOURCE.read_text()
    first = build.build(source, compiler, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert build.build(source, compiler, tmp_path) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]
    assert build.build(source + "\n// changed\n", compiler, tmp_path) != first


@needs_kernels
def test_compiled_layer_is_one_graph_holding_the_operator():
    """Under torch.compile the cpu backend is one opaque operator (forward and backward) of a whole graph."""
    layer = ops.NeighborhoodAttention2D(16, 2, kernel_size=3, dilation=(1, 2), rel_pos_bias=True).eval()
    x = torch.randn(2, 7, 8, 16)
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0 and "natzoo.na_cpu" in explanation.graphs[0].code
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), layer(x), atol=1e-5, rtol=1e-5)
    compiled(x).square().sum().backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    layer(x).square().sum().backward()
    for got, p in zip(grads, layer.parameters()):
        torch.testing.assert_close(got, p.grad, atol=1e-4, rtol=1e-4)


@needs_kernels
def test_opcheck_of_the_operators():
    q, k, v = (torch.randn(1, 6, 5, 2, 4, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 3, requires_grad=True)
    window = ([3, 2], [1, 1], [2, 1], [False, True], 0.5)
    torch.library.opcheck(torch.ops.natzoo.na_cpu.default, (q, k, v, rpb, *window))
    out, lse = torch.ops.natzoo.na_cpu(q, k, v, rpb, *window)
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    plain = [t.detach() for t in (q, k, v, rpb)]
    torch.library.opcheck(torch.ops.natzoo.na_cpu_backward.default, (g, gl, *plain, lse.detach(), *window))


@needs_kernels
def test_export_traces_the_reference_not_the_kernels():
    layer = ops.NeighborhoodAttention2D(16, 2, kernel_size=3).eval()
    x = torch.randn(1, 6, 6, 16)
    program = torch.export.export(layer, (x,))
    code = program.graph_module.code
    assert "na_cpu" not in code and "na_reference" not in code
    torch.testing.assert_close(program.module()(x), layer(x), atol=1e-5, rtol=1e-5)
