"""Kernel tuning: the tuned table's tiles reach the kernels, defaults otherwise, and the tuner's
dry run writes a table they read."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from conftest import clean_env
from kernel_helpers import NORM_CONFIG, pallas_calls, random_qkv

from jaxlayouts.kernels import tuning
from jaxlayouts.kernels.flash_attention import BlockSizes, flash_attention
from jaxlayouts.model.attention import xla_attention


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


def test_norm_config_from_the_table_else_defaults(tmp_path):
    table = tmp_path / "tuned.json"
    assert tuning.norm_config("NVIDIA H200", 8192, table) == tuning.default_norm_config(8192)
    assert (tuning.default_norm_config(8192).block_rows, tuning.default_norm_config(2048).block_rows) == (1, 2)
    tuning.record("NVIDIA H200", "rms_norm", "8192", NORM_CONFIG, {"forward_ms": 1.0}, table)
    assert tuning.norm_config("NVIDIA H200", 8192, table) == NORM_CONFIG
    assert tuning.norm_config("NVIDIA H100", 8192, table) == tuning.default_norm_config(8192)


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
