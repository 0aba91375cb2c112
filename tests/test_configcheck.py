"""The per-config kernel check (``triton/configcheck.py``) and the config forcing it relies on (``tiling``).

On CPU the cases run in Triton's interpreter (conftest turns it on) on tiny problems; with a GPU the same tests run
on CUDA. The full sweep of every entry is the GPU kit's job (and ``pytest -m gpu``); here a few entries per kernel.
"""

from __future__ import annotations

import pytest
import torch
import triton
from natzoo.ops.neighborhood.triton import configcheck, tiling

from natzoo import ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

TINY = {
    1: configcheck.Shape((13,), (3,), (2,), (False,), heads=1, batch=1),
    2: configcheck.Shape((7, 9), (3, 4), (1, 2), (False, True), heads=1, batch=1),
}


class _Spy:
    """Records the config list of every autotuned launch (kernel name -> list of configs)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, list]] = []
        real = triton.runtime.autotuner.Autotuner.run

        def run(tuner, *args, **kwargs):
            self.calls.append((tuner.base_fn.__name__, list(tuner.configs)))
            return real(tuner, *args, **kwargs)

        monkeypatch.setattr(triton.runtime.autotuner.Autotuner, "run", run)


def _kwargs(config):
    tq = (config.kwargs["TQ0"], config.kwargs["TQ1"], config.kwargs["TQ2"])
    tk = (config.kwargs["TK0"], config.kwargs["TK1"], config.kwargs["TK2"])
    return tq, tk, config.num_warps, config.num_stages


def test_force_config_launches_exactly_that_entry(monkeypatch):
    spy = _Spy(monkeypatch)
    entry = tiling.search_space("fwd", 2, 32)[3]
    q = torch.randn(1, 6, 7, 1, 16, device=DEVICE)
    with tiling.force_config("fwd", entry):
        assert tiling.config_entries("fwd", 2, "full", 32) == [entry]
        with tiling.force_config("fwd", tiling.search_space("fwd", 2, 32)[5]):
            assert tiling.config_entries("fwd", 2, "full", 32) == [tiling.search_space("fwd", 2, 32)[5]]
        assert tiling.config_entries("fwd", 2, "full", 32) == [entry]
        ops.na2d(q, q, q, 3, backend="triton")
    (name, configs), = spy.calls
    assert name == "_na_fwd_kernel" and len(configs) == 1
    assert _kwargs(configs[0]) == entry[:4] and configs[0].maxnreg == (entry[4] if len(entry) > 4 else None)
    # Outside the block the kernel's own list comes back (the interpreter's one config on CPU).
    assert tiling.config_entries("fwd", 2, "full", 32) != [entry] or DEVICE == "cuda"


def test_force_config_rejects_bad_arguments():
    with pytest.raises(ValueError, match="kind must be one of"), tiling.force_config("bwd", ((2, 8, 1),) * 2 + (1, 1)):
        pass
    with pytest.raises(ValueError, match="entry must be"), tiling.force_config("fwd", ((2, 8), (2, 16, 1), 1, 1)):
        pass


def test_cases_cover_every_search_space_entry():
    """Every entry of every kernel, rank and head-dim class appears, with unique readable names."""
    every = configcheck.cases()
    names = [c.name for c in every]
    assert len(set(names)) == len(names)
    for variant in configcheck.VARIANTS:
        kernel = variant.split("-")[0]
        for rank in (1, 2, 3):
            for head_dim in configcheck.HEAD_DIMS:
                space = tiling.search_space(kernel, rank, head_dim)
                got = sorted({c.index for c in every if (c.variant, c.shape.rank, c.head_dim) == (variant, rank,
                                                                                                    head_dim)})
                if variant == "dq-rpb-deterministic":
                    assert got == [0]
                elif variant.startswith("dq-rpb"):
                    assert got == [i for i, e in enumerate(space) if tiling.rpb_products_ok(e[0], e[1], rank)]
                else:
                    assert got == list(range(len(space)))
    entry = tiling.search_space("dq", 2, 32)[0]
    label = f"q{'x'.join(map(str, entry[0]))} k{'x'.join(map(str, entry[1]))} w{entry[2]} s{entry[3]}"
    assert f"dq-rpb-atomic n2 bf16 d32 #0 {label}" in names
    with pytest.raises(ValueError, match="variant must be one of"):
        configcheck.cases(variants=("bwd",))


def test_check_batch_keeps_the_specialisation():
    """1 is a constant to Triton, multiples of 16 carry an alignment hint, other ints neither."""
    assert [configcheck.check_batch(b) for b in (1, 2, 7, 16, 128, 130)] == [1, 2, 2, 16, 16, 2]
    with pytest.raises(ValueError, match="timed_batch"):
        configcheck.check_batch(0)


@pytest.mark.parametrize(
    "variant,rank",
    [("fwd-rpb", 2), ("dq-rpb-atomic", 1), ("dq-rpb-deterministic", 1), ("dkdv", 1),
     pytest.param("dq-rpb-atomic", 2, marks=pytest.mark.slow), pytest.param("dkdv-rpb", 2, marks=pytest.mark.slow)],
)
def test_cases_pass_in_the_interpreter(variant, rank):
    dtype = torch.bfloat16 if variant == "fwd-rpb" else torch.float32
    (case, *_rest) = configcheck.cases(variants=(variant,), ranks=(rank,), dtypes=(dtype,), head_dims=(16,),
                                       shapes=TINY)
    row = configcheck.run_case(case, DEVICE)
    assert row["error"] is None and row["passed"], row
    expected = {"out", "lse"} | ({"dq", "dk", "dv"} if case.backward else set()) | (
        {"d_rpb"} if case.backward and case.rpb else set())
    assert {k.removesuffix("_max_abs") for k in row if k.endswith("_max_abs")} == expected
    if "rpb" in variant and case.backward:
        assert row["d_rpb_rel_l2"] <= row["tol_rpb"]


def test_a_wrong_result_fails_the_case(monkeypatch):
    """The comparison can fail: a perturbed kernel output makes the row fail, a launch error is reported."""
    (case, *_rest) = configcheck.cases(variants=("fwd",), ranks=(1,), dtypes=(torch.float32,), head_dims=(16,),
                                       shapes=TINY)
    real = configcheck._run_op

    def perturbed(case, tensors, dtype, backend):
        result = real(case, tensors, dtype, backend)
        if backend == "triton":
            result["out"] = result["out"] + 1e-3
        return result

    monkeypatch.setattr(configcheck, "_run_op", perturbed)
    row = configcheck.run_case(case, DEVICE)
    assert not row["passed"] and row["out_max_abs"] == pytest.approx(1e-3, rel=1e-2)

    def broken(case, tensors, dtype, backend):
        raise RuntimeError("compile failed")

    monkeypatch.setattr(configcheck, "_run_op", broken)
    row = configcheck.run_case(case, DEVICE)
    assert not row["passed"] and row["error"] == "RuntimeError: compile failed"
