"""NATTEN's functional API (0.14 to 0.17) on natzoo's op: the unfused QK/AV ops, legacy names included, and the
fused ``na1d/na2d/na3d``.

Layouts as in NATTEN: the unfused ops are heads-first (``query [B, heads, *spatial, head_dim]``, attention weights
``[B, heads, *spatial, prod(kernel_size) (+ n_extra)]``, additional keys/values ``[B, heads, n_extra, head_dim]``);
the fused ops are heads-last (``[B, *spatial, heads, head_dim]``, additional keys/values
``[B, n_extra, heads, head_dim]``). The slot order of the weights is NATTEN's: row-major over the window.

Signatures are NATTEN's (tests/test_compat_natten.py pins each against the release it comes from): 0.17.x for
``na*d_qk``/``na*d_av``/``na*d``, where ``dilation`` defaults to 1 and ``dilation=None``/``is_causal=None`` mean 1 and
False; 0.15's ``na*d_qk_with_bias``; the ``natten*dqk*``/``natten*dav`` names of 0.14/0.15. Older call forms still
work: ``natten2dqkrpb(query, key, rpb, dilation)`` and ``natten2dav(attn, value, dilation)`` (0.14.0 to 0.14.5, the
kernel size read from ``rpb`` or ``attn``), and 0.15's 3-D forms of ``na3d_qk``/``na3d_av``
``(..., kernel_size_d, kernel_size, dilation_d, dilation, additional_keys/values)``, told apart from 0.17's
``(..., kernel_size, dilation, additional_keys/values, is_causal, ...)`` by an int in the fifth positional slot (0.17
has the extra tokens there) or by the keywords ``kernel_size_d``/``dilation_d``.

Nested tensors (NATTEN 0.15-0.17 took them in the unfused ops) are accepted by every op here: all tensor inputs but
``rpb`` nested alike, each component a full heads-first (or, for the fused ops, heads-last) tensor; the op runs once
per component and the result is a nested tensor of the per-component results (autograd included).

Errors name the shapes the caller passed (heads-first for the unfused ops), not natzoo's internal layout.

As in NATTEN, the fused ops treat ``scale=0``/None as ``head_dim ** -0.5`` (``scale or default``), and the unfused
ops apply no scale.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from natzoo import ops

from .context import (
    disable_gemm_na,
    disable_tf32,
    disable_tiled_na,
    enable_gemm_na,
    enable_tf32,
    enable_tiled_na,
    get_device_cc,
    has_bfloat,
    has_cuda,
    has_fp32_gemm,
    has_fp64_gemm,
    has_gemm,
    has_half,
    has_tf32_gemm,
)

__all__ = [
    "na1d", "na1d_av", "na1d_qk", "na1d_qk_with_bias", "na2d", "na2d_av", "na2d_qk", "na2d_qk_with_bias", "na3d",
    "na3d_av", "na3d_qk", "na3d_qk_with_bias", "natten1dav", "natten1dqk", "natten1dqkrpb", "natten2dav",
    "natten2dqk", "natten2dqkrpb", "natten3dav", "natten3dqk", "natten3dqkrpb",
    # NATTEN 0.15 kept its capability queries and kernel switches in natten.functional too.
    "disable_gemm_na", "disable_tf32", "disable_tiled_na", "enable_gemm_na", "enable_tf32", "enable_tiled_na",
    "get_device_cc", "has_bfloat", "has_cuda", "has_fp32_gemm", "has_fp64_gemm", "has_gemm", "has_half",
    "has_tf32_gemm",
]


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _heads_last(x: torch.Tensor) -> torch.Tensor:
    # [B, H, *S, X] -> [B, *S, H, X] (a view)
    return x.movedim(1, -2)


def _heads_first(x: torch.Tensor) -> torch.Tensor:
    # [B, *S, H, X] -> [B, H, *S, X] (a view)
    return x.movedim(-2, 1)


def _extra_heads_last(x: torch.Tensor | None) -> torch.Tensor | None:
    # NATTEN's unfused extra tokens [B, H, n_extra, D] -> natzoo's [B, n_extra, H, D]
    return None if x is None else x.transpose(1, 2)


def _shape(t: Any) -> tuple[int, ...]:
    return tuple(t.shape)


# ---- checks in the caller's (heads-first) layout -----------------------------------------------------------------


def _check_rank(fn: str, n: int, name: str, t: Any, last: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != n + 3:
        raise ValueError(f"{fn}: {name} must be heads-first [B, heads, *spatial({n}), {last}] ({n + 3} dims), got "
                         f"{name}.shape={_shape(t)}")


def _check_pair(fn: str, n: int, first: str, a: Any, second: str, b: Any, last_equal: bool) -> None:
    """`a` ``[B, H, *S, X]`` and `b` ``[B, H_kv, *S, D]``: same batch and spatial sizes (and ``X == D``)."""
    _check_rank(fn, n, first, a, "head_dim" if last_equal else "slots")
    _check_rank(fn, n, second, b, "head_dim")
    if a.shape[0] != b.shape[0] or a.shape[2:-1] != b.shape[2:-1] or (last_equal and a.shape[-1] != b.shape[-1]):
        what = "batch, spatial sizes and head_dim" if last_equal else "batch and spatial sizes"
        raise ValueError(f"{fn}: {first} and {second} must have the same {what}, got {first}.shape={_shape(a)}, "
                         f"{second}.shape={_shape(b)}")


def _check_extra(fn: str, name: str, extra: Any, ref: torch.Tensor) -> None:
    """Unfused extra tokens ``[B, heads_kv, n_extra, head_dim]`` matching `ref` ``[B, heads_kv, *S, head_dim]``."""
    if extra is None:
        return
    if not isinstance(extra, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a torch.Tensor or None, got {type(extra).__name__}")
    batch, heads_kv, head_dim = ref.shape[0], ref.shape[1], ref.shape[-1]
    if extra.dim() != 4 or (extra.shape[0], extra.shape[1], extra.shape[3]) != (batch, heads_kv, head_dim):
        raise ValueError(f"{fn}: {name} must be heads-first [B, heads_kv, n_extra, head_dim] = ({batch}, {heads_kv}, "
                         f"n_extra, {head_dim}), got {name}.shape={_shape(extra)}")


@contextmanager
def _user_shapes(*tensors: tuple[str, Any, Any]) -> Iterator[None]:
    """Re-raises a ValueError of natzoo's op with each ``name.shape=`` of the internal (heads-last) view replaced by
    the shape of the tensor the caller passed; `tensors` holds ``(name, passed, internal)``."""
    try:
        yield
    except ValueError as err:
        message = str(err)
        for name, passed, internal in tensors:
            if isinstance(passed, torch.Tensor) and isinstance(internal, torch.Tensor):
                message = message.replace(f"{name}.shape={_shape(internal)}", f"{name}.shape={_shape(passed)}")
        if message == str(err):
            raise
        # The original message shows the internal layout: it is not chained.
        raise ValueError(message) from None


# ---- nested tensors ----------------------------------------------------------------------------------------------


def _any_nested(*tensors: Any) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_nested for t in tensors)


def _per_component(fn: str, run: Callable[..., torch.Tensor], tensors: dict[str, Any], **fixed: Any) -> torch.Tensor:
    """Runs `run` on each component of the nested tensors in `tensors` (None entries stay None) and nests the
    results. Every tensor given must be nested, with one number of components."""
    rpb = fixed.get("rpb")
    if isinstance(rpb, torch.Tensor) and rpb.is_nested:
        raise ValueError(f"{fn}: rpb cannot be a nested tensor (one bias serves every component)")
    given = {name: t for name, t in tensors.items() if t is not None}
    flat = [name for name, t in given.items() if not (isinstance(t, torch.Tensor) and t.is_nested)]
    if flat:
        nested = [name for name in given if name not in flat]
        raise ValueError(f"{fn}: with nested inputs every tensor input but rpb must be nested, got {', '.join(nested)} "
                         f"nested and {', '.join(flat)} not")
    counts = {name: t.size(0) for name, t in given.items()}
    if len(set(counts.values())) != 1:
        raise ValueError(f"{fn}: nested inputs must have the same number of components, got "
                         + ", ".join(f"{name}: {count}" for name, count in counts.items()))
    parts = {name: t.unbind() for name, t in given.items()}
    outs = []
    for i in range(next(iter(counts.values()))):
        args = {name: parts[name][i] if name in parts else None for name in tensors}
        try:
            outs.append(run(**args, **fixed))
        except ValueError as err:
            raise ValueError(f"{fn}: nested component {i}: {err}") from None
    return torch.nested.as_nested_tensor(outs)


# ---- unfused ops -------------------------------------------------------------------------------------------------


def _qk(n: int, fn: str, query: Any, key: Any, kernel_size: Any, dilation: Any, additional_keys: Any,
        is_causal: Any, rpb: Any) -> torch.Tensor:
    if _any_nested(query, key, additional_keys):
        return _per_component(
            fn, lambda query, key, additional_keys, **kw: _qk(n, fn, query, key, additional_keys=additional_keys, **kw),
            {"query": query, "key": key, "additional_keys": additional_keys}, kernel_size=kernel_size,
            dilation=dilation, is_causal=is_causal, rpb=rpb)
    _check_pair(fn, n, "query", query, "key", key, last_equal=True)
    _check_extra(fn, "additional_keys", additional_keys, key)
    q, k, extra = _heads_last(query), _heads_last(key), _extra_heads_last(additional_keys)
    with _user_shapes(("query", query, q), ("key", key, k), ("additional_keys", additional_keys, extra)):
        logits = getattr(ops, f"na{n}d_qk")(
            q, k, kernel_size, dilation=1 if dilation is None else dilation,
            is_causal=False if is_causal is None else is_causal, rpb=rpb, additional_keys=extra)
    return _heads_first(logits)


def _av(n: int, fn: str, attn: Any, value: Any, kernel_size: Any, dilation: Any, additional_values: Any,
        is_causal: Any) -> torch.Tensor:
    if _any_nested(attn, value, additional_values):
        return _per_component(
            fn, lambda attn, value, additional_values, **kw: _av(n, fn, attn, value,
                                                                 additional_values=additional_values, **kw),
            {"attn": attn, "value": value, "additional_values": additional_values}, kernel_size=kernel_size,
            dilation=dilation, is_causal=is_causal)
    _check_pair(fn, n, "attn", attn, "value", value, last_equal=False)
    _check_extra(fn, "additional_values", additional_values, value)
    a, v, extra = _heads_last(attn), _heads_last(value), _extra_heads_last(additional_values)
    with _user_shapes(("attn", attn, a), ("value", value, v), ("additional_values", additional_values, extra)):
        out = getattr(ops, f"na{n}d_av")(
            a, v, kernel_size, dilation=1 if dilation is None else dilation,
            is_causal=False if is_causal is None else is_causal, additional_values=extra)
    return _heads_first(out)


def na1d_qk(query: torch.Tensor, key: torch.Tensor, kernel_size: Any, dilation: Any = 1,
            additional_keys: torch.Tensor | None = None, is_causal: Any = False,
            rpb: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, H, L, D]`` x ``[B, H, L, D]`` -> logits ``[B, H, L, k (+ n_extra)]`` (no scale). NATTEN 0.17; 0.15's
    ``(query, key, kernel_size, dilation, additional_keys)`` is the same call."""
    return _qk(1, "na1d_qk", query, key, kernel_size, dilation, additional_keys, is_causal, rpb)


def na2d_qk(query: torch.Tensor, key: torch.Tensor, kernel_size: Any, dilation: Any = 1,
            additional_keys: torch.Tensor | None = None, is_causal: Any = False,
            rpb: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, H, X, Y, D]`` -> logits ``[B, H, X, Y, k_0 * k_1 (+ n_extra)]`` (no scale); as :func:`na1d_qk`."""
    return _qk(2, "na2d_qk", query, key, kernel_size, dilation, additional_keys, is_causal, rpb)


def na1d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: Any, dilation: Any = 1,
            additional_values: torch.Tensor | None = None, is_causal: Any = False) -> torch.Tensor:
    """Weights ``[B, H, L, k (+ n_extra)]`` x values ``[B, H, L, D]`` -> ``[B, H, L, D]``. NATTEN 0.17; 0.15's
    ``(attn, value, kernel_size, dilation, additional_values)`` is the same call."""
    return _av(1, "na1d_av", attn, value, kernel_size, dilation, additional_values, is_causal)


def na2d_av(attn: torch.Tensor, value: torch.Tensor, kernel_size: Any, dilation: Any = 1,
            additional_values: torch.Tensor | None = None, is_causal: Any = False) -> torch.Tensor:
    """Weights ``[B, H, X, Y, k_0 * k_1 (+ n_extra)]`` x values ``[B, H, X, Y, D]`` -> ``[B, H, X, Y, D]``."""
    return _av(2, "na2d_av", attn, value, kernel_size, dilation, additional_values, is_causal)


def _depth(kernel_size_d: Any, kernel_size: Any, dilation_d: Any, dilation: Any) -> tuple[Any, Any]:
    """NATTEN 0.15's 3-D arguments as per-axis (depth, height, width) tuples."""
    return (kernel_size_d, kernel_size, kernel_size), (dilation_d, dilation, dilation)


def _na3d_qk_v017(query: torch.Tensor, key: torch.Tensor, kernel_size: Any, dilation: Any = 1,
                  additional_keys: torch.Tensor | None = None, is_causal: Any = False,
                  rpb: torch.Tensor | None = None) -> torch.Tensor:
    return _qk(3, "na3d_qk", query, key, kernel_size, dilation, additional_keys, is_causal, rpb)


def _na3d_qk_v015(query: torch.Tensor, key: torch.Tensor, kernel_size_d: int, kernel_size: int, dilation_d: int,
                  dilation: int, additional_keys: torch.Tensor | None = None) -> torch.Tensor:
    ks, dil = _depth(kernel_size_d, kernel_size, dilation_d, dilation)
    return _qk(3, "na3d_qk", query, key, ks, dil, additional_keys, False, None)


def _na3d_av_v017(attn: torch.Tensor, value: torch.Tensor, kernel_size: Any, dilation: Any = 1,
                  additional_values: torch.Tensor | None = None, is_causal: Any = False) -> torch.Tensor:
    return _av(3, "na3d_av", attn, value, kernel_size, dilation, additional_values, is_causal)


def _na3d_av_v015(attn: torch.Tensor, value: torch.Tensor, kernel_size_d: int, kernel_size: int, dilation_d: int,
                  dilation: int, additional_values: torch.Tensor | None = None) -> torch.Tensor:
    ks, dil = _depth(kernel_size_d, kernel_size, dilation_d, dilation)
    return _av(3, "na3d_av", attn, value, ks, dil, additional_values, False)


def _is_v015_call(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    # 0.17 has the extra tokens (a tensor or None) in the fifth positional slot, 0.15 the int dilation_d.
    return "kernel_size_d" in kwargs or "dilation_d" in kwargs or (len(args) > 4 and _is_int(args[4]))


for _impl, _public in ((_na3d_qk_v017, "na3d_qk"), (_na3d_qk_v015, "na3d_qk"), (_na3d_av_v017, "na3d_av"),
                       (_na3d_av_v015, "na3d_av")):
    # Python's own argument errors then name the public function (e.g. "na3d_qk() missing 1 required ...").
    _impl.__name__ = _impl.__qualname__ = _public


def na3d_qk(*args: Any, **kwargs: Any) -> torch.Tensor:
    """``[B, H, X, Y, Z, D]`` -> logits ``[B, H, X, Y, Z, k_0 * k_1 * k_2 (+ n_extra)]`` (no scale).

    NATTEN 0.17's ``(query, key, kernel_size, dilation=1, additional_keys=None, is_causal=False, rpb=None)``, or
    0.15's ``(query, key, kernel_size_d, kernel_size, dilation_d, dilation, additional_keys=None)``: an int fifth
    positional argument, or the keyword ``kernel_size_d`` or ``dilation_d``, selects the 0.15 form.
    """
    if _is_v015_call(args, kwargs):
        return _na3d_qk_v015(*args, **kwargs)
    return _na3d_qk_v017(*args, **kwargs)


def na3d_av(*args: Any, **kwargs: Any) -> torch.Tensor:
    """3-D weighted sum ``[B, H, X, Y, Z, D]``.

    NATTEN 0.17's ``(attn, value, kernel_size, dilation, additional_values=None, is_causal=False)`` (``dilation``
    defaults to 1 here), or 0.15's ``(attn, value, kernel_size_d, kernel_size, dilation_d, dilation,
    additional_values=None)``, told apart as in :func:`na3d_qk`.
    """
    if _is_v015_call(args, kwargs):
        return _na3d_av_v015(*args, **kwargs)
    return _na3d_av_v017(*args, **kwargs)


# What inspect.signature (and help) shows: the 0.17 form; the 0.15 form is kept beside it.
setattr(na3d_qk, "__signature__", inspect.signature(_na3d_qk_v017))
setattr(na3d_qk, "natten_0_15_signature", inspect.signature(_na3d_qk_v015))
setattr(na3d_av, "__signature__", inspect.signature(_na3d_av_v017))
setattr(na3d_av, "natten_0_15_signature", inspect.signature(_na3d_av_v015))


def na1d_qk_with_bias(query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None, kernel_size: Any,
                      dilation: Any, additional_keys: torch.Tensor | None = None) -> torch.Tensor:
    """NATTEN 0.15 name: :func:`na1d_qk` with the bias third."""
    return _qk(1, "na1d_qk_with_bias", query, key, kernel_size, dilation, additional_keys, False, bias)


def na2d_qk_with_bias(query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None, kernel_size: Any,
                      dilation: Any, additional_keys: torch.Tensor | None = None) -> torch.Tensor:
    """NATTEN 0.15 name: :func:`na2d_qk` with the bias third."""
    return _qk(2, "na2d_qk_with_bias", query, key, kernel_size, dilation, additional_keys, False, bias)


def na3d_qk_with_bias(query: torch.Tensor, key: torch.Tensor, bias: torch.Tensor | None, kernel_size_d: int,
                      kernel_size: int, dilation_d: int, dilation: int,
                      additional_keys: torch.Tensor | None = None) -> torch.Tensor:
    """NATTEN 0.15 name: 3-D logits with separate depth kernel and dilation, bias ``[H, 2k_d-1, 2k-1, 2k-1]``."""
    ks, dil = _depth(kernel_size_d, kernel_size, dilation_d, dilation)
    return _qk(3, "na3d_qk_with_bias", query, key, ks, dil, additional_keys, False, bias)


def _kernel_from_rpb(rpb: torch.Tensor | None, name: str) -> int:
    if not isinstance(rpb, torch.Tensor):
        raise ValueError(f"{name}: the four-argument form (query, key, rpb, dilation) reads kernel_size from rpb, "
                         "which is None; pass kernel_size")
    return (rpb.shape[-1] + 1) // 2


def _kernel_from_attn(attn: torch.Tensor, n: int, name: str) -> int:
    if not isinstance(attn, torch.Tensor) or attn.is_nested:
        raise ValueError(f"{name}: the three-argument form (attn, value, dilation) reads kernel_size from attn, "
                         "which is not a plain tensor here; pass kernel_size")
    k = round(attn.shape[-1] ** (1.0 / n))
    if k**n != attn.shape[-1]:
        raise ValueError(f"{name}: cannot read kernel_size from attn.shape={_shape(attn)} (last axis is not a "
                         f"{n}-th power); pass kernel_size")
    return k


def natten1dqkrpb(query: torch.Tensor, key: torch.Tensor, rpb: torch.Tensor | None, kernel_size: int,
                  dilation: int | None = None) -> torch.Tensor:
    """Legacy 1-D logits with optional rpb, heads-first; ``(query, key, rpb, dilation)`` is the 0.14.0-0.14.4 form."""
    if dilation is None:
        kernel_size, dilation = _kernel_from_rpb(rpb, "natten1dqkrpb"), kernel_size
    return _qk(1, "natten1dqkrpb", query, key, kernel_size, dilation, None, False, rpb)


def natten2dqkrpb(query: torch.Tensor, key: torch.Tensor, rpb: torch.Tensor | None, kernel_size: int,
                  dilation: int | None = None) -> torch.Tensor:
    """Legacy 2-D logits with optional rpb, heads-first; ``(query, key, rpb, dilation)`` is the 0.14.0-0.14.4 form."""
    if dilation is None:
        kernel_size, dilation = _kernel_from_rpb(rpb, "natten2dqkrpb"), kernel_size
    return _qk(2, "natten2dqkrpb", query, key, kernel_size, dilation, None, False, rpb)


def natten3dqkrpb(query: torch.Tensor, key: torch.Tensor, rpb: torch.Tensor | None, kernel_size_d: int,
                  kernel_size: int, dilation_d: int, dilation: int) -> torch.Tensor:
    """Legacy 3-D logits with optional rpb ``[H, 2k_d-1, 2k-1, 2k-1]``, heads-first."""
    ks, dil = _depth(kernel_size_d, kernel_size, dilation_d, dilation)
    return _qk(3, "natten3dqkrpb", query, key, ks, dil, None, False, rpb)


def natten1dqk(query: torch.Tensor, key: torch.Tensor, kernel_size: int, dilation: int,
               additional_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Legacy 1-D logits without rpb (`additional_keys` as in 0.15, where this name was ``na1d_qk``)."""
    return _qk(1, "natten1dqk", query, key, kernel_size, dilation, additional_keys, False, None)


def natten2dqk(query: torch.Tensor, key: torch.Tensor, kernel_size: int, dilation: int,
               additional_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Legacy 2-D logits without rpb (`additional_keys` as in 0.15)."""
    return _qk(2, "natten2dqk", query, key, kernel_size, dilation, additional_keys, False, None)


def natten3dqk(query: torch.Tensor, key: torch.Tensor, kernel_size_d: int, kernel_size: int, dilation_d: int,
               dilation: int, additional_keys: torch.Tensor | None = None) -> torch.Tensor:
    """Legacy 3-D logits without rpb (`additional_keys` as in 0.15)."""
    ks, dil = _depth(kernel_size_d, kernel_size, dilation_d, dilation)
    return _qk(3, "natten3dqk", query, key, ks, dil, additional_keys, False, None)


def natten1dav(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int | None = None,
               additional_values: torch.Tensor | None = None) -> torch.Tensor:
    """Legacy 1-D weighted sum, heads-first; ``(attn, value, dilation)`` is the 0.14.0-0.14.5 form
    (`additional_values` as in 0.15)."""
    if dilation is None:
        kernel_size, dilation = _kernel_from_attn(attn, 1, "natten1dav"), kernel_size
    return _av(1, "natten1dav", attn, value, kernel_size, dilation, additional_values, False)


def natten2dav(attn: torch.Tensor, value: torch.Tensor, kernel_size: int, dilation: int | None = None,
               additional_values: torch.Tensor | None = None) -> torch.Tensor:
    """Legacy 2-D weighted sum, heads-first; ``(attn, value, dilation)`` is the 0.14.0-0.14.5 form
    (`additional_values` as in 0.15)."""
    if dilation is None:
        kernel_size, dilation = _kernel_from_attn(attn, 2, "natten2dav"), kernel_size
    return _av(2, "natten2dav", attn, value, kernel_size, dilation, additional_values, False)


def natten3dav(attn: torch.Tensor, value: torch.Tensor, kernel_size_d: int, kernel_size: int, dilation_d: int,
               dilation: int, additional_values: torch.Tensor | None = None) -> torch.Tensor:
    """Legacy 3-D weighted sum, heads-first (`additional_values` as in 0.15)."""
    ks, dil = _depth(kernel_size_d, kernel_size, dilation_d, dilation)
    return _av(3, "natten3dav", attn, value, ks, dil, additional_values, False)


# ---- fused ops ---------------------------------------------------------------------------------------------------


def _fused(n: int, fn: str, query: Any, key: Any, value: Any, kernel_size: Any, dilation: Any, is_causal: Any,
           rpb: Any, scale: Any, additional_keys: Any, additional_values: Any) -> torch.Tensor:
    if _any_nested(query, key, value, additional_keys, additional_values):
        return _per_component(
            fn, lambda query, key, value, additional_keys, additional_values, **kw: _fused(
                n, fn, query, key, value, additional_keys=additional_keys, additional_values=additional_values, **kw),
            {"query": query, "key": key, "value": value, "additional_keys": additional_keys,
             "additional_values": additional_values},
            kernel_size=kernel_size, dilation=dilation, is_causal=is_causal, rpb=rpb, scale=scale)
    # NATTEN computes `scale or head_dim ** -0.5`: 0 means the default there.
    return getattr(ops, f"na{n}d")(
        query, key, value, kernel_size, dilation=1 if dilation is None else dilation,
        is_causal=False if is_causal is None else is_causal, rpb=rpb, scale=scale or None,
        additional_keys=additional_keys, additional_values=additional_values)


def na1d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: Any, dilation: Any = 1,
         is_causal: Any = False, rpb: torch.Tensor | None = None, scale: float | None = None,
         additional_keys: torch.Tensor | None = None, additional_values: torch.Tensor | None = None,
         xformers_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """Fused 1-D attention, heads-last ``[B, L, H, D]``; extra tokens ``[B, n_extra, H, D]``. `xformers_kwargs`
    (NATTEN's options for the xFormers call on the extra tokens) is accepted and unused."""
    return _fused(1, "na1d", query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values)


def na2d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: Any, dilation: Any = 1,
         is_causal: Any = False, rpb: torch.Tensor | None = None, scale: float | None = None,
         additional_keys: torch.Tensor | None = None, additional_values: torch.Tensor | None = None,
         xformers_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """Fused 2-D attention, heads-last ``[B, X, Y, H, D]``."""
    return _fused(2, "na2d", query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values)


def na3d(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: Any, dilation: Any = 1,
         is_causal: Any = False, rpb: torch.Tensor | None = None, scale: float | None = None,
         additional_keys: torch.Tensor | None = None, additional_values: torch.Tensor | None = None,
         xformers_kwargs: dict[str, Any] | None = None) -> torch.Tensor:
    """Fused 3-D attention, heads-last ``[B, X, Y, Z, H, D]``."""
    return _fused(3, "na3d", query, key, value, kernel_size, dilation, is_causal, rpb, scale, additional_keys,
                  additional_values)
