"""LLaMA (Touvron et al. 2023) in Flax, with a logical axis name on every tensor.

    tokens -> embedding -> L x [x + Attn(RMSNorm(x)); x + SwiGLU(RMSNorm(x))] -> RMSNorm -> LM head

The L blocks are one ``nn.scan`` over stacked weights (leading ``layers`` axis). Scanned, compile
time does not grow with depth; unrolled (``scan=False``, a GPU step without remat:
``Layout.scans_layers``), it does. Parameters are stored in float32 (the master copy) and cast to the
compute dtype where they are used; :func:`jaxlayouts.mesh.constrain` then lays each weight out for
compute, which under ZeRO-3 is the per-layer all-gather.

Sequence parallelism (Korthikanti et al. 2022) needs no code here: the residual stream is named
``act_seq`` and the layer inputs/outputs ``seq``, so when ``act_seq -> tp`` the compiler turns
the tensor-parallel all-reduces into all-gather (before the projections) and reduce-scatter (after).
Context parallelism needs little: with ``seq -> cp`` the sequence arrives in zigzag order, rotary
embeddings take their positions from that order, and attention runs as the ``context_parallel``
field says (``layout.ContextParallel``: ring attention, :mod:`jaxlayouts.model.ring_attention`,
or all-gather inside a pipeline).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlayouts.layout import ContextParallel, ModelConfig
from jaxlayouts.mesh import constrain
from jaxlayouts.model.attention import attention
from jaxlayouts.model.axes import HEADS, LAYER_INPUT, RESIDUAL
from jaxlayouts.model.matmul import einsum_f32
from jaxlayouts.model.norm import rms_norm
from jaxlayouts.remat import POLICIES as REMAT, WEIGHT_TAG



def for_compute(param, axes: tuple, dtype):
    """A float32 master parameter cast to ``dtype`` and laid out for compute (under ZeRO-3 the
    all-gather), tagged so that no remat policy keeps the gathered copy for the backward pass."""
    return checkpoint_name(constrain(param.astype(dtype), axes), WEIGHT_TAG)


def weight(module: nn.Module, name: str, shape: tuple, axes: tuple, dtype, scale: float = 0.02):
    """A float32 parameter with logical ``axes``, returned by :func:`for_compute`."""
    init = nn.with_logical_partitioning(nn.initializers.normal(scale), axes)
    return for_compute(module.param(name, init, shape, jnp.float32), axes, dtype)


def rotary(x, theta: float, positions):
    """Rotary position embedding (Su et al. 2021), rotating the two halves of each head, at the
    stored sequence's ``positions`` (under context parallelism in zigzag order)."""
    d = x.shape[-1]
    freqs = theta ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / d)
    positions = jnp.asarray(positions, jnp.float32)
    angles = positions[:, None] * freqs[None, :]
    cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019) of the residual stream with the ``--norm`` kernel."""

    eps: float
    norm: str = "xla"

    @nn.compact
    def __call__(self, x):
        init = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
        scale = checkpoint_name(constrain(self.param("scale", init, (x.shape[-1],), jnp.float32),
                                          ("embed",)), WEIGHT_TAG)
        return rms_norm(x, scale, self.eps, self.norm)


class Attention(nn.Module):
    cfg: ModelConfig
    dtype: jnp.dtype
    attention: str
    context_parallel: ContextParallel = ContextParallel()

    @nn.compact
    def __call__(self, x):
        c, dt = self.cfg, self.dtype
        d, h, kv, hd = c.d_model, c.num_heads, c.num_kv_heads, c.head_dim
        wq = weight(self, "wq", (d, h, hd), ("embed", "heads", "head_dim"), dt)
        wk = weight(self, "wk", (d, kv, hd), ("embed", "kv_heads", "head_dim"), dt)
        wv = weight(self, "wv", (d, kv, hd), ("embed", "kv_heads", "head_dim"), dt)
        wo = weight(self, "wo", (h, hd, d), ("heads", "head_dim", "embed"), dt)
        q = checkpoint_name(constrain(jnp.einsum("btd,dnh->btnh", x, wq), HEADS), "query_proj")
        k = checkpoint_name(constrain(jnp.einsum("btd,dnh->btnh", x, wk), HEADS), "key_proj")
        v = checkpoint_name(constrain(jnp.einsum("btd,dnh->btnh", x, wv), HEADS), "value_proj")
        positions = self.context_parallel.order(x.shape[1])
        q, k = rotary(q, c.rope_theta, positions), rotary(k, c.rope_theta, positions)
        out = checkpoint_name(constrain(attention(q, k, v, self.attention, self.context_parallel), HEADS),
                              "attention")
        return checkpoint_name(constrain(jnp.einsum("btnh,nhd->btd", out, wo), RESIDUAL), "out_proj")


class SwiGLU(nn.Module):
    """FFN(x) = W2 (silu(W1 x) * W3 x) (Shazeer 2020)."""

    cfg: ModelConfig
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        d, f, dt = self.cfg.d_model, self.cfg.d_ff, self.dtype
        w1 = weight(self, "w1", (d, f), ("embed", "mlp"), dt)
        w3 = weight(self, "w3", (d, f), ("embed", "mlp"), dt)
        w2 = weight(self, "w2", (f, d), ("mlp", "embed"), dt)
        hidden = ("batch", "seq", "act_mlp")
        gate = checkpoint_name(constrain(jnp.einsum("btd,df->btf", x, w1), hidden), "mlp_gate")
        up = checkpoint_name(constrain(jnp.einsum("btd,df->btf", x, w3), hidden), "mlp_up")
        out = jnp.einsum("btf,fd->btd", nn.silu(gate) * up, w2)
        return checkpoint_name(constrain(out, RESIDUAL), "mlp_out")


class Block(nn.Module):
    """One pre-norm decoder layer, in ``nn.scan``'s (carry, xs) -> (carry, ys) form."""

    cfg: ModelConfig
    dtype: jnp.dtype
    attention: str
    norm: str
    context_parallel: ContextParallel = ContextParallel()

    @nn.compact
    def __call__(self, x, _):
        eps = self.cfg.norm_eps
        h = constrain(checkpoint_name(RMSNorm(eps, self.norm, name="attn_norm")(x), "attention_norm"),
                      LAYER_INPUT)
        x = x + Attention(self.cfg, self.dtype, self.attention, self.context_parallel, name="attn")(h)
        h = constrain(checkpoint_name(RMSNorm(eps, self.norm, name="mlp_norm")(x), "mlp_norm"), LAYER_INPUT)
        x = x + SwiGLU(self.cfg, self.dtype, name="mlp")(h)
        return constrain(x, RESIDUAL), None


def scanned_blocks(remat: str, length: int, scan: bool = True):
    """``length`` decoder layers as one ``nn.scan`` over stacked weights (leading ``layers``
    axis), each layer under the ``remat`` policy. ``scan=False`` unrolls the loop (same
    parameters): no per-layer dynamic slices of weights and saved activations, and compile time
    that grows with depth."""
    block = nn.remat(Block, policy=REMAT[remat], prevent_cse=False)
    return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=length,
                   unroll=1 if scan else length, metadata_params={nn.PARTITION_NAME: "layers"})


class LayerStack(nn.Module):
    """A contiguous run of ``length`` layers with the parameter tree ``{"layers": ...}`` of
    :class:`Llama`: one pipeline stage's share."""

    cfg: ModelConfig
    dtype: jnp.dtype
    attention: str
    norm: str
    remat: str
    length: int
    scan_layers: bool = True
    context_parallel: ContextParallel = ContextParallel()

    @nn.compact
    def __call__(self, x):
        layers = scanned_blocks(self.remat, self.length, self.scan_layers)
        return layers(self.cfg, self.dtype, self.attention, self.norm, self.context_parallel,
                      name="layers")(x, None)[0]


def embed(params, tokens, dtype):
    """Token embeddings from ``params["embedding"]``: the model's input, a pipeline's first stage."""
    table = for_compute(params["embedding"], EMBEDDING_AXES, dtype)
    return constrain(jnp.take(table, tokens, axis=0), RESIDUAL)


def head(params, x, cfg: ModelConfig, dtype, norm: str):
    """Final RMSNorm and LM head: float32 logits (backward in ``dtype``); a pipeline's last stage."""
    scale = checkpoint_name(constrain(params["final_norm"], ("embed",)), WEIGHT_TAG)
    x = constrain(rms_norm(x, scale, cfg.norm_eps, norm), LAYER_INPUT)
    logits = einsum_f32("btd,dv->btv", x, for_compute(params["lm_head"], HEAD_AXES, dtype))
    return constrain(logits, ("batch", "seq", "act_vocab"))


EMBEDDING_AXES = ("vocab", "embed")
HEAD_AXES = ("embed", "vocab")


class Llama(nn.Module):
    """Decoder-only LLaMA returning float32 logits ``[batch, seq, vocab]``."""

    cfg: ModelConfig
    dtype: jnp.dtype = jnp.bfloat16
    attention: str = "xla"
    norm: str = "xla"
    remat: str = "none"
    scan_layers: bool = True
    context_parallel: ContextParallel = ContextParallel()   # the layout's (layout.ContextParallel)

    @nn.compact
    def __call__(self, tokens):
        c = self.cfg
        param = lambda name, init, shape, axes: self.param(
            name, nn.with_logical_partitioning(init, axes), shape, jnp.float32)
        normal = nn.initializers.normal
        params = {"embedding": param("embedding", normal(1.0), (c.vocab_size, c.d_model), EMBEDDING_AXES)}
        x = embed(params, tokens, self.dtype)
        x, _ = scanned_blocks(self.remat, c.num_layers, self.scan_layers)(
            c, self.dtype, self.attention, self.norm, self.context_parallel, name="layers")(x, None)
        params["final_norm"] = param("final_norm", nn.initializers.ones, (c.d_model,), ("embed",))
        params["lm_head"] = param("lm_head", normal(0.02), (c.d_model, c.vocab_size), HEAD_AXES)
        return head(params, x, c, self.dtype, self.norm)
