"""Export: torch.export programs and ONNX files (dynamo exporter) with a dynamic batch axis, checked against eager
PyTorch; onnxruntime runs the ONNX files at two batch sizes.

Each model family is exported in full at a small width and depth. Every registered variant is then checked
structurally at its native resolution: a forward on the meta device (no data: data-dependent Python control flow
would fail there, as it would under export) records every attention configuration the variant runs; for each code
path among them (kernel size, dilated or not, padded or not) the smallest and the largest map are exported on their
own and compared with eager. The rest of every variant is made of the layers the family exports already cover.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
from natzoo.models import RelPosAttention
from natzoo.ops import NeighborhoodAttention2D
from natzoo.ops.neighborhood import indexing

from natzoo import models
from natzoo.detection import NATBackbone
from natzoo.tools.export import export_onnx, export_program, native_input_size

TINY = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "kernel_size": 3}
# Two stages (a downsampler between them) keep the exports short; the DiNAT ones run dilated blocks (uneven dilation
# groups at 16 x 16), the NAT one layer scale. The isotropic models are fixed at 224 px.
TWO_STAGES = {"embed_dim": 16, "depths": [1, 2], "num_heads": [1, 2], "kernel_size": 3, "num_classes": 10}
ISO = {"embed_dim": 16, "num_heads": 1, "num_classes": 10}
FAMILIES = {  # one small model per family: (registered name, constructor overrides, input size)
    "nat": ("nat_mini", dict(TWO_STAGES, depths=[1, 1], layer_scale=1e-5), (3, 64, 64)),
    "dinat": ("dinat_mini", dict(TWO_STAGES, dilations=[[3], [1, 2]]), (3, 64, 64)),
    "dinat_s": ("dinat_s_tiny", dict(TWO_STAGES, dilations=[[3], [1, 2]]), (3, 64, 64)),
    "nat_isotropic": ("nat_isotropic_small", dict(ISO, depth=1, kernel_size=3), (3, 224, 224)),
    "dinat_isotropic": ("dinat_isotropic_small", dict(ISO, depth=2, kernel_size=3), (3, 224, 224)),
    "vitrpb": ("vitrpb_small", dict(ISO, depth=1), (3, 224, 224)),
}
ATOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _eager(model: torch.nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    with torch.no_grad():
        out = model(x)
    return [t.numpy() for t in (out if isinstance(out, (list, tuple)) else [out])]


def _onnxruntime(path, x: torch.Tensor) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})


def _onnx_shapes(path) -> dict[str, list]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return {v.name: v.shape for v in [*session.get_inputs(), *session.get_outputs()]}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exports_to_a_program_and_to_onnx_with_a_dynamic_batch(family, tmp_path):
    name, kwargs, size = FAMILIES[family]
    model = timm.create_model(name, **kwargs).train()  # export works in eval mode and restores the mode
    program = export_program(model, size)
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    path = export_onnx(program, tmp_path / f"{name}.onnx")
    assert _onnx_shapes(path) == {"input": ["batch", *size], "output": ["batch", 10]}
    for batch in (1, 3):
        x = torch.randn(batch, *size)
        (expected,) = _eager(model, x)
        with torch.no_grad():
            np.testing.assert_allclose(program.module()(x).numpy(), expected, rtol=0, atol=ATOL)
        (got,) = _onnxruntime(path, x)
        np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


@pytest.mark.slow
def test_classifier_export_from_the_model_uses_the_native_size_and_names_the_logits(tmp_path):
    name, kwargs, _ = FAMILIES["vitrpb"]
    model = timm.create_model(name, **kwargs).eval()
    assert native_input_size(model) == (3, 224, 224)
    path = export_onnx(model, tmp_path / "vitrpb.onnx")
    assert _onnx_shapes(path) == {"input": ["batch", 3, 224, 224], "logits": ["batch", 10]}
    x = torch.randn(2, 3, 224, 224)
    np.testing.assert_allclose(_onnxruntime(path, x)[0], _eager(model, x)[0], rtol=0, atol=ATOL)


@pytest.mark.slow
def test_detection_backbone_exports_at_a_given_size(tmp_path):
    backbone = NATBackbone("nat_mini", out_indices=(0, 1), embed_dim=16, depths=[1, 1], num_heads=[1, 2],
                           kernel_size=3).eval()
    size = (3, 96, 128)
    path = export_onnx(backbone, tmp_path / "backbone.onnx", size, output_names=["c2", "c3"])
    assert _onnx_shapes(path) == {"input": ["batch", 3, 96, 128], "c2": ["batch", 16, 24, 32],
                                  "c3": ["batch", 32, 12, 16]}
    for batch in (1, 2):
        x = torch.randn(batch, *size)
        for got, expected in zip(_onnxruntime(path, x), _eager(backbone, x), strict=True):
            np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)


def _attention_configurations(name: str) -> set[tuple]:
    """(kind, spatial, kernel, dilation) of every attention call of the full-size variant at its native size."""
    found = set()

    def record(module, args, kwargs):
        spatial = tuple(args[0].shape[1:-1])
        if isinstance(module, RelPosAttention):
            found.add(("global", spatial, None, None))
        else:
            dilation = kwargs.get("dilation")
            found.add(("na", spatial, module.kernel_size, tuple(module.dilation if dilation is None else dilation)))

    with torch.device("meta"):
        model = timm.create_model(name).eval()
        x = torch.randn(2, *native_input_size(model))
    for module in model.modules():
        if isinstance(module, (NeighborhoodAttention2D, RelPosAttention)):
            module.register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        assert model(x).shape == (2, model.num_classes)
    return found


def _code_path(configuration: tuple) -> tuple:
    """What decides the traced graph besides constants: kind, kernel, dilated or not, padded (map < kernel) or not."""
    kind, spatial, kernel, dilation = configuration
    if kind == "global":
        return (kind,)
    return kind, kernel, max(dilation) > 1, any(k > s for k, s in zip(kernel, spatial))


@pytest.mark.slow
def test_every_registered_variant_is_exportable_at_its_native_resolution():
    variants = models.registered_models()
    assert len(variants) >= 23
    configurations = set()
    for name in variants:
        found = _attention_configurations(name)
        assert found, name
        configurations |= found
    paths = {}
    for configuration in configurations:
        paths.setdefault(_code_path(configuration), []).append(configuration)
    assert {p[2:] for p in paths if p[0] == "na"} == {(False, False), (True, False), (False, True)}
    # The smallest and the largest map of every code path (every one, when a path has fewer): exported and compared.
    chosen = {c for group in paths.values() for c in (min(group), max(group))}
    for kind, spatial, kernel, dilation in sorted(chosen, key=str):
        if kind == "global":
            layer = RelPosAttention(8, 1, grid_size=spatial).eval()
        else:
            layer = NeighborhoodAttention2D(8, 1, kernel_size=kernel, dilation=dilation, rel_pos_bias=True).eval()
        program = torch.export.export(layer, (torch.randn(2, *spatial, 8),),
                                      dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        for batch in (1, 3):
            x = torch.randn(batch, *spatial, 8)
            with torch.no_grad():
                torch.testing.assert_close(program.module()(x), layer(x), rtol=0, atol=ATOL)


def test_export_rejects_bad_arguments(tmp_path):
    model = timm.create_model("nat_mini", **TINY)
    with pytest.raises(TypeError, match=r"input_size must be \(channels, height, width\), got 224"):
        export_program(model, 224)
    with pytest.raises(ValueError, match=r"input_size must hold three positive ints, got \(3, 0, 64\)"):
        export_program(model, (3, 0, 64))
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got str"):
        export_program("nat_mini", (3, 64, 64))
    with pytest.raises(ValueError, match=r"NATBackbone has no pretrained_cfg\['input_size'\]; pass input_size"):
        export_onnx(NATBackbone("nat_mini", **TINY), tmp_path / "b.onnx")
    with pytest.raises(ValueError, match=r"path='.*/missing/m.onnx': folder '.*/missing' does not exist"):
        export_onnx(model, tmp_path / "missing" / "m.onnx", (3, 64, 64))
    with pytest.raises(ValueError, match=r"output_names has 2 names, but the model returns 1 tensors"):
        export_onnx(model, tmp_path / "m.onnx", (3, 64, 64), output_names=["a", "b"])


@pytest.mark.slow
def test_tracing_for_export_leaves_the_cached_index_tables_real():
    # torch.export traces with fake tensors; tables first built (and cached) there made every later eager call
    # return data-less fake tensors.
    model = timm.create_model("nat_mini", **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    indexing._tile_tables_on.cache_clear()
    indexing._tile_tables_cpu.cache_clear()
    torch.export.export(model, (x,))
    with torch.no_grad():
        after = model(x)
    assert type(after) is torch.Tensor
    torch.testing.assert_close(after, expected, rtol=0, atol=0)
