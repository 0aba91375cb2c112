"""Extra key/value tokens and grouped key/value heads (GQA/MQA) for the fused op, on every backend.

Neither needs a kernel of its own:

* **GQA/MQA.** Key and value heads are repeated to the query's head count (query head ``h`` reads key/value head
  ``h // (heads // heads_kv)``, torch's ``repeat_interleave`` order, as SDPA's ``enable_gqa``) before the
  neighborhood op runs. That costs one copy of K and V at the full head count (the memory and bandwidth of ordinary
  multi-head attention) and autograd sums the key/value gradients back over each group.
* **Extra tokens.** The neighborhood part runs with its log-sum-exp (``return_lse``, on any backend, differentiable
  through ``lse`` too); a dense part scores the ``n_extra`` tokens for every query in PyTorch
  (``O(N * n_extra)`` logits) with its own log-sum-exp; the two are merged exactly:
  ``lse = logaddexp(lse_nb, lse_x)``, ``out = exp(lse_nb - lse) * out_nb + exp(lse_x - lse) * out_x``,
  which is the softmax over the union of both key sets. ``rpb`` applies to neighborhood keys only.
"""

from __future__ import annotations

from typing import Callable

import torch

from .reference import accumulation_dtype
from .validation import Problem

Output = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def expand_kv_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[..., heads_kv, D]`` -> ``[..., heads, D]`` by repeating each key/value head ``heads // heads_kv`` times."""
    groups = heads // x.shape[-2]
    return x if groups == 1 else x.repeat_interleave(groups, dim=-2)


def dense_extra(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of every query over the extra tokens alone.

    Args:
        query: ``[B, *S, H, D]``.
        keys: ``[B, n_extra, H, D]`` (heads already expanded).
        values: ``[B, n_extra, H, D]``.
        scale: Logit scale.

    Returns:
        ``out [B, *S, H, D]`` and ``lse [B, *S, H]``, both in the accumulation dtype.
    """
    acc = accumulation_dtype(query.dtype)
    batch, *spatial, heads, head_dim = query.shape
    tokens = 1
    for length in spatial:
        tokens *= length
    # The token count written out: a -1 cannot be inferred from an empty batch.
    q = query.reshape(batch, tokens, heads, head_dim).to(acc)
    logits = torch.einsum("bnhd,behd->bnhe", q, keys.to(acc)) * scale  # [B, N, H, n_extra]
    lse = torch.logsumexp(logits, dim=-1)
    out = torch.einsum("bnhe,behd->bnhd", torch.softmax(logits, dim=-1), values.to(acc))
    return out.reshape(batch, *spatial, heads, head_dim), lse.reshape(batch, *spatial, heads)


def merge_by_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The softmax over the union of two disjoint key sets from each set's normalised output and log-sum-exp.

    Returns:
        ``out`` and ``lse`` in the dtype of `lse_b`.
    """
    acc = lse_b.dtype
    lse = torch.logaddexp(lse_a.to(acc), lse_b)
    out = out_a.to(acc) * torch.exp(lse_a.to(acc) - lse).unsqueeze(-1) + out_b * torch.exp(lse_b - lse).unsqueeze(-1)
    return out, lse


def na_with_extras(
    problem: Problem,
    run: Callable[..., Output],
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    additional_keys: torch.Tensor | None,
    additional_values: torch.Tensor | None,
    return_lse: bool,
    backend: str | None,
) -> Output:
    """The fused op with GQA/MQA heads and/or extra tokens on top of `run` (:func:`functional.neighborhood_attention`)."""
    key, value = expand_kv_heads(key, problem.heads), expand_kv_heads(value, problem.heads)
    if additional_keys is None or additional_values is None or additional_keys.shape[1] == 0:
        return run(problem, query, key, value, rpb, return_lse, backend=backend)
    out_nb, lse_nb = run(problem, query, key, value, rpb, True, backend=backend)
    out_x, lse_x = dense_extra(
        query, expand_kv_heads(additional_keys, problem.heads), expand_kv_heads(additional_values, problem.heads),
        problem.scale,
    )
    out, lse = merge_by_lse(out_nb, lse_nb, out_x, lse_x)
    out = out.to(query.dtype)
    return (out, lse) if return_lse else out
