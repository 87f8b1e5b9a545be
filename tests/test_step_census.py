"""The census of a compiled bfloat16 step (:func:`hlo.operations`, ``analysis/census.py``): no float32
matmul, no avoidable data movement per layer (the default GPU program, compiled without a GPU, has
none), ZeRO-1 casts before it gathers."""

import re

import jax
import numpy as np
import pytest
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


# ---------------------------------------------------------------------------------------------
# analysis/census.py: the census of a compiled program

PROGRAM = """HloModule step

%fused_ds (p0: bf16[4,8,8], p1: s32[]) -> bf16[1,8,8] {
  %p0 = bf16[4,8,8]{2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %c0 = s32[] constant(0)
  ROOT %ds = bf16[1,8,8]{2,1,0} dynamic-slice(%p0, %p1, %c0, %c0), dynamic_slice_sizes={1,8,8}
}

%fused_dus (p0: bf16[4,8,8], p1: bf16[1,8,8], p2: s32[]) -> bf16[4,8,8] {
  %p0 = bf16[4,8,8]{2,1,0} parameter(0)
  %p1 = bf16[1,8,8]{2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %c0 = s32[] constant(0)
  ROOT %dus = bf16[4,8,8]{2,1,0} dynamic-update-slice(%p0, %p1, %p2, %c0, %c0)
}

%fused_add (p0: f32[8,8], p1: f32[8,8]) -> f32[8,8] {
  %p0 = f32[8,8]{1,0} parameter(0)
  %p1 = f32[8,8]{1,0} parameter(1)
  ROOT %add = f32[8,8]{1,0} add(%p0, %p1)
}

%gemm (p0: bf16[8,8], p1: bf16[8,8]) -> bf16[8,8] {
  %p0 = bf16[8,8]{1,0} parameter(0)
  %p1 = bf16[8,8]{1,0} parameter(1)
  %d = f32[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  ROOT %c = bf16[8,8]{1,0} convert(%d)
}

%body (arg: (s32[], bf16[4,8,8], f32[8,8])) -> (s32[], bf16[4,8,8], f32[8,8]) {
  %arg = (s32[], bf16[4,8,8], f32[8,8]) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %w = bf16[4,8,8]{2,1,0} get-tuple-element(%arg), index=1
  %acc = f32[8,8]{1,0} get-tuple-element(%arg), index=2
  %slice = bf16[1,8,8]{2,1,0} fusion(%w, %i), kind=kCustom, calls=%fused_ds, backend_config={"fusion_backend_config":{"kind":"__custom_fusion","custom_fusion_config":{"name":"dynamic_slice_fusion","kernel_index":0}}}
  %x = bf16[8,8]{1,0} bitcast(%slice)
  %mm = bf16[8,8]{1,0} fusion(%x, %x), kind=kCustom, calls=%gemm, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %stacked = bf16[4,8,8]{2,1,0} fusion(%w, %slice, %i), kind=kLoop, calls=%fused_dus
  %grad = f32[8,8]{1,0} convert(%mm)
  %sum = f32[8,8]{1,0} fusion(%acc, %grad), kind=kLoop, calls=%fused_add
  %t = f32[8,8]{0,1} copy(%sum)
  ROOT %out = (s32[], bf16[4,8,8], f32[8,8]) tuple(%i, %stacked, %sum)
}

%cond (arg: (s32[], bf16[4,8,8], f32[8,8])) -> pred[] {
  %arg = (s32[], bf16[4,8,8], f32[8,8]) parameter(0)
  %i = s32[] get-tuple-element(%arg), index=0
  %n = s32[] constant(4)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%sum_comp (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

ENTRY %main (w: bf16[4,8,8], acc: f32[8,8]) -> f32[8,8] {
  %w = bf16[4,8,8]{2,1,0} parameter(0)
  %acc = f32[8,8]{1,0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], bf16[4,8,8], f32[8,8]) tuple(%zero, %w, %acc)
  %loop = (s32[], bf16[4,8,8], f32[8,8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"4"}}
  %g = f32[8,8]{1,0} get-tuple-element(%loop), index=2
  ROOT %ar = f32[8,8]{1,0} all-reduce(%g), replica_groups={{0,1}}, to_apply=%sum_comp
}
"""


def test_census_counts_each_kind_once_per_trip():
    """Each kernel of a 4-trip loop counts 4 times; the loop's predicate 5 (4 trips, the exit)."""
    from jaxlayouts.analysis.census import census
    c = census(PROGRAM, {"dp": 2})
    assert c["gemms"] == {"total": 4, "by_dtype": {"bf16,bf16->bf16": 4}}
    kinds = {k: (v["count"], v["bytes"]) for k, v in c["copy_like"]["by_kind"].items() if v["count"]}
    assert kinds == {"dynamic-slice (memcpy)": (4, 4 * 128), "dynamic-update-slice (loop kernel)": (4, 4 * 128),
                     "copy": (4, 4 * 256), "loop predicate to host": (5, 5)}
    assert c["copy_like"]["total"] == {"count": 17, "bytes": 4 * 512 + 5}
    assert (c["fusions"], c["loop_add_fusions"]) == (16, 4)
    assert c["while_loops"] == [{"body": "body", "trips": 4, "executions": 1}]
    assert c["collectives"] == [{"kind": "all-reduce", "axes": ["dp"], "count": 1, "bytes": 256}]


def _gpu_devices():
    """One deviceless H200 (``targets.devices``), or a skip where the CUDA compiler plugin of
    jax's version is not installed (the ``[gpu-aot]`` extra)."""
    from jaxlayouts import targets
    from jaxlayouts.schema import InvalidInput
    target = targets.resolve("h200")
    try:
        targets.check_compiler()
    except InvalidInput as error:
        pytest.skip(str(error))
    return targets.devices(target, 1)


def test_default_gpu_step_copies_nothing_per_layer():
    """The GPU program of the default step (layers unrolled on a GPU) has no copy-like op per layer
    and micro-batch: one loop (the micro-batches) whose predicate goes to the host once per trip,
    one stacking of the losses per micro-batch, and the scanned step's GEMMs, none in float32.
    The scanned step has about 30 copy-like ops per layer and micro-batch (docs/gpu-program.md)."""
    from jaxlayouts.analysis.census import census
    from jaxlayouts.analysis.compiled import compile_step
    run = make_run("dp=1", dtype="bfloat16")
    step = compile_step(run, _gpu_devices())
    assert step.trainer.scan_layers is False and run.layout.scan_layers is None
    c = census(step.hlo_text, dict(step.trainer.mesh.shape))
    accum, layers = run.grad_accum_steps, run.model.num_layers
    copies = {k: v["count"] for k, v in c["copy_like"]["by_kind"].items() if v["count"]}
    assert copies["loop predicate to host"] == accum + 1
    assert c["copy_like"]["total"]["count"] < 3 * accum, copies  # no multiple of accum * layers
    assert c["while_loops"] == [{"body": c["while_loops"][0]["body"], "trips": accum, "executions": 1}]
    assert c["gemms"]["total"] >= accum * layers * 7 * 3
    assert not [k for k in c["gemms"]["by_dtype"] if k.startswith("f32")]
