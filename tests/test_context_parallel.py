"""Context parallelism: ring attention over ``cp`` computes the single-device run, sends K/V with
one collective-permute per ring step, and divides activation memory by about cp."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_run, run_bench, step_gradients
from jax.sharding import AxisType, PartitionSpec as P

from jaxlayouts.analysis import hlo
from jaxlayouts.layout import InvalidInput, load_model_config, validate, zigzag_order
from jaxlayouts.mesh import build_mesh
from jaxlayouts.model.attention import xla_attention
from jaxlayouts.model import ring_attention as ring_attention_module
from jaxlayouts.model.ring_attention import ring_attention
from jaxlayouts.train import Trainer


def test_zigzag_pairs_an_early_chunk_with_a_late_one():
    assert zigzag_order(8, 2).tolist() == [0, 1, 6, 7, 2, 3, 4, 5]
    assert zigzag_order(6, 1).tolist() == list(range(6))
    order = zigzag_order(64, 4)
    assert sorted(order.tolist()) == list(range(64))
    # every device's causal work (the keys its queries see) is the same
    work = [sum(int(p) + 1 for p in order[i * 16:(i + 1) * 16]) for i in range(4)]
    assert len(set(work)) == 1


def _ring_on_devices(implementation, cp, q, k, v):
    """Ring attention of the zigzag-ordered sequence on ``cp`` devices, returned in natural order."""
    mesh = jax.make_mesh((cp,), ("cp",), axis_types=(AxisType.Auto,), devices=jax.devices()[:cp])
    order = zigzag_order(q.shape[1], cp)
    ring = jax.jit(jax.shard_map(functools.partial(ring_attention, implementation=implementation), mesh=mesh,
                                 in_specs=P(None, "cp"), out_specs=P(None, "cp"), check_vma=False))
    out = ring(q[:, order], k[:, order], v[:, order])
    return out[:, np.argsort(order)]


@pytest.mark.parametrize("implementation, cp, query_rows", [("xla", 2, 1024), ("xla", 4, 1024), ("xla", 2, 4),
                                                              ("pallas", 2, 1024)])
def test_ring_attention_equals_causal_attention_and_its_gradients(implementation, cp, query_rows, monkeypatch):
    """query_rows=4: XLA blocks run 4 query rows at a time (the 12-row causal block in 3 chunks)."""
    monkeypatch.setattr(ring_attention_module, "QUERY_ROWS", query_rows)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (2, 24, 4, 16), jnp.float32)  # grouped-query: 4 heads on 2 K/V heads
    k, v = (jax.random.normal(key, (2, 24, 2, 16), jnp.float32) for key in keys[1:3])
    do = jax.random.normal(keys[3], q.shape, jnp.float32)
    loss = lambda attend: lambda q, k, v: jnp.sum(attend(q, k, v) * do)
    ring = functools.partial(_ring_on_devices, implementation, cp)
    np.testing.assert_allclose(ring(q, k, v), xla_attention(q, k, v), rtol=1e-5, atol=1e-5)
    for got, expected in zip(jax.grad(loss(ring), argnums=(0, 1, 2))(q, k, v),
                             jax.grad(loss(xla_attention), argnums=(0, 1, 2))(q, k, v)):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


LAYOUTS = [
    ("cp=2", {}),
    ("cp=4", {}),
    ("cp=2,tp=2", {}),
    ("fsdp=2,cp=2", {"zero": 3, "attention": "pallas"}),
    ("fsdp=2,cp=2", {"zero": 1, "remat": "selective", "norm": "pallas"}),
    ("fsdp=2,cp=2", {"zero": 2, "remat": "dots"}),
    ("cp=2,pp=2", {}),  # inside a pipeline: all-gather context parallelism
    ("fsdp=2,cp=2,pp=2", {"zero": 2}),  # the pipeline's per-tick scatter runs per cp tile too
    ("dp=2,cp=2,tp=2", {"sequence_parallel": True, "remat": "full"}),
]


@pytest.mark.parametrize("mesh, kwargs", LAYOUTS, ids=[f"{m} {k}" for m, k in LAYOUTS])
def test_gradients_and_losses_equal_the_single_device_run(devices, single_device_gradients, mesh, kwargs):
    expected_grads, expected_losses = single_device_gradients
    grads, losses = step_gradients(devices, mesh, **kwargs)
    # with data shards each micro-batch's loss averages several of the reference's micro-batches
    np.testing.assert_allclose(losses.mean(), expected_losses.mean(), rtol=1e-5)
    if len(losses) == len(expected_losses):
        np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    for got, expected in zip(grads, expected_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-4, atol=1e-7)


def _compiled(devices, mesh, **kwargs):
    run = make_run(mesh, **kwargs)
    device_mesh = build_mesh(run.layout, devices[:run.layout.num_devices])
    return Trainer(run, device_mesh).lower().compile(), device_mesh


def test_the_ring_sends_kv_once_per_step_and_never_gathers_the_sequence(devices):
    cp, layers, micro_batches = 4, 4, 2
    compiled, mesh = _compiled(devices, f"cp={cp}", seq_len=64, global_batch=micro_batches)
    found = hlo.collectives(compiled.as_text(), dict(mesh.shape))
    permutes = [c for c in found if c.kind == "collective-permute"]
    assert permutes and {c.axes for c in permutes} == {("cp",)}
    # per layer and micro-batch: forward cp - 1 K/V sends; backward cp - 1 K/V and cp dK/dV sends
    assert sum(c.executions for c in permutes) == layers * micro_batches * ((cp - 1) + (cp - 1) + cp)
    kv_block = 2 * 1 * (64 // cp) * 4 * 16 * 4  # (K, V) x rows x tokens per device x kv heads x head_dim x f32
    assert min(c.bytes for c in permutes) == kv_block
    assert not [c for c in found if c.kind == "all-gather" and "cp" in c.axes]


def test_activation_memory_falls_at_least_as_one_over_cp(devices):
    """XLA's compiled temporaries per device: activations are O(T / cp) and xla's attention
    scores O((T / cp)^2), so each doubling of cp at least halves them (less a small floor of
    gradient and optimizer temporaries)."""
    model = dataclasses.replace(load_model_config("tiny"), vocab_size=64)
    temp = {}
    for cp in (1, 2, 4):
        run = dataclasses.replace(make_run(f"cp={cp}", seq_len=512, global_batch=1), model=model)
        mesh = build_mesh(run.layout, devices[:cp])
        temp[cp] = Trainer(run, mesh).lower().compile().memory_analysis().temp_size_in_bytes
    assert temp[2] / temp[1] < 0.55 and temp[4] / temp[2] < 0.55, temp
    assert temp[4] / temp[1] > 1 / 16, temp  # never below the scores' 1/cp^2


@pytest.mark.parametrize("mesh, kwargs, knob, fragment", [
    ("cp=4", {"seq_len": 36}, "seq_len", "not divisible by 8; e.g. --seq_len 32"),
    ("cp=2", {"attention": "cudnn"}, "attention", "use --attention xla or pallas"),
    ("cp=2", {"attention": "pallas_jax"}, "attention", "returns no log-sum-exp"),
    ("cp=2,pp=2", {"attention": "pallas"}, "attention", "use --attention xla"),
    ("cp=2,tp=4", {"sequence_parallel": True, "seq_len": 36}, "seq_len", "over cp*tp=2*4=8, but seq_len=36"),
])
def test_layouts_that_cannot_run_are_named(mesh, kwargs, knob, fragment):
    run = make_run(mesh, **kwargs)
    with pytest.raises(InvalidInput) as error:
        validate(run, run.layout.num_devices, "gpu")
    assert error.value.knob == knob and fragment in str(error.value)


def test_the_bench_runs_cp_and_its_rows_carry_it(tmp_path):
    out = tmp_path / "results.jsonl"
    code, row, proc = run_bench("--mesh", "dp=2,cp=2,tp=2", "--seq_len", "64", "--global_batch", "4",
                                "--steps", "2", "--warmup", "1", "--output", str(out))
    assert code == 0, proc.stderr
    assert row["mesh"]["cp"] == 2 and row["layout"].startswith("dp=2,fsdp=1,cp=2,tp=2,pp=1 ")
    assert np.isfinite(row["losses"]).all()
    code, row, _ = run_bench("--mesh", "cp=4", "--seq_len", "36")
    assert code == 2 and row["status"] == "invalid" and "--seq_len" in row["error"]


def test_odd_and_prime_seq_len_train_without_cp(devices):
    """Validation asks seq_len to be a multiple of 2 cp only under cp > 1: at cp = 1 an odd or
    prime length trains (the zigzag order is the identity there), the same under tp as alone."""
    from conftest import train_losses
    for odd in (3, 9, 31, 127):
        assert zigzag_order(odd, 1).tolist() == list(range(odd))
    seq_len = 7  # odd and prime: one compile per layout
    single = train_losses(devices, "dp=1", steps=1, seq_len=seq_len, global_batch=4)
    sharded = train_losses(devices, "dp=2,tp=2", steps=1, seq_len=seq_len, global_batch=4)
    assert np.isfinite(single).all() and 5.0 < single[0] < 7.0  # about ln(vocab) at the start
    np.testing.assert_allclose(sharded, single, rtol=1e-5)
