"""Without a GPU, the kernels still lower through Pallas' Triton path for CUDA."""

import jax
import jax.numpy as jnp
import pytest

from jaxlayouts.kernels.flash_attention import (
    BlockSizes,
    flash_attention,
    flash_attention_backward,
    flash_attention_forward,
)
from jaxlayouts.kernels.rms_norm import rms_norm_pallas


def lower_for_cuda(jitted, *args) -> str:
    """The CUDA lowering's text, traced for an H100: from jax 0.11 Pallas' Triton lowering takes
    the compute capability from the abstract mesh's device, else from the default device (a CPU
    here, which it refuses); jax 0.10 fell back to 9.0 and ignores the mesh."""
    h100 = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=132, platform="gpu")
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("gpu",), abstract_device=h100)):
        return jitted.trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("seq_len", [64, 200])
def test_kernels_lower_to_triton_for_gpu(seq_len):
    """Without a GPU, lowering for CUDA still runs Pallas' Triton lowering (power-of-two tiles,
    masked loads) and carries each pass's warps and stages; only Triton's compile is left."""
    q = jnp.ones((1, seq_len, 8, 128), jnp.bfloat16)
    k = jnp.ones((1, seq_len, 2, 128), jnp.bfloat16)
    blocks = BlockSizes(num_warps=8, num_stages=2, num_warps_backward=4, num_stages_backward=3)
    attend = lambda q, k, v: flash_attention(q, k, v, blocks, interpret=False)
    grads = jax.jit(lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do))
    text = lower_for_cuda(grads, q, k, k, q)
    calls = [line for line in text.splitlines() if "xla.gpu.triton" in line]
    assert len(calls) == 3
    for name, warps, stages in (("forward", 8, 2), ("dkv", 4, 3), ("dq", 4, 3)):
        call = next(c for c in calls if f'name = "flash_attention_{name}"' in c)
        assert f"num_warps = {warps} " in call and f"num_stages = {stages} " in call, name
    k = k[:, : seq_len // 2 + 8]  # non-causal block, tk != tq, tk no tile multiple
    block = lambda q, k, v, do: (
        flash_attention_forward(q, k, v, causal=False, blocks=blocks, interpret=False),
        flash_attention_backward(q, k, v, q, jnp.zeros((1, 8, seq_len)), do, causal=False, blocks=blocks,
                                 interpret=False))
    text = lower_for_cuda(jax.jit(block), q, k, k, q)
    assert text.count("xla.gpu.triton") == 3
    x = jnp.ones((seq_len, 5120), jnp.bfloat16)  # 5120: no power of two, padded in registers only
    norm = lambda x, s: rms_norm_pallas(x, s, 1e-5, interpret=False)
    grads = jax.jit(lambda x, s, dy: jax.vjp(norm, x, s)[1](dy))
    text = lower_for_cuda(grads, x, jnp.ones(5120), x)
    assert text.count("xla.gpu.triton") == 2 and "num_warps = 8 " in text
