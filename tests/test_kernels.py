"""Pallas kernels (interpret mode on CPU) against their references, and the kernel benchmark."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import clean_env

from jaxlayouts.kernels.flash_attention import BlockSizes, attention_flops, flash_attention
from jaxlayouts.kernels.rms_norm import rms_norm_pallas, rms_norm_reference
from jaxlayouts.layout import InvalidInput, validate
from jaxlayouts.model.attention import IMPLEMENTATIONS, xla_attention

SMALL_BLOCKS = BlockSizes(block_q=32, block_k=16, block_q_backward=16, block_k_backward=32)


def relative_error(got, expected):
    got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
    return np.linalg.norm(got - expected) / np.linalg.norm(expected)


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
])
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


def test_jax_bundled_pallas_attention_matches_reference():
    q, k, v, do = random_qkv(1, 72, 4, 2, 64, jnp.float32)
    got = attention_and_grads(IMPLEMENTATIONS["pallas_jax"], q, k, v, do)
    for g, e in zip(got, attention_and_grads(xla_attention, q, k, v, do)):
        assert relative_error(g, e) < 1e-5


@pytest.mark.parametrize("dtype, tolerance", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
def test_pallas_rms_norm_matches_reference(dtype, tolerance):
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (3, 7, 96), dtype)  # 21 rows: not a multiple of the row block
    scale = 1.0 + 0.1 * jax.random.normal(keys[1], (96,), jnp.float32)
    dy = jax.random.normal(keys[2], x.shape, dtype)
    results = []
    for fn in (rms_norm_pallas, rms_norm_reference):
        y, vjp = jax.vjp(lambda x, s: fn(x, s, 1e-5), x, scale)
        results.append((y, *vjp(dy)))
    for name, got, expected in zip(("y", "dx", "dscale"), *results):
        assert got.dtype == expected.dtype, name
        assert relative_error(got, expected) < tolerance, name


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
    import importlib.util

    from conftest import make_run
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InvalidInput) as error:
        validate(make_run("dp=1", norm="triton"), 1, platform="gpu")
    assert "pip install 'jaxlayouts[gpu]'" in str(error.value)


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
    attention = {r["implementation"]: r for r in result["attention"]}
    assert set(attention) == {"xla", "cudnn", "pallas", "pallas_jax"}
    assert attention["cudnn"]["status"] == "unavailable" and "forward_ms" not in attention["cudnn"]
    for name in ("xla", "pallas", "pallas_jax"):
        assert attention[name]["status"] == "ok"
        assert attention[name]["forward_backward_tflops"] > 0
        assert attention[name]["forward_vs_cudnn"] is None  # no cudnn row to compare with
    norms = {r["implementation"]: r for r in result["rms_norm"]}
    assert norms["pallas"]["forward_gb_per_s"] > 0 and norms["xla"]["forward_vs_xla"] == 1.0
    assert norms["triton"]["status"] == "unavailable"
    assert "| 64 | 4x2x64 | pallas |" in markdown.read_text()


@pytest.mark.parametrize("args, message", [
    (["--attention", "flash3"], "--attention: unknown ['flash3']"),
    (["--seq_lens", "2k"], "--seq_lens: 2k; give positive integers"),
    (["--iters", "0"], "--iters: 0; must be at least 1"),
    (["--heads", "6", "--kv_heads", "4"], "--kv_heads: 4 must divide --heads 6"),
])
def test_kernel_benchmark_rejects_bad_input(args, message):
    proc = subprocess.run([sys.executable, "-m", "jaxlayouts.kernel_bench", *args],
                          capture_output=True, text=True, timeout=120, env=clean_env())
    assert proc.returncode == 2
    assert message in proc.stderr
