"""Model FLOPs, device peaks and MFU: the one place these formulas live.

Model FLOPs per token follow PaLM (Chowdhery et al. 2022, App. B), the definition the reference
study uses: ``6 N + 12 L d T`` with N all parameters (embeddings and LM head included), L layers,
d the model width and T the sequence length. 6N counts the forward (2N) and backward (4N) matmuls
per token; 12LdT the attention scores and values (QK^T and PV, forward and backward), with no
discount for the causal mask. Recomputation (remat) is *not* counted: MFU measures useful work.
"""

from __future__ import annotations

from jaxlayouts.layout import ModelConfig

PEAK_BF16_TFLOPS = {
    # dense bf16 tensor-core peaks from the vendors' datasheets (SXM parts)
    "A100": 312.0,
    "H100": 989.0,
    "H200": 989.0,
    "B200": 2250.0,
}


def attention_forward_flops_per_token(model: ModelConfig, seq_len: int) -> int:
    """4 L d T: QK^T and PV of one token against T keys in every layer, forward only, with no
    causal discount (a third of PaLM's 12 L d T)."""
    return 4 * model.num_layers * model.d_model * seq_len


def attention_flops(batch: int, seq_len: int, heads: int, head_dim: int, backward: bool) -> float:
    """Causal attention FLOPs of one call as FlashAttention's benchmarks count them: the two
    matmuls (4 b h T^2 d, the per-token 4 T d above over b T tokens) halved by the causal mask;
    the backward pass is 2.5x the forward (five matmuls instead of two), so forward + backward is
    3.5x. Softmax and recomputation are not counted (the kernel benchmark's TFLOP/s)."""
    forward = 4 * batch * heads * seq_len * seq_len * head_dim / 2
    return forward * (3.5 if backward else 1.0)


def model_flops_per_token(model: ModelConfig, seq_len: int) -> int:
    """6N + 12 L d T (PaLM's model FLOPs per token, forward and backward)."""
    return 6 * model.n_params + 3 * attention_forward_flops_per_token(model, seq_len)


def peak_tflops(device_kind: str) -> float | None:
    """Datasheet bf16 peak for a ``jax.Device.device_kind`` such as ``'NVIDIA H100 80GB HBM3'``;
    None when unknown (a CPU has no meaningful peak here)."""
    for name, peak in PEAK_BF16_TFLOPS.items():
        if name in device_kind.upper():
            return peak
    return None


def mfu(model: ModelConfig, seq_len: int, tokens_per_s: float, num_devices: int,
        peak_tflops_per_device: float | None) -> tuple[float, float | None]:
    """Returns (model TFLOP/s per device, MFU = that / peak, or None without a peak)."""
    achieved = model_flops_per_token(model, seq_len) * tokens_per_s / num_devices / 1e12
    return achieved, (achieved / peak_tflops_per_device if peak_tflops_per_device else None)
