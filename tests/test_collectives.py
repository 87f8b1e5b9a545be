"""The compiled step contains the collectives each layout implies (read from the partitioned HLO):
sequence parallelism, data parallelism, ZeRO-1/2/3, and kernels run per shard."""

import pytest
from conftest import make_run

from jaxlayouts.analysis import hlo
from jaxlayouts.mesh import build_mesh
from jaxlayouts.train import Trainer


_COMPILED = {}


def compiled_collectives(devices, mesh, **kwargs):
    """``(run, collectives of its compiled step)``, each layout compiled once per module."""
    key = (mesh, tuple(sorted(kwargs.items())))
    if key not in _COMPILED:
        run = make_run(mesh, **kwargs)
        device_mesh = build_mesh(run.layout, devices[:run.layout.num_devices])
        text = Trainer(run, device_mesh).lower().compile().as_text()
        _COMPILED[key] = run, hlo.collectives(text, dict(device_mesh.shape))
    return _COMPILED[key]


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
