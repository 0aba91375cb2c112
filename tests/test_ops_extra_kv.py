"""Extra key/value tokens and GQA/MQA in the fused op, reference and Triton backends, against the float64 oracle.

Without a GPU the Triton backend runs in Triton's CPU interpreter (tests/conftest.py turns it on); shapes are tiny.
"""

from __future__ import annotations

import pytest
import torch
from oracle import dense_na

from natzoo import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (spatial, kernel_size, dilation, is_causal, rpb, heads, heads_kv, n_extra)
CASES = [
    ((9,), 3, 1, False, True, 2, 2, 3),  # extra tokens only
    ((10,), 4, 2, True, True, 4, 2, 0),  # GQA only, causal, even k
    ((11,), 3, 3, False, False, 4, 1, 2),  # MQA and extra tokens, dilation not dividing L
    ((6, 5), (3, 2), (2, 1), (False, True), True, 2, 1, 4),  # 2D, mixed causal, rpb on neighbours only
    ((4, 4, 5), (2, 3, 3), (2, 1, 1), (True, False, False), False, 2, 2, 1),  # 3D
]
IDS = [f"n{len(c[0])}-h{c[5]}kv{c[6]}-e{c[7]}" + ("-rpb" if c[4] else "") for c in CASES]


def _inputs(spatial, kernel_size, rpb, heads, heads_kv, n_extra, dtype, head_dim, batch=2):
    n = len(spatial)
    ks = kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * n

    def leaf(*shape):
        return torch.randn(*shape, device=DEVICE).to(dtype).requires_grad_()

    q = leaf(batch, *spatial, heads, head_dim)
    k, v = leaf(batch, *spatial, heads_kv, head_dim), leaf(batch, *spatial, heads_kv, head_dim)
    ek = ev = None
    if n_extra:
        ek, ev = leaf(batch, n_extra, heads_kv, head_dim), leaf(batch, n_extra, heads_kv, head_dim)
    rpb_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    bias = None
    if rpb:
        bias = (torch.randn(heads, *(2 * x - 1 for x in ks), device=DEVICE) * 0.5).to(rpb_dtype).requires_grad_()
    return q, k, v, bias, ek, ev


def _check(backend, spatial, kernel_size, dilation, is_causal, rpb, heads, heads_kv, n_extra, dtype, head_dim, tol,
           batch=2):
    q, k, v, bias, ek, ev = _inputs(spatial, kernel_size, rpb, heads, heads_kv, n_extra, dtype, head_dim, batch)
    fn = getattr(ops, f"na{len(spatial)}d")
    window = dict(kernel_size=kernel_size, dilation=dilation, is_causal=is_causal)
    out, lse = fn(q, k, v, **window, rpb=bias, additional_keys=ek, additional_values=ev, return_lse=True,
                  backend=backend)
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == q.shape[:-1]
    leaves = [t for t in (q, k, v, bias, ek, ev) if t is not None]
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    names = [name for name, t in zip(("q", "k", "v", "rpb", "ek", "ev"), (q, k, v, bias, ek, ev)) if t is not None]
    by_name = dict(zip(names, ref_leaves))
    ref_out, ref_lse = dense_na(by_name["q"], by_name["k"], by_name["v"], **window, rpb=by_name.get("rpb"),
                                additional_keys=by_name.get("ek"), additional_values=by_name.get("ev"))
    torch.testing.assert_close(out.double(), ref_out.detach(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse.detach(), atol=tol, rtol=tol)
    g_out, g_lse = torch.randn(out.shape, device=DEVICE), torch.randn(lse.shape, device=DEVICE)
    loss = (out.double() * g_out.double()).sum() + (lse.double() * g_lse.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    ref_grads = torch.autograd.grad((ref_out * g_out.double()).sum() + (ref_lse * g_lse.double()).sum(), ref_leaves)
    for name, got, want in zip(by_name, grads, ref_grads):
        assert got.shape == want.shape, name
        torch.testing.assert_close(got.double(), want, atol=10 * tol, rtol=10 * tol, msg=f"gradient of {name}")


@pytest.mark.parametrize("spatial,kernel_size,dilation,is_causal,rpb,heads,heads_kv,n_extra", CASES, ids=IDS)
def test_reference_backend_matches_oracle(spatial, kernel_size, dilation, is_causal, rpb, heads, heads_kv, n_extra):
    _check("reference", spatial, kernel_size, dilation, is_causal, rpb, heads, heads_kv, n_extra, torch.float64, 4,
           1e-10)


@pytest.mark.parametrize("spatial,kernel_size,dilation,is_causal,rpb,heads,heads_kv,n_extra", CASES[:4], ids=IDS[:4])
def test_triton_backend_matches_oracle(spatial, kernel_size, dilation, is_causal, rpb, heads, heads_kv, n_extra):
    """The kernels' out and lse (with its gradient) merged with the dense extra-token part; fp32, head_dim 16."""
    _check("triton", spatial, kernel_size, dilation, is_causal, rpb, heads, heads_kv, n_extra, torch.float32, 16,
           2e-5, batch=1)


def test_half_precision_reference():
    _check("reference", (9, 6), 3, 1, False, True, 4, 2, 3, torch.bfloat16, 8, 3e-2)


def test_zero_extra_tokens_and_equal_heads_change_nothing():
    q, k, v, bias, _, _ = _inputs((9,), 3, True, 2, 2, 0, torch.float64, 4)
    empty = torch.zeros(2, 0, 2, 4, dtype=torch.float64)
    plain = ops.na1d(q, k, v, 3, rpb=bias, return_lse=True)
    extra = ops.na1d(q, k, v, 3, rpb=bias, return_lse=True, additional_keys=empty, additional_values=empty)
    for a, b in zip(plain, extra):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("backend", ["reference", "dense", "triton"])
def test_extra_tokens_with_an_empty_batch(backend):
    """Batch 0 with extra tokens gives empty outputs and gradients of the input shapes on every backend (it raised
    "cannot reshape tensor of 0 elements" in the dense part of the merge)."""
    q, k, v, bias, ek, ev = _inputs((6, 5), 3, True, 2, 1, 3, torch.float32, 16, batch=0)
    out, lse = ops.na2d(q, k, v, 3, rpb=bias, return_lse=True, additional_keys=ek, additional_values=ev,
                        backend=backend)
    assert out.shape == q.shape and lse.shape == q.shape[:-1]
    (out.sum() + lse.sum()).backward()
    for t in (q, k, v, bias, ek, ev):
        assert t.grad is not None and t.grad.shape == t.shape and not t.grad.any()


def test_extra_tokens_receive_softmax_weight_exactly():
    """One extra token whose key dominates takes (almost) all the weight: out -> its value."""
    q = torch.ones(1, 8, 1, 4, dtype=torch.float64)
    k = torch.zeros(1, 8, 1, 4, dtype=torch.float64)
    v = torch.zeros(1, 8, 1, 4, dtype=torch.float64)
    ek, ev = torch.full((1, 1, 1, 4), 20.0, dtype=torch.float64), torch.full((1, 1, 1, 4), 3.0, dtype=torch.float64)
    out, lse = ops.na1d(q, k, v, 3, additional_keys=ek, additional_values=ev, return_lse=True)
    # Logits: 0 for the 3 neighbours, 0.5 * 4 * 20 = 40 for the extra token.
    torch.testing.assert_close(lse, torch.full_like(lse, torch.logaddexp(torch.tensor(40.0), torch.tensor(3.0).log())
                                                    .item()))
    torch.testing.assert_close(out, torch.full_like(out, 3.0 / (1 + 3 * torch.exp(torch.tensor(-40.0)).item())))


Q = torch.randn(1, 6, 7, 4, 8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(key=Q[..., :3, :], value=Q[..., :3, :]), r"key and value must divide the heads of query.*3 and 4"),
        (dict(key=Q[..., :2, :]), r"identical shapes.*key.shape=\(1, 6, 7, 2, 8\), value.shape=\(1, 6, 7, 4, 8\)"),
        (dict(key=Q[..., :4], value=Q[..., :4]), r"identical shapes"),
        (dict(additional_keys=Q[:, 0]), r"additional_keys and additional_values must be given together"),
        (dict(additional_keys=Q[:, 0, :, :2], additional_values=Q[:, 0, :, :2]),
         r"additional_keys must have shape \[B, n_extra, heads_kv, head_dim\] = \(1, n_extra, 4, 8\)"),
        (dict(additional_keys=Q[:, 0], additional_values=Q[:, 0].double()),
         r"additional_values must have the dtype and device of query"),
        (dict(additional_keys=Q[:, 0], additional_values=Q[:, 0, :3]), r"must have identical shapes"),
        (dict(additional_keys=Q[:, 0], additional_values=[1.0]), r"additional_values must be a torch.Tensor"),
    ],
    ids=["gqa-divide", "kv-heads-differ", "head-dim", "together", "extra-shape", "extra-dtype", "extra-same-shape",
         "extra-type"],
)
def test_validation_names_the_argument(kwargs, match):
    args = dict(query=Q, key=Q, value=Q, kernel_size=3) | kwargs
    with pytest.raises(ValueError, match=match):
        ops.na2d(**args)
