"""The deviceless XLA:GPU compile held to the device: compile every bench row measured on a GPU
for that GPU's target (``targets.py``) and compare XLA:GPU's compiled peak with the device's
measured peak (``memory.device_peak_bytes``, JAX's ``peak_bytes_in_use``)::

    python -m jaxlayouts.target_check configs/hardware/measured/h200-2026-11-30.jsonl \\
        --markdown docs/results/deviceless-h200.md

The compiled peak is arguments + outputs - aliased + temporaries of XLA's buffer assignment
(``analysis/memory.py``); the error is (compiled - measured) / measured. Rows measured ok with a
device peak are compared; others are skipped. Exit 0; 2 for bad input; 5 when the table cannot be
written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time

from jaxlayouts import targets
from jaxlayouts.kernels.triton_versions import installed
from jaxlayouts.layout import validate
from jaxlayouts.results import commit
from jaxlayouts.schema import InvalidInput, creatable

GIB = 2**30


def measured_rows(path: str) -> list[tuple[dict, object, int]]:
    """``(row, run, measured peak bytes)`` of every row measured ok with a device peak, read as
    ``plan validate`` reads bench rows (``plan.validate.read_bench_rows``: the last row of a sweep
    point counts, its knobs checked as the bench checks them)."""
    from jaxlayouts.plan.validate import read_bench_rows  # scipy: only when checking

    out = [(r["_raw"], r["_run"], int(r["_raw"]["memory"]["device_peak_bytes"])) for r in read_bench_rows(path)
           if r["status"] == "ok" and r["measured_peak_gib"]]
    if not out:
        raise InvalidInput("file", f"{path}: no bench row measured ok with memory.device_peak_bytes")
    return out


def check(path: str, target: targets.Target, measured=None) -> dict:
    """Compile each measured row for ``target`` (``measured``: :func:`measured_rows` of ``path``,
    when the caller has read them); the table's rows and their error summary."""
    from jaxlayouts.analysis.compiled import compile_step

    rows = []
    measured = measured if measured is not None else measured_rows(path)
    other = sorted({str(raw.get("device_kind")) for raw, _, _ in measured} - {target.device_kind})
    if other:
        print(f"warning: rows measured on {', '.join(other)}, compiled for {target.device_kind} ({target.name}): "
              "the memory plan may differ between them", file=sys.stderr)
    for i, (raw, run, peak) in enumerate(measured, 1):
        start = time.perf_counter()
        step = compile_step(run, targets.devices(target, run.layout.num_devices))
        compiled = step.memory["compiled_peak_bytes_per_device"]
        rows.append({"layout": str(run.layout), "model": run.model.name, "seq_len": run.seq_len,
                     "global_batch": run.global_batch, "measured_peak_bytes": peak,
                     "compiled_peak_bytes": compiled, "error": (compiled - peak) / peak,
                     "compile_s": round(time.perf_counter() - start, 1), "measured_on": raw.get("device_kind"),
                     "measured_jax": raw.get("jax_version"), "measured_commit": raw.get("commit")})
        print(f"[{i}/{len(measured)}] {rows[-1]['layout']}: compiled {compiled / GIB:.2f} GiB, measured "
              f"{peak / GIB:.2f} GiB ({rows[-1]['error']:+.2%})", file=sys.stderr)
    errors = [abs(r["error"]) for r in rows]
    return {"target": target.name, "file": path, "rows": rows, "median_abs_error": statistics.median(errors),
            "max_abs_error": max(errors), **provenance()}


def provenance() -> dict:
    """Date, versions and commit of this run."""
    found = installed(("jax", "jaxlib", *targets.PLUGINS))
    plugins = ", ".join(f"{name} {found[name]}" for name in targets.PLUGINS if found[name])
    return {"date": datetime.date.today().isoformat(), "jax": found["jax"], "jaxlib": found["jaxlib"],
            "plugin": plugins, "commit": commit(),
            "command": "python -m jaxlayouts.target_check " + " ".join(sys.argv[1:])}


def markdown(result: dict) -> str:
    """The comparison as a Markdown table with its provenance."""
    lines = ["| layout | T / global batch | measured GiB (device, jax, commit) | XLA:GPU GiB | error | compile s |",
             "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| `{r['layout']}` | {r['seq_len']} / {r['global_batch']} | {r['measured_peak_bytes'] / GIB:.2f} "
                     f"({r['measured_on']}, {r['measured_jax']}, {r['measured_commit']}) | "
                     f"{r['compiled_peak_bytes'] / GIB:.2f} | {r['error']:+.2%} | {r['compile_s']} |")
    return "\n".join([
        f"Compiled for `{result['target']}` without a GPU on {result['date']}: jax {result['jax']}, jaxlib "
        f"{result['jaxlib']}, {result['plugin']}, commit {result['commit']}.",
        f"Command: `{result['command']}`", "",
        *lines, "",
        f"Median |error| {result['median_abs_error']:.2%}, max {result['max_abs_error']:.2%} over "
        f"{len(result['rows'])} rows."])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxlayouts.target_check", description=__doc__.split("\n\n")[0])
    parser.add_argument("rows", help="bench rows measured on a GPU (JSON lines)")
    parser.add_argument("--target", help=f"GPU target: one of {', '.join(targets.gpu_targets())} (default: the "
                        "one whose device kind the rows name)")
    parser.add_argument("--markdown", help="also write the table to this Markdown file")
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    args = parser.parse_args(argv)
    try:
        measured = measured_rows(args.rows)
        kinds = sorted({str(raw.get("device_kind")) for raw, _, _ in measured})
        if len(kinds) > 1:
            raise InvalidInput("rows", f"{args.rows}: rows from several device kinds ({', '.join(kinds)}); "
                               "compare one device's rows at a time: split the file")
        name = args.target or targets.matching(kinds[0])
        if name is None:
            raise InvalidInput("target", f"the rows were measured on {kinds[0]}, which no target describes; "
                               f"name one: --target {targets.gpu_targets()[-1]}")
        target = targets.resolve(name)
        if not target.is_gpu:
            raise InvalidInput("target", "compares a GPU compile with a GPU's measurement; choose one of "
                               f"{', '.join(targets.gpu_targets())}")
        for raw, run, _ in measured:  # every row must compile for the target before any does
            validate(run, run.layout.num_devices, platform="gpu")
            target.topology(run.layout.num_devices)
        if args.markdown is not None:
            out = pathlib.Path(args.markdown)
            if not args.markdown.strip() or out.is_dir() or not creatable(out) or (out.exists() and not out.is_file()):
                raise InvalidInput("markdown", f"{args.markdown!r} is not a writable file; e.g. --markdown check.md")
            if out.resolve() == pathlib.Path(args.rows).resolve():
                raise InvalidInput("markdown", f"{args.markdown} is the rows file itself; write the table elsewhere, "
                                   "e.g. --markdown check.md")
        targets.prepare(target, 1)
    except InvalidInput as error:
        print(f"invalid: {error}", file=sys.stderr)
        return 2
    result = check(args.rows, target, measured)
    text = markdown(result)
    if args.markdown:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(text + "\n")
        except OSError as error:
            print(f"error: --markdown: cannot write {args.markdown} ({error.strerror or error})", file=sys.stderr)
            return 5
    print(json.dumps(result) if args.json else text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
