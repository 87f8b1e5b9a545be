"""MFU's formula and the attention FLOPs, against numbers computed by hand."""

import jax
import jax.numpy as jnp
import pytest

from jaxlayouts import flops
from jaxlayouts.flops import attention_flops
from jaxlayouts.layout import load_model_config
from jaxlayouts.model.llama import Llama


def test_model_flops_per_token_by_hand():
    m = load_model_config("llama-13b")
    # N = 40 * (4 * 5120^2 + 3 * 5120 * 13824 + 2 * 5120) + 2 * 128000 * 5120 + 5120
    n = 40 * (4 * 5120**2 + 3 * 5120 * 13824 + 2 * 5120) + 2 * 128000 * 5120 + 5120
    assert m.n_params == n == 13_998_904_320
    assert flops.model_flops_per_token(m, 2048) == 6 * n + 12 * 40 * 5120 * 2048


def test_parameter_count_matches_the_flax_model():
    m = load_model_config("tiny")
    shapes = jax.eval_shape(Llama(m).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))
    assert sum(x.size for x in jax.tree.leaves(shapes)) == m.n_params


def test_mfu_against_a_reference_row():
    # Reference study, 13B, 2k tokens, 64 A100s: 70.6% MFU. Invert: tokens/s that gives it.
    m = load_model_config("llama-13b")
    tokens_per_s = 0.706 * 64 * 312e12 / flops.model_flops_per_token(m, 2048)
    achieved, mfu = flops.mfu(m, 2048, tokens_per_s, 64, flops.peak_tflops("NVIDIA A100-SXM4-80GB"))
    assert mfu == pytest.approx(0.706)
    assert achieved == pytest.approx(0.706 * 312)


def test_peaks_by_device_kind():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_tflops("NVIDIA H200") == 989.0
    assert flops.peak_tflops("cpu") is None
    assert flops.mfu(load_model_config("tiny"), 64, 1000.0, 1, None)[1] is None


def test_causal_flops_count():
    # 4 * b * h * T^2 * d / 2 forward, 3.5x that forward + backward
    assert attention_flops(2, 1024, 8, 128, backward=False) == 2 * 2 * 8 * 1024 ** 2 * 128
    assert attention_flops(2, 1024, 8, 128, backward=True) == 3.5 * 2 * 2 * 8 * 1024 ** 2 * 128
