"""Matmuls whose float32 output feeds float32 math (logits, attention scores), with a backward
pass in the inputs' dtype.

``einsum(..., preferred_element_type=float32)`` of bfloat16 inputs runs on bfloat16 tensor cores
with float32 accumulation, but JAX differentiates it into two matmuls of the float32 cotangent
with the inputs promoted to float32: on a GPU two TF32 GEMMs at half the bfloat16 rate (per
micro-batch, for the LM head, the largest matmul of a small model). Rounding the cotangent to the
inputs' dtype first, as a fused attention kernel does with dS (Dao 2023, Alg. 2) and Megatron's
bfloat16 LM head does with its gradient, keeps them in bfloat16 (float32 accumulation). In
float32 runs nothing changes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def einsum_f32(spec: str, a, b):
    """``einsum(spec, a, b)`` in float32, differentiated in ``a``'s and ``b``'s dtype."""
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)


def _forward(spec, a, b):
    return einsum_f32(spec, a, b), (a, b)


def _backward(spec, inputs, cotangent):
    a, b = inputs
    _, pullback = jax.vjp(functools.partial(jnp.einsum, spec), a, b)
    return pullback(cotangent.astype(jnp.result_type(a, b)))


einsum_f32.defvjp(_forward, _backward)


def grouped_scores(q, k):
    """Scaled attention scores ``[batch, kv_heads, group, q_seq, k_seq]`` in float32 of ``q [b,
    q_seq, heads, d]`` and ``k [b, k_seq, kv_heads, d]``: grouped-query attention groups the query
    heads of each K/V head, so K is never repeated."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    return einsum_f32("btkgd,bskd->bkgts", q.reshape(b, t, kv, n // kv, d), k) * (d ** -0.5)
