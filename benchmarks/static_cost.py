"""Static cost report of the fused NA kernels for sm_90 (no GPU needed): every number is an ESTIMATE.

For the NAT-Tiny and DiNAT-Tiny layer shapes (batch 128, head_dim 32, k=7, bf16, rpb; dilation 1 and 8/4/2) it
captures the forward and backward kernel launches of the real launchers (on ``meta`` tensors), compiles each
kernel and autotuning config for ``sm_90`` with the JIT's specialisation (see ``triton_aot.py``) and reports, per
kernel: registers, spilled instructions, shared memory, resident blocks per SM, SASS instructions of the main loop
body per iteration, lane-instructions per score slot and per useful score, and a modelled time.

The model (an estimate, not a measurement): executed warp-instructions =
``programs * warps * (prologue/epilogue + loop body * loop trips)`` with the loop trips of every program computed
from the window arithmetic (prologue/epilogue = all SASS outside loops, an upper bound), issued at 4
warp-instructions per clock on each of 132 SMs at 1.755 GHz, derated when fewer than 4 warps per scheduler are
resident (``min(1, resident warps / 16)``: too few warps to hide latency); memory floor = bytes of every tensor
argument once / 3.35 TB/s; modelled time = the larger of the two. Stalls beyond that derating, cache misses,
atomics contention and launch overhead are not modelled. Per kernel the config with the lowest modelled time is
shown (what a perfect autotuner would pick under this model).

Usage::

    python benchmarks/static_cost.py                 # markdown tables to stdout
    python benchmarks/static_cost.py --all-configs   # one row per autotuning config
    python benchmarks/static_cost.py --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU target, never the interpreter

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from natzoo.ops.neighborhood.indexing import group_length, inverse_window, window
from natzoo.ops.neighborhood.triton import compat
from natzoo.ops.neighborhood.triton.backward import na_backward
from natzoo.ops.neighborhood.triton.forward import na_forward
from natzoo.ops.neighborhood.validation import Problem
from triton_aot import Launch, capture_launches, compile_launch, sass_stats

SMS, CLOCK_HZ, ISSUE_PER_CLOCK, BANDWIDTH = 132, 1.755e9, 4, 3.35e12
LATENCY_WARPS = 16  # resident warps per SM below which issue slots go unused (4 per scheduler)
REGS_PER_SM, SMEM_PER_SM, WARPS_PER_SM, BLOCKS_PER_SM = 65536, 228 * 1024, 64, 32

# (name, map size, heads, dilation, layers of NAT-Tiny with it, layers of DiNAT-Tiny with it)
LAYERS = [
    ("56x56 h2 d1", 56, 2, 1, 3, 2),
    ("56x56 h2 d8", 56, 2, 8, 0, 1),
    ("28x28 h4 d1", 28, 4, 1, 4, 2),
    ("28x28 h4 d4", 28, 4, 4, 0, 2),
    ("14x14 h8 d1", 14, 8, 1, 18, 9),
    ("14x14 h8 d2", 14, 8, 2, 0, 9),
    ("7x7 h16 d1", 7, 16, 1, 5, 5),
]


def layer_problem(size: int, heads: int, dilation: int, batch: int = 128, dtype=torch.bfloat16,
                  head_dim: int = 32) -> Problem:
    return Problem("na2d", 2, batch, (size, size), heads, head_dim, (7, 7), (1, 1), (dilation, dilation),
                   (False, False), head_dim**-0.5, dtype, torch.device("meta"))


# Per rank, the problem the search-space report compiles (bf16, rpb and every gradient; a NAT-like window).
SPACE_PROBLEMS = {
    1: lambda head_dim: Problem("na1d", 1, 128, (784,), 4, head_dim, (7,), (1,), (1,), (False,), head_dim**-0.5,
                                torch.bfloat16, torch.device("meta")),
    2: lambda head_dim: layer_problem(14, 8, 1, head_dim=head_dim),
    3: lambda head_dim: Problem("na3d", 3, 16, (8, 14, 14), 4, head_dim, (3, 7, 7), (1, 1, 1), (1, 1, 1),
                                (False, False, False), head_dim**-0.5, torch.bfloat16, torch.device("meta")),
}


def search_space_report(head_dims: list[int], ranks: list[int]) -> list[dict]:
    """Registers and spills (total and in the main loop) of every search-space entry per head-dim class and rank.

    Every entry of ``tiling.search_space`` is forced in turn (``tiling.force_config``); the dQ kernel is compiled
    with the rpb gradient for entries that can reduce it with tensor-core products and without it otherwise.
    """
    from natzoo.ops.neighborhood.triton import tiling

    rows = []
    for head_dim in head_dims:
        for rank in ranks:
            problem = SPACE_PROBLEMS[rank](head_dim)
            for kind in tiling.KINDS:
                for index, entry in enumerate(tiling.search_space(kind, rank, head_dim)):
                    rpb_grad = kind != "dq" or tiling.rpb_products_ok(entry[0], entry[1], rank)
                    with tiling.force_config(kind, entry):
                        fwd, bwd = capture(problem, True, rpb_grad)
                    wanted = {"fwd": "_na_fwd_kernel", "dq": "_na_bwd_dq_kernel", "dkdv": "_na_bwd_dkdv_kernel"}
                    (launch,) = [x for x in fwd + bwd if x.name == wanted[kind]]
                    assert launch.configs is not None, "a forced config launches through a one-config autotuner"
                    (config,) = launch.configs
                    stats = sass_stats(compile_launch(launch, config))
                    row = {"head_dim": head_dim, "rank": rank, "kernel": kind, "index": index,
                           "config": config_label(config), "rpb_grad": rpb_grad, "registers": stats.registers,
                           "spill_instructions": stats.spill_stores + stats.spill_loads,
                           "loop_spills": stats.loop_spills, "loop_sass": stats.main_loop,
                           "shared_kib": round(stats.shared_bytes / 1024, 1)}
                    rows.append(row)
                    print(" ".join(f"{k}={v}" for k, v in row.items()), file=sys.stderr, flush=True)
    return rows


def space_markdown(rows: list[dict]) -> str:
    out = ["| head dim | rank | kernel | # | config | regs | spill instr | in main loop | loop SASS | smem KiB |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['head_dim']} | {r['rank']} | {r['kernel']} | {r['index']} | {r['config']} | "
                   f"{r['registers']} | {r['spill_instructions']} | {r['loop_spills']} | {r['loop_sass']} | "
                   f"{r['shared_kib']} |")
    return "\n".join(out)


def module_inputs(problem: Problem):
    """q, k, v as the modules pass them: views of one fused ``[B, *S, 3 * H * D]`` projection; rpb float32."""
    qkv = torch.empty(problem.batch, *problem.spatial, 3 * problem.heads * problem.head_dim, device="meta",
                      dtype=problem.dtype)
    q, k, v = qkv.unflatten(-1, (3, problem.heads, problem.head_dim)).unbind(-3)
    rpb = torch.empty(problem.heads, *(2 * k - 1 for k in problem.kernel_size), device="meta")
    return q, k, v, rpb


def capture(problem: Problem, rpb: bool = True, rpb_grad: bool = True) -> tuple[list[Launch], list[Launch]]:
    """The forward and backward launches of one training step of a layer (q, k, v and rpb need gradients; rpb's
    only with `rpb_grad`)."""
    q, k, v, bias = module_inputs(problem)
    bias = bias if rpb else None
    with capture_launches() as fwd:
        out, lse = na_forward(problem, q, k, v, bias)
    grad_out = torch.empty_like(out)
    with capture_launches() as bwd:
        backward_launch(problem, grad_out, q, k, v, bias, out, lse, rpb_grad)
    return fwd, bwd


def backward_launch(problem, grad_out, q, k, v, bias, out, lse, rpb_grad=True):
    try:
        return na_backward(problem, grad_out, None, q, k, v, bias, out, lse, False, (True, True, True, rpb_grad))
    except TypeError:  # launchers that predate the `needs` argument always compute every gradient
        return na_backward(problem, grad_out, None, q, k, v, bias, out, lse, False)


def useful_scores(problem: Problem) -> int:
    """Sum over queries of the neighbourhood size, times batch and heads."""
    total = 1
    for length, k, s, d, c in zip(problem.spatial, problem.kernel_size, problem.stride, problem.dilation,
                                  problem.is_causal):
        axis = 0
        for x in range(length):
            start, end = window(x // d, group_length(length, d, x % d), k, s, c)
            axis += end - start
        total *= axis
    return total * problem.batch * problem.heads


def _axis_trips(length, d, k, s, c, tile, sub, inverse: bool) -> list[int]:
    """Loop trips along one axis for every (group, tile) pair: sub-tiles of `sub` over the tile's box."""
    trips = []
    fn = inverse_window if inverse else window
    tiles = math.ceil(math.ceil(length / d) / tile)
    for g in range(d):
        lg = group_length(length, d, g)
        for t in range(tiles):
            first = t * tile
            if first >= lg:
                trips.append(0)
                continue
            box, _ = fn(first, lg, k, s, c)
            _, end = fn(min(first + tile - 1, lg - 1), lg, k, s, c)
            trips.append(-(-(end - box) // sub))
    return trips


def loop_trips(launch: Launch, config) -> tuple[list[int], int]:
    """(loop trips of every program along pid 0, score slots per trip) from the kernel's tiling; ([], 0) if loopless."""
    a = launch.named_args(config)
    name = launch.name
    lengths = [a["L0"], a["L1"], a["L2"]]
    dils = [a["DIL0"], a["DIL1"], a["DIL2"]]
    ks = [a["K0"], a["K1"], a["K2"]]
    strides = [a.get(f"S{i}", 1) for i in range(3)]
    causal = [a[f"C{i}"] for i in range(3)]
    if "drpb" in name and "BLOCK_Q" in a:  # a standalone d_rpb pass: one trip per window slot
        return [math.prod(ks)] * launch.grid_size(config)[0], a["BLOCK_Q"]
    if "TQ0" not in a:
        return [], 0
    tq = [a["TQ0"], a["TQ1"], a["TQ2"]]
    tk = [a["TK0"], a["TK1"], a["TK2"]]
    inverse = "dkdv" in name
    tile, sub = (tk, tq) if inverse else (tq, tk)
    per_axis = [_axis_trips(lengths[i], dils[i], ks[i], strides[i], causal[i], tile[i], sub[i], inverse)
                for i in range(3)]
    # Programs along pid 0: groups fastest, then tiles; trips multiply over axes for one (group, tile).
    trips = []
    for t0 in range(len(per_axis[0]) // dils[0]):
        for t1 in range(len(per_axis[1]) // dils[1]):
            for t2 in range(len(per_axis[2]) // dils[2]):
                for g0 in range(dils[0]):
                    for g1 in range(dils[1]):
                        for g2 in range(dils[2]):
                            trips.append(per_axis[0][g0 * (len(per_axis[0]) // dils[0]) + t0]
                                         * per_axis[1][g1 * (len(per_axis[1]) // dils[1]) + t1]
                                         * per_axis[2][g2 * (len(per_axis[2]) // dils[2]) + t2])
    return trips, math.prod(tq) * math.prod(tk)


def tensor_bytes(launch: Launch) -> int:
    return sum(t.numel() * t.element_size() for t in launch.args if isinstance(t, torch.Tensor))


def blocks_per_sm(regs: int, warps: int, smem: int) -> int:
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = REGS_PER_SM // max(per_warp * warps, 1)
    by_smem = SMEM_PER_SM // (smem + 1024)
    return max(0, min(BLOCKS_PER_SM, by_regs, by_smem, WARPS_PER_SM // warps))


@dataclasses.dataclass
class Row:
    layer: str
    kernel: str
    config: str
    registers: int
    spill_instructions: int
    shared_kib: float
    blocks_per_sm: int
    loop_sass: int
    per_slot: float
    per_useful: float
    issue_us: float
    memory_us: float
    model_us: float


def config_label(config) -> str:
    if config is None:
        return "-"
    kw = config.kwargs
    tq = "x".join(str(kw[f"TQ{i}"]) for i in range(3) if f"TQ{i}" in kw)
    tk = "x".join(str(kw[f"TK{i}"]) for i in range(3) if f"TK{i}" in kw)
    cap = f" r{config.maxnreg}" if config.maxnreg else ""
    return f"q{tq} k{tk} w{config.num_warps} s{config.num_stages}{cap}"


def analyse(layer: str, launch: Launch, config, useful: int, cache: dict) -> Row:
    named = launch.named_args(config)
    warps = config.num_warps if config is not None else named.get("num_warps", 4)
    key = (launch.name, repr(sorted(compile_key(launch, config).items())))
    if key not in cache:
        cache[key] = sass_stats(compile_launch(launch, config))
    stats = cache[key]
    trips, slots = loop_trips(launch, config)
    programs = launch.programs(config)
    g0, g1, g2 = launch.grid_size(config)
    if trips and g0 % len(trips) != 0:
        raise RuntimeError(f"{launch.name}: modelled {len(trips)} programs along pid 0, the launch has {g0}")
    other = g1 * g2 * (g0 // len(trips) if trips else 1)  # the batch is folded into grid axis 0
    loops_total = sum(count for _, count in stats.loops)
    outside = stats.instructions - loops_total
    executed = (outside * programs + stats.main_loop * sum(trips) * other) * warps
    resident = blocks_per_sm(stats.registers, warps, stats.shared_bytes)
    efficiency = min(1.0, resident * warps / LATENCY_WARPS)
    issue_s = executed / (SMS * ISSUE_PER_CLOCK * CLOCK_HZ * max(efficiency, 1e-3))
    memory_s = tensor_bytes(launch) / BANDWIDTH
    return Row(
        layer=layer,
        kernel=launch.name.lstrip("_").removesuffix("_kernel"),
        config=config_label(config),
        registers=stats.registers,
        spill_instructions=stats.spill_stores + stats.spill_loads,
        shared_kib=stats.shared_bytes / 1024,
        blocks_per_sm=resident,
        loop_sass=stats.main_loop,
        per_slot=stats.main_loop * warps * 32 / slots if slots else 0.0,
        per_useful=executed * 32 / useful,
        issue_us=issue_s * 1e6,
        memory_us=memory_s * 1e6,
        model_us=max(issue_s, memory_s) * 1e6,
    )


def compile_key(launch: Launch, config) -> dict:
    """What determines the compiled code: constexpr values, the JIT's int/pointer specialisation and the config."""
    named = launch.named_args(config)
    constexpr = set(compat.constexpr_names(launch.kernel))
    key = {}
    for name, value in named.items():
        if name in constexpr or isinstance(value, (bool, str)):
            key[name] = value
        elif isinstance(value, torch.Tensor):
            key[name] = (str(value.dtype), value.data_ptr() % 16 == 0)
        elif isinstance(value, float):
            key[name] = "float"
        else:
            key[name] = "1" if value == 1 else ("D" if value % 16 == 0 else "i")
    if config is not None:
        key["__cfg"] = (config.num_warps, config.num_stages, config.maxnreg)
    return key


def report(all_configs: bool) -> dict:
    cache: dict = {}
    results = []
    # The stage-0 layer once more without rpb, for the cost of rpb in forward + backward; and every layer's backward
    # with a frozen rpb, for the cost of the rpb gradient where it is folded into another kernel.
    plan = [(*entry, True, True) for entry in LAYERS]
    plan += [(LAYERS[0][0] + " no rpb", *LAYERS[0][1:4], 0, 0, False, False)]
    plan += [(name + " rpb frozen", size, heads, dil, 0, 0, True, False) for name, size, heads, dil, _, _ in LAYERS]
    for layer, size, heads, dilation, nat_layers, dinat_layers, rpb, rpb_grad in plan:
        problem = layer_problem(size, heads, dilation)
        useful = useful_scores(problem)
        fwd, bwd = capture(problem, rpb, rpb_grad)
        if rpb and not rpb_grad:
            fwd = []  # the forward is the same as with a trainable rpb
        for phase, launches in (("fwd", fwd), ("bwd", bwd)):
            for launch in launches:
                # None: a launch without autotuning configs is analysed once, with its launch defaults
                rows = [analyse(layer, launch, c, useful, cache) for c in (launch.configs or [None])]  # type: ignore[list-item]
                best = min(rows, key=lambda r: r.model_us)
                for row in rows if all_configs else [best]:
                    results.append(dict(dataclasses.asdict(row), phase=phase, best=row is best,
                                        nat_layers=nat_layers, dinat_layers=dinat_layers,
                                        helper=not (rpb and rpb_grad)))
                print(f"{layer:14s} {best.kernel:14s} {best.config:22s} {best.model_us:9.1f} us", file=sys.stderr,
                      flush=True)
    return {"rows": results}


def markdown(data: dict) -> str:
    rows = data["rows"]
    out = [
        (
            "| layer | kernel | config | regs | spill instr | smem KiB | blocks/SM | loop SASS | lane-instr/slot | "
            "lane-instr/useful score | issue us | memory us | modelled us |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r.get("helper"):
            continue  # the no-rpb and frozen-rpb variants only feed the summary
        out.append(
            f"| {r['layer']} | {r['kernel']} | {r['config']} | {r['registers']} | {r['spill_instructions']} | "
            f"{r['shared_kib']:.1f} | {r['blocks_per_sm']} | {r['loop_sass']} | {r['per_slot']:.1f} | "
            f"{r['per_useful']:.1f} | {r['issue_us']:.1f} | {r['memory_us']:.1f} | {r['model_us']:.1f} |"
        )
    out += ["", "| layer | fwd us | bwd us (all kernels) | of which d_rpb us | d_rpb / rest of bwd |",
            "|---|---|---|---|---|"]
    layers: dict = {}
    for r in rows:
        if not r["best"]:
            continue
        entry = layers.setdefault(r["layer"], {"fwd": 0.0, "bwd": 0.0, "drpb": 0.0, "nat": r["nat_layers"],
                                               "dinat": r["dinat_layers"]})
        entry[r["phase"]] += r["model_us"]
        if "drpb" in r["kernel"]:
            entry["drpb"] += r["model_us"]
    for name, e in layers.items():
        frozen = layers.get(name + " rpb frozen")
        if name.endswith("rpb frozen") or (not e["drpb"] and frozen is None):
            continue
        # A separate d_rpb kernel is its own cost; a folded one costs the difference to the frozen-rpb backward.
        # without a d_rpb kernel of its own, the frozen-rpb entry exists (checked above)
        drpb = e["drpb"] or (e["bwd"] - frozen["bwd"])  # type: ignore[index]
        rest = e["bwd"] - drpb
        out.append(f"| {name} | {e['fwd']:.1f} | {e['bwd']:.1f} | {drpb:.1f} | {drpb / rest:.2f} |")
    with_rpb, without = layers.get(LAYERS[0][0]), layers.get(LAYERS[0][0] + " no rpb")
    if with_rpb and without:
        out.append(f"| {LAYERS[0][0]} without rpb | {without['fwd']:.1f} | {without['bwd']:.1f} | - | - |")
        ratio = (with_rpb["fwd"] + with_rpb["bwd"]) / (without["fwd"] + without["bwd"])
        out.append(f"| {LAYERS[0][0]}: fwd+bwd with rpb / without | {ratio:.2f}x | | | |")
    for model, col in (("NAT-Tiny", "nat"), ("DiNAT-Tiny", "dinat")):
        fwd = sum(e["fwd"] * e[col] for e in layers.values())
        bwd = sum(e["bwd"] * e[col] for e in layers.values())
        out.append(f"| **{model}, all NA layers of one step** | {fwd / 1e3:.2f} ms | {bwd / 1e3:.2f} ms | | |")
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--all-configs", action="store_true", help="one row per autotuning config")
    parser.add_argument("--json", default=None, help="also write the rows as JSON to this path")
    parser.add_argument("--search-space", action="store_true",
                        help="registers and spills of every search-space entry per head-dim class (estimates)")
    parser.add_argument("--head-dims", default="32,64,128,256", help="head-dim classes for --search-space")
    parser.add_argument("--ranks", default="1,2,3", help="ranks for --search-space")
    args = parser.parse_args(argv)
    if args.search_space:
        rows = search_space_report([int(x) for x in args.head_dims.split(",")], [int(x) for x in args.ranks.split(",")])
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"rows": rows}, f, indent=1)
        print(space_markdown(rows))
        return 0
    data = report(args.all_configs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f, indent=1)
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
