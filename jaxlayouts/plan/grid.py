"""Compile a grid of layouts for a target and record XLA's memory for each: the reference the
planner's memory model is held to (``plan validate GRID.jsonl``).

    python -m jaxlayouts.plan grid configs/grids/h100-memory.yaml --target h100-80gb \\
        --out docs/results/h100-memory-grid.jsonl

A grid file (YAML) is a list of groups under ``groups:``. Each group names a ``model``,
``seq_len``, ``global_batch`` (and optionally ``dtype``, default bfloat16) and its layouts, as
text forms under ``layouts:`` and/or as a product under ``base:`` + ``vary:``: ``base`` is a
layout's text form, ``vary`` maps a text key (``mesh``, ``zero``, ``remat``, ``attn``, ``mbs``,
``sp``, ``pipe``, ``vstages``, ...) to the values to try; every combination is one layout. A
value may set several keys at once: ``"pipe=circular vstages=2"``. Duplicates are dropped.

Every layout is compiled in this one process (JAX starts once): its training step, unchanged, for
the target's devices (``analysis/compiled.compile_step``; a GPU target is a deviceless XLA:GPU
compile, ``targets.py``). Each is one JSON line appended to ``--out``: the run's fields as bench
rows have them (model, layout text, seq_len, global_batch, dtype, status), XLA's memory
analysis (``memory.compiled_peak_bytes`` and its argument, output, alias and temp bytes), the
compile seconds, the planner's memory terms at this commit (``planner_memory_gib``), the jax and
jaxlib versions, the commit and ``"source": "XLA:GPU deviceless compile"`` (XLA:CPU for
``--target cpu``). A layout that does not validate is a row with ``status: invalid``, one that does
not compile a row with ``status: error``; both carry the error. Status ``compiled`` means compiled:
these peaks are the compiler's buffer assignment, never a measurement on a device.

The file is append-only and resumable: a key (model, layout, seq_len, global_batch, dtype, target)
already in it is skipped (``--retry_errors`` compiles its failed ones again; the newer row counts).
"""

from __future__ import annotations

import dataclasses
import gc
import importlib.metadata
import itertools
import pathlib
import sys
import time

from jaxlayouts import targets
from jaxlayouts.layout import InvalidInput, Layout, RunConfig, load_model_config, validate
from jaxlayouts.plan import cost
from jaxlayouts.results import Results, commit
from jaxlayouts.schema import load_yaml

SOURCE = {True: "XLA:GPU deviceless compile", False: "XLA:CPU compile (emulated devices)"}
GROUP_KEYS = {"model", "seq_len", "global_batch", "dtype", "layouts", "base", "vary", "note"}


@dataclasses.dataclass(frozen=True)
class Point:
    """One layout of a grid: what is compiled, and the note of its group."""

    model: str
    layout: str          # the canonical text form (str(Layout))
    seq_len: int
    global_batch: int
    dtype: str
    note: str | None = None

    def key(self, target: str) -> str:
        return f"{self.model}|{self.layout}|T={self.seq_len}|B={self.global_batch}|{self.dtype}|{target}"

    def run(self) -> RunConfig:
        return RunConfig(model=load_model_config(self.model), layout=Layout.parse(self.layout),
                         seq_len=self.seq_len, global_batch=self.global_batch, dtype=self.dtype)


def _texts(group: dict) -> list[str]:
    """A group's layout texts: its ``layouts`` and the product of ``base`` over ``vary``."""
    texts = group.get("layouts") or []
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise TypeError("layouts is not a list of layout texts")
    texts = list(texts)
    if "base" in group:
        if not isinstance(group["base"], str) or not group["base"].split():
            raise TypeError("base is not a layout text")
        if not isinstance(group.get("vary") or {}, dict) or not all(
                isinstance(v, list) for v in (group.get("vary") or {}).values()):
            raise TypeError("vary is not a mapping of lists")
        mesh, *rest = str(group["base"]).split()
        base = {"mesh": mesh, **dict(item.split("=", 1) for item in rest)}
        vary = group.get("vary") or {}
        for combo in itertools.product(*([(k, v) for v in values] for k, values in vary.items())):
            fields = dict(base)
            for key, value in combo:
                if key == "mesh":
                    fields["mesh"] = str(value)
                    continue
                for item in str(value).split():
                    k, _, v = item.partition("=")
                    fields[k if v else key] = v if v else k
            texts.append(" ".join([fields.pop("mesh"), *(f"{k}={v}" for k, v in fields.items())]))
    return texts


def read_grid(path: str) -> list[Point]:
    """The grid's points in file order, each layout in its canonical text form, without repeats."""
    spec = load_yaml(pathlib.Path(path), "grid")  # bounded: size, aliases, nesting, special files
    groups = spec.get("groups") if isinstance(spec, dict) else None
    if not isinstance(groups, list) or not groups:
        raise InvalidInput("grid", f"{path}: expected a mapping with a list 'groups:' of layout groups")
    points, seen = [], set()
    for number, group in enumerate(groups, 1):
        unknown = set(group) - GROUP_KEYS if isinstance(group, dict) else {"(not a mapping)"}
        if unknown or not {"model", "seq_len", "global_batch"} <= set(group):
            raise InvalidInput("grid", f"{path}: group {number} needs model, seq_len and global_batch "
                               f"(unknown keys: {sorted(unknown)})")
        for number_field in ("seq_len", "global_batch"):
            value = group[number_field]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidInput("grid", f"{path}: group {number}: {number_field} {value!r:.40} is not a positive "
                                   f"integer; e.g. {number_field}: 2048")
        if not isinstance(group["model"], str) or not isinstance(group.get("dtype", "bfloat16"), str):
            raise InvalidInput("grid", f"{path}: group {number}: model and dtype are names, e.g. model: llama-7b")
        try:
            texts = _texts(group)
        except (ValueError, TypeError, AttributeError):
            raise InvalidInput("grid", f"{path}: group {number}: base must be a layout text (\"fsdp=8,tp=2 mbs=1\"), "
                               "vary a mapping of lists ({zero: [1, 3]}), layouts a list of layout texts") from None
        for text in texts:
            point = Point(group["model"], str(Layout.parse(text)), group["seq_len"],
                          group["global_batch"], group.get("dtype", "bfloat16"), group.get("note"))
            same = (point.model, point.layout, point.seq_len, point.global_batch, point.dtype)
            if same not in seen:
                seen.add(same)
                points.append(point)
    if not points:
        raise InvalidInput("grid", f"{path}: its groups declare no layout; give each 'layouts:' or 'base:'")
    return points


def versions() -> dict:
    """jax and jaxlib versions and the checkout's commit (``+dirty`` with uncommitted changes)."""
    return {"jax_version": importlib.metadata.version("jax"), "jaxlib_version": importlib.metadata.version("jaxlib"),
            "commit": commit()}


def planner_terms(run: RunConfig, hw) -> dict:
    """The planner's memory terms (GiB per device, the busiest stage) and its fit."""
    p = cost.predict(cost.Workload.from_run(run), hw)
    return {"planner_memory_gib": {k: v / cost.GIB for k, v in p.memory_bytes.items()}, "planner_fits": p.fits,
            "usable_gib": p.usable_bytes / cost.GIB}


def aborted_row(point: Point, target, meta: dict) -> dict:
    """The row of a point whose compile ended the process (an XLA check failure aborts it): found
    by the marker a rerun sees, so the grid records it and moves on."""
    return {"key": point.key(target.name), "model": point.model, "layout": point.layout, "seq_len": point.seq_len,
            "global_batch": point.global_batch, "dtype": point.dtype, "target": target.name,
            "source": SOURCE[target.is_gpu], **meta, "status": "error",
            "error": "the compile aborted the process (an XLA check failure; its message is in the run's stderr)"}


def row_of(point: Point, target, hw, meta: dict) -> dict:
    """Compile one point and describe it as a grid row (never raises for the layout's own faults)."""
    from jaxlayouts.analysis.compiled import compile_step

    run, lay = None, None
    row = {"key": point.key(target.name), "model": point.model, "layout": point.layout, "seq_len": point.seq_len,
           "global_batch": point.global_batch, "dtype": point.dtype, "target": target.name,
           "source": SOURCE[target.is_gpu], **meta}
    try:
        run = point.run()
        lay = run.layout
        row.update(mesh=lay.mesh, num_devices=lay.num_devices, micro_batch=lay.micro_batch,
                   grad_accum_steps=run.grad_accum_steps, zero=lay.zero, sequence_parallel=lay.sequence_parallel,
                   remat=lay.remat, attention=lay.attention, norm=lay.norm)
        if lay.mesh["pp"] > 1:
            row.update(pipeline_schedule=lay.pipeline_schedule, virtual_stages=lay.virtual_stages)
        validate(run, lay.num_devices, platform="gpu" if target.is_gpu else "cpu")
        row.update(planner_terms(run, hw))
    except InvalidInput as error:
        return {**row, "status": "invalid", "error": str(error)}
    start = time.perf_counter()
    try:
        devices = targets.devices(target, lay.num_devices) if target.is_gpu else None
        step = compile_step(run, devices)
        memory = step.memory
        row.update(status="compiled", device_kind=step.device_kind, compile_s=round(time.perf_counter() - start, 2),
                   memory={"compiled_peak_bytes": memory["compiled_peak_bytes_per_device"],
                           **{k: memory[k] for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes")
                              if k in memory}})
        if step.note:
            row["compiled_as"] = step.note
    except Exception as error:  # noqa: BLE001 - every failure is a row: XLA raises its own error types
        row.update(status="error", compile_s=round(time.perf_counter() - start, 2),
                   error=f"{type(error).__name__}: {str(error)[:2000]}")
    finally:
        import jax
        jax.clear_caches()
        gc.collect()
    return row


def run_grid(path: str, target_name: str, out: str, hw=None, retry_errors: bool = False, log=None) -> dict:
    """Compile every point of the grid not yet in ``out`` (see the module docstring); returns counts."""
    log = log or (lambda text: print(text, file=sys.stderr, flush=True))
    target = targets.resolve(target_name)
    hw = target.hardware if target.is_gpu else hw
    if hw is None:
        raise InvalidInput("hardware", "a cpu grid needs a hardware for the planner's terms, e.g. --hardware h100-80gb")
    points = read_grid(path)
    results = Results(out, knob="out").create()
    done = {k for k, r in results.rows.items() if r.get("status") != "error" or not retry_errors}
    todo = [p for p in points if p.key(target.name) not in done]
    log(f"grid {path}: {len(points)} layouts, {len(points) - len(todo)} already in {out}, {len(todo)} to compile "
        f"for {target.name}")
    counts = {"points": len(points), "skipped": len(points) - len(todo), "compiled": 0, "error": 0, "invalid": 0}
    if not todo:
        return counts
    largest = max(p.run().layout.num_devices for p in todo)
    targets.prepare(target, largest)
    meta = versions()
    began = time.perf_counter()
    marker = pathlib.Path(out + ".compiling")
    for i, point in enumerate(todo, 1):
        if marker.is_file() and marker.read_text() == point.key(target.name):
            row = aborted_row(point, target, meta)
        else:
            marker.write_text(point.key(target.name))  # if XLA aborts the process, the rerun records why
            row = row_of(point, target, hw, meta)
        results.append(row)
        marker.unlink(missing_ok=True)
        counts[row["status"]] += 1
        what = (f"{row['memory']['compiled_peak_bytes'] / cost.GIB:.2f} GiB compiled peak, planner "
                f"{row['planner_memory_gib']['total']:.2f} GiB" if row["status"] == "compiled"
                else row["error"][:200])
        log(f"[{i}/{len(todo)}] {row['status']} {point.model} {point.layout} T={point.seq_len}: {what} "
            f"({row.get('compile_s', 0):.1f} s; {time.perf_counter() - began:.0f} s so far)")
    return counts
