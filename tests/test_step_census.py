"""The census of a compiled bfloat16 step (:func:`hlo.operations`): no float32 matmul, no avoidable
data movement per layer, ZeRO-1 casts before it gathers."""

import re

import jax
import numpy as np
from conftest import make_run

from jaxlayouts.analysis import hlo
from jaxlayouts.mesh import build_mesh
from jaxlayouts.train import Trainer


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
