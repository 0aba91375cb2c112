"""Constructor arguments are checked when a module or model is built: a wrong type raises TypeError, a value out of
range ValueError, and the message names the argument. Two or more instances of each class of problem, for the
attention modules and for every model family."""

from __future__ import annotations

import math

import pytest
import timm
import torch
from natzoo.models import RelPosAttention

from natzoo import (
    models,  # noqa: F401  (registers the NAT families with timm)
    ops,
)

MODULES = [
    (ops.NeighborhoodAttention1D, 5),
    (ops.NeighborhoodAttention2D, 7),
    (ops.NeighborhoodAttention3D, 3),
    (RelPosAttention, None),
]
MODULE_CASES = [
    # wrong types
    ({"num_heads": 2.0}, TypeError, "num_heads"),
    ({"dim": "64"}, TypeError, "dim"),
    ({"dim": 64.0}, TypeError, "dim"),
    ({"num_heads": True}, TypeError, "num_heads"),
    ({"attn_drop": "0.1"}, TypeError, "attn_drop"),
    ({"qkv_bias": "yes"}, TypeError, "qkv_bias"),
    # integers out of range
    ({"dim": 0}, ValueError, "dim"),
    ({"num_heads": 0}, ValueError, "num_heads"),
    ({"num_heads": -2}, ValueError, "num_heads"),
    ({"dim": 30, "num_heads": 4}, ValueError, "num_heads"),
    # rates out of range
    ({"attn_drop": 1.5}, ValueError, "attn_drop"),
    ({"proj_drop": -0.1}, ValueError, "proj_drop"),
    ({"attn_drop": 1.0}, ValueError, "attn_drop"),
    ({"proj_drop": math.nan}, ValueError, "proj_drop"),
    # logit scale
    ({"qk_scale": math.inf}, ValueError, "qk_scale"),
    ({"qk_scale": "0.1"}, TypeError, "qk_scale"),
]


@pytest.mark.parametrize("cls, kernel", MODULES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.parametrize("overrides, error, arg", MODULE_CASES, ids=lambda v: str(v))
def test_attention_module_arguments(cls, kernel, overrides, error, arg):
    kwargs = {"dim": 64, "num_heads": 2}
    if kernel is not None:
        kwargs["kernel_size"] = kernel
    kwargs.update(overrides)
    with pytest.raises(error, match=rf"\b{arg}\b"):
        cls(**kwargs)


HIERARCHICAL_CASES = [
    # wrong types
    ({"num_heads": (2.0, 4, 8, 16)}, TypeError, r"num_heads"),
    ({"embed_dim": 64.0}, TypeError, r"embed_dim"),
    ({"depths": (3, 4.5, 6, 5)}, TypeError, r"depths"),
    ({"num_classes": "10"}, TypeError, r"num_classes"),
    ({"drop_path_rate": "0.1"}, TypeError, r"drop_path_rate"),
    ({"depths": 3}, TypeError, r"depths"),
    # values out of range
    ({"embed_dim": 0}, ValueError, r"embed_dim"),
    ({"depths": (3, 0, 6, 5)}, ValueError, r"depths"),
    ({"num_heads": (2, 4, 8, 0)}, ValueError, r"num_heads"),
    ({"num_heads": (5, 4, 8, 16)}, ValueError, r"num_heads"),
    ({"num_heads": (2, 4, 8)}, ValueError, r"num_heads"),
    ({"num_classes": -1}, ValueError, r"num_classes"),
    ({"in_chans": 0}, ValueError, r"in_chans"),
    ({"mlp_ratio": 0.0}, ValueError, r"mlp_ratio"),
    ({"kernel_size": 1}, ValueError, r"kernel_size"),
    ({"global_pool": "max"}, ValueError, r"global_pool"),
    # rates out of range
    ({"drop_path_rate": 1.5}, ValueError, r"drop_path_rate"),
    ({"drop_rate": -0.1}, ValueError, r"drop_rate"),
    ({"attn_drop_rate": 1.0}, ValueError, r"attn_drop_rate"),
    ({"proj_drop_rate": 2}, ValueError, r"proj_drop_rate"),
    ({"layer_scale": math.nan}, ValueError, r"layer_scale"),
    ({"layer_scale": 0.0}, ValueError, r"layer_scale"),
]


@pytest.mark.parametrize("name", ["nat_mini", "dinat_tiny", "dinat_s_tiny"])
@pytest.mark.parametrize("overrides, error, arg", HIERARCHICAL_CASES, ids=lambda v: str(v))
def test_hierarchical_model_arguments(name, overrides, error, arg):
    with torch.device("meta"), pytest.raises(error, match=arg):
        timm.create_model(name, **overrides)


ISOTROPIC_CASES = [
    # wrong types
    ({"num_heads": 12.0}, TypeError, r"num_heads"),
    ({"depth": 2.0}, TypeError, r"depth"),
    ({"embed_dim": "384"}, TypeError, r"embed_dim"),
    ({"dilations": (1.0,) * 12}, TypeError, r"dilations"),
    # values out of range
    ({"depth": 0}, ValueError, r"depth"),
    ({"embed_dim": 0}, ValueError, r"embed_dim"),
    ({"num_heads": 7}, ValueError, r"num_heads"),
    ({"num_classes": -5}, ValueError, r"num_classes"),
    ({"img_size": 192}, ValueError, r"img_size"),
    ({"attention": "local"}, ValueError, r"attention"),
    ({"dilations": (0,) * 12}, ValueError, r"dilations"),
    # rates out of range
    ({"drop_path_rate": 1.0}, ValueError, r"drop_path_rate"),
    ({"attn_drop_rate": -0.5}, ValueError, r"attn_drop_rate"),
    ({"drop_rate": 3}, ValueError, r"drop_rate"),
]


@pytest.mark.parametrize("name", ["nat_isotropic_small", "dinat_isotropic_small", "vitrpb_small"])
@pytest.mark.parametrize("overrides, error, arg", ISOTROPIC_CASES, ids=lambda v: str(v))
def test_isotropic_model_arguments(name, overrides, error, arg):
    with torch.device("meta"), pytest.raises(error, match=arg):
        timm.create_model(name, **overrides)


def test_valid_edge_values_still_build():
    with torch.device("meta"):
        timm.create_model("nat_mini", num_classes=0, drop_path_rate=0, layer_scale=1e-6, mlp_ratio=0.5)
        timm.create_model("vitrpb_small", num_classes=0, drop_rate=0.0, attn_drop_rate=0.5)
    ops.NeighborhoodAttention2D(8, 8, 3, qk_scale=0.0, attn_drop=0.0, proj_drop=0.999)
