"""Causal attention implementations, chosen by ``--attention``.

Shapes: ``q [batch, seq, heads, head_dim]``, ``k, v [batch, seq, kv_heads, head_dim]``. Grouped-query
attention is computed by grouping query heads per KV head, never by repeating K/V.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def xla_attention(q, k, v):
    """Reference: softmax(QK^T / sqrt(d)) V with the full [T, T] score matrix materialised (fp32
    softmax), as unfused attention in the reference study."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
    scores = scores * (d ** -0.5)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n, d)


def cudnn_attention(q, k, v):
    """cuDNN's fused flash attention through ``jax.nn.dot_product_attention`` (NVIDIA GPUs only)."""
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


IMPLEMENTATIONS = {"xla": xla_attention, "cudnn": cudnn_attention}
