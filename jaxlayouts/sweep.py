"""Run a grid of layouts through the bench, one subprocess per point, resumably and loss-free.

    python -m jaxlayouts.sweep configs/sweeps/cpu_smoke.yaml --out results/cpu_smoke.jsonl

A sweep file holds ``base`` (bench flags shared by every point), ``grid`` (a list of values per
bench flag, or per mesh degree ``dp``/``fsdp``/``tp``/``pp``), optional ``skip`` (partial points:
a point matching every key of one entry is left out), ``devices`` (device count; the data-parallel
degree is derived as devices / (other degrees), on the axis ``data_axis``), and ``timeout_s``.

Every point gets a stable key (a hash of its resolved bench flags). Invalid points are found in
this process before anything is launched; the rest run as ``python -m jaxlayouts.bench`` in their
own process, so a crash, an out-of-memory or a hang costs one point, recorded as data. Each result
is appended to the JSONL file as one whole line, synced (``results.py``); a torn last line (from
a kill during a write) is skipped on the next start, so a re-run loses at most the point in flight
and never duplicates one. The sweep holds the file's lock while it runs (a second sweep on it is
refused), and Ctrl-C records the point in flight as ``interrupted``, which a re-run runs again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from jaxlayouts import config, distributed
from jaxlayouts.results import Results
from jaxlayouts.launch import PARENT_PID_VARIABLE
from jaxlayouts.layout import MAX_EMULATED_DEVICES, MESH_AXES, mesh_text, validate
from jaxlayouts.schema import InvalidInput, coerce, from_mapping, knob, knobs, load_yaml, refuse_special

NOT_FROM_SWEEP = ("output", "num_devices", "coordinator_address", "num_processes", "process_id")
"""Bench knobs a sweep file may not set: the sweep and the launcher own them."""
STATUSES = ("ok", "oom", "invalid", "compile_error", "write_error", "timeout", "interrupted", "error")
INTERRUPTED = "interrupted"


def cpu_caveat(rows: list[dict]) -> str | None:
    """The caveat on timings from emulated CPU devices among ``rows`` (ok rows with ``platform``
    cpu), or None: they show that layouts run, not which is faster on a GPU."""
    cpu = [r for r in rows if r.get("status") == "ok" and r.get("platform") == "cpu"]
    if not cpu:
        return None
    steps = sorted({r["steps"] for r in cpu if isinstance(r.get("steps"), int)})
    timed = f", {'-'.join(map(str, (steps[0], steps[-1]) if len(steps) > 1 else steps))} timed step(s) each" if steps else ""
    return (f"{len(cpu)} timing(s) here come from emulated CPU devices (XLA:CPU on a shared host{timed}): they show "
            "that a layout runs, not how fast it is on a GPU; their order, even a 2x gap, can be noise")
"""A point stopped by Ctrl-C: recorded, and run again when the sweep is resumed."""
INTERRUPT_EXIT = 130


@dataclasses.dataclass(frozen=True)
class SweepFile:
    """The fields of a sweep file (see the module docstring)."""

    name: str = knob("sweep", "The sweep's name in result rows and reports.")
    description: str = knob("", "What the sweep is for.")
    devices: int | None = knob(None, "Device count; the data axis takes what the other degrees leave.", low=1,
                               high=MAX_EMULATED_DEVICES, example=8)
    data_axis: str = knob("dp", "The axis that takes the remaining devices.", choices=("dp", "fsdp"),
                          noun="data axis")
    timeout_s: float = knob(1800.0, "Seconds one point may take.", above=0, high=10**6, example=600)
    base: dict = knob({}, "Bench knobs shared by every point.", example="{model: tiny}")
    grid: dict = knob({}, "A non-empty list of values per bench knob or mesh degree.", example="{tp: [1, 2]}")
    skip: list = knob([], "Partial points to leave out.", example="[{sequence_parallel: true, tp: 1}]")


# ---------------------------------------------------------------------------------------------
# Sweep files and points


def load_sweep(path: str | pathlib.Path) -> SweepFile:
    """A sweep file, every field checked; :class:`InvalidInput` names the field."""
    path = pathlib.Path(path)
    refuse_special(path, "sweep_file", "configs/sweeps/cpu_smoke.yaml")
    if not path.is_file():
        raise InvalidInput("sweep_file", f"no sweep file {path}; see configs/sweeps/ for examples")
    sweep = from_mapping(SweepFile, {"name": path.stem, **load_yaml(path, "sweep_file", empty_ok=True)}, path, "sweep_file")
    if not all(isinstance(rule, dict) for rule in sweep.skip):
        raise InvalidInput("sweep_file", f"{path}: skip: give a list of partial points, e.g. "
                           "skip: [{sequence_parallel: true, tp: 1}]")
    allowed = set(config.KNOB_NAMES) - set(NOT_FROM_SWEEP) | set(MESH_AXES)
    for where, given in (("base", sweep.base), ("grid", sweep.grid)):
        unknown = sorted(map(str, set(given) - allowed))
        if unknown:
            raise InvalidInput("sweep_file", f"{path}: {where}: unknown knobs {unknown}; use bench knobs "
                               f"({', '.join(sorted(allowed))})")
    for name, values in sweep.grid.items():
        if not isinstance(values, list) or not values:
            raise InvalidInput("sweep_file", f"{path}: grid.{name}: give a non-empty list of values, "
                               f"e.g. {name}: [1, 2]")
    return sweep


def points(sweep: SweepFile) -> list[dict]:
    """Every grid point as bench knob values (base, then grid, then the derived mesh), each once.
    A point whose mesh cannot be derived keeps its degrees and fails validation as a row."""
    names = list(sweep.grid)
    unique = [list({_hashable(v): v for v in sweep.grid[n]}.values()) for n in names]  # first-seen order
    out, seen = [], set()
    for values in itertools.product(*unique):
        point = {**sweep.base, **dict(zip(names, values))}
        if any(all(point.get(k) == v for k, v in rule.items()) for rule in sweep.skip):
            continue
        point = resolve_mesh(point, sweep)
        if "-1" in str(point.get("mesh", "")) and not sweep.devices:
            raise InvalidInput("sweep_file", f"devices: the mesh {point['mesh']} derives an axis from the "
                               "device count; set devices: N in the sweep file")
        key = point_key(point, sweep)
        if key not in seen:
            seen.add(key)
            out.append(point)
    return out


def _hashable(value):
    return json.dumps(value, sort_keys=True, default=str) if isinstance(value, (dict, list)) else value


def resolve_mesh(point: dict, sweep: SweepFile) -> dict:
    """Turn mesh degrees into ``mesh``; the data axis takes the devices the others leave."""
    degrees = {axis: point.pop(axis) for axis in MESH_AXES if axis in point}
    if "mesh" in point and degrees:
        point["mesh_error"] = f"give either mesh or degrees ({', '.join(degrees)}), not both"
    elif "mesh" not in point:
        degrees.setdefault(sweep.data_axis, -1)
        point["mesh"] = mesh_text(degrees)
    return point


def point_key(point: dict, sweep: SweepFile) -> str:
    """Stable identity of a point: a hash of its resolved knobs and the sweep's device count."""
    text = json.dumps({"point": point, "devices": sweep.devices}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def bench_args(point: dict) -> list[str]:
    args = []
    for name, value in sorted(point.items()):
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(f"--{name}" if value else f"--no{name}")
        else:
            args.append(f"--{name}={value}")
    return args


# ---------------------------------------------------------------------------------------------
# Running points


def run_point(point: dict, sweep: SweepFile, timeout_s: float) -> dict:
    """Run one point in its own process and return its result row (never raises)."""
    args = [sys.executable, "-m", "jaxlayouts.bench", *bench_args(point)]
    if sweep.devices:
        args.append(f"--num_devices={sweep.devices}")
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)  # the bench asks for the devices each point needs
    env[PARENT_PID_VARIABLE] = str(os.getpid())  # the point's process dies with the sweep
    start = time.perf_counter()
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"no result within {timeout_s:g} s (timeout_s)",
                "wall_s": time.perf_counter() - start}
    wall = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    try:
        row = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        tail = (proc.stderr or proc.stdout)[-2000:]
        return {"status": "error", "wall_s": wall,
                "error": f"bench exited {proc.returncode} without a result: {tail}"}
    row["wall_s"] = wall
    return row


def prevalidate(point: dict, sweep: SweepFile) -> dict | None:
    """None if the point can run, else its ``invalid`` row (found in-process, nothing launched)."""
    try:
        if "mesh_error" in point:
            raise InvalidInput("mesh", point["mesh_error"])
        values = config.check_values(config.values_with("knob", **point))
        config.options(values)
        run = config.run_config(values, sweep.devices)
    except InvalidInput as error:
        return {"status": "invalid", "error": str(error)}
    except Exception as error:  # a check that broke is this point's row, never the end of the sweep
        return {"status": "error", "error": f"checking the point failed: {type(error).__name__}: {error}"}
    try:
        validate(run, sweep.devices or run.layout.num_devices)
    except InvalidInput as error:
        return {"status": "invalid", "error": str(error), **config.describe(run)}
    except Exception as error:
        return {"status": "error", "error": f"checking the point failed: {type(error).__name__}: {error}"}
    return None


def progress(done: int, total: int, failed: int, elapsed: list[float], message: str) -> str:
    width = 24
    filled = round(width * done / total) if total else width
    eta = (sum(elapsed) / len(elapsed) * (total - done)) if elapsed else None
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta is not None else "--:--:--"
    return (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} failed {failed} "
            f"ETA {eta_text}  {message}")


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m jaxlayouts.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_file")
    parser.add_argument("--out", required=True, help="results JSONL (appended to; re-runs resume)")
    parser.add_argument("--retry-failed", "--retry_failed", action="store_true",
                        help="run again the points that did not end ok (their new rows are appended)")
    parser.add_argument("--timeout", type=float, default=None, help="per-point timeout in seconds (overrides timeout_s)")
    parser.add_argument("--dry-run", "--dry_run", action="store_true",
                        help="list the points and their status; run and write nothing")
    parser.add_argument("--index", type=int, default=None,
                        help="run only the point with this index in grid order (for job arrays)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.timeout is not None:  # the sweep file's timeout_s, given on the command line
            try:
                coerce(SweepFile, next(f for f in knobs(SweepFile) if f.name == "timeout_s"), args.timeout)
            except InvalidInput as error:
                raise InvalidInput("timeout", str(error).split(": ", 1)[1]) from None
        sweep = load_sweep(args.sweep_file)
        keyed = [(point_key(p, sweep), p) for p in points(sweep)]
        if args.index is not None and not 0 <= args.index < len(keyed):
            raise InvalidInput("index", f"{args.index}: the sweep has points 0 to {len(keyed) - 1}")
        # In a multi-node point every node runs the sweep (each bench process joins the run); only
        # process 0 records results and reports progress.
        writer = distributed.detect().process_id == 0
        results = Results(args.out if writer else None)
        if not args.dry_run:
            results.create().hold()  # one sweep writes a results file at a time
    except InvalidInput as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.index is not None:
        keyed = keyed[args.index:args.index + 1]
    retry = {k for k, _ in keyed if results.rows.get(k, {}).get("status") == INTERRUPTED
             or args.retry_failed and results.rows.get(k, {}).get("status", "ok") != "ok"}
    pending = [(k, p) for k, p in keyed if k not in results.rows or k in retry]
    log = lambda message: print(message, file=sys.stderr, flush=True) if writer else None
    log(f"sweep {sweep.name}: {len(keyed)} points, {len(keyed) - len(pending)} already in {args.out}, "
        f"{len(pending)} to run")
    if args.dry_run:
        for k, p in keyed:
            shown = p.get("mesh_error") or " ".join(bench_args(p))
            print(k, results.rows.get(k, {}).get("status", "pending"), shown)
        return 0
    try:
        run_pending(pending, keyed, sweep, results, args.timeout or sweep.timeout_s, writer, log)
    except KeyboardInterrupt:
        return INTERRUPT_EXIT  # the point in flight is recorded (run_pending)
    except OSError as error:  # the results file could not take a row (a full disk)
        log(f"error: --out: {error}; the sweep stopped, and resumes from here when run again")
        return 1
    counts = {s: sum(1 for k, _ in keyed if results.rows[k]["status"] == s) for s in STATUSES}
    log("done: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    if (caveat := cpu_caveat([results.rows[k] for k, _ in keyed])):
        log(f"note: {caveat}")
    return 0


def run_pending(pending, keyed, sweep: SweepFile, results: Results, timeout_s: float, writer: bool, log):
    """Run each pending point (invalid ones become rows without a launch) and record its row."""
    done = len(keyed) - len(pending)
    failed = sum(1 for k, _ in keyed if k not in dict(pending) and results.rows[k]["status"] != "ok")
    elapsed: list[float] = []
    for key, point in pending:
        row = prevalidate(point, sweep)
        if row is None:
            start = time.perf_counter()
            try:
                row = run_point(point, sweep, timeout_s)
            except KeyboardInterrupt:
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C cannot tear the row
                row = {"status": INTERRUPTED, "wall_s": time.perf_counter() - start,
                       "error": "interrupted (Ctrl-C); run the same command again to resume from this point"}
                row.update(key=key, sweep=sweep.name, point=point, num_devices=sweep.devices)
                if writer:
                    results.append(row)
                log(f"interrupted at {point.get('mesh')}: recorded as {INTERRUPTED}; {done} of {len(keyed)} "
                    "points done, the same command resumes")
                raise
            elapsed.append(time.perf_counter() - start)
        row.update(key=key, sweep=sweep.name, point=point, num_devices=row.get("num_devices") or sweep.devices)
        if writer:
            results.append(row)
        else:
            results.rows[key] = row
        done += 1
        failed += row["status"] != "ok"
        what = f"{row['status']}" + (f" {row['step_time_s']:.3f} s/step" if row["status"] == "ok" else "")
        log(progress(done, len(keyed), failed, elapsed, f"{row.get('layout') or point.get('mesh')}: {what}"))


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # before any point ran: nothing to record
        print("interrupted (Ctrl-C); nothing was recorded, run the same command again", file=sys.stderr)
        sys.exit(INTERRUPT_EXIT)
