"""Fused RMSNorm as Triton kernels called through ``jax_triton.triton_call`` (NVIDIA GPUs only).

Same formulas as :mod:`jaxlayouts.kernels.rms_norm`: one program per row in the forward pass
(``y = x * r * w``, ``r`` kept per row); the backward pass launches a bounded number of programs
(as the Pallas kernel: ``backward_programs_per_core`` per streaming multiprocessor), each computing
``dx`` row by row over its share of rows and keeping one partial ``dw`` in registers, so the
float32 partials are ``programs x d``. Warps per pass come per width from
:mod:`jaxlayouts.kernels.tuning`. Expected lever: the warps per width and the bounded partials, as
for the Pallas kernel; unmeasured until a GPU run (it has never run: the H200 image's jax-triton
0.4.1 does not work with its triton 3.6.0).

Triton and jax-triton are the optional ``[gpu]`` extra; check
:func:`jaxlayouts.kernels.triton_versions.unavailable_reason` before importing this module. The
call works with jax-triton 0.3.1 (``out_shape=``) and 0.4 (``out_type=``).
"""

from __future__ import annotations

import functools
import inspect

import jax
import jax.numpy as jnp
import jax_triton
import triton
import triton.language as tl

from jaxlayouts.kernels import target_device
from jaxlayouts.kernels.rms_norm import backward_programs
from jaxlayouts.kernels.tuning import norm_config

OUT = "out_type" if "out_type" in inspect.signature(jax_triton.triton_call).parameters else "out_shape"
"""The output-shape keyword of ``triton_call``: ``out_shape`` until jax-triton 0.4 renamed it."""


@triton.jit
def _forward_kernel(x_ptr, w_ptr, y_ptr, r_ptr, d: tl.constexpr, eps: tl.constexpr, block: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, block)
    mask = cols < d
    x = tl.load(x_ptr + row * d + cols, mask=mask, other=0.0).to(tl.float32)
    r = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / d + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * d + cols, (x * r * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(r_ptr + row, r)


@triton.jit
def _backward_kernel(x_ptr, w_ptr, r_ptr, dy_ptr, dx_ptr, dw_ptr, rows: tl.constexpr, d: tl.constexpr,
                     rows_per_program: tl.constexpr, block: tl.constexpr):
    program = tl.program_id(0)
    cols = tl.arange(0, block)
    mask = cols < d
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((block,), dtype=tl.float32)
    for i in range(rows_per_program):
        row = program * rows_per_program + i
        if row < rows:
            x = tl.load(x_ptr + row * d + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + row * d + cols, mask=mask, other=0.0).to(tl.float32)
            r = tl.load(r_ptr + row)
            x_hat = x * r
            dy_w = dy * w
            dx = r * (dy_w - x_hat * (tl.sum(dy_w * x_hat, axis=0) / d))
            tl.store(dx_ptr + row * d + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dw += dy * x_hat
    tl.store(dw_ptr + program * d + cols, dw, mask=mask)


def _forward(x, scale, eps):
    rows = x.reshape(-1, x.shape[-1])
    n, d = rows.shape
    config = norm_config(target_device().device_kind, d)
    y, r = jax_triton.triton_call(
        rows, scale, kernel=_forward_kernel,
        **{OUT: [jax.ShapeDtypeStruct(rows.shape, x.dtype), jax.ShapeDtypeStruct((n,), jnp.float32)]},
        grid=(n,), num_warps=config.num_warps, d=d, eps=eps, block=triton.next_power_of_2(d))
    return y.reshape(x.shape), (rows, scale, r)


def _backward(eps, residuals, dy):
    del eps
    rows, scale, r = residuals
    n, d = rows.shape
    config = norm_config(target_device().device_kind, d)
    programs = backward_programs(n, config)
    dx, dw = jax_triton.triton_call(
        rows, scale, r, dy.reshape(rows.shape), kernel=_backward_kernel,
        **{OUT: [jax.ShapeDtypeStruct(rows.shape, dy.dtype), jax.ShapeDtypeStruct((programs, d), jnp.float32)]},
        grid=(programs,), num_warps=config.backward_num_warps, rows=n, d=d,
        rows_per_program=triton.cdiv(n, programs), block=triton.next_power_of_2(d))
    return dx.reshape(dy.shape), dw.sum(axis=0).astype(scale.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def rms_norm_triton(x, scale, eps: float):
    """Fused RMSNorm over the last axis of ``x`` with Triton kernels; differentiable."""
    return _forward(x, scale, eps)[0]


rms_norm_triton.defvjp(lambda x, scale, eps: _forward(x, scale, eps), _backward)
