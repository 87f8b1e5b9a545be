"""Turn sweep results into a markdown report and the reference study's figures.

    python -m jaxlayouts.report results/cpu_smoke.jsonl --out reports/cpu_smoke/
    python -m jaxlayouts.report ../shared/paper-data/calibration_runs.csv --out reports/paper/

Reads our sweep JSONL, or a CSV in the reference study's published format (columns ``sweep,
model, seq_len, world_size, micro_batch_size, tp, pp, sequence_parallel,
activation_checkpointing, kernel, status, step_time_s, mfu``), so the study's figures can be
redrawn beside ours with the same code. Rows are grouped by sweep; the metric is MFU where the
rows have one, else model TFLOP/s per device (CPU runs have no peak, hence no MFU).
"""

from __future__ import annotations

import argparse
import collections
import csv
import io
import json
import math
import pathlib
import sys

import matplotlib

from jaxlayouts.plan.validate import REQUIRED as STUDY_COLUMNS
from jaxlayouts.plan.validate import check_study_row
from jaxlayouts.schema import InvalidInput, creatable, json_value, read_input, refuse_special
from jaxlayouts.sweep import STATUSES, cpu_caveat

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

Row = dict
FIGURES = {
    # file name: (row field, axis label, title)
    "by_kernel.png": ("kernel", "attention / norm kernel", "by kernel"),
    "by_checkpointing.png": ("remat", "activation checkpointing (remat)", "with and without activation checkpointing"),
    "by_micro_batch.png": ("micro_batch", "micro-batch size", "by micro-batch size"),
    "by_sequence_parallel.png": ("sequence_parallel", "sequence parallelism", "with and without sequence parallelism"),
}


# ---------------------------------------------------------------------------------------------
# Reading


def load(path: str | pathlib.Path) -> list[Row]:
    """Rows with the common fields: group, layout, status, error, metric inputs and knobs."""
    path = pathlib.Path(path)
    refuse_special(path, "results", "results/sweep.jsonl")
    if not path.is_file():
        raise FileNotFoundError(f"no results file {path}")
    if path.suffix == ".csv":
        try:
            text = read_input(path, "results").decode()
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not a UTF-8 text file; give a sweep's JSONL or the study's CSV") from None
        reader = csv.DictReader(io.StringIO(text, newline=""))
        missing = [c for c in STUDY_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{path}: no column {', '.join(map(repr, missing))}; expected the reference "
                             "study's columns (see ../shared/paper-data/README.md)")
        rows = list(reader)
        for n, r in enumerate(rows, 2):
            check_study_row(r, f"{path}:{n}")
        return [_line(path, n, lambda: _checked(_from_study(r))) for n, r in enumerate(rows, 2)]
    try:
        text = read_input(path, "results").decode()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a UTF-8 text file; give a sweep's JSONL or the study's CSV") from None
    rows = {}
    for number, line in enumerate(text.splitlines(), 1):
        try:
            row = json_value(line)
        except json.JSONDecodeError:
            continue  # a line torn by a kill during a write
        except ValueError as error:  # nested past the bound
            raise ValueError(f"{path}:{number}: {error}") from None
        if not isinstance(row, dict) or "status" not in row:
            raise ValueError(f"{path}:{number} is not a bench or sweep result (no 'status' field)")
        checked = _line(path, number, lambda: _checked(_from_bench(row)))
        rows[row.get("key", number)] = checked  # a retried point's later row replaces its earlier one
    return list(rows.values())


def _line(path: pathlib.Path, number: int, read):
    """``read()``, with a bad value reported as a ValueError that names the file and line."""
    try:
        return read()
    except KeyError as missing:
        raise ValueError(f"{path}: no column {missing}; expected the reference study's columns "
                         "(see ../shared/paper-data/README.md)") from None
    except (ValueError, TypeError) as error:
        raise ValueError(f"{path}:{number}: {error}") from None


def _checked(row: Row) -> Row:
    """``row`` if its measured fields are numbers (or null) and its sizes non-negative, else
    ValueError naming the field. A row that measured nothing (invalid, error, timeout) may hold
    the bad values that made it fail: those read as null, and the row still counts."""
    measured = row["status"] in ("ok", "oom")
    for field in ("step_time_s", "mfu", "tflops_per_device", "memory_bytes", "cp", "tp", "pp", "num_devices",
                  "micro_batch", "seq_len"):
        value = row[field]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            if not measured:
                row[field] = None
                continue
            raise ValueError(f"{field} is {value!r}; a result gives a non-negative number or null")
    if row["mfu"] is not None and row["mfu"] > 1:
        raise ValueError(f"mfu is {row['mfu']!r}; MFU is a fraction of the peak, at most 1")
    if row["status"] == "ok" and row["step_time_s"] is not None and row["step_time_s"] <= 0:
        raise ValueError(f"step_time_s is {row['step_time_s']!r} in a row that ran; a measured step takes "
                         "time (a positive number of seconds)")
    return row


RESULT_FIELD_TYPES = {"status": str, "key": str, "sweep": str, "model": str, "layout": str, "error": str,
                      "memory": dict, "point": dict, "mesh": (dict, str)}
"""What a bench or sweep row holds in the fields the report reads (null aside)."""


def _from_bench(r: dict) -> Row:
    for field, kind in RESULT_FIELD_TYPES.items():
        if r.get(field) is not None and not isinstance(r[field], kind):
            raise ValueError(f"{field} is {r[field]!r}, not what a result row holds there")
    if r["status"] not in STATUSES:
        raise ValueError(f"status {r['status']!r} is not one of {', '.join(STATUSES)}")
    mesh = r.get("mesh") if isinstance(r.get("mesh"), dict) else {}
    point = r.get("point") or {}
    kernel = r.get("attention", point.get("attention", "xla"))
    if r.get("norm"):
        kernel = f"{kernel}+{r['norm']}"
    return {
        "group": r.get("sweep") or f"{r.get('model')} seq {r.get('seq_len')}",
        "source": "jaxlayouts", "model": r.get("model", point.get("model")),
        "seq_len": r.get("seq_len", point.get("seq_len")), "num_devices": r.get("num_devices"),
        "layout": r.get("layout") or _point_text(point), "status": r["status"], "error": r.get("error"),
        "cp": mesh.get("cp", 1), "tp": mesh.get("tp"), "pp": mesh.get("pp"), "micro_batch": r.get("micro_batch", point.get("micro_batch")),
        "remat": r.get("remat", point.get("remat")), "kernel": kernel,
        "sequence_parallel": r.get("sequence_parallel", point.get("sequence_parallel")),
        "step_time_s": r.get("step_time_s"), "mfu": r.get("mfu"),
        "tflops_per_device": r.get("model_tflops_per_device"),
        "memory_bytes": (r.get("memory") or {}).get("compiled_peak_bytes_per_device"),
        "platform": r.get("platform"), "steps": r.get("steps"),
    }


def _point_text(point: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(point.items()))


def _from_study(r: dict) -> Row:
    number = lambda v: float(v) if v not in ("", None) else None
    tp, pp, world = int(r["tp"]), int(r["pp"]), int(r["world_size"])
    if min(tp, pp, world) < 1 or world % (tp * pp):
        raise ValueError(f"tp={tp}, pp={pp}, world_size={world}: sizes are positive and tp x pp divides world_size")
    remat = "full" if r["activation_checkpointing"] == "every_layer" else "none"
    sp = r["sequence_parallel"] == "True"
    return {
        "group": r["sweep"], "source": "reference study", "model": r["model"], "seq_len": int(r["seq_len"]),
        "num_devices": world, "status": r["status"], "error": None,
        "layout": f"dp={world // (tp * pp)},tp={tp},pp={pp} mbs={r['micro_batch_size']} sp={int(sp)} "
                  f"remat={remat} kernel={r['kernel']}",
        "cp": 1, "tp": tp, "pp": pp, "micro_batch": int(r["micro_batch_size"]), "remat": remat,
        "kernel": r["kernel"], "sequence_parallel": sp, "step_time_s": number(r["step_time_s"]),
        "mfu": number(r["mfu"]), "tflops_per_device": number(r.get("tflops_megatron")), "memory_bytes": None,
        "platform": "gpu", "steps": None,
    }


def metric_of(rows: list[Row]) -> tuple[str, str]:
    """MFU when the ok rows have it, else model TFLOP/s per device."""
    if any(r["mfu"] is not None for r in rows if r["status"] == "ok"):
        return "mfu", "MFU"
    return "tflops_per_device", "model TFLOP/s per device"


# ---------------------------------------------------------------------------------------------
# Markdown


def cell(value, code: bool = False, limit: int | None = None) -> str:
    """``value`` as one Markdown table cell: a ``|`` escaped, line breaks as spaces, and (as code)
    no backtick that could end the span early; cut to ``limit`` characters."""
    text = " ".join(str(value if value is not None else "").split())
    text = text[:limit] if limit else text
    if code:
        return f"`{text.replace('`', chr(39))}`".replace("|", "\\|")
    return text.replace("|", "\\|")


def markdown(rows: list[Row], source: str, figures: list[str]) -> str:
    key, label = metric_of(rows)
    fmt = lambda v: "" if v is None else (f"{100 * v:.1f}%" if key == "mfu" else f"{v:.4g}")
    groups = _groups(rows)
    lines = ["# Sweep report", "", f"Source: {cell(source, code=True)} ({len(rows)} rows, "
             f"{sum(r['status'] == 'ok' for r in rows)} ok). Metric: {label}.", ""]
    caveat = cpu_caveat(rows)
    if caveat:
        lines += [f"**Caveat:** {caveat}.", ""]
    lines += ["## Outcomes by status", "", "| group | " + " | ".join(_statuses(rows)) + " |",
              "| --- |" + " --- |" * len(_statuses(rows))]
    for group, members in groups.items():
        counts = collections.Counter(r["status"] for r in members)
        lines.append(f"| {cell(group)} | " + " | ".join(str(counts.get(s, 0)) for s in _statuses(rows)) + " |")
    lines += ["", "## Best layout per group", "", *(["(CPU emulation: see the caveat above.)", ""] if caveat else []),
              f"| group | layout | {label} | step time (s) |",
              "| --- | --- | --- | --- |"]
    for group, members in groups.items():
        ok = [r for r in members if r["status"] == "ok" and r[key] is not None]
        if ok:
            best = max(ok, key=lambda r: r[key])
            lines.append(f"| {cell(group)} | {cell(best['layout'], code=True)} | {fmt(best[key])} | "
                         f"{best['step_time_s']:.4g} |")
        else:
            lines.append(f"| {cell(group)} | no layout ran | | |")
    lines += ["", f"## All runs, by {label}", "", *(["(CPU emulation: see the caveat above.)", ""] if caveat else []),
              f"| group | layout | status | {label} | step time (s) | compiled peak (GiB) | error |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    ordered = sorted(rows, key=lambda r: (r["status"] != "ok", -(r[key] or 0)))
    for r in ordered:
        error = cell(r["error"], limit=160)
        memory = f"{r['memory_bytes'] / 2**30:.3f}" if r["memory_bytes"] else ""
        step = f"{r['step_time_s']:.4g}" if r["step_time_s"] is not None else ""
        lines.append(f"| {cell(r['group'])} | {cell(r['layout'], code=True)} | {r['status']} | {fmt(r[key])} | {step} | "
                     f"{memory} | {error} |")
    if figures:
        lines += ["", "## Figures", ""] + [f"![{name}]({name})" for name in figures]
    return "\n".join(lines) + "\n"


def _groups(rows: list[Row]) -> dict[str, list[Row]]:
    groups: dict[str, list[Row]] = {}
    for r in rows:
        groups.setdefault(r["group"], []).append(r)
    return groups


def _statuses(rows: list[Row]) -> list[str]:
    order = ["ok", "oom", "invalid", "compile_error", "timeout", "error", "unavailable"]
    present = {r["status"] for r in rows}
    return [s for s in order if s in present] + sorted(present - set(order))


# ---------------------------------------------------------------------------------------------
# Figures


def _best(rows: list[Row], key: str):
    values = [r[key] for r in rows if r["status"] == "ok" and r[key] is not None]
    return max(values) if values else None


def _panels(n: int):
    cols = min(n, 3)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(max(6.4, 4.6 * cols), 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def _scale(key: str):
    return (lambda v: 100 * v) if key == "mfu" else (lambda v: v)


def _value_text(value: float, key: str) -> str:
    return f"{value:.1f}" if key == "mfu" else f"{value:.3g}"


def _best_label(key: str, label: str) -> str:
    return "best MFU (%)" if key == "mfu" else f"best {label}"


def _commonest_status(rows: list[Row]) -> str:
    return collections.Counter(r["status"] for r in rows).most_common(1)[0][0] if rows else ""


def _save(fig, path: pathlib.Path, title: str, rows: list[Row]):
    """Title (marked when its timings are CPU emulation's), lay out, write and close ``fig``."""
    fig.suptitle(title + ("\n(emulated CPU devices: not GPU timings, differences may be noise)"
                          if cpu_caveat(rows) else ""), fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def knob_figure(rows: list[Row], field: str, xlabel: str, title: str, path: pathlib.Path) -> bool:
    """Bars of the best metric per value of ``field``, one panel per group; values where no run
    succeeded are marked with the commonest failure."""
    key, label = metric_of(rows)
    scale = _scale(key)
    groups = {g: m for g, m in _groups(rows).items() if len({r[field] for r in m}) > 1}
    if not groups:
        return False
    fig, axes = _panels(len(groups))
    for ax, (group, members) in zip(axes, groups.items()):
        values = sorted({r[field] for r in members}, key=str)
        best = [_best([r for r in members if r[field] == v], key) for v in values]
        xs = range(len(values))
        ax.bar(xs, [scale(b) if b is not None else 0 for b in best], color="#4c72b0")
        top = max((scale(b) for b in best if b is not None), default=1)
        for x, v, b in zip(xs, values, best):
            if b is None:
                ax.text(x, 0.02 * top, _commonest_status([r for r in members if r[field] == v]),
                        ha="center", va="bottom", rotation=90)
            else:
                ax.text(x, scale(b), _value_text(scale(b), key), ha="center", va="bottom", fontsize=8)
        long = max(len(str(v)) for v in values) > 6
        ax.set_xticks(list(xs), [str(v) for v in values], rotation=30 if long else 0,
                      ha="right" if long else "center", fontsize=8)
        ax.set_title(group, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(_best_label(key, label))
        ax.set_ylim(0, top * 1.18)
    _save(fig, path, f"{label} {title}", rows)
    return True


def tp_pp_figure(rows: list[Row], path: pathlib.Path) -> bool:
    """Heatmap of the best metric over tensor- x pipeline-parallel degree, one panel per group."""
    key, label = metric_of(rows)
    scale = _scale(key)
    groups = {g: m for g, m in _groups(rows).items() if len({(r["tp"], r["pp"]) for r in m}) > 1}
    if not groups:
        return False
    fig, axes = _panels(len(groups))
    for ax, (group, members) in zip(axes, groups.items()):
        tps = sorted({r["tp"] for r in members if r["tp"] is not None})
        pps = sorted({r["pp"] for r in members if r["pp"] is not None})
        grid = [[_best([r for r in members if r["tp"] == tp and r["pp"] == pp], key) for tp in tps] for pp in pps]
        values = [[scale(v) if v is not None else float("nan") for v in row] for row in grid]
        image = ax.imshow(values, cmap="viridis", origin="lower", aspect="auto")
        for i, pp in enumerate(pps):
            for j, tp in enumerate(tps):
                ran = grid[i][j] is not None
                text = (_value_text(values[i][j], key) if ran else
                        _commonest_status([r for r in members if r["tp"] == tp and r["pp"] == pp]))
                ax.text(j, i, text, ha="center", va="center", color="w" if ran else "k", fontsize=8)
        ax.set_xticks(range(len(tps)), [str(t) for t in tps])
        ax.set_yticks(range(len(pps)), [str(p) for p in pps])
        ax.set_xlabel("tensor-parallel degree")
        ax.set_ylabel("pipeline-parallel degree")
        ax.set_title(group, fontsize=9)
        fig.colorbar(image, ax=ax, label=_best_label(key, label))
    _save(fig, path, f"{label} by tensor- and pipeline-parallel degree", rows)
    return True


def scaling_figure(rows: list[Row], path: pathlib.Path) -> bool:
    """Best step time against device count, per model and sequence length with several counts."""
    series = collections.defaultdict(dict)
    for r in rows:
        if r["status"] == "ok" and r["step_time_s"] is not None and r["num_devices"]:
            name = f"{r['model']} seq {r['seq_len']} ({r['source']})"
            current = series[name].get(r["num_devices"])
            series[name][r["num_devices"]] = min(current, r["step_time_s"]) if current else r["step_time_s"]
    series = {k: v for k, v in series.items() if len(v) > 1}
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, points in sorted(series.items()):
        counts = sorted(points)
        ax.plot(counts, [points[c] for c in counts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
    ax.set_xticks(sorted({c for points in series.values() for c in points}))
    ax.set_xlabel("devices")
    ax.set_ylabel("best step time (s)")
    ax.legend(fontsize=8)
    _save(fig, path, "Step-time scaling across device counts", rows)
    return True


def write_report(sources, out: str | pathlib.Path) -> list[str]:
    """Write ``report.md`` and the figures into ``out`` from one results file or several (a job
    array's per-point files); returns the figure file names."""
    sources = [sources] if isinstance(sources, (str, pathlib.Path)) else list(sources)
    rows = [row for source in sources for row in load(source)]
    source = ", ".join(str(s) for s in sources) if len(sources) <= 3 else f"{len(sources)} files"
    if not rows:
        raise ValueError(f"{source} holds no result rows")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    made = [name for name, (field, xlabel, title) in FIGURES.items()
            if knob_figure(rows, field, xlabel, title, out / name)]
    if tp_pp_figure(rows, out / "tp_pp_heatmap.png"):
        made.append("tp_pp_heatmap.png")
    if scaling_figure(rows, out / "step_time_scaling.png"):
        made.append("step_time_scaling.png")
    (out / "report.md").write_text(markdown(rows, str(source), made))
    return made


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxlayouts.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", help="sweep JSONL file(s), or a CSV in the reference study's format")
    parser.add_argument("--out", required=True, help="folder for report.md and the PNG figures")
    args = parser.parse_args(argv)
    out = pathlib.Path(args.out)
    if not args.out.strip() or out.exists() and not out.is_dir() or not creatable(out):
        print(f"error: --out: {args.out!r} is not a folder this can write; give one, e.g. --out reports/sweep/",
              file=sys.stderr)
        return 2
    try:
        made = write_report(args.results, args.out)
    except (OSError, ValueError, InvalidInput) as error:  # a missing or unreadable file, or not results
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {pathlib.Path(args.out) / 'report.md'} and {len(made)} figures: {', '.join(made)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
