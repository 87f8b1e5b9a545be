"""The planner's memory model against XLA's compiled memory: ``plan validate GRID.jsonl`` on a
file of compiled rows (``plan grid``, ``plan/grid.py``).

For each compiled row the planner predicts the run's memory per device (``cost.memory``, the
busiest pipeline stage) and is compared with XLA's compiled peak (arguments + outputs - aliased
+ temporaries). The planner's total includes ``overhead`` (the runtime outside XLA's program: CUDA
context, NCCL, cuBLAS workspace), which a compiled peak does not, so

    error = (planner total - planner overhead - compiled peak) / compiled peak

is reported: median |error|, its 90th percentile and maximum, overall and per family (pp or not,
ZeRO stage, remat policy, SP, cp). And the fits verdict: XLA fits a layout when its compiled peak
plus the planner's overhead term is at most the usable bytes (``Hardware.usable_bytes``:
``memory_fraction`` of HBM); the planner fits it when its total is. The share of layouts where the
two agree is the agreement.

Every figure here is compiled, not measured on a device: XLA:GPU's deviceless compile was within
1.1% of the H200's measured peak on the 7 llama-1b rows of ``docs/deviceless.md`` (``targets.py``),
which is why it is the reference at cluster scale, where nothing was measured.
"""

from __future__ import annotations

import functools
import math
import json
import pathlib

import numpy as np

from jaxlayouts.layout import InvalidInput, Layout, RunConfig, load_model_config, validate
from jaxlayouts.plan import cost
from jaxlayouts.schema import json_value, read_input, special_file

COMPILED = "compiled"
DEFAULT_GRID = pathlib.Path(__file__).resolve().parents[2] / "docs" / "results" / "h100-memory-grid.jsonl"
"""The committed grid the planner's memory model is validated on (``plan`` prints its error)."""

_model = functools.lru_cache(load_model_config)


def is_grid_file(path: str) -> bool:
    """Whether ``path`` is a file of compiled rows (its first row says it comes from a compile)."""
    if special_file(path):
        return False  # a device or FIFO: the readers refuse it by name
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json_value(line)
                    return isinstance(row, dict) and "compile" in str(row.get("source", ""))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return False


def read_grid_rows(path: str) -> tuple[list[dict], dict]:
    """The compiled rows of a grid file (the last row of a key counts) with their runs, and the
    count of rows by status."""
    latest = {}
    try:
        lines = read_input(path, "file").decode().splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInput("file", f"{path}: cannot read it ({error})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json_value(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill during a write
        except ValueError as error:  # nested past the bound
            raise InvalidInput("file", f"{path}:{number}: {error}") from None
        if not isinstance(row, dict) or not isinstance(row.get("status"), str):
            raise InvalidInput("file", f"{path}:{number}: not a grid row (no status)")
        key = row.get("key", number)
        latest[key if isinstance(key, (str, int)) else number] = (number, row)
    statuses, rows, compiled_for = {}, [], set()
    for number, row in latest.values():
        statuses[row["status"]] = statuses.get(row["status"], 0) + 1
        if row["status"] != COMPILED:
            continue
        memory = row.get("memory")
        peak = memory.get("compiled_peak_bytes") if isinstance(memory, dict) else None
        if not isinstance(peak, (int, float)) or isinstance(peak, bool) or not math.isfinite(peak) or peak <= 0:
            raise InvalidInput("file", f"{path}:{number}: a compiled row needs memory.compiled_peak_bytes, a positive "
                               f"number of bytes; got {peak!r:.40}")
        try:
            run = RunConfig(model=_model(row["model"]), layout=Layout.parse(row["layout"]), seq_len=row["seq_len"],
                            global_batch=row["global_batch"], dtype=row.get("dtype", "bfloat16"))
            validate(run, run.layout.num_devices, platform="gpu")
        except (KeyError, TypeError, AttributeError, ValueError) as error:
            detail = str(error) if isinstance(error, InvalidInput) else f"{type(error).__name__}: {error}"
            raise InvalidInput("file", f"{path}:{number}: not a compiled grid row with model, layout, seq_len and "
                               f"global_batch ({detail[:200]})") from None
        compiled_for.add(str(row.get("target")))
        rows.append({**row, "_run": run, "_peak": float(peak)})
    if len(compiled_for) > 1:
        raise InvalidInput("file", f"{path}: rows compiled for several targets ({', '.join(sorted(compiled_for))}); "
                           "validate one target's grid at a time")
    return rows, statuses


def families(run: RunConfig) -> dict:
    """The families a row is reported in."""
    lay = run.layout
    pp = lay.mesh["pp"]
    return {"pp": f"pp>1 ({lay.pipeline_schedule})" if pp > 1 else "pp=1", "zero": f"zero={lay.zero}",
            "remat": f"remat={lay.remat}", "sp": f"sp={int(lay.sequence_parallel)}",
            "cp": "cp>1" if lay.mesh["cp"] > 1 else "cp=1"}


def summary(errors: list[float]) -> dict:
    """Median, 90th percentile and max of |error|, and the median signed error."""
    a = np.abs(errors)
    return {"layouts": len(errors), "median_abs": float(np.median(a)), "p90_abs": float(np.percentile(a, 90)),
            "max_abs": float(a.max()), "median_signed": float(np.median(errors))}


def evaluate_grid(rows: list[dict], hw) -> dict:
    """Memory error and fits agreement of the planner against the compiled rows (module docstring)."""
    if not rows:
        raise InvalidInput("file", "no compiled rows to validate against")
    per_row = []
    for row in rows:
        p = cost.predict(cost.Workload.from_run(row["_run"]), hw)
        m = p.memory_bytes
        error = (m["total"] - m["overhead"] - row["_peak"]) / row["_peak"]
        xla_fits = row["_peak"] + m["overhead"] <= p.usable_bytes
        per_row.append({"layout": row["layout"], "model": row["model"], "seq_len": row["seq_len"],
                        "compiled_peak_gib": row["_peak"] / cost.GIB,
                        "planner_gib": (m["total"] - m["overhead"]) / cost.GIB, "error": error,
                        "xla_fits": xla_fits, "planner_fits": p.fits, "families": families(row["_run"])})
    errors = [r["error"] for r in per_row]
    result = {"layouts": len(per_row), "memory": summary(errors),
              "fits_agreement": float(np.mean([r["xla_fits"] == r["planner_fits"] for r in per_row])),
              "xla_fits": sum(r["xla_fits"] for r in per_row),
              "planner_fits_xla_not": sum(r["planner_fits"] and not r["xla_fits"] for r in per_row),
              "xla_fits_planner_not": sum(r["xla_fits"] and not r["planner_fits"] for r in per_row),
              "usable_gib": hw.usable_bytes / cost.GIB, "families": {}}
    for kind in ("pp", "zero", "remat", "sp", "cp"):
        names = sorted({r["families"][kind] for r in per_row})
        result["families"][kind] = {n: summary([r["error"] for r in per_row if r["families"][kind] == n])
                                    for n in names}
    result["worst"] = sorted(per_row, key=lambda r: -abs(r["error"]))[:10]
    return result


def report(path: str, result: dict, statuses: dict, hw) -> str:
    """The text report of ``evaluate_grid``."""
    pct = lambda v: f"{v:.1%}"
    m = result["memory"]
    others = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()) if s != COMPILED)
    lines = [f"{path}: {result['layouts']} compiled layouts (XLA's compiled peak, not measured on a device)"
             + (f"; not compiled: {others}" if others else ""),
             f"planner memory (without its {hw.calibration.overhead_gib:g} GiB overhead term) vs compiled peak: "
             f"median |error| {pct(m['median_abs'])}, p90 {pct(m['p90_abs'])}, max {pct(m['max_abs'])} "
             f"(median signed {m['median_signed']:+.1%})",
             f"fits verdict agrees on {pct(result['fits_agreement'])} of layouts (XLA fits when compiled peak + "
             f"overhead <= {result['usable_gib']:.1f} GiB usable on {hw.name}: {result['xla_fits']} of "
             f"{result['layouts']}); planner fits where XLA does not: {result['planner_fits_xla_not']}, "
             f"the reverse: {result['xla_fits_planner_not']}",
             f"{'family':<24} {'layouts':>7} {'median':>7} {'p90':>7} {'max':>7} {'signed':>7}"]
    for kind, table in result["families"].items():
        for name, s in table.items():
            lines.append(f"{name:<24} {s['layouts']:>7} {pct(s['median_abs']):>7} {pct(s['p90_abs']):>7} "
                         f"{pct(s['max_abs']):>7} {s['median_signed']:>+7.1%}")
    lines.append("largest errors:")
    for r in result["worst"]:
        lines.append(f"  {r['error']:+7.1%}  compiled {r['compiled_peak_gib']:6.2f} GiB, planner {r['planner_gib']:6.2f}"
                     f"  {r['model']} T={r['seq_len']} {r['layout']}")
    return "\n".join(lines)


def validated_error(hw, path: str = str(DEFAULT_GRID)) -> str | None:
    """One line for ``plan``'s header: the memory error of the model against the committed grid."""
    if not pathlib.Path(path).is_file():
        return None
    try:
        rows, _ = read_grid_rows(path)
        m = evaluate_grid(rows, hw)
    except (InvalidInput, KeyError, ValueError):
        return None
    shown = pathlib.Path(path)
    try:
        shown = shown.relative_to(pathlib.Path(__file__).resolve().parents[2])
    except ValueError:
        pass
    s = m["memory"]
    return (f"memory: median {s['median_abs']:.1%}, p90 {s['p90_abs']:.1%} vs XLA:GPU compiled peaks of "
            f"{m['layouts']} H100 layouts with scanned layers ({shown}), fits agreement {m['fits_agreement']:.1%}")
