"""Validate (and fit) the cost model against measured runs: the reference study's CSV, or this
project's bench rows (JSON lines, as ``python -m jaxlayouts.bench`` prints them).

A study row is predicted as the study ran it: its authors' Megatron-style trainer
(``plan/study.py``), ZeRO-1 over the data-parallel ranks, 1F1B, ~4M tokens per step, its
kernel names mapped to cost classes. A bench row is predicted as this project's step under the
row's layout. Reported: out-of-memory classification accuracy (rows measured ok or oom), MFU mean
absolute percentage error on rows measured ok, memory error on rows with a measured device peak,
and per sweep (bench rows: model x devices x device kind, or a row's ``sweep``) the Spearman rank
correlation of predicted vs measured MFU and the measured MFU of the layout the planner ranks
first (best predicted MFU among rows it predicts to fit) next to the best measured MFU.

``--fit`` re-fits the calibration constants on the file (see ``fit``), writing
``configs/hardware/NAME.calibration.yaml``. Study rows: memory constants maximise OOM accuracy
(``fit_memory``), time constants minimise MFU error. Bench rows: memory constants by least
squares on the measured peaks (``fit_memory_peaks``), then only the time constants the rows
exercise (``step_constants``), starting from the kernel benchmark's efficiencies.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import math
import warnings

import numpy as np
import scipy.optimize
import scipy.stats

from jaxlayouts import config
from jaxlayouts.choices import ATTENTION, NORM
from jaxlayouts.layout import InvalidInput, Layout, RunConfig, load_model_config
from jaxlayouts.schema import json_value, read_input
from jaxlayouts.plan.cost import (ATTENTION_CLASS, GIB, Prediction, attention_class, Workload, memory, predict, stage_memory, stages,
                                tp_activation_surcharge)
from jaxlayouts.plan.hardware import BASE_CALIBRATION, Calibration, FittedOn, Hardware, calibration_path, chip, read_calibration
from jaxlayouts.plan.study import STUDY

KERNELS = {"torch": ("unfused", False), "fused": ("fused", False), "flash_attention": ("flash1", False),
           "flash_attention1": ("flash1", False), "flash_attention2": ("flash2", False),
           "flash_attention2+rms_kernel": ("flash2", True)}
"""The study's kernel names -> (attention cost class, fused RMSNorm)."""
TOKENS_PER_STEP = 4 * 2 ** 20
REQUIRED = ("sweep", "model", "seq_len", "world_size", "micro_batch_size", "tp", "pp", "sequence_parallel",
            "activation_checkpointing", "kernel", "status", "mfu")
STUDY_STATUSES = ("ok", "oom", "error", "unavailable")
"""The statuses the study's published table uses."""


BENCH_REQUIRED = ("model", "layout", "seq_len", "global_batch", "dtype", "status")


def read_rows(path: str) -> list[dict]:
    """Rows measured ok or oom: the study's CSV, or bench rows from a ``.jsonl``/``.json`` file."""
    if path.endswith((".jsonl", ".json")):
        return read_bench_rows(path)
    rows = list(csv.DictReader(io.StringIO(read_text(path), newline="")))
    missing = [c for c in REQUIRED if rows and c not in rows[0]]
    if not rows or missing:
        raise InvalidInput("file", f"{path}: expected the study's CSV columns; missing {missing or 'rows'}")
    for number, row in enumerate(rows, 2):
        check_study_row(row, f"{path}:{number}")
    return [row for row in rows if row["status"] in ("ok", "oom")]


def check_study_row(row: dict, where: str) -> None:
    """Every field a study row is costed and scored by is present, and its numbers are numbers:
    its status one of the study's, its flags the study's words, an ok row's MFU a fraction in
    (0, 1], a step time positive."""
    choices = {"status": STUDY_STATUSES, "sequence_parallel": ("True", "False"),
               "activation_checkpointing": ("disabled", "every_layer")}
    for column, allowed in choices.items():
        if row.get(column) not in allowed:
            raise InvalidInput("file", f"{where}: {column} is {row.get(column)!r}; the study writes one of "
                               f"{', '.join(allowed)}")
    empty = [c for c in REQUIRED if row.get(c) in (None, "") and (c != "mfu" or row["status"] == "ok")]
    if empty:
        raise InvalidInput("file", f"{where}: no value for {empty}; a study row fills every column it has "
                           "(mfu may be empty on an oom row)")
    try:
        mfu = float(row["mfu"]) if row["status"] == "ok" else None
    except ValueError:
        raise InvalidInput("file", f"{where}: mfu {row['mfu']!r} is not a number, e.g. 0.55") from None
    if mfu is not None and not 0 < mfu <= 1:
        raise InvalidInput("file", f"{where}: mfu {mfu} is not a fraction in (0, 1], e.g. 0.55")
    try:
        step = float(row["step_time_s"]) if row.get("step_time_s") not in (None, "") else None
    except ValueError:
        step = math.nan
    if step is not None and not (math.isfinite(step) and step > 0):
        raise InvalidInput("file", f"{where}: step_time_s {row['step_time_s']!r} is not a positive number of seconds")


def read_bench_rows(path: str) -> list[dict]:
    """Bench result rows (``bench.describe`` + ``bench.benchmark`` fields), one JSON object a
    line, as rows with ``sweep``, ``status``, ``mfu`` and the workload of their layout."""
    latest = {}  # the last row of a sweep point counts (a retry appends its new row)
    for number, line in ((i, line) for i, line in enumerate(read_text(path).splitlines(), 1) if line.strip()):
        try:
            raw = json_value(line)
        except ValueError as error:
            if isinstance(error, json.JSONDecodeError) and line.lstrip().startswith("{"):
                continue  # a line torn by a kill during a write (``results.py`` leaves it in place)
            raise InvalidInput("file", f"{path}:{number}: not a JSON bench row ({error})") from None
        if not isinstance(raw, dict) or "status" not in raw:
            raise InvalidInput("file", f"{path}:{number}: not a bench or sweep result row (no status)")
        latest[raw["key"] if isinstance(raw.get("key"), str) else number] = (number, raw)
    rows = []
    for number, raw in latest.values():
        if raw["status"] not in ("ok", "oom"):
            continue  # a point that failed, timed out or was invalid: nothing measured to compare
        missing = [k for k in BENCH_REQUIRED if k not in raw]
        if missing:
            raise InvalidInput("file", f"{path}:{number}: a bench row needs {list(BENCH_REQUIRED)}; missing {missing}")
        run, peak = check_bench_row(raw, f"{path}:{number}")
        rows.append({"sweep": raw.get("sweep") or f"{raw['model']} on {raw.get('num_devices', 1)} x "
                                                   f"{raw.get('device_kind', 'device')}",
                     "status": raw["status"], "mfu": raw.get("mfu"), "layout": raw["layout"],
                     "device_kind": raw.get("device_kind") if isinstance(raw.get("device_kind"), str) else None,
                     "seq_len": run.seq_len, "step_time_s": raw.get("step_time_s"),
                     "measured_peak_gib": round(peak / GIB, 3) if peak else None, "_workload": Workload.from_run(run),
                     "_run": run, "_raw": raw})
    if not rows:
        raise InvalidInput("file", f"{path}: no bench rows measured ok or oom")
    return rows


STUDY_HARDWARE = "a100-80gb"
"""What the reference study measured on (its published table has no hardware column)."""


def hardware_mismatch(rows: list[dict], hw: Hardware) -> str | None:
    """A warning when the rows were measured on another chip than ``hw`` (predictions would use
    ``hw``'s peak, memory and links for runs that had others), or with JAX's allocator at another
    share of memory than ``hw.memory_fraction`` (a bench row's ``memory_fraction``: what fits differs)."""
    problems = []
    other = [m for m in measured_on(rows) if chip(m) != chip(hw.name)]
    if other:
        problems.append(f"--hardware {hw.name}, but the rows were measured on {', '.join(other)}"
                        f"{' (the reference study)' if STUDY_HARDWARE in other else ''}; the errors below compare "
                        f"{hw.name}'s predictions with another chip's runs: give the rows' hardware, e.g. --hardware "
                        f"{STUDY_HARDWARE if STUDY_HARDWARE in other else chip(other[0])}")
    fractions = sorted({f for r in rows if isinstance(f := r.get("_raw", {}).get("memory_fraction"), (int, float))
                        and not isinstance(f, bool) and f != hw.memory_fraction})
    if fractions:
        problems.append(f"the rows ran with JAX's allocator at memory_fraction {', '.join(f'{f:g}' for f in fractions)}, "
                        f"but {hw.name} assumes {hw.memory_fraction:g}, so what fits differs: validate with "
                        f"--memory_fraction {fractions[0]:g}, or bench with the hardware file's fraction "
                        "(launch/slurm.sbatch exports it)")
    return "; ".join(problems) or None


def measured_on(rows: list[dict]) -> list[str]:
    """The hardware the rows ran on: bench rows' device kinds, the study's A100."""
    return sorted({(r.get("device_kind") if "_workload" in r else STUDY_HARDWARE) or "" for r in rows} - {""})


def model_of(row: dict) -> str:
    """A row's model: the study's ``13B``, a bench row's ``llama-1b``."""
    return row["_run"].model.name if "_run" in row else row["model"]


def fitted_on(rows: list[dict], path: str) -> FittedOn:
    """What a fit on ``rows`` saw: the file, the rows, their hardware and the kernels of this
    project some ok row timed. The study's unfused attention and norm are costed by the constants
    of our ``xla`` ones (``cost.ATTENTION_CLASS``); its fused and flash kernels are none of ours."""
    loads = [workload(r) for r in rows if r["status"] == "ok"]
    attention = {{"unfused": "xla"}.get(w.attention, w.attention) for w in loads} & set(ATTENTION_CLASS)
    norm = {w.norm for w in loads if not (w.fused_norm and w.norm == "xla")}  # the study's fused norm: not ours
    return FittedOn(file=path, rows=len(rows), hardware=tuple(measured_on(rows)), attention=tuple(sorted(attention)),
                    norm=tuple(sorted(norm)))


def read_text(path: str) -> str:
    """A file's text; a missing, unreadable or non-UTF-8 one is :class:`InvalidInput`."""
    try:
        return read_input(path, "file").decode()
    except (OSError, UnicodeDecodeError) as error:
        raise InvalidInput("file", f"{path}: cannot read it as text ({type(error).__name__}: "
                           f"{getattr(error, 'strerror', None) or error}); give the study's CSV or bench JSON "
                           "lines") from None


def check_bench_row(raw: dict, where: str) -> tuple[RunConfig, float | None]:
    """A bench row's run (its knobs checked as the bench checks them) and device peak bytes;
    an ok row's MFU must be a fraction in (0, 1] and its step time a positive number."""
    try:
        values = config.check_values(config.values_with(
            model=raw["model"], seq_len=raw["seq_len"], global_batch=raw["global_batch"], dtype=raw["dtype"]))
        if not isinstance(raw["layout"], str):
            raise InvalidInput("layout", f"{raw['layout']!r} is not a layout's text form")
        run = RunConfig(model=_model_config(values["model"]), layout=Layout.parse(raw["layout"]),
                        seq_len=values["seq_len"], global_batch=values["global_batch"], dtype=values["dtype"])
    except InvalidInput as error:
        raise InvalidInput("file", f"{where}: {error}") from None
    memory = raw.get("memory") if raw.get("memory") is not None else {}
    peak = memory.get("device_peak_bytes") if isinstance(memory, dict) else "not a mapping"
    checks = {"mfu": (raw.get("mfu"), raw["status"] == "ok", lambda v: 0 < v <= 1, "a fraction in (0, 1]"),
              "step_time_s": (raw.get("step_time_s"), False, lambda v: v > 0, "a positive number of seconds"),
              "memory.device_peak_bytes": (peak, False, lambda v: v >= 0, "a number of bytes")}
    for name, (value, required, valid, what) in checks.items():
        if value is None and not required:
            continue
        number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not (number and valid(value)):
            hint = " (an ok row needs one: rerun the bench with --peak_tflops)" if name == "mfu" else ""
            raise InvalidInput("file", f"{where}: {name} is {value!r}; it must be {what}{hint}")
    return run, peak


def workload(row: dict) -> Workload:
    """A row's workload: a bench row's layout, or a study row costed as the study ran it."""
    if "_workload" in row:
        return row["_workload"]
    model = _model_config(f"llama-{row['model'].lower()}")
    try:
        seq_len, world, tp, pp, micro_batch = (int(row[c]) for c in ("seq_len", "world_size", "tp", "pp",
                                                                       "micro_batch_size"))
    except ValueError as error:
        raise InvalidInput("file", f"sweep {row['sweep']!r}: {error}; sizes are integers") from None
    if min(seq_len, world, tp, pp, micro_batch) < 1 or world % (tp * pp) or pp > model.num_layers:
        raise InvalidInput("file", f"sweep {row['sweep']!r}: tp={tp}, pp={pp} on {world} GPUs with "
                           f"micro-batch {micro_batch} at {seq_len} tokens; sizes are positive, tp x pp "
                           f"divides world_size and pp is at most the {model.num_layers} layers")
    if row["kernel"] not in KERNELS:
        raise InvalidInput("file", f"kernel {row['kernel']!r} in sweep {row['sweep']!r}; the study's names "
                           f"are {', '.join(KERNELS)}")
    attention, fused_norm = KERNELS[row["kernel"]]
    return Workload(model=model, seq_len=seq_len, global_batch=TOKENS_PER_STEP // seq_len,
                    data_parallel=world // (tp * pp), tp=tp, pp=pp, micro_batch=micro_batch,
                    sequence_parallel=row["sequence_parallel"] == "True",
                    remat="full" if row["activation_checkpointing"] == "every_layer" else "none",
                    attention=attention, fused_norm=fused_norm, zero=1, schedule="1f1b", trainer=STUDY)


_model_config = functools.lru_cache(load_model_config)


def spearman(a, b) -> float:
    """Spearman rank correlation (ties share their mean rank); NaN for fewer than two runs or a
    constant side."""
    if len(a) < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", scipy.stats.ConstantInputWarning)
        return float(scipy.stats.spearmanr(a, b).statistic)


def predict_rows(rows: list[dict], hw: Hardware) -> list[Prediction]:
    return [predict(workload(r), hw) for r in rows]


def evaluate(rows: list[dict], hw: Hardware, predictions: list[Prediction] | None = None) -> dict:
    """The report above; ``predictions`` are ``predict_rows(rows, hw)`` if already made."""
    predictions = predictions or predict_rows(rows, hw)
    oom_hits = [p.fits == (r["status"] == "ok") for r, p in zip(rows, predictions)]
    ok = [(r, p) for r, p in zip(rows, predictions) if r["status"] == "ok"]
    errors = [abs(p.mfu - float(r["mfu"])) / float(r["mfu"]) for r, p in ok]
    peaks = [(r["measured_peak_gib"] * GIB, p) for r, p in ok if r.get("measured_peak_gib")]
    memory_errors = [abs(p.memory_bytes["total"] - peak) / peak for peak, p in peaks]
    sweeps = {}
    for name in sorted({r["sweep"] for r in rows}):
        here = [(r, p) for r, p in zip(rows, predictions) if r["sweep"] == name]
        measured_ok = [(r, p) for r, p in here if r["status"] == "ok"]
        fitting = [(r, p) for r, p in here if p.fits] or here
        top_row, top = max(fitting, key=lambda rp: rp[1].mfu)
        best = max(float(r["mfu"]) for r, _ in measured_ok) if measured_ok else None
        sweeps[name] = {
            "rows": len(here), "ok_rows": len(measured_ok),
            "spearman": spearman([p.mfu for _, p in measured_ok], [float(r["mfu"]) for r, _ in measured_ok]),
            "best_measured_mfu": best,
            "measured_mfu_of_top_ranked": float(top_row["mfu"]) if top_row["status"] == "ok" else None,
            "top_ranked_status": top_row["status"],
            "top_ranked": _describe(top_row), "top_ranked_predicted_mfu": top.mfu,
        }
    result = {"rows": len(rows), "oom_accuracy": float(np.mean(oom_hits)),
              "mfu_mape": float(np.mean(errors)) if errors else None,
              "mfu_median_ape": float(np.median(errors)) if errors else None, "sweeps": sweeps}
    if memory_errors:
        result["memory_mape"] = float(np.mean(memory_errors))
    return result


PREDICTED = ("predicted_mfu", "predicted_step_time_s", "predicted_memory_gib", "predicted_fits")


def write_predictions(path: str, rows: list[dict], predictions: list[Prediction]) -> None:
    """Each row as read, followed by its predicted MFU, step time, memory per GPU and fit."""
    with open(path, "w", newline="") as f:
        fields = [k for k in rows[0] if not k.startswith("_")]
        writer = csv.DictWriter(f, fieldnames=[*fields, *PREDICTED])
        writer.writeheader()
        for r, p in zip(rows, predictions):
            writer.writerow({**{k: r[k] for k in fields}, "predicted_mfu": f"{p.mfu:.4f}", "predicted_step_time_s": f"{p.step_time_s:.3f}",
                             "predicted_memory_gib": f"{p.memory_bytes['total'] / GIB:.2f}",
                             "predicted_fits": p.fits})


def _describe(row: dict) -> str:
    if "_workload" in row:
        return f"{row['layout']} T={row['seq_len']}"
    return (f"tp={row['tp']},pp={row['pp']} mbs={row['micro_batch_size']} sp={row['sequence_parallel']} "
            f"ckpt={row['activation_checkpointing']} kernel={row['kernel']}")


FRACTIONS = ("matmul_efficiency", "flash2_efficiency", "flash1_efficiency", "dp_overlap", "network_efficiency",
             "nvlink_efficiency", "cudnn_efficiency", "pallas_efficiency", "pallas_jax_efficiency")
STUDY_TIME_CONSTANTS = ("matmul_efficiency", "matmul_half_width", "flash2_efficiency", "flash1_efficiency",
                        "unfused_score_passes", "fused_score_passes", "norm_passes", "elementwise_passes",
                        "dp_overlap", "network_efficiency", "nvlink_efficiency", "bubble_factor", "layer_launch_s")
KERNEL_BENCH_PRIORS = {
    # From ``python -m jaxlayouts.kernel_bench`` on one H200 (16 heads, head dim 128, causal, bf16;
    # ../shared/measurements/h200-2026-11-30.md): cuDNN's fwd+bwd 302.9 TFLOP/s at T 2048 and 436.4
    # at 8192 give flash_half_seq = 1413 and 0.517 of 989 as T grows; the other kernels keep their
    # ratio to cuDNN at T 2048 (pallas 0.65, pallas_jax 0.39). The starting point of a fit, and the
    # value of a kernel no fitted row uses (flash_half_seq is never fitted). The matmul ceiling
    # (702 TFLOP/s at 16384 x 8192 x 8192 through JAX, the same file) fixes matmul_efficiency =
    # 702 / 989 x (8192 + 306.5) / 8192 = 0.737, never fitted either. H100 shares H200's.
    "h200": {"matmul_efficiency": 0.737, "flash_half_seq": 1413.0, "cudnn_efficiency": 0.517,
             "pallas_efficiency": 0.336, "pallas_jax_efficiency": 0.201},
}
STEP_START = {"layer_copy_passes": 1.0, "activation_store_passes": 1.0, "pallas_norm_passes": 2.0,
              "triton_norm_passes": 2.0}
"""Starting values of this project's step constants whose defaults (0, unset) switch them off."""


def fit(rows: list[dict], hw: Hardware, rounds: int = 3, log=print) -> Hardware:
    """Memory constants first (study rows: ``fit_memory``; bench rows: ``fit_memory_peaks``); then
    the time constants (study: ``STUDY_TIME_CONSTANTS``; bench: ``step_constants``) by Powell's
    method (``scipy.optimize``) on their logarithms against MFU error, fractions kept in (0, 1],
    ``rounds`` times from the previous result."""
    if all("_workload" in r for r in rows):
        time_names = step_constants(rows)
        base = read_calibration(calibration_path(BASE_CALIBRATION))  # never a fit of these rows
        hw = dataclasses.replace(hw, calibration=dataclasses.replace(
            base, **STEP_START, **KERNEL_BENCH_PRIORS.get(hw.calibration_from or hw.name, {})))
        hw = fit_memory_peaks(rows, hw)
    else:
        hw, time_names = fit_memory(rows, hw), study_constants(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    for round_ in range(rounds):
        x0 = np.log([max(_start(hw.calibration, n), 1e-6) for n in time_names])
        bounds = [(np.log(1e-3), 0.0) if n in FRACTIONS else (x - np.log(20), x + np.log(20))
                  for n, x in zip(time_names, x0)]
        x0 = np.clip(x0, *np.array(bounds).T)
        at = lambda x: _with(hw, **dict(zip(time_names, np.exp(x))))
        with warnings.catch_warnings():  # Powell's bounded line search divides by zero at a bound
            warnings.simplefilter("ignore", RuntimeWarning)
            result = scipy.optimize.minimize(lambda x: evaluate(ok, at(x))["mfu_mape"], x0, method="Powell",
                                             bounds=bounds, options={"xtol": 1e-3, "ftol": 1e-5})
        hw = at(result.x)
        log(f"round {round_ + 1}: OOM accuracy {evaluate(rows, hw)['oom_accuracy']:.4f}, "
            f"MFU error {result.fun:.4f} ({result.nfev} evaluations)")
    return hw


def _start(c, name: str) -> float:
    """A constant's value to fit from; an unset kernel efficiency starts at FlashAttention-2's,
    as the cost model reads it (``cost._flash_efficiency``)."""
    value = getattr(c, name)
    return c.flash2_efficiency if value is None else value


def leave_one_out(rows: list[dict], hw: Hardware, rounds: int = 3) -> list[Prediction]:
    """Each row predicted by a calibration ``fit`` on all the other rows (never on itself)."""
    return [predict(workload(row), fit(rows[:i] + rows[i + 1:], hw, rounds, log=lambda *_: None))
            for i, row in enumerate(rows)]


def cross_model(rows: list[dict], hw: Hardware, rounds: int = 3) -> dict:
    """Per model of the rows: its rows predicted by a ``fit`` on the other models' rows
    (``heldout``; the fit starts from the constants' defaults, never from a fit that saw the
    held-out rows), and by ``hw``'s own calibration (``calibration``), each ``evaluate``d; and
    the held-out ok rows with the ``worst`` MFU errors."""
    models = sorted({model_of(r) for r in rows})
    if len(models) < 2:
        raise InvalidInput("cross_model", f"the rows hold one model ({models[0]}); a cross-model figure needs two")
    result = {}
    for model in models:
        train, test = [r for r in rows if model_of(r) != model], [r for r in rows if model_of(r) == model]
        fitted = fit(train, dataclasses.replace(hw, calibration=Calibration()), rounds, log=lambda *_: None)
        predictions = predict_rows(test, fitted)
        errors = sorted(((p.mfu / float(r["mfu"]) - 1, r) for r, p in zip(test, predictions) if r["status"] == "ok"),
                        key=lambda e: -abs(e[0]))
        result[model] = {"fitted_on": sorted({model_of(r) for r in train}), "train_rows": len(train),
                         "heldout": evaluate(test, fitted, predictions), "calibration": evaluate(test, hw),
                         "worst": [{"row": _describe(r), "sweep": r["sweep"], "error": e} for e, r in errors[:5]]}
    return result


def cross_model_markdown(result: dict, command: str, calibration: str, date: str) -> str:
    """``cross_model``'s result as the tables of ``docs/results/study-heldout.md``."""
    pct = lambda v: "n/a" if v is None else f"{v:.1%}"
    rho = lambda v: "n/a" if v is None or not math.isfinite(v) else f"{v:.3f}"
    lines = ["# The planner's calibration held out across models", "",
             f"Generated on {date} by `{command}` (`jaxlayouts/plan/validate.py` `cross_model`). *Held out*: each "
             "model's rows predicted from a fit (`fit`, 3 rounds) on the other model's rows only, started from the "
             "constants' defaults; a constant those rows do not exercise keeps its default. *In sample*: the same "
             f"rows predicted by `{calibration}`, fitted on all rows.", "",
             "| predicted | fitted on | rows | OOM accuracy, held out / in sample | MFU error held out, "
             "median / mean abs | MFU error in sample, median / mean abs |", "| --- | --- | --- | --- | --- | --- |"]
    for model, r in result.items():
        h, c = r["heldout"], r["calibration"]
        lines.append(f"| {model} | {', '.join(r['fitted_on'])} ({r['train_rows']} rows) | {h['rows']} | "
                     f"{pct(h['oom_accuracy'])} / {pct(c['oom_accuracy'])} | {pct(h['mfu_median_ape'])} / "
                     f"{pct(h['mfu_mape'])} | {pct(c['mfu_median_ape'])} / {pct(c['mfu_mape'])} |")
    lines += ["", "| sweep | Spearman held out / in sample | best measured MFU | measured MFU of the first pick, "
              "held out / in sample |", "| --- | --- | --- | --- |"]
    first = lambda s: pct(s["measured_mfu_of_top_ranked"]) if s["measured_mfu_of_top_ranked"] is not None \
        else s["top_ranked_status"]
    for r in result.values():
        for name, h in r["heldout"]["sweeps"].items():
            c = r["calibration"]["sweeps"][name]
            lines.append(f"| {name} | {rho(h['spearman'])} / {rho(c['spearman'])} | {pct(h['best_measured_mfu'])} | "
                         f"{first(h)} / {first(c)} |")
    lines += ["", "The largest held-out MFU errors (predicted / measured - 1):", "",
              "| predicted | sweep | run | error |", "| --- | --- | --- | --- |"]
    lines += [f"| {model} | {w['sweep']} | {w['row']} | {w['error']:+.1%} |" for model, r in result.items() for w in r["worst"]]
    return "\n".join(lines) + "\n"


def study_constants(rows: list[dict]) -> list[str]:
    """``STUDY_TIME_CONSTANTS`` less those of the attention classes and the unfused norm no ok row
    uses: no row constrains them, so a fit would move them anywhere within their bounds."""
    loads = [workload(r) for r in rows if r["status"] == "ok"]
    used = {attention_class(w) for w in loads} | ({"norm"} if not all(w.fused_norm for w in loads) else set())
    unused = {name for kernel, name in (("flash2", "flash2_efficiency"), ("flash1", "flash1_efficiency"),
                                        ("unfused", "unfused_score_passes"), ("fused", "fused_score_passes"),
                                        ("norm", "norm_passes")) if kernel not in used}
    return [name for name in STUDY_TIME_CONSTANTS if name not in unused]


def step_constants(rows: list[dict]) -> list[str]:
    """The time constants of this project's step that ``rows`` exercise: the per-layer copies
    always; a kernel's constant only if some row uses that kernel. The matmul efficiency is
    measured on its own (``KERNEL_BENCH_PRIORS``), not fitted."""
    loads = [workload(r) for r in rows if r["status"] == "ok"]
    names = ["layer_copy_passes", "activation_store_passes"]
    kernels = {w.attention for w in loads} | {w.norm + "_norm" for w in loads}
    flash_first = sorted(ATTENTION.items(), key=lambda item: item[1].cost_class == "unfused")
    for kernel, name in ([(n, a.calibration) for n, a in flash_first]
                         + [(n + "_norm", r.calibration) for n, r in NORM.items()]):
        if kernel in kernels:
            names.append(name)
    return names


def fit_memory_peaks(rows: list[dict], hw: Hardware) -> Hardware:
    """``activation_factor`` and ``overhead_gib`` by non-negative least squares on the relative
    error of the predicted peak against each measured device peak (memory is linear in both)."""
    base = _with(hw, activation_factor=1.0, overhead_gib=0.0)
    measured = [(r["measured_peak_gib"] * GIB, memory(workload(r), base)) for r in rows
                if r["status"] == "ok" and r.get("measured_peak_gib")]
    if len(measured) < 2:
        return hw
    matrix = np.array([[m["activations"] / peak, GIB / peak] for peak, m in measured])
    target = np.array([(peak - (m["total"] - m["activations"])) / peak for peak, m in measured])
    (factor, overhead), _ = scipy.optimize.nnls(matrix, target)
    return _with(hw, activation_factor=round(factor, 3), overhead_gib=round(overhead, 2))


def fit_memory(rows: list[dict], hw: Hardware) -> Hardware:
    """``activation_factor``, ``tp_activation_factor`` and ``overhead_gib`` together, on a dense
    grid: a stage's memory is linear in them, so each row is costed once. Among the settings with
    the best OOM accuracy the one whose misclassified rows miss the limit by the fewest GiB in all
    wins."""
    base = _with(hw, activation_factor=1.0, tp_activation_factor=1.0, overhead_gib=0.0)
    loads = list(map(workload, rows))
    costed = [[stage_memory(w, base, stage) for stage in stages(w)] for w in loads]
    fixed = np.full((len(rows), max(map(len, costed))), -np.inf)   # rows x stages
    activations = np.zeros_like(fixed)
    for i, row in enumerate(costed):
        for j, m in enumerate(row):
            fixed[i, j], activations[i, j] = m["total"] - m["activations"], m["activations"]
    tensor_parallel = np.array([tp_activation_surcharge(w) for w in loads])[:, None]
    ok = np.array([r["status"] == "ok" for r in rows])[:, None]
    overheads = np.arange(0.0, 4.0, 0.05)
    best = None
    for factor in np.arange(1.0, 2.5, 0.005):
        for tp_factor in np.arange(1.0, 1.6, 0.01):
            scale = factor * np.where(tensor_parallel, tp_factor, 1.0)
            peak = (fixed + scale * activations).max(axis=1)[:, None]
            excess = (peak + overheads * GIB - hw.hbm_bytes) / GIB        # rows x overheads
            wrong = np.where(ok, np.maximum(excess, 0.0), np.maximum(-excess, 0.0))
            counts, missed = (wrong > 0).sum(axis=0), wrong.sum(axis=0)
            k = np.lexsort((missed, counts))[0]
            score = (counts[k], missed[k])
            if best is None or score < best[0]:
                best = (score, factor, tp_factor, overheads[k])
    return _with(hw, activation_factor=round(best[1], 3), tp_activation_factor=round(best[2], 3),
                 overhead_gib=round(best[3], 2))


def _with(hw: Hardware, **constants) -> Hardware:
    """``hw`` with some calibration constants replaced."""
    constants = {name: float(value) for name, value in constants.items()}
    return dataclasses.replace(hw, calibration=dataclasses.replace(hw.calibration, **constants))
