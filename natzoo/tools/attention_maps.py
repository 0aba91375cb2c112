"""Attention maps: what one query position attends to in each stage of a NAT-family model, as data and as a picture.

:func:`attention_maps` runs the model once as usual (its fast path untouched), capturing the input of one
neighborhood-attention module per stage; it then recomputes that module's attention weights through the unfused
ops (:func:`natzoo.ops.na2d_qk`, softmax) for the query position the image point falls on at that stage.
:func:`draw_attention_maps` draws them over the image as a PNG (matplotlib, no global pyplot state).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from natzoo.ops import NeighborhoodAttention2D, na2d_qk
from natzoo.ops.neighborhood.modules import _pad_to_window
from natzoo.ops.neighborhood.unfused import neighborhood_tables

__all__ = ["StageAttention", "attention_maps", "draw_attention_maps", "draw_demo_attention_maps"]


@dataclass(frozen=True)
class StageAttention:
    """The attention of one query position in one neighborhood-attention module.

    Attributes:
        stage: Stage (level) index.
        module: Qualified name of the attention module in the model.
        map_size: ``(height, width)`` of the stage's feature map.
        query: ``(row, col)`` of the query on that map.
        kernel_size: Window size per axis.
        dilation: Dilation used in this call.
        keys: ``[K, 2]`` (row, col) of each key the query attends to; rows/cols at or past ``map_size`` are the
            zero-padded tokens of a map smaller than ``kernel_size * dilation``.
        weights: ``[heads, K]`` softmax weights of those keys (each row sums to 1).
    """

    stage: int
    module: str
    map_size: tuple[int, int]
    query: tuple[int, int]
    kernel_size: tuple[int, int]
    dilation: tuple[int, int]
    keys: torch.Tensor
    weights: torch.Tensor

    def weight_map(self, head: int | None = None) -> torch.Tensor:
        """``[height, width]`` map of the weights (mean over heads, or one `head`); zero off the neighborhood and for
        padded keys (their weight is in `weights`, not on the map)."""
        w = self.weights.mean(0) if head is None else self.weights[head]
        out = torch.zeros(self.map_size, dtype=w.dtype)
        inside = (self.keys[:, 0] < self.map_size[0]) & (self.keys[:, 1] < self.map_size[1])
        out[self.keys[inside, 0], self.keys[inside, 1]] = w[inside]
        return out


def _stage_modules(model: nn.Module, block: int) -> list[tuple[int, str, NeighborhoodAttention2D]]:
    """One 2-D neighborhood-attention module per stage (the `block`-th of the stage)."""
    names = {id(m): name for name, m in model.named_modules()}
    stages = getattr(model, "stages", None)
    groups = [list(s.modules()) for s in stages] if stages is not None else [[m] for m in model.modules()]
    chosen: list[tuple[int, str, NeighborhoodAttention2D]] = []
    for index, members in enumerate(groups):
        attn = [m for m in members if isinstance(m, NeighborhoodAttention2D)]
        if attn:
            chosen.append((index if stages is not None else len(chosen), names[id(attn[block])], attn[block]))
    if not chosen:
        raise ValueError(f"attention_maps: {type(model).__name__} has no natzoo NeighborhoodAttention2D module")
    return chosen


def _weights_at(attn: NeighborhoodAttention2D, x: torch.Tensor, dilation: tuple[int, ...] | None,
                query: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """Keys ``[K, 2]`` and weights ``[heads, K]`` of `query` for the module's input ``x [1, H, W, C]``."""
    dil = tuple(attn.dilation if dilation is None else (dilation,) * 2 if isinstance(dilation, int) else dilation)
    padded = _pad_to_window(x, attn.kernel_size, dil)
    q, k, _ = attn.qkv(padded).unflatten(-1, (3, attn.num_heads, -1)).unbind(dim=-3)  # [1, H', W', heads, hd]
    logits = na2d_qk(q * attn.scale, k, attn.kernel_size, attn.stride, dil, attn.is_causal, rpb=attn.rpb)
    row, col = query
    weights = logits[0, row, col].float().softmax(-1)  # [heads, K]
    spatial = tuple(padded.shape[1:3])
    keys, valid, _ = neighborhood_tables(spatial, attn.kernel_size, attn.stride, dil, attn.is_causal)
    flat = keys[row * spatial[1] + col][valid[row * spatial[1] + col]]
    coords = torch.stack([flat // spatial[1], flat % spatial[1]], dim=-1)
    return coords, weights[:, valid[row * spatial[1] + col]], dil


@torch.no_grad()
def attention_maps(model: nn.Module, image: torch.Tensor, point: Sequence[float], block: int = -1) -> list[
        StageAttention]:
    """Each stage's neighborhood and attention weights for one image point.

    Args:
        model: A model built from natzoo's ``NeighborhoodAttention2D`` (the NAT/DiNAT families); if it has
            ``stages``, one module per stage is reported, else every module.
        image: ``[3, H, W]`` or ``[1, 3, H, W]``, already normalised as the model expects.
        point: ``(row, col)`` in image pixels; each stage reports the map position that pixel falls on.
        block: Which attention module of each stage (default the last).

    Returns:
        One :class:`StageAttention` per stage, in order.
    """
    if image.dim() == 3:
        image = image.unsqueeze(0)
    if image.dim() != 4 or image.shape[0] != 1:
        raise ValueError(f"attention_maps: image must be [3, H, W] or [1, 3, H, W], got shape {tuple(image.shape)}")
    height, width = image.shape[-2:]
    if len(point) != 2 or not (0 <= point[0] < height and 0 <= point[1] < width):
        raise ValueError(f"attention_maps: point must be (row, col) inside the {height}x{width} image, got {point}")
    chosen = _stage_modules(model, block)
    captured: dict[int, tuple[torch.Tensor, tuple[int, ...] | None]] = {}

    def hook(index: int):
        def capture(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured[index] = (args[0].detach(), kwargs.get("dilation", args[1] if len(args) > 1 else None))
        return capture

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, (_, _, m) in enumerate(chosen)]
    was_training = model.training
    try:
        model.eval()
        model(image)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    result = []
    for i, (stage, name, attn) in enumerate(chosen):
        x, dilation = captured[i]
        map_h, map_w = x.shape[1:3]
        query = (min(int(point[0] * map_h / height), map_h - 1), min(int(point[1] * map_w / width), map_w - 1))
        keys, weights, dil = _weights_at(attn, x, dilation, query)
        result.append(StageAttention(stage, name, (map_h, map_w), query, (attn.kernel_size[0], attn.kernel_size[1]),
                                     (dil[0], dil[1]), keys.cpu(), weights.cpu()))
    return result


def draw_attention_maps(image: torch.Tensor, maps: Sequence[StageAttention], path: str | Path,
                        title: str | None = None, head: int | None = None) -> Path:
    """Draws each stage's neighborhood and weights over the image and writes a PNG.

    Args:
        image: ``[3, H, W]`` RGB in ``[0, 1]`` (the picture shown, not the normalised model input).
        maps: From :func:`attention_maps`.
        path: Output PNG file (written to a temporary name, then renamed into place).
        title: Figure title.
        head: One head's weights, or None for the mean over heads.

    Returns:
        The path written.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    picture = image.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    height, width = picture.shape[:2]
    fig = Figure(figsize=(3.2 * len(maps), 3.9), dpi=100)
    FigureCanvasAgg(fig)
    extent = (0, width, height, 0)
    for i, m in enumerate(maps):
        ax = fig.add_subplot(1, len(maps), i + 1)
        ax.imshow(picture, extent=extent)
        cell_h, cell_w = height / m.map_size[0], width / m.map_size[1]
        w = m.weights.mean(0) if head is None else m.weights[head]
        inside = (m.keys[:, 0] < m.map_size[0]) & (m.keys[:, 1] < m.map_size[1])
        shown = m.weight_map(head).numpy()
        on_map = np.zeros(m.map_size, dtype=bool)
        on_map[m.keys[inside, 0].numpy(), m.keys[inside, 1].numpy()] = True
        # Outside the neighborhood: greyed out; inside: the weights, coloured from their min to their max.
        ax.imshow(np.where(on_map, np.nan, 0.0), cmap="gray", alpha=0.6, extent=extent, interpolation="nearest",
                  vmin=0.0, vmax=1.0)
        low, high = float(w[inside].min()) if inside.any() else 0.0, float(w.max())
        ax.imshow(np.where(on_map, shown, np.nan), cmap="magma", alpha=0.7, extent=extent, interpolation="nearest",
                  vmin=low, vmax=max(high, low + 1e-12))
        qr, qc = m.query
        ax.add_patch(Rectangle((qc * cell_w, qr * cell_h), cell_w, cell_h, fill=False, lw=2.0, ec="lime"))
        padded = float(w[~inside].sum())
        note = f"\n{int((~inside).sum())} padded keys hold {100 * padded:.0f}% of the weight" if padded else "\n"
        ax.set_title(f"stage {m.stage}: {m.map_size[0]}x{m.map_size[1]} map, k={m.kernel_size[0]}, "
                     f"d={m.dilation[0]}\nweights {low:.3f} (dark) to {high:.3f} (light){note}", fontsize=7)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.93) if title else (0, 0, 1, 1))
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def draw_demo_attention_maps(path: str | Path, point: Sequence[float] = (40, 24), seed: int = 0,
                             size: int = 64) -> list[StageAttention]:
    """The picture of docs/attention_maps.md: the demo model (``model=nat_demo``: ``nat_mini`` at width 32, depths
    1-1-2-1), initialised with `seed` (untrained), on a generated demo image of a ring.

    Returns:
        The maps drawn.
    """
    import numpy as np
    import timm

    import natzoo.models  # noqa: F401  (registers the NAT family with timm)
    from natzoo.datasets.demo import _draw_sample

    torch.manual_seed(seed)
    model = timm.create_model("nat_mini", embed_dim=32, depths=[1, 1, 2, 1], num_heads=[1, 2, 4, 8], num_classes=8)
    picture = np.asarray(_draw_sample("ring", size, np.random.default_rng(seed)), dtype=np.float32) / 255.0
    image = torch.from_numpy(picture).permute(2, 0, 1)
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    maps = attention_maps(model, (image - mean) / std, point)
    draw_attention_maps(image, maps, path, title=f"nat_demo (untrained, seed {seed}): query at pixel "
                        f"{tuple(point)} of a {size}x{size} demo image; mean over heads, last block per stage")
    return maps
