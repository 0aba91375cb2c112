"""Modules: parameter names/shapes, the qkv feature layout, and the legacy pad-then-crop path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle import dense_na

from natzoo import ops


@pytest.mark.parametrize(
    "cls,n,kernel", [(ops.NeighborhoodAttention1D, 1, 5), (ops.NeighborhoodAttention2D, 2, 7),
                     (ops.NeighborhoodAttention3D, 3, (3, 5, 7))]
)
def test_parameter_names_and_shapes(cls, n, kernel):
    m = cls(96, 3, kernel, rel_pos_bias=True)
    ks = kernel if isinstance(kernel, tuple) else (kernel,) * n
    shapes = {name: tuple(p.shape) for name, p in m.state_dict().items()}
    assert shapes == {
        "rpb": (3, *(2 * k - 1 for k in ks)),
        "qkv.weight": (288, 96),
        "qkv.bias": (288,),
        "proj.weight": (96, 96),
        "proj.bias": (96,),
    }
    assert list(m.buffers()) == []
    bare = cls(96, 3, kernel, qkv_bias=False)
    assert bare.rpb is None and set(bare.state_dict()) == {"qkv.weight", "proj.weight", "proj.bias"}
    assert "head_dim=32" in repr(m) and "rel_pos_bias=True" in repr(m) and "is_causal" in repr(m)


def test_rpb_init_is_small_truncated_normal():
    m = ops.NeighborhoodAttention2D(64, 64, 7, rel_pos_bias=True)  # 64 x 13 x 13 samples
    rpb = m.rpb.detach()
    assert 0.015 < float(rpb.std()) < 0.025 and float(rpb.abs().max()) < 2.0


def manual_module(m, x, pad):
    """Explicit pad -> qkv -> dense oracle -> crop -> proj, written independently of the module."""
    spatial = x.shape[1:-1]
    xp = F.pad(x, [0, 0] + [p for amount in reversed(pad) for p in (0, amount)])
    b, heads, hd = x.shape[0], m.num_heads, m.head_dim
    qkv = xp.double() @ m.qkv.weight.double().T + m.qkv.bias.double()
    qkv = qkv.reshape(b, *xp.shape[1:-1], 3, heads, hd)
    q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    out, _ = dense_na(q, k, v, m.kernel_size, m.stride, m.dilation, m.is_causal, scale=m.scale,
                      rpb=None if m.rpb is None else m.rpb.double())
    out = out[(slice(None), *(slice(0, s) for s in spatial))].reshape(b, *spatial, heads * hd)
    return out @ m.proj.weight.double().T + m.proj.bias.double(), k


@pytest.mark.parametrize("spatial,kernel,dilation", [((5, 9), 7, 1), ((20, 30), 7, 4), ((6, 14), 3, 5)])
def test_padding_path_matches_manual_pad_then_crop(spatial, kernel, dilation):
    m = ops.NeighborhoodAttention2D(32, 2, kernel, dilation=dilation, rel_pos_bias=True).double()
    with torch.no_grad():
        m.rpb.normal_(0, 0.5)
        m.qkv.bias.normal_(0, 1.0)
    x = torch.randn(2, *spatial, 32, dtype=torch.float64)
    pad = [max(kernel * dilation - s, 0) for s in spatial]
    assert any(pad)
    expected, k_padded = manual_module(m, x, pad)
    torch.testing.assert_close(m(x), expected, atol=1e-10, rtol=1e-10)
    # The padded keys carry the qkv bias (zeros were inserted before qkv, after the block's norm).
    pad_key = k_padded[0, -1, -1].reshape(-1)
    torch.testing.assert_close(pad_key, m.qkv.bias[32:64].double())


def test_no_padding_when_large_enough_and_causal_3d():
    m = ops.NeighborhoodAttention3D(32, 1, (2, 3, 3), is_causal=(True, False, False), rel_pos_bias=True).double()
    x = torch.randn(1, 3, 4, 5, 32, dtype=torch.float64)
    expected, _ = manual_module(m, x, [0, 0, 0])
    torch.testing.assert_close(m(x), expected, atol=1e-10, rtol=1e-10)
    m1 = ops.NeighborhoodAttention1D(32, 2, 4, stride=2, qk_scale=0.0).double()
    x1 = torch.randn(2, 3, 32, dtype=torch.float64)  # 3 < 4: padded
    expected, _ = manual_module(m1, x1, [1])
    torch.testing.assert_close(m1(x1), expected, atol=1e-10, rtol=1e-10)


def test_qkv_feature_layout():
    """Output feature t*C + h*head_dim + e of qkv is (q|k|v, head h, channel e): checked by zeroing k, v weights."""
    m = ops.NeighborhoodAttention1D(8, 2, 3).double()
    with torch.no_grad():
        m.qkv.weight[8:].zero_()
        m.qkv.bias[8:16].zero_()
        m.qkv.bias[16:].copy_(torch.arange(8, dtype=torch.float64))
        m.proj.weight.copy_(torch.eye(8))
        m.proj.bias.zero_()
    out = m(torch.randn(1, 5, 8, dtype=torch.float64))
    # k = 0 -> uniform attention over v = bias, so each token outputs v's bias exactly.
    torch.testing.assert_close(out, torch.arange(8, dtype=torch.float64).expand(1, 5, 8))


def test_attention_dropout_training_only():
    m = ops.NeighborhoodAttention2D(32, 1, 3, attn_drop=0.5)
    x = torch.randn(1, 6, 6, 32)
    m.eval()
    torch.testing.assert_close(m(x), m(x))
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, m(x))


def test_forward_dilation_override():
    """A per-call dilation (the models' clamping path) equals a module built with that dilation, pad rule included."""
    m = ops.NeighborhoodAttention2D(32, 1, 3, dilation=4, rel_pos_bias=True).double()
    x = torch.randn(1, 5, 9, 32, dtype=torch.float64)
    with torch.no_grad():
        m2 = ops.NeighborhoodAttention2D(32, 1, 3, dilation=(1, 2), rel_pos_bias=True).double()
        m2.load_state_dict(m.state_dict())
    expected, _ = manual_module(m2, x, [0, 0])
    torch.testing.assert_close(m(x, dilation=(1, 2)), expected, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="dilation must be >= 1"):
        m(x, dilation=0)
