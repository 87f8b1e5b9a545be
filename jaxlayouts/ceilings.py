"""The two ceilings a device's numbers are read against, measured on that device through JAX.

- ``matmul_tflops``: a large dense matmul in the compute dtype (2 M N K FLOPs per call).
- ``copy_gbs``: a device-to-device copy (``jnp.copy``, which XLA keeps as one ``copy``), counting
  the bytes read plus the bytes written.

Inputs are random normal (never zeros, which some hardware multiplies faster); each figure is the
median of ``iters`` synchronised runs after the compile and ``warmup`` runs (``timing.timed``).
``small=True`` uses tiny shapes, for a CPU dry run of the code path: those figures mean nothing.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlayouts.timing import timed

FULL = {"matmul_size": 8192, "copy_bytes": 2 * 2**30, "warmup": 5, "iters": 20}
SMALL = {"matmul_size": 128, "copy_bytes": 2**20, "warmup": 1, "iters": 3}


def matmul_tflops(size: int, dtype: str = "bfloat16", *, warmup: int, iters: int) -> float:
    """TFLOP/s of one ``size x size @ size x size`` matmul."""
    a, b = (jax.random.normal(key, (size, size), jnp.dtype(dtype)) for key in jax.random.split(jax.random.key(0)))
    measured = timed(jax.jit(jnp.matmul), a, b, warmup=warmup, iters=iters)
    return 2 * size**3 / measured["time_s"] / 1e12


def copy_gbs(num_bytes: int, dtype: str = "bfloat16", *, warmup: int, iters: int) -> float:
    """GB/s of a device copy of ``num_bytes``, counting read plus write (2 x ``num_bytes``)."""
    dtype = jnp.dtype(dtype)
    x = jax.random.normal(jax.random.key(1), (num_bytes // dtype.itemsize,), dtype)
    measured = timed(jax.jit(jnp.copy), x, warmup=warmup, iters=iters)
    return 2 * x.nbytes / measured["time_s"] / 1e9


def measure(small: bool = False) -> dict:
    """Both ceilings on the default device, with the shapes they were measured at."""
    shape = SMALL if small else FULL
    runs = {"warmup": shape["warmup"], "iters": shape["iters"]}
    return {"matmul_tflops": matmul_tflops(shape["matmul_size"], **runs),
            "copy_gbs": copy_gbs(shape["copy_bytes"], **runs),
            "matmul_shape": [shape["matmul_size"]] * 3, "copy_bytes": shape["copy_bytes"],
            "dtype": "bfloat16"}


def text(ceilings: dict, platform: str) -> str:
    """The ceilings as a sentence; on CPU, that they are this CPU's figures, not a GPU's."""
    line = (f"matmul {ceilings['matmul_tflops']:.3g} TFLOP/s, copy {ceilings['copy_gbs']:.3g} GB/s (read + write). "
            "Each `vs matmul` / `vs copy` is a rate over these (one shape's median, not a bound: above 1, "
            "the kernel ran faster than that matmul or copy)")
    if platform == "cpu":
        line += (". **These are CPU figures** (emulation at tiny shapes, a check of the harness): the ratios are "
                 "to this CPU, not to any GPU")
    return line
