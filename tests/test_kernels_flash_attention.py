"""The Pallas flash attention kernel (interpret mode on CPU) against plain attention: outputs and
gradients, causality, masked tiles, the block forward/backward ring attention uses, and JAX's
bundled kernel."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_helpers import SMALL_BLOCKS, pallas_calls, random_qkv, relative_error

from jaxlayouts.kernels.flash_attention import (
    BlockSizes,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
)
from jaxlayouts.model.attention import IMPLEMENTATIONS, xla_attention


def attention_and_grads(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))


@pytest.mark.parametrize("batch, seq_len, heads, kv_heads, head_dim, dtype, tolerance", [
    (2, 64, 4, 2, 64, jnp.float32, 1e-5),     # grouped-query, blocks divide the sequence
    (1, 80, 2, 2, 128, jnp.float32, 1e-5),    # 80 is no multiple of the 32-row blocks: padded
    (1, 96, 6, 2, 64, jnp.bfloat16, 2e-2),    # bf16, group of 3 query heads per K/V head
    (1, 40, 8, 1, 16, jnp.float32, 1e-5),     # GQA 32q/4kv scaled down (group 8), 40 not a block multiple
])  # 16/16 heads scaled down: the 2/2 case above
def test_flash_attention_matches_reference(batch, seq_len, heads, kv_heads, head_dim, dtype, tolerance):
    q, k, v, do = random_qkv(batch, seq_len, heads, kv_heads, head_dim, dtype)
    got = attention_and_grads(lambda *a: flash_attention(*a, blocks=SMALL_BLOCKS), q, k, v, do)
    expected = attention_and_grads(xla_attention, q, k, v, do)
    for name, g, e in zip(("out", "dq", "dk", "dv"), got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype, name
        assert relative_error(g, e) < tolerance, name


def test_flash_attention_is_causal():
    """Changing a later token must not change an earlier output."""
    q, k, v, _ = random_qkv(1, 48, 2, 2, 64, jnp.float32)
    out = flash_attention(q, k, v, SMALL_BLOCKS)
    out2 = flash_attention(q, k.at[:, 40:].set(0.0), v.at[:, 40:].set(5.0), SMALL_BLOCKS)
    np.testing.assert_array_equal(out[:, :40], out2[:, :40])
    assert not np.allclose(out[:, 40:], out2[:, 40:])


def masked_loops(kernel_jaxpr) -> list[bool]:
    """For each loop of a kernel, in order: whether its body selects (applies a mask)."""
    def selects(jaxpr):
        return any(e.primitive.name == "select_n" or any(
            selects(getattr(p, "jaxpr", p)) for p in e.params.values() if hasattr(getattr(p, "jaxpr", p), "eqns"))
            for e in jaxpr.eqns)
    loops = [e for e in kernel_jaxpr.eqns if e.primitive.name in ("while", "scan")]  # scan: static bounds
    return [selects((e.params.get("body_jaxpr") or e.params["jaxpr"]).jaxpr) for e in loops]


def test_flash_attention_masks_only_the_diagonal_tiles():
    """Each kernel loops over the fully visible tiles without a mask, then the diagonal with it."""
    q, k, v, do = random_qkv(1, 64, 4, 2, 32, jnp.float32)
    grads = lambda q, k, v, do: attention_and_grads(lambda *a: flash_attention(*a, blocks=SMALL_BLOCKS), q, k, v, do)
    forward, dkv, dq = (e.params["jaxpr"] for e in pallas_calls(jax.make_jaxpr(grads)(q, k, v, do).jaxpr))
    assert masked_loops(forward) == [False, True]
    assert masked_loops(dkv) == [True, False] * 2  # per query head of the K/V head's group
    assert masked_loops(dq) == [False, True]


def reference_attention(q, k, v, mask=None):
    """Plain softmax attention with its log-sum-exp; ``mask [tq, tk]`` (True: seen) or every key."""
    group = q.shape[2] // k.shape[2]
    k, v = (jnp.repeat(x, group, axis=2) for x in (k, v))  # query head h reads K/V head h // group
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    if mask is not None:
        s = jnp.where(mask, s, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, axis=-1), v), jax.nn.logsumexp(s, axis=-1)


def random_block(q_len, kv_len, heads=4, kv_heads=2, head_dim=16, batch=2, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim))
    k, v = (jax.random.normal(key, (batch, kv_len, kv_heads, head_dim)) for key in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], q.shape)


@pytest.mark.parametrize("q_len, kv_len", [
    (24, 12),   # tq = 2 tk; 12 keys: one padded key tile (the key tiles clamp to 16)
    (12, 24),   # tq = tk / 2; 24 keys: a whole 16-key tile, then one holding padding
    (20, 48),   # 48 keys fill the 16-key tiles: no masked tile
])
def test_block_forward_non_causal_matches_reference(q_len, kv_len):
    q, k, v, _ = random_block(q_len, kv_len)
    o, lse = flash_attention_forward(q, k, v, causal=False, blocks=SMALL_BLOCKS)
    expected_o, expected_lse = reference_attention(q, k, v)
    assert o.shape == q.shape and o.dtype == q.dtype
    assert lse.shape == (2, 4, q_len) and lse.dtype == jnp.float32
    assert relative_error(o, expected_o) < 1e-5
    np.testing.assert_allclose(lse, expected_lse, rtol=1e-5, atol=1e-5)


def test_block_forward_causal_matches_reference():
    q, k, v, _ = random_block(40, 40)  # 40: no multiple of the 32-row tiles
    o, lse = flash_attention_forward(q, k, v, causal=True, blocks=SMALL_BLOCKS)
    assert relative_error(o, xla_attention(q, k, v)) < 1e-5
    np.testing.assert_allclose(lse, reference_attention(q, k, v, jnp.tri(40, dtype=bool))[1], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="causal attention needs as many queries as keys, got 40 and 24"):
        flash_attention_forward(q, k[:, :24], v[:, :24], causal=True)


@pytest.mark.parametrize("diagonal", [False, True])
def test_block_backward_from_the_final_softmax_sums_over_key_blocks(diagonal):
    """What the ring relies on: with keys K = [K1, K2], each block's backward from the FINAL o and
    lse of the whole rows gives dq terms summing to the whole attention's dQ, and dK, dV slices.
    ``diagonal``: K2 is the queries' own (causal) block, K1 the keys before it; else both are
    fully visible and of other lengths than the queries."""
    q_len, len1, len2 = (20, 12, 20) if diagonal else (20, 12, 24)
    q, k, v, do = random_block(q_len, len1 + len2, seed=1)
    mask = None
    if diagonal:  # query i sits at position len1 + i
        mask = jnp.arange(len1 + len2)[None, :] <= len1 + jnp.arange(q_len)[:, None]
    (o, lse), vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, mask), q, k, v)
    dq, dk, dv = vjp((do, jnp.zeros_like(lse)))
    grads = [flash_attention_backward(q, k[:, part], v[:, part], o, lse, do, causal=causal, blocks=SMALL_BLOCKS)
             for part, causal in ((slice(0, len1), False), (slice(len1, None), diagonal))]
    (dq1, dk1, dv1), (dq2, dk2, dv2) = grads
    assert all(g.dtype == jnp.float32 for g in (*grads[0], *grads[1]))
    assert dk1.shape == (2, len1, 2, 16) and dk2.shape == (2, len2, 2, 16)
    assert relative_error(dq1 + dq2, dq) < 1e-5
    for got, expected in ((dk1, dk[:, :len1]), (dk2, dk[:, len1:]), (dv1, dv[:, :len1]), (dv2, dv[:, len1:])):
        assert relative_error(got, expected) < 1e-5


def test_block_functions_keep_dtypes():
    """bf16 in: o in bf16, lse and the gradients float32 (the ring accumulates them in float32)."""
    q, k, v, do = (x.astype(jnp.bfloat16) for x in random_block(24, 12))
    lse = jax.ShapeDtypeStruct((2, 4, 24), jnp.float32)
    o, lse_out = jax.eval_shape(functools.partial(flash_attention_forward, causal=False), q, k, v)
    assert (o.dtype, lse_out.dtype, lse_out.shape) == (jnp.bfloat16, jnp.float32, (2, 4, 24))
    grads = jax.eval_shape(functools.partial(flash_attention_backward, causal=False), q, k, v, q, lse, do)
    assert [(g.shape, g.dtype) for g in grads] == [(q.shape, jnp.float32), (k.shape, jnp.float32),
                                                   (v.shape, jnp.float32)]


@pytest.mark.parametrize("kv_len, forward, dkv, dq", [
    (64, [False], [False] * 2, [False]),                   # keys fill the tiles: no mask at all
    (40, [False, True], [True, False] * 2, [False, True]),  # whole key tiles, then one holding padding
])
def test_block_non_causal_masks_only_a_padded_key_tile(kv_len, forward, dkv, dq):
    q, k, v, do = random_block(64, kv_len, batch=1)
    lse = jnp.zeros((1, 4, 64))
    run = lambda q, k, v, do: (flash_attention_forward(q, k, v, causal=False, blocks=SMALL_BLOCKS),
                               flash_attention_backward(q, k, v, q, lse, do, causal=False, blocks=SMALL_BLOCKS))
    kernels = [e.params["jaxpr"] for e in pallas_calls(jax.make_jaxpr(run)(q, k, v, do).jaxpr)]
    assert [masked_loops(kernel) for kernel in kernels] == [forward, dkv, dq]


@pytest.mark.parametrize("q_len, kv_len, grids", [
    # default tiles 128/64 (forward q/k), 64/64 (backward): query tiles clamp to 16 at tq=12, key
    # tiles stay 64 for 200 keys (padded to 256); grids: forward, dK/dV (key tiles), dQ (query tiles)
    (12, 200, [(1, 4, 1), (1, 2, 4), (1, 4, 1)]),
    (200, 12, [(1, 4, 2), (1, 2, 1), (1, 4, 4)]),  # and the other way round
])
def test_block_tiles_clamp_per_axis(q_len, kv_len, grids):
    q, k, v, do = random_block(q_len, kv_len, batch=1)
    lse = jnp.zeros((1, 4, q_len))
    run = lambda q, k, v, do: (flash_attention_forward(q, k, v, causal=False, blocks=BlockSizes()),
                               flash_attention_backward(q, k, v, q, lse, do, causal=False, blocks=BlockSizes()))
    calls = pallas_calls(jax.make_jaxpr(run)(q, k, v, do).jaxpr)
    assert [call.params["grid_mapping"].grid for call in calls] == grids


def test_jax_bundled_pallas_attention_matches_reference():
    q, k, v, do = random_qkv(1, 72, 4, 2, 64, jnp.float32)
    got = attention_and_grads(IMPLEMENTATIONS["pallas_jax"], q, k, v, do)
    for g, e in zip(got, attention_and_grads(xla_attention, q, k, v, do)):
        assert relative_error(g, e) < 1e-5
