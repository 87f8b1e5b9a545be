"""Hand-written kernels (Pallas, Triton), each beside its reference and custom VJP."""

from __future__ import annotations


def interpret_mode(interpret: bool | None) -> bool:
    """Pallas interpret mode: ``None`` means "on CPU" (where no Pallas backend compiles)."""
    import jax  # here, not at the top: layout validation imports this package before JAX starts

    return jax.default_backend() == "cpu" if interpret is None else interpret
