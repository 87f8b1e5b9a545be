"""Fused RMSNorm in Pallas, forward and backward, and the plain reference.

    y = x * r * w,  r = 1 / sqrt(mean(x^2) + eps)                       (Zhang & Sennrich 2019)
    dx = r * (dy * w - x_hat * mean(dy * w * x_hat)),  x_hat = x * r,  dw = sum_rows dy * x_hat

A fused kernel reads x once and writes y once (keeping ``r`` per row for the backward pass), and
reads x, dy once and writes dx once backward, which is what it buys over the plain version's
several passes; its speed limit is HBM bandwidth.

Why the first version ran at 0.15x (forward) and 0.10x (forward+backward) of XLA's norm on an H200
(16384 x 8192 bf16, ``shared/measurements/h200-2026-11-30.md``): every program took a fixed 8 rows
with Pallas' default 4 warps, so at width 8192 one program held 8 x 8192 float32 values per live
tensor on 128 threads (512 per thread, above the 255-register file: spilled to local memory), the
grid was n/8 small programs whatever the width, and the backward pass wrote one float32 partial
``dw`` row per 8-row block (n/8 x d float32: 64 MiB at that shape) for a second reduction to read
back. Which of these cost most was not measured.

This version:
* rows per program and warps come per width from :mod:`jaxlayouts.kernels.tuning` (a tuned table
  per device kind, else a default of about 4096 elements per program on 8 warps);
* rows are never padded in memory: loads and stores are masked (``plgpu.load/store``), columns
  are padded to a power of two in registers only (Triton needs power-of-two tiles, so widths like
  5120 work);
* the backward pass launches a bounded number of programs (``backward_programs_per_core`` per
  streaming multiprocessor); each loops over every ``programs``-th row block and keeps its partial
  ``dw`` in registers, so the float32 partial buffer is ``programs x d`` (8.25 MiB at 264
  programs and width 8192) instead of ``n/8 x d``.

Expected lever: the per-width rows/warps (no spills) for both passes, the bounded partials for
the backward pass. Unmeasured until a GPU run (``python -m jaxlayouts.kernels.tune --kernel
rms_norm`` then ``python -m jaxlayouts.kernel_bench``). On CPU the kernels run in interpret mode
(tests only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxlayouts.kernels import interpret_mode, target_device
from jaxlayouts.kernels.tuning import NormConfig, next_power_of_2, norm_config


def rms_norm_reference(x, scale, eps: float):
    """RMSNorm computed in float32 with XLA (the ``--norm xla`` path)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale).astype(x.dtype)


def _tile(ref, rows, cols):
    """Masked load of the ``rows x cols`` tile of a ``[n, d]`` ref (zeros outside), as float32."""
    n, d = ref.shape
    mask = (rows < n)[:, None] & (cols < d)[None, :]
    return plgpu.load(ref.at[rows[:, None], cols[None, :]], mask=mask, other=0).astype(jnp.float32), mask


def _forward_kernel(x_ref, w_ref, y_ref, r_ref, *, eps, block_rows, block_cols):
    d = x_ref.shape[1]
    rows = pl.program_id(0) * block_rows + jnp.arange(block_rows)
    cols = jnp.arange(block_cols)
    x, mask = _tile(x_ref, rows, cols)
    w = plgpu.load(w_ref.at[cols], mask=cols < d, other=0).astype(jnp.float32)
    r = lax.rsqrt(jnp.sum(x * x, axis=1) / d + eps)
    plgpu.store(y_ref.at[rows[:, None], cols[None, :]], (x * r[:, None] * w).astype(y_ref.dtype), mask=mask)
    plgpu.store(r_ref.at[rows], r, mask=rows < x_ref.shape[0])


def _backward_kernel(x_ref, w_ref, r_ref, dy_ref, dx_ref, dw_ref, *, block_rows, block_cols, programs):
    n, d = x_ref.shape
    program = pl.program_id(0)
    cols = jnp.arange(block_cols)
    w = plgpu.load(w_ref.at[cols], mask=cols < d, other=0).astype(jnp.float32)

    def body(i, dw):  # row block ``program + i * programs``
        rows = (program + i * programs) * block_rows + jnp.arange(block_rows)
        x, mask = _tile(x_ref, rows, cols)
        dy, _ = _tile(dy_ref, rows, cols)
        r = plgpu.load(r_ref.at[rows], mask=rows < n, other=0)
        x_hat = x * r[:, None]
        dy_w = dy * w
        dx = r[:, None] * (dy_w - x_hat * (jnp.sum(dy_w * x_hat, axis=1) / d)[:, None])
        plgpu.store(dx_ref.at[rows[:, None], cols[None, :]], dx.astype(dx_ref.dtype), mask=mask)
        return dw + jnp.sum(dy * x_hat, axis=0)  # masked rows load as zeros: they add nothing

    blocks = pl.cdiv(n, block_rows)
    dw = lax.fori_loop(0, lax.div(blocks - program + programs - 1, programs), body,
                       jnp.zeros((block_cols,), jnp.float32))
    plgpu.store(dw_ref.at[program * d + cols], dw, mask=cols < d)


def _params(num_warps):
    return plgpu.CompilerParams(num_warps=num_warps)


def _forward(x, scale, eps, config: NormConfig, interpret):
    rows = x.reshape(-1, x.shape[-1])
    n, d = rows.shape
    y, r = pl.pallas_call(
        functools.partial(_forward_kernel, eps=eps, block_rows=config.block_rows,
                          block_cols=next_power_of_2(d)),
        grid=(pl.cdiv(n, config.block_rows),),
        out_shape=[jax.ShapeDtypeStruct(rows.shape, x.dtype), jax.ShapeDtypeStruct((n,), jnp.float32)],
        compiler_params=_params(config.num_warps), interpret=interpret, name="rms_norm_forward",
    )(rows, scale)
    return y.reshape(x.shape), (rows, scale, r)


def backward_programs(n: int, config: NormConfig) -> int:
    """Programs of the backward pass: ``backward_programs_per_core`` per core of the default
    device (streaming multiprocessors on a GPU; one on CPU), at most one per row block."""
    cores = getattr(target_device(), "core_count", None) or 1
    return max(1, min(pl.cdiv(n, config.backward_block_rows), config.backward_programs_per_core * cores))


def _backward(eps, config: NormConfig, interpret, residuals, dy):
    rows, scale, r = residuals
    n, d = rows.shape
    programs = backward_programs(n, config)
    dx, dw_partial = pl.pallas_call(
        functools.partial(_backward_kernel, block_rows=config.backward_block_rows,
                          block_cols=next_power_of_2(d), programs=programs),
        grid=(programs,),
        out_shape=[jax.ShapeDtypeStruct(rows.shape, dy.dtype),
                   jax.ShapeDtypeStruct((programs * d,), jnp.float32)],
        compiler_params=_params(config.backward_num_warps), interpret=interpret,
        name="rms_norm_backward",
    )(rows, scale, r, dy.reshape(rows.shape))
    return dx.reshape(dy.shape), dw_partial.reshape(programs, d).sum(axis=0).astype(scale.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _rms_norm(x, scale, eps, config, interpret):
    return _forward(x, scale, eps, config, interpret)[0]


_rms_norm.defvjp(lambda x, scale, eps, config, interpret: _forward(x, scale, eps, config, interpret),
                 _backward)


def rms_norm_pallas(x, scale, eps: float, interpret: bool | None = None, config: NormConfig | None = None):
    """Fused RMSNorm over the last axis of ``x``; output in ``x.dtype``; differentiable. ``config``
    defaults to the tuned (or default) launch for this device kind and width."""
    config = config or norm_config(target_device().device_kind, x.shape[-1])
    return _rms_norm(x, scale, eps, config, interpret_mode(interpret))
