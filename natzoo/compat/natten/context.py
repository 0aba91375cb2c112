"""NATTEN 0.17's global switches (``natten.context``, re-exported from ``natten``), on natzoo.

NATTEN used these to choose among its kernels (fused or unfused, KV parallelism, tiled/GEMM kernels, TF32, the
auto-tuner, Flex Attention) and to trade memory for speed. natzoo has one exact op per call: the modules always run
its fused op (Triton on CUDA, the reference elsewhere), ``na*d`` is fused and ``na*d_qk``/``na*d_av`` are the
unfused halves, whatever is set here. So every switch is a recorded no-op: it validates its arguments as NATTEN
does (same exception types, same refusals in deterministic mode, same defaults), stores the value, and the matching
``is_*``/``get_*`` function reads it back, so code that sets a switch and checks it behaves as under NATTEN.
Determinism of natzoo's kernels follows ``torch.use_deterministic_algorithms`` (docs/kernels.md), not
:func:`use_deterministic_algorithms`; natzoo's own auto-tuning is controlled by ``$NATZOO_NA_AUTOTUNE``.

Capability queries answer for natzoo: half and bfloat16 and fused attention everywhere; NATTEN's GEMM kernels
(``has_gemm``, ``has_tf32_gemm``, ``has_fp32_gemm``, ``has_fp64_gemm``) never.
"""

from __future__ import annotations

import warnings
from enum import Enum
from typing import Any

import torch

__all__ = [
    "AutotunerContext", "MemoryUsagePreference", "NattenContext", "are_deterministic_algorithms_enabled",
    "disable_autotuner", "disable_gemm_na", "disable_tf32", "disable_tiled_na", "enable_gemm_na", "enable_tf32",
    "enable_tiled_na", "force_flex_attention", "get_device_cc", "get_memory_usage_preference", "has_bfloat",
    "has_cuda", "has_fna", "has_fp32_gemm", "has_fp64_gemm", "has_fused_na", "has_gemm", "has_half",
    "has_tf32_gemm", "is_autotuner_enabled", "is_autotuner_enabled_for_backward", "is_autotuner_enabled_for_forward",
    "is_autotuner_thorough_for_backward", "is_autotuner_thorough_for_forward", "is_fna_enabled",
    "is_fused_na_enabled", "is_gemm_na_enabled", "is_kv_parallelism_in_fused_na_enabled", "is_memory_usage_default",
    "is_memory_usage_strict", "is_memory_usage_unrestricted", "is_tf32_in_gemm_na_enabled", "is_tiled_na_enabled",
    "set_memory_usage_preference", "should_force_flex_attention", "should_use_flex_attention", "use_autotuner",
    "use_deterministic_algorithms", "use_flex_attention", "use_fna", "use_fused_na", "use_gemm_na",
    "use_kv_parallelism_in_fused_na", "use_tf32_in_gemm_na", "use_tiled_na",
]


class MemoryUsagePreference(Enum):
    """NATTEN's training-memory preference (recorded only)."""

    Default = 0
    Strict = 1
    Unrestricted = 2


class NattenContext:
    """The recorded main switches, NATTEN 0.17's defaults; :meth:`reset` restores them."""

    is_deterministic_mode_enabled: bool = False
    is_fused_na_enabled: bool = False
    is_kv_parallelism_enabled: bool = False
    use_flex_attention: bool = False
    force_flex_attention: bool = False
    training_memory_preference: MemoryUsagePreference = MemoryUsagePreference.Default
    # The libnatten switches (true by default in NATTEN's C++ configuration).
    tiled_na: bool = True
    gemm_na: bool = True
    gemm_tf32: bool = True

    @staticmethod
    def reset() -> None:
        """Every main switch back to its default (the libnatten ones are reset by their ``use_*`` functions, as in
        NATTEN)."""
        NattenContext.is_deterministic_mode_enabled = False
        NattenContext.is_fused_na_enabled = False
        NattenContext.is_kv_parallelism_enabled = False
        NattenContext.use_flex_attention = False
        NattenContext.force_flex_attention = False
        NattenContext.training_memory_preference = MemoryUsagePreference.Default


def _need_bool(name: str, value: Any) -> None:
    # NATTEN raises ValueError (not TypeError) for a wrongly typed auto-tuner setting.
    if not isinstance(value, bool):
        raise ValueError(f"natten.use_autotuner: {name} must be a bool or None, got {type(value).__name__} {value!r}")


def _need_int(name: str, value: Any) -> None:
    if not isinstance(value, int):
        raise ValueError(f"natten.use_autotuner: {name} must be an int or None, got {type(value).__name__} {value!r}")


class AutotunerContext:
    """The recorded auto-tuner settings, NATTEN 0.17's defaults; :meth:`reset` restores them."""

    enabled_for_forward: bool = False
    enabled_for_backward: bool = False
    thorough_mode_forward: bool = False
    thorough_mode_backward: bool = False
    warmup_steps_forward: int = 5
    warmup_steps_backward: int = 5
    steps_forward: int = 5
    steps_backward: int = 5

    @staticmethod
    def reset() -> None:
        """Every auto-tuner setting back to its default."""
        AutotunerContext.enabled_for_forward = AutotunerContext.enabled_for_backward = False
        AutotunerContext.thorough_mode_forward = AutotunerContext.thorough_mode_backward = False
        AutotunerContext.warmup_steps_forward = AutotunerContext.warmup_steps_backward = 5
        AutotunerContext.steps_forward = AutotunerContext.steps_backward = 5

    @staticmethod
    def set_enabled(direction: str, mode: bool | None) -> None:
        """Enables or disables tuning of the ``"forward"`` or ``"backward"`` pass; None leaves it unchanged."""
        if mode is None:
            return
        _need_bool(f"{direction}_pass", mode)
        if mode and are_deterministic_algorithms_enabled():
            raise RuntimeError(f"natten.use_autotuner: NATTEN's deterministic mode is on; auto-tuning the {direction} "
                               "pass is non-deterministic and cannot be enabled")
        setattr(AutotunerContext, f"enabled_for_{direction}", mode)

    @staticmethod
    def set_value(name: str, value: bool | int | None) -> None:
        """Sets ``thorough_mode_*`` (bool) or ``*steps_*`` (int); None leaves it unchanged."""
        if value is None:
            return
        (_need_bool if name.startswith("thorough") else _need_int)(name, value)
        setattr(AutotunerContext, name, value)


# ---- memory preference -------------------------------------------------------------------------------------------

_PREFERENCES = {"default": MemoryUsagePreference.Default, "strict": MemoryUsagePreference.Strict,
                "unrestricted": MemoryUsagePreference.Unrestricted}


def set_memory_usage_preference(pref: str = "default") -> None:
    """Records NATTEN's memory preference: ``"default"``, ``"strict"`` or ``"unrestricted"`` (ValueError otherwise).
    natzoo's kernels pick their tiles themselves; the value has no effect."""
    if not isinstance(pref, str) or pref not in _PREFERENCES:
        raise ValueError(f"natten.set_memory_usage_preference: pref must be one of 'default', 'strict', "
                         f"'unrestricted', got {pref!r}")
    NattenContext.training_memory_preference = _PREFERENCES[pref]


def get_memory_usage_preference() -> MemoryUsagePreference:
    """The recorded memory preference."""
    return NattenContext.training_memory_preference


def is_memory_usage_default() -> bool:
    return get_memory_usage_preference() == MemoryUsagePreference.Default


def is_memory_usage_strict() -> bool:
    return get_memory_usage_preference() == MemoryUsagePreference.Strict


def is_memory_usage_unrestricted() -> bool:
    return get_memory_usage_preference() == MemoryUsagePreference.Unrestricted


# ---- deterministic mode, fused attention, KV parallelism, Flex Attention ------------------------------------------


def use_deterministic_algorithms(mode: bool = True) -> None:
    """Records NATTEN's deterministic mode (it then refuses KV parallelism and the auto-tuner, as NATTEN did).
    natzoo's kernels follow ``torch.use_deterministic_algorithms`` instead."""
    NattenContext.is_deterministic_mode_enabled = mode


def are_deterministic_algorithms_enabled() -> bool:
    return NattenContext.is_deterministic_mode_enabled


def use_kv_parallelism_in_fused_na(mode: bool = True) -> None:
    """Records KV parallelism. Enabling it is ignored with a warning under ``torch.use_deterministic_algorithms``
    and refused (RuntimeError) in NATTEN's deterministic mode, as in NATTEN."""
    if not mode:
        NattenContext.is_kv_parallelism_enabled = False
        return
    if torch.are_deterministic_algorithms_enabled():
        warnings.warn("natten.use_kv_parallelism_in_fused_na: PyTorch's deterministic mode is on; KV parallelism "
                      "is non-deterministic and stays off", stacklevel=2)
        return
    if are_deterministic_algorithms_enabled():
        raise RuntimeError("natten.use_kv_parallelism_in_fused_na: NATTEN's deterministic mode is on; KV "
                           "parallelism is non-deterministic and cannot be enabled")
    NattenContext.is_kv_parallelism_enabled = True


def is_kv_parallelism_in_fused_na_enabled() -> bool:
    return NattenContext.is_kv_parallelism_enabled


def use_fused_na(mode: bool = True, kv_parallel: bool = True, use_flex_attention: bool = False,
                 force_flex_attention: bool = False) -> None:
    """Records the fused-attention switch (and with it KV parallelism and the Flex Attention flags, as NATTEN
    0.17.5 does). The compat modules run natzoo's fused op either way."""
    if not mode:
        NattenContext.is_fused_na_enabled = False
        NattenContext.use_flex_attention = NattenContext.force_flex_attention = False
        use_kv_parallelism_in_fused_na(False)
        return
    use_kv_parallelism_in_fused_na(kv_parallel)
    NattenContext.is_fused_na_enabled = True
    NattenContext.use_flex_attention = use_flex_attention
    NattenContext.force_flex_attention = force_flex_attention


def is_fused_na_enabled() -> bool:
    return NattenContext.is_fused_na_enabled


use_fna = use_fused_na
is_fna_enabled = is_fused_na_enabled


def use_flex_attention() -> None:
    """NATTEN 0.17.5: fused attention, preferring its Flex Attention backend (recorded only)."""
    use_fused_na(mode=True, use_flex_attention=True, force_flex_attention=False)


def force_flex_attention() -> None:
    """NATTEN 0.17.5: fused attention, always on its Flex Attention backend (recorded only)."""
    use_fused_na(mode=True, use_flex_attention=True, force_flex_attention=True)


def should_use_flex_attention() -> bool:
    return NattenContext.use_flex_attention


def should_force_flex_attention() -> bool:
    return NattenContext.force_flex_attention


# ---- auto-tuner --------------------------------------------------------------------------------------------------


def use_autotuner(forward_pass: bool | None = None, backward_pass: bool | None = None,
                  thorough_mode_forward: bool | None = None, thorough_mode_backward: bool | None = None,
                  warmup_steps_forward: int | None = None, warmup_steps_backward: int | None = None,
                  steps_forward: int | None = None, steps_backward: int | None = None) -> None:
    """Records NATTEN's auto-tuner settings; None leaves a setting unchanged, ``(False, False)`` turns tuning off.

    Raises:
        ValueError: A setting of the wrong type (a non-bool flag, a non-int step count).
        RuntimeError: Enabling tuning in NATTEN's deterministic mode. Under ``torch.use_deterministic_algorithms``
            enabling is ignored with a warning, as in NATTEN.
    """
    if forward_pass is not None and backward_pass is not None and not forward_pass and not backward_pass:
        AutotunerContext.enabled_for_forward = AutotunerContext.enabled_for_backward = False
        return
    if (forward_pass or backward_pass) and torch.are_deterministic_algorithms_enabled():
        warnings.warn("natten.use_autotuner: PyTorch's deterministic mode is on; the auto-tuner is "
                      "non-deterministic and stays off", stacklevel=2)
        return
    AutotunerContext.set_enabled("forward", forward_pass)
    AutotunerContext.set_enabled("backward", backward_pass)
    for name, value in (("thorough_mode_forward", thorough_mode_forward),
                        ("thorough_mode_backward", thorough_mode_backward),
                        ("warmup_steps_forward", warmup_steps_forward),
                        ("warmup_steps_backward", warmup_steps_backward), ("steps_forward", steps_forward),
                        ("steps_backward", steps_backward)):
        AutotunerContext.set_value(name, value)


def disable_autotuner() -> None:
    """Turns tuning and thorough mode off in both directions (step counts are kept, as in NATTEN)."""
    AutotunerContext.enabled_for_forward = AutotunerContext.enabled_for_backward = False
    AutotunerContext.thorough_mode_forward = AutotunerContext.thorough_mode_backward = False


def is_autotuner_enabled() -> bool:
    return AutotunerContext.enabled_for_forward or AutotunerContext.enabled_for_backward


def is_autotuner_enabled_for_forward() -> bool:
    return AutotunerContext.enabled_for_forward


def is_autotuner_enabled_for_backward() -> bool:
    return AutotunerContext.enabled_for_backward


def is_autotuner_thorough_for_forward() -> bool:
    return AutotunerContext.thorough_mode_forward


def is_autotuner_thorough_for_backward() -> bool:
    return AutotunerContext.thorough_mode_backward


# ---- capabilities ------------------------------------------------------------------------------------------------


def get_device_cc(device_index: Any = None) -> int:
    """Compute capability of a CUDA device as ``10 * major + minor`` (NATTEN 0.15's helper)."""
    major, minor = torch.cuda.get_device_capability(device_index)
    return major * 10 + minor


def has_cuda() -> bool:
    """Whether a CUDA device is visible (natzoo's op needs no compiled extension)."""
    return torch.cuda.is_available()


def has_half(device_index: Any = None) -> bool:
    """float16 runs on every device (the reference path on CPU, the kernels on CUDA)."""
    return True


def has_bfloat(device_index: Any = None) -> bool:
    """bfloat16 runs on every device."""
    return True


def has_gemm(device_index: Any = None) -> bool:
    """NATTEN's GEMM kernels do not exist here; natzoo's fused kernels take their place."""
    return False


def has_tf32_gemm(device_index: Any = None) -> bool:
    """No GEMM kernels (see :func:`has_gemm`)."""
    return False


has_fp32_gemm = has_tf32_gemm


def has_fp64_gemm(device_index: Any = None) -> bool:
    """No GEMM kernels (see :func:`has_gemm`)."""
    return False


def has_fna(device_index: Any = None) -> bool:
    """Fused attention runs everywhere (Triton on CUDA, the reference elsewhere)."""
    return True


has_fused_na = has_fna


# ---- libnatten kernel switches (recorded only) --------------------------------------------------------------------


def use_tf32_in_gemm_na(mode: bool = True) -> None:
    NattenContext.gemm_tf32 = bool(mode)


def is_tf32_in_gemm_na_enabled() -> bool:
    return NattenContext.gemm_tf32


def use_tiled_na(mode: bool = True) -> None:
    NattenContext.tiled_na = bool(mode)


def is_tiled_na_enabled() -> bool:
    return NattenContext.tiled_na


def use_gemm_na(mode: bool = True) -> None:
    NattenContext.gemm_na = bool(mode)


def is_gemm_na_enabled() -> bool:
    return NattenContext.gemm_na


def enable_tf32() -> bool:
    """Deprecated NATTEN name: :func:`use_tf32_in_gemm_na` (True), returns the recorded state."""
    use_tf32_in_gemm_na(True)
    return is_tf32_in_gemm_na_enabled()


def disable_tf32() -> bool:
    use_tf32_in_gemm_na(False)
    return is_tf32_in_gemm_na_enabled()


def enable_gemm_na() -> bool:
    use_gemm_na(True)
    return is_gemm_na_enabled()


def disable_gemm_na() -> bool:
    use_gemm_na(False)
    return is_gemm_na_enabled()


def enable_tiled_na() -> bool:
    use_tiled_na(True)
    return is_tiled_na_enabled()


def disable_tiled_na() -> bool:
    use_tiled_na(False)
    return is_tiled_na_enabled()
