"""One test per validation rule (docs/ops.md, "Validation"): the right exception, naming the argument and values."""

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
        (dict(query=[1.0]), r"na2d: query must be a torch.Tensor, got list"),  # tensor type
        (dict(value=None), r"value must be a torch.Tensor, got NoneType"),  # tensor type
        (dict(query=Q.long(), key=Q.long(), value=Q.long()), r"dtype.*torch.int64"),  # floating dtype
        (dict(query=Q.bool(), key=Q.bool(), value=Q.bool()), r"dtype.*torch.bool"),  # floating dtype
        (dict(query=torch.complex(Q, Q), key=torch.complex(Q, Q), value=torch.complex(Q, Q)), r"dtype.*complex"),
        (dict(query=Q.to(torch.float8_e4m3fn), key=Q.to(torch.float8_e4m3fn), value=Q.to(torch.float8_e4m3fn)),
         r"dtype=torch.float8_e4m3fn is not supported"),  # supported dtype
        (dict(key=Q.double()), r"query dtype=torch.float32, key dtype=torch.float64, value dtype=torch.float32"),
        (dict(key=Q.to("meta")), r"query device=cpu, key device=meta, value device=cpu"),  # one device
        (dict(query=Q[0], key=Q[0], value=Q[0]), r"\[B, \*spatial\(2\), heads, head_dim\].*query.shape=\(8, 9, 2, 4\)"),
        (dict(value=Q[:, :, :8]), r"value.shape=\(1, 8, 8, 2, 4\)"),  # one shape
        (dict(query=Q[..., :0], key=Q[..., :0], value=Q[..., :0]), r"query.shape=\(1, 8, 9, 2, 0\)"),  # non-empty axes
        (dict(query=Q[:, :, :, :0], key=Q[:, :, :, :0], value=Q[:, :, :, :0]), r"query.shape"),  # non-empty axes heads
        # per-axis arguments: an int (or bool) or one entry per axis
        (dict(kernel_size=(3, 3, 3)), r"kernel_size must be an int or a tuple/list of 2 ints.*\(3, 3, 3\)"),
        (dict(kernel_size=True), r"kernel_size.*True"),  # per-axis argument form bool rejected
        (dict(stride=2.0), r"stride must be an int.*2.0"),  # per-axis argument form
        (dict(dilation=[1, "2"]), r"dilation must be an int"),  # per-axis argument form
        (dict(is_causal=1), r"is_causal must be a bool or a tuple/list of 2 bools"),  # per-axis argument form
        (dict(kernel_size=(3, 1)), r"kernel_size must be >= 2, got kernel_size=1 on axis 1"),  # kernel size
        (dict(stride=4), r"stride=4 with kernel_size=3 on axis 0"),  # stride range
        (dict(stride=(1, 0)), r"stride=0 with kernel_size=3 on axis 1"),  # stride range
        (dict(dilation=(0, 1)), r"dilation must be >= 1, got dilation=0 on axis 0"),  # dilation
        (dict(dilation=(1, 4)), r"kernel_size=3 \* dilation=4 = 12 > 9 on axis 1 \(query.shape=\(1, 8, 9, 2, 4\)\)"),
        (dict(rpb=torch.zeros(2, 5, 5, dtype=torch.long)), r"rpb must be a floating tensor.*dtype=torch.int64"),
        (dict(rpb=torch.zeros(2, 5, 5, device="meta")), r"rpb must be a floating tensor.*device=meta"),  # rpb tensor
        (dict(rpb=[0.0]), r"rpb must be a floating tensor.*type list"),  # rpb tensor
        (dict(rpb=torch.zeros(2, 5, 4)), r"rpb must have shape \(2, 5, 5\).*rpb.shape=\(2, 5, 4\)"),  # rpb shape
        (dict(rpb=torch.zeros(2, 5, 5), stride=(1, 2)), r"rpb is only defined for stride 1.*stride=\(1, 2\)"),
        (dict(scale=float("nan")), r"scale must be None or a finite real number, got scale=nan"),  # scale
        (dict(scale="0.5"), r"scale=.0.5."),  # scale
        (dict(scale=1e38), r"scale=1e\+38 is too large: \|scale\| must be <= 1e\+06"),  # scale overflowing float32
        (dict(scale=-2e6), r"scale=-2000000.0 is too large"),  # scale
        (dict(backend="cuda"), r"backend must be one of None, 'auto', 'triton', 'cpu', 'dense', 'reference', got backend='cuda'"),
        # a forced backend that cannot run the problem
        (dict(backend="triton", query=Q.double(), key=Q.double(), value=Q.double()), r"backend='triton'"),
    ],
)
def test_validation_rule(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        call(**overrides)


def test_unknown_keyword_is_type_error():
    with pytest.raises(TypeError):
        call(cu_seqlens_q=Q)  # NATTEN varlen keyword, not provided


def test_checks_run_in_documented_order():
    """The rank check fires before the kernel-size check when both fail; the window-fits check before rpb shape."""
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
        (dict(qk_scale=1e38), r"qk_scale must satisfy \|qk_scale\| <= 1e\+06"),
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
