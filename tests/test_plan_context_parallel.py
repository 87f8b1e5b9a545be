"""Context parallelism in the cost model, the planner and explore: memory over cp, ring sends and
their overlap with attention, gradients summed over cp, the long-sequence enumeration, and one
compiled cp layout against the model."""

import dataclasses

import pytest
from conftest import make_run, run_module

from jaxlayouts.layout import load_model_config
from jaxlayouts.plan import cost
from jaxlayouts.plan.search import CP_MIN_TOKENS_PER_DEVICE, candidates, context_parallel_degrees, rank
from jaxlayouts.plan.hardware import load_hardware
from jaxlayouts.plan.study import STUDY

LONG = 32768


def workload(**changes) -> cost.Workload:
    base = dict(model=load_model_config("llama-7b"), seq_len=LONG, global_batch=16, data_parallel=4, tp=2, pp=1,
                micro_batch=1, attention="pallas", zero=1)
    return cost.Workload(**{**base, **changes})


def test_activations_fall_with_cp_and_the_training_state_does_not():
    """At 32k tokens: activations (logits included) per device fall as 1/cp; weights, gradients
    and optimizer state are replicated over cp and stay; xla attention under the ring keeps no
    scores; inside a pipeline all-gather CP keeps the whole sequence's K/V."""
    hw = load_hardware("h100-80gb")
    memory = {cp: cost.memory(workload(cp=cp), hw) for cp in (1, 2, 4)}
    for cp in (2, 4):
        assert memory[cp]["activations"] == pytest.approx(memory[1]["activations"] / cp, rel=1e-9)
        for state in ("weights", "gradients", "optimizer"):
            assert memory[cp][state] == memory[1][state]
    unfused = {cp: cost.memory(workload(cp=cp, attention="xla"), hw)["activations"] for cp in (1, 2)}
    assert unfused[2] < unfused[1] / 10  # the ring keeps no T x T scores; unfused cp=1 keeps them all
    # all-gather CP (pp > 1): per layer the other devices' K/V, 2 (T - T/cp) d e bytes per layer over tp
    m = load_model_config("llama-7b")
    piped = dict(pp=2, attention="xla")  # its s x T scores halve with s; the gathered K/V come on top
    layer = {cp: cost.layer_activation_bytes(workload(cp=cp, **piped)) for cp in (1, 2)}
    gathered = 2 * (LONG - LONG // 2) * m.d_model * 2 / 2
    assert layer[2] == pytest.approx(layer[1] / 2 + gathered, rel=1e-9)


def test_ring_bytes_follow_the_formula():
    """Per layer and micro-batch: cp - 1 K/V sends forward, cp - 1 K/V and cp float32 dK/dV sends
    backward, each 2 b (T/cp) kv_heads/tp head_dim elements."""
    w = workload(cp=4, micro_batch=2)
    kv = 2 * 2 * (LONG // 4) * 32 / 2 * 128 * 2          # b=2, kv_heads=32 over tp=2, head_dim 128, bf16
    dkv = kv / 2 * 4
    traffic = cost.context_traffic(w)
    assert traffic.kind == "ring" and traffic.bytes == 3 * kv + 3 * kv + 4 * dkv
    assert cost.context_traffic(workload()).bytes == 0
    per_step = cost.collective_bytes(w)["cp"]
    gradients = 2 * cost.stage_params(w) * w.microbatches  # bf16 gradients all-reduced over cp per micro-batch
    assert per_step == pytest.approx(gradients + 32 * w.microbatches * traffic.bytes, rel=1e-12)


def test_ring_sends_hide_behind_block_compute_until_they_outlast_it():
    """Each ring step's send overlaps one block of attention: with fast links nothing but the last
    dK/dV send shows; with slow links the exposed time lies between the sends minus all of the
    attention compute and the sends themselves."""
    base = dataclasses.replace(load_hardware("h100-80gb"), collective_latency_s=0.0)
    w = workload(cp=4, tp=1, data_parallel=2)
    per_node = w.trainer.per_node(w, base.gpus_per_node)
    assert per_node["cp"] == 4  # the ring fits in a node: NVLink
    forward, backward = cost._attention_times(w, base)
    kv, dkv = cost.kv_block_bytes(w), cost.kv_block_bytes(w, 4)
    sends = 3 * kv + 3 * (kv + dkv) + dkv

    def exposed(bandwidth):
        hw = dataclasses.replace(base, intra_node_bandwidth=bandwidth, inter_node_bandwidth=bandwidth)
        return cost.context_parallel_time(w, hw, per_node), bandwidth * hw.calibration.nvlink_efficiency

    fast, link = exposed(1e15)
    assert fast == pytest.approx(dkv / link, rel=1e-9) and fast < 1e-3 * forward  # only the final dK/dV send
    slow, link = exposed(1e9)
    assert sends / link - (forward + backward) <= slow <= sends / link and slow > forward
    hw_slow = dataclasses.replace(base, intra_node_bandwidth=1e9, inter_node_bandwidth=1e9)
    fast_hw = dataclasses.replace(base, intra_node_bandwidth=1e15, inter_node_bandwidth=1e15)
    times = {hw.intra_node_bandwidth: cost.predict(w, hw).time_s for hw in (hw_slow, fast_hw)}
    layers_mb = w.model.num_layers * w.microbatches
    assert times[1e9]["context_parallel"] == pytest.approx(layers_mb * slow, rel=1e-9)
    assert times[1e15]["context_parallel"] < 1e-3 * times[1e15]["compute"]
    assert "context_parallel" not in cost.predict(workload(), base).time_s  # cp = 1 reports as before


def test_gradients_are_reduced_over_the_cp_replicas():
    """cp replicates the parameters: the data collectives stay as they were, and every micro-batch's
    gradients are all-reduced over cp (in the compute dtype), which costs time over cp's link."""
    hw = load_hardware("h100-80gb")
    plain, split = workload(zero=0), workload(zero=0, cp=2)
    params = cost.stage_params(split)
    assert params == cost.stage_params(plain)
    table = split.trainer.data_collectives(split, params)
    assert table[:-1] == plain.trainer.data_collectives(plain, params)
    assert table[-1] == cost.Collective("all-reduce", 2 * params, split.microbatches, "cp")
    assert cost.collective_bytes(split)["data"] == cost.collective_bytes(plain)["data"] == 4 * params
    per_node = split.trainer.per_node(split, hw.gpus_per_node)
    assert cost.data_parallel_time(split, hw, per_node) > cost.data_parallel_time(plain, hw, per_node)


def test_the_study_trainer_has_no_context_parallelism():
    with pytest.raises(ValueError, match="study trainer has no context parallelism"):
        workload(cp=2, trainer=STUDY)
    with pytest.raises(ValueError, match="positive divisor of seq_len"):
        workload(cp=3)


def test_the_planner_enumerates_cp_only_for_long_sequences():
    assert context_parallel_degrees(CP_MIN_TOKENS_PER_DEVICE, 64) == [1]       # unchanged up to 8k tokens
    assert context_parallel_degrees(2 * CP_MIN_TOKENS_PER_DEVICE, 64) == [1, 2]
    assert context_parallel_degrees(LONG, 64) == [1, 2, 4] and context_parallel_degrees(LONG, 6) == [1, 2]
    model, hw = load_model_config("llama-7b"), load_hardware("h100-80gb")
    runs = list(candidates(model, 64, LONG, 64, hw.gpus_per_node))
    with_cp = [r for r in runs if r.layout.mesh["cp"] > 1]
    assert {r.layout.mesh["cp"] for r in with_cp} == {2, 4}
    assert not [r for r in with_cp if r.layout.mesh["pp"] > 1 and r.layout.attention != "xla"]
    top = rank(runs, hw)[0]
    assert top["fits"] and top["memory_gib"]["total"] <= hw.usable_bytes / 2**30
    short = list(candidates(model, 64, 2048, 64, hw.gpus_per_node))
    assert short and all(r.layout.mesh["cp"] == 1 for r in short)


def test_plan_explains_a_cp_layout():
    proc, _ = run_module("jaxlayouts.plan", "--model", "llama-7b", "--seq_len", str(LONG), "--global_batch", "16",
                         "--hardware", "h100-80gb", "--explain", "fsdp=4,cp=4,tp=2 zero=1 attn=pallas")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "context_parallel" in proc.stdout and "context parallelism: cp=4" in proc.stdout
    assert "3 K/V send(s) of 64 MiB forward" in proc.stdout  # K and V: 2 x 8192 tokens x 16 kv heads x 128 x 2 bytes


@pytest.fixture(scope="module")
def cp_report(devices):
    """The tiny model at cp=2, tp=2 compiled once (float32, as the other cross-checks)."""
    from jaxlayouts import explore
    return explore.layout("tiny", mesh="cp=2,tp=2", seq_len=256, global_batch=8, dtype="float32")


def test_explore_shows_cp_and_agrees_with_the_model(cp_report):
    """Activations sequence-sharded over cp, ring attention's collective-permutes over cp, the
    planner's paragraph on cp; collective bytes over cp (ring sends and gradient all-reduces) within
    10% of the compiled HLO's, memory within 25% of XLA's analysis (as tests/test_plan_cost.py checks
    the other axes)."""
    r = cp_report
    specs = {a["name"]: a["spec"] for a in r["activations"]}
    assert "'cp'" in specs["residual"] and "'cp'" in specs["attention_heads"] and "'cp'" in specs["logits"]
    assert r["layout"].startswith("dp=1,fsdp=1,cp=2,tp=2,pp=1") and "context     cp=2" in r.text()
    over_cp = [c for c in r["collectives"] if c["axes"] == ["cp"]]
    permutes = sum(c["bytes"] * c["count"] for c in over_cp if c["kind"] == "collective-permute")
    reduces = sum(c["bytes"] * c["count"] for c in over_cp if c["kind"] == "all-reduce")
    w = cost.Workload.from_run(make_run("cp=2,tp=2", seq_len=256, global_batch=8))
    traffic = cost.context_traffic(w)
    assert permutes > 0 and traffic.kind == "ring"
    assert permutes == pytest.approx(w.model.num_layers * w.microbatches * traffic.bytes, rel=0.10)
    gradients = sum(c.bytes * c.times for c in w.trainer.data_collectives(w, cost.stage_params(w)) if c.over == "cp")
    assert reduces == pytest.approx(gradients, rel=0.10)
    assert permutes + reduces == pytest.approx(cost.collective_bytes(w)["cp"], rel=0.10)
    analytic = r["memory"]["analytic"]
    assert analytic["total"] - analytic["overhead"] == pytest.approx(r["memory"]["compiled"]["peak"], rel=0.25)
    a100 = load_hardware("a100-80gb")  # the report's hardware: its prediction is the cp workload's
    assert analytic["activations"] == pytest.approx(cost.memory(w, a100)["activations"])
    assert r["predicted"]["step_time_s"] == pytest.approx(cost.predict(w, a100).step_time_s)
