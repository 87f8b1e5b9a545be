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
over ``tp``; the layout never gathers heads. Under context parallelism (``cp > 1``) every
implementation that can run per block (``xla``, ``pallas``) runs inside ring attention
(:mod:`jaxlayouts.model.ring_attention`), per shard over ``cp`` as well; inside a pipeline
(``pp > 1``) it is all-gather context parallelism with ``xla`` (:func:`gathered_attention`). The
model's ``context_parallel`` field (``layout.ContextParallel``) says which.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlayouts.choices import ATTENTION
from jaxlayouts.kernels import interpret_mode
from jaxlayouts.kernels.flash_attention import flash_attention
from jaxlayouts.layout import ContextParallel
from jaxlayouts.mesh import per_shard
from jaxlayouts.model.axes import HEADS
from jaxlayouts.model.matmul import grouped_scores
from jaxlayouts.model.ring_attention import ring_attention


def xla_attention(q, k, v, q_positions=None, k_positions=None):
    """Reference attention with materialised scores (fp32 softmax; dS rounded to q's dtype).
    Query ``i`` sees key ``j`` when ``q_positions[i] >= k_positions[j]`` (default: their indices)."""
    b, t, n, d = q.shape
    kv = k.shape[2]
    scores = grouped_scores(q, k)
    if q_positions is None:
        causal = jnp.tril(jnp.ones((t, k.shape[1]), dtype=bool))
    else:
        causal = q_positions[:, None] >= k_positions[None, :]
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


def gathered_attention(q, k, v, positions, axis: str = "cp"):
    """All-gather context parallelism (Llama 3, Dubey et al. 2024, Sec. 3.3.2) for this device's
    zigzag chunks: K/V all-gathered over ``axis`` (the backward reduce-scatters dK/dV), the
    causal mask read from the stored sequence's ``positions``. Pipelines use it instead of the
    ring (``layout.ContextParallel``): an all-gather's groups are per stage."""
    q_len = q.shape[1]
    k, v = (jax.lax.all_gather(x, axis, axis=1, tiled=True) for x in (k, v))
    positions = jnp.asarray(positions)
    mine = jax.lax.dynamic_slice_in_dim(positions, jax.lax.axis_index(axis) * q_len, q_len)
    return xla_attention(q, k, v, mine, positions)


IMPLEMENTATIONS = {name: globals()[a.function] for name, a in ATTENTION.items()}
"""Each ``--attention`` record's function (``choices.ATTENTION``)."""


def attention(q, k, v, implementation: str, context_parallel: ContextParallel = ContextParallel()):
    """Causal attention with ``implementation``; kernels run on each device's shard. Under
    context parallelism it runs as ``context_parallel.mode`` says: ring attention, each block
    with ``implementation``, or all-gather CP."""
    if context_parallel.mode == "ring":
        per_device = functools.partial(ring_attention, implementation=implementation)
    elif context_parallel.mode == "all_gather":
        per_device = functools.partial(gathered_attention, positions=context_parallel.order(q.shape[1]))
    elif not ATTENTION[implementation].per_shard:
        return IMPLEMENTATIONS[implementation](q, k, v)
    else:
        per_device = IMPLEMENTATIONS[implementation]
    return per_shard(per_device, (HEADS, HEADS, HEADS), HEADS)(q, k, v)
