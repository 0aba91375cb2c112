"""NAT-family detection backbone: shapes, COCO dilations, frozen_stages, checkpoint loading, bad input."""

from __future__ import annotations

import math
import re

import pytest
import timm
import torch
from helpers import official_to_hf

from natzoo import models  # noqa: F401  (registers the NAT families with timm)
from natzoo.detection.backbone import NATBackbone, coco_dilations, load_backbone_checkpoint

TINY = {"embed_dim": 32, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8)}
TINY_DINAT_S = {"embed_dim": 32, "depths": (1, 2, 1, 2), "num_heads": (1, 2, 4, 8)}

# The official COCO configs' dilation lists, written out literally.
COCO_DINAT = [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7] * 3, [1, 3, 1, 3, 1]]
COCO_DINAT_MINI = [[1, 28, 1], [1, 7, 1, 14], [1, 3, 1, 5, 1, 7], [1, 3, 1, 3, 1]]
COCO_DINAT_S = [[1, 28], [1, 14], [1, 3, 1, 5, 1, 7] * 3, [1, 3]]
COCO_DINAT_S_TINY = [[1, 28], [1, 14], [1, 3, 1, 5, 1, 7], [1, 3]]


@pytest.mark.parametrize(
    "name, kwargs",
    [("nat_mini", TINY), ("dinat_mini", dict(TINY, dilations="coco")), ("dinat_s_tiny", TINY_DINAT_S)],
)
@pytest.mark.parametrize("size", [(64, 64), (67, 45)])
def test_output_shapes_strides_channels(name, kwargs, size):
    backbone = NATBackbone(name, **kwargs).eval()
    with torch.no_grad():
        outs = backbone(torch.randn(2, 3, *size))
    assert len(outs) == 4
    for i, out in enumerate(outs):
        stride = 4 * 2**i
        # Every stride-2 step rounds up (3x3 s2 p1 convs; DiNAT_s pads to a multiple of 4 and odd sizes by one).
        assert out.shape == (2, 32 * 2**i, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
        assert torch.isfinite(out).all()
    assert backbone.strides == [4, 8, 16, 32]
    assert backbone.out_channels_list == [32, 64, 128, 256]


def test_out_indices_subset_and_norm_keys():
    backbone = NATBackbone("nat_mini", out_indices=(1, 3), **TINY).eval()
    outs = backbone(torch.randn(1, 3, 64, 64))
    assert [o.shape[1] for o in outs] == [64, 256]
    norms = sorted(k for k in backbone.state_dict() if re.match(r"norm\d", k))
    assert norms == ["norm1.bias", "norm1.weight", "norm3.bias", "norm3.weight"]


@pytest.mark.parametrize("name, kwargs", [("nat_mini", TINY), ("dinat_s_tiny", TINY_DINAT_S)])
def test_state_dict_is_the_classifier_trunk_plus_output_norms(name, kwargs):
    """The official detection backbones' keys: the classifier's minus its norm and head, then norm0..norm3."""
    classifier = timm.create_model(name, **kwargs)
    trunk = [k for k in classifier.state_dict() if not k.startswith(("norm.", "head."))]
    norms = [f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias")]
    assert list(NATBackbone(name, **kwargs).state_dict()) == trunk + norms


def test_output_is_layernormed_pre_downsample_map():
    backbone = NATBackbone("nat_mini", **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        outs = backbone(x)
        tokens = backbone.patch_embed(x)
        for blk in backbone.levels[0].blocks:
            tokens = blk(tokens)
        expected = torch.nn.functional.layer_norm(tokens, (32,), backbone.norm0.weight, backbone.norm0.bias, 1e-5)
    torch.testing.assert_close(outs[0], expected.permute(0, 3, 1, 2))


@pytest.mark.parametrize(
    "name, depths, expected",
    [
        ("dinat_tiny", (3, 4, 18, 5), COCO_DINAT),
        ("dinat_small", (3, 4, 18, 5), COCO_DINAT),
        ("dinat_base", (3, 4, 18, 5), COCO_DINAT),
        ("dinat_large", (3, 4, 18, 5), COCO_DINAT),
        ("dinat_mini", (3, 4, 6, 5), COCO_DINAT_MINI),
        ("dinat_s_tiny", (2, 2, 6, 2), COCO_DINAT_S_TINY),
        ("dinat_s_small", (2, 2, 18, 2), COCO_DINAT_S),
        ("dinat_s_large", (2, 2, 18, 2), COCO_DINAT_S),
        ("nat_tiny", (3, 4, 18, 5), None),
    ],
)
def test_coco_dilations_match_official_configs(name, depths, expected):
    assert coco_dilations(name, depths) == expected


def test_coco_dilations_reach_the_blocks():
    with torch.device("meta"):  # structure only: no memory, no init cost
        backbone = NATBackbone("dinat_mini", dilations="coco")
    assert backbone.dilations == COCO_DINAT_MINI
    assert [[blk.attn.dilation[0] for blk in s.blocks] for s in backbone.levels] == COCO_DINAT_MINI


def test_drop_path_rate_is_applied():
    backbone = NATBackbone("nat_mini", drop_path_rate=0.3, **TINY)
    last = backbone.levels[3].blocks[0].drop_path
    assert last.drop_prob == pytest.approx(0.3)


def _expected_frozen(frozen_stages: int, stage_attr: str) -> tuple[str, ...]:
    # -1 nothing; 0/1 patch_embed; k >= 2 patch_embed and stages 0..k-2 (with their downsamplers).
    if frozen_stages < 0:
        return ()
    return ("patch_embed.",) + tuple(f"{stage_attr}.{i}." for i in range(frozen_stages - 1))


@pytest.mark.parametrize("frozen_stages", [-1, 0, 1, 2, 3, 5])
def test_frozen_stages_freeze_exactly_the_intended_parameters(frozen_stages):
    backbone = NATBackbone("nat_mini", frozen_stages=frozen_stages, **TINY)
    prefixes = _expected_frozen(frozen_stages, "levels")
    for _ in range(2):
        backbone.train()
        for name, param in backbone.named_parameters():
            assert param.requires_grad == (not name.startswith(prefixes)), name
        for name, module in backbone.named_modules():
            if name:
                assert module.training == (not (name + ".").startswith(prefixes)), name
        backbone.eval()
    assert all(getattr(backbone, f"norm{i}").weight.requires_grad for i in range(4))
    if 2 <= frozen_stages <= 4:
        assert not any(p.requires_grad for p in backbone.levels[frozen_stages - 2].downsample.parameters())


def test_frozen_stages_dinat_s_and_inside_detector():
    from natzoo.detection.detectors import build_detector

    detector = build_detector("fasterrcnn", "dinat_s_tiny", 3, frozen_stages=3, fpn_channels=32,
                              representation_size=32, **TINY_DINAT_S)
    detector.train()
    body = detector.backbone.body
    prefixes = _expected_frozen(3, "layers")
    frozen = {n for n, p in body.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in body.named_parameters() if n.startswith(prefixes)}
    assert not body.layers[1].training and body.layers[2].training and not body.patch_embed.training
    assert all(p.requires_grad for p in detector.backbone.fpn.parameters())


EXPECTED_MISSING = sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
EXPECTED_UNEXPECTED = sorted(["norm.weight", "norm.bias", "head.weight", "head.bias"])


@pytest.fixture(scope="module")
def classifier():
    torch.manual_seed(0)
    return timm.create_model("nat_mini", layer_scale=1e-5, **TINY)


@pytest.mark.parametrize("fmt", ["official", "hf", "lightning"])
def test_classification_checkpoint_reports_exactly_expected_keys(classifier, fmt, tmp_path):
    sd = classifier.state_dict()
    if fmt == "official":
        payload = sd
    elif fmt == "hf":
        payload = official_to_hf(sd, "nat")
        assert not any("qkv" in k or "gamma" in k for k in payload)  # the layout really differs
    else:
        payload = {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(payload, path)
    backbone = NATBackbone("nat_mini", layer_scale=1e-5, **TINY)
    result = load_backbone_checkpoint(backbone, path)
    assert sorted(result.missing_keys) == EXPECTED_MISSING
    assert sorted(result.unexpected_keys) == EXPECTED_UNEXPECTED
    loaded = backbone.state_dict()
    for key, value in sd.items():
        if key in loaded:
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0, msg=key)


def test_pretrained_argument_loads_and_downstream_checkpoint_roundtrip(classifier, tmp_path):
    path = tmp_path / "cls.pth"
    torch.save(classifier.state_dict(), path)
    backbone = NATBackbone("nat_mini", layer_scale=1e-5, pretrained=str(path), **TINY)
    torch.testing.assert_close(backbone.levels[2].blocks[0].attn.rpb, classifier.levels[2].blocks[0].attn.rpb)
    # mmdet-style downstream checkpoint: trunk and output norms under "backbone.", plus neck/head keys.
    downstream = {"state_dict": {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
                                 "neck.lateral_convs.0.conv.weight": torch.zeros(1)}}
    torch.save(downstream, tmp_path / "det.pth")
    other = NATBackbone("nat_mini", layer_scale=1e-5, **TINY)
    result = load_backbone_checkpoint(other, tmp_path / "det.pth")
    assert result.missing_keys == [] and result.unexpected_keys == []
    torch.testing.assert_close(other.norm3.weight, backbone.norm3.weight)


def test_checkpoint_with_other_mismatch_is_rejected_with_key_names(classifier):
    sd = dict(classifier.state_dict())
    del sd["levels.1.blocks.0.mlp.fc1.bias"]
    sd["levels.9.something"] = torch.zeros(1)
    backbone = NATBackbone("nat_mini", layer_scale=1e-5, **TINY)
    with pytest.raises(ValueError, match=r"levels\.1\.blocks\.0\.mlp\.fc1\.bias") as info:
        load_backbone_checkpoint(backbone, sd)
    assert "levels.9.something" in str(info.value)
    without_ls = NATBackbone("nat_mini", **TINY)  # no gammas: the checkpoint's gamma keys are not tolerated
    with pytest.raises(ValueError, match="gamma1"):
        load_backbone_checkpoint(without_ls, classifier.state_dict())


def test_unknown_backbone_name():
    with pytest.raises(ValueError, match="nat_gigantic"):
        NATBackbone("nat_gigantic")


def test_out_indices_out_of_range():
    with pytest.raises(ValueError, match="out_indices"):
        NATBackbone("nat_mini", out_indices=(0, 4), **TINY)


def test_frozen_stages_beyond_number_of_stages():
    with pytest.raises(ValueError, match="frozen_stages=6"):
        NATBackbone("nat_mini", frozen_stages=6, **TINY)
