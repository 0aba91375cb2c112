"""Attention maps: keys and weights per stage against the float64 oracle, and the PNG of docs/attention_maps.md."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from oracle import dense_mask_and_bias_index, dense_na
from PIL import Image

import natzoo.models  # noqa: F401  (registers the model family with timm)
from natzoo.tools.attention_maps import attention_maps, draw_attention_maps, draw_demo_attention_maps
from natzoo.ops import NeighborhoodAttention2D

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _model(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, embed_dim=16, depths=[1, 2, 1, 1], num_heads=[1, 2, 2, 4], num_classes=3,
                             kernel_size=3, **kwargs).double().eval()


@pytest.mark.parametrize(
    "name,kwargs,point",
    [("nat_mini", {}, (30, 5)), ("dinat_mini", {"dilations": [[2], [1, 2], [1], [1]]}, (0, 63))],
    ids=["nat", "dinat-corner"],
)
def test_keys_and_weights_match_the_oracle(name, kwargs, point):
    """For every stage: the keys are the oracle's window of the query, and the weights reproduce the oracle's
    attention output at that query (per head)."""
    model = _model(name, **kwargs)
    image = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    inputs = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args, key=n: inputs.__setitem__(key, args[0]))
             for n, m in model.named_modules() if isinstance(m, NeighborhoodAttention2D)]
    logits_before = model(image)
    for h in hooks:
        h.remove()
    maps = attention_maps(model, image[0], point)
    assert [m.stage for m in maps] == [0, 1, 2, 3]
    assert [m.map_size for m in maps] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    torch.testing.assert_close(model(image), logits_before, atol=0, rtol=0)  # the model itself is untouched
    for m in maps:
        attn = model.get_submodule(m.module)
        x = inputs[m.module]
        assert m.query == (min(point[0] * m.map_size[0] // 64, m.map_size[0] - 1), point[1] * m.map_size[1] // 64)
        # The module pads maps smaller than kernel_size * dilation; the oracle sees the same padded projections.
        pad = [max(k * d - s, 0) for k, d, s in zip(m.kernel_size, m.dilation, m.map_size)]
        padded = torch.nn.functional.pad(x, (0, 0, 0, pad[1], 0, pad[0]))
        size = padded.shape[1:3]
        q, k, v = attn.qkv(padded).unflatten(-1, (3, attn.num_heads, -1)).unbind(-3)
        out, _ = dense_na(q, k, v, m.kernel_size, dilation=m.dilation, scale=attn.scale, rpb=attn.rpb)
        mask, _ = dense_mask_and_bias_index(tuple(size), m.kernel_size, 1, m.dilation, False)
        flat_query = m.query[0] * size[1] + m.query[1]
        want_keys = {(int(y) // size[1], int(y) % size[1]) for y in torch.nonzero(mask[flat_query]).flatten()}
        assert {tuple(c) for c in m.keys.tolist()} == want_keys
        torch.testing.assert_close(m.weights.sum(-1), torch.ones(attn.num_heads), atol=1e-6, rtol=0)
        v_keys = v[0, m.keys[:, 0], m.keys[:, 1]]  # [K, heads, head_dim]
        got = torch.einsum("hk,khd->hd", m.weights.double(), v_keys)
        torch.testing.assert_close(got, out[0, m.query[0], m.query[1]].detach(), atol=1e-5, rtol=1e-5)
        assert m.weight_map().shape == m.map_size


def test_training_flag_is_restored_and_bad_points_are_rejected():
    model = _model("nat_mini").train()
    image = torch.randn(3, 32, 32, dtype=torch.float64)
    attention_maps(model, image, (3, 3), block=0)
    assert model.training
    with pytest.raises(ValueError, match=r"point must be \(row, col\) inside the 32x32 image"):
        attention_maps(model, image, (32, 0))
    with pytest.raises(ValueError, match="image must be"):
        attention_maps(model, image[0], (1, 1))
    with pytest.raises(ValueError, match="has no natzoo NeighborhoodAttention2D"):
        attention_maps(torch.nn.Conv2d(3, 3, 1), image, (1, 1))


def test_draw_writes_a_png(tmp_path):
    model = _model("nat_mini").float()
    image = torch.rand(3, 48, 40)
    maps = attention_maps(model, image, (10, 30))
    path = draw_attention_maps(image, maps, tmp_path / "maps.png", title="test", head=0)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (1280, 390)
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left


def test_docs_picture_is_the_demo_models(tmp_path):
    """The committed picture has the layout the generator produces today, and the docs page shows it."""
    maps = draw_demo_attention_maps(tmp_path / "demo.png")
    assert len(maps) == 4 and maps[0].map_size == (16, 16)
    committed = DOCS / "images" / "attention_maps_demo.png"
    with Image.open(tmp_path / "demo.png") as fresh, Image.open(committed) as docs_png:
        assert fresh.size == docs_png.size
    assert "images/attention_maps_demo.png" in (DOCS / "attention_maps.md").read_text()
