"""The top ops by time in a ``jax.profiler`` trace: name, share, count.

``jax.profiler.stop_trace`` writes, under ``LOG_DIR/plugins/profile/<run>/``, the trace as an
XSpace (``*.xplane.pb``, for TensorBoard's profile plugin or xprof) and as Chrome trace-event JSON
(``*.trace.json.gz``); ``start_trace(..., create_perfetto_trace=True)`` also writes
``perfetto_trace.json.gz`` (the same events without metadata) for https://ui.perfetto.dev. This
module reads the JSON:

* on a GPU, each device is a process named ``/device:GPU:N`` whose CUDA streams are threads named
  ``Stream #N(...)`` (XLA's CUPTI collector); their events are the kernels and copies as they ran
  on the device, and those are the ops counted;
* on CPU there is no device timeline: the ops counted are the XLA op events on host threads (the
  events whose arguments name an ``hlo_op``), and the summary says so.

An op's time is its self time: its duration less that of the events nested in it on the same
thread (on CPU a ``while`` thunk contains its body's ops). Shares are of the sum over all ops
counted, so they add up to 100% over all ops and to at most 100% over the top ones. Every device
runs its own copy of the step (on GPU a process per device; on CPU the ops name their
``device_ordinal``), so times and counts are printed per device and step: summed over devices and
divided by their number. A device's *busy time* is the union of its ops' intervals (streams that
overlap count once), the time per step as the device saw it.
"""

from __future__ import annotations

import collections
import gzip
import json
import pathlib

DEVICE_PREFIX = "/device:"
STREAM_PREFIX = "Stream #"


def latest_run(log_dir: str | pathlib.Path) -> pathlib.Path:
    """The newest ``plugins/profile/<run>`` folder holding a ``*.trace.json.gz``."""
    runs = [p.parent for p in pathlib.Path(log_dir).glob("plugins/profile/*/*.trace.json.gz")]
    if not runs:
        raise FileNotFoundError(f"no plugins/profile/*/*.trace.json.gz under {log_dir}")
    return max(runs, key=lambda p: p.stat().st_mtime)


def self_times(events: list[dict]) -> list[float]:
    """Each complete event's duration less its direct children's (events inside it on its thread)."""
    result = [float(e["dur"]) for e in events]
    by_thread = collections.defaultdict(list)
    for index, e in enumerate(events):
        by_thread[(e["pid"], e["tid"])].append(index)
    for indices in by_thread.values():
        indices.sort(key=lambda i: (events[i]["ts"], -events[i]["dur"]))
        open_events: list[int] = []
        for i in indices:
            start = events[i]["ts"]
            while open_events and events[open_events[-1]]["ts"] + events[open_events[-1]]["dur"] <= start:
                open_events.pop()
            if open_events and start + events[i]["dur"] <= events[open_events[-1]]["ts"] + events[open_events[-1]]["dur"]:
                result[open_events[-1]] -= events[i]["dur"]
            open_events.append(i)
    return result


def op_events(trace: dict) -> tuple[list[dict], str]:
    """The op events of a trace and where they come from (device streams, else host threads)."""
    events = trace["traceEvents"]
    processes, threads = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            processes[e["pid"]] = e["args"]["name"]
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            threads[(e["pid"], e["tid"])] = e["args"]["name"]
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device = [e for e in complete if processes.get(e["pid"], "").startswith(DEVICE_PREFIX)
              and threads.get((e["pid"], e["tid"]), "").startswith(STREAM_PREFIX)]
    if device:
        return device, "device op time: kernels and copies on the device's streams"
    host = [e for e in complete if "hlo_op" in e.get("args", {})]
    return host, ("XLA op time on host threads (no device timeline in this trace: on CPU the "
                  "XLA op events of the host threads stand in for device ops)")


def device_of(event: dict) -> str:
    """The device an op ran on: a CPU op's ``device_ordinal``, else its process (a GPU device)."""
    return str(event.get("args", {}).get("device_ordinal", event["pid"]))


def busy_time(events: list[dict]) -> float:
    """The length of the union of the events' intervals (overlapping ones count once)."""
    total, end = 0.0, float("-inf")
    for e in sorted(events, key=lambda e: e["ts"]):
        start, stop = e["ts"], e["ts"] + e["dur"]
        total += max(0.0, stop - max(start, end))
        end = max(end, stop)
    return total


def top_ops(log_dir: str | pathlib.Path, top: int = 15) -> dict:
    """Summary of the newest trace under ``log_dir``: the ``top`` ops by self time, with
    ``name``, ``time_s`` and ``count`` (summed over devices), ``share`` (of all ops counted); the
    number of ``devices`` and their mean ``busy_s``."""
    run = latest_run(log_dir)
    trace_file = next(run.glob("*.trace.json.gz"))
    with gzip.open(trace_file, "rt") as f:
        events, source = op_events(json.load(f))
    time_us, count = collections.Counter(), collections.Counter()
    for e, t in zip(events, self_times(events)):
        time_us[e["name"]] += t
        count[e["name"]] += 1
    total = sum(time_us.values())
    by_device = collections.defaultdict(list)
    for e in events:
        by_device[device_of(e)].append(e)
    busy = sum(map(busy_time, by_device.values())) / max(1, len(by_device))
    ops = [{"name": name, "time_s": t / 1e6, "share": t / total if total else 0.0, "count": count[name]}
           for name, t in time_us.most_common(top)]
    perfetto = run / "perfetto_trace.json.gz"
    return {"run_dir": str(run), "trace_file": str(trace_file),
            "perfetto_file": str(perfetto) if perfetto.exists() else None,
            "source": source, "total_s": total / 1e6, "devices": len(by_device), "busy_s": busy / 1e6,
            "num_ops": len(time_us), "ops": ops}


def report(log_dir: str | pathlib.Path, steps: int | None = None, top: int = 15, axes: dict | None = None) -> str:
    """The summary of :func:`top_ops` as a table, then where the trace is and how to open it; a
    collective named in ``axes`` (``hlo.collective_axes``) is shown with the mesh axes it spans."""
    axes = axes or {}
    named = lambda op: f"{op} over {','.join(axes[op]) or 'no axis'}" if op in axes else op
    summary = top_ops(log_dir, top)
    per = max(1, summary["devices"]) * (steps or 1)  # per device (and step): summed over devices
    unit = "per device and step" if steps else "per device"
    lines = [f"profile: {summary['source']}",
             f"  {summary['busy_s'] / (steps or 1) * 1e3:.2f} ms busy {unit} (the union of a device's ops' "
             f"intervals, mean over {summary['devices']} device(s){f', {steps} steps' if steps else ''}); "
             f"top {len(summary['ops'])} of {summary['num_ops']} ops by self time",
             f"  {'share':>6}  {'ms ' + unit:>22}  {'count ' + unit:>25}  op"]
    for op in summary["ops"]:
        lines.append(f"  {100 * op['share']:5.1f}%  {op['time_s'] * 1e3 / per:22.3f}  {op['count'] / per:25g}  {named(op['name'])}")
    lines.append(f"trace: {summary['run_dir']}")
    lines.append(f"  open with xprof (`pip install xprof`; `xprof --logdir {log_dir}`) or TensorBoard (`tensorboard --logdir {log_dir}`, Profile tab)")
    if summary["perfetto_file"]:
        lines.append(f"  Perfetto: open {summary['perfetto_file']} at https://ui.perfetto.dev")
    return "\n".join(lines)
