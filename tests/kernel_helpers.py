"""Helpers shared by the kernel tests (``test_kernels_*.py``)."""

import jax
import numpy as np

from jaxlayouts.kernels import tuning
from jaxlayouts.kernels.flash_attention import BlockSizes


SMALL_BLOCKS = BlockSizes(block_q=32, block_k=16, block_q_backward=16, block_k_backward=32)


def relative_error(got, expected):
    got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
    return np.linalg.norm(got - expected) / np.linalg.norm(expected)


def pallas_calls(jaxpr):
    """The ``pallas_call`` equations of a jaxpr, also inside nested jaxprs (custom_vjp, jit)."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "pallas_call":
            yield eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                yield from pallas_calls(inner)


def random_qkv(batch, seq_len, heads, kv_heads, head_dim, dtype):
    keys = jax.random.split(jax.random.key(seq_len + heads), 4)
    q = jax.random.normal(keys[0], (batch, seq_len, heads, head_dim), dtype)
    k, v = (jax.random.normal(key, (batch, seq_len, kv_heads, head_dim), dtype) for key in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], q.shape, dtype)


NORM_CONFIG = tuning.NormConfig(block_rows=4, num_warps=4, backward_block_rows=2, backward_num_warps=4,
                                 backward_programs_per_core=3)
