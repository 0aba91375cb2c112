"""``torch.compile`` of the reference path: the ``natzoo::na_reference`` custom operator and whole models on the CPU.

The operator's forward and registered backward are checked eagerly against the dense float64 oracle (cheap); the
compiled models (inductor, which builds C++ on the CPU) against the same models run eagerly, marked ``slow``.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from natzoo.models import NAT  # noqa: F401  (registers the natzoo models on timm)
from natzoo.ops import NeighborhoodAttention2D
from natzoo.ops.neighborhood import reference_op
from natzoo.ops.neighborhood.dispatch import use_backend
from natzoo.ops.neighborhood.reference_op import na_reference_op
from natzoo.ops.neighborhood.validation import check_problem
from oracle import case_id, dense_na
from test_ops_reference import CASES, TOL, make_inputs, rel_l2

FIXED = CASES[-9:]  # the fixed window cases of the reference tests: causal, strided, dilated, 1/2/3-D, rpb
TINY = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "kernel_size": 3, "num_classes": 10,
        "drop_path_rate": 0.0}


def _problem(q, k, v, case, rpb):
    spatial, ks, ss, ds, cs, _ = case
    return check_problem("test", len(spatial), q, k, v, ks, ss, ds, cs, None, rpb, None)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", FIXED, ids=[case_id(*c[:5], c[5]) for c in FIXED])
def test_operator_forward_and_registered_backward_match_the_oracle(case, dtype):
    """The custom operator (run eagerly here) and its backward operator against the dense float64 oracle."""
    spatial, ks, ss, ds, cs, use_rpb = case
    q, k, v = make_inputs(spatial, 2, 4, dtype)
    rpb = (torch.randn(2, *(2 * x - 1 for x in ks), dtype=dtype) * 0.5).requires_grad_() if use_rpb else None
    out, lse = na_reference_op(_problem(q, k, v, case, rpb), q, k, v, rpb, 0.0, None, True)
    ref_out, ref_lse = dense_na(q, k, v, ks, ss, ds, cs, rpb=rpb)
    tol, gtol, rtol_rpb = TOL[dtype]
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)
    d_out, d_lse = torch.randn_like(ref_out), torch.randn_like(ref_lse)
    inputs = [q, k, v] + ([rpb] if rpb is not None else [])
    grads = torch.autograd.grad((out.double() * d_out).sum() + (lse.double() * d_lse).sum(), inputs)
    ref_grads = torch.autograd.grad((ref_out * d_out).sum() + (ref_lse * d_lse).sum(), inputs)
    for name, g, r, x in zip(("dq", "dk", "dv", "d_rpb"), grads, ref_grads, inputs):
        assert g.dtype == x.dtype and g.shape == x.shape, name
    for name, g, r in zip(("dq", "dk", "dv"), grads[:3], ref_grads[:3]):
        torch.testing.assert_close(g.double(), r.double(), atol=gtol, rtol=gtol,
                                   msg=lambda m, name=name: f"{name}: {m}")
    if rpb is not None:
        assert rel_l2(grads[3], ref_grads[3]) < rtol_rpb


def test_operator_gradient_of_lse_alone_and_of_out_alone():
    case = FIXED[4]  # 2-D, causal on one axis, strided, dilated
    q, k, v = make_inputs(case[0], 1, 4, torch.float64)
    problem = _problem(q, k, v, case, None)
    ref_out, ref_lse = dense_na(q, k, v, *case[1:5])
    for pick in (0, 1):
        got = na_reference_op(problem, q, k, v, None, 0.0, None, True)[pick]
        grads = torch.autograd.grad(got.sum(), (q, k, v))
        ref_grads = torch.autograd.grad((ref_out, ref_lse)[pick].sum(), (q, k, v), retain_graph=True,
                                        materialize_grads=True)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, atol=1e-9, rtol=1e-9)
    out, lse = na_reference_op(problem, q, k, v, None, 0.0, None, False)
    assert lse is None
    torch.testing.assert_close(out, ref_out, atol=1e-10, rtol=1e-10)


def test_operator_dropout_backward_draws_the_forward_mask():
    """With a fixed seed the operator is a deterministic function; gradcheck then proves the backward's mask is the
    forward's (a fresh mask would give other gradients)."""
    q, k, v = make_inputs((5, 4), 1, 2, torch.float64, batch=1)
    rpb = torch.randn(1, 5, 5, dtype=torch.float64, requires_grad=True)
    seed = torch.tensor(1234)

    def fn(q, k, v, rpb, p=0.5):
        return reference_op._forward(q, k, v, rpb, seed, [3, 3], [1, 1], [1, 2], [False, False], 0.7, p, [], True)

    out = fn(q, k, v, rpb)[0]
    torch.testing.assert_close(out, fn(q, k, v, rpb)[0], rtol=0, atol=0)
    assert not torch.allclose(out, fn(q, k, v, rpb, 0.0)[0])  # the mask drops something
    assert torch.autograd.gradcheck(fn, (q, k, v, rpb))


def test_operator_registration_passes_opcheck():
    """Schema, fake implementation (shapes and strides), autograd registration and tracing with dynamic shapes."""
    q, k, v = make_inputs((6, 7), 2, 4, torch.float64)
    rpb = torch.randn(2, 5, 5, dtype=torch.float64, requires_grad=True)
    window = ([3, 3], [1, 1], [1, 2], [False, True], 0.5)
    torch.library.opcheck(reference_op._forward, (q, k, v, rpb, None, *window, 0.0, [], True))
    torch.library.opcheck(reference_op._forward, (q, k, v, None, torch.tensor(7), *window, 0.3, [2, 2], False))
    g = torch.randn(q.shape, dtype=torch.float64)
    plain = [t.detach() for t in (q, k, v, rpb)]
    torch.library.opcheck(reference_op._backward, (g, None, *plain, None, *window, 0.0, []))


def test_empty_batch_flows_through_the_operator():
    q, k, v = (torch.randn(0, 6, 5, 2, 8, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    problem = check_problem("test", 2, q, k, v, 3, 1, 1, False, None, rpb, None)
    out, lse = na_reference_op(problem, q, k, v, rpb, 0.0, None, True)
    (out.sum() + lse.sum()).backward()
    assert out.shape == q.shape and lse.shape == (0, 6, 5, 2)
    assert all(t.grad.shape == t.shape for t in (q, k, v)) and not rpb.grad.any()


def test_compiled_model_is_one_graph_holding_the_operator():
    """Under torch.compile the reference is one node of a whole graph (no graph break per attention call, which
    made dynamo retrace the blocks after each call with symbolic shapes on the first call)."""
    model = timm.create_model("nat_mini", **TINY).eval()
    with use_backend("reference"):  # auto picks the compiled CPU kernels when they build (tests/test_ops_cpu.py)
        explanation = torch._dynamo.explain(model)(torch.randn(2, 3, 32, 32))
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    code = explanation.graphs[0].code
    assert code.count("natzoo.na_reference") == 4, code  # one per block


def test_compiled_layer_trains_with_attention_dropout():
    """attn_drop > 0 in training mode: the operator draws a fresh mask per call, and the backward runs."""
    layer = NeighborhoodAttention2D(8, 2, kernel_size=3, rel_pos_bias=True, attn_drop=0.5).train()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 5, 6, 8)
    first, second = compiled(x), compiled(x)
    assert not torch.equal(first, second)
    (first.sum() + second.sum()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


def _train_step(run, model, x, target):
    """Loss and gradients of one step of `run` (the compiled wrapper or the model itself) on `model`'s weights."""
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(run(x), target)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def _check_against_eager(compiled, model, eager, sizes, train=True):
    """Eval outputs (and a training step's loss and gradients) of `compiled` (wrapping `model`) against `eager`."""
    for batch, size in sizes:
        x, target = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
        model.eval(), eager.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), eager(x), atol=1e-4, rtol=1e-4)
        if not train:
            continue
        model.train(), eager.train()
        loss, grads = _train_step(compiled, model, x, target)
        ref_loss, ref_grads = _train_step(eager, eager, x, target)
        torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-4)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-4, rtol=1e-3,
                                       msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.slow
def test_plain_torch_compile_with_inductor_evaluates_and_trains():
    """``torch.compile(model)``, default inductor backend: eval forward and a training step on the CPU, then another
    batch size (a recompilation with a dynamic batch). Before the custom operator this failed on the first call with
    "InductorError ... cannot determine truth value of Relational"."""
    model = timm.create_model("nat_mini", **TINY)
    eager = copy.deepcopy(model)
    _check_against_eager(torch.compile(model), model, eager, [(2, 32), (3, 32)])


@pytest.mark.slow
def test_torch_compile_with_dynamic_shapes_evaluates():
    """``torch.compile(model, dynamic=True)``: symbolic batch and spatial sizes from the first call, two sizes.

    Evaluation only: a training graph compiled with every size symbolic from the start fails inside inductor on the
    MLP activations it saves for the backward (docs/ops.md, "torch.compile"), outside this project's code."""
    model = timm.create_model("nat_mini", **TINY)
    eager = copy.deepcopy(model)
    _check_against_eager(torch.compile(model, dynamic=True), model, eager, [(2, 32), (3, 48)], train=False)
