"""Validate (and fit) the cost model against measured runs in the reference study's CSV format.

Each row is predicted as the study ran it: its authors' Megatron-style trainer
(``plan/study.py``), ZeRO-1 over the data-parallel ranks, 1F1B, ~4M tokens per step, its
kernel names mapped to cost classes. Reported: out-of-memory classification accuracy (rows
measured ok or oom), MFU mean absolute percentage error on rows measured ok, and per sweep the
Spearman rank correlation of predicted vs measured MFU and the measured MFU of the layout the
planner ranks first (best predicted MFU among rows it predicts to fit) next to the best measured
MFU.

``--fit`` re-fits the calibration constants on the file (see ``fit``): memory constants maximise
OOM accuracy (``fit_memory``), time constants minimise MFU error; the result is written to
``configs/hardware/NAME.calibration.yaml``.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import warnings

import numpy as np
import scipy.optimize
import scipy.stats

from jaxlayouts.layout import InvalidLayout, load_model_config
from jaxlayouts.plan.cost import GIB, Prediction, Workload, predict, stage_memory, stages, tp_activation_surcharge
from jaxlayouts.plan.hardware import Calibration, Hardware
from jaxlayouts.plan.study import STUDY

KERNELS = {"torch": ("unfused", False), "fused": ("fused", False), "flash_attention": ("flash1", False),
           "flash_attention1": ("flash1", False), "flash_attention2": ("flash2", False),
           "flash_attention2+rms_kernel": ("flash2", True)}
"""The study's kernel names -> (attention cost class, fused RMSNorm)."""
TOKENS_PER_STEP = 4 * 2 ** 20
REQUIRED = ("sweep", "model", "seq_len", "world_size", "micro_batch_size", "tp", "pp", "sequence_parallel",
            "activation_checkpointing", "kernel", "status", "mfu")
MEMORY_CONSTANTS = ("activation_factor", "tp_activation_factor", "overhead_gib")


def read_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in REQUIRED if rows and c not in rows[0]]
    if not rows or missing:
        raise InvalidLayout("file", f"{path}: expected the study's CSV columns; missing {missing or 'rows'}")
    return [r for r in rows if r["status"] in ("ok", "oom")]


def workload(row: dict) -> Workload:
    model = _model_config(f"llama-{row['model'].lower()}")
    try:
        seq_len, world, tp, pp, micro_batch = (int(row[c]) for c in ("seq_len", "world_size", "tp", "pp",
                                                                       "micro_batch_size"))
    except ValueError as error:
        raise InvalidLayout("file", f"sweep {row['sweep']!r}: {error}; sizes are integers") from None
    if min(seq_len, world, tp, pp, micro_batch) < 1 or world % (tp * pp) or pp > model.num_layers:
        raise InvalidLayout("file", f"sweep {row['sweep']!r}: tp={tp}, pp={pp} on {world} GPUs with "
                            f"micro-batch {micro_batch} at {seq_len} tokens; sizes are positive, tp x pp "
                            f"divides world_size and pp is at most the {model.num_layers} layers")
    if row["kernel"] not in KERNELS:
        raise InvalidLayout("file", f"kernel {row['kernel']!r} in sweep {row['sweep']!r}; the study's names "
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
    return {"rows": len(rows), "oom_accuracy": float(np.mean(oom_hits)),
            "mfu_mape": float(np.mean(errors)) if errors else None, "sweeps": sweeps}


PREDICTED = ("predicted_mfu", "predicted_step_time_s", "predicted_memory_gib", "predicted_fits")


def write_predictions(path: str, rows: list[dict], predictions: list[Prediction]) -> None:
    """Each row as read, followed by its predicted MFU, step time, memory per GPU and fit."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0], *PREDICTED])
        writer.writeheader()
        for r, p in zip(rows, predictions):
            writer.writerow({**r, "predicted_mfu": f"{p.mfu:.4f}", "predicted_step_time_s": f"{p.step_time_s:.3f}",
                             "predicted_memory_gib": f"{p.memory_bytes['total'] / GIB:.2f}",
                             "predicted_fits": p.fits})


def _describe(row: dict) -> str:
    return (f"tp={row['tp']},pp={row['pp']} mbs={row['micro_batch_size']} sp={row['sequence_parallel']} "
            f"ckpt={row['activation_checkpointing']} kernel={row['kernel']}")


FRACTIONS = ("matmul_efficiency", "flash2_efficiency", "flash1_efficiency", "dp_overlap", "network_efficiency",
             "nvlink_efficiency")


def fit(rows: list[dict], hw: Hardware, rounds: int = 3, log=print) -> Hardware:
    """The memory constants by ``fit_memory``; then the time constants by Powell's method
    (``scipy.optimize``) on their logarithms against MFU error, fractions kept in (0, 1],
    ``rounds`` times from the previous result."""
    hw = fit_memory(rows, hw)
    ok = [r for r in rows if r["status"] == "ok"]
    time_names = [n for n in Calibration.fields() if n not in MEMORY_CONSTANTS]
    for round_ in range(rounds):
        x0 = np.log([max(getattr(hw.calibration, n), 1e-6) for n in time_names])
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
