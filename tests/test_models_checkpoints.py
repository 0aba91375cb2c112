"""Checkpoint loading: official layout (strict), HF transformers layout (.bin and .safetensors), wrappers, errors.

The HF layout is produced by an independent implementation of the key mapping (``helpers.official_to_hf``). Models
use small constructor overrides so that every test runs in well under a second of compute.
"""

from __future__ import annotations

import os
import urllib.error
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from helpers import official_to_hf, one_thread, randomized  # noqa: F401  (one_thread: module-wide fixture)
from safetensors.torch import save_file

from natzoo import models
from natzoo.checkpoints import network_weights

REPO = Path(__file__).resolve().parents[1]
SMALL = {"embed_dim": 32, "depths": (1, 2, 2, 1), "num_heads": (1, 2, 4, 8)}
IMG = torch.randn(2, 3, 64, 48)


def load(name: str, file, **kwargs) -> torch.nn.Module:
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **kwargs).eval()


def assert_same_model(a: torch.nn.Module, b: torch.nn.Module, x: torch.Tensor = IMG) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.parametrize("name, prefix", [("nat_small", "nat"), ("dinat_base", "dinat")])
def test_official_and_hf_layouts_load_to_identical_models(tmp_path, name, prefix):
    source = randomized(timm.create_model(name, **SMALL))
    assert source.stages[0].blocks[0].gamma1 is not None  # layer scale covered
    torch.save(source.state_dict(), tmp_path / "official.pth")
    hf = official_to_hf(source.state_dict(), prefix)
    assert f"{prefix}.encoder.levels.0.layers.0.layer_scale_parameters" in hf
    torch.save(hf, tmp_path / "pytorch_model.bin")
    save_file(hf, str(tmp_path / "model.safetensors"))

    official = load(name, tmp_path / "official.pth", **SMALL)
    assert_same_model(source, official)
    assert_same_model(official, load(name, tmp_path / "pytorch_model.bin", **SMALL))
    assert_same_model(official, load(name, tmp_path / "model.safetensors", **SMALL))


def test_hf_checkpoint_without_layer_scale_and_torch_hub(tmp_path):
    source = randomized(timm.create_model("dinat_mini", **SMALL))
    torch.save(official_to_hf(source.state_dict(), "dinat"), tmp_path / "pytorch_model.bin")
    hub = torch.hub.load(str(REPO), "dinat_mini", source="local", checkpoint=tmp_path / "pytorch_model.bin", **SMALL)
    assert_same_model(source, hub.eval())
    fresh = torch.hub.load(str(REPO), "nat_mini", source="local", pretrained=False, num_classes=3, **SMALL)
    assert fresh(IMG).shape == (2, 3)


def test_training_checkpoint_wrappers_and_prefixes(tmp_path):
    source = randomized(timm.create_model("nat_mini", **SMALL))
    wrapped = {"epoch": 3, "state_dict": {"module." + k: v for k, v in source.state_dict().items()}}
    torch.save(wrapped, tmp_path / "train.pth")
    assert_same_model(source, load("nat_mini", tmp_path / "train.pth", **SMALL))
    ema = {"model": {"a": torch.zeros(1)}, "state_dict_ema": source.state_dict()}
    torch.save(ema, tmp_path / "ema.pth")
    assert list(models.read_state_dict(tmp_path / "ema.pth", use_ema=True)) == list(source.state_dict())


def test_lightning_prefix_is_the_training_layers_to_strip(tmp_path):
    source = randomized(timm.create_model("nat_mini", **SMALL))
    ema = {k: v + 1 for k, v in source.state_dict().items()}
    lightning = {"state_dict": {**{"model." + k: v for k, v in source.state_dict().items()},
                                **{"model_ema.module." + k: v for k, v in ema.items()}}, "optimizer_states": []}
    torch.save(lightning, tmp_path / "lightning.ckpt")
    # The model layer reads the file as it is: the LightningModule's attribute names stay.
    raw = models.read_state_dict(tmp_path / "lightning.ckpt")
    assert all(k.startswith(("model.", "model_ema.module.")) for k in raw)
    weights = network_weights(tmp_path / "lightning.ckpt")
    assert list(weights) == list(source.state_dict())
    model = timm.create_model("nat_mini", **SMALL).eval()
    models.load_weights(model, weights)
    assert_same_model(source, model)
    ema_weights = network_weights(tmp_path / "lightning.ckpt", use_ema=True)
    assert all(torch.equal(ema_weights[k], ema[k]) for k in ema)
    torch.save(source.state_dict(), tmp_path / "flat.pth")
    assert list(network_weights(tmp_path / "flat.pth")) == list(source.state_dict())  # no prefix: as read
    with pytest.raises(ValueError, match="EMA"):
        network_weights(tmp_path / "flat.pth", use_ema=True)


class _Payload:
    def __reduce__(self):
        return (os.getcwd, ())


def test_loading_never_unpickles_objects(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}, "payload": _Payload()}, tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="(?i)weights.?only|unsupported global|not allowed"):
        models.read_state_dict(tmp_path / "evil.pth")
    with pytest.raises(ValueError, match="(?i)weights.?only|unsupported global|not allowed"):
        load("nat_mini", tmp_path / "evil.pth", **SMALL)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        models.read_state_dict(tmp_path / "missing.pth")


def test_mismatch_lists_missing_unexpected_and_misshaped_keys(tmp_path):
    sd = randomized(timm.create_model("nat_mini", **SMALL)).state_dict()
    del sd["levels.1.blocks.0.attn.rpb"]
    sd["levels.9.extra"] = torch.zeros(2)
    sd["levels.0.blocks.0.mlp.fc1.weight"] = torch.zeros(5, 32)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as info:
        load("nat_mini", tmp_path / "bad.pth", **SMALL)
    msg = str(info.value)
    assert "levels.1.blocks.0.attn.rpb" in msg and "levels.9.extra" in msg
    assert "levels.0.blocks.0.mlp.fc1.weight: checkpoint (5, 32) vs model (96, 32)" in msg


def test_other_class_count_resets_head(tmp_path):
    source = randomized(timm.create_model("dinat_s_tiny", **SMALL))
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = load("dinat_s_tiny", tmp_path / "w.pth", num_classes=7, **SMALL)
    assert model.get_classifier().weight.shape == (7, 256)
    for k, v in model.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(v, source.state_dict()[k]), k


def test_kernel_11_from_7_interpolates_rpb_bicubically(tmp_path):
    source = randomized(timm.create_model("dinat_large", **SMALL))
    torch.save(source.state_dict(), tmp_path / "w7.pth")
    model = load("dinat_large_384_11x11", tmp_path / "w7.pth", **SMALL)
    for k, v in model.state_dict().items():
        ref = source.state_dict()[k]
        if k.endswith("attn.rpb"):
            assert ref.shape[1:] == (13, 13) and v.shape[1:] == (21, 21)
            expected = F.interpolate(ref[None], size=(21, 21), mode="bicubic", align_corners=False)[0]
            torch.testing.assert_close(v, expected, rtol=0, atol=0)
        else:
            assert torch.equal(v, ref), k


def test_in22k_head_size_read_from_checkpoint(tmp_path):
    source = randomized(timm.create_model("dinat_large", num_classes=37, **SMALL))
    torch.save(source.state_dict(), tmp_path / "in22k.pth")
    model = load("dinat_large.in22k", tmp_path / "in22k.pth", **SMALL)
    assert model.num_classes == 37
    assert_same_model(source, model)
    # Another class count is a request: the file's head does not fit it and is re-initialised.
    other = load("dinat_large.in22k", tmp_path / "in22k.pth", num_classes=10, **SMALL)
    assert other.num_classes == 10 and torch.equal(other.head.bias, torch.zeros(10))


def test_drop_path_default_does_not_depend_on_the_weight_tag():
    # 0.35 (the IN-1K fine-tuning setting) for every tag; the IN-22K pre-training setting 0.2 is passed explicitly.
    rates = {tag: timm.create_model(f"dinat_large.{tag}", **SMALL).stages[1].blocks[1].drop_path.drop_prob
             for tag in ("in22k", "in22k_ft_in1k")}
    assert rates == {"in22k": pytest.approx(0.35 * 2 / 5), "in22k_ft_in1k": pytest.approx(0.35 * 2 / 5)}
    model = timm.create_model("dinat_large.in22k", drop_path_rate=0.2, **SMALL)
    assert model.stages[1].blocks[1].drop_path.drop_prob == pytest.approx(0.2 * 2 / 5)


def _literal_relative_position_index() -> torch.Tensor:
    # The official formula: index[u, w] = (r_w - r_u + 13) * 27 + (c_w - c_u + 13), u = 14 r_u + c_u.
    index = torch.empty(196, 196, dtype=torch.long)
    for u in range(196):
        for w in range(196):
            index[u, w] = (w // 14 - u // 14 + 13) * 27 + (w % 14 - u % 14 + 13)
    return index


def test_vitrpb_index_checked_on_load(tmp_path):
    source = randomized(timm.create_model("vitrpb_small", depth=2, embed_dim=64, num_heads=2))
    sd = source.state_dict()
    assert torch.equal(sd["layers.0.attn.relative_position_index"], _literal_relative_position_index())
    torch.save(sd, tmp_path / "w.pth")
    x = torch.randn(1, 3, 224, 224)
    assert_same_model(source, load("vitrpb_small", tmp_path / "w.pth", depth=2, embed_dim=64, num_heads=2), x)
    sd["layers.1.attn.relative_position_index"] = sd["layers.1.attn.relative_position_index"].flip(0)
    torch.save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="layers.1.attn.relative_position_index differs"):
        load("vitrpb_small", tmp_path / "bad.pth", depth=2, embed_dim=64, num_heads=2)


def test_vitrpb_attention_matches_official_formula():
    model = randomized(timm.create_model("vitrpb_small", depth=1, embed_dim=64, num_heads=2))
    attn = model.layers[0].attn
    x = torch.randn(1, 14, 14, 64)
    q, k, v = attn.qkv(x.reshape(1, 196, 64)).reshape(1, 196, 3, 2, 32).permute(2, 0, 3, 1, 4)
    bias = attn.rpb.flatten(1)[:, _literal_relative_position_index().view(-1)].view(2, 196, 196)
    probs = ((q * 32**-0.5) @ k.transpose(-1, -2) + bias).softmax(-1)
    ref = attn.proj((probs @ v).transpose(1, 2).reshape(1, 14, 14, 64))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_convert_hf_backbone_norms():
    sd = {"hidden_states_norms.stage1.weight": torch.ones(4), "embeddings.norm.bias": torch.zeros(4)}
    assert set(models.convert_hf_state_dict(sd)) == {"norm0.weight", "patch_embed.norm.bias"}


def test_no_network_error_says_where_to_put_the_file(monkeypatch, tmp_path):
    calls = []

    def offline(url, *args, **kwargs):
        calls.append(url)
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # an empty cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match=r"pretrained_cfg_overlay=dict\(file=.*nat_mini\.pth") as info:
        timm.create_model("nat_mini", pretrained=True, **SMALL)
    assert "checkpoints" in str(info.value)
    assert calls == ["https://shi-labs.com/projects/nat/checkpoints/CLS/nat_mini.pth"]
    calls.clear()
    with pytest.raises(RuntimeError, match="dinat_s_tiny_in1k_224.pth"):
        timm.create_model("dinat_s_tiny", pretrained=True, **SMALL)
    # The code's file name first, then the name the official DiNAT.md links.
    assert [os.path.basename(u) for u in calls] == ["dinat_s_tiny_in1k_224.pth", "dinat_s_tiny_1k_224.pth"]


def test_recorded_sha256_is_enforced(tmp_path, monkeypatch):
    source = timm.create_model("dinat_large", **SMALL)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    monkeypatch.setitem(models.CHECKPOINT_SHA256, "dinat_large.in22k_ft_in1k", "0" * 64)
    with pytest.raises(ValueError, match="SHA-256"):
        load("dinat_large", tmp_path / "w.pth", **SMALL)
    monkeypatch.setitem(models.CHECKPOINT_SHA256, "dinat_large.in22k_ft_in1k", models.sha256_file(tmp_path / "w.pth"))
    load("dinat_large", tmp_path / "w.pth", **SMALL)
