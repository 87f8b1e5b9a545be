"""The planner's search: every valid layout of a model on G GPUs, scored and ranked.

The layout space: tp (inside a node) x pp x data axis (dp with ZeRO-0, or fsdp with ZeRO-1/2/3),
micro-batch, sequence parallelism, remat, attention and norm kernels, pipeline schedule, and for
long sequences context parallelism (``cp``, see :data:`CP_MIN_TOKENS_PER_DEVICE`). Every
candidate passes the same validation as the bench, is scored by ``plan/cost.py`` and ranked by
predicted MFU among those predicted to fit.
"""

from __future__ import annotations

import itertools
import math

from jaxlayouts.choices import ATTENTION, KEEPS, NORM, REMAT, ZERO
from jaxlayouts.layout import ContextParallel, InvalidInput, Layout, RunConfig, validate
from jaxlayouts.plan import cost

MICRO_BATCHES = (1, 2, 4, 8)
REMATS = tuple(sorted((name for name, r in REMAT.items() if r.planner_searches),
                     key=lambda name: KEEPS.index(REMAT[name].keeps)))
"""The remat policies searched (``choices.Remat.planner_searches``), the one that keeps most first."""
KERNELS = tuple((attention, norm) for attention, a in ATTENTION.items() if a.planner_searches
                for norm, n in NORM.items() if n.planner_searches and (a.cost_class != "unfused" or not n.fused))
"""(attention, norm) pairs searched (``planner_searches`` of their records): a fused norm only with
a flash attention kernel."""
NOT_SEARCHED = {f"{kind}={name}": r.not_searched for kind, records in (("remat", REMAT), ("attn", ATTENTION),
                                                                      ("norm", NORM))
                for name, r in records.items() if not r.planner_searches}
"""The choices the search leaves out, each with its record's reason."""


def not_searched_text() -> str:
    """One line per choice the search leaves out, with why."""
    return "\n".join(f"not searched: {choice}: {why}" for choice, why in NOT_SEARCHED.items())


CP_MIN_TOKENS_PER_DEVICE = 8192
"""Context parallelism is enumerated for long sequences only: cp = 2, 4, 8, ... while each device
keeps at least this many tokens of a sequence (``seq_len / cp >= 8192``), so a sequence of at most
8192 tokens gets exactly the candidates it had before cp existed. Why 8192: Llama 3 (Dubey et al.
2024, Sec. 3.3.2, Table 4) trains without CP at 8,192 tokens and with cp = 16 at 131,072, i.e.
8,192 tokens per device; and Ring Attention hides a step's K/V send only while a block's compute
outlasts it (Liu et al. 2023, Sec. 3: the block grows with the ratio of FLOP/s to link bandwidth),
which ``plan/cost.py`` charges (``context_parallel_time``). Fewer tokens per device buy memory the
other axes can buy with less exposed communication."""


def _divisors(n: int) -> list[int]:
    small = [k for k in range(1, math.isqrt(n) + 1) if n % k == 0]
    return sorted(set(small + [n // k for k in small]))


def context_parallel_degrees(seq_len: int, gpus: int) -> list[int]:
    """cp = 1, then powers of two while ``seq_len / cp >= CP_MIN_TOKENS_PER_DEVICE``, cp divides
    the GPUs and the sequence splits into 2 cp zigzag chunks (``layout._validate_context_parallel``)."""
    degrees, cp = [1], 2
    while seq_len // cp >= CP_MIN_TOKENS_PER_DEVICE and gpus % cp == 0 and seq_len % (2 * cp) == 0:
        degrees.append(cp)
        cp *= 2
    return degrees


def candidates(model, gpus: int, seq_len: int, global_batch: int, gpus_per_node: int):
    """Every valid layout of the space (see the module docstring) as RunConfigs, cp = 1 first."""
    for cp, tp, pp in itertools.product(context_parallel_degrees(seq_len, gpus),
                                        _divisors(min(gpus, gpus_per_node)), _divisors(gpus)):
        data = gpus // (cp * tp * pp) if gpus % (cp * tp * pp) == 0 else 0
        if not data or global_batch % data or model.num_layers % pp:
            continue  # validation would reject every layout of this (cp, tp, pp): skip them unbuilt
        meshes = [({"dp": data, "cp": cp, "tp": tp, "pp": pp}, 0)]
        if data > 1:
            meshes += [({"fsdp": data, "cp": cp, "tp": tp, "pp": pp}, zero) for zero, z in ZERO.items() if z.shards_state]
        schedules = [("1f1b", 1)] if pp == 1 else [("1f1b", 1), ("gpipe", 1), ("circular", 2)]
        kernels = [k for k in KERNELS if ContextParallel.of(cp, pp).runs(k[0])]
        for (mesh, zero), mbs, sp, remat, (attn, norm), (schedule, v) in itertools.product(
                meshes, MICRO_BATCHES, (False, True), REMATS, kernels, schedules):
            layout = Layout(mesh=mesh, micro_batch=mbs, zero=zero, sequence_parallel=sp, remat=remat,
                            attention=attn, norm=norm, pipeline_schedule=schedule, virtual_stages=v)
            run = RunConfig(model=model, layout=layout, seq_len=seq_len, global_batch=global_batch)
            try:
                validate(run, gpus, platform="gpu")
            except InvalidInput:
                continue
            yield run


def row(run: RunConfig, prediction: cost.Prediction, hw) -> dict:
    gib = lambda b: b / 2 ** 30
    return {"layout": str(run.layout), "predicted": True, "mfu": prediction.mfu,
            "step_time_s": prediction.step_time_s, "fits": prediction.fits,
            "memory_gib": {k: gib(v) for k, v in prediction.memory_bytes.items()},
            "time_s": prediction.time_s, "dominant": prediction.dominant,
            "unmeasured_kernels": unmeasured_kernels(run.layout, hw)}


def unmeasured_kernels(layout: Layout, hw) -> list[str]:
    """The layout's kernels no row of ``hw``'s calibration timed on ``hw``'s chip (all of them
    when the calibration does not say what it was fitted on)."""
    if hw.fitted_on is None:
        return [f"attn={layout.attention}", f"norm={layout.norm}"]
    return hw.fitted_on.unmeasured(layout.attention, layout.norm, hw.name)


def rank(runs, hw) -> list[dict]:
    rows = [row(run, cost.predict(cost.Workload.from_run(run), hw), hw) for run in runs]
    return sorted(rows, key=lambda r: (not r["fits"], -r["mfu"]))
