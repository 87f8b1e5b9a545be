"""Launch configurations of the Pallas kernels, per device kind and shape, from a tuned table.

The table is ``tuned.json`` beside this module: ``{device_kind: {kernel: {shape_key: config}}}``,
written by ``python -m jaxlayouts.kernels.tune --write`` after timing the candidates on that
device. A shape the table does not name falls back to the defaults below, which are starting
points (FlashAttention-2's and Triton's usual choices), NOT measurements: until a GPU run writes
the table, no configuration here is known to be the fastest on any device.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

TABLE = Path(__file__).with_name("tuned.json")
"""Where the tuning harness writes and the kernels read; absent until a GPU run writes it."""


def next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Flash attention tiles (powers of two) and Triton launch knobs per pass. ``None`` warps or
    stages mean Pallas' defaults (4 warps, 3 stages). The tile defaults follow JAX's bundled Pallas
    GPU op for the forward pass and use 64 x 64 tiles in the backward pass (its register pressure
    is higher); they fit head_dim 128 in A100/H100 shared memory."""

    block_q: int = 128
    block_k: int = 64
    block_q_backward: int = 64
    block_k_backward: int = 64
    num_warps: int | None = None
    num_stages: int | None = None
    num_warps_backward: int | None = None
    num_stages_backward: int | None = None

    def clamped(self, seq_len: int) -> "BlockSizes":
        """Shrink blocks longer than the (power-of-two rounded) sequence."""
        cap = max(16, next_power_of_2(seq_len))
        return dataclasses.replace(self, **{name: min(getattr(self, name), cap) for name in TILES})


TILES = ("block_q", "block_k", "block_q_backward", "block_k_backward")


@dataclasses.dataclass(frozen=True)
class NormConfig:
    """RMSNorm launch: rows per program and warps in each pass; the backward pass runs
    ``backward_programs_per_core`` programs per streaming multiprocessor (at least one), each
    looping over row blocks and writing one float32 partial of the scale's gradient."""

    block_rows: int
    num_warps: int
    backward_block_rows: int
    backward_num_warps: int
    backward_programs_per_core: int = 2


def default_norm_config(width: int) -> NormConfig:
    """Untuned start: about 4096 row elements per program (1 row at width 8192, 2 at 2048) and
    8 warps (32 float32 values per thread per row block, far below the 255-register limit), the
    choice of Triton's layer-norm tutorial."""
    rows = max(1, min(16, 4096 // next_power_of_2(width)))
    return NormConfig(block_rows=rows, num_warps=8, backward_block_rows=rows, backward_num_warps=8)


def attention_key(seq_len: int, head_dim: int, group: int) -> str:
    """Table key of an attention shape: sequence rounded up to a power of two, head dim, GQA group."""
    return f"t{next_power_of_2(seq_len)}_d{head_dim}_g{group}"


def load(path: Path | None = None) -> dict:
    """The tuned table at ``path`` (default :data:`TABLE`); empty when no GPU run has written one."""
    path = path or TABLE
    return json.loads(path.read_text()) if path.exists() else {}


def _entry(device_kind: str, kernel: str, key: str, path: Path | None) -> dict | None:
    return load(path).get(device_kind, {}).get(kernel, {}).get(key)


def attention_blocks(device_kind: str, seq_len: int, head_dim: int, group: int,
                     path: Path | None = None) -> BlockSizes:
    """Tuned tiles for this device and shape, else the defaults."""
    entry = _entry(device_kind, "attention", attention_key(seq_len, head_dim, group), path)
    return BlockSizes(**entry["config"]) if entry else BlockSizes()


def norm_config(device_kind: str, width: int, path: Path | None = None) -> NormConfig:
    """Tuned RMSNorm launch for this device and row width, else :func:`default_norm_config`."""
    entry = _entry(device_kind, "rms_norm", str(width), path)
    return NormConfig(**entry["config"]) if entry else default_norm_config(width)


def record(device_kind: str, kernel: str, key: str, config, measured: dict, path: Path | None = None) -> None:
    """Write one tuned entry (the config and what it measured) into the table at ``path``."""
    path = path or TABLE
    table = load(path)
    table.setdefault(device_kind, {}).setdefault(kernel, {})[key] = {
        "config": dataclasses.asdict(config), **measured}
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
