"""RMSNorm implementations, chosen by ``--norm``; kernels run on each device's shard."""

from __future__ import annotations

from jaxlayouts.choices import NORM
from jaxlayouts.kernels.rms_norm import rms_norm_pallas, rms_norm_reference
from jaxlayouts.mesh import per_shard
from jaxlayouts.model.axes import RESIDUAL


def _triton(x, scale, eps):
    from jaxlayouts.kernels.rms_norm_triton import rms_norm_triton  # optional [gpu] extra
    return rms_norm_triton(x, scale, eps)


IMPLEMENTATIONS = {name: globals()[r.function] for name, r in NORM.items()}
"""Each ``--norm`` record's function (``choices.NORM``)."""


def rms_norm(x, scale, eps: float, implementation: str):
    """RMSNorm of the residual stream ``x [batch, seq, d_model]``. Kernels are opaque to XLA's
    partitioner, so they run per shard (the norm needs whole rows, which every layout keeps)."""
    kernel = IMPLEMENTATIONS[implementation]
    if not NORM[implementation].per_shard:
        return kernel(x, scale, eps)
    return per_shard(lambda x, scale: kernel(x, scale, eps), (RESIDUAL, ("embed",)), RESIDUAL)(x, scale)
