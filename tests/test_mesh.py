"""Parameters and optimizer state are sharded the way the rules and ZeRO stage say."""

import pytest
from conftest import make_run
from jax.sharding import PartitionSpec as P

from jaxlayouts.mesh import build_mesh, compute_rules, spec, state_rules
from jaxlayouts.train import Trainer


def trainer(devices, mesh, **kwargs):
    run = make_run(mesh, **kwargs)
    return Trainer(run, build_mesh(run.layout, devices[:run.layout.num_devices]))


def test_megatron_tensor_parallel_specs(devices):
    t = trainer(devices, "dp=2,tp=4")
    params = t.master_shardings
    assert params["layers"]["attn"]["wq"].spec == P("pp", None, "tp", None)  # columns: heads
    assert params["layers"]["attn"]["wo"].spec == P("pp", "tp", None, None)  # rows: heads
    assert params["layers"]["mlp"]["w1"].spec == P("pp", None, "tp")
    assert params["layers"]["mlp"]["w2"].spec == P("pp", "tp", None)
    assert params["embedding"].spec == P("tp", None)  # vocabulary-parallel embedding
    assert params["lm_head"].spec == P(None, "tp")


@pytest.mark.parametrize("zero, master, grads, compute", [
    (1, True, False, False),
    (2, True, True, False),
    (3, True, True, True),
])
def test_zero_stage_decides_what_is_sharded_over_fsdp(devices, zero, master, grads, compute):
    t = trainer(devices, "fsdp=4,tp=2", zero=zero)
    sharded = lambda shardings: "fsdp" in tuple(shardings["layers"]["mlp"]["w1"].spec)
    assert sharded(t.master_shardings) is master
    assert sharded(t.grad_shardings) is grads
    assert sharded(t.compute_shardings) is compute
    mu = t.state_shardings.opt_state[1][0].mu  # chain(clip, adamw) -> adam's state
    assert mu["layers"]["mlp"]["w1"].spec == P("pp", "fsdp", "tp")


def test_per_device_parameter_bytes_fall_with_zero3(devices):
    t = trainer(devices, "fsdp=8", zero=3)
    state = t.init_state()
    wq = state.params["layers"]["attn"]["wq"]
    assert wq.addressable_shards[0].data.shape == (4, 128 // 8, 8, 16)
    assert state.opt_state[1][0].nu["layers"]["attn"]["wq"].addressable_shards[0].data.shape == (4, 16, 8, 16)


def test_sequence_parallel_rule_shards_the_residual_stream():
    run = make_run("dp=2,tp=4", sequence_parallel=True)
    assert spec(("batch", "act_seq", "act_embed"), compute_rules(run.layout)) == P(("dp", "fsdp"), "tp", None)
    plain = make_run("dp=2,tp=4")
    assert spec(("batch", "act_seq", "act_embed"), compute_rules(plain.layout)) == P(("dp", "fsdp"), None, None)


def test_rules_can_be_overridden():
    run = make_run("fsdp=2,tp=4")
    rules = state_rules(run.layout, overrides={"vocab": None})
    assert spec(("vocab", "embed"), rules) == P(None, "fsdp")
    assert spec(("vocab", "embed"), state_rules(run.layout)) == P("tp", "fsdp")


def test_a_mesh_axis_is_used_once():
    rules = (("a", "tp"), ("b", ("tp", "dp")))
    assert spec(("a", "b"), rules) == P("tp", "dp")
