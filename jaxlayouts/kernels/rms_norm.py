"""Fused RMSNorm in Pallas, forward and backward, and the plain reference.

    y = x * r * w,  r = 1 / sqrt(mean(x^2) + eps)                       (Zhang & Sennrich 2019)
    dx = r * (dy * w - x_hat * mean(dy * w * x_hat)),  x_hat = x * r,  dw = sum_rows dy * x_hat

One program normalises a block of rows in one pass over memory (read x once, write y once, keep
``r`` per row for the backward pass), which is what a fused kernel buys over the several passes of
the plain version. The backward kernel writes per-block partial ``dw`` rows that one sum reduces.
Rows are padded to the block size. On CPU the kernels run in interpret mode (tests only).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxlayouts.kernels import interpret_mode

BLOCK_ROWS = 8
"""Rows per program; each row is a whole model dimension (up to 8192 for the study's 65B)."""


def rms_norm_reference(x, scale, eps: float):
    """RMSNorm computed in float32 with XLA (the ``--norm xla`` path)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (normed * scale).astype(x.dtype)


def _forward_kernel(x_ref, w_ref, y_ref, r_ref, *, eps):
    x = x_ref[...].astype(jnp.float32)
    r = jax.lax.rsqrt(jnp.mean(x * x, axis=-1) + eps)
    y_ref[...] = (x * r[:, None] * w_ref[...].astype(jnp.float32)).astype(y_ref.dtype)
    r_ref[...] = r


def _backward_kernel(x_ref, w_ref, r_ref, dy_ref, dx_ref, dw_ref):
    x = x_ref[...].astype(jnp.float32)
    dy = dy_ref[...].astype(jnp.float32)
    w = w_ref[...].astype(jnp.float32)
    x_hat = x * r_ref[...][:, None]
    dy_w = dy * w
    dx = r_ref[...][:, None] * (dy_w - x_hat * jnp.mean(dy_w * x_hat, axis=-1, keepdims=True))
    dx_ref[...] = dx.astype(dx_ref.dtype)
    dw_ref[...] = jnp.sum(dy * x_hat, axis=0)


def _rows(x):
    rows = x.reshape(-1, x.shape[-1])
    extra = -rows.shape[0] % BLOCK_ROWS
    return jnp.pad(rows, ((0, extra), (0, 0))) if extra else rows


def _forward(x, scale, eps, interpret):
    rows = _rows(x)
    n, d = rows.shape
    row_block = pl.BlockSpec((BLOCK_ROWS, d), lambda i: (i, 0))
    y, r = pl.pallas_call(
        functools.partial(_forward_kernel, eps=eps), grid=(n // BLOCK_ROWS,),
        in_specs=[row_block, pl.BlockSpec((d,), lambda i: (0,))],
        out_specs=[row_block, pl.BlockSpec((BLOCK_ROWS,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct(rows.shape, x.dtype), jax.ShapeDtypeStruct((n,), jnp.float32)],
        interpret=interpret, name="rms_norm_forward")(rows, scale)
    count = x.size // x.shape[-1]
    return y[:count].reshape(x.shape), (rows, scale, r)


def _backward(eps, interpret, residuals, dy):
    rows, scale, r = residuals
    n, d = rows.shape
    dy_rows = _rows(dy)
    row_block = pl.BlockSpec((BLOCK_ROWS, d), lambda i: (i, 0))
    dx, dw_partial = pl.pallas_call(
        _backward_kernel, grid=(n // BLOCK_ROWS,),
        in_specs=[row_block, pl.BlockSpec((d,), lambda i: (0,)),
                  pl.BlockSpec((BLOCK_ROWS,), lambda i: (i,)), row_block],
        out_specs=[row_block, pl.BlockSpec((None, d), lambda i: (i, 0))],
        out_shape=[jax.ShapeDtypeStruct(rows.shape, dy.dtype),
                   jax.ShapeDtypeStruct((n // BLOCK_ROWS, d), jnp.float32)],
        interpret=interpret, name="rms_norm_backward")(rows, scale, r, dy_rows)
    count = dy.size // d
    return dx[:count].reshape(dy.shape), dw_partial.sum(axis=0).astype(scale.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rms_norm(x, scale, eps, interpret):
    return _forward(x, scale, eps, interpret)[0]


_rms_norm.defvjp(lambda x, scale, eps, interpret: _forward(x, scale, eps, interpret), _backward)


def rms_norm_pallas(x, scale, eps: float, interpret: bool | None = None):
    """Fused RMSNorm over the last axis of ``x``; output in ``x.dtype``; differentiable."""
    return _rms_norm(x, scale, eps, interpret_mode(interpret))
