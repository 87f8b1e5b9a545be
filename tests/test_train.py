"""The training step under every layout computes the same run: per-step losses and gradients equal
the single-device run's, and the run learns."""

import numpy as np
import pytest
from conftest import make_run, step_gradients, train_losses as losses

from jaxlayouts.bench import benchmark


LAYOUTS = [  # pure dp=8, ZeRO-2 and plain tp are covered by the gradient tests below
    ("fsdp=8", {"zero": 1}),
    ("fsdp=8", {"zero": 3}),
    ("dp=2,tp=4", {"sequence_parallel": True}),
    ("dp=2,fsdp=2,tp=2", {}),
    ("dp=2,fsdp=2,tp=2", {"zero": 1, "sequence_parallel": True}),
    ("fsdp=2,tp=4", {"micro_batch": 2, "remat": "full"}),
    ("dp=4,tp=2", {"remat": "dots"}),
    ("dp=2,tp=2", {"remat": "selective", "sequence_parallel": True}),
    # kernels run per shard: batch over dp/fsdp, heads over tp, sequence over tp under SP
    ("dp=2,tp=2", {"attention": "pallas", "norm": "pallas", "remat": "selective"}),
    ("fsdp=2,tp=2", {"attention": "pallas_jax", "norm": "pallas", "sequence_parallel": True,
                     "remat": "save_all_but_ffn"}),
]


@pytest.mark.parametrize("mesh, kwargs", LAYOUTS, ids=[f"{m} {k}" for m, k in LAYOUTS])
def test_losses_match_single_device(devices, reference, mesh, kwargs):
    got = losses(devices, mesh, **kwargs)
    np.testing.assert_allclose(got, reference, rtol=1e-5)


def test_the_run_learns(reference):
    assert reference[-1] < reference[0]  # three steps already lower the loss


def test_loss_falls_well_below_chance(devices):
    run = make_run("dp=1")  # the reference's step: compiled once
    result = benchmark(run, steps=40, warmup=0, devices=devices[:1], log=lambda _: None)
    chance = np.log(run.model.vocab_size)
    assert result["losses"][0] == pytest.approx(chance, rel=0.05)
    assert result["losses"][-1] < chance - 1.5


GRADIENT_LAYOUTS = [("dp=8", {}), ("fsdp=8", {"zero": 1}), ("fsdp=4,tp=2", {"zero": 2}),
                    ("dp=2,fsdp=2,tp=2", {"zero": 3, "sequence_parallel": True})]


@pytest.fixture(scope="module")
def reference_gradients(single_device_gradients):
    return single_device_gradients[0]


@pytest.mark.parametrize("mesh, kwargs", GRADIENT_LAYOUTS, ids=[f"{m} {k}" for m, k in GRADIENT_LAYOUTS])
def test_gradients_match_single_device(devices, reference_gradients, mesh, kwargs):
    """Adam is nearly invariant to the gradient's scale, so equal losses alone would not catch a
    gradient reduced with the wrong factor: compare the gradients themselves."""
    for expected, got in zip(reference_gradients, step_gradients(devices, mesh, **kwargs)[0]):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-4, atol=1e-7)
