"""One test per validation rule (spec section 4): the right exception, naming the argument and the values."""

from __future__ import annotations

import pytest
import torch

from natzoo import ops

Q = torch.randn(1, 8, 9, 2, 4)


def call(**overrides):
    args = dict(query=Q, key=Q, value=Q, kernel_size=3)
    args.update(overrides)
    return ops.na2d(**args)


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (dict(query=[1.0]), r"na2d: query must be a torch.Tensor, got list"),  # V1
        (dict(value=None), r"value must be a torch.Tensor, got NoneType"),  # V1
        (dict(query=Q.long(), key=Q.long(), value=Q.long()), r"dtype.*torch.int64"),  # V2
        (dict(query=Q.bool(), key=Q.bool(), value=Q.bool()), r"dtype.*torch.bool"),  # V2
        (dict(query=torch.complex(Q, Q), key=torch.complex(Q, Q), value=torch.complex(Q, Q)), r"dtype.*complex"),
        (dict(query=Q.to(torch.float8_e4m3fn), key=Q.to(torch.float8_e4m3fn), value=Q.to(torch.float8_e4m3fn)),
         r"dtype=torch.float8_e4m3fn is not supported"),  # V3
        (dict(key=Q.double()), r"query dtype=torch.float32, key dtype=torch.float64, value dtype=torch.float32"),
        (dict(key=Q.to("meta")), r"query device=cpu, key device=meta, value device=cpu"),  # V5
        (dict(query=Q[0], key=Q[0], value=Q[0]), r"\[B, \*spatial\(2\), heads, head_dim\].*query.shape=\(8, 9, 2, 4\)"),
        (dict(value=Q[:, :, :8]), r"value.shape=\(1, 8, 8, 2, 4\)"),  # V7
        (dict(query=Q[..., :0], key=Q[..., :0], value=Q[..., :0]), r"query.shape=\(1, 8, 9, 2, 0\)"),  # V8
        (dict(query=Q[:, :, :, :0], key=Q[:, :, :, :0], value=Q[:, :, :, :0]), r"query.shape"),  # V8 heads
        (dict(kernel_size=(3, 3, 3)), r"kernel_size must be an int or a tuple/list of 2 ints.*\(3, 3, 3\)"),  # V9
        (dict(kernel_size=True), r"kernel_size.*True"),  # V9 bool rejected
        (dict(stride=2.0), r"stride must be an int.*2.0"),  # V9
        (dict(dilation=[1, "2"]), r"dilation must be an int"),  # V9
        (dict(is_causal=1), r"is_causal must be a bool or a tuple/list of 2 bools"),  # V9
        (dict(kernel_size=(3, 1)), r"kernel_size must be >= 2, got kernel_size=1 on axis 1"),  # V10
        (dict(stride=4), r"stride=4 with kernel_size=3 on axis 0"),  # V11
        (dict(stride=(1, 0)), r"stride=0 with kernel_size=3 on axis 1"),  # V11
        (dict(dilation=(0, 1)), r"dilation must be >= 1, got dilation=0 on axis 0"),  # V12
        (dict(dilation=(1, 4)), r"kernel_size=3 \* dilation=4 = 12 > 9 on axis 1 \(query.shape=\(1, 8, 9, 2, 4\)\)"),
        (dict(rpb=torch.zeros(2, 5, 5, dtype=torch.long)), r"rpb must be a floating tensor.*dtype=torch.int64"),
        (dict(rpb=torch.zeros(2, 5, 5, device="meta")), r"rpb must be a floating tensor.*device=meta"),  # V14
        (dict(rpb=[0.0]), r"rpb must be a floating tensor.*type list"),  # V14
        (dict(rpb=torch.zeros(2, 5, 4)), r"rpb must have shape \(2, 5, 5\).*rpb.shape=\(2, 5, 4\)"),  # V15
        (dict(rpb=torch.zeros(2, 5, 5), stride=(1, 2)), r"rpb is only defined for stride 1.*stride=\(1, 2\)"),
        (dict(scale=float("nan")), r"scale must be None or a finite real number, got scale=nan"),  # V17
        (dict(scale="0.5"), r"scale=.0.5."),  # V17
        (dict(backend="cuda"), r"backend must be one of None, 'auto', 'triton', 'reference', got backend='cuda'"),
        (dict(backend="triton", query=Q.double(), key=Q.double(), value=Q.double()), r"backend='triton'"),  # V19
    ],
)
def test_validation_rule(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(**overrides)


def test_unknown_keyword_is_type_error():
    with pytest.raises(TypeError):
        call(additional_keys=Q)


def test_checks_run_in_spec_order():
    """V6 (rank) fires before V10 (kernel) when both are wrong; V13 before V15."""
    with pytest.raises(ValueError, match="query.shape"):
        call(query=Q[0], key=Q[0], value=Q[0], kernel_size=1)
    with pytest.raises(ValueError, match="dilation=4"):
        call(dilation=4, rpb=torch.zeros(1))


def test_triton_head_dim_rule_names_the_property(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the capability check look past the CPU device
    q = torch.randn(1, 8, 9, 2, 24)
    with pytest.raises(ValueError, match=r"backend='triton'.*head_dim=24 not in supported set"):
        ops.na2d(q, q, q, 3, backend="triton")


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(dim=66, num_heads=4), r"dim=66, num_heads=4"),
        (dict(kernel_size=1), r"kernel_size must be >= 2"),
        (dict(stride=8), r"stride=8 with kernel_size=7"),
        (dict(dilation=0), r"dilation must be >= 1"),
        (dict(is_causal="yes"), r"is_causal"),
        (dict(stride=2, rel_pos_bias=True), r"rel_pos_bias=True requires stride 1.*stride=\(2, 2\)"),
    ],
)
def test_module_construction_checks(kwargs, pattern):
    args = dict(dim=64, num_heads=2, kernel_size=7)
    args.update(kwargs)
    with pytest.raises(ValueError, match=pattern):
        ops.NeighborhoodAttention2D(**args)


def test_module_forward_checks_input():
    m = ops.NeighborhoodAttention2D(64, 2, 3)
    with pytest.raises(ValueError, match=r"x.shape=\(1, 8, 32\)"):
        m(torch.randn(1, 8, 32))
    with pytest.raises(ValueError, match=r"dim=64.*x.shape=\(1, 8, 8, 32\)"):
        m(torch.randn(1, 8, 8, 32))
