"""Export with a dynamic height and width (docs/export.md, "Dynamic resolution").

The op: neighborhood attention traced by ``torch.export`` with symbolic lengths computes its window tables in the
graph; the program is checked against the dense float64 oracle at sizes other than the traced one. The models: the
declared lower bound is checked against where the blocks actually start padding (a hook on every attention module),
and ``nat_mini`` / ``dinat_mini`` (their kernel size and per-stage dilations, one block per stage, narrow) go to one
dynamic ONNX file each that onnxruntime runs at three resolutions against eager PyTorch.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from helpers import one_thread  # noqa: F401
from natzoo.ops import NeighborhoodAttention2D, na2d
from oracle import dense_na

from natzoo import models  # noqa: F401  (registers the families)
from natzoo.detection import NATBackbone
from natzoo.tools.export import (
    check_onnx_input_size,
    dynamic_size_range,
    export_onnx,
    export_program,
    onnx_size_range,
)

ATOL = 1e-4
NARROW = {"embed_dim": 16, "num_heads": [1, 1, 1, 1], "num_classes": 10}
# One block per stage with the stage's largest dilation: the same declared range as the full-depth variant.
DYNAMIC_MODELS = {
    "nat_mini": (dict(NARROW, depths=[1, 1, 1, 1]), (193, 896)),
    "dinat_mini": (dict(NARROW, depths=[1, 1, 1, 1], dilations=[[8], [4], [2], [1]]), (221, 896)),
}
# (height, width): the native size, a size that is no multiple of 32 on either side, and a larger non-square one.
SIZES = [(224, 224), (233, 250), (288, 320)]


class _Attention(torch.nn.Module):
    def __init__(self, kernel_size: int, stride: int, dilation: int) -> None:
        super().__init__()
        self.window = {"kernel_size": kernel_size, "stride": stride, "dilation": dilation}

    def forward(self, q, k, v, rpb):
        return na2d(q, k, v, rpb=rpb if self.window["stride"] == 1 else None, backend="reference", **self.window)


@pytest.mark.parametrize("kernel_size,stride,dilation", [
    (3, 1, 2),
    pytest.param(5, 2, 1, marks=pytest.mark.slow),
    pytest.param(3, 2, 3, marks=pytest.mark.slow),
])
def test_traced_op_with_symbolic_sizes_matches_the_oracle_at_other_sizes(kernel_size, stride, dilation):
    heads, dim = 2, 4
    low = kernel_size * dilation
    dims = {1: torch.export.Dim("x", min=low, max=40), 2: torch.export.Dim("y", min=low, max=40)}
    example = [torch.randn(1, 17, 19, heads, dim) for _ in range(3)]
    rpb = torch.randn(heads, 2 * kernel_size - 1, 2 * kernel_size - 1)
    program = torch.export.export(_Attention(kernel_size, stride, dilation), (*example, rpb),
                                  dynamic_shapes=(dims, dims, dims, None))
    for spatial in [(low, low + 3), (13, 10), (23, 21)]:
        q, k, v = (torch.randn(1, *spatial, heads, dim) for _ in range(3))
        expected, _ = dense_na(q, k, v, kernel_size, stride, dilation, rpb=rpb if stride == 1 else None)
        torch.testing.assert_close(program.module()(q, k, v, rpb).double(), expected, rtol=0, atol=1e-5)


def _padding_modules(model: torch.nn.Module, size: tuple[int, int]) -> list[str]:
    """Attention modules whose map is shorter than ``kernel_size * dilation`` on an axis, or whose dilation was
    clamped, in an eager forward."""
    found: list[str] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, NeighborhoodAttention2D):
            def hook(mod, args, kwargs, name=name):
                # A clamped dilation (NATBlock's clamp_dilation) arrives as the keyword.
                dilation = tuple(kwargs.get("dilation") or mod.dilation)
                pads = any(s < k * d for s, k, d in zip(args[0].shape[1:3], mod.kernel_size, dilation))
                if pads or dilation != tuple(mod.dilation):
                    found.append(name)
            hooks.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, *size))
    finally:
        for handle in hooks:
            handle.remove()
    return found


@pytest.mark.parametrize("name,kwargs", [
    ("nat_mini", dict(NARROW, depths=[1, 1, 1, 1])),
    ("dinat_mini", dict(NARROW, depths=[1, 1, 1, 1], dilations=[[8], [4], [2], [1]])),
    ("dinat_s_tiny", dict(NARROW, depths=[1, 1, 1, 1], kernel_size=3, dilations=[[1], [4], [2], [1]])),
    ("dinat_mini", dict(NARROW, depths=[1, 1, 1, 1], kernel_size=3, dilations=[[7], [1], [1], [1]],
                        clamp_dilation=True)),
])
def test_the_declared_lower_bound_is_the_smallest_size_where_no_block_pads(name, kwargs):
    model = timm.create_model(name, **kwargs).eval()
    (low, high), (low_w, _) = dynamic_size_range(model)
    assert low == low_w and high == 4 * 224
    assert _padding_modules(model, (low, low)) == []
    assert _padding_modules(model, (low - 1, low)) != []
    assert _padding_modules(model, (low, low - 1)) != []


def test_detection_backbone_range_counts_only_the_stages_it_runs():
    kwargs = dict(embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1], kernel_size=3)
    two = NATBackbone("nat_mini", out_indices=(0, 1), **kwargs)
    four = NATBackbone("nat_mini", **kwargs)
    # Stage 1 (stride 8) needs a 3-token map, stage 3 (stride 32) too.
    assert dynamic_size_range(two, (3, 96, 128)) == ((17, 384), (17, 512))
    assert dynamic_size_range(four, (3, 96, 128)) == ((65, 384), (65, 512))


def test_dynamic_export_rejects_what_it_cannot_do(tmp_path):
    nat = timm.create_model("nat_mini", **DYNAMIC_MODELS["nat_mini"][0])
    with pytest.raises(ValueError, match="height 160 is below 193"):
        export_program(nat, (3, 160, 224), dynamic=True)
    with pytest.raises(TypeError, match="dynamic must be a bool"):
        export_program(nat, dynamic="yes")
    iso = timm.create_model("nat_isotropic_small", embed_dim=16, num_heads=1, depth=1, kernel_size=3)
    with pytest.raises(ValueError, match="fixed input size"):
        export_onnx(iso, tmp_path / "iso.onnx", dynamic=True)
    with pytest.raises(ValueError, match="not a hierarchical NAT-family model"):
        export_program(torch.nn.Conv2d(3, 4, 3), (3, 32, 32), dynamic=True)
    assert not (tmp_path / "iso.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", list(DYNAMIC_MODELS))
def test_dynamic_onnx_matches_pytorch_at_three_resolutions(name, tmp_path):
    kwargs, (low, high) = DYNAMIC_MODELS[name]
    model = timm.create_model(name, **kwargs).eval()
    program = export_program(model, dynamic=True)
    path = export_onnx(program, tmp_path / f"{name}.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [v.shape for v in session.get_inputs()] == [["batch", 3, "height", "width"]]
    assert onnx_size_range(path) == ((low, high), (low, high))
    for height, width in SIZES:
        x = torch.randn(2, 3, height, width)
        with torch.no_grad():
            expected = model(x).numpy()
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, rtol=0, atol=ATOL)
    # Outside the range: the checker names size and range; the program refuses it; onnxruntime fails below it.
    with pytest.raises(ValueError, match=rf"input height {low - 1} is outside the range {low}\.\.{high}"):
        check_onnx_input_size(path, low - 1, 224)
    with pytest.raises(ValueError, match=rf"input width {high + 1} is outside the range {low}\.\.{high}"):
        check_onnx_input_size(path, 224, high + 1)
    check_onnx_input_size(path, low, high)
    with pytest.raises(Exception, match=rf"x.size\(\)\[2\] >= {low}"):
        program.module()(torch.zeros(1, 3, low - 1, 224))
    with pytest.raises(Exception, match="out of data bounds"):
        session.run(None, {"input": np.zeros((1, 3, low - 8, 224), np.float32)})


@pytest.mark.slow
def test_detection_backbone_dynamic_onnx_at_two_sizes(tmp_path):
    backbone = NATBackbone("dinat_mini", out_indices=(0, 1), embed_dim=16, depths=[1, 2], num_heads=[1, 2],
                           kernel_size=3, dilations=[[4], [1, 2]]).eval()
    path = export_onnx(backbone, tmp_path / "backbone.onnx", input_size=(3, 96, 128), output_names=["c2", "c3"],
                       dynamic=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [v.shape for v in session.get_outputs()][0][:2] == ["batch", 16]
    for height, width in [(96, 128), (75, 161)]:
        x = torch.randn(1, 3, height, width)
        with torch.no_grad():
            expected = [t.numpy() for t in backbone(x)]
        for got, want in zip(session.run(None, {"input": x.numpy()}), expected):
            assert got.shape == want.shape
            np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_faster_rcnn_onnx_runs_two_image_sizes_of_one_padded_size(tmp_path):
    from natzoo.detection.detectors import build_detector
    from natzoo.tools.export import export_detector_onnx

    torch.manual_seed(0)
    detector = build_detector("fasterrcnn", "nat_mini", 3, fpn_channels=32, min_size=128, max_size=192,
                              representation_size=64, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                              kernel_size=3).eval()
    path = export_detector_onnx(detector, tmp_path / "frcnn.onnx", (3, 120, 160))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["boxes", "labels", "scores"]
    # 120 x 160 resizes to 128 x 170 and 96 x 160 to 115 x 192: both are padded to 128 x 192.
    for size in [(120, 160), (96, 160)]:
        image = torch.rand(3, *size)
        with torch.no_grad():
            expected = detector([image])[0]
        boxes, labels, scores = session.run(None, {"image": image.numpy()})
        assert boxes.shape == tuple(expected["boxes"].shape) and len(boxes) > 0
        np.testing.assert_allclose(boxes, expected["boxes"].numpy(), rtol=0, atol=1e-3)
        np.testing.assert_array_equal(labels, expected["labels"].numpy())
        np.testing.assert_allclose(scores, expected["scores"].numpy(), rtol=0, atol=1e-4)
    # A portrait image pads to 192 x 128: the backbone's traced tables do not fit it.
    with pytest.raises(Exception, match="broadcast"):
        session.run(None, {"image": np.random.rand(3, 160, 120).astype(np.float32)})
