"""Run a grid of layouts through the bench, one subprocess per point, resumably and loss-free.

    python -m jaxlayouts.sweep configs/sweeps/cpu_smoke.yaml --out results/cpu_smoke.jsonl

A sweep file holds ``base`` (bench flags shared by every point), ``grid`` (a list of values per
bench flag, or per mesh degree ``dp``/``fsdp``/``tp``/``pp``), optional ``skip`` (partial points:
a point matching every key of one entry is left out), ``devices`` (device count; the data-parallel
degree is derived as devices / (other degrees), on the axis ``data_axis``), and ``timeout_s``.

Every point gets a stable key (a hash of its resolved bench flags). Invalid points are found in
this process before anything is launched; the rest run as ``python -m jaxlayouts.bench`` in their
own process, so a crash, an out-of-memory or a hang costs one point, recorded as data. Each result
is appended to the JSONL file as one line in one write, flushed and synced; a torn last line (from
a kill during a write) is dropped on the next start, so a re-run loses at most the point in flight
and never duplicates one.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import pathlib
import subprocess
import sys
import time

import yaml

from jaxlayouts.launch import PARENT_PID_VARIABLE

MESH_DEGREES = ("dp", "fsdp", "tp", "pp")
SWEEP_KEYS = ("name", "devices", "data_axis", "timeout_s", "base", "grid", "skip", "description")
NOT_FROM_SWEEP = ("output", "num_devices", "coordinator_address", "num_processes", "process_id")
"""Bench flags a sweep file may not set: the sweep and the launcher own them."""
STATUSES = ("ok", "oom", "invalid", "compile_error", "timeout", "error")


class SweepError(ValueError):
    """A sweep file that cannot be run; the message names the key to change."""


# ---------------------------------------------------------------------------------------------
# Sweep files and points


def load_sweep(path: str | pathlib.Path) -> dict:
    path = pathlib.Path(path)
    if not path.is_file():
        raise SweepError(f"no sweep file {path}; see configs/sweeps/ for examples")
    sweep = yaml.safe_load(path.read_text()) or {}
    unknown = set(sweep) - set(SWEEP_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown keys {sorted(unknown)}; a sweep file has {', '.join(SWEEP_KEYS)}")
    sweep.setdefault("name", path.stem)
    sweep.setdefault("base", {})
    sweep.setdefault("grid", {})
    sweep.setdefault("skip", [])
    sweep.setdefault("data_axis", "dp")
    sweep.setdefault("timeout_s", 1800)
    if sweep["data_axis"] not in ("dp", "fsdp"):
        raise SweepError(f"data_axis: {sweep['data_axis']!r}; choose dp or fsdp")
    if not isinstance(sweep["skip"], list) or not all(isinstance(rule, dict) for rule in sweep["skip"]):
        raise SweepError("skip: give a list of partial points, e.g. skip: [{sequence_parallel: true, tp: 1}]")
    for knob, values in sweep["grid"].items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"grid.{knob}: give a non-empty list of values, e.g. {knob}: [1, 2]")
    return sweep


def points(sweep: dict, bench_flags: tuple) -> list[dict]:
    """Every grid point as resolved bench flag values (base, then grid, then the derived mesh)."""
    allowed = set(bench_flags) - set(NOT_FROM_SWEEP) | set(MESH_DEGREES)
    for where, knobs in (("base", sweep["base"]), ("grid", sweep["grid"])):
        unknown = sorted(set(knobs) - allowed)
        if unknown:
            raise SweepError(f"{where}: unknown knobs {unknown}; use bench flags "
                             f"({', '.join(sorted(allowed))})")
    names = list(sweep["grid"])
    out = []
    for values in itertools.product(*(sweep["grid"][n] for n in names)):
        point = {**sweep["base"], **dict(zip(names, values))}
        if any(all(point.get(k) == v for k, v in rule.items()) for rule in sweep["skip"]):
            continue
        point = resolve_mesh(point, sweep)
        if "-1" in point["mesh"] and not sweep.get("devices"):
            raise SweepError(f"devices: the mesh {point['mesh']} derives an axis from the device "
                             "count; set devices: N in the sweep file")
        out.append(point)
    return out


def resolve_mesh(point: dict, sweep: dict) -> dict:
    """Turn mesh degrees into ``mesh``; the data axis takes the devices the others leave."""
    degrees = {axis: point.pop(axis) for axis in MESH_DEGREES if axis in point}
    if "mesh" in point and degrees:
        raise SweepError(f"give either mesh or degrees ({', '.join(degrees)}), not both")
    if "mesh" not in point:
        degrees.setdefault(sweep["data_axis"], -1)
        point["mesh"] = ",".join(f"{axis}={degrees.get(axis, 1)}" for axis in MESH_DEGREES)
    return point


def point_key(point: dict, sweep: dict) -> str:
    """Stable identity of a point: a hash of its resolved flags and the sweep's device count."""
    text = json.dumps({"point": point, "devices": sweep.get("devices")}, sort_keys=True)
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
# The results file


class Results:
    """Append-only JSONL of result rows, one per point key."""

    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            self._load()

    def _load(self):
        raw = self.path.read_bytes()
        good, lines = [], raw.split(b"\n")
        for line in lines[:-1]:  # complete lines end with a newline
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            good.append(line)
            self.rows[row["key"]] = row
        if lines[-1] or len(good) != len(lines) - 1:  # a torn or broken line: rewrite without it
            self._rewrite(good)

    def _rewrite(self, lines: list[bytes]):
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "wb") as f:
            f.write(b"".join(line + b"\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def forget(self, keys: set[str]):
        """Drop rows (e.g. failed ones before a retry), atomically."""
        self.rows = {k: v for k, v in self.rows.items() if k not in keys}
        self._rewrite([json.dumps(row).encode() for row in self.rows.values()])

    def append(self, row: dict):
        line = (json.dumps(row) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.rows[row["key"]] = row


# ---------------------------------------------------------------------------------------------
# Running points


def run_point(point: dict, sweep: dict, timeout_s: float) -> dict:
    """Run one point in its own process and return its result row (never raises)."""
    args = [sys.executable, "-m", "jaxlayouts.bench", *bench_args(point)]
    if sweep.get("devices"):
        args.append(f"--num_devices={sweep['devices']}")
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


def prevalidate(point: dict, sweep: dict) -> dict | None:
    """None if the point can run, else its ``invalid`` row (found in-process, nothing launched)."""
    from jaxlayouts import bench
    from jaxlayouts.layout import InvalidLayout, validate

    values = {**bench.flag_defaults(), **point}
    try:
        run, _ = bench.run_config(values, sweep.get("devices"))
    except InvalidLayout as error:
        return {"status": "invalid", "error": str(error)}
    try:
        validate(run, sweep.get("devices") or run.layout.num_devices)
    except InvalidLayout as error:
        return {"status": "invalid", "error": str(error), **bench.describe(run)}
    return None


def progress(done: int, total: int, failed: int, elapsed: list[float], message: str) -> str:
    width = 24
    filled = round(width * done / total) if total else width
    eta = (sum(elapsed) / len(elapsed) * (total - done)) if elapsed else None
    eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta is not None else "--:--:--"
    return (f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} failed {failed} "
            f"ETA {eta_text}  {message}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxlayouts.sweep", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_file")
    parser.add_argument("--out", required=True, help="results JSONL (appended to; re-runs resume)")
    parser.add_argument("--retry-failed", action="store_true", help="run again the points that did not end ok")
    parser.add_argument("--timeout", type=float, default=None, help="per-point timeout in seconds (overrides timeout_s)")
    parser.add_argument("--dry-run", action="store_true", help="list the points and their status, run nothing")
    parser.add_argument("--index", type=int, default=None,
                        help="run only the point with this index in grid order (for job arrays)")
    args = parser.parse_args(argv)

    from jaxlayouts import bench, distributed

    try:
        sweep = load_sweep(args.sweep_file)
        todo = points(sweep, bench.FLAG_NAMES)
    except SweepError as error:
        print(f"error: {args.sweep_file}: {error}", file=sys.stderr)
        return 2
    keyed = [(point_key(p, sweep), p) for p in todo]
    if args.timeout is not None and args.timeout <= 0:
        print(f"error: --timeout {args.timeout}: give seconds > 0, e.g. --timeout 600", file=sys.stderr)
        return 2
    if args.index is not None:
        if not 0 <= args.index < len(keyed):
            print(f"error: --index {args.index}: the sweep has points 0 to {len(keyed) - 1}", file=sys.stderr)
            return 2
        keyed = keyed[args.index:args.index + 1]
    # In a multi-node point every node runs the sweep (each bench process joins the run); only
    # process 0 records results and reports progress.
    writer = distributed.detect().process_id == 0
    results = Results(args.out) if writer else Results(os.devnull)
    if args.retry_failed:
        results.forget({k for k, _ in keyed if k in results.rows and results.rows[k]["status"] != "ok"})
    pending = [(k, p) for k, p in keyed if k not in results.rows]
    log = lambda message: print(message, file=sys.stderr, flush=True) if writer else None
    log(f"sweep {sweep['name']}: {len(keyed)} points, {len(keyed) - len(pending)} already in {args.out}, "
        f"{len(pending)} to run")
    if args.dry_run:
        for k, p in keyed:
            print(k, results.rows.get(k, {}).get("status", "pending"), " ".join(bench_args(p)))
        return 0

    timeout_s = args.timeout or sweep["timeout_s"]
    done = len(keyed) - len(pending)
    failed = sum(1 for k, _ in keyed if results.rows.get(k, {}).get("status", "ok") != "ok")
    elapsed: list[float] = []
    for key, point in pending:
        row = prevalidate(point, sweep)
        if row is None:
            start = time.perf_counter()
            row = run_point(point, sweep, timeout_s)
            elapsed.append(time.perf_counter() - start)
        row.update(key=key, sweep=sweep["name"], point=point, num_devices=row.get("num_devices") or sweep.get("devices"))
        if writer:
            results.append(row)
        else:
            results.rows[key] = row
        done += 1
        failed += row["status"] != "ok"
        what = f"{row['status']}" + (f" {row['step_time_s']:.3f} s/step" if row["status"] == "ok" else "")
        log(progress(done, len(keyed), failed, elapsed, f"{row.get('layout') or point['mesh']}: {what}"))
    counts = {s: sum(1 for k, _ in keyed if results.rows[k]["status"] == s) for s in STATUSES}
    log("done: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return 0


if __name__ == "__main__":
    sys.exit(main())
