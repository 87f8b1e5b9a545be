"""Hand-written kernels (Pallas, Triton), each beside its reference and custom VJP.

A kernel is built for the device the step is compiled for, which need not be this process's
default: ``explore --target h100-80gb`` compiles for GPUs on a CPU-only machine. The model's
tracing context (``mesh.sharding_context``) names that device with :func:`compiling_for`; outside
it, the default device decides.
"""

from __future__ import annotations

import contextlib
import contextvars

_TARGET_DEVICE: contextvars.ContextVar = contextvars.ContextVar("jaxlayouts_kernel_device", default=None)


@contextlib.contextmanager
def compiling_for(device):
    """While tracing, build kernels for ``device`` (a ``jax.Device``, possibly a deviceless
    topology's): its platform picks interpret mode, its kind the tuned tiles."""
    token = _TARGET_DEVICE.set(device)
    try:
        yield
    finally:
        _TARGET_DEVICE.reset(token)


def target_device():
    """The device kernels are built for: the one :func:`compiling_for` names, else JAX's first."""
    import jax  # here, not at the top: layout validation imports this package before JAX starts

    return _TARGET_DEVICE.get() or jax.devices()[0]


def interpret_mode(interpret: bool | None) -> bool:
    """Pallas interpret mode: ``None`` means "when compiling for a CPU" (no Pallas backend
    compiles there); a GPU target gets real Triton kernels even on a CPU-only machine."""
    return target_device().platform == "cpu" if interpret is None else interpret
