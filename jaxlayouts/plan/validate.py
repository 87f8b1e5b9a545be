"""Validate (and fit) the cost model against measured runs in the reference study's CSV format.

Each row is predicted as the study ran it: Megatron-style trainer, ZeRO-1 over the data-parallel
ranks, 1F1B, ~4M tokens per step, its kernel names mapped to cost classes. Reported: out-of-memory
classification accuracy (rows measured ok or oom), MFU mean absolute percentage error on rows
measured ok, and per sweep the Spearman rank correlation of predicted vs measured MFU and the
measured MFU of the layout the planner ranks first (best predicted MFU among rows it predicts to
fit) next to the best measured MFU.

``--fit`` re-fits the calibration constants on the file by coordinate descent (each constant over
a multiplicative grid, a few rounds): memory constants maximise OOM accuracy, time constants
minimise MFU error; the result is written to ``configs/hardware/NAME.calibration.yaml``.
"""

from __future__ import annotations

import csv
import dataclasses

import numpy as np

from jaxlayouts.layout import InvalidLayout, load_model_config
from jaxlayouts.plan.cost import Workload, predict
from jaxlayouts.plan.hardware import Calibration, Hardware

KERNELS = {"torch": ("unfused", False), "fused": ("fused", False), "flash_attention": ("flash1", False),
           "flash_attention1": ("flash1", False), "flash_attention2": ("flash2", False),
           "flash_attention2+rms_kernel": ("flash2", True)}
"""The study's kernel names -> (attention cost class, fused RMSNorm)."""
TOKENS_PER_STEP = 4 * 2 ** 20
REQUIRED = ("sweep", "model", "seq_len", "world_size", "micro_batch_size", "tp", "pp", "sequence_parallel",
            "activation_checkpointing", "kernel", "status", "mfu")
MEMORY_CONSTANTS = ("activation_factor", "overhead_gib")


def read_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in REQUIRED if rows and c not in rows[0]]
    if not rows or missing:
        raise InvalidLayout("file", f"{path}: expected the study's CSV columns; missing {missing or 'rows'}")
    return [r for r in rows if r["status"] in ("ok", "oom")]


def workload(row: dict) -> Workload:
    model = load_model_config(f"llama-{row['model'].lower()}")
    seq_len, world = int(row["seq_len"]), int(row["world_size"])
    tp, pp = int(row["tp"]), int(row["pp"])
    attention, fused_norm = KERNELS[row["kernel"]]
    return Workload(model=model, seq_len=seq_len, global_batch=TOKENS_PER_STEP // seq_len,
                    data_parallel=world // (tp * pp), tp=tp, pp=pp, micro_batch=int(row["micro_batch_size"]),
                    sequence_parallel=row["sequence_parallel"] == "True",
                    remat="full" if row["activation_checkpointing"] == "every_layer" else "none",
                    attention=attention, fused_norm=fused_norm, zero=1, schedule="1f1b", framework="megatron")


def spearman(a, b) -> float:
    rank = lambda x: np.argsort(np.argsort(x)).astype(float)
    ra, rb = rank(np.asarray(a)), rank(np.asarray(b))
    if len(ra) < 2 or ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def evaluate(rows: list[dict], hw: Hardware) -> dict:
    predictions = [predict(workload(r), hw) for r in rows]
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


def _describe(row: dict) -> str:
    return (f"tp={row['tp']},pp={row['pp']} mbs={row['micro_batch_size']} sp={row['sequence_parallel']} "
            f"ckpt={row['activation_checkpointing']} kernel={row['kernel']}")


def _objective(rows, hw: Hardware, names) -> float:
    result = evaluate(rows, hw)
    if set(names) <= set(MEMORY_CONSTANTS):
        return 1.0 - result["oom_accuracy"]
    return result["mfu_mape"]


def fit(rows: list[dict], hw: Hardware, rounds: int = 3, log=print) -> Hardware:
    """Coordinate descent over each constant on a multiplicative grid (x0.5 .. x2), memory
    constants against OOM accuracy, time constants against MFU error."""
    groups = (list(MEMORY_CONSTANTS), [n for n in Calibration.fields() if n not in MEMORY_CONSTANTS])
    factors = (0.5, 0.7, 0.85, 0.93, 1.0, 1.07, 1.15, 1.3, 1.5, 2.0)
    for round_ in range(rounds):
        for names in groups:
            for name in names:
                current = getattr(hw.calibration, name)
                candidates = sorted({current * f for f in factors})
                if name in ("matmul_efficiency", "flash2_efficiency", "flash1_efficiency", "dp_overlap",
                            "network_efficiency"):
                    candidates = [c for c in candidates if c <= 1.0]
                scored = [(_objective(rows, _with(hw, name, c), names), c) for c in candidates]
                best_score, best = min(scored, key=lambda sc: (sc[0], abs(sc[1] - current)))
                hw = _with(hw, name, best)
            log(f"round {round_ + 1}: {', '.join(names)} -> objective {best_score:.4f}")
    return hw


def _with(hw: Hardware, name: str, value: float) -> Hardware:
    return dataclasses.replace(hw, calibration=dataclasses.replace(hw.calibration, **{name: value}))
