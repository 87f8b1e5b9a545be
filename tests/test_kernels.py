"""Pallas kernels (interpret mode on CPU) against their references, and the kernel benchmark."""

import functools
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import clean_env

from jaxlayouts.flops import attention_flops
from jaxlayouts.kernels import tuning
from jaxlayouts.kernels.flash_attention import (
    BlockSizes,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
)
from jaxlayouts.kernels.rms_norm import rms_norm_pallas, rms_norm_reference
from jaxlayouts.layout import InvalidInput, validate
from jaxlayouts.model.attention import IMPLEMENTATIONS, xla_attention

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


def attention_and_grads(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))


def random_qkv(batch, seq_len, heads, kv_heads, head_dim, dtype):
    keys = jax.random.split(jax.random.key(seq_len + heads), 4)
    q = jax.random.normal(keys[0], (batch, seq_len, heads, head_dim), dtype)
    k, v = (jax.random.normal(key, (batch, seq_len, kv_heads, head_dim), dtype) for key in keys[1:3])
    return q, k, v, jax.random.normal(keys[3], q.shape, dtype)


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


def test_flash_attention_tiles_from_the_tuned_table(tmp_path, monkeypatch):
    """With no blocks given, the tiles and warps come from the table for this device and shape."""
    table = tmp_path / "tuned.json"
    monkeypatch.setattr(tuning, "TABLE", table)
    q, k, v, _ = random_qkv(1, 64, 4, 2, 32, jnp.float32)

    def forward_launch():
        jaxpr = jax.make_jaxpr(lambda q, k, v: flash_attention(q, k, v))(q, k, v)
        call = next(pallas_calls(jaxpr.jaxpr))
        return call.params["grid_mapping"].grid, call.params["compiler_params"]

    assert forward_launch()[0] == (1, 4, 1)  # default block_q 128, clamped to the 64-long sequence
    tuned = BlockSizes(block_q=16, block_k=16, num_warps=8)
    tuning.record(jax.devices()[0].device_kind, "attention", tuning.attention_key(64, 32, 2), tuned, {}, table)
    grid, params = forward_launch()
    assert grid == (1, 4, 4) and "num_warps=8" in str(params)
    np.testing.assert_allclose(flash_attention(q, k, v), xla_attention(q, k, v), rtol=1e-5, atol=1e-5)


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


@pytest.mark.parametrize("seq_len", [64, 200])
def test_kernels_lower_to_triton_for_gpu(seq_len):
    """Without a GPU, lowering for CUDA still runs Pallas' Triton lowering (power-of-two tiles,
    masked loads) and carries each pass's warps and stages; only Triton's compile is left."""
    q = jnp.ones((1, seq_len, 8, 128), jnp.bfloat16)
    k = jnp.ones((1, seq_len, 2, 128), jnp.bfloat16)
    blocks = BlockSizes(num_warps=8, num_stages=2, num_warps_backward=4, num_stages_backward=3)
    attend = lambda q, k, v: flash_attention(q, k, v, blocks, interpret=False)
    grads = jax.jit(lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do))
    text = grads.trace(q, k, k, q).lower(lowering_platforms=("cuda",)).as_text()
    calls = [line for line in text.splitlines() if "xla.gpu.triton" in line]
    assert len(calls) == 3
    for name, warps, stages in (("forward", 8, 2), ("dkv", 4, 3), ("dq", 4, 3)):
        call = next(c for c in calls if f'name = "flash_attention_{name}"' in c)
        assert f"num_warps = {warps} " in call and f"num_stages = {stages} " in call, name
    k = k[:, : seq_len // 2 + 8]  # non-causal block, tk != tq, tk no tile multiple
    block = lambda q, k, v, do: (
        flash_attention_forward(q, k, v, causal=False, blocks=blocks, interpret=False),
        flash_attention_backward(q, k, v, q, jnp.zeros((1, 8, seq_len)), do, causal=False, blocks=blocks,
                                 interpret=False))
    text = jax.jit(block).trace(q, k, k, q).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 3
    x = jnp.ones((seq_len, 5120), jnp.bfloat16)  # 5120: no power of two, padded in registers only
    norm = lambda x, s: rms_norm_pallas(x, s, 1e-5, interpret=False)
    grads = jax.jit(lambda x, s, dy: jax.vjp(norm, x, s)[1](dy))
    text = grads.trace(x, jnp.ones(5120), x).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("xla.gpu.triton") == 2 and "num_warps = 8 " in text


def test_jax_bundled_pallas_attention_matches_reference():
    q, k, v, do = random_qkv(1, 72, 4, 2, 64, jnp.float32)
    got = attention_and_grads(IMPLEMENTATIONS["pallas_jax"], q, k, v, do)
    for g, e in zip(got, attention_and_grads(xla_attention, q, k, v, do)):
        assert relative_error(g, e) < 1e-5


NORM_CONFIG = tuning.NormConfig(block_rows=4, num_warps=4, backward_block_rows=2, backward_num_warps=4,
                                 backward_programs_per_core=3)


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


def test_norm_config_from_the_table_else_defaults(tmp_path):
    table = tmp_path / "tuned.json"
    assert tuning.norm_config("NVIDIA H200", 8192, table) == tuning.default_norm_config(8192)
    assert (tuning.default_norm_config(8192).block_rows, tuning.default_norm_config(2048).block_rows) == (1, 2)
    tuning.record("NVIDIA H200", "rms_norm", "8192", NORM_CONFIG, {"forward_ms": 1.0}, table)
    assert tuning.norm_config("NVIDIA H200", 8192, table) == NORM_CONFIG
    assert tuning.norm_config("NVIDIA H100", 8192, table) == tuning.default_norm_config(8192)


def test_causal_flops_count():
    # 4 * b * h * T^2 * d / 2 forward, 3.5x that forward + backward
    assert attention_flops(2, 1024, 8, 128, backward=False) == 2 * 2 * 8 * 1024 ** 2 * 128
    assert attention_flops(2, 1024, 8, 128, backward=True) == 3.5 * 2 * 2 * 8 * 1024 ** 2 * 128


@pytest.mark.parametrize("knob, value, fragment", [
    ("norm", "triton", "--norm: triton needs an NVIDIA GPU (platform is cpu); use --norm pallas"),
    ("attention", "cudnn", "--attention: cudnn needs an NVIDIA GPU (platform is cpu); use --attention pallas"),
    ("remat", "offload", "--remat: offload needs an NVIDIA GPU (platform is cpu)"),
    ("norm", "fused", "--norm: unknown implementation 'fused'; choose one of xla, pallas, triton"),
])
def test_gpu_only_and_unknown_kernels_are_clear_errors(knob, value, fragment):
    from conftest import make_run
    with pytest.raises(InvalidInput) as error:
        validate(make_run("dp=1", **{knob: value}), 1, platform="cpu")
    assert fragment in str(error.value)


def test_triton_without_its_packages_names_the_extra(monkeypatch):
    import importlib.metadata

    from conftest import make_run

    def version(name):
        if name in ("jax-triton", "triton"):
            raise importlib.metadata.PackageNotFoundError(name)
        return "0.11.2"
    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(InvalidInput) as error:
        validate(make_run("dp=1", norm="triton"), 1, platform="gpu")
    assert "pip install 'jaxlayouts[gpu]'" in str(error.value)


@pytest.mark.parametrize("versions, requires, fragments", [
    ({"jax": "0.11.2", "jax-triton": "0.4.1", "triton": "3.6.0"},  # the H200 image
     ["absl-py>=1.4.0", "jax>=0.11.0", "triton>=3.7", 'pytest; extra == "tests"'],
     ["jax-triton 0.4.1 needs triton>=3.7 (installed: 3.6.0)", "pip install 'jax-triton==0.3.1'",
      "pip install 'triton>=3.7'"]),
    ({"jax": "0.10.2", "jax-triton": "0.4.1", "triton": "3.7.0"}, ["jax>=0.11.0", "triton>=3.7"],
     ["jax-triton 0.4.1 needs jax>=0.11.0 (installed: 0.10.2)"]),
    ({"jax": "0.11.2", "jax-triton": "0.3.1", "triton": "3.6.0"}, ["jax>=0.8.2", "triton>=3.6"], None),
    ({"jax": "0.11.2", "jax-triton": None, "triton": "3.6.0"}, [],
     ["optional packages jax-triton (not installed)", "pip install 'jaxlayouts[gpu]'"]),
])
def test_triton_version_check_names_versions_and_fix(monkeypatch, versions, requires, fragments):
    import importlib.metadata

    from jaxlayouts.kernels.triton_versions import unavailable_reason

    def version(name):
        if versions[name] is None:
            raise importlib.metadata.PackageNotFoundError(name)
        return versions[name]
    monkeypatch.setattr(importlib.metadata, "version", version)
    monkeypatch.setattr(importlib.metadata, "requires", lambda name: requires)
    reason = unavailable_reason()
    if fragments is None:
        assert reason is None
    else:
        for fragment in fragments:
            assert fragment in reason


def test_tuning_dry_run_writes_a_table_the_kernels_read(tmp_path, capsys):
    from jaxlayouts.kernels import tune
    table = tmp_path / "tuned.json"
    tune.main(["--dry-run", "--write", "--table", str(table)])
    winners = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    kind = jax.devices()[0].device_kind
    attention = winners["attention"][tuning.attention_key(24, 16, 2)]
    assert tuning.attention_blocks(kind, 24, 16, 2, table) == BlockSizes(**attention["config"])
    assert attention["forward_ms"] > 0 and attention["forward_backward_ms"] > 0
    norm = winners["rms_norm"]["96"]
    assert tuning.norm_config(kind, 96, table) == tuning.NormConfig(**norm["config"])
    assert tuning.norm_config(kind, 96, table) != tuning.default_norm_config(96)


def test_tuning_rejects_a_dry_run_into_the_package_table():
    proc = subprocess.run([sys.executable, "-m", "jaxlayouts.kernels.tune", "--dry-run", "--write"],
                          capture_output=True, text=True, timeout=120, env=clean_env())
    assert proc.returncode == 2 and "--dry-run --write needs --table PATH" in proc.stderr


def test_kernel_benchmark_reports_every_implementation(tmp_path):
    markdown = tmp_path / "kernels.md"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlayouts.kernel_bench", "--seq_lens", "64", "--head_dim", "64",
         "--d_model", "128", "--norm_rows", "16", "--iters", "2", "--warmup", "1",
         "--markdown", str(markdown)],
        capture_output=True, text=True, timeout=300, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "interpret mode" in proc.stdout
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ceilings = result["ceilings"]  # measured on tiny shapes (CPU): they test the code path only
    assert ceilings["source"] == "measured" and ceilings["matmul_tflops"] > 0 and ceilings["copy_gbs"] > 0
    for row in result["attention"] + result["rms_norm"]:
        assert {"kernel", "implementation", "seq_len", "forward_backward_vs_cudnn", "forward_gbs",
                "forward_backward_gbs"} <= set(row)
    attention = {r["implementation"]: r for r in result["attention"]}
    assert set(attention) == {"xla", "cudnn", "pallas", "pallas_jax"}
    assert attention["cudnn"]["status"] == "unavailable" and attention["cudnn"]["forward_ms"] is None
    for name in ("xla", "pallas", "pallas_jax"):
        row = attention[name]
        assert row["status"] == "ok" and row["seq_len"] == 64 and row["kernel"] == "attention"
        assert row["forward_backward_tflops"] > 0
        assert row["forward_backward_tflops_vs_matmul"] == pytest.approx(
            row["forward_backward_tflops"] / ceilings["matmul_tflops"])
        assert row["forward_vs_cudnn"] is None  # no cudnn row to compare with
    norms = {r["implementation"]: r for r in result["rms_norm"]}
    assert norms["pallas"]["forward_gbs"] > 0 and norms["xla"]["forward_vs_xla"] == 1.0
    assert norms["pallas"]["forward_backward_vs_copy"] == pytest.approx(
        norms["pallas"]["forward_backward_gbs"] / ceilings["copy_gbs"])
    assert norms["pallas"]["seq_len"] is None and norms["pallas"]["forward_backward_vs_cudnn"] is None
    assert norms["triton"]["status"] == "unavailable"
    assert "| 64 | 4x2x64 | pallas |" in markdown.read_text()
    assert "Ceilings (measured): matmul " in markdown.read_text()


def test_kernel_benchmark_reads_given_ceilings(tmp_path):
    ceilings = tmp_path / "ceilings.json"
    ceilings.write_text(json.dumps({"matmul_tflops": 0.5, "copy_gbs": 2.0}))
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlayouts.kernel_bench", "--attention", "xla", "--norm", "xla", "--seq_lens", "32",
         "--head_dim", "8", "--d_model", "16", "--norm_rows", "8", "--iters", "1", "--warmup", "0",
         "--ceilings", str(ceilings)], capture_output=True, text=True, timeout=120, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ceilings"] == {"matmul_tflops": 0.5, "copy_gbs": 2.0, "source": str(ceilings)}
    attention, norm = result["attention"][0], result["rms_norm"][0]
    assert attention["forward_tflops_vs_matmul"] == pytest.approx(attention["forward_tflops"] / 0.5)
    assert norm["forward_vs_copy"] == pytest.approx(norm["forward_gbs"] / 2.0)


@pytest.mark.parametrize("args, message", [
    (["--attention", "flash3"], "--attention: unknown ['flash3']"),
    (["--seq_lens", "2k"], "--seq_lens: 2k; give positive integers"),
    (["--iters", "0"], "--iters: 0; must be at least 1"),
    (["--heads", "6", "--kv_heads", "4"], "--kv_heads: 4 must divide --heads 6"),
    (["--ceilings", "/nonexistent/ceilings.json"], "--ceilings: cannot read /nonexistent/ceilings.json"),
    (["--ceilings", "BAD_JSON"], "is not JSON"),
    (["--ceilings", "ZERO_COPY"], "needs positive numbers for copy_gbs"),
])
def test_kernel_benchmark_rejects_bad_input(args, message, tmp_path):
    files = {"BAD_JSON": "{matmul_tflops: 1", "ZERO_COPY": json.dumps({"matmul_tflops": 600, "copy_gbs": 0})}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    args = [str(tmp_path / a) if a in files else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "jaxlayouts.kernel_bench", *args],
                          capture_output=True, text=True, timeout=120, env=clean_env())
    assert proc.returncode == 2
    assert message in proc.stderr
