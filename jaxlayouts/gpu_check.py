"""The GPU kit: one call measures the project on one GPU and writes the result under docs/results/.

    PYTHONPATH=. python -m jaxlayouts.gpu_check                    # one H100/H200, at most --budget_s (480 s)
    python -m jaxlayouts.gpu_check --dry-run --out_dir /tmp/kit    # CPU, tiny shapes: the code path only

It prints the device and the versions and measures the two ceilings (:mod:`jaxlayouts.ceilings`),
then works through a prioritised list of tasks while the budget lasts:

* bench points: llama-1b at 2k and 8k tokens, micro-batch x remat x attention x norm, one global
  batch that every micro-batch divides, each ``python -m jaxlayouts.bench`` in its own process
  (:func:`jaxlayouts.sweep.run_point`);
* the peer (:mod:`jaxlayouts.peers.torch_llama`), eager and ``torch.compile``, at the same
  shapes, micro-batches and global batch, with the same MFU formula; where torch is missing, one
  note row per peer says so;
* the kernel benchmark, ``python -m jaxlayouts.kernel_bench``, its rows kept as it emits them.

The target points come first (micro-batch 1 and 4 at 2k and 1 at 8k, each beside the
torch.compile peer, then remat at micro-batch 4), then the kernels, then the rest of the grid. A
task starts only when its estimate (the last measured time of its kind, else a prior) fits in the
budget left, and it is stopped when the budget runs out. Every record is appended to
``<device>-<date>.jsonl`` as it arrives and ``<device>-<date>.md`` and ``.json`` are rendered again
after each one, so a run cut off keeps what it measured; the tools' own full rows go to
``<device>-<date>.raw.jsonl``. This process imports neither JAX nor torch: each measurement runs
in a child process (which dies with this one), so the device is free for the next.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import itertools
import json
import math
import os
import pathlib
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

from jaxlayouts import sweep
from jaxlayouts.kernels.triton_versions import installed
from jaxlayouts.launch import PARENT_PID_VARIABLE
from jaxlayouts.layout import CONFIG_DIR
from jaxlayouts.results import Results, commit

PEERS = ("torch_compile", "torch_eager")
TOOLS = ("jaxlayouts",) + PEERS
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "triton", "jax-triton", "torch")
RESERVE_S = 5.0
"""Budget kept back for the last render."""


@dataclasses.dataclass(frozen=True)
class Grid:
    """What one call measures; ``prior_s`` are time estimates per task kind before any is measured."""

    model: str
    seq_lens: tuple[int, ...]
    global_batch: int
    micro_batches: tuple[int, ...]
    remats: tuple[str, ...]
    attentions: tuple[str, ...]
    norms: tuple[str, ...]
    steps: int
    warmup: int
    kernel_flags: tuple[str, ...]
    compile_backend: str
    prior_s: dict


GPU = Grid(model="llama-1b", seq_lens=(2048, 8192), global_batch=8, micro_batches=(1, 2, 4, 8),
           remats=("none", "full", "selective"), attentions=("cudnn", "pallas"), norms=("xla", "pallas"),
           steps=4, warmup=2, kernel_flags=("--seq_lens=2048,8192",), compile_backend="inductor",
           prior_s={"jaxlayouts": 60, "torch_eager": 30, "torch_compile": 100, "kernels": 120})
DRY_RUN = Grid(model="tiny", seq_lens=(32,), global_batch=2, micro_batches=(1, 2), remats=("none",),
               attentions=("xla",), norms=("xla",), steps=2, warmup=1,
               kernel_flags=("--seq_lens=32", "--tokens=64", "--heads=2", "--head_dim=16", "--norm_rows=16",
                             "--d_model=64", "--warmup=0", "--iters=1", "--attention=xla",
                             "--norm=xla,pallas"),
               compile_backend="eager",
               prior_s={"jaxlayouts": 20, "torch_eager": 10, "torch_compile": 15, "kernels": 20})
"""On CPU, torch.compile uses the ``eager`` backend (Dynamo's graph capture, run eagerly): Inductor's
C++ code generation takes a minute on 2 cores, and the dry run checks the code path only."""


# ---------------------------------------------------------------------------------------------
# The plan


def task(tool: str, seq_len: int | None = None, micro_batch: int | None = None, remat: str | None = None,
         attention: str | None = None, norm: str | None = None, reason: str | None = None) -> dict:
    fields = {"tool": tool, "seq_len": seq_len, "micro_batch": micro_batch, "remat": remat,
              "attention": attention, "norm": norm}
    key = "/".join(str(v) for v in fields.values() if v is not None)
    return {"key": key, **fields, "reason": reason}


def plan(grid: Grid, torch_missing: str | None = None) -> list[dict]:
    """Every task in priority order (the most informative first), each once."""
    s0, s_last, mbs = grid.seq_lens[0], grid.seq_lens[-1], grid.micro_batches
    mid = 4 if 4 in mbs else mbs[len(mbs) // 2]
    base = {"remat": grid.remats[0], "attention": grid.attentions[0], "norm": grid.norms[0]}
    jax = lambda t, mb, **change: task("jaxlayouts", t, mb, **{**base, **change})
    headline = list(dict.fromkeys([(s0, mbs[0]), (s0, mid), (s_last, mbs[0])]))
    order = [t for t_mb in headline for t in (jax(*t_mb), task("torch_compile", *t_mb))]
    order += [jax(s0, mid, remat=r) for r in grid.remats[1:]]
    order.append(task("kernels"))
    order += [jax(s0, mbs[-1]), task("torch_compile", s0, mbs[-1])]
    order += [task("torch_eager", *t_mb) for t_mb in headline + [(s0, mbs[-1])]]
    order += [jax(s0, mbs[0], attention=a) for a in grid.attentions[1:]]
    order += [jax(s0, mbs[0], norm=n) for n in grid.norms[1:]]
    order += [task("jaxlayouts", *p) for p in itertools.product(grid.seq_lens, mbs, grid.remats, grid.attentions, grid.norms)]
    order += [task(peer, t, mb) for peer in PEERS for t, mb in itertools.product(grid.seq_lens, mbs)]
    if torch_missing:  # one note row per peer instead of its points
        order = [t for t in order if t["tool"] not in PEERS] + [task(peer, reason=torch_missing) for peer in PEERS]
    seen = set()
    return [t for t in order if not (t["key"] in seen or seen.add(t["key"]))]


def estimate(t: dict, measured: dict, grid: Grid) -> float:
    """Seconds a task is expected to take: the last one of its kind (tool and sequence length)
    that ran ok, else the last of its tool, else the grid's prior; 0 for a note (nothing runs)."""
    if t["reason"]:
        return 0.0
    return measured.get((t["tool"], t["seq_len"]), measured.get(t["tool"], grid.prior_s.get(t["tool"], 0.0)))


def run_tasks(tasks: list[dict], grid: Grid, deadline: float, execute, record, clock=time.monotonic) -> None:
    """Run ``execute(task, timeout_s)`` for each task that fits before ``deadline``; ``record``
    receives each result, and a ``not_run`` record for each task that did not fit."""
    measured: dict = {}
    for t in tasks:
        left = deadline - clock()
        need = estimate(t, measured, grid)
        if need > left:
            record({"kind": "not_run", "key": t["key"], "task": t,
                    "reason": f"budget: about {need:.0f} s needed, {max(left, 0):.0f} s left"})
            continue
        start = clock()
        result = execute(t, left)
        if result.get("status") == "ok":  # a quick failure (out of memory) says nothing of the time
            measured[(t["tool"], t["seq_len"])] = measured[t["tool"]] = clock() - start
        record(result)


# ---------------------------------------------------------------------------------------------
# Running the tasks, each in its own process


def child(module: str, args: list[str], timeout_s: float) -> tuple[dict | None, str | None]:
    """``python -m module args`` (made to die with this process); returns its last stdout line as
    JSON, or None and why not."""
    code = ("import runpy, sys\nfrom jaxlayouts.launch import die_with_parent\ndie_with_parent()\n"
            f"sys.argv[0] = {module!r}\nrunpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    env = dict(os.environ, **{PARENT_PID_VARIABLE: str(os.getpid())})
    try:
        proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                              timeout=max(timeout_s, 1), env=env)
    except subprocess.TimeoutExpired:
        return None, f"timeout: no result within {timeout_s:.0f} s (the budget left)"
    try:
        return json.loads(proc.stdout.strip().splitlines()[-1]), None
    except (IndexError, json.JSONDecodeError):
        return None, f"exited {proc.returncode} without a result: {(proc.stderr or proc.stdout)[-1500:]}"


def failed(why: str) -> str:
    """The status of a child that gave no result."""
    return "timeout" if why.startswith("timeout") else "error"


def torch_missing() -> str | None:
    """Why the peer cannot run here, or None."""
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed; the peer needs it (the GPU image brings its own)"
    return None


def execute(t: dict, timeout_s: float, grid: Grid, raw_path: pathlib.Path) -> dict:
    """Run one task and return its record."""
    if t["reason"]:
        return {"kind": "row", **row_fields(t, grid), "status": "skipped", "reason": t["reason"]}
    if t["tool"] == "kernels":
        out, why = child("jaxlayouts.kernel_bench", list(grid.kernel_flags), timeout_s)
        rows = (out or {}).get("attention", []) + (out or {}).get("rms_norm", [])
        return {"kind": "kernels", "key": t["key"], "status": "ok" if out else failed(why), "reason": why,
                "command": "python -m jaxlayouts.kernel_bench " + " ".join(grid.kernel_flags), "rows": rows}
    common = {"model": grid.model, "seq_len": t["seq_len"], "global_batch": grid.global_batch,
              "micro_batch": t["micro_batch"], "steps": grid.steps, "warmup": grid.warmup, "output": str(raw_path)}
    if t["tool"] == "jaxlayouts":
        point = {**common, "mesh": "dp=1", "remat": t["remat"], "attention": t["attention"], "norm": t["norm"]}
        return {"kind": "row", **row_fields(t, grid), **from_bench(sweep.run_point(point, sweep.SweepFile(), max(timeout_s, 1)))}
    args = [f"--{k}={v}" for k, v in common.items()] + [f"--compile_backend={grid.compile_backend}"]
    args += ["--compile"] if t["tool"] == "torch_compile" else []
    out, why = child("jaxlayouts.peers.torch_llama", args, timeout_s)
    if out is None:
        return {"kind": "row", **row_fields(t, grid), "status": failed(why), "reason": why}
    return {"kind": "row", **row_fields(t, grid), **from_peer(out)}


ROW_FIELDS = ("key", "tool", "model", "global_batch", "micro_batch", "seq_len", "remat", "attention", "norm",
              "status", "reason", "step_time_s", "tokens_per_s", "mfu", "model_tflops_per_device", "peak_tflops",
              "peak_bytes", "compiled_peak_bytes", "compile_time_s", "loss_first", "loss_last", "wall_s")


def row_fields(t: dict, grid: Grid) -> dict:
    """A row with the task's fields and every other field null."""
    row = dict.fromkeys(ROW_FIELDS)
    row.update({k: t[k] for k in ("key", "tool", "seq_len", "micro_batch", "remat", "attention", "norm")})
    if t["tool"] in PEERS and t["seq_len"] is not None:  # the peer's fixed choices
        row.update(remat="none", attention="sdpa", norm="torch")
    return {**row, "model": grid.model, "global_batch": grid.global_batch if t["seq_len"] else None}


def from_bench(out: dict) -> dict:
    """The kit's fields of a bench row."""
    memory = out.get("memory") or {}
    losses = out.get("losses") or [None]
    return {"status": out["status"], "reason": out.get("error"), "step_time_s": out.get("step_time_s"),
            "tokens_per_s": out.get("tokens_per_s"), "mfu": out.get("mfu"),
            "model_tflops_per_device": out.get("model_tflops_per_device"), "peak_tflops": out.get("peak_tflops"),
            "peak_bytes": memory.get("device_peak_bytes"),
            "compiled_peak_bytes": memory.get("compiled_peak_bytes_per_device"),
            "compile_time_s": out.get("compile_time_s"), "loss_first": losses[0], "loss_last": losses[-1],
            "wall_s": out.get("wall_s")}


def from_peer(out: dict) -> dict:
    """The kit's fields of a peer row (its first step, compile included, stands for compile time)."""
    losses = out.get("losses") or [None]
    return {"status": out["status"], "reason": out.get("error"), "step_time_s": out.get("step_time_s"),
            "tokens_per_s": out.get("tokens_per_s"), "mfu": out.get("mfu"),
            "model_tflops_per_device": out.get("model_tflops_per_device"), "peak_tflops": out.get("peak_tflops"),
            "peak_bytes": out.get("peak_bytes"), "compile_time_s": out.get("first_step_s"),
            "loss_first": losses[0], "loss_last": losses[-1]}


# ---------------------------------------------------------------------------------------------
# Device, versions, ceilings


def probe(small: bool) -> dict:
    """The device and both ceilings, measured through JAX (run in a child process)."""
    import jax

    from jaxlayouts import ceilings
    device = jax.devices()[0]
    return {"device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
            "bytes_limit": (device.memory_stats() or {}).get("bytes_limit"), "ceilings": ceilings.measure(small=small)}


def versions() -> dict:
    """Versions of the stack (null where a package is missing), Python, and the NVIDIA driver."""
    found = installed(PACKAGES)
    for dist in importlib.metadata.distributions():  # jax-cuda12-plugin, jax-cuda13-pjrt, ...
        name = re.sub(r"[-_.]+", "-", dist.metadata["Name"] or "").lower()
        if name.startswith("jax-cuda"):
            found[name] = dist.version
    found["python"] = platform.python_version()
    found["driver"] = None
    if shutil.which("nvidia-smi"):
        try:
            query = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                   capture_output=True, text=True, timeout=30)
            found["driver"] = query.stdout.strip().splitlines()[0] if query.returncode == 0 else None
        except (subprocess.TimeoutExpired, IndexError):
            pass
    return found


def slug(device_kind: str) -> str:
    """``'NVIDIA H100 80GB HBM3'`` -> ``'h100-80gb-hbm3'``."""
    words = re.sub(r"[^a-z0-9]+", "-", device_kind.lower()).strip("-").split("-")
    return "-".join(w for w in words if w != "nvidia") or "device"


# ---------------------------------------------------------------------------------------------
# The outputs


def add_ratios(rows: list[dict], ceilings: dict) -> list[dict]:
    """Each row's ratio to the matmul ceiling (model TFLOP/s / measured matmul TFLOP/s) and its
    tokens/s over each peer's at the same sequence length and micro-batch (null where absent)."""
    peers = {(r["tool"], r["seq_len"], r["micro_batch"]): r["tokens_per_s"] for r in rows
             if r["tool"] in PEERS and r["status"] == "ok"}
    out = []
    for r in rows:
        ok = r["status"] == "ok"
        ratios = {"vs_matmul_ceiling": r["model_tflops_per_device"] / ceilings["matmul_tflops"]
                  if ok and ceilings.get("matmul_tflops") else None}
        for peer in PEERS:
            theirs = peers.get((peer, r["seq_len"], r["micro_batch"]))
            ratios[f"vs_{peer}"] = r["tokens_per_s"] / theirs if ok and theirs else None
        out.append({**r, **ratios})
    return out


def document(header: dict, records: list[dict], tasks: list[dict]) -> dict:
    """The JSON result: device, date, versions, ceilings, rows, kernels, and the tasks not run."""
    probe_record = next((r for r in records if r["kind"] == "probe"), {})
    ceilings = probe_record.get("ceilings", {})
    kernels = next((r for r in records if r["kind"] == "kernels"), None)
    done = {r["key"] for r in records if "key" in r}
    not_run = [{**r["task"], "reason": r["reason"]} for r in records if r["kind"] == "not_run"]
    not_run += [{**t, "reason": "not reached (the run ended before it)"} for t in tasks if t["key"] not in done]
    rows = add_ratios([{k: r.get(k) for k in ROW_FIELDS} for r in records if r["kind"] == "row"], ceilings)
    return {**header, "device": probe_record.get("device_kind"), "platform": probe_record.get("platform"),
            "bytes_limit": probe_record.get("bytes_limit"), "ceilings": ceilings, "rows": rows,
            "kernels": kernels["rows"] if kernels else [],
            "kernels_status": None if kernels is None else {k: kernels[k] for k in ("status", "reason", "command")},
            "not_run": not_run, "complete": any(r["kind"] == "done" for r in records)}


def _cell(value, fmt="{:.3g}", scale=1.0):
    return "n/a" if value is None else fmt.format(value * scale)


def markdown(doc: dict) -> str:
    """The Markdown report of a :func:`document`."""
    c, grid = doc["ceilings"], doc["grid"]
    lines = [f"# {doc['device']}: jaxlayouts GPU kit, {doc['date']}", ""]
    if doc["dry_run"]:
        lines += ["**CPU dry run** with a tiny model and tiny shapes: these numbers measure only the code path, "
                  "nothing about any hardware.", ""]
    if not doc["complete"]:
        lines += ["**Incomplete**: the run was still going when this was written, or was cut off.", ""]
    lines += [f"Command: `{doc['command']}`  ", f"Commit: {doc['commit'] or 'n/a'}; platform {doc['platform']}; "
              f"budget {doc['budget_s']:g} s, {doc['elapsed_s']:.0f} s used"
              + (f"; JAX's device memory limit {doc['bytes_limit'] / 2**30:.1f} GiB." if doc["bytes_limit"] else "."), "",
              "| " + " | ".join(doc["versions"]) + " |", "|" + "---|" * len(doc["versions"]),
              "| " + " | ".join(str(v) if v else "n/a" for v in doc["versions"].values()) + " |", "",
              "## Ceilings (measured through JAX, random inputs, median)", "",
              f"- matmul {' x '.join(map(str, c.get('matmul_shape', [])))} {c.get('dtype', '')}: "
              f"{_cell(c.get('matmul_tflops'), '{:.3g}')} TFLOP/s",
              f"- device copy of {_cell(c.get('copy_bytes'), '{:.0f}', 2**-20)} MiB: "
              f"{_cell(c.get('copy_gbs'), '{:.0f}')} GB/s counting read + write", "",
              f"## Training step: {grid['model']}, global batch {grid['global_batch']}, one device",
              "", f"Median of {grid['steps']} steps after {grid['warmup']} warm-up. MFU = model FLOPs "
              "(6N + 12 L d T, jaxlayouts.flops) per second over the datasheet peak; `vs matmul` = model "
              "TFLOP/s over the measured matmul ceiling; `vs compile` / `vs eager` = tokens/s over the "
              "PyTorch peer's at the same T and micro-batch (torch.compile backend: "
              f"{grid['compile_backend']}). Peak memory: JAX's peak_bytes_in_use, torch's max_memory_allocated.", "",
              "| tool | T | micro-batch | remat | attention | norm | status | step s | tokens/s | MFU | "
              "vs matmul | vs compile | vs eager | peak GiB | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    order = lambda r: (r["seq_len"] or 0, r["micro_batch"] or 0, TOOLS.index(r["tool"]), str(r["remat"]),
                       str(r["attention"]), str(r["norm"]))
    for r in sorted(doc["rows"], key=order):
        note = (r["reason"] or "").splitlines()[0][:120] if r["reason"] else ""
        lines.append(f"| {r['tool']} | {r['seq_len'] or ''} | {r['micro_batch'] or ''} | {r['remat'] or ''} | "
                     f"{r['attention'] or ''} | {r['norm'] or ''} | {r['status']} | "
                     f"{_cell(r['step_time_s'], '{:.4f}')} | {_cell(r['tokens_per_s'], '{:,.0f}')} | "
                     f"{_cell(r['mfu'], '{:.1f}%', 100)} | {_cell(r['vs_matmul_ceiling'], '{:.2f}')} | "
                     f"{_cell(r['vs_torch_compile'], '{:.2f}')} | {_cell(r['vs_torch_eager'], '{:.2f}')} | "
                     f"{_cell(r['peak_bytes'], '{:.1f}', 2**-30)} | {note} |")
    lines += ["", "## Kernels", ""]
    status = doc["kernels_status"]
    if status is None:
        lines.append("Not run.")
    else:
        lines += [f"`{status['command']}`: {status['status']}{': ' + status['reason'][:300] if status['reason'] else ''}", "",
                  "| kernel | implementation | shape | fwd ms | fwd+bwd ms | fwd+bwd TFLOP/s or GB/s | vs matmul or copy ceiling | vs reference | note |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k in doc["kernels"]:
            attention = k.get("kernel") == "attention"
            rate = k.get("forward_backward_tflops" if attention else "forward_backward_gb_per_s")
            ceiling = c.get("matmul_tflops" if attention else "copy_gbs")
            shape = (f"T {k.get('seq_len')}, {k.get('batch')}x{k.get('heads')}x{k.get('head_dim')}" if attention
                     else f"{k.get('rows')}x{k.get('d_model')}")
            lines.append(f"| {k.get('kernel')} | {k.get('implementation')} | {shape} | {_cell(k.get('forward_ms'), '{:.3f}')} | "
                         f"{_cell(k.get('forward_backward_ms'), '{:.3f}')} | {_cell(rate, '{:.1f}')} | "
                         f"{_cell(rate / ceiling if rate is not None and ceiling else None, '{:.2f}')} | "
                         f"{_cell(k.get('forward_backward_vs_cudnn' if attention else 'forward_backward_vs_xla'), '{:.2f}')} | "
                         f"{(k.get('reason') or '')[:120]} |")
    if doc["not_run"]:
        lines += ["", f"## Not run ({len(doc['not_run'])})", ""]
        lines += [f"- {t['key']}: {t['reason']}" for t in doc["not_run"]]
    return "\n".join(lines) + "\n"


def write_atomically(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The command


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m jaxlayouts.gpu_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget_s", type=float, default=480.0,
                        help="wall-clock budget in seconds for the whole call (480)")
    parser.add_argument("--out_dir", default=None,
                        help="where <device>-<date>.md/.json/.jsonl go (docs/results; for --dry-run a new temporary folder)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="CPU, tiny model and shapes: checks the code path, measures nothing")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)  # the child that measures the ceilings
    args = parser.parse_args(argv)
    if not (math.isfinite(args.budget_s) and RESERVE_S < args.budget_s <= 86400):
        parser.error(f"argument --budget_s: {args.budget_s:g}; give seconds above the {RESERVE_S:g} s the kit "
                     "keeps for writing its results, at most a day, e.g. --budget_s 480")
    if args.out_dir is None:  # a dry run's files are no results: keep them out of docs/results
        args.out_dir = tempfile.mkdtemp(prefix="gpu_check-") if args.dry_run else str(CONFIG_DIR.parent / "docs" / "results")
    if pathlib.Path(args.out_dir).exists() and not pathlib.Path(args.out_dir).is_dir():
        parser.error(f"argument --out_dir: {args.out_dir} is a file; give a directory, e.g. --out_dir docs/results")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe(small=args.dry_run)), flush=True)
        return 0
    start = time.monotonic()
    deadline = start + args.budget_s - RESERVE_S
    grid = DRY_RUN if args.dry_run else GPU
    log = lambda message: print(f"[{time.monotonic() - start:5.0f} s] {message}", file=sys.stderr, flush=True)
    header = {"date": datetime.datetime.now(datetime.timezone.utc).date().isoformat(), "dry_run": args.dry_run,
              "command": "PYTHONPATH=. python -m jaxlayouts.gpu_check " + shlex.join(argv),
              "commit": commit(), "versions": versions(), "budget_s": args.budget_s,
              "grid": {k: v for k, v in dataclasses.asdict(grid).items() if k != "prior_s"}}
    log(f"versions: {json.dumps(header['versions'])}")

    found, why = child("jaxlayouts.gpu_check", ["--probe"] + (["--dry-run"] if args.dry_run else []),
                       deadline - time.monotonic())
    if found is None:
        print(f"error: could not measure the device: {why}", file=sys.stderr)
        return 1
    c = found["ceilings"]
    log(f"device {found['device_kind']} ({found['platform']}); ceilings: matmul {c['matmul_tflops']:.4g} TFLOP/s, "
        f"copy {c['copy_gbs']:.4g} GB/s")

    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{slug(found['device_kind'])}-{header['date']}"
    for n in itertools.count(2):  # never overwrite an earlier call's result
        if not (out_dir / f"{stem}.jsonl").exists():
            break
        stem = f"{slug(found['device_kind'])}-{header['date']}-{n}"
    paths = {ext: out_dir / f"{stem}.{ext}" for ext in ("jsonl", "raw.jsonl", "json", "md")}
    results = Results(paths["jsonl"])
    tasks = plan(grid, torch_missing())
    records: list[dict] = []

    def record(item: dict):
        results.append({"key": item.get("key", item["kind"]), **item})
        records.append(item)
        doc = document({**header, "elapsed_s": time.monotonic() - start}, records, tasks)
        write_atomically(paths["md"], markdown(doc))  # the JSON last: once it shows a row, so does the Markdown
        write_atomically(paths["json"], json.dumps(doc, indent=1) + "\n")
        if item["kind"] == "row":
            log(f"{item['key']}: {item['status']}" + (f", {item['step_time_s']:.4f} s/step, "
                f"{item['tokens_per_s']:,.0f} tokens/s" if item["status"] == "ok" else f" ({item['reason']})"))
        elif item["kind"] not in ("probe", "done"):
            log(f"{item['key']}: {item.get('status', item['kind'])} ({item.get('reason') or 'ok'})")

    record({"kind": "probe", **found})
    log(f"{len(tasks)} tasks in priority order; writing {paths['md']}")
    run_tasks(tasks, grid, deadline, lambda t, left: execute(t, left, grid, paths["raw.jsonl"]), record)
    record({"kind": "done", "key": "done"})
    log(f"done: {paths['md']} and {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
