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
import inspect
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


# ---- NATTEN's signatures, as facts read from its source ------------------------------------------------------------
# Each entry: (release and file in SHI-Labs/NATTEN, name in natzoo.compat.natten, NATTEN's parameters in order with
# their defaults). REQUIRED marks a parameter without a default. The lists are transcribed from NATTEN's source at
# the tag named, not generated from natzoo's code.
REQUIRED = object()
_R = REQUIRED
_MOD_017 = [("dim", _R), ("num_heads", _R), ("kernel_size", _R), ("dilation", 1), ("is_causal", False),
            ("rel_pos_bias", False), ("qkv_bias", True), ("qk_scale", None), ("attn_drop", 0.0), ("proj_drop", 0.0),
            ("use_experimental_ops", False)]
_MOD_015 = [("dim", _R), ("num_heads", _R), ("kernel_size", _R), ("dilation", 1), ("bias", True), ("qkv_bias", True),
            ("qk_scale", None), ("attn_drop", 0.0), ("proj_drop", 0.0)]
_QK_017 = [("query", _R), ("key", _R), ("kernel_size", _R), ("dilation", 1), ("additional_keys", None),
           ("is_causal", False), ("rpb", None)]
_AV_017 = [("attn", _R), ("value", _R), ("kernel_size", _R), ("dilation", 1), ("additional_values", None),
           ("is_causal", False)]
_FUSED_0175 = [("query", _R), ("key", _R), ("value", _R), ("kernel_size", _R), ("dilation", 1), ("is_causal", False),
               ("rpb", None), ("scale", None), ("additional_keys", None), ("additional_values", None),
               ("xformers_kwargs", None)]
_QK_015 = [("query", _R), ("key", _R), ("kernel_size", _R), ("dilation", _R), ("additional_keys", None)]
_AV_015 = [("attn", _R), ("value", _R), ("kernel_size", _R), ("dilation", _R), ("additional_values", None)]
_QK3_015 = [("query", _R), ("key", _R), ("kernel_size_d", _R), ("kernel_size", _R), ("dilation_d", _R),
            ("dilation", _R), ("additional_keys", None)]
_AV3_015 = [("attn", _R), ("value", _R), ("kernel_size_d", _R), ("kernel_size", _R), ("dilation_d", _R),
            ("dilation", _R), ("additional_values", None)]
_BIAS_015 = [("query", _R), ("key", _R), ("bias", _R), ("kernel_size", _R), ("dilation", _R),
             ("additional_keys", None)]
_DEVICE = [("device_index", None)]
_MODE = [("mode", True)]
NATTEN_SIGNATURES = [
    # v0.17.5 src/natten/na1d.py, na2d.py, na3d.py: NeighborhoodAttention{1,2,3}D.__init__
    ("0.17.5 na1d.py", "NeighborhoodAttention1D", _MOD_017),
    ("0.17.5 na2d.py", "NeighborhoodAttention2D", _MOD_017),
    ("0.17.5 na3d.py", "NeighborhoodAttention3D", _MOD_017),
    # v0.14.4 natten/natten2d.py: the deprecated NeighborhoodAttention (argument order of 0.14.0-0.14.4)
    ("0.14.4 natten2d.py", "NeighborhoodAttention", [("dim", _R), ("kernel_size", _R), ("num_heads", _R),
                                                      ("qkv_bias", True), ("qk_scale", None), ("attn_drop", 0.0),
                                                      ("proj_drop", 0.0), ("dilation", None)]),
    # v0.17.5 src/natten/functional.py
    ("0.17.5 functional.py", "functional.na1d_qk", _QK_017),
    ("0.17.5 functional.py", "functional.na2d_qk", _QK_017),
    ("0.17.5 functional.py", "functional.na3d_qk", _QK_017),
    ("0.17.5 functional.py", "functional.na1d_av", _AV_017),
    ("0.17.5 functional.py", "functional.na2d_av", _AV_017),
    ("0.17.5 functional.py", "functional.na3d_av", _AV_017[:3] + [("dilation", _R)] + _AV_017[4:]),
    ("0.17.5 functional.py", "functional.na1d", _FUSED_0175),
    ("0.17.5 functional.py", "functional.na2d", _FUSED_0175),
    ("0.17.5 functional.py", "functional.na3d", _FUSED_0175),
    # v0.17.4 src/natten/functional.py (removed in 0.17.5): the deprecated legacy names
    ("0.17.4 functional.py", "functional.natten1dqkrpb",
     [("query", _R), ("key", _R), ("rpb", _R), ("kernel_size", _R), ("dilation", _R)]),
    ("0.17.4 functional.py", "functional.natten2dqkrpb",
     [("query", _R), ("key", _R), ("rpb", _R), ("kernel_size", _R), ("dilation", _R)]),
    ("0.17.4 functional.py", "functional.natten3dqkrpb",
     [("query", _R), ("key", _R), ("rpb", _R), ("kernel_size_d", _R), ("kernel_size", _R), ("dilation_d", _R),
      ("dilation", _R)]),
    # v0.15.1 src/natten/functional.py (natten{1,2,3}d{qk,av} are aliases of na{1,2,3}d_{qk,av} there)
    ("0.15.1 functional.py", "functional.na1d_qk", _QK_015),
    ("0.15.1 functional.py", "functional.na2d_qk", _QK_015),
    ("0.15.1 functional.py", "functional.na1d_av", _AV_015),
    ("0.15.1 functional.py", "functional.na2d_av", _AV_015),
    ("0.15.1 functional.py", "functional.natten1dqk", _QK_015),
    ("0.15.1 functional.py", "functional.natten2dqk", _QK_015),
    ("0.15.1 functional.py", "functional.natten1dav", _AV_015),
    ("0.15.1 functional.py", "functional.natten2dav", _AV_015),
    ("0.15.1 functional.py", "functional.natten3dqk", _QK3_015),
    ("0.15.1 functional.py", "functional.natten3dav", _AV3_015),
    ("0.15.1 functional.py", "functional.na1d_qk_with_bias", _BIAS_015),
    ("0.15.1 functional.py", "functional.na2d_qk_with_bias", _BIAS_015),
    ("0.15.1 functional.py", "functional.na3d_qk_with_bias",
     [("query", _R), ("key", _R), ("bias", _R), ("kernel_size_d", _R), ("kernel_size", _R), ("dilation_d", _R),
      ("dilation", _R), ("additional_keys", None)]),
    ("0.15.1 functional.py", "functional.has_half", _DEVICE),
    ("0.15.1 functional.py", "functional.has_bfloat", _DEVICE),
    ("0.15.1 functional.py", "functional.has_gemm", _DEVICE),
    ("0.15.1 functional.py", "functional.has_tf32_gemm", _DEVICE),
    ("0.15.1 functional.py", "functional.has_fp64_gemm", _DEVICE),
    ("0.15.1 functional.py", "functional.get_device_cc", _DEVICE),
    # v0.14.6 src/natten/functional.py
    ("0.14.6 functional.py", "functional.natten2dqkrpb",
     [("query", _R), ("key", _R), ("rpb", _R), ("kernel_size", _R), ("dilation", _R)]),
    ("0.14.6 functional.py", "functional.natten2dav",
     [("attn", _R), ("value", _R), ("kernel_size", _R), ("dilation", _R)]),
    # v0.17.5 src/natten/context.py
    ("0.17.5 context.py", "set_memory_usage_preference", [("pref", "default")]),
    ("0.17.5 context.py", "use_deterministic_algorithms", _MODE),
    ("0.17.5 context.py", "use_kv_parallelism_in_fused_na", _MODE),
    ("0.17.5 context.py", "use_fused_na", [("mode", True), ("kv_parallel", True), ("use_flex_attention", False),
                                           ("force_flex_attention", False)]),
    ("0.17.5 context.py", "use_fna", [("mode", True), ("kv_parallel", True), ("use_flex_attention", False),
                                      ("force_flex_attention", False)]),
    ("0.17.5 context.py", "use_autotuner", [(name, None) for name in (
        "forward_pass", "backward_pass", "thorough_mode_forward", "thorough_mode_backward", "warmup_steps_forward",
        "warmup_steps_backward", "steps_forward", "steps_backward")]),
    ("0.17.5 context.py", "use_tf32_in_gemm_na", _MODE),
    ("0.17.5 context.py", "use_tiled_na", _MODE),
    ("0.17.5 context.py", "use_gemm_na", _MODE),
    *[("0.17.5 context.py", name, _DEVICE) for name in ("has_half", "has_bfloat", "has_gemm", "has_fna",
                                                         "has_fused_na", "has_tf32_gemm", "has_fp32_gemm",
                                                         "has_fp64_gemm")],
    *[("0.17.5 context.py", name, []) for name in (
        "has_cuda", "use_flex_attention", "force_flex_attention", "disable_autotuner", "enable_tf32", "disable_tf32",
        "enable_gemm_na", "disable_gemm_na", "enable_tiled_na", "disable_tiled_na", "is_fused_na_enabled",
        "is_fna_enabled", "get_memory_usage_preference")],
]
# Where natzoo deliberately gives a default NATTEN lacks (a call valid in NATTEN still means the same).
ADDED_DEFAULTS = {
    ("functional.na1d_qk", "dilation"), ("functional.na2d_qk", "dilation"), ("functional.na1d_av", "dilation"),
    ("functional.na2d_av", "dilation"), ("functional.na3d_av", "dilation"),  # 0.17's default of 1
    # None selects the 0.14.0-0.14.5 forms (query, key, rpb, dilation) and (attn, value, dilation)
    ("functional.natten1dqkrpb", "dilation"), ("functional.natten2dqkrpb", "dilation"),
    ("functional.natten1dav", "dilation"), ("functional.natten2dav", "dilation"),
}
# NATTEN's 0.17.5 natten/__init__.py __all__ (the top-level names code that follows its docs uses).
NATTEN_0175_ALL = """NeighborhoodAttention1D NeighborhoodAttention2D NeighborhoodAttention3D
are_deterministic_algorithms_enabled use_deterministic_algorithms use_kv_parallelism_in_fused_na
is_kv_parallelism_in_fused_na_enabled use_fna is_fna_enabled use_fused_na is_fused_na_enabled use_autotuner
force_flex_attention disable_autotuner is_autotuner_enabled is_autotuner_enabled_for_forward
is_autotuner_enabled_for_backward is_autotuner_thorough_for_forward is_autotuner_thorough_for_backward has_cuda
has_half has_bfloat has_gemm has_fna has_fused_na has_tf32_gemm has_fp32_gemm has_fp64_gemm use_tf32_in_gemm_na
use_tiled_na use_gemm_na use_flex_attention is_tf32_in_gemm_na_enabled is_tiled_na_enabled is_gemm_na_enabled
set_memory_usage_preference get_memory_usage_preference is_memory_usage_default is_memory_usage_strict
is_memory_usage_unrestricted enable_tf32 disable_tf32 enable_gemm_na disable_gemm_na enable_tiled_na
disable_tiled_na""".split()


def _ours(natten, dotted):
    obj = natten
    for part in dotted.split("."):
        obj = getattr(obj, part)
    sig = inspect.signature(obj.__init__ if isinstance(obj, type) else obj)
    return [p for p in sig.parameters.values() if p.name != "self"]


@pytest.mark.parametrize("release, name, params", NATTEN_SIGNATURES, ids=lambda v: v if isinstance(v, str) else "")
def test_signatures_match_natten(natten, release, name, params):
    """NATTEN's parameters are ours, in its order, positional where NATTEN's are, with its defaults; anything we
    add comes after them with a default (so every call NATTEN accepted binds the same way here)."""
    ours = _ours(natten, name)
    positional = [p for p in ours if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert [p.name for p in positional[:len(params)]] == [n for n, _ in params], f"{release} {name}"
    for p, (param, default) in zip(positional, params):
        if default is REQUIRED:
            assert p.default is p.empty or (name, param) in ADDED_DEFAULTS, f"{release} {name}({param}) has a default"
        else:
            assert p.default is not p.empty and type(p.default) is type(default) and p.default == default, (
                f"{release} {name}({param}={default!r}) is {param}={p.default!r} here")
    for p in ours[len(params):]:
        assert p.kind in (p.VAR_KEYWORD,) or p.default is not p.empty, f"{name}: added {p.name} has no default"


def test_signatures_of_the_015_forms(natten):
    """NATTEN 0.15.1 (src/natten/functional.py): the 3-D forms that share their names with 0.17's, and the 3-D
    module's depth arguments (src/natten/natten3d.py), which are keywords here (0.17's order holds positionally)."""
    from natten.functional import na3d_av, na3d_qk

    for fn, params in ((na3d_qk, _QK3_015), (na3d_av, _AV3_015)):
        sig = fn.natten_0_15_signature.parameters.values()
        assert [(p.name, REQUIRED if p.default is p.empty else p.default) for p in sig] == params
    # v0.15.1 natten3d.py: (dim, num_heads, kernel_size, kernel_size_d=None, dilation=1, dilation_d=None, bias=True,
    # qkv_bias=True, qk_scale=None, attn_drop=0.0, proj_drop=0.0); natten1d.py/natten2d.py of v0.14.6 and v0.15.1
    # as _MOD_015.
    params = inspect.signature(natten.NeighborhoodAttention3D.__init__).parameters
    assert params["kernel_size_d"].default is None and params["dilation_d"].default is None
    for cls in (natten.NeighborhoodAttention1D, natten.NeighborhoodAttention2D, natten.NeighborhoodAttention3D):
        params = inspect.signature(cls.__init__).parameters
        assert all(name in params for name, _ in _MOD_015)
        # The one deliberate divergence: `bias` defaults to NATTEN 0.17's "no rpb", not 0.14/0.15's True.
        assert params["bias"].default is None and params["bias"].kind is inspect.Parameter.KEYWORD_ONLY


def test_top_level_names_of_natten_0175(natten):
    missing = [name for name in NATTEN_0175_ALL if not hasattr(natten, name)]
    assert not missing
    import natten.context as context

    assert context.MemoryUsagePreference.Default.value == 0 and hasattr(context, "AutotunerContext")


def test_official_nat_layer_arguments(natten):
    """The official NAT classification layer's call (dilation=None, `rel_pos_bias=True` when `natten.context`
    exists, else `bias=True`) and NATTEN 0.17's None for is_causal: built, and the same as dilation=1."""
    from natten import NeighborhoodAttention2D

    extra = {"rel_pos_bias": True} if hasattr(natten, "context") else {"bias": True}
    torch.manual_seed(0)
    layer = NeighborhoodAttention2D(8, kernel_size=3, dilation=None, num_heads=2, qkv_bias=True, qk_scale=None,
                                    attn_drop=0.0, proj_drop=0.0, **extra).double()
    assert layer.dilation == (1, 1) and layer.rpb.shape == (2, 5, 5)
    same = NeighborhoodAttention2D(8, 2, 3, 1, None, bias=True).double()
    same.load_state_dict(layer.state_dict())
    x = torch.randn(1, 5, 6, 8, dtype=torch.float64)
    torch.testing.assert_close(layer(x), same(x))
    old = natten.NeighborhoodAttention(8, 3, 2)  # 0.14.0-0.14.4: (dim, kernel_size, num_heads), rpb always
    assert old.rpb.shape == (2, 5, 5) and old.dilation == (1, 1)
    m3 = natten.NeighborhoodAttention3D(8, 2, 3, dilation=None, kernel_size_d=None, dilation_d=None,
                                        rel_pos_bias=None)
    assert m3.kernel_size == (3, 3, 3) and m3.dilation == (1, 1, 1) and m3.rpb is None
    q = torch.randn(1, 2, 5, 6, 4)
    torch.testing.assert_close(natten.functional.na2d_qk(q, q, 3, None, None, None), natten.functional.na2d_qk(q, q, 3))


def _unfused_attention(qk, av, q, k, v, ek, ev):
    """softmax(qk(q * scale)) then av, in NATTEN's heads-first layout, back to heads-last [B, *S, H, D]."""
    hq, hk, hv = _heads_first(q, k, v)
    weights = qk(hq * q.shape[-1] ** -0.5, hk, ek.transpose(1, 2)).softmax(-1)
    return av(weights, hv, ev.transpose(1, 2)).movedim(1, -2)


def test_v015_call_forms_with_extra_tokens_match_the_oracle(natten):
    """NATTEN 0.15's calls with extra tokens, positional and keyword (3-D: kernel_size_d, kernel_size, dilation_d,
    dilation), against the dense float64 oracle."""
    from natten import functional as nf

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 3, 4, 4, 2, 4, dtype=torch.float64) for _ in range(3))
    ek, ev = (torch.randn(1, 2, 2, 4, dtype=torch.float64) for _ in range(2))
    rpb = torch.randn(2, 3, 3, 3, dtype=torch.float64)
    ks, dil = (2, 2, 2), (1, 2, 2)  # kernel_size_d=2, kernel_size=2, dilation_d=1, dilation=2
    want, _ = dense_na(q, k, v, ks, dilation=dil, additional_keys=ek, additional_values=ev)
    want_rpb, _ = dense_na(q, k, v, ks, dilation=dil, rpb=rpb, additional_keys=ek, additional_values=ev)
    forms = {
        "positional": (lambda a, b, e: nf.na3d_qk(a, b, 2, 2, 1, 2, e), lambda w, c, e: nf.na3d_av(w, c, 2, 2, 1, 2, e)),
        "keywords": (lambda a, b, e: nf.na3d_qk(a, b, 2, 2, 1, 2, additional_keys=e),
                     lambda w, c, e: nf.na3d_av(w, c, 2, 2, 1, 2, additional_values=e)),
        "all keywords": (lambda a, b, e: nf.na3d_qk(query=a, key=b, kernel_size_d=2, kernel_size=2, dilation_d=1,
                                                    dilation=2, additional_keys=e),
                         lambda w, c, e: nf.na3d_av(attn=w, value=c, kernel_size_d=2, kernel_size=2, dilation_d=1,
                                                    dilation=2, additional_values=e)),
        "aliases": (lambda a, b, e: nf.natten3dqk(a, b, 2, 2, 1, 2, e), lambda w, c, e: nf.natten3dav(w, c, 2, 2, 1, 2, e)),
        "0.17": (lambda a, b, e: nf.na3d_qk(a, b, ks, dil, e), lambda w, c, e: nf.na3d_av(w, c, ks, dil, e)),
    }
    for name, (qk, av) in forms.items():
        torch.testing.assert_close(_unfused_attention(qk, av, q, k, v, ek, ev), want, atol=1e-12, rtol=1e-10,
                                   msg=name)
    with_bias = (lambda a, b, e: nf.na3d_qk_with_bias(a, b, rpb, 2, 2, 1, 2, e),
                 lambda w, c, e: nf.na3d_av(w, c, 2, 2, 1, 2, e))
    torch.testing.assert_close(_unfused_attention(*with_bias, q, k, v, ek, ev), want_rpb, atol=1e-12, rtol=1e-10)
    with pytest.raises(TypeError, match=r"na3d_qk\(\) missing 1 required positional argument: 'dilation'"):
        nf.na3d_qk(q, k, 2, 2, 1)

    # 1-D and 2-D: (query, key, kernel_size, dilation, additional_keys), the same positions in 0.15 and 0.17.
    q2, k2, v2 = (t[:, 0] for t in (q, k, v))  # [1, 4, 4, 2, 4]
    rpb2 = torch.randn(2, 5, 5, dtype=torch.float64)
    want2, _ = dense_na(q2, k2, v2, 3, rpb=rpb2, additional_keys=ek, additional_values=ev)
    got2 = _unfused_attention(lambda a, b, e: nf.na2d_qk_with_bias(a, b, rpb2, 3, 1, e),
                              lambda w, c, e: nf.natten2dav(w, c, 3, 1, e), q2, k2, v2, ek, ev)
    torch.testing.assert_close(got2, want2, atol=1e-12, rtol=1e-10)
    q1, k1, v1 = (t[:, 0, 0] for t in (q, k, v))  # [1, 4, 2, 4]
    want1, _ = dense_na(q1, k1, v1, 2, dilation=2, additional_keys=ek, additional_values=ev)
    got1 = _unfused_attention(lambda a, b, e: nf.na1d_qk(a, b, 2, 2, e), lambda w, c, e: nf.na1d_av(w, c, 2, 2, e),
                              q1, k1, v1, ek, ev)
    torch.testing.assert_close(got1, want1, atol=1e-12, rtol=1e-10)


def test_nested_inputs_match_the_oracle(natten):
    """Nested tensors (NATTEN 0.15-0.17): one result per component, each as for the plain tensor (oracle), with
    extra tokens; the fused op takes them too; gradients reach every component."""
    from natten import functional as nf

    torch.manual_seed(0)
    shapes = [(1, 5, 6), (2, 4, 3)]  # (batch, X, Y) per component; 2 heads, head_dim 4
    qkv = [[torch.randn(b, x, y, 2, 4, dtype=torch.float64, requires_grad=True) for _ in range(3)]
           for b, x, y in shapes]
    extra = [[torch.randn(b, 2, 2, 4, dtype=torch.float64) for _ in range(2)] for b, _, _ in shapes]
    nest = torch.nested.as_nested_tensor
    nq, nk, nv = (nest([_heads_first(*c)[i] for c in qkv]) for i in range(3))
    nek, nev = (nest([e[i].transpose(1, 2) for e in extra]) for i in range(2))
    weights = nf.na2d_qk(nq * 0.5, nk, 3, additional_keys=nek, is_causal=(False, True)).softmax(-1)
    out = nf.na2d_av(weights, nv, 3, additional_values=nev, is_causal=(False, True))
    fused = nf.na2d(nest([c[0] for c in qkv]), nest([c[1] for c in qkv]), nest([c[2] for c in qkv]), 3,
                    is_causal=(False, True), additional_keys=nest([e[0] for e in extra]),
                    additional_values=nest([e[1] for e in extra]))
    assert out.is_nested and fused.is_nested
    for i, ((q, k, v), (ek, ev)) in enumerate(zip(qkv, extra)):
        want, _ = dense_na(q, k, v, 3, is_causal=(False, True), additional_keys=ek, additional_values=ev)
        torch.testing.assert_close(out.unbind()[i].movedim(1, -2), want, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(fused.unbind()[i], want, atol=1e-12, rtol=1e-10)
    sum(o.sum() for o in out.unbind()).backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for c in qkv for t in c)
    with pytest.raises(ValueError, match="every tensor input but rpb must be nested, got query nested and key not"):
        nf.na2d_qk(nq, _heads_first(*qkv[0])[1], 3)
    with pytest.raises(ValueError, match=r"nested component 1: na2d_qk: kernel_size \* dilation"):
        nf.na2d_qk(nq, nk, 4)


@pytest.fixture
def switches(natten):
    yield natten
    natten.context.NattenContext.reset()
    natten.context.AutotunerContext.reset()
    for use in (natten.use_tiled_na, natten.use_gemm_na, natten.use_tf32_in_gemm_na):
        use(True)


def test_switches_record_and_validate_as_natten(switches, monkeypatch):
    """NATTEN 0.17's switches: recorded (read back by their is_/get_ functions, NATTEN's defaults), validated with
    NATTEN's exception types, refused in deterministic mode; natzoo's results do not depend on them."""
    natten = switches
    from natten.context import MemoryUsagePreference

    assert not natten.is_fused_na_enabled() and not natten.is_kv_parallelism_in_fused_na_enabled()
    natten.use_fused_na()
    assert natten.is_fused_na_enabled() and natten.is_kv_parallelism_in_fused_na_enabled()
    natten.use_fused_na(True, kv_parallel=False)
    assert natten.is_fna_enabled() and not natten.is_kv_parallelism_in_fused_na_enabled()
    natten.force_flex_attention()
    assert natten.context.should_force_flex_attention()
    natten.use_fused_na(False)
    assert not natten.is_fused_na_enabled() and not natten.context.should_use_flex_attention()
    natten.set_memory_usage_preference("strict")
    assert natten.get_memory_usage_preference() == MemoryUsagePreference.Strict and natten.is_memory_usage_strict()
    for bad in ("invalid", 0):
        with pytest.raises(ValueError, match="set_memory_usage_preference: pref must be one of"):
            natten.set_memory_usage_preference(bad)
    natten.use_autotuner(False, True, False, True, steps_backward=17)
    assert (not natten.is_autotuner_enabled_for_forward() and natten.is_autotuner_enabled_for_backward()
            and natten.is_autotuner_thorough_for_backward() and natten.context.AutotunerContext.steps_backward == 17)
    with pytest.raises(ValueError, match="steps_forward must be an int"):
        natten.use_autotuner(steps_forward="abc")
    natten.disable_autotuner()
    assert not natten.is_autotuner_enabled()
    assert natten.is_gemm_na_enabled() and not natten.disable_gemm_na() and not natten.is_gemm_na_enabled()
    natten.use_tiled_na(False)
    assert not natten.is_tiled_na_enabled()
    assert not natten.has_gemm() and natten.has_fna() and natten.has_half() and natten.functional.has_bfloat()

    natten.use_deterministic_algorithms()
    assert natten.are_deterministic_algorithms_enabled()
    with pytest.raises(RuntimeError, match="deterministic mode is on"):
        natten.use_autotuner(True)
    with pytest.raises(RuntimeError, match="deterministic mode is on"):
        natten.use_fused_na(True, kv_parallel=True)
    natten.use_fused_na(False, kv_parallel=True)  # kv_parallel is ignored when turning fused attention off
    natten.use_deterministic_algorithms(False)
    monkeypatch.setattr(torch, "are_deterministic_algorithms_enabled", lambda: True)
    with pytest.warns(UserWarning, match="stays off"):
        natten.use_autotuner(True)
    assert not natten.is_autotuner_enabled()


def test_errors_show_the_shapes_the_caller_passed(natten):
    """Errors of the heads-first ops name the caller's [B, heads, *spatial, ...] shapes, never the heads-last view
    natzoo computes on."""
    from natten import functional as nf

    q = torch.randn(1, 2, 6, 5, 4)  # heads-first; natzoo's view is (1, 6, 5, 2, 4)
    cases = [
        (lambda: nf.na2d_qk(q, torch.randn(1, 2, 6, 4, 4), 3), "key.shape=(1, 2, 6, 4, 4)"),
        (lambda: nf.na2d_qk(q, q, 6), "query.shape=(1, 2, 6, 5, 4)"),
        (lambda: nf.natten2dqkrpb(q, torch.randn(1, 3, 6, 5, 4), None, 3, 1), "key.shape=(1, 3, 6, 5, 4)"),
        (lambda: nf.na2d_av(torch.randn(1, 2, 6, 5, 8), q, 3), "attn.shape=(1, 2, 6, 5, 8)"),
        (lambda: nf.na2d_qk(q, q, 3, additional_keys=torch.randn(1, 3, 2, 4)), "additional_keys.shape=(1, 3, 2, 4)"),
        (lambda: nf.na2d_qk(q[0], q[0], 3), "query must be heads-first [B, heads, *spatial(2), head_dim]"),
    ]
    for call, shown in cases:
        with pytest.raises(ValueError) as err:
            call()
        assert shown in str(err.value) and "(1, 6, 5, 2, 4)" not in str(err.value), str(err.value)
        assert err.value.__suppress_context__ or err.value.__context__ is None  # the permuted message is not chained
