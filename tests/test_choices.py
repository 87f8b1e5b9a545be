"""Every record of ``choices.py`` is covered by every consumer: validation accepts exactly the
records' names; each attention kernel and norm has a model function, a cost class and a
calibration field the planner knows, and a place in the kernel benchmark (or a reason); each
remat policy has a JAX policy and an answer in the planner's kept-bytes and recompute functions;
the planner's search reads its kernels and policies from the records, with a reason for each one
left out. ``coverage_gaps`` lists what is missing, so a fake record shows up."""

import dataclasses

from jaxlayouts import choices
from jaxlayouts.choices import Attention, Norm, Remat

FAKE_ATTENTION = Attention("fake", "fake_attention", "flash3", "fake_efficiency", ring=True)
FAKE_NORM = Norm("fake", "fake_norm", True, "fake_norm_passes")
FAKE_REMAT = Remat("fake", "half", "nothing", False, keeps_scores=False, keeps_gathered_kv=False)


def coverage_gaps(attention=choices.ATTENTION, norm=choices.NORM, remat=choices.REMAT) -> list[str]:
    """What some consumer lacks for some record, one line each (empty: every record is covered)."""
    from jaxlayouts import kernel_bench, layout
    from jaxlayouts import remat as remat_module
    from jaxlayouts.model import attention as model_attention
    from jaxlayouts.model import norm as model_norm
    from jaxlayouts.model.ring_attention import BLOCKS
    from jaxlayouts.plan import cost, search
    from jaxlayouts.plan.hardware import Calibration

    calibration = {f.name for f in dataclasses.fields(Calibration)}
    accepted = {f.name: set(f.metadata["choices"]) for f in dataclasses.fields(layout.Layout)
                if f.name in ("attention", "norm", "remat", "zero")}
    gaps = []
    for kind, records in (("attention", attention), ("norm", norm), ("remat", remat)):
        if set(records) != accepted[kind]:
            gaps.append(f"{kind}: validation accepts {sorted(accepted[kind])}, the records are {sorted(records)}")
        for name, r in records.items():
            if not r.planner_searches and not r.not_searched:
                gaps.append(f"{kind} {name}: left out of the planner's search without a reason")
            if r.planner_searches and name not in {c for pair in search.KERNELS for c in pair} | set(search.REMATS):
                gaps.append(f"{kind} {name}: searched but in none of plan/search.py's lists")
    for kind, records, module, bench in (("attention", attention, model_attention, kernel_bench.FLAGS["attention"]),
                                         ("norm", norm, model_norm, kernel_bench.FLAGS["norm"])):
        for name, r in records.items():
            if not callable(getattr(module, r.function, None)) or name not in module.IMPLEMENTATIONS:
                gaps.append(f"{kind} {name}: no model function {module.__name__}.{r.function}")
            if r.calibration not in calibration:
                gaps.append(f"{kind} {name}: calibration field {r.calibration} is not on plan.hardware.Calibration")
            if (name in bench.default) != r.benchmarked or not (r.benchmarked or r.not_benchmarked):
                gaps.append(f"{kind} {name}: not in kernel_bench.py's default --{kind} list, and no reason")
    for name, a in attention.items():
        if a.cost_class not in cost.ATTENTION_CLASSES or cost.ATTENTION_CLASS.get(name) != a.cost_class:
            gaps.append(f"attention {name}: cost class {a.cost_class} unknown to plan/cost.py")
        if a.ring != (name in BLOCKS) or a.ring != (name in layout.RING_ATTENTION):
            gaps.append(f"attention {name}: ring={a.ring}, but model/ring_attention.BLOCKS or layout disagree")
    for name, r in remat.items():
        if name not in remat_module.POLICIES:
            gaps.append(f"remat {name}: no JAX policy in remat.POLICIES")
        if r.keeps not in choices.KEEPS:
            gaps.append(f"remat {name}: plan/cost.py step_layer_kept_bytes has no answer for keeps={r.keeps}")
        if r.recomputes not in choices.RECOMPUTES:
            gaps.append(f"remat {name}: plan/cost.py recomputed_time has no answer for recomputes={r.recomputes}")
    return gaps


def test_every_consumer_covers_every_record():
    assert coverage_gaps() == []


def test_a_record_no_consumer_knows_is_caught():
    gaps = coverage_gaps(attention={**choices.ATTENTION, "fake": FAKE_ATTENTION},
                         norm={**choices.NORM, "fake": FAKE_NORM}, remat={**choices.REMAT, "fake": FAKE_REMAT})
    for expected in ("attention: validation accepts", "attention fake: no model function",
                     "attention fake: calibration field", "attention fake: not in kernel_bench",
                     "attention fake: cost class flash3", "attention fake: ring=True",
                     "norm fake: no model function", "norm fake: calibration field",
                     "remat fake: no JAX policy", "remat fake: plan/cost.py step_layer_kept_bytes",
                     "remat: validation accepts"):
        assert any(g.startswith(expected) for g in gaps), (expected, gaps)


def test_the_planner_answers_for_every_remat_record():
    """Kept bytes, recomputed time, tp collectives and attention re-runs for every policy."""
    from jaxlayouts.layout import load_model_config
    from jaxlayouts.plan import cost

    layer = cost.LayerTimes(forward=3.0, backward=6.0, attention=1.0, elementwise=0.5)
    for policy, r in choices.REMAT.items():
        for attention, cp in (("xla", 1), ("pallas", 2)):
            w = cost.Workload(model=load_model_config("llama-7b"), seq_len=4096, global_batch=64, data_parallel=8,
                              tp=2, pp=1, micro_batch=1, attention=attention, zero=1, remat=policy, cp=cp)
            assert cost.step_layer_kept_bytes(w, policy) > 0
            assert cost.keeps_layer_input_only(policy) == (r.keeps == "input")
        assert cost.recomputed_time(r.recomputes, layer) >= 0


def test_zero_stages_shard_more_as_they_go():
    stages = [choices.ZERO[s] for s in sorted(choices.ZERO)]
    shards = [(z.shards_state, z.shards_gradients, z.shards_weights) for z in stages]
    assert shards == sorted(shards) and shards[0] == (False,) * 3 and shards[-1] == (True,) * 3


def test_gpu_only_choices_name_an_alternative_the_records_accept():
    for (kind, name), alternative in choices.GPU_ONLY.items():
        records = {"attention": choices.ATTENTION, "norm": choices.NORM, "remat": choices.REMAT}[kind]
        offered = [w.strip(",") for w in alternative.split()[2:] if w != "or"]
        assert offered and all(o in records and not records[o].gpu_only for o in offered), (kind, name)
