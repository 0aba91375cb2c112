"""timm conformance: the checks of timm's model test-suite, applied to every registered model.

Written from timm's conventions (its ``tests/test_models.py``): default cfgs (``pool_size`` is the unpooled feature
map at ``input_size``, ``num_features``/``head_hidden_size``, classifier and first-conv names), classifier removal,
``features_only`` (getter, hook and FX extractors), ``forward_intermediates``, and FX forward/backward through
timm's FX helpers and torchvision's ``create_feature_extractor``.

Cost: the cfg, feature and intermediate checks run every variant at its native resolution on the meta device
(shapes only, no arithmetic). The checks that compare values or need gradients (FX forward/backward, extractor
equality) run every variant at small widths and depths on real tensors (its own kernel size, dilation pattern,
layer scale, stem and downsampler), plus one full-size FX trace per family on the meta device. TorchScript is not
supported (the op's dispatch and checks are plain Python) and is not tested.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
from helpers import one_thread  # noqa: F401  (module-wide fixture)
from timm.models import FeatureInfo
from torchvision.models import feature_extraction as tv_fx

from natzoo import models

ALL = models.registered_models()
TAGGED = sorted(n for n in timm.list_models(pretrained=True) if n.split(".", 1)[0] in ALL)
ISOTROPIC = [n for n in ALL if "isotropic" in n or n.startswith("vitrpb")]
HIERARCHICAL = [n for n in ALL if n not in ISOTROPIC]
# One full-size model per structure: NAT, DiNAT 11x11 at 384, DiNAT_s at 384, DiNAT-iso, ViT-rpb.
FULL_SIZE_FX = ["nat_tiny", "dinat_large_384_11x11", "dinat_s_large_384", "dinat_isotropic_base", "vitrpb_base"]


def meta_model(name: str, **kwargs) -> torch.nn.Module:
    """Shape-only model. Only its construction runs under the meta device context: a forward inside the context
    would also create the op's cached CPU index tables on the meta device."""
    with torch.device("meta"):
        return timm.create_model(name, **kwargs).eval()


def meta_input(model: torch.nn.Module, batch: int = 1) -> torch.Tensor:
    return torch.empty(batch, *model.pretrained_cfg["input_size"], device="meta")


def small_model(name: str, **kwargs) -> torch.nn.Module:
    if name in ISOTROPIC:
        args = {"embed_dim": 32, "depth": 2, "num_heads": 2}
    else:
        # Depth 2 per stage keeps one dilated block per stage for the DiNAT variants.
        args = {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8)}
    return timm.create_model(name, **dict(args, **kwargs))


def small_input(name: str, batch: int = 1) -> torch.Tensor:
    # Below every kernel * dilation for the hierarchical models, and not square: the padding path runs everywhere.
    return torch.randn(batch, 3, 224, 224) if name in ISOTROPIC else torch.randn(batch, 3, 40, 56)


@pytest.mark.parametrize("name", TAGGED)
def test_default_cfg(name):
    model = meta_model(name)
    cfg = model.pretrained_cfg
    state = model.state_dict()
    assert cfg["classifier"] + ".weight" in state
    assert cfg["first_conv"] + ".weight" in state
    assert model.num_classes >= 0 and model.num_features > 0 and model.head_hidden_size > 0
    x = meta_input(model)
    features = model.forward_features(x)  # unpooled, channels-last
    assert model.output_fmt == "NHWC"
    assert tuple(features.shape[1:3]) == tuple(cfg["pool_size"])
    assert features.shape[3] == model.num_features
    assert model.forward_head(features, pre_logits=True).shape == (1, model.head_hidden_size)
    assert model.forward_head(features).shape == (1, model.num_classes)
    # Classifier removal (forward = forward_head(forward_features); the full forward runs once, below).
    with torch.device("meta"):
        model.reset_classifier(0)
    assert model.num_classes == 0
    assert model.forward_head(features).shape == (1, model.head_hidden_size)
    with torch.device("meta"):
        model.reset_classifier(0, "")
    assert tuple(model.forward_head(features).shape[1:3]) == tuple(cfg["pool_size"])
    unpooled = meta_model(name, num_classes=0, global_pool="")(x)
    assert unpooled.dim() == 4 and tuple(unpooled.shape[1:3]) == tuple(cfg["pool_size"])
    # pool_size follows input_size: ceil(S / 32) for the hierarchical models, the fixed 14x14 for the isotropic ones.
    reduction = 16 if name.split(".")[0] in ISOTROPIC else 32
    assert tuple(cfg["pool_size"]) == tuple(math.ceil(s / reduction) for s in cfg["input_size"][1:])


def _check_maps(maps, channels, reductions, size, batch=1):
    assert len(maps) == len(channels) >= 3
    for m, c, r in zip(maps, channels, reductions):
        assert m.shape == (batch, c, math.ceil(size[0] / r), math.ceil(size[1] / r))


@pytest.mark.parametrize("name", ALL)
def test_features_only_and_forward_intermediates(name):
    model = meta_model(name)
    x = meta_input(model)
    size = x.shape[2:]
    info = FeatureInfo(model.feature_info, list(range(len(model.feature_info))))
    final, intermediates = model.forward_intermediates(x, output_fmt="NCHW")
    _check_maps(intermediates, info.channels(), info.reduction(), size)
    assert final.shape == model.forward_features(x).shape
    features = meta_model(name, features_only=True)
    _check_maps(features(x), features.feature_info.channels(), features.feature_info.reduction(), size)


def _fx_extractor(model: torch.nn.Module, train: bool = False) -> torch.nn.Module:
    """timm's FX helpers: node names traced with timm's no-trace lists, then an extractor of the final output."""
    train_nodes, eval_nodes = timm.models.get_graph_node_names(model)
    return timm.models.create_feature_extractor(model, return_nodes=[(train_nodes if train else eval_nodes)[-1]])


@pytest.mark.parametrize("name", ALL)
def test_fx_forward(name):
    model = small_model(name).eval()
    x = small_input(name)
    with torch.inference_mode():
        expected = model(x)
        fx_model = _fx_extractor(model)
        got = torch.cat(tuple(fx_model(x).values()))
    assert torch.equal(got, expected)
    assert not torch.isnan(got).any()


@pytest.mark.parametrize("name", ALL)
def test_fx_backward(name):
    model = small_model(name, num_classes=42, drop_path_rate=0.1).train()
    num_params = sum(p.numel() for p in model.parameters())
    fx_model = _fx_extractor(model, train=True)
    out = torch.cat(tuple(fx_model(small_input(name, batch=2)).values()))
    out.mean().backward()
    for pname, p in fx_model.named_parameters():
        assert p.grad is not None, f"no gradient for {pname}"
    assert sum(p.grad.numel() for p in fx_model.parameters()) == num_params
    assert out.shape == (2, 42) and not torch.isnan(out).any()


@pytest.mark.parametrize("name", ["nat_mini", "dinat_tiny", "dinat_s_tiny", "dinat_isotropic_small", "vitrpb_small"])
def test_fx_extractors_return_the_intermediate_maps(name):
    """timm's FX and hook feature wrappers and torchvision's create_feature_extractor (default tracer, as detection
    code uses it) return the maps of forward_intermediates at the modules feature_info names."""
    torch.manual_seed(0)
    model = small_model(name).eval()
    indices = tuple(range(len(model.feature_info)))
    wrappers = {}
    for feature_cls in ("fx", "hook"):
        torch.manual_seed(0)  # the same initialisation: the wrapper builds the same model first
        wrappers[feature_cls] = small_model(name, features_only=True, feature_cls=feature_cls, out_indices=indices)
    x = small_input(name)
    with torch.no_grad():
        expected = model.forward_intermediates(x, output_fmt="NHWC", intermediates_only=True)
        nodes = {info["module"]: f"map{i}" for i, info in enumerate(model.feature_info)}
        maps = {"torchvision": list(tv_fx.create_feature_extractor(model, return_nodes=nodes)(x).values())}
        maps.update({cls: wrapper.eval()(x) for cls, wrapper in wrappers.items()})  # channels-last, as the model
    for extractor, got in maps.items():
        assert len(got) == len(expected), extractor
        for i, want in enumerate(expected):
            assert torch.equal(got[i], want), (extractor, i)


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_SIZE_FX)
def test_fx_trace_at_full_size(name):
    model = meta_model(name)
    x = meta_input(model)
    fx_model = _fx_extractor(model)
    assert torch.cat(tuple(fx_model(x).values())).shape == model(x).shape == (1, model.num_classes)
