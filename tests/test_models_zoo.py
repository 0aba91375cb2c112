"""timm-style behaviour of every registered model, at small widths/depths and small inputs.

Each registered variant keeps its own structure (kernel size, dilation pattern, layer scale, MLP ratio, stem and
downsampler); only widths and depths are reduced so that the whole file runs in seconds on a CPU.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import one_thread  # noqa: F401  (module-wide fixture)
from natzoo.models.nat import NATBlock
from timm.optim import create_optimizer_v2

from natzoo import models, ops

ALL = models.registered_models()
HIERARCHICAL = [n for n in ALL if not ("isotropic" in n or n.startswith("vitrpb"))]
ISOTROPIC = [n for n in ALL if n not in HIERARCHICAL]


def small_args(name: str) -> dict:
    if name in ISOTROPIC:
        return {"embed_dim": 32, "depth": 2, "num_heads": 1, "num_classes": 10}
    # Depth 2 per stage keeps one dilated block per stage for the DiNAT variants.
    return {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8), "num_classes": 10}


def small_input(name: str, batch: int = 2) -> torch.Tensor:
    # Non-square and below every kernel * dilation for the hierarchical models: the padding path runs everywhere.
    return torch.randn(batch, 3, 224, 224) if name in ISOTROPIC else torch.randn(batch, 3, 40, 56)


@pytest.mark.parametrize("name", ALL)
def test_forward_backward(name):
    model = timm.create_model(name, drop_path_rate=0.1, **small_args(name)).train()
    x = small_input(name)
    out = model(x)
    assert out.shape == (2, 10)
    out.logsumexp(-1).sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
    feats = model.eval().forward_features(x)
    if name in ISOTROPIC:
        assert feats.shape == (2, 14, 14, 32)
    else:
        assert feats.shape == (2, 2, 2, 128)  # ceil(40/32) x ceil(56/32), 16 * 2**3 channels (BHWC)


@pytest.mark.parametrize("name", ALL)
def test_features_and_intermediates(name):
    args = small_args(name)
    model = timm.create_model(name, **args).eval()
    x = small_input(name, batch=1)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        early = model.forward_intermediates(x, indices=[0], stop_early=True, intermediates_only=True)
        assert len(early) == 1 and torch.equal(early[0], inter[0])
        if name in HIERARCHICAL:
            assert [t.shape for t in inter] == [(1, 16, 10, 14), (1, 32, 5, 7), (1, 64, 3, 4), (1, 128, 2, 2)]
            # The last level has no downsampler: the normalised last map is forward_features (NCHW).
            last = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)[0]
            assert torch.equal(last, final.permute(0, 3, 1, 2))
        else:
            assert [t.shape for t in inter] == [(1, 32, 14, 14)] * 2

    indices = (0, 1, 2, 3) if name in HIERARCHICAL else (0, 1)
    features = timm.create_model(name, features_only=True, out_indices=indices, **args).eval()
    features.model.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        maps = features(x)
    assert [m.shape for m in maps] == [t.shape for t in inter]
    for got, want in zip(maps, inter):
        assert torch.equal(got, want)
    if name in HIERARCHICAL:
        assert features.feature_info.reduction() == [4, 8, 16, 32]
        assert features.feature_info.channels() == [16, 32, 64, 128]
        assert [i["num_chs"] for i in model.feature_info] == [16, 32, 64, 128]


@pytest.mark.parametrize("name", ALL)
def test_classifier_interface(name):
    model = timm.create_model(name, **small_args(name)).eval()
    x = small_input(name, batch=1)
    width = model.num_features
    assert model.get_classifier().out_features == 10
    with torch.no_grad():
        assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (1, width)
        model.reset_classifier(5)
        assert model(x).shape == (1, 5)
        model.reset_classifier(0)
        assert model(x).shape == (1, width)
        model.reset_classifier(0, global_pool="")
        assert model(x).dim() == 4


@pytest.mark.slow
def test_torch_compile_traces_the_model_whole():
    """Dynamo traces the model code whole, without a graph break (the NA reference is one custom operator there),
    and the compiled model computes what the eager one does, gradients included."""
    from torch._dynamo.utils import counters

    model = timm.create_model("nat_mini", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), drop_path_rate=0.0)
    compiled_model = timm.create_model("nat_mini", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8),
                                       drop_path_rate=0.0)
    compiled_model.load_state_dict(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(compiled_model, backend="eager")
    out = compiled(x)
    reasons = list(counters["graph_break"])
    assert not reasons, reasons
    expected = model(x)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=1e-7, msg=name)


def test_padding_path_matches_manual_pad_then_crop():
    block = NATBlock(16, 2, kernel_size=7, dilation=3, mlp_ratio=2.0).eval()
    with torch.no_grad():
        block.attn.rpb.normal_()
        x = torch.randn(2, 9, 17, 16)  # 9 < 21 (k*d) on H; 17 < 21 on W
        h = block.norm1(x)
        padded = F.pad(h, (0, 0, 0, 21 - 17, 0, 21 - 9))
        q, k, v = block.attn.qkv(padded).reshape(2, 21, 21, 3, 2, 8).unbind(3)
        attn = ops.na2d(q, k, v, kernel_size=7, dilation=3, rpb=block.attn.rpb)[:, :9, :17]
        y = x + block.attn.proj(attn.reshape(2, 9, 17, 16))
        expected = y + block.mlp(block.norm2(y))
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)


def test_clamped_dilation_equals_explicit_smaller_dilation():
    block = NATBlock(16, 2, kernel_size=7, dilation=8, clamp_dilation=True).eval()
    plain = NATBlock(16, 2, kernel_size=7, dilation=8).eval()
    plain.load_state_dict(block.state_dict())
    ref = ops.NeighborhoodAttention2D(16, 2, kernel_size=7, dilation=(2, 1), rel_pos_bias=True).eval()
    ref.load_state_dict(block.attn.state_dict())
    x = torch.randn(1, 15, 13, 16)  # 15 // 7 = 2, 13 // 7 = 1
    with torch.no_grad():
        h = block.norm1(x)
        y = x + ref(h)
        torch.testing.assert_close(block(x), y + block.mlp(block.norm2(y)), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(plain(x), block(x))  # off by default: the official model pads instead
        big = torch.randn(1, 56, 56, 16)
        torch.testing.assert_close(block(big), plain(big), rtol=0, atol=0)  # nothing to clamp at 56 = 7 * 8


def test_dilations_argument_and_errors():
    dil = [[1, 3], [2, 1], [1, 1], [1, 1]]
    model = timm.create_model("dinat_tiny", embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), dilations=dil)
    assert [[b.attn.dilation[0] for b in s.blocks] for s in model.stages] == dil
    nat = timm.create_model(
        "nat_tiny", embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), dilations=(2, 1, 1, 1)
    )
    assert [b.attn.dilation for b in nat.stages[0].blocks] == [(2, 2), (2, 2)]
    with pytest.raises(ValueError, match=r"dilations\[1\] must have 2 entries"):
        timm.create_model(
            "dinat_tiny",
            embed_dim=16,
            depths=(2, 2, 2, 2),
            num_heads=(1, 2, 4, 8),
            dilations=[[1, 1], [1], [1, 1], [1, 1]],
        )
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(1, 4, 32, 32))
    iso = timm.create_model("nat_isotropic_small", embed_dim=32, depth=1, num_heads=1)
    with pytest.raises(ValueError, match="fixed input size"):
        iso(torch.randn(1, 3, 192, 192))


@pytest.mark.parametrize("name", ["dinat_mini", "vitrpb_small"])
def test_grad_checkpointing_gives_same_result(name):
    if name == "dinat_mini":
        args = {"embed_dim": 16, "depths": (1, 2, 1, 1), "num_heads": (1, 2, 4, 8), "drop_path_rate": 0.0}
        x = torch.randn(2, 3, 32, 32)
    else:
        args = {"embed_dim": 32, "depth": 2, "num_heads": 1, "drop_path_rate": 0.0}
        x = torch.randn(1, 3, 224, 224)
    model = timm.create_model(name, **args)
    ckpt = timm.create_model(name, **args)
    ckpt.load_state_dict(model.state_dict())
    ckpt.set_grad_checkpointing(True)
    model(x).sum().backward()
    ckpt(x).sum().backward()
    for (n, p), q in zip(model.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_weight_decay_groups_and_init():
    model = timm.create_model("nat_small", embed_dim=24, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8))
    names = model.no_weight_decay()
    params = dict(model.named_parameters())
    assert {n for n in params if n.endswith("attn.rpb")} <= names
    assert {n for n in params if n.endswith(("gamma1", "gamma2", ".bias")) or ".norm" in n} <= names
    assert not any(n.endswith((".qkv.weight", "fc1.weight", "reduction.weight")) for n in names)
    assert not any(n.endswith("attn.rpb") for n in model.no_weight_decay(include_rpb=False))
    groups = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05).param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(params["levels.0.blocks.0.attn.rpb"]) not in decayed
    assert id(params["levels.0.blocks.0.attn.qkv.weight"]) in decayed
    # The official initialisation.
    assert torch.all(params["levels.2.blocks.1.gamma1"] == 1e-5)
    linear = torch.cat([p.flatten() for n, p in params.items() if n.endswith(("qkv.weight", "fc1.weight"))])
    assert abs(linear.std().item() - 0.02) < 0.002
    assert all(torch.all(p == 0) for n, p in params.items() if n.endswith(("qkv.bias", "fc2.bias", "head.bias")))
    assert all(torch.all(p == 1) for n, p in params.items() if n.endswith("norm1.weight"))
    rates = [b.drop_path.drop_prob for s in model.stages for b in s.blocks if hasattr(b.drop_path, "drop_prob")]
    assert rates == pytest.approx(torch.linspace(0, 0.3, 5)[1:].tolist())
    groups = timm.models.group_parameters(model, model.group_matcher())
    firsts = [names[0].rsplit(".", 2)[0] for names in groups.values()]
    # Layer-decay order: stem, then each level's blocks followed by its downsampler, then the head.
    assert firsts == [
        "patch_embed.proj",
        "levels.0.blocks",
        "levels.0.downsample",
        "levels.1.blocks",
        "levels.1.downsample",
        "levels.2.blocks",
        "levels.2.blocks",
        "levels.2.downsample",
        "levels.3.blocks",
        "head",
    ]


def test_patch_merging_order_and_dinat_s_stem_padding():
    model = timm.create_model("dinat_s_tiny", embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 2, 4)).eval()
    merge = model.stages[0].downsample
    x = torch.randn(1, 5, 7, 8)
    with torch.no_grad():
        xp = F.pad(x, (0, 0, 0, 1, 0, 1))  # odd H and W: one zero row/column at the bottom/right
        # Official order: x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2] (rows, cols), norm, reduction.
        cat = torch.cat([xp[:, 0::2, 0::2], xp[:, 1::2, 0::2], xp[:, 0::2, 1::2], xp[:, 1::2, 1::2]], dim=-1)
        torch.testing.assert_close(merge(x), merge.reduction(merge.norm(cat)))
        img = torch.randn(1, 3, 30, 29)
        embed = model.patch_embed
        ref = embed.norm(embed.proj(F.pad(img, (0, 3, 0, 2))).permute(0, 2, 3, 1))
        torch.testing.assert_close(embed(img), ref)


def test_nat_stem_and_downsampler_order():
    model = timm.create_model("nat_mini", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8)).eval()
    img = torch.randn(1, 3, 33, 30)
    with torch.no_grad():
        conv0, conv1 = model.patch_embed.proj
        tokens = model.patch_embed(img)
        ref = model.patch_embed.norm(conv1(conv0(img)).permute(0, 2, 3, 1))  # no activation/norm between convs
        torch.testing.assert_close(tokens, ref)
        assert tokens.shape == (1, 9, 8, 16)  # ceil(ceil(33/2)/2), ceil(ceil(30/2)/2)
        down = model.stages[0].downsample
        ref = down.norm(down.reduction(tokens.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))  # norm after the conv
        torch.testing.assert_close(down(tokens), ref)


def test_training_after_inference_mode_eval():
    """Index tables first built under inference mode (a validation sanity check) must not break later autograd."""
    model = timm.create_model("nat_mini", embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8))
    x = torch.randn(1, 3, 52, 44)  # a 13x11 first-stage map no other test uses: its tables are built here first
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).sum().backward()
