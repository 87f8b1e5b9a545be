"""Predict the best layouts for a model on G GPUs, explain one layout, or validate the model.

    python -m jaxlayouts.plan --model llama-65b --gpus 128 --seq_len 2048 --global_batch 2048 --hardware a100-80gb
    python -m jaxlayouts.plan ... --explain "dp=4,tp=8,pp=4 mbs=1 remat=none attn=pallas norm=pallas"
    python -m jaxlayouts.plan ... --verify 3      # ahead-of-time compile of the top 3 (analysis/compiled.py)
    python -m jaxlayouts.plan ... --verify 3 --target h100-80gb   # ... with XLA:GPU, no GPU needed
    python -m jaxlayouts.plan validate ../shared/paper-data/calibration_runs.csv --hardware a100-80gb [--fit] [--predictions OUT.csv] [--cross_model OUT.md]
    python -m jaxlayouts.plan validate configs/hardware/measured/h200-2026-11-30.jsonl --hardware h200 [--fit]

The search over layouts is ``plan/search.py``. With ``--json`` the last stdout line is one object.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sys
import time

from absl import app, flags

from jaxlayouts import config, targets
from jaxlayouts.analysis.compiled import XLA_CPU_DEVICE_LIMIT, compile_step, which_figure_to_trust
from jaxlayouts.choices import REMAT
from jaxlayouts.layout import MAX_EMULATED_DEVICES, InvalidInput, Layout, RunConfig, load_model_config, validate
from jaxlayouts.plan import cost, memcheck
from jaxlayouts.plan.hardware import check_memory_fraction, chip, load_hardware, save_calibration
from jaxlayouts.plan.search import (CP_MIN_TOKENS_PER_DEVICE, candidates, context_parallel_degrees, rank, row,
                                    not_searched_text, unmeasured_kernels)
from jaxlayouts.schema import finite_json

__doc__ = f"{__doc__}\n{not_searched_text()}\n"  # --help says which choices the search leaves out, and why
from jaxlayouts.units import bytes_text

FLAGS = flags.FLAGS
config.define_flags(FLAGS, ("model", "seq_len", "global_batch"))  # the run's knobs, with the study's sizes:
FLAGS.set_default("model", "llama-13b")
FLAGS.set_default("seq_len", "2048")
FLAGS.set_default("global_batch", "2048")
flags.DEFINE_integer("gpus", 64, "Number of GPUs.")
flags.DEFINE_string("hardware", "a100-80gb", "Hardware description under configs/hardware/ or a YAML path.")
flags.DEFINE_integer("top", 10, "How many layouts to print.")
flags.DEFINE_string("explain", None, "Explain one layout (its text form) instead of ranking.")
flags.DEFINE_integer("verify", 0, "Ahead-of-time compile the top N layouts (see --target).")
flags.DEFINE_string("target", targets.CPU, "--verify compiles for this: cpu (XLA:CPU on emulated devices) or a "
                    "hardware with a GPU target, e.g. h100-80gb (XLA:GPU without a GPU; needs the [gpu-aot] extra).")
flags.DEFINE_bool("json", False, "Print one JSON object (last stdout line).")
flags.DEFINE_bool("fit", False, "validate: re-fit the calibration constants on the file and save them.")
flags.DEFINE_string("predictions", None, "validate: also write every row with its predictions to this CSV.")
flags.DEFINE_bool("leave_one_out", False, "validate: predict each row from a fit on all the other rows "
                  "(held out), instead of from the hardware's calibration.")
flags.DEFINE_string("cross_model", None, "validate: predict each model's rows from a fit on the other models' "
                    "rows (and from the calibration file) and write the tables to this Markdown file.")
flags.DEFINE_string("out", None, "grid: the JSON lines file compiled rows are appended to (resumable).")
flags.DEFINE_bool("retry_errors", False, "grid: compile again the points whose row in --out is an error.")
flags.DEFINE_float("memory_fraction", None, "Share of HBM the allocator may use (default: the hardware file's, "
                   "JAX's 0.75); e.g. 0.9 for XLA_PYTHON_CLIENT_MEM_FRACTION=.9.")

MAX_GPUS = 2**20
"""The largest cluster the planner enumerates (a million GPUs: far past any cluster built)."""


def trust_line(hw) -> str:
    """What the predictions rest on: the calibration file, its rows, their hardware, its held-out error."""
    f = hw.fitted_on
    if f is None:
        return (f"calibration {hw.calibration_source}: no record of the rows behind it, so no held-out error; "
                "refit with plan validate FILE --fit")
    borrowed = "" if chip(hw.name) in map(chip, f.hardware) else f"; none on {hw.name}: every constant is borrowed"
    return (f"calibration {hw.calibration_source}: fitted on {f.rows} rows (ok/oom) of {f.file}, measured on "
            f"{', '.join(f.hardware)}{borrowed}; held-out error: {f.heldout}")


UNMEASURED_MARK = "†"


def unmeasured_legend(rows: list[dict], hw) -> str | None:
    """The legend of ``UNMEASURED_MARK``, naming the kernels it stands for among ``rows``."""
    kernels = sorted({k for r in rows for k in r["unmeasured_kernels"]})
    if not kernels:
        return None
    return (f"{UNMEASURED_MARK} uses a kernel no calibration row timed on {hw.name} ({', '.join(kernels)}): its "
            "time comes from a borrowed or default constant, not from a measurement")


PIPELINE_RECOMPUTE = ("recompute with remat=none under pp: the pipeline re-runs each chunk's forward in its "
                      "backward tick, whatever the remat policy (jaxlayouts/parallel/pipeline.py)")


def pipeline_recompute(layout: Layout, terms) -> bool:
    """Whether a ``recompute`` among ``terms`` is the pipeline's own, not a remat policy's."""
    return "recompute" in terms and layout.mesh.get("pp", 1) > 1 and not REMAT[layout.remat].checkpoints


def explain(run: RunConfig, hw, p: cost.Prediction) -> str:
    unmeasured = unmeasured_kernels(run.layout, hw)
    mark = UNMEASURED_MARK if unmeasured else ""
    lines = [f"{run.layout} on {run.layout.num_devices} x {hw.name}: predicted MFU {p.mfu:.1%}{mark}, "
             f"step {p.step_time_s:.2f} s", trust_line(hw)]
    if unmeasured:
        lines.append(unmeasured_legend([{"unmeasured_kernels": unmeasured}], hw))
    lines.append("time per step:")
    lines += [f"  {k:<16} {v:8.3f} s  {v / p.step_time_s:6.1%}" for k, v in sorted(p.time_s.items(), key=lambda kv: -kv[1])]
    if pipeline_recompute(run.layout, [k for k, v in p.time_s.items() if v > 0]):
        lines.append(f"  ({PIPELINE_RECOMPUTE})")
    context = cost.context_parallel_text(cost.Workload.from_run(run), p)
    if context:
        lines.append(f"context parallelism: {context}")
    lines.append(f"memory per GPU ({'fits' if p.fits else 'DOES NOT FIT'} in {p.usable_bytes / 2**30:.1f} GiB):")
    lines += [f"  {k:<16} {v / 2**30:8.2f} GiB" for k, v in p.memory_bytes.items()]
    return "\n".join(lines)


def validate_command(path: str, hw, as_json: bool):
    from jaxlayouts.plan import memcheck
    if memcheck.is_grid_file(path):
        return validate_grid_command(path, hw, as_json)
    # imported here, not at the top: scipy's import would add 0.6 s to every plan that does not validate
    from jaxlayouts.plan.validate import (cross_model, cross_model_markdown, evaluate, fit, fitted_on,
                                          hardware_mismatch, leave_one_out, predict_rows, read_rows, write_predictions)
    rows = read_rows(path)
    if (warning := hardware_mismatch(rows, hw)):
        print(f"warning: {warning}", file=sys.stderr)
    if FLAGS.cross_model:
        command = f"python -m jaxlayouts.plan validate {path} --hardware {hw.name} --cross_model {FLAGS.cross_model}"
        text = cross_model_markdown(cross_model(rows, hw), command, hw.calibration_source, time.strftime("%Y-%m-%d"))
        pathlib.Path(FLAGS.cross_model).write_text(text)
        print(text, end="")
        return
    if FLAGS.fit:
        hw = fit(rows, hw)
        saved = save_calibration(hw.name, hw.calibration, f"Fitted by: python -m jaxlayouts.plan validate "
                                 f"{path} --hardware {hw.name} --fit\n({len(rows)} rows ok/oom; memory, then "
                                 "time by Powell's method: jaxlayouts/plan/validate.py fit)", fitted_on(rows, path))
        print(f"saved {saved}")
    predictions = leave_one_out(rows, hw) if FLAGS.leave_one_out else predict_rows(rows, hw)
    result = evaluate(rows, hw, predictions)
    if FLAGS.predictions:
        write_predictions(FLAGS.predictions, rows, predictions)
        print(f"wrote {len(rows)} rows with their predictions to {FLAGS.predictions}")
    result["calibration"] = dataclasses.asdict(hw.calibration)
    result["calibration_source"] = hw.calibration_source
    result = finite_json(result)
    if as_json:
        print(json.dumps(result))
    else:
        memory = f"; memory error {_cell(result['memory_mape'], '.1%')}" if "memory_mape" in result else ""
        print(f"{result['rows']} rows; OOM accuracy {_cell(result['oom_accuracy'], '.1%')}; MFU error (MAPE) "
              f"{_cell(result['mfu_mape'], '.1%')} on measured-ok rows{memory}; calibration {hw.calibration_source}")
        print(f"{'sweep':<62} {'spearman':>8} {'best measured':>13} {'top-ranked measured':>19}")
        for name, s in result["sweeps"].items():
            top = s["measured_mfu_of_top_ranked"]
            print(f"{name:<62} {_cell(s['spearman'], '.3f'):>8} {_cell(s['best_measured_mfu'], '.1%'):>13} "
                  f"{(f'{top:.1%}' if top is not None else s['top_ranked_status']):>19}")


def validate_grid_command(path: str, hw, as_json: bool):
    """``plan validate GRID.jsonl``: the planner's memory against XLA's compiled peaks (``plan/memcheck.py``)."""
    from jaxlayouts.plan import memcheck
    if FLAGS.fit or FLAGS.leave_one_out or FLAGS.predictions or FLAGS.cross_model:
        raise InvalidInput("file", f"{path} holds compiled rows: validate reports the memory error against them; "
                           "--fit, --leave_one_out, --predictions and --cross_model apply to measured rows")
    rows, statuses = memcheck.read_grid_rows(path)
    result = memcheck.evaluate_grid(rows, hw)
    if as_json:
        print(json.dumps(finite_json({**result, "statuses": statuses, "hardware": hw.name})))
    else:
        print(memcheck.report(path, result, statuses, hw))


def grid_command(argv, hw):
    """``plan grid GRID.yaml --target T --out FILE.jsonl``: compile every layout of the grid not yet
    in the file (``plan/grid.py``)."""
    from jaxlayouts.plan.grid import run_grid
    if len(argv) != 3:
        raise InvalidInput("command", f"grid takes one grid file, e.g. 'grid configs/grids/h100-memory.yaml "
                           f"--target h100-80gb --out docs/results/h100-memory-grid.jsonl'; got {argv[2:]}")
    if not FLAGS.out:
        raise InvalidInput("out", "grid appends its rows to a JSON lines file: --out docs/results/grid.jsonl")
    counts = run_grid(argv[2], FLAGS.target, FLAGS.out, hw=hw, retry_errors=FLAGS.retry_errors)
    print(json.dumps(counts) if FLAGS.json else
          f"{counts['points']} layouts: {counts['skipped']} already in {FLAGS.out}, {counts['compiled']} compiled, "
          f"{counts['error']} failed to compile, {counts['invalid']} invalid")


def _cell(value, spec: str) -> str:
    """A figure for a table, or n/a where there is none (no ok row, one run in a sweep)."""
    return "n/a" if value is None else format(value, spec)


def check_whole_nodes(gpus: int, hw, knob: str) -> None:
    """A cluster is whole nodes: more GPUs than one node holds must be a multiple of
    ``gpus_per_node`` (else the node boundaries the cost model puts links on do not exist)."""
    if gpus > hw.gpus_per_node and gpus % hw.gpus_per_node:
        raise InvalidInput(knob, f"{gpus} GPUs do not fill whole nodes of {hw.gpus_per_node} ({hw.name}'s "
                           f"gpus_per_node); use a multiple of {hw.gpus_per_node}, e.g. "
                           f"{max(1, gpus // hw.gpus_per_node) * hw.gpus_per_node} GPUs")


def check_flags(validating: bool, hw) -> None:
    """Reject nonsense in the planner's own numeric flags, naming the flag."""
    if FLAGS.fit and not validating:
        raise InvalidInput("fit", "re-fits the calibration on measured runs: python -m jaxlayouts.plan "
                           "validate FILE.csv --fit")
    if FLAGS.cross_model and (not validating or FLAGS.fit or FLAGS.leave_one_out or FLAGS.predictions):
        raise InvalidInput("cross_model", "writes a validated file's held-out tables, alone: python -m "
                           "jaxlayouts.plan validate FILE.csv --cross_model docs/results/heldout.md")
    if FLAGS.cross_model and not pathlib.Path(FLAGS.cross_model).resolve().parent.is_dir():
        raise InvalidInput("cross_model", f"{FLAGS.cross_model}: its folder does not exist; e.g. --cross_model heldout.md")
    if FLAGS.leave_one_out and (not validating or FLAGS.fit):
        raise InvalidInput("leave_one_out", "validates held-out fits of a file's rows, without --fit: "
                           "python -m jaxlayouts.plan validate FILE.jsonl --leave_one_out")
    if FLAGS.predictions and not validating:
        raise InvalidInput("predictions", "writes a validated file's rows with their predictions: "
                           "python -m jaxlayouts.plan validate FILE.csv --predictions OUT.csv")
    if FLAGS.predictions and not pathlib.Path(FLAGS.predictions).resolve().parent.is_dir():
        raise InvalidInput("predictions", f"{FLAGS.predictions}: its folder does not exist; give a path "
                           "in an existing folder, e.g. --predictions predictions.csv")
    if FLAGS.predictions and pathlib.Path(FLAGS.predictions).is_dir():
        raise InvalidInput("predictions", f"{FLAGS.predictions} is a folder; give a file, e.g. --predictions "
                           "predictions.csv")
    if FLAGS.explain is not None and not FLAGS.explain.strip():
        raise InvalidInput("explain", "is empty; give a layout's text form, e.g. --explain \"dp=8 mbs=1\"")
    positive = {"gpus": FLAGS.gpus, "top": FLAGS.top}
    for name, value in positive.items():
        if value < 1:
            raise InvalidInput(name, f"{value}: must be a positive integer, e.g. --{name} {FLAGS[name].default}")
    if not validating and FLAGS.explain is None:
        check_whole_nodes(FLAGS.gpus, hw, "gpus")
    if FLAGS.gpus > MAX_GPUS:
        raise InvalidInput("gpus", f"{FLAGS.gpus}: the planner enumerates at most {MAX_GPUS} GPUs; "
                           "e.g. --gpus 4096")
    if FLAGS.verify < 0:
        raise InvalidInput("verify", f"{FLAGS.verify}: compile the top N >= 0 layouts, e.g. --verify 2")
    target = targets.resolve(FLAGS.target)
    if target.is_gpu and not FLAGS.verify and not validating:  # plan grid compiles for --target itself
        raise InvalidInput("target", f"{FLAGS.target} is what --verify compiles for; add --verify N, e.g. "
                           f"--verify 3 --target {FLAGS.target}")
    if target.is_gpu and FLAGS.verify and FLAGS["hardware"].present and hw.name != target.name:
        raise InvalidInput("target", f"{FLAGS.target} compiles for another GPU than --hardware {FLAGS.hardware} "
                           f"costs; drop --hardware (it follows the target) or make them agree")
    if FLAGS.verify and target.is_gpu:
        targets.check_compiler()
    if FLAGS.verify and not target.is_gpu and FLAGS.gpus > MAX_EMULATED_DEVICES:
        raise InvalidInput("verify", f"compiles on {FLAGS.gpus} emulated CPU devices; at most "
                           f"{MAX_EMULATED_DEVICES}: drop --verify, lower --gpus or compile for a GPU "
                           "(--target h100-80gb)")


def main(argv):
    try:
        values = config.values_from_flags(FLAGS)
        gpu_target = FLAGS.target != targets.CPU and not FLAGS["hardware"].present
        hw = load_hardware(FLAGS.target if gpu_target else FLAGS.hardware)  # the hardware follows a GPU target
        check_flags(validating=len(argv) > 1, hw=hw)
        if FLAGS.memory_fraction is not None:
            check_memory_fraction(FLAGS.memory_fraction)
            hw = dataclasses.replace(hw, memory_fraction=FLAGS.memory_fraction)
        if len(argv) > 1 and argv[1] == "grid":
            return grid_command(argv, hw)
        if len(argv) > 1:
            if argv[1] != "validate" or len(argv) != 3:
                raise InvalidInput("command", f"unknown arguments {argv[1:]}; the subcommands are "
                                   "'validate FILE.csv' and 'grid GRID.yaml --out FILE.jsonl'")
            if FLAGS.predictions and pathlib.Path(FLAGS.predictions).resolve() == pathlib.Path(argv[2]).resolve():
                raise InvalidInput("predictions", f"{FLAGS.predictions} is the file being validated; give "
                                   "another file, e.g. --predictions predictions.csv")
            return validate_command(argv[2], hw, FLAGS.json)
        model = load_model_config(values["model"])
        seq_len, global_batch = values["seq_len"], values["global_batch"]
        if FLAGS.explain:
            layout = Layout.parse(FLAGS.explain)
            if layout.num_devices > MAX_GPUS:
                raise InvalidInput("explain", f"{layout.num_devices} GPUs; the planner costs at most {MAX_GPUS}")
            if FLAGS["gpus"].present and FLAGS.gpus != layout.num_devices:
                raise InvalidInput("gpus", f"{FLAGS.gpus}, but the layout to explain uses {layout.num_devices}; "
                                   "drop --gpus with --explain or make them agree")
            run = RunConfig(model=model, layout=layout, seq_len=seq_len, global_batch=global_batch)
            validate(run, layout.num_devices, platform="gpu")
            check_whole_nodes(layout.num_devices, hw, "explain")
            prediction = cost.predict(cost.Workload.from_run(run), hw)
            print(json.dumps(row(run, prediction, hw)) if FLAGS.json else explain(run, hw, prediction))
            return
    except InvalidInput as error:
        config.print_invalid(error)
        sys.exit(2)
    start = time.perf_counter()
    runs = list(candidates(model, FLAGS.gpus, seq_len, global_batch, hw.gpus_per_node))
    if not runs:
        print(f"invalid: --gpus: no valid layout of {model.name} on {FLAGS.gpus} GPUs with global batch "
              f"{global_batch}", file=sys.stderr)
        sys.exit(2)
    ranked = rank(runs, hw)
    elapsed = time.perf_counter() - start
    top = ranked[:FLAGS.top]
    if FLAGS.verify:
        top = verify(top, runs, FLAGS.verify, hw)
    if not FLAGS.json:
        cps = context_parallel_degrees(seq_len, FLAGS.gpus)
        with_cp = (f"; cp up to {cps[-1]}: at least {CP_MIN_TOKENS_PER_DEVICE} tokens per device"
                   if len(cps) > 1 else "")
        print(f"{len(ranked)} layouts of {model.name} on {FLAGS.gpus} x {hw.name} ranked in {elapsed:.1f} s "
              f"(predicted{with_cp})")
        print(trust_line(hw))
        print(f"usable memory per GPU: {hw.usable_bytes:,.0f} bytes ({hw.usable_bytes / 2**30:.1f} GiB), "
              f"memory_fraction {hw.memory_fraction:g} of {hw.hbm_bytes / 2**30:.4g} GiB HBM"
              f"{' (--memory_fraction)' if FLAGS.memory_fraction is not None else f' ({hw.name} file)'}")
        validated = memcheck.validated_error(hw)
        if validated:
            print(validated)
        print(f"{'#':>3} {'layout':<96} {'MFU':>7} {'step s':>8} {'GiB/GPU':>8}  dominant terms")
        for i, r in enumerate(top, 1):
            flag = "" if r["fits"] else "  (does not fit)"
            mark = UNMEASURED_MARK if r["unmeasured_kernels"] else " "
            print(f"{i:>3} {r['layout']:<96} {r['mfu']:6.1%}{mark} {r['step_time_s']:8.2f} "
                  f"{r['memory_gib']['total']:8.1f}  {', '.join(r['dominant'])}{flag}")
            if "not_compiled" in r.get("compiled", {}):
                print(f"    not compiled: {r['compiled']['not_compiled']}")
            elif "compiled" in r:
                print(f"    compiled ({r['compiled']['compiler']}): {r['compiled']['peak_gib']:.4g} GiB peak per device "
                      f"(analytic without runtime overhead {r['compiled']['analytic_gib']:.4g}), "
                      f"{bytes_text(r['compiled']['collective_gib_per_step'] * 2**30)} of collectives per step")
                if r["compiled"]["exceeds_usable"]:
                    print(f"    WARNING: the compiled peak exceeds the {hw.usable_bytes / 2**30:.4g} GiB the allocator "
                          f"may use on {hw.name}. {r['compiled']['which_to_trust']}")
        if (legend := unmeasured_legend(top, hw)):
            print(legend)
        if any(pipeline_recompute(Layout.parse(r["layout"]), r["dominant"]) for r in top):
            print(PIPELINE_RECOMPUTE)
    if FLAGS.json:
        print(json.dumps({"model": model.name, "gpus": FLAGS.gpus, "hardware": hw.name, "calibration": trust_line(hw),
                          "candidates": len(ranked), "seconds": elapsed, "top": top,
                          "usable_bytes": hw.usable_bytes, "memory_fraction": hw.memory_fraction,
                          "memory_validated": memcheck.validated_error(hw)}))


def verify(top: list[dict], runs: list[RunConfig], count: int, hw) -> list[dict]:
    """Ahead-of-time compile the first ``count`` layouts for ``--target`` (``analysis/compiled.py``,
    which explore's report is built on too), and flag each whose compiled peak exceeds what the
    allocator may use (``hw.usable_bytes``)."""
    target = targets.resolve(FLAGS.target)
    targets.prepare(target, min(FLAGS.gpus, XLA_CPU_DEVICE_LIMIT))
    compiler = f"XLA:GPU for {target.name}" if target.is_gpu else "XLA:CPU, emulated devices"
    by_text = {str(r.layout): r for r in runs}
    for r in top[:count]:
        run = by_text[r["layout"]]
        try:
            step = compile_step(run, targets.devices(target, run.layout.num_devices) if target.is_gpu else None)
        except InvalidInput as error:  # a layout that cannot compile: say why, go on
            r["compiled"] = {"not_compiled": str(error)}
            continue
        peak, analytic = step.memory["compiled_peak_bytes_per_device"], cost.memory(cost.Workload.from_run(run, step.backend), hw)
        r["compiled"] = {"compiler": compiler, "peak_gib": peak / 2**30,
                         "analytic_gib": (analytic["total"] - analytic["overhead"]) / 2**30,
                         "collective_gib_per_step": sum(c.bytes * c.executions for c in step.collectives) / 2**30,
                         "exceeds_usable": peak > hw.usable_bytes,
                         "which_to_trust": which_figure_to_trust(run.layout, step.backend)}
    return top


if __name__ == "__main__":
    app.run(main, flags_parser=config.flags_parser(config.print_invalid))
