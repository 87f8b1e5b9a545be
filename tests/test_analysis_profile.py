"""The profile summary: top ops by self time from a jax.profiler trace, printed by the bench."""

import gzip
import json

import pytest

from jaxlayouts.analysis import profile


def test_self_time_leaves_out_nested_ops_and_gpu_traces_count_stream_kernels(tmp_path):
    # A trace shaped like XLA's GPU trace JSON: the device is a process "/device:GPU:0" whose CUDA
    # streams are threads "Stream #N(...)"; host threads and derived lines ("XLA Ops") are not counted.
    meta = lambda pid, tid, kind, name: {"ph": "M", "pid": pid, "tid": tid, "name": kind, "args": {"name": name}}
    x = lambda pid, tid, ts, dur, name, **args: {"ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur,
                                                 "name": name, "args": args}
    events = [meta(1, 0, "process_name", "/device:GPU:0 (NVIDIA H200)"), meta(1, 7, "thread_name", "Stream #7(Kernel)"),
              meta(1, 8, "thread_name", "XLA Ops"), meta(2, 0, "process_name", "/host:CPU"),
              meta(2, 3, "thread_name", "python"),
              x(1, 7, 0, 30, "nvjet_gemm"), x(1, 7, 40, 10, "memcpy128"), x(1, 7, 60, 10, "memcpy128"),
              x(1, 8, 0, 70, "fusion.1", hlo_op="fusion.1"), x(2, 3, 0, 500, "while.2", hlo_op="while.2")]
    run = tmp_path / "plugins" / "profile" / "run1"
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = profile.top_ops(tmp_path)
    assert summary["source"].startswith("device op time")
    assert [(op["name"], op["count"], op["share"]) for op in summary["ops"]] == [("nvjet_gemm", 1, 0.6), ("memcpy128", 2, 0.4)]
    assert summary["total_s"] == pytest.approx(50e-6) and summary["perfetto_file"] is None
    # nesting on one thread (a CPU while thunk and its body): the outer op keeps its self time only
    nested = [x(2, 3, 0, 100, "while.2"), x(2, 3, 10, 30, "fusion.1"), x(2, 3, 50, 20, "fusion.2"),
              x(2, 3, 55, 5, "copy.3"), x(2, 4, 20, 40, "other_thread")]
    assert profile.self_times(nested) == [50, 30, 15, 5, 40]


def test_bench_profile_dir_prints_the_top_ops_and_how_to_open_the_trace(profiled_bench):
    code, result, proc, tmp_path = profiled_bench  # a 2-step bench run; tmp_path: its --profile_dir
    assert code == 0, proc.stderr
    summary = profile.top_ops(tmp_path)
    names = [op["name"] for op in summary["ops"]]
    assert len(names) == 15 and summary["num_ops"] > 15 and "XLA op time on host threads" in summary["source"]
    assert any("fusion" in n for n in names) and all(n and not n.startswith("end:") for n in names)
    shares = [op["share"] for op in summary["ops"]]
    assert all(s > 0 for s in shares) and shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 1e-9
    assert sum(op["count"] for op in summary["ops"]) > 0
    printed = proc.stderr
    assert "profile: XLA op time on host threads" in printed and "ms busy per device and step" in printed and ", 2 steps)" in printed
    for op in summary["ops"][:3]:
        assert f"{100 * op['share']:5.1f}%" in printed and op["name"] in printed
    assert f"trace: {summary['run_dir']}" in printed and "https://ui.perfetto.dev" in printed
    assert summary["perfetto_file"].endswith("perfetto_trace.json.gz") and "tensorboard --logdir" in printed


def test_times_and_counts_are_per_device_and_step_and_collectives_name_their_axes(tmp_path):
    # Two CPU devices each run the step twice: per device and step, 30 us busy (the two ops of
    # device 0 overlap by 5 us), all-reduce.7 once; summed over devices it would read 2x, and
    # overlapping streams would count twice.
    x = lambda device, tid, ts, dur, name: {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name,
                                            "args": {"hlo_op": name, "device_ordinal": str(device)}}
    events = []
    for step in (0, 100):
        events += [x(0, 1, step, 20, "all-reduce.7"), x(0, 2, step + 15, 15, "fusion.1"),
                   x(1, 3, step, 20, "all-reduce.7"), x(1, 3, step + 20, 10, "fusion.1")]
    run = tmp_path / "plugins" / "profile" / "run1"
    run.mkdir(parents=True)
    with gzip.open(run / "host.trace.json.gz", "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = profile.top_ops(tmp_path)
    assert summary["devices"] == 2 and summary["busy_s"] == pytest.approx(60e-6)  # 2 steps x 30 us per device
    text = profile.report(tmp_path, steps=2, axes={"all-reduce.7": ("tp",)})
    assert "0.03 ms busy per device and step (the union of a device's ops' intervals, mean over 2 device(s), 2 steps)" in text
    assert "ms per device and step" in text and "count per device and step" in text
    line = next(l for l in text.splitlines() if "all-reduce.7" in l)
    assert line.split() == ["61.5%", "0.020", "1", "all-reduce.7", "over", "tp"]
