"""``natzoo.compat.natten`` / ``install_natten()``: NATTEN-style model code, unchanged, on natzoo.

The model code below is the project's own, written from NATTEN's documentation the way NAT/DiNAT code used it: a
block that calls ``natten.functional.natten2dqkrpb``/``natten2dav`` on heads-first tensors (the transformers port's
pattern), and the same block built on ``natten.NeighborhoodAttention2D`` (the official models' pattern). It imports
``natten`` only after ``install_natten()``. Results are checked against the dense float64 oracle and natzoo's own
modules. transformers' NAT/DiNAT models are exercised when a transformers release that has them is importable.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import math
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F
from oracle import dense_na
from torch import nn

import natzoo.compat
from natzoo import ops


@pytest.fixture
def natten():
    module = natzoo.compat.install_natten()
    yield module
    natzoo.compat.uninstall_natten()


def _functional_attention_class():
    """NATTEN-era attention written against the legacy functional ops (imported from `natten` at call time)."""
    from natten.functional import natten2dav, natten2dqkrpb

    class LegacyNeighborhoodAttention(nn.Module):
        def __init__(self, dim, num_heads, kernel_size, dilation=1):
            super().__init__()
            self.num_heads, self.head_dim = num_heads, dim // num_heads
            self.kernel_size, self.dilation = kernel_size, dilation
            self.qkv = nn.Linear(dim, 3 * dim)
            self.rpb = nn.Parameter(torch.randn(num_heads, 2 * kernel_size - 1, 2 * kernel_size - 1) * 0.1)
            self.proj = nn.Linear(dim, dim)

        def forward(self, x):
            batch, height, width, channels = x.shape
            window = self.kernel_size * self.dilation
            pad_h, pad_w = max(window - height, 0), max(window - width, 0)
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
            qkv = self.qkv(x).reshape(batch, x.shape[1], x.shape[2], 3, self.num_heads, self.head_dim)
            q, k, v = qkv.permute(3, 0, 4, 1, 2, 5)  # 3 x [B, heads, H, W, head_dim]
            q = q / math.sqrt(self.head_dim)
            attn = natten2dqkrpb(q, k, self.rpb, self.kernel_size, self.dilation).softmax(dim=-1)
            out = natten2dav(attn, v, self.kernel_size, self.dilation)  # [B, heads, H, W, head_dim]
            out = out.permute(0, 2, 3, 1, 4).reshape(batch, x.shape[1], x.shape[2], channels)
            return self.proj(out[:, :height, :width])

    return LegacyNeighborhoodAttention


def _tiny_nat(attention_factory):
    """A two-level NAT-style classifier: conv tokenizer, pre-norm blocks, conv downsampler, pooled head."""

    class Block(nn.Module):
        def __init__(self, dim, heads, dilation):
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.attn = attention_factory(dim, heads, 3, dilation)
            self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

        def forward(self, x):
            x = x + self.attn(self.norm1(x))
            return x + self.mlp(self.norm2(x))

    class TinyNAT(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 4, stride=4)
            self.levels = nn.ModuleList([nn.Sequential(Block(16, 2, 1), Block(16, 2, 2)), Block(32, 4, 1)])
            self.down = nn.Conv2d(16, 32, 3, stride=2, padding=1)
            self.head = nn.Linear(32, 5)

        def forward(self, x):
            x = self.levels[0](self.stem(x).permute(0, 2, 3, 1))
            x = self.levels[1](self.down(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
            return self.head(x.mean((1, 2)))

    return TinyNAT()


def test_nothing_is_registered_on_import():
    code = ("import sys, natzoo, natzoo.compat, natzoo.compat.natten, natzoo.ops; "
            "assert 'natten' not in sys.modules and not any(m.startswith('natten.') for m in sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_install_registers_and_uninstall_removes(natten):
    import natten as imported
    import natten.functional

    assert imported is natten and natten.functional is importlib.import_module("natzoo.compat.natten.functional")
    assert importlib.metadata.version("natten") == natten.__version__
    assert natzoo.compat.install_natten() is natten  # idempotent
    natzoo.compat.uninstall_natten()
    assert "natten" not in sys.modules and "natten.functional" not in sys.modules
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.version("natten")
    natzoo.compat.install_natten()  # the fixture uninstalls again


def test_refuses_when_a_real_natten_is_imported(monkeypatch):
    real = types.ModuleType("natten")
    real.__file__ = "/site-packages/natten/__init__.py"
    monkeypatch.setitem(sys.modules, "natten", real)
    with pytest.raises(RuntimeError, match=r"real NATTEN is already imported \('natten' from /site-packages"):
        natzoo.compat.install_natten()
    assert sys.modules["natten"] is real


def test_legacy_functional_model_matches_the_oracle(natten):
    """The functional-style layer (legacy names, heads-first, its own padding) against dense float64 attention."""
    torch.manual_seed(0)
    attn = _functional_attention_class()(12, 3, kernel_size=3, dilation=2).double()
    x = torch.randn(2, 5, 8, 12, dtype=torch.float64, requires_grad=True)
    out = attn(x)
    padded = F.pad(x, (0, 0, 0, 0, 0, 1))  # height 5 -> 6 = kernel_size * dilation
    q, k, v = attn.qkv(padded).unflatten(-1, (3, 3, 4)).unbind(-3)
    want, _ = dense_na(q, k, v, 3, dilation=2, rpb=attn.rpb)
    want = attn.proj(want[:, :5].flatten(-2))
    torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-10)
    g = torch.randn_like(out)
    leaves = [x, attn.rpb, attn.qkv.weight]
    for a, b in zip(torch.autograd.grad((out * g).sum(), leaves), torch.autograd.grad((want * g).sum(), leaves)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


@pytest.mark.parametrize("style", ["0.17", "0.14"])
def test_module_model_runs_unchanged_and_matches_natzoo(natten, style):
    """The same tiny NAT built on natten.NeighborhoodAttention2D (0.17 keywords or 0.14's `bias=`), the
    functional-style layer and natzoo's own module: one state dict loads strictly into all three, same logits."""
    from natten import NeighborhoodAttention2D

    def natten_module(dim, heads, k, d):
        if style == "0.17":
            return NeighborhoodAttention2D(dim=dim, num_heads=heads, kernel_size=k, dilation=d, rel_pos_bias=True)
        return NeighborhoodAttention2D(dim, num_heads=heads, kernel_size=k, dilation=d, bias=True, qk_scale=None)

    torch.manual_seed(0)
    model = _tiny_nat(natten_module).double().eval()
    legacy = _tiny_nat(_functional_attention_class()).double().eval()
    native = _tiny_nat(lambda dim, heads, k, d: ops.NeighborhoodAttention2D(dim, heads, k, dilation=d,
                                                                            rel_pos_bias=True)).double().eval()
    state = model.state_dict()
    assert any(key.endswith("attn.rpb") for key in state)
    legacy.load_state_dict(state, strict=True)
    native.load_state_dict(state, strict=True)
    x = torch.randn(2, 3, 24, 20, dtype=torch.float64)  # maps 6x5 then 3x3: smaller than k * d at level 2
    logits = model(x)
    torch.testing.assert_close(logits, legacy(x), atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(logits, native(x), atol=1e-12, rtol=1e-10)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_module_arguments(natten):
    from natten import NeighborhoodAttention1D, NeighborhoodAttention2D, NeighborhoodAttention3D

    assert NeighborhoodAttention2D(8, 2, 3).rpb is None  # NATTEN 0.17's default
    assert NeighborhoodAttention2D(8, 2, 3, bias=True).rpb.shape == (2, 5, 5)
    assert NeighborhoodAttention2D(8, 2, 3, qk_scale=0.0).scale == 0.5  # `qk_scale or head_dim ** -0.5`
    m3 = NeighborhoodAttention3D(8, 2, 3, kernel_size_d=5, dilation=2, dilation_d=1, bias=True)
    assert m3.kernel_size == (5, 3, 3) and m3.dilation == (1, 2, 2) and m3.rpb.shape == (2, 9, 5, 5)
    assert m3(torch.randn(1, 5, 6, 6, 8)).shape == (1, 5, 6, 6, 8)
    m1 = NeighborhoodAttention1D(8, 2, 5, is_causal=True)
    assert m1(torch.randn(1, 9, 8)).shape == (1, 9, 8)
    with pytest.raises(ValueError, match="rel_pos_bias=True and bias=False disagree"):
        NeighborhoodAttention2D(8, 2, 3, rel_pos_bias=True, bias=False)


def _heads_first(*tensors):
    return [t.movedim(-2, 1) for t in tensors]


def test_functional_names_and_call_forms(natten):
    """Every legacy and 0.15/0.17 form gives the heads-first version of natzoo's heads-last unfused op."""
    from natten import functional as nf

    torch.manual_seed(0)
    q1, k1 = torch.randn(2, 11, 2, 4), torch.randn(2, 11, 2, 4)
    r1 = torch.randn(2, 5)
    want1 = ops.na1d_qk(q1, k1, 3, dilation=2, rpb=r1).movedim(-2, 1)
    hq1, hk1 = _heads_first(q1, k1)
    for got in (nf.natten1dqkrpb(hq1, hk1, r1, 3, 2), nf.natten1dqkrpb(hq1, hk1, r1, 2), nf.na1d_qk(hq1, hk1, 3, 2,
                rpb=r1), nf.na1d_qk_with_bias(hq1, hk1, r1, 3, 2)):
        torch.testing.assert_close(got, want1)
    w1 = want1.softmax(-1)
    want_av = ops.na1d_av(w1.movedim(1, -2), k1, 3, dilation=2).movedim(-2, 1)
    for got in (nf.natten1dav(w1, hk1, 3, 2), nf.natten1dav(w1, hk1, 2), nf.na1d_av(w1, hk1, 3, dilation=2)):
        torch.testing.assert_close(got, want_av)
    torch.testing.assert_close(nf.natten1dqk(hq1, hk1, 3, 2), ops.na1d_qk(q1, k1, 3, dilation=2).movedim(-2, 1))

    q3 = torch.randn(1, 4, 6, 5, 2, 4)
    r3 = torch.randn(2, 3, 5, 5)
    want3 = ops.na3d_qk(q3, q3, (2, 3, 3), dilation=(2, 1, 1), rpb=r3).movedim(-2, 1)
    (hq3,) = _heads_first(q3)
    for got in (nf.natten3dqkrpb(hq3, hq3, r3, 2, 3, 2, 1), nf.na3d_qk_with_bias(hq3, hq3, r3, 2, 3, 2, 1),
                nf.na3d_qk(hq3, hq3, (2, 3, 3), (2, 1, 1), rpb=r3)):
        torch.testing.assert_close(got, want3)
    w3 = want3.softmax(-1)
    want3_av = ops.na3d_av(w3.movedim(1, -2), q3, (2, 3, 3), dilation=(2, 1, 1)).movedim(-2, 1)
    for got in (nf.natten3dav(w3, hq3, 2, 3, 2, 1), nf.na3d_av(w3, hq3, 2, 3, 2, 1),
                nf.na3d_av(w3, hq3, (2, 3, 3), (2, 1, 1))):
        torch.testing.assert_close(got, want3_av)
    torch.testing.assert_close(nf.natten3dqk(hq3, hq3, 2, 3, 2, 1),
                               ops.na3d_qk(q3, q3, (2, 3, 3), dilation=(2, 1, 1)).movedim(-2, 1))


def test_unfused_extra_tokens_and_fused_api(natten):
    """0.17's unfused additional keys/values (heads-first) and the fused na2d (heads-last, `scale or default`)
    against the oracle."""
    from natten import functional as nf

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 6, 5, 2, 4, dtype=torch.float64) for _ in range(3))
    ek, ev = (torch.randn(1, 3, 2, 4, dtype=torch.float64) for _ in range(2))
    want, _ = dense_na(q, k, v, 3, is_causal=(True, False), additional_keys=ek, additional_values=ev)
    hq, hk, hv = _heads_first(q, k, v)
    attn = nf.na2d_qk(hq * 0.5, hk, 3, additional_keys=ek.transpose(1, 2), is_causal=(True, False)).softmax(-1)
    out = nf.na2d_av(attn, hv, 3, additional_values=ev.transpose(1, 2), is_causal=(True, False))
    torch.testing.assert_close(out.movedim(1, -2), want, atol=1e-12, rtol=1e-10)
    fused = nf.na2d(q, k, v, 3, is_causal=(True, False), scale=0.0, additional_keys=ek, additional_values=ev)
    torch.testing.assert_close(fused, want, atol=1e-12, rtol=1e-10)


def test_kernel_size_cannot_be_guessed_without_rpb(natten):
    from natten.functional import natten2dav, natten2dqkrpb

    q = torch.randn(1, 2, 6, 6, 4)
    with pytest.raises(ValueError, match="reads kernel_size from rpb, which is None"):
        natten2dqkrpb(q, q, None, 1)
    with pytest.raises(ValueError, match="cannot read kernel_size from attn.shape"):
        natten2dav(torch.zeros(1, 2, 6, 6, 8), q, 1)


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_transformers_dinat_and_nat_run_unchanged():
    """transformers' DiNAT (and the deprecated NAT) models on natzoo, against natzoo's own DiNAT with the converted
    weights. Runs in a subprocess: transformers must be imported after install_natten()."""
    code = r"""
import sys, torch, natzoo.compat
sys.path.insert(0, "tests")
from helpers import official_to_hf  # independent of natzoo's own converter
natzoo.compat.install_natten()
import transformers
if not hasattr(transformers, "DinatForImageClassification"):
    print("skip: transformers", transformers.__version__, "has no DiNAT")
    raise SystemExit(0)
from transformers import DinatConfig, DinatForImageClassification, NatConfig, NatForImageClassification
from natzoo.models.nat import NAT
torch.manual_seed(0)
cfg = DinatConfig(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], kernel_size=3, mlp_ratio=2.0,
                  dilations=[[2], [1], [1, 2], [1]], num_labels=5)
hf = DinatForImageClassification(cfg).double().eval()
ours = NAT(embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], kernel_size=3, mlp_ratio=2.0,
           dilations=[[2], [1], [1, 2], [1]], num_classes=5, drop_path_rate=0.0).double().eval()
with torch.no_grad():
    for p in ours.parameters():
        p.normal_(0.0, 0.2)
hf.load_state_dict(official_to_hf(ours.state_dict(), "dinat"), strict=True)
x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
torch.testing.assert_close(hf(x).logits, ours(x), atol=1e-10, rtol=1e-8)
nat = NatForImageClassification(NatConfig(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4],
                                          kernel_size=3, num_labels=5)).eval()
assert torch.isfinite(nat(torch.randn(1, 3, 32, 32)).logits).all()
print("ok", transformers.__version__)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    if result.stdout.startswith("skip"):
        pytest.skip(result.stdout.strip())
    assert result.stdout.startswith("ok")
