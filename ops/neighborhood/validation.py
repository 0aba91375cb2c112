"""Argument checking for the neighborhood-attention ops, shared by every backend.

The checks run in the order listed in docs/ops.md ("Validation"); the first failure raises. Whether a forced backend
can run the problem is checked in :mod:`natzoo.ops.neighborhood.dispatch`, because it depends on the backend.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Sequence

import torch

IntOrTuple = int | Sequence[int]
BoolOrTuple = bool | Sequence[bool]

# Largest |scale| accepted. The logits ``q.k * scale`` are formed in float32 for every input dtype but float64; a
# scale such as 1e38 overflows them to inf for ordinary inputs, and the softmax then returns NaN everywhere.
# Practical scales (head_dim ** -0.5, cosine-attention temperatures up to ~100) are far below the bound.
MAX_SCALE = 1e6
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
BACKENDS = (None, "auto", "triton", "cpu", "dense", "reference")


@dataclass(frozen=True)
class Problem:
    """A validated neighborhood-attention problem: every per-axis argument normalised to an `n`-tuple."""

    name: str
    n: int
    batch: int
    spatial: tuple[int, ...]
    heads: int
    head_dim: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    scale: float
    dtype: torch.dtype
    device: torch.device

    @property
    def num_tokens(self) -> int:
        return math.prod(self.spatial)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def normalize_ints(fn: str, arg: str, value: Any, n: int) -> tuple[int, ...]:
    """Turns an int or an `n`-sequence of ints into an `n`-tuple."""
    if _is_int(value):
        return (int(value),) * n
    if isinstance(value, (tuple, list)) and len(value) == n and all(_is_int(v) for v in value):
        return tuple(int(v) for v in value)
    raise ValueError(f"{fn}: {arg} must be an int or a tuple/list of {n} ints (n={n} spatial axes), got {value!r}")


def normalize_bools(fn: str, arg: str, value: Any, n: int) -> tuple[bool, ...]:
    """Turns a bool or an `n`-sequence of bools into an `n`-tuple."""
    if isinstance(value, bool):
        return (value,) * n
    if isinstance(value, (tuple, list)) and len(value) == n and all(isinstance(v, bool) for v in value):
        return tuple(value)
    raise ValueError(f"{fn}: {arg} must be a bool or a tuple/list of {n} bools (n={n} spatial axes), got {value!r}")


def check_window_args(
    fn: str, n: int, kernel_size: Any, stride: Any, dilation: Any, is_causal: Any
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
    """Checks the window arguments (form and ranges), which the modules also apply at construction time.

    Returns:
        The normalised `(kernel_size, stride, dilation, is_causal)` tuples.
    """
    ks = normalize_ints(fn, "kernel_size", kernel_size, n)
    st = normalize_ints(fn, "stride", stride, n)
    dil = normalize_ints(fn, "dilation", dilation, n)
    causal = normalize_bools(fn, "is_causal", is_causal, n)
    for axis, k in enumerate(ks):
        if k < 2:
            raise ValueError(f"{fn}: kernel_size must be >= 2, got kernel_size={k} on axis {axis}")
    for axis, (s, k) in enumerate(zip(st, ks)):
        if s < 1 or s > k:
            raise ValueError(
                f"{fn}: stride must satisfy 1 <= stride <= kernel_size, got stride={s} with kernel_size={k} "
                f"on axis {axis}"
            )
    for axis, d in enumerate(dil):
        if d < 1:
            raise ValueError(f"{fn}: dilation must be >= 1, got dilation={d} on axis {axis}")
    return ks, st, dil, causal


def check_window(fn: str, n: int, spatial: Sequence[int], kernel_size: Any, stride: Any, dilation: Any,
                 is_causal: Any, shape_note: str
                 ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[bool, ...]]:
    """:func:`check_window_args`, then ``kernel_size * dilation <= length`` on every axis of `spatial` (the error
    names the axis and ends with `shape_note`, e.g. the shape of the tensor the lengths came from)."""
    ks, st, dil, causal = check_window_args(fn, n, kernel_size, stride, dilation, is_causal)
    for axis, (k, d, length) in enumerate(zip(ks, dil, spatial)):
        if k * d > length:
            raise ValueError(
                f"{fn}: kernel_size * dilation must not exceed the input length on every axis, got "
                f"kernel_size={k} * dilation={d} = {k * d} > {length} on axis {axis} ({shape_note})"
            )
    return ks, st, dil, causal


def check_problem(
    fn: str,
    n: int,
    query: Any,
    key: Any,
    value: Any,
    kernel_size: Any,
    stride: Any,
    dilation: Any,
    is_causal: Any,
    scale: Any,
    rpb: Any,
    backend: Any,
    additional_keys: Any = None,
    additional_values: Any = None,
) -> Problem:
    """Runs every argument check of docs/ops.md ("Validation") in order and returns the normalised problem.

    Args:
        fn: Public function name used as the message prefix (e.g. ``"na2d"``).
        n: Number of spatial axes.

    Raises:
        ValueError: For any invalid argument, naming it with the offending values and shapes.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if not query.dtype.is_floating_point:
        raise ValueError(f"{fn}: query dtype must be floating point, got dtype={query.dtype}")
    if query.dtype not in SUPPORTED_DTYPES:
        raise ValueError(
            f"{fn}: query dtype={query.dtype} is not supported; supported dtypes are "
            "float16, bfloat16, float32, float64"
        )
    if key.dtype != query.dtype or value.dtype != query.dtype:
        raise ValueError(
            f"{fn}: query, key and value must share one dtype, got query dtype={query.dtype}, "
            f"key dtype={key.dtype}, value dtype={value.dtype}"
        )
    if key.device != query.device or value.device != query.device:
        raise ValueError(
            f"{fn}: query, key and value must be on one device, got query device={query.device}, "
            f"key device={key.device}, value device={value.device}"
        )
    if query.dim() != n + 3:
        raise ValueError(
            f"{fn}: query must have the layout [B, *spatial({n}), heads, head_dim] ({n + 3} dims), "
            f"got query.shape={tuple(query.shape)}"
        )
    # key and value may have fewer heads than query (GQA/MQA): every other axis must match.
    if key.shape != value.shape or key.dim() != query.dim() or key.shape[:-2] + key.shape[-1:] != (
        query.shape[:-2] + query.shape[-1:]
    ):
        raise ValueError(
            f"{fn}: query, key and value must have identical shapes (key and value may have fewer heads), got "
            f"query.shape={tuple(query.shape)}, key.shape={tuple(key.shape)}, value.shape={tuple(value.shape)}"
        )
    batch, *spatial, heads, head_dim = query.shape
    if heads == 0 or head_dim == 0 or any(length == 0 for length in spatial) or key.shape[-2] == 0:
        raise ValueError(
            f"{fn}: heads, head_dim and every spatial length must be non-zero, got query.shape={tuple(query.shape)}, "
            f"key.shape={tuple(key.shape)}"
        )
    heads_kv = key.shape[-2]
    if heads % heads_kv != 0:
        raise ValueError(
            f"{fn}: the heads of key and value must divide the heads of query (GQA/MQA), got {heads_kv} and {heads} "
            f"heads (query.shape={tuple(query.shape)}, key.shape={tuple(key.shape)})"
        )
    ks, st, dil, causal = check_window(fn, n, spatial, kernel_size, stride, dilation, is_causal,
                                       f"query.shape={tuple(query.shape)}")
    if rpb is not None:
        if not isinstance(rpb, torch.Tensor) or rpb.dtype not in SUPPORTED_DTYPES or rpb.device != query.device:
            detail = (
                f"type {type(rpb).__name__}"
                if not isinstance(rpb, torch.Tensor)
                else f"dtype={rpb.dtype}, device={rpb.device}"
            )
            raise ValueError(
                f"{fn}: rpb must be a floating tensor on the device of query ({query.device}), got {detail}"
            )
        expected = (heads, *(2 * k - 1 for k in ks))
        if tuple(rpb.shape) != expected:
            raise ValueError(
                f"{fn}: rpb must have shape {expected} [heads, 2k-1, ...], got rpb.shape={tuple(rpb.shape)}"
            )
        if any(s != 1 for s in st):
            raise ValueError(f"{fn}: rpb is only defined for stride 1 on every axis, got stride={st}")
    if scale is None:
        scale_value = float(head_dim) ** -0.5
    elif isinstance(scale, numbers.Real) and not isinstance(scale, bool) and (
        torch.compiler.is_compiling() or math.isfinite(float(scale))
    ):
        # Under torch.compile a Python float may be traced symbolically, and testing it would break the graph; it
        # was checked when the call (or the module holding it) ran eagerly.
        scale_value = float(scale)
    else:
        raise ValueError(f"{fn}: scale must be None or a finite real number, got scale={scale!r}")
    if not torch.compiler.is_compiling() and abs(scale_value) > MAX_SCALE:
        raise ValueError(f"{fn}: scale={scale!r} is too large: |scale| must be <= {MAX_SCALE:g} (the logits q.k * scale "
                         "are computed in float32 and would overflow to inf, making the output NaN)")
    if backend not in BACKENDS:
        allowed = ", ".join(repr(b) for b in BACKENDS)
        raise ValueError(f"{fn}: backend must be one of {allowed}, got backend={backend!r}")
    check_additional_kv(fn, query, heads_kv, additional_keys, additional_values)
    return Problem(
        name=fn,
        n=n,
        batch=batch,
        spatial=tuple(spatial),
        heads=heads,
        head_dim=head_dim,
        kernel_size=ks,
        stride=st,
        dilation=dil,
        is_causal=causal,
        scale=scale_value,
        dtype=query.dtype,
        device=query.device,
    )


def check_rpb_flag(fn: str, rel_pos_bias: bool, stride: tuple[int, ...]) -> None:
    """Module check: a relative positional bias needs stride 1 on every axis."""
    if rel_pos_bias and any(s != 1 for s in stride):
        raise ValueError(f"{fn}: rel_pos_bias=True requires stride 1 on every axis, got stride={stride}")



def check_additional_kv(fn: str, query: torch.Tensor, heads_kv: int, additional_keys: Any,
                        additional_values: Any) -> None:
    """Extra key/value tokens: both or neither, ``[B, n_extra, heads_kv, head_dim]`` each, identical shapes, in the
    dtype and on the device of `query`."""
    if additional_keys is None and additional_values is None:
        return
    if additional_keys is None or additional_values is None:
        raise ValueError(
            f"{fn}: additional_keys and additional_values must be given together, got additional_keys "
            f"{type(additional_keys).__name__} and additional_values {type(additional_values).__name__}"
        )
    batch, head_dim = query.shape[0], query.shape[-1]
    for name, t in (("additional_keys", additional_keys), ("additional_values", additional_values)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != query.dtype or t.device != query.device:
            raise ValueError(
                f"{fn}: {name} must have the dtype and device of query ({query.dtype}, {query.device}), got "
                f"dtype={t.dtype}, device={t.device}"
            )
        if t.dim() != 4 or t.shape[0] != batch or tuple(t.shape[2:]) != (heads_kv, head_dim):
            raise ValueError(
                f"{fn}: {name} must have shape [B, n_extra, heads_kv, head_dim] = ({batch}, n_extra, {heads_kv}, "
                f"{head_dim}), got {name}.shape={tuple(t.shape)}"
            )
    if additional_keys.shape != additional_values.shape:
        raise ValueError(
            f"{fn}: additional_keys and additional_values must have identical shapes, got "
            f"additional_keys.shape={tuple(additional_keys.shape)}, "
            f"additional_values.shape={tuple(additional_values.shape)}"
        )
# Constructor-argument checks shared by the modules and the model families.


def check_int(owner: str, name: str, value: Any, minimum: int = 1) -> int:
    """`value` as an int ``>= minimum``; TypeError for a non-integer (bools and floats included), ValueError below."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: {name} must be >= {minimum}, got {value}")
    return int(value)


def check_real(owner: str, name: str, value: Any, positive: bool = False) -> float:
    """`value` as a finite float (and ``> 0`` when `positive`); TypeError for a non-number, ValueError otherwise."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{owner}: {name} must be a finite number{' > 0' if positive else ''}, got {value}")
    return float(value)


def check_rate(owner: str, name: str, value: Any) -> float:
    """A dropout or drop-path probability: a real number in ``[0, 1)``."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a probability (a float in [0, 1)), got {type(value).__name__} "
                        f"{value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{owner}: {name} must be in [0, 1), got {value}")
    return float(value)


def check_heads(owner: str, dim: Any, num_heads: Any) -> tuple[int, int]:
    """`dim` and `num_heads` as ints ``>= 1``, the head count dividing the width."""
    dim, num_heads = check_int(owner, "dim", dim), check_int(owner, "num_heads", num_heads)
    if dim % num_heads != 0:
        raise ValueError(f"{owner}: num_heads must divide dim, got dim={dim}, num_heads={num_heads}")
    return dim, num_heads


def check_bool(owner: str, name: str, value: Any) -> bool:
    """`value` if it is a bool; TypeError otherwise (a string such as ``"false"`` would be truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{owner}: {name} must be a bool, got {type(value).__name__} {value!r}")
    return value
