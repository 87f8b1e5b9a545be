"""Flash attention in Pallas, forward and backward (FlashAttention-2, Dao 2023).

Layout ``q [batch, seq, heads, head_dim]``, ``k, v [batch, seq, kv_heads, head_dim]``; grouped-query
attention reads each K/V head for its group of query heads through the block index maps, so K/V
are never repeated in memory.

* :func:`flash_attention`: causal attention, differentiable (a custom VJP over the two below); the
  model's ``pallas`` attention.
* :func:`flash_attention_forward` / :func:`flash_attention_backward`: one attention *block*, causal
  (the diagonal block) or not (every query sees every key, ``tq != tk`` allowed), not differentiable.
  The forward returns ``o`` and ``lse``; the backward takes the *final* ``o`` and ``lse`` of rows that
  may span other key blocks. Ring attention (Liu et al. 2023) calls them once per ring step and
  merges the blocks' outputs with their ``lse`` (online softmax), then sums ``dq`` over the steps.

* Forward (Dao 2023, Alg. 1): one program per (batch, head, query block) streams the key blocks
  it sees, keeping the running max ``m``, the running sum ``l`` and the output accumulator in
  float32 (online softmax); it writes ``o`` and ``lse = m + log l`` per row.
* Backward (Alg. 2, split in two kernels as Triton's tutorial and JAX's Pallas op do): with
  ``delta = rowsum(dO * O)``, one kernel per (batch, KV head, key block) accumulates ``dK, dV``
  over the query blocks that see it and over the query heads of its group (so dK/dV are never
  materialised per query head); one per (batch, head, query block) accumulates ``dQ``.
  ``P = exp(S - lse)`` is recomputed block by block from the given ``lse``; nothing of size
  ``seq x seq`` is stored.

Every loop runs in two parts: the tiles seen whole without any masking work, then the masked
ones: causal, the tiles on the diagonal (causal and padded-key mask); non-causal, only a last key
tile holding padding (padded-key mask). Tiles, ``num_warps`` and ``num_stages`` per pass come from
:mod:`jaxlayouts.kernels.tuning` (a table per device kind and shape, written by
``python -m jaxlayouts.kernels.tune``), else its defaults; query tiles are clamped to the query
length, key tiles to the key length.

Sequence lengths that are not a multiple of the block sizes are padded; padded keys are masked,
padded query rows dropped. On GPU the kernels lower through Pallas' Triton backend; on CPU they run
in interpret mode (``interpret=None`` picks that automatically), which is slow and meant for tests.

Levers toward cuDNN (0.65x forward+backward at T=2k, 0.54x at 8k on an H200 before them): the tile
sizes and warps/stages per shape are expected to pay most (the defaults were never tuned); the
unmasked full tiles save the mask's iota/compare/select on all but the diagonal tiles, which
matters more at long T. Both are unmeasured until a GPU run. A Hopper path through Pallas'
Mosaic GPU backend (wgmma, TMA, warp specialisation, as FlashAttention-3) is not built: it
lowers only for sm_90 and has no interpret mode here, so nothing of it could be checked on CPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxlayouts.kernels import interpret_mode, target_device
from jaxlayouts.kernels.tuning import TILES, BlockSizes, attention_blocks

MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)
"""Finite "minus infinity" for masked scores, so no row ever computes inf - inf."""


def _cdiv(a, b):
    return -(-a // b) if isinstance(a, int) else lax.div(a + b - 1, b)


def _key_blocks(q_start, block_q, block_k, kv_len, causal):
    """``(full, end)``: a query block starting at ``q_start`` sees key blocks ``[0, full)`` whole
    (no mask) and ``[full, end)`` through the mask. Causal: the blocks ending at or before its first
    query are whole, the diagonal ones masked (a block of padded queries may see padded keys
    unmasked, but its rows are dropped). Non-causal: the blocks of real keys are whole, a last one
    holding padding is masked (static bounds); blocks of padding only are never visited."""
    if causal:
        return lax.div(q_start, block_k), _cdiv(q_start + block_q, block_k)
    return kv_len // block_k, _cdiv(kv_len, block_k)


def _loop(lower, upper, body, carry):
    """``fori_loop`` that leaves out a loop statically known to be empty."""
    if isinstance(lower, int) and isinstance(upper, int) and lower >= upper:
        return carry
    return lax.fori_loop(lower, upper, body, carry)


def _scores(q, k, q_start, k_start, scale, kv_len, causal, masked):
    """Scaled scores ``q k^T`` of one tile, float32; ``masked`` (static) applies the padded-key
    mask and, if ``causal``, the causal one; whole tiles skip it."""
    s = plgpu.dot(q, k, trans_b=True) * scale
    if not masked:
        return s
    k_pos = k_start + jnp.arange(k.shape[0])[None, :]
    keep = k_pos < kv_len
    if causal:
        keep = (q_start + jnp.arange(q.shape[0])[:, None] >= k_pos) & keep
    return jnp.where(keep, s, MASK_VALUE)


# ---------------------------------------------------------------------------------------------
# Forward


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, block_k, kv_len, causal):
    block_q = q_ref.shape[0]
    q_start = pl.program_id(2) * block_q
    q = q_ref[...]

    def body(masked, j, carry):
        acc, m, l = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = _scores(q, k, q_start, j * block_k, scale, kv_len, causal, masked)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[:, None])
        correction = jnp.exp(m - m_new)
        acc = acc * correction[:, None] + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l * correction + p.sum(axis=-1)

    carry = (jnp.zeros(q.shape, jnp.float32), jnp.full((block_q,), MASK_VALUE, jnp.float32),
             jnp.zeros((block_q,), jnp.float32))
    full, end = _key_blocks(q_start, block_q, block_k, kv_len, causal)
    carry = _loop(0, full, functools.partial(body, False), carry)
    acc, m, l = _loop(full, end, functools.partial(body, True), carry)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(l)


def _params(num_warps, num_stages):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _forward(q, k, v, scale, blocks: BlockSizes, kv_len, causal, interpret):
    """Kernel launch on padded ``q [b, Tq, h, d]``, ``k, v [b, Tk, kvh, d]``."""
    batch, padded, heads, head_dim = q.shape
    group = heads // k.shape[2]
    bq, bk = blocks.block_q, blocks.block_k
    kv_spec = pl.BlockSpec((None, k.shape[1], None, head_dim), lambda b, h, i: (b, 0, h // group, 0))
    return pl.pallas_call(
        functools.partial(_forward_kernel, scale=scale, block_k=bk, kv_len=kv_len, causal=causal),
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
                scale, block_q, q_len, kv_len, causal):
    block_k = k_ref.shape[0]
    k_start = pl.program_id(2) * block_k
    k, v = k_ref[...], v_ref[...]
    group = q_ref.shape[1]

    def body(g, masked, i, carry):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        q, do = q_ref[rows, g, :], do_ref[rows, g, :]
        s = _scores(q, k, i * block_q, k_start, scale, kv_len, causal, masked)
        p = jnp.exp(s - lse_ref[g, rows][:, None])
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
        dp = plgpu.dot(do, v, trans_b=True)
        ds = p * (dp - delta_ref[g, rows][:, None]) * scale
        return dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True), dv

    # Query blocks past the real rows are skipped; padded rows of the last one add nothing (their
    # dO and delta are zero).
    end = _cdiv(q_len, block_q)
    if causal:
        first = lax.div(k_start, block_q)
        # Query blocks whose first row is at or past this block's last key see it whole. Padded
        # keys there go unmasked, which changes only their own dK/dV rows (dropped).
        first_full = _cdiv(k_start + block_k - 1, block_q)
    else:  # every query sees every key; only a key block holding padding is masked
        first = first_full = 0
        if kv_len % block_k:  # all query blocks masked if this block holds padding, else none
            # (arithmetic: this bound from jnp.where failed Pallas' Triton lowering, i1 vs i32, jax 0.10.2)
            first_full = jnp.clip(k_start + block_k - kv_len, 0, 1) * end
    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for g in range(group):  # static: the query heads sharing this K/V head
        carry = _loop(first, first_full, functools.partial(body, g, True), carry)
        carry = _loop(first_full, end, functools.partial(body, g, False), carry)
    dk, dv = carry
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, dq_ref, *, scale, block_k, kv_len, causal):
    block_q = q_ref.shape[0]
    q_start = pl.program_id(2) * block_q
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(masked, j, dq):
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        p = jnp.exp(_scores(q, k, q_start, j * block_k, scale, kv_len, causal, masked) - lse[:, None])
        ds = p * (plgpu.dot(do, v, trans_b=True) - delta[:, None]) * scale
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    full, end = _key_blocks(q_start, block_q, block_k, kv_len, causal)
    dq = _loop(0, full, functools.partial(body, False), jnp.zeros(q.shape, jnp.float32))
    dq = _loop(full, end, functools.partial(body, True), dq)
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _backward(q, k, v, do, lse, delta, scale, blocks: BlockSizes, q_len, kv_len, causal, dtypes,
              interpret):
    """Kernel launches on padded inputs; ``dtypes`` of (dq, dk, dv)."""
    batch, padded, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    bq, bk = blocks.block_q_backward, blocks.block_k_backward
    params = _params(blocks.num_warps_backward, blocks.num_stages_backward)

    group_rows = pl.BlockSpec((None, padded, group, head_dim), lambda b, h, j: (b, 0, h, 0))
    group_stats = pl.BlockSpec((None, group, padded), lambda b, h, j: (b, h, 0))
    kv_block = pl.BlockSpec((None, bk, None, head_dim), lambda b, h, j: (b, j, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_q=bq, q_len=q_len, kv_len=kv_len, causal=causal),
        grid=(batch, kv_heads, k.shape[1] // bk),
        in_specs=[group_rows, group_rows, group_stats, group_stats, kv_block, kv_block],
        out_specs=[kv_block, kv_block],
        out_shape=[jax.ShapeDtypeStruct(k.shape, dtypes[1]), jax.ShapeDtypeStruct(v.shape, dtypes[2])],
        compiler_params=params, interpret=interpret, name="flash_attention_dkv",
    )(q, do, lse, delta, k, v)

    q_block = pl.BlockSpec((None, bq, None, head_dim), lambda b, h, i: (b, i, h, 0))
    stats_block = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))
    kv_full = pl.BlockSpec((None, k.shape[1], None, head_dim), lambda b, h, i: (b, 0, h // group, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=bk, kv_len=kv_len, causal=causal),
        grid=(batch, heads, padded // bq),
        in_specs=[q_block, q_block, stats_block, stats_block, kv_full, kv_full],
        out_specs=q_block,
        out_shape=jax.ShapeDtypeStruct(q.shape, dtypes[0]),
        compiler_params=params, interpret=interpret, name="flash_attention_dq",
    )(q, do, lse, delta, k, v)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# Padding and launch configuration


def _pad(x, length, axis=1):
    """Zero-pad ``axis`` (the sequence) to ``length``."""
    extra = length - x.shape[axis]
    return x if not extra else jnp.pad(x, [(0, extra if a == axis else 0) for a in range(x.ndim)])


def _padded_lengths(blocks: BlockSizes, q_len, kv_len, causal):
    """Sequence lengths padded to a multiple of the tiles that walk them (powers of two: the
    largest is their lcm). Causal pads both to every tile, as its loops index keys by query."""
    if causal:
        multiple = q_multiple = max(getattr(blocks, name) for name in TILES)
    else:
        q_multiple = max(blocks.block_q, blocks.block_q_backward)
        multiple = max(blocks.block_k, blocks.block_k_backward)
    return -(-q_len // q_multiple) * q_multiple, -(-kv_len // multiple) * multiple


def _launch(q, k, causal, blocks, interpret):
    """Checked shapes, tiles and interpret mode. Tiles over queries (``block_q*``) are clamped to
    ``tq``, tiles over keys (``block_k*``) to ``tk``; with no ``blocks``, the tuned table is read at
    ``max(tq, tk)`` (it is tuned for causal attention of that length)."""
    q_len, kv_len = q.shape[1], k.shape[1]
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv_heads={k.shape[2]} must divide heads={q.shape[2]}")
    if causal and q_len != kv_len:
        raise ValueError(f"causal attention needs as many queries as keys, got {q_len} and {kv_len}")
    if blocks is None:
        blocks = attention_blocks(target_device().device_kind, max(q_len, kv_len), q.shape[3],
                                  q.shape[2] // k.shape[2])
    keys = blocks.clamped(kv_len)
    blocks = dataclasses.replace(blocks.clamped(q_len), block_k=keys.block_k,
                                 block_k_backward=keys.block_k_backward)
    return blocks, interpret_mode(interpret)


def _attention_forward(q, k, v, causal, blocks, interpret):
    q_len, kv_len = q.shape[1], k.shape[1]
    q_pad, kv_pad = _padded_lengths(blocks, q_len, kv_len, causal)
    o, lse = _forward(_pad(q, q_pad), _pad(k, kv_pad), _pad(v, kv_pad), q.shape[3] ** -0.5, blocks,
                      kv_len, causal, interpret)
    return o[:, :q_len], lse[:, :, :q_len]


def _attention_backward(q, k, v, o, lse, do, causal, blocks, interpret, dtypes):
    q_len, kv_len = q.shape[1], k.shape[1]
    q_pad, kv_pad = _padded_lengths(blocks, q_len, kv_len, causal)
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
    # Padded query rows: q, dO, delta and lse are zero, so P = 1 times zero dO adds nothing.
    dq, dk, dv = _backward(_pad(q, q_pad), _pad(k, kv_pad), _pad(v, kv_pad),
                           _pad(do.astype(q.dtype), q_pad), _pad(lse, q_pad, 2), _pad(delta, q_pad, 2),
                           q.shape[3] ** -0.5, blocks, q_len, kv_len, causal, dtypes, interpret)
    return dq[:, :q_len], dk[:, :kv_len], dv[:, :kv_len]


# ---------------------------------------------------------------------------------------------
# Public ops


def flash_attention_forward(q, k, v, *, causal: bool, blocks: BlockSizes | None = None,
                            interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """One attention block: ``q [b, tq, h, d]``, ``k, v [b, tk, kvh, d]`` to ``(o, lse)``, ``o``
    ``[b, tq, h, d]`` in ``q.dtype`` and ``lse = log sum_j exp(q k_j^T / sqrt(d))`` ``[b, h, tq]``
    float32. ``causal`` needs ``tq == tk`` (query i sees keys <= i); else every query sees every
    key. Not differentiable: :func:`flash_attention_backward` is its backward."""
    blocks, interpret = _launch(q, k, causal, blocks, interpret)
    return _attention_forward(q, k, v, causal, blocks, interpret)


def flash_attention_backward(q, k, v, o, lse, do, *, causal: bool, blocks: BlockSizes | None = None,
                             interpret: bool | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Float32 ``(dq, dk, dv)`` of this key block's share of an attention whose FINAL output ``o``
    and log-sum-exp ``lse [b, h, tq]`` may span other key blocks (Dao 2023, Alg. 2):
    ``P = exp(S - lse)``, ``dV = P^T dO``, ``dS = P * (dO V^T - rowsum(dO * O))``, ``dQ = dS K / sqrt(d)``,
    ``dK = dS^T Q / sqrt(d)``. Summing ``dq`` over key blocks gives the whole attention's ``dQ``.
    ``o``, ``do`` are ``[b, tq, h, d]``; ``do`` enters the matmuls in ``q.dtype``."""
    blocks, interpret = _launch(q, k, causal, blocks, interpret)
    return _attention_backward(q, k, v, o, lse, do, causal, blocks, interpret, (jnp.float32,) * 3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _flash(q, k, v, blocks: BlockSizes, interpret: bool):
    return _attention_forward(q, k, v, True, blocks, interpret)[0]


def _flash_forward(q, k, v, blocks, interpret):
    o, lse = _attention_forward(q, k, v, True, blocks, interpret)
    return o, (q, k, v, o, lse)


def _flash_backward(blocks, interpret, residuals, do):
    q, k, v, o, lse = residuals
    # The kernels write the gradients in the inputs' dtypes (no float32 round trip through memory).
    return _attention_backward(q, k, v, o, lse, do, True, blocks, interpret, (q.dtype, k.dtype, v.dtype))


_flash.defvjp(_flash_forward, _flash_backward)


def flash_attention(q, k, v, blocks: BlockSizes | None = None, interpret: bool | None = None):
    """Causal softmax(QK^T / sqrt(d)) V without materialising the scores; differentiable.
    ``blocks`` defaults to the tuned (or default) tiles for this device kind and shape."""
    blocks, interpret = _launch(q, k, True, blocks, interpret)
    return _flash(q, k, v, blocks, interpret)
