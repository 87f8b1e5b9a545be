"""The compiled step contains the collectives each layout implies (read from the partitioned HLO),
and no avoidable data movement or float32 matmul (the census of :func:`hlo.operations`)."""

import re

import jax
import numpy as np
import pytest
from conftest import make_run

from jaxlayouts.analysis import hlo
from jaxlayouts.mesh import build_mesh
from jaxlayouts.train import Trainer


def compiled_collectives(devices, mesh, **kwargs):
    run = make_run(mesh, **kwargs)
    device_mesh = build_mesh(run.layout, devices[:run.layout.num_devices])
    text = Trainer(run, device_mesh).lower().compile().as_text()
    return run, hlo.collectives(text, dict(device_mesh.shape))


def forward_layer(found, run):
    """Collectives in loop bodies that run once per layer and micro-batch."""
    per_layer = run.grad_accum_steps * run.model.num_layers
    return [c for c in found if c.executions == per_layer]


def test_sequence_parallel_turns_tp_all_reduce_into_reduce_scatter_and_all_gather(devices):
    run, plain = compiled_collectives(devices, "dp=2,tp=4")
    _, sp = compiled_collectives(devices, "dp=2,tp=4", sequence_parallel=True)
    activation = run.global_batch // run.grad_accum_steps // 2 * run.seq_len * run.model.d_model * 4
    kinds = lambda found: sorted(c.kind for c in forward_layer(found, run)
                                 if c.axes == ("tp",) and c.bytes >= activation // 4)
    # Without SP: the row-parallel outputs (attention and FFN) are all-reduced over tp.
    assert kinds(plain).count("all-reduce") >= 2 and "reduce-scatter" not in kinds(plain)
    # With SP: each becomes a reduce-scatter, and the layer inputs are all-gathered.
    assert kinds(sp).count("reduce-scatter") >= 2 and kinds(sp).count("all-gather") >= 2
    assert "all-reduce" not in kinds(sp)


def test_data_parallel_reduces_gradients_once_per_step(devices):
    run, found = compiled_collectives(devices, "dp=8", global_batch=32)
    assert run.grad_accum_steps == 4
    grads = [c for c in found if c.axes == ("dp",) and c.bytes > 16]  # not the scalar loss
    assert grads and all(c.kind == "all-reduce" and c.executions == 1 for c in grads)
    assert sum(c.bytes for c in grads) == run.model.n_params * 4  # every float32 gradient, once


def test_zero2_reduce_scatters_every_micro_batch(devices):
    run, found = compiled_collectives(devices, "fsdp=8", zero=2, global_batch=16)
    scattered = [c for c in found if c.kind == "reduce-scatter" and c.axes == ("fsdp",)]
    assert scattered and all(c.executions > 1 for c in scattered)
    assert not [c for c in found if c.kind == "all-reduce" and c.bytes > 1024]


def test_zero3_gathers_weights_per_layer_in_forward_and_backward(devices):
    run, found = compiled_collectives(devices, "fsdp=8", zero=3)
    gathers = {c.computation for c in forward_layer(found, run)
               if c.kind == "all-gather" and c.axes == ("fsdp",)}
    assert len(gathers) == 2  # the forward scan and the backward scan each gather


def test_zero1_reduce_scatters_gradients_and_gathers_parameters_once(devices):
    run, found = compiled_collectives(devices, "fsdp=8", zero=1, global_batch=16)
    per_step = hlo.per_step([c for c in found if c.bytes > 16])
    assert per_step[("reduce-scatter", ("fsdp",))][0] >= 1
    assert per_step[("all-gather", ("fsdp",))][1] == run.model.n_params * 4


@pytest.mark.parametrize("groups, axes", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}", ("tp",)),
    ("replica_groups=[2,4]<=[8]", ("tp",)),
    ("replica_groups=[4,2]<=[2,4]T(1,0)", ("dp",)),
    ("replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}", ("dp",)),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}", ("tp",)),
    ("replica_groups={{0,1,2,3,4,5,6,7}}", ("dp", "tp")),
])
def test_replica_group_spellings(groups, axes):
    text = f"ENTRY %main {{\n  %x = f32[8,2]{{1,0}} parameter(0)\n  ROOT %a = f32[8,2]{{1,0}} all-gather(%x), {groups}, dimensions={{0}}\n}}"
    (found,) = hlo.collectives(text, {"dp": 2, "fsdp": 1, "tp": 4, "pp": 1})
    assert found.axes == axes and found.bytes == 64


@pytest.mark.parametrize("attention, norm", [("pallas", "xla"), ("xla", "pallas")])
def test_kernels_run_per_shard_without_gathering_heads_or_sequence(devices, attention, norm):
    """A Pallas kernel is opaque to the partitioner; run through shard_map it needs no extra
    collective: the per-layer collectives are exactly those of the plain XLA layout (ignoring
    all-reduces over single-device groups, no-ops that shard_map's transpose leaves for size-1 axes)."""
    summary = lambda found: sorted((c.kind, c.axes, c.bytes) for c in forward_layer(found, run) if c.axes)
    run, plain = compiled_collectives(devices, "dp=2,tp=2", sequence_parallel=True)
    _, kernel = compiled_collectives(devices, "dp=2,tp=2", sequence_parallel=True,
                                     attention=attention, norm=norm)
    assert summary(kernel) == summary(plain)


# -- census of a bfloat16 step ----------------------------------------------------------------


def bf16_step(devices, mesh, **kwargs):
    run = make_run(mesh, dtype="bfloat16", **kwargs)
    trainer = Trainer(run, build_mesh(run.layout, devices[:run.layout.num_devices]))
    return run, trainer.lower()


def test_bfloat16_step_has_no_float32_matmul(devices):
    """The LM head's and the attention scores' float32 outputs used to be differentiated into
    float32 x float32 matmuls (TF32 on a GPU): 2 per micro-batch and 2 per layer and micro-batch."""
    run, lowered = bf16_step(devices, "dp=1")
    dots = hlo.census(hlo.operations(lowered.compiler_ir("hlo").as_hlo_text(), ("dot",)))
    assert dots["dot"][0] >= run.grad_accum_steps * run.model.num_layers * 7 * 3  # 7 matmuls x (fwd + 2 bwd)
    assert {key for key in dots if "f32," in key} == set()
    assert dots["dot bf16,bf16->f32"][0] == run.grad_accum_steps * (1 + run.model.num_layers)  # head, scores


def _movement(text, run):
    """Per micro-batch: kernels that slice, stack or copy (top-level copies, any dynamic-slice or
    dynamic-update-slice), and how many of those run once per layer."""
    found = [o for o in hlo.operations(text) if o.executions >= run.grad_accum_steps
             and (o.op in ("dynamic-slice", "dynamic-update-slice") or (o.op == "copy" and not o.fused))]
    per_layer = run.grad_accum_steps * run.model.num_layers
    return (sum(o.executions for o in found) // run.grad_accum_steps,
            sum(o.executions for o in found if o.executions % per_layer == 0) // per_layer)


def test_unrolled_layers_move_no_weight_or_residual_per_layer(devices):
    """Scanned layers slice each layer's weights and saved activations out of stacked buffers and
    stack activations and gradients back (dynamic-slice/-update-slice per layer, a memcpy each on a
    GPU); ``scan_layers=False`` compiles the same step without them, with equal gradients."""
    run, scanned = bf16_step(devices, "dp=1")
    _, unrolled = bf16_step(devices, "dp=1", scan_layers=False)
    total, per_layer = _movement(scanned.compile().as_text(), run)
    assert per_layer >= 9 * 2  # at least every weight forward and backward
    total_unrolled, per_layer_unrolled = _movement(unrolled.compile().as_text(), run)
    assert per_layer_unrolled == 0 and total_unrolled <= 8, total_unrolled

    grads = {}
    for scan in (True, False):
        f32 = make_run("dp=1", scan_layers=scan)
        trainer = Trainer(f32, build_mesh(f32.layout, devices[:1]))
        tokens = jax.random.randint(jax.random.key(1), (f32.grad_accum_steps, 1, f32.seq_len + 1), 0, 512)
        grads[scan] = jax.tree.leaves(jax.jit(trainer.gradients)(trainer.init_state().params, tokens))
    for a, b in zip(grads[True], grads[False]):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-7)


def test_zero1_casts_weights_once_then_gathers_the_compute_dtype(devices):
    """Cast where the master shard lives, then gather: bfloat16 crosses the network once per step
    (so the cast runs once too), not per micro-batch. XLA's CPU backend widens a bfloat16
    collective to float32, so the gathered data is recognised by its rounding just before."""
    run, lowered = bf16_step(devices, "fsdp=2", zero=1, global_batch=16)
    text = lowered.compile().as_text()
    gathers = [c for c in hlo.collectives(text, {"dp": 1, "fsdp": 2, "tp": 1, "pp": 1})
               if c.kind == "all-gather" and c.bytes > 16]
    assert gathers and all(c.executions == 1 for c in gathers)
    casts = [o for o in hlo.operations(text, ("convert",)) if o.dtypes == "f32->bf16"]
    for gather in gathers:
        line = next(l for l in text.splitlines() if re.match(rf"\s*(ROOT )?%{re.escape(gather.name)} = ", l))
        operand = re.search(r"all-gather(?:-start)?\(%([\w.\-]+)", line)[1]
        rounded = [o for o in casts if o.name == operand or o.computation == _fused_computation(text, operand)]
        assert line.split("=")[1].lstrip().startswith("bf16") or rounded, line[:120]


def _fused_computation(text, name):
    m = re.search(rf"%{re.escape(name)} = .*\bcalls=%([\w.\-]+)", text)
    return m[1] if m else None
