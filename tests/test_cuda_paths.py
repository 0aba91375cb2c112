"""The CUDA-only code of the GPU kit and the op/model benchmarks, driven on CPU against autospecced ``torch.cuda``.

Every ``torch.cuda`` function and class those scripts call is replaced by ``unittest.mock.create_autospec`` of the
real one: a misspelt attribute (``Event.elapsedtime_ms``) raises ``AttributeError`` and a call with arguments the
real API does not take raises ``TypeError``, here in CI instead of on the first GPU run. The stand-ins return fixed
timings and memory figures, so the tests also check what the scripts compute from them. Tensors the scripts place
on ``"cuda"`` are made on the CPU instead (the tensor factories they call are wrapped); the kernels run in Triton's
interpreter.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from unittest import mock

import pytest
import torch
from natzoo.ops.neighborhood.validation import BACKENDS

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

# The dense backend (SDPA with the neighbourhood as a bias) where this tree has it.
DENSE = pytest.param("dense", marks=pytest.mark.skipif("dense" not in BACKENDS, reason="no dense backend in this tree"))
EVENT_MS = 2.5  # every stand-in CUDA event pair measures this many milliseconds
ALLOCATED, PEAK = 3 * 2**20, 7 * 2**20
KERNEL_US = (300.0, 100.0)  # the stand-in profiler's device events (kernels) per profiled block


class _Event:
    """A profiler event with the attributes the scripts read (``FunctionEvent``'s names)."""

    def __init__(self, name, device_type, device_us, cpu_us=0.0):
        self.name, self.device_type, self.device_time_total, self.self_cpu_time_total = (name, device_type,
                                                                                          device_us, cpu_us)


@pytest.fixture
def fake_cuda(monkeypatch):
    """Autospecced stand-ins for every ``torch.cuda`` API the scripts use; returns them by name."""
    event_cls = mock.create_autospec(torch.cuda.Event)
    event_cls.return_value.elapsed_time.return_value = EVENT_MS
    props = mock.create_autospec(torch._C._CudaDeviceProperties, instance=True)
    props.name, props.major, props.minor = "Stand-in H100", 9, 0
    props.multi_processor_count, props.total_memory = 132, 80 * 2**30
    fakes = {
        "Event": event_cls,
        "synchronize": mock.create_autospec(torch.cuda.synchronize),
        "reset_peak_memory_stats": mock.create_autospec(torch.cuda.reset_peak_memory_stats),
        "max_memory_allocated": mock.create_autospec(torch.cuda.max_memory_allocated, return_value=PEAK),
        "memory_allocated": mock.create_autospec(torch.cuda.memory_allocated, return_value=ALLOCATED),
        "empty_cache": mock.create_autospec(torch.cuda.empty_cache),
        "get_device_properties": mock.create_autospec(torch.cuda.get_device_properties, return_value=props),
        "get_device_name": mock.create_autospec(torch.cuda.get_device_name, return_value="Stand-in H100"),
    }
    for name, fake in fakes.items():
        monkeypatch.setattr(torch.cuda, name, fake)
    from torch.autograd import DeviceType

    profile = mock.create_autospec(torch.profiler.profile)
    profile.return_value.events.return_value = [_Event("_na_fwd_kernel", DeviceType.CUDA, KERNEL_US[0]),
                                                 _Event("memset", DeviceType.CUDA, KERNEL_US[1]),
                                                 _Event("aten::empty", DeviceType.CPU, 0.0, 5000.0)]
    monkeypatch.setattr(torch.profiler, "profile", profile)
    fakes["profile"] = profile
    return fakes


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """``device="cuda"`` in the tensor factories the scripts call gives a CPU tensor."""

    def on_cpu(factory):
        def make(*args, **kwargs):
            if str(kwargs.get("device", "cpu")).startswith("cuda"):
                kwargs["device"] = "cpu"
            return factory(*args, **kwargs)

        return make

    for name in ("randn", "empty", "zeros", "randint"):
        monkeypatch.setattr(torch, name, on_cpu(getattr(torch, name)))
    monkeypatch.setattr(torch, "Generator", _CpuGenerator)


class _CpuGenerator(torch.Generator):
    """``torch.Generator(device="cuda")`` on the CPU; still a type, as annotations evaluated at run time need."""

    def __new__(cls, device=None):
        return super().__new__(cls, device="cpu")

    def __init__(self, device=None):
        pass


def _module(name):
    return importlib.import_module(name)


def test_time_ms_launches_back_to_back_between_two_events(fake_cuda):
    """GPU time, not host time: no synchronisation between the repeats of a block, one event pair per block."""
    bench_op = _module("bench_op")
    calls = []
    assert bench_op.time_ms(lambda: calls.append(1), "cuda", warmup=2, repeats=3, blocks=2) == EVENT_MS / 3
    assert len(calls) == 2 + 2 * 3
    fake_cuda["Event"].assert_called_with(enable_timing=True)
    event = fake_cuda["Event"].return_value
    assert event.record.call_count == 4 and event.elapsed_time.call_count == 2  # start and end of every block
    assert event.synchronize.call_count == 2  # the end event of every block, never per call
    assert fake_cuda["synchronize"].call_count == 1  # once after the warm-up


def test_kernel_ms_sums_the_profilers_device_events(fake_cuda):
    """The kernel-time column: device events only (kernels, memsets), per call; CPU events ignored."""
    bench_op = _module("bench_op")
    calls = []
    assert bench_op.kernel_ms(lambda: calls.append(1), "cuda", 2) == pytest.approx(sum(KERNEL_US) / 1e3 / 2)
    assert len(calls) == 2
    activities = fake_cuda["profile"].call_args.kwargs["activities"]
    assert torch.profiler.ProfilerActivity.CUDA in activities
    assert bench_op.kernel_ms(lambda: None, "cpu", 2) is None


def test_device_limits_from_event_timings(fake_cuda, cuda_on_cpu):
    bench_op = _module("bench_op")
    bandwidth, peak = bench_op.device_limits("cuda", torch.float32, copy_bytes=1024, matmul_n=8)
    per_call_ms = EVENT_MS / 10  # 10 calls between the two events
    assert bandwidth == pytest.approx(2 * 1024 / (per_call_ms * 1e-3))
    assert peak == pytest.approx(2 * 8**3 / (per_call_ms * 1e-3))


@pytest.mark.parametrize("provider", ["triton", DENSE, "sdpa-full"])
def test_bench_one_cuda_row(fake_cuda, cuda_on_cpu, provider):
    """A CUDA row of bench_op: event timings, peak memory above the baseline, the floor; no swallowed error."""
    bench_op = _module("bench_op")
    shape = bench_op.Shape("tiny", 1, (6, 6), 1, 16, (3, 3), rpb=True)
    res = bench_op.bench_one(shape, provider, torch.float32, "cuda", (1e12, 1e14), warmup=0, repeats=1, blocks=1)
    assert not res.note.startswith(("skipped", "OOM")), res.note
    assert res.fwd_ms == res.fwdbwd_ms == EVENT_MS
    assert res.fwd_kernel_ms == res.fwdbwd_kernel_ms == pytest.approx(sum(KERNEL_US) / 1e3)
    assert res.peak_mem_mb == (PEAK - ALLOCATED) / 2**20
    assert res.fwd_floor_pct is not None and res.fwd_floor_pct > 0
    fake_cuda["reset_peak_memory_stats"].assert_called_with()
    fake_cuda["empty_cache"].assert_called_with()
    text = bench_op.markdown([res], {"device_name": "Stand-in H100", "torch": "t", "triton": "x", "date": "d",
                                     "command": "c"})
    assert f"| tiny | {provider} | float32 | {EVENT_MS:.3f} |" in text


def test_measure_model_step_on_cuda(fake_cuda):
    bench_models = _module("bench_models")
    steps = []
    row = bench_models._measure(lambda: steps.append(1), torch.device("cuda"), warmup=1, iters=3)
    assert len(steps) == 4 and row["peak_mib"] == PEAK / 2**20
    fake_cuda["synchronize"].assert_called_with(torch.device("cuda"))
    fake_cuda["reset_peak_memory_stats"].assert_called_with(torch.device("cuda"))


@pytest.fixture
def kit_module():
    return _module("gpu_kit")


def _kit(kit_module, tmp_path, **plan_changes):
    import dataclasses

    plan = dataclasses.replace(kit_module.dry_plan(), device="cuda", **plan_changes)
    report = kit_module.Report(str(tmp_path), {"command": "test", "started": "now"})
    return kit_module.Kit(plan, report, 600)


def test_kit_environment_reads_the_device(fake_cuda, kit_module, tmp_path):
    """The GPU row from the device properties; with interpreted kernels the step then refuses to go on."""
    kit = _kit(kit_module, tmp_path)
    kit.run("environment", kit_module.step_environment)
    step = kit.report.steps[0]
    row = step["rows"][0]
    assert (row["gpu"], row["capability"], row["sms"], row["memory_gib"]) == ("Stand-in H100", "9.0", 132, 80.0)
    fake_cuda["get_device_properties"].assert_called_once_with(0)
    assert step["status"] == "failed" and "not compiled JIT functions" in step["error"]


def test_kit_op_rows_on_cuda(fake_cuda, cuda_on_cpu, kit_module, tmp_path):
    """The op step's CUDA path (events, peak memory, bandwidth floor) for the Triton and SDPA providers."""
    kit = _kit(kit_module, tmp_path)
    layer = kit_module.Layer("tiny", (6, 6), 1, 16, (3, 3), (1, 1))
    for provider, rpb in (("triton", True), ("sdpa-full", False)):
        row = kit_module.time_provider(layer, 1, provider, rpb, torch.float32, kit.plan, 1e12)
        assert row["fwd ms"] == row["fwd+bwd ms"] == EVENT_MS
        assert row["fwd kernel ms"] == row["fwd+bwd kernel ms"] == pytest.approx(sum(KERNEL_US) / 1e3)
        assert row["peak MiB above start"] == (PEAK - ALLOCATED) / 2**20 and row["fwd % of bandwidth floor"] > 0
    fake_cuda["reset_peak_memory_stats"].assert_called_with()


def test_kit_model_step_on_cuda(fake_cuda, kit_module, tmp_path, monkeypatch):
    """The model step's CUDA path: cudnn autotuning, empty_cache after every model, the ratio to Swin-T."""
    bench_models = _module("bench_models")
    seen = []

    def fake_bench(name, device, *args):
        seen.append((name, device))
        img_s = {"nat_tiny": 50.0, "swin_tiny_patch4_window7_224": 100.0}[name]
        return [{"mode": "inference", "img_s": img_s, "seconds": 1 / img_s, "peak_mib": 1.0, "params": 28.0}]

    monkeypatch.setattr(bench_models, "bench_model", fake_bench)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    kit = _kit(kit_module, tmp_path)
    kit.run("models", kit_module.step_models)
    rows = kit.report.steps[0]["rows"]
    assert [r["x Swin-T"] for r in rows] == [0.5, 1.0]
    assert seen[0][1] == torch.device("cuda") and torch.backends.cudnn.benchmark
    assert fake_cuda["empty_cache"].call_count == 2


def test_kit_report_writers(kit_module, tmp_path):
    """kit.json/kit.md after every row; an earlier report is never overwritten (the next one is kit-2)."""
    kit = _kit(kit_module, tmp_path)
    step = kit.report.step("ops")
    kit.report.add(step, {"layer": "a|b", "fwd ms": 1.23456, "note": None})
    data = json.loads((tmp_path / "kit.json").read_text())
    assert data["steps"][0]["rows"] == [{"layer": "a|b", "fwd ms": 1.23456, "note": None}]
    md = (tmp_path / "kit.md").read_text()
    assert "| layer | fwd ms | note |" in md and "| a/b | 1.235 | - |" in md
    second = kit_module.Report(str(tmp_path), {"command": "again", "started": "later"})
    assert second.json_path.endswith("kit-2.json") and second.md_path.endswith("kit-2.md")
    assert json.loads((tmp_path / "kit.json").read_text()) == data


def test_bench_model_peak_is_net_of_earlier_allocations(fake_cuda, monkeypatch):
    """A model row's peak memory is above what was allocated before the model was built."""
    bench_models = _module("bench_models")
    monkeypatch.setattr(bench_models, "_measure", lambda *args: {"seconds": 0.5, "peak_mib": PEAK / 2**20})
    model = torch.nn.Linear(4, 1000)
    monkeypatch.setattr(bench_models.timm, "create_model", lambda name, **kwargs: model)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch, "randn", lambda *shape, device=None: torch.zeros(shape[0], 4))
    monkeypatch.setattr(torch, "randint", lambda low, high, size, device=None: torch.zeros(size, dtype=torch.long))
    rows = bench_models.bench_model("m", torch.device("cuda"), 2, 8, None, False, 0, 1, ["infer"])
    assert rows[0]["peak_mib"] == (PEAK - ALLOCATED) / 2**20 and rows[0]["img_s"] == 4.0
    fake_cuda["memory_allocated"].assert_called_with(torch.device("cuda"))


def test_profile_step_on_cuda_reads_kernel_events(fake_cuda, cuda_on_cpu, kit_module, tmp_path, monkeypatch):
    """The NAT-T profile: kernels ranked by GPU time from the profiler's device events, the NA share named."""
    kit = _kit(kit_module, tmp_path, e2e_batch=1)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *args, **kwargs: self)
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *args, **kwargs: self)
    kit.run("profile", kit_module.step_profile)
    step = kit.report.steps[0]
    assert step["status"] == "ok", step["error"]
    assert [r["kernel"] for r in step["rows"]] == ["_na_fwd_kernel", "memset"]
    assert step["rows"][0]["% of step"] == pytest.approx(75.0)
    assert "NA kernels 75.0 %" in step["notes"][-1]


def test_kit_endtoend_step_on_cuda(fake_cuda, kit_module, tmp_path, monkeypatch):
    """NAT-T end to end: the implied dispatch, forced triton and forced dense, each with bench_model on CUDA;
    empty_cache after every row; the logit check's rows follow."""
    bench_models = _module("bench_models")
    from natzoo.ops.neighborhood import dispatch, functional

    seen = []

    def fake_bench(name, device, batch, img, dtype, channels_last, warmup, iters, modes, kwargs):
        seen.append((dispatch.forced_backend(), functional.select_backend is not original, device, channels_last))
        return [{"mode": "train step", "img_s": 10.0, "seconds": 0.1, "peak_mib": 5.0, "params": 28.0}]

    original = functional.select_backend
    monkeypatch.setattr(bench_models, "bench_model", fake_bench)
    monkeypatch.setattr(kit_module, "logit_check", lambda plan: [{"logit check": "stand-in", "passed": True}])
    kit = _kit(kit_module, tmp_path)
    kit.implied = {((56, 56), (1, 1), 2): "dense"}
    kit.run("endtoend", kit_module.step_endtoend)
    step = kit.report.steps[0]
    assert step["status"] == "ok", step["error"]
    assert seen == [(None, True, torch.device("cuda"), True), ("triton", False, torch.device("cuda"), True),
                    ("dense", False, torch.device("cuda"), True)]
    assert [r.get("dispatch") for r in step["rows"]] == ["implied by the op step", "forced triton", "forced dense",
                                                         None]
    assert step["rows"][0]["peak MiB above start"] == 5.0 and "56x56 d1 h2 -> dense" in step["notes"][0]
    assert fake_cuda["empty_cache"].call_count == 3
