"""Causal attention implementations, chosen by ``--attention``.

Shapes: ``q [batch, seq, heads, head_dim]``, ``k, v [batch, seq, kv_heads, head_dim]``.

* ``xla``: softmax(QK^T / sqrt(d)) V with the [T, T] scores materialised (the study's unfused
  attention); grouped-query attention by grouping query heads per K/V head.
* ``cudnn``: cuDNN's fused flash attention via ``jax.nn.dot_product_attention`` (NVIDIA GPUs).
* ``pallas``: this project's flash attention, :mod:`jaxlayouts.kernels.flash_attention`.
* ``pallas_jax``: JAX's bundled Pallas GPU op (``jax.experimental.pallas.ops.gpu.attention``),
  for comparison. It has no grouped-query support, so K/V heads are repeated for it, and it needs
  the sequence to be a multiple of its blocks, so the sequence is padded (causal masking keeps
  padded keys out).

Kernels are opaque to XLA's partitioner, so they run per shard: batch over the data axes, heads
over ``tp``; the layout never gathers heads.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlayouts.kernels import interpret_mode
from jaxlayouts.kernels.flash_attention import flash_attention
from jaxlayouts.mesh import per_shard
from jaxlayouts.model.axes import HEADS
from jaxlayouts.model.matmul import einsum_f32


def xla_attention(q, k, v):
    """Reference attention with materialised scores (fp32 softmax; dS rounded to q's dtype)."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, n // kv, d)
    scores = einsum_f32("btkgd,bskd->bkgts", q, k)
    scores = scores * (d ** -0.5)
    causal = jnp.tril(jnp.ones((t, t), dtype=bool))
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    probs = checkpoint_name(jax.nn.softmax(scores, axis=-1).astype(v.dtype), "attention_probs")
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, n, d)


def cudnn_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")


def pallas_jax_attention(q, k, v):
    from jax.experimental.pallas.ops.gpu.attention import mha
    group = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))
    t = q.shape[1]
    pad = ((0, 0), (0, -t % 128), (0, 0), (0, 0))  # a multiple of the op's default blocks
    out = mha(*(jnp.pad(x, pad) for x in (q, k, v)), None, sm_scale=q.shape[-1] ** -0.5,
              causal=True, interpret=interpret_mode(None))
    return out[:, :t]


IMPLEMENTATIONS = {"xla": xla_attention, "cudnn": cudnn_attention, "pallas": flash_attention,
                   "pallas_jax": pallas_jax_attention}


def attention(q, k, v, implementation: str):
    """Causal attention with ``implementation``; kernels run on each device's shard."""
    fn = IMPLEMENTATIONS[implementation]
    if implementation == "xla":
        return fn(q, k, v)
    return per_shard(fn, (HEADS, HEADS, HEADS), HEADS)(q, k, v)
