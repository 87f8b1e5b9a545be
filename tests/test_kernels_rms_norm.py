"""The Pallas RMSNorm kernel (interpret mode on CPU) against the plain one, and its bounded scale
gradient partials."""

import jax
import jax.numpy as jnp
import pytest
from kernel_helpers import NORM_CONFIG, pallas_calls, relative_error

from jaxlayouts.kernels import tuning
from jaxlayouts.kernels.rms_norm import rms_norm_pallas, rms_norm_reference


@pytest.mark.parametrize("shape, dtype, config, tolerance", [
    ((3, 7, 96), jnp.float32, None, 1e-6),          # 21 rows, width 96 (padded to 128 in registers)
    ((3, 7, 96), jnp.bfloat16, None, 1e-2),
    ((23, 160), jnp.float32, NORM_CONFIG, 1e-6),    # 23 rows: no multiple of 4 (forward) or 2 (backward)
    ((5, 2048), jnp.float32, NORM_CONFIG, 1e-6),    # a model width; fewer row blocks than programs
    ((9, 5120), jnp.bfloat16, None, 1e-2),          # a model width that is no power of two
])
def test_pallas_rms_norm_matches_reference(shape, dtype, config, tolerance):
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], shape, dtype)
    scale = 1.0 + 0.1 * jax.random.normal(keys[1], (shape[-1],), jnp.float32)
    dy = jax.random.normal(keys[2], x.shape, dtype)
    results = []
    for fn in (lambda x, s: rms_norm_pallas(x, s, 1e-5, config=config), lambda x, s: rms_norm_reference(x, s, 1e-5)):
        y, vjp = jax.vjp(fn, x, scale)
        results.append((y, *vjp(dy)))
    for name, got, expected in zip(("y", "dx", "dscale"), *results):
        assert got.dtype == expected.dtype, name
        assert relative_error(got, expected) < tolerance, name
    loss = lambda fn: lambda x, s: jnp.sum(fn(x, s, 1e-5).astype(jnp.float32) * dy.astype(jnp.float32))
    got = jax.grad(loss(lambda x, s, e: rms_norm_pallas(x, s, e, config=config)), argnums=1)(x, scale)
    assert relative_error(got, jax.grad(loss(rms_norm_reference), argnums=1)(x, scale)) < tolerance


def test_rms_norm_scale_gradient_partials_are_bounded():
    """The backward pass writes one float32 dw partial per program (programs_per_core per core,
    one core on CPU), not one per row block: 64 rows in 1-row blocks give 3 partials, not 64."""
    x = jnp.ones((64, 96), jnp.float32)
    config = tuning.NormConfig(block_rows=1, num_warps=4, backward_block_rows=1, backward_num_warps=4,
                               backward_programs_per_core=3)
    grads = lambda x, s: jax.vjp(lambda x, s: rms_norm_pallas(x, s, 1e-5, config=config), x, s)[1](x)
    jaxpr = jax.make_jaxpr(grads)(x, jnp.ones(96))
    backward = list(pallas_calls(jaxpr.jaxpr))[-1]  # the forward call comes first
    assert [v.aval.shape for v in backward.outvars] == [(64, 96), (3 * 96,)]
    assert backward.params["grid_mapping"].grid == (3,)
