"""Causal flash attention in Pallas, forward and backward (FlashAttention-2, Dao 2023).

Layout ``q [batch, seq, heads, head_dim]``, ``k, v [batch, seq, kv_heads, head_dim]``; grouped-query
attention reads each K/V head for its group of query heads through the block index maps, so K/V
are never repeated in memory.

* Forward (Dao 2023, Alg. 1): one program per (batch, head, query block) streams the key blocks
  up to the causal diagonal, keeping the running max ``m``, the running sum ``l`` and the output
  accumulator in float32 (online softmax); it writes ``o`` and ``lse = m + log l`` per row.
* Backward (Alg. 2, split in two kernels as Triton's tutorial and JAX's Pallas op do): with
  ``delta = rowsum(dO * O)``, one kernel per (batch, KV head, key block) accumulates ``dK, dV``
  over the query blocks below the diagonal and over the query heads of its group (so dK/dV are
  never materialised per query head); one per (batch, head, query block) accumulates ``dQ``.
  ``P = exp(S - lse)`` is recomputed block by block; nothing of size ``seq x seq`` is stored.

Every loop runs in two parts: the tiles wholly visible under the causal mask without any masking
work, then the tiles on the diagonal with the causal and padded-key mask. Tiles, ``num_warps`` and ``num_stages`` per pass come from
:mod:`jaxlayouts.kernels.tuning` (a table per device kind and shape, written by
``python -m jaxlayouts.kernels.tune``), else its defaults.

Sequence lengths that are not a multiple of the block sizes are padded; padded keys are masked.
On GPU the kernels lower through Pallas' Triton backend; on CPU they run in interpret mode
(``interpret=None`` picks that automatically), which is slow and meant for tests.

Levers toward cuDNN (0.65x forward+backward at T=2k, 0.54x at 8k on an H200 before them): the tile
sizes and warps/stages per shape are expected to pay most (the defaults were never tuned); the
unmasked full tiles save the mask's iota/compare/select on all but the diagonal tiles, which
matters more at long T. Both are unmeasured until a GPU run. A Hopper path through Pallas'
Mosaic GPU backend (wgmma, TMA, warp specialisation, as FlashAttention-3) is not built: it
lowers only for sm_90 and has no interpret mode here, so nothing of it could be checked on CPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxlayouts.kernels import interpret_mode
from jaxlayouts.kernels.tuning import TILES, BlockSizes, attention_blocks

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
"""Finite "minus infinity" for masked scores, so no row ever computes inf - inf."""


def _causal_blocks(query_end, block_k):
    """Number of key blocks a query block ending (exclusive) at ``query_end`` attends to."""
    return lax.div(query_end + block_k - 1, block_k)


def _full_key_blocks(q_start, block_k):
    """Key blocks every query of a block starting at ``q_start`` sees whole (no mask): those
    ending at or before its first query. For a block of real queries they hold only real keys;
    a block of padded queries may see padded keys unmasked, but its rows are dropped."""
    return lax.div(q_start, block_k)


def _scores(q, k, q_start, k_start, scale, seq_len, masked):
    """Scaled scores ``q k^T`` of one tile, float32; ``masked`` (static) applies the causal and
    padded-key mask, which full blocks skip."""
    s = plgpu.dot(q, k, trans_b=True) * scale
    if not masked:
        return s
    q_pos = q_start + jnp.arange(q.shape[0])[:, None]
    k_pos = k_start + jnp.arange(k.shape[0])[None, :]
    return jnp.where((q_pos >= k_pos) & (k_pos < seq_len), s, MASK_VALUE)


# ---------------------------------------------------------------------------------------------
# Forward


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, block_k, seq_len):
    block_q = q_ref.shape[0]
    q_start = pl.program_id(2) * block_q
    q = q_ref[...]

    def body(masked, j, carry):
        acc, m, l = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = _scores(q, k, q_start, j * block_k, scale, seq_len, masked)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[:, None])
        correction = jnp.exp(m - m_new)
        acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l * correction + p.sum(axis=-1)

    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), MASK_VALUE, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    full = _full_key_blocks(q_start, block_k)
    carry = lax.fori_loop(0, full, functools.partial(body, False), carry)
    acc, m, l = lax.fori_loop(full, _causal_blocks(q_start + block_q, block_k),
                              functools.partial(body, True), carry)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _params(num_warps, num_stages):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _forward(q, k, v, scale, blocks: BlockSizes, seq_len, interpret):
    batch, padded, heads, head_dim = q.shape
    group = heads // k.shape[2]
    bq, bk = blocks.block_q, blocks.block_k
    kv_spec = pl.BlockSpec((None, padded, None, head_dim), lambda b, h, i: (b, 0, h // group, 0))
    return pl.pallas_call(
        functools.partial(_forward_kernel, scale=scale, block_k=bk, seq_len=seq_len),
        grid=(batch, heads, padded // bq),
        in_specs=[pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0)), kv_spec, kv_spec],
        out_specs=[pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0)),
                   pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((batch, heads, padded), jnp.float32)],
        compiler_params=_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret, name="flash_attention_forward",
    )(q, k, v)


# ---------------------------------------------------------------------------------------------
# Backward


def _dkv_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dk_ref, dv_ref, *,
                scale, block_q, seq_len):
    block_k = k_ref.shape[0]
    k_start = pl.program_id(2) * block_k
    k, v = k_ref[...], v_ref[...]
    padded, group = q_ref.shape[0], q_ref.shape[1]

    def body(g, masked, i, carry):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        s = _scores(q, k, i * block_q, k_start, scale, seq_len, masked)
        p = jnp.exp(s - lse_ref[g, rows][:, None])
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
        dp = plgpu.dot(do, v, trans_b=True)
        ds = p * (dp - delta_ref[g, rows][:, None]) * scale
        return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

    first = lax.div(k_start, block_q)
    # Query blocks whose first row is at or past this block's last key see it whole. Padded keys
    # there go unmasked, which changes only their own dK/dV rows (dropped); padded query rows add
    # nothing (their dO and delta are zero).
    first_full = lax.div(k_start + block_k - 1 + block_q - 1, block_q)
    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for g in range(group):  # static: the query heads sharing this K/V head
        carry = lax.fori_loop(first, first_full, functools.partial(body, g, True), carry)
        carry = lax.fori_loop(first_full, padded // block_q, functools.partial(body, g, False), carry)
    dk, dv = carry
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dq_ref, *, scale, block_k, seq_len):
    block_q = q_ref.shape[0]
    q_start = pl.program_id(2) * block_q
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(masked, j, dq):
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        p = jnp.exp(_scores(q, k, q_start, j * block_k, scale, seq_len, masked) - lse[:, None])
        ds = p * (plgpu.dot(do, v, trans_b=True) - delta[:, None]) * scale
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    full = _full_key_blocks(q_start, block_k)
    dq = lax.fori_loop(0, full, functools.partial(body, False), jnp.zeros(q.shape, jnp.float32))
    dq = lax.fori_loop(full, _causal_blocks(q_start + block_q, block_k), functools.partial(body, True), dq)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _backward(q, k, v, o, lse, do, scale, blocks: BlockSizes, seq_len, interpret):
    batch, padded, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    bq, bk = blocks.block_q_backward, blocks.block_k_backward
    params = _params(blocks.num_warps_backward, blocks.num_stages_backward)
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))

    group_rows = pl.BlockSpec((None, padded, group, head_dim), lambda b, h, j: (b, 0, h, 0))
    group_stats = pl.BlockSpec((None, group, padded), lambda b, h, j: (b, h, 0))
    kv_block = pl.BlockSpec((None, bk, None, head_dim), lambda b, h, j: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_q=bq, seq_len=seq_len),
        grid=(batch, kv_heads, padded // bk),
        in_specs=[group_rows, group_rows, group_stats, group_stats, kv_block, kv_block],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params, interpret=interpret, name="flash_attention_dkv",
    )(q, do, lse, delta, k, v)

    q_block = pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0))
    stats_block = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    kv_full = pl.BlockSpec((None, padded, None, head_dim), lambda b, h, i: (b, 0, h // group, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=bk, seq_len=seq_len),
        grid=(batch, heads, padded // bq),
        in_specs=[q_block, q_block, stats_block, stats_block, kv_full, kv_full],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params, interpret=interpret, name="flash_attention_dq",
    )(q, do, lse, delta, k, v)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Public op


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, blocks: BlockSizes, interpret: bool):
    return _flash_forward(q, k, v, blocks, interpret)[0]


def _pad(x, length):
    """Zero-pad the sequence axis to ``length``."""
    extra = length - x.shape[1]
    return x if not extra else jnp.pad(x, ((0, 0), (0, extra), (0, 0), (0, 0)))


def _flash_forward(q, k, v, blocks, interpret):
    seq_len, head_dim = q.shape[1], q.shape[3]
    multiple = max(getattr(blocks, name) for name in TILES)  # powers of two: the largest is their lcm
    padded = -(-seq_len // multiple) * multiple
    qp, kp, vp = (_pad(x, padded) for x in (q, k, v))
    o, lse = _forward(qp, kp, vp, head_dim ** -0.5, blocks, seq_len, interpret)
    return o[:, :seq_len], (qp, kp, vp, o, lse)


def _flash_backward(blocks, interpret, residuals, do):
    qp, kp, vp, o, lse = residuals
    seq_len, head_dim = do.shape[1], do.shape[3]
    dq, dk, dv = _backward(qp, kp, vp, o, lse, _pad(do, qp.shape[1]), head_dim ** -0.5, blocks,
                           seq_len, interpret)
    return dq[:, :seq_len], dk[:, :seq_len], dv[:, :seq_len]


_flash.defvjp(_flash_forward, _flash_backward)


def flash_attention(q, k, v, blocks: BlockSizes | None = None, interpret: bool | None = None):
    """Causal softmax(QK^T / sqrt(d)) V without materialising the scores; differentiable.
    ``blocks`` defaults to the tuned (or default) tiles for this device kind and shape."""
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv_heads={k.shape[2]} must divide heads={q.shape[2]}")
    if blocks is None:
        blocks = attention_blocks(jax.devices()[0].device_kind, q.shape[1], q.shape[3],
                                  q.shape[2] // k.shape[2])
    return _flash(q, k, v, blocks.clamped(q.shape[1]), interpret_mode(interpret))
