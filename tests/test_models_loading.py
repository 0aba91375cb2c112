"""Weight loading through its one path: the head rule, bad files, offline sources, weights named but not loaded.

Every route (timm's ``pretrained=True`` with a file overlay, ``torch.hub`` ``checkpoint=``, and
``natzoo.models.load_weights`` itself, which the training, evaluation and detection code call) must give the same
answer, so most tests run each case through every route.
"""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest
import timm
import torch
from helpers import one_thread, randomized  # noqa: F401  (one_thread: module-wide fixture)

from natzoo import models

REPO = Path(__file__).resolve().parents[1]
SMALL = {"embed_dim": 32, "depths": (1, 2, 2, 1), "num_heads": (1, 2, 4, 8)}
IMG = torch.randn(2, 3, 64, 48)
ROUTES = ("timm", "hub", "load_weights")


def build(route: str, name: str, file, **kwargs) -> torch.nn.Module:
    """`name` with the weights of `file`, through one loading route."""
    if route == "timm":
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(file)}, **kwargs)
    elif route == "hub":
        model = torch.hub.load(str(REPO), name, source="local", checkpoint=file, **kwargs)
    else:
        model = timm.create_model(name, **kwargs)
        models.load_weights(model, file)
    return model.eval()


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module, skip: tuple = ()) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    for key in sa:
        if not key.startswith(skip):
            assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("route", ROUTES)
def test_own_head_is_kept_when_it_fits_the_requested_class_count(tmp_path, route):
    source = randomized(timm.create_model("nat_mini", num_classes=8, **SMALL))
    torch.save(source.state_dict(), tmp_path / "own_8_class.pth")
    model = build(route, "nat_mini", tmp_path / "own_8_class.pth", num_classes=8, **SMALL)
    assert_same_weights(source, model)
    with torch.no_grad():
        assert torch.equal(model(IMG), source(IMG))


@pytest.mark.parametrize("route", ROUTES)
def test_head_that_does_not_fit_is_reinitialised_and_said_so(tmp_path, route, caplog):
    source = randomized(timm.create_model("dinat_s_tiny", num_classes=8, **SMALL))
    torch.save(source.state_dict(), tmp_path / "own_8_class.pth")
    with caplog.at_level(logging.WARNING, logger="natzoo"):
        model = build(route, "dinat_s_tiny", tmp_path / "own_8_class.pth", num_classes=5, **SMALL)
    assert model.get_classifier().weight.shape == (5, 256)
    assert torch.equal(model.get_classifier().bias, torch.zeros(5))  # freshly initialised (zero bias)
    assert_same_weights(source, model, skip=("head.",))
    message = " ".join(r.getMessage() for r in caplog.records if r.name.startswith("natzoo"))
    assert "re-initialised" in message and "8" in message and "5" in message
    assert "own_8_class.pth" in message


@pytest.mark.parametrize("route", ROUTES)
def test_no_classifier_loads_the_trunk_and_says_the_head_was_left_out(tmp_path, route, caplog):
    source = randomized(timm.create_model("nat_mini", **SMALL))
    torch.save(source.state_dict(), tmp_path / "w.pth")
    with caplog.at_level(logging.INFO, logger="natzoo"):
        model = build(route, "nat_mini", tmp_path / "w.pth", num_classes=0, **SMALL)
    assert isinstance(model.get_classifier(), torch.nn.Identity)
    assert_same_weights(source, model, skip=("head.",))
    assert any("classifier" in r.getMessage() and "not loaded" in r.getMessage() for r in caplog.records)


def test_first_conv_adapted_to_other_input_channels(tmp_path):
    source = randomized(timm.create_model("nat_mini", **SMALL))
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = build("timm", "nat_mini", tmp_path / "w.pth", in_chans=1, **SMALL)
    weight = source.state_dict()["patch_embed.proj.0.weight"]
    # timm's rule for one input channel: the RGB filters summed.
    torch.testing.assert_close(model.patch_embed.proj[0].weight, weight.sum(dim=1, keepdim=True))
    assert_same_weights(source, model, skip=("patch_embed.proj.0.weight",))


def _bad_file(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.pth"
    if kind == "empty":
        path.touch()
    elif kind == "directory":
        path.mkdir()
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "no_tensors":
        torch.save({"epoch": 3, "config": {"lr": 0.1}}, path)
    return path


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("kind", ["missing", "empty", "directory", "text", "tensor", "no_tensors"])
def test_bad_checkpoint_file_is_named_with_what_was_expected(tmp_path, route, kind):
    path = _bad_file(tmp_path, kind)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        build(route, "nat_mini", path, **SMALL)
    message = str(info.value)
    assert str(path) in message
    assert "expected" in message


def test_weights_named_without_pretrained_true_are_refused(tmp_path):
    torch.save(timm.create_model("nat_mini", **SMALL).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"pretrained=True"):
        timm.create_model("nat_mini", pretrained_cfg_overlay={"file": str(tmp_path / "w.pth")}, **SMALL)
    with pytest.raises(ValueError, match=r"pretrained=True"):
        timm.create_model("vitrpb_small", pretrained_cfg_overlay={"hf_hub_id": "someone/vitrpb"}, depth=1)


@pytest.fixture
def offline(monkeypatch):
    """No name resolution and no sleeping: counts lookups and retry back-offs instead."""
    record = {"lookups": [], "sleeps": []}

    def no_dns(host, *args, **kwargs):
        record["lookups"].append(host)
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known (test: offline)")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    monkeypatch.setattr(time, "sleep", lambda seconds: record["sleeps"].append(seconds))
    return record


def test_offline_hf_hub_source_fails_fast_and_names_the_source(offline):
    with pytest.raises(RuntimeError) as info:
        timm.create_model("dinat_mini", pretrained=True, pretrained_cfg_overlay={"hf_hub_id": "natzoo-test/none"},
                          **SMALL)
    message = str(info.value)
    assert "natzoo-test/none" in message and "hf_hub_id" in message
    assert "pretrained_cfg_overlay=dict(file=" in message
    assert offline["sleeps"] == []  # no retry back-off
    assert len(offline["lookups"]) <= 2  # one request (its connection may resolve the name twice); was 12 with retries


def test_hf_hub_offline_mode_fails_without_network_and_names_the_source(offline, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError, match="natzoo-test/none") as info:
        timm.create_model("nat_mini", pretrained=True, pretrained_cfg_overlay={"hf_hub_id": "natzoo-test/none"},
                          **SMALL)
    assert "HF_HUB_OFFLINE" in str(info.value)
    assert offline["lookups"] == [] and offline["sleeps"] == []
