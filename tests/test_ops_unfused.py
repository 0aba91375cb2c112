"""Unfused ops (``na{1,2,3}d_qk`` / ``na{1,2,3}d_av``) against the dense float64 oracle and the fused op.

The oracle (tests/oracle.py) knows nothing of slots: it gives each query's allowed keys in increasing flat key
index, which is the documented slot order (row-major product of per-axis windows, each from ``start`` upwards).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from oracle import case_id, dense_mask_and_bias_index, dense_na, window_logits

from natzoo import ops

# (spatial, kernel_size, stride, dilation, is_causal, rpb, heads, heads_kv): odd/even kernels, stride, dilation not
# dividing the length, causal (windows shorter than k), L = k * d, mixed axes, 3D, GQA and MQA.
CASES = [
    ((9,), 3, 1, 1, False, True, 2, 2),
    ((13,), 4, 1, 3, True, True, 2, 1),
    ((11,), 4, 2, 2, False, False, 4, 2),
    ((8,), 4, 1, 2, False, True, 1, 1),
    ((7, 6), (3, 2), 1, (2, 1), (False, True), True, 2, 2),
    ((6, 7), (4, 3), (2, 1), (1, 2), (True, False), False, 2, 1),
    ((4, 5, 4), (2, 3, 2), 1, (2, 1, 1), (False, True, False), True, 2, 1),
]
IDS = [case_id(*c[:5], c[5]) + f"-h{c[6]}kv{c[7]}" for c in CASES]


def _leaves(spatial, heads, heads_kv, ks, rpb, head_dim=4, batch=2, dtype=torch.float64):
    q = torch.randn(batch, *spatial, heads, head_dim, dtype=dtype, requires_grad=True)
    k = torch.randn(batch, *spatial, heads_kv, head_dim, dtype=dtype, requires_grad=True)
    v = torch.randn(batch, *spatial, heads_kv, head_dim, dtype=dtype, requires_grad=True)
    bias = torch.randn(heads, *(2 * x - 1 for x in ks), dtype=dtype, requires_grad=True) if rpb else None
    return q, k, v, bias


def _ks(kernel_size, n):
    return kernel_size if isinstance(kernel_size, tuple) else (kernel_size,) * n


@pytest.mark.parametrize("spatial,kernel_size,stride,dilation,is_causal,rpb,heads,heads_kv", CASES, ids=IDS)
def test_qk_logits_are_the_oracles_window_logits(spatial, kernel_size, stride, dilation, is_causal, rpb, heads,
                                                 heads_kv):
    n = len(spatial)
    ks = _ks(kernel_size, n)
    q, k, _, bias = _leaves(spatial, heads, heads_kv, ks, rpb, batch=1)
    qk = getattr(ops, f"na{n}d_qk")
    logits = qk(q, k, kernel_size, stride, dilation, is_causal, rpb=bias)
    assert logits.shape == (1, *spatial, heads, math.prod(ks)) and logits.dtype == torch.float64
    want = window_logits(q.detach(), k.detach(), kernel_size, stride, dilation, is_causal,
                         rpb=None if bias is None else bias.detach())
    flat = logits.detach().reshape(1, -1, heads, math.prod(ks))
    for x in range(flat.shape[1]):
        for h in range(heads):
            row = flat[0, x, h]
            got = row[torch.isfinite(row)]
            # Unused slots exist only on causal axes, and they hold exactly -inf.
            assert torch.equal(row[~torch.isfinite(row)], torch.full_like(row[~torch.isfinite(row)], -math.inf))
            torch.testing.assert_close(got, torch.tensor(want[0][x][h], dtype=torch.float64), atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("spatial,kernel_size,stride,dilation,is_causal,rpb,heads,heads_kv", CASES, ids=IDS)
def test_qk_softmax_av_equals_fused_op_and_oracle(spatial, kernel_size, stride, dilation, is_causal, rpb, heads,
                                                  heads_kv):
    """Values, lse (log-sum-exp of the scaled logits) and every gradient, against the fused reference path and the
    oracle; gradients flow into both out and lse."""
    n = len(spatial)
    ks = _ks(kernel_size, n)
    leaves = _leaves(spatial, heads, heads_kv, ks, rpb)
    q, k, v, bias = leaves
    scale = 0.7
    args = (kernel_size, stride, dilation, is_causal)
    logits = getattr(ops, f"na{n}d_qk")(q * scale, k, *args, rpb=bias)
    out = getattr(ops, f"na{n}d_av")(logits.softmax(-1), v, *args)
    lse = logits.logsumexp(-1)
    fused_out, fused_lse = getattr(ops, f"na{n}d")(q, k, v, *args, scale=scale, rpb=bias, return_lse=True,
                                                   backend="reference")
    ref_out, ref_lse = dense_na(q, k, v, *args, scale=scale, rpb=bias)
    g_out, g_lse = torch.randn_like(out), torch.randn_like(lse)
    wanted = [t for t in leaves if t is not None]

    def grads(o, s):
        return torch.autograd.grad((o * g_out).sum() + (s * g_lse).sum(), wanted, retain_graph=True)

    for other_out, other_lse in ((fused_out, fused_lse), (ref_out, ref_lse)):
        torch.testing.assert_close(out, other_out, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(lse, other_lse, atol=1e-12, rtol=1e-10)
        for got, want in zip(grads(out, lse), grads(other_out, other_lse)):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("heads,heads_kv", [(2, 2), (4, 1)])
def test_additional_tokens_match_the_oracle(heads, heads_kv):
    """Extra keys append ``n_extra`` logit slots (no rpb); av weighs extra values by them."""
    spatial, ks = (6, 5), (3, 2)
    q, k, v, bias = _leaves(spatial, heads, heads_kv, ks, rpb=True)
    ek = torch.randn(2, 3, heads_kv, 4, dtype=torch.float64, requires_grad=True)
    ev = torch.randn(2, 3, heads_kv, 4, dtype=torch.float64, requires_grad=True)
    scale = 0.5
    logits = ops.na2d_qk(q * scale, k, ks, dilation=(2, 1), is_causal=(False, True), rpb=bias, additional_keys=ek)
    assert logits.shape[-1] == 6 + 3
    out = ops.na2d_av(logits.softmax(-1), v, ks, dilation=(2, 1), is_causal=(False, True), additional_values=ev)
    ref_out, ref_lse = dense_na(q, k, v, ks, 1, (2, 1), (False, True), scale=scale, rpb=bias, additional_keys=ek,
                                additional_values=ev)
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(logits.logsumexp(-1), ref_lse, atol=1e-12, rtol=1e-10)
    leaves = [q, k, v, bias, ek, ev]
    g = torch.randn_like(out)
    got = torch.autograd.grad((out * g).sum(), leaves)
    want = torch.autograd.grad((ref_out * g).sum(), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_small_inputs_through_the_module_pad_then_crop():
    """An input smaller than kernel_size * dilation: the module pads, attends and crops; qk/av on the same padded
    projections give the same output."""
    torch.manual_seed(0)
    attn = ops.NeighborhoodAttention2D(dim=8, num_heads=2, kernel_size=5, dilation=2, rel_pos_bias=True).double()
    x = torch.randn(1, 4, 7, 8, dtype=torch.float64)
    padded = F.pad(x, (0, 0, 0, 3, 0, 6))  # to 10 x 10 = kernel_size * dilation
    q, k, v = attn.qkv(padded).unflatten(-1, (3, 2, 4)).unbind(-3)
    logits = ops.na2d_qk(q * attn.scale, k, 5, dilation=2, rpb=attn.rpb)
    out = ops.na2d_av(logits.softmax(-1), v, 5, dilation=2)[:, :4, :7].flatten(-2)
    torch.testing.assert_close(attn(x), attn.proj(out), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_accumulates_in_float32(dtype):
    q, k, v, bias = _leaves((12,), 2, 2, (5,), rpb=True, dtype=torch.float32)
    logits = ops.na1d_qk(q.to(dtype), k.to(dtype), 5, dilation=2, rpb=bias)
    out = ops.na1d_av(logits.softmax(-1), v.to(dtype), 5, dilation=2)
    assert logits.dtype == dtype and out.dtype == dtype
    ref, _ = dense_na(q.to(dtype), k.to(dtype), v.to(dtype), 5, dilation=2, scale=1.0, rpb=bias)
    tol = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)


def test_unused_causal_slots_are_ignored_by_av():
    """Whatever sits in an unused slot (here NaN) never reaches the output."""
    q, k, v, _ = _leaves((7,), 1, 1, (3,), rpb=False, batch=1)
    weights = ops.na1d_qk(q, k, 3, is_causal=True).softmax(-1).detach()
    mask, _ = dense_mask_and_bias_index((7,), 3, 1, 1, True)
    unused = (weights == 0) & (mask.sum(-1) < 3)[None, :, None, None]
    poisoned = weights.masked_fill(unused, math.nan)
    assert unused.any()
    torch.testing.assert_close(ops.na1d_av(poisoned, v, 3, is_causal=True), ops.na1d_av(weights, v, 3, is_causal=True))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda q: ops.na2d_qk(q, q[..., :3, :], 3), r"heads of key must divide the heads of query.*4 and 3"),
        (lambda q: ops.na2d_qk(q, q[..., :2], 3), r"query and key must have the same batch.*head_dim"),
        (lambda q: ops.na2d_qk(q, q, 4, dilation=2), r"kernel_size=4 \* dilation=2 = 8 > 6 on axis 0"),
        (lambda q: ops.na2d_qk(q, q, 3, rpb=torch.zeros(4, 5, 4)), r"rpb must have shape \(4, 5, 5\)"),
        (lambda q: ops.na2d_qk(q, q, 3, stride=2, rpb=torch.zeros(4, 5, 5)), r"rpb is only defined for stride 1"),
        (lambda q: ops.na2d_qk(q, q.int(), 3), r"key dtype=torch.int32 is not supported"),
        (lambda q: ops.na2d_qk(q[0], q[0], 3), r"query must have the layout \[B, \*spatial\(2\), heads, last\]"),
        (lambda q: ops.na2d_qk(q, q, 3, additional_keys=q[:, 0, :, :2]), r"additional_keys must have shape"),
        (lambda q: ops.na2d_av(torch.zeros(1, 6, 7, 4, 8), q, 3), r"prod\(kernel_size\)=9.*n_extra=0"),
        (lambda q: ops.na2d_av(torch.zeros(1, 6, 7, 4, 9), q, 0), r"kernel_size must be >= 2"),
        (lambda q: ops.na2d_av(torch.zeros(1, 6, 7, 4, 9), q, 3, additional_values=q[:, 0, :, :2]),
         r"additional_values must have shape"),
    ],
    ids=["gqa", "head_dim", "window", "rpb-shape", "rpb-stride", "dtype", "rank", "extra-k", "av-width", "k",
         "extra-v"],
)
def test_validation_names_the_argument(call, match):
    q = torch.randn(1, 6, 7, 4, 8)
    with pytest.raises(ValueError, match=match):
        call(q)
