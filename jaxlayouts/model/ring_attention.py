"""Ring attention over the ``cp`` mesh axis: context parallelism (Liu et al. 2023), causally
load-balanced.

**Layout.** Context parallelism splits each sequence into ``2 cp`` chunks. Device ``i`` holds
chunks ``i`` and ``2 cp - 1 - i`` (the zigzag order of Megatron-Core's CP and Llama 3's CP): under
the causal mask an early chunk has little to attend to and a late one much, so pairing them gives
every device the same work. ``layout.zigzag_order`` is that permutation; the trainer applies it to
the tokens and their labels once per step, rotary embeddings read each token's position from it,
and from then on the sequence axis is simply sharded over ``cp`` in contiguous blocks. Norms,
projections, the FFN and the loss are per token, so the order changes nothing else.

**Forward.** Each device keeps its queries and passes its K/V block around the ring with one
``ppermute`` per step (``cp - 1`` steps). At step ``s`` it holds the block of device
``j = i - s (mod cp)``:

* ``s = 0``: its own two chunks, which in ascending order are plain causal attention;
* ``j < i``: ``j``'s first chunk precedes both of ``i``'s chunks and its second follows both, so
  all queries see the first half of the block, unmasked;
* ``j > i``: both of ``j``'s chunks precede ``i``'s second chunk and follow its first, so the
  second half of the queries sees the whole block, unmasked.

Every step after the first is one unmasked ``c x 2c`` block (``c = seq_len / 2 cp``): the same
work on every device. Blocks merge by online softmax through their log-sum-exp
(``lse = logaddexp(lse_a, lse_b)``, ``o = o_a e^(lse_a - lse) + o_b e^(lse_b - lse)``, Milakov &
Gimelshein 2018), so each block runs with ``--attention xla`` (einsums) or this project's Pallas
flash-attention kernel, which returns the log-sum-exp.

**Backward** (a ``custom_vjp``; FlashAttention-2 Alg. 2 per block). With the final output ``o`` and
log-sum-exp, each block's ``P = exp(S - lse)`` is exact, so the same ring runs again: K/V travel
with float32 dK/dV accumulators, each device adds its queries' contribution to the block it holds,
and after the last step one more ``ppermute`` brings every accumulator home (``cp - 1`` K/V sends,
``cp`` dK/dV sends).

**Cost per layer and micro-batch** (what ``plan/cost.py`` charges): each ring step sends one K/V
block, ``2 b (seq_len / cp) kv_heads head_dim`` elements, while computing one ``c x 2c`` block of
attention; XLA schedules the send beside the compute, so only the part of a step's send that
outlasts its compute is exposed. Parameters are replicated over ``cp`` (or ZeRO-sharded over
``fsdp`` as usual); their gradients sum over ``cp`` with the data axes'.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxlayouts.kernels import flash_attention as pallas
from jaxlayouts.model.matmul import grouped_scores

MASK_VALUE = pallas.MASK_VALUE


# ---------------------------------------------------------------------------------------------
# One block: queries against one K/V block, returning the log-sum-exp


QUERY_ROWS = 1024
"""Query rows per XLA block computation: a long block runs in chunks of this many rows (a scan),
so its materialised scores are ``rows x keys``, not ``tq x keys`` (Rabe & Staats 2021)."""


def _grouped_scores(q, k, first_row):
    """Scaled scores ``[b, kv_heads, group, tq, tk]`` in float32; causal when ``first_row`` (the
    position of ``q``'s first row among ``k``'s) is given."""
    s = grouped_scores(q, k)
    if first_row is not None:
        visible = first_row + jnp.arange(q.shape[1])[:, None] >= jnp.arange(k.shape[1])[None, :]
        s = jnp.where(visible, s, MASK_VALUE)
    return s


def _by_rows(x, axis: int = 1):
    """Split the query axis into ``QUERY_ROWS`` chunks, leading: ``[chunks, ..., rows, ...]``."""
    t = x.shape[axis]
    rows = QUERY_ROWS if t > QUERY_ROWS and t % QUERY_ROWS == 0 else t
    shape = (*x.shape[:axis], t // rows, rows, *x.shape[axis + 1:])
    return jnp.moveaxis(x.reshape(shape), axis, 0)


def _from_rows(x, axis: int = 1):
    """Inverse of :func:`_by_rows`."""
    x = jnp.moveaxis(x, 0, axis)
    return x.reshape(*x.shape[:axis], -1, *x.shape[axis + 2:])


def _rows_forward(q, k, v, first_row):
    b, tq, h, d = q.shape
    s = _grouped_scores(q, k, first_row)
    lse = jax.nn.logsumexp(s, axis=-1)
    p = jnp.exp(s - lse[..., None]).astype(v.dtype)
    o = jnp.einsum("bkgts,bskd->btkgd", p, v, preferred_element_type=jnp.float32)
    return o.reshape(b, tq, h, d).astype(q.dtype), lse.reshape(b, h, tq)


def _rows_backward(q, k, v, o, lse, do, first_row):
    b, tq, h, d = q.shape
    kv = k.shape[2]
    grouped = lambda x: x.reshape(b, tq, kv, h // kv, d)
    p = jnp.exp(_grouped_scores(q, k, first_row) - lse.reshape(b, kv, h // kv, tq)[..., None])
    delta = jnp.einsum("btkgd,btkgd->bkgt", grouped(o).astype(jnp.float32), grouped(do).astype(jnp.float32))
    f32 = functools.partial(jnp.einsum, preferred_element_type=jnp.float32)
    dv = f32("bkgts,btkgd->bskd", p.astype(do.dtype), grouped(do))
    dp = f32("btkgd,bskd->bkgts", grouped(do), v)
    ds = (p * (dp - delta[..., None]) * d ** -0.5).astype(q.dtype)
    dq = f32("bkgts,bskd->btkgd", ds, k).reshape(b, tq, h, d)
    return dq, f32("bkgts,btkgd->bskd", ds, grouped(q)), dv


def xla_block_forward(q, k, v, *, causal: bool):
    """``(o [b, tq, h, d], lse [b, h, tq])`` of one block with einsums, ``QUERY_ROWS`` query rows
    at a time."""
    chunks = _by_rows(q)
    first_rows = jnp.arange(chunks.shape[0]) * chunks.shape[2]
    o, lse = jax.lax.map(lambda c: _rows_forward(c[0], k, v, c[1] if causal else None), (chunks, first_rows))
    return _from_rows(o), _from_rows(lse, axis=2)


def xla_block_backward(q, k, v, o, lse, do, *, causal: bool):
    """float32 ``(dq, dk, dv)`` of one block given the row's final ``o`` and ``lse``, ``QUERY_ROWS``
    query rows at a time (dK, dV summed over them)."""
    def rows(dkv, chunk):
        q, o, lse, do, first_row = chunk
        dq, dk, dv = _rows_backward(q, k, v, o, lse, do, first_row if causal else None)
        return (dkv[0] + dk, dkv[1] + dv), dq

    chunks = (_by_rows(q), _by_rows(o), _by_rows(lse, axis=2), _by_rows(do))
    first_rows = jnp.arange(chunks[0].shape[0]) * chunks[0].shape[2]
    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(rows, (zeros, zeros), (*chunks, first_rows))
    return _from_rows(dq), dk, dv


BLOCKS = {
    "xla": (xla_block_forward, xla_block_backward),
    "pallas": (pallas.flash_attention_forward, pallas.flash_attention_backward),
}
"""Per-block (forward, backward) of each ``--attention`` that can run per ring step."""


# ---------------------------------------------------------------------------------------------
# The ring


def _merge(o, lse, o_block, lse_block):
    """Online softmax: two partial results of the same queries over disjoint keys."""
    new = jnp.logaddexp(lse, lse_block)
    weight = lambda l: jnp.exp(l - new).transpose(0, 2, 1)[..., None]  # [b, h, t] -> [b, t, h, 1]
    return o * weight(lse) + o_block.astype(jnp.float32) * weight(lse_block), new


def _send_on(x, axis: str, size: int):
    """Pass ``x`` to the next device of the ring."""
    return lax.ppermute(x, axis, [(j, (j + 1) % size) for j in range(size)])


def _ring_forward(q, k, v, implementation: str, axis: str):
    forward, _ = BLOCKS[implementation]
    size, me, half = lax.axis_size(axis), lax.axis_index(axis), q.shape[1] // 2
    o, lse = forward(q, k, v, causal=True)
    o = o.astype(jnp.float32)
    kv = jnp.stack([k, v])
    for step in range(1, size):
        kv = _send_on(kv, axis, size)
        source = (me - step) % size

        def early(o, lse, kv=kv):  # the block's first chunk precedes all of ours
            return _merge(o, lse, *forward(q, kv[0][:, :half], kv[1][:, :half], causal=False))

        def late(o, lse, kv=kv):  # the whole block precedes our second chunk
            o2, lse2 = _merge(o[:, half:], lse[..., half:], *forward(q[:, half:], kv[0], kv[1], causal=False))
            return o.at[:, half:].set(o2), lse.at[..., half:].set(lse2)

        o, lse = lax.cond(source < me, early, late, o, lse)
    o = o.astype(q.dtype)
    return o, (q, k, v, o, lse)


def _ring_backward(implementation: str, axis: str, residuals, do):
    q, k, v, o, lse = residuals
    _, backward = BLOCKS[implementation]
    size, me, half = lax.axis_size(axis), lax.axis_index(axis), q.shape[1] // 2
    dq, dk, dv = backward(q, k, v, o, lse, do, causal=True)
    kv, dkv = jnp.stack([k, v]), jnp.stack([dk, dv])
    for step in range(1, size):
        kv, dkv = _send_on(kv, axis, size), _send_on(dkv, axis, size)
        source = (me - step) % size

        def early(dq, dkv, kv=kv):
            dq_b, dk_b, dv_b = backward(q, kv[0][:, :half], kv[1][:, :half], o, lse, do, causal=False)
            return dq + dq_b, dkv.at[:, :, :half].add(jnp.stack([dk_b, dv_b]))

        def late(dq, dkv, kv=kv):
            dq_b, dk_b, dv_b = backward(q[:, half:], kv[0], kv[1], o[:, half:], lse[..., half:],
                                        do[:, half:], causal=False)
            return dq.at[:, half:].add(dq_b), dkv + jnp.stack([dk_b, dv_b])

        dq, dkv = lax.cond(source < me, early, late, dq, dkv)
    if size > 1:  # the accumulators sit one device short of home
        dkv = _send_on(dkv, axis, size)
    return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _ring(q, k, v, implementation, axis):
    return _ring_forward(q, k, v, implementation, axis)[0]


_ring.defvjp(_ring_forward, _ring_backward)


def ring_attention(q, k, v, implementation: str = "xla", axis: str = "cp"):
    """Causal attention of this device's zigzag chunks ``q [b, 2c, h, d]``, ``k, v [b, 2c,
    kv_heads, d]`` against the whole sequence on the ``axis`` ring; call it per shard (inside a
    ``shard_map`` over ``axis``). ``implementation``: ``xla`` or ``pallas`` per block."""
    if implementation not in BLOCKS:
        raise ValueError(f"ring attention runs {sorted(BLOCKS)} per block, not {implementation!r}")
    return _ring(q, k, v, implementation, axis)
