"""Export: ONNX through the dynamo exporter with a dynamic batch axis, checked with onnxruntime, and torch.export."""

from __future__ import annotations

import timm
import torch

from natzoo import models  # noqa: F401  (registers the model families with timm)
from natzoo.ops.neighborhood import indexing

TINY = {"embed_dim": 16, "depths": [1, 1, 1, 1], "num_heads": [1, 1, 2, 2], "kernel_size": 3}


def test_tracing_for_export_leaves_the_cached_index_tables_real():
    # torch.export traces with fake tensors; tables first built (and cached) there made every later eager call
    # return data-less fake tensors.
    torch.manual_seed(0)
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
