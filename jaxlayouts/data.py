"""Synthetic token data with learnable structure, identical for every layout.

Each sequence is a walk through a fixed random successor table over the vocabulary: with
probability ``1 - noise`` the next token is ``successor[token]``, otherwise a uniform random token.
A model can learn the table, so the loss falls from ln(V) towards the walk's entropy
(about ``noise * ln(V)`` plus the binary entropy of the switch). Batches are generated on the host
from ``(seed, step)`` alone, so every layout and every process sees the same global batch; each
process materialises only the shards its devices hold.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

NOISE = 0.1


def global_batch_tokens(seed: int, step: int, global_batch: int, seq_len: int, vocab: int) -> np.ndarray:
    """Tokens ``[global_batch, seq_len + 1]`` (inputs and next-token targets) for one step."""
    successor = np.random.default_rng(seed).permutation(vocab)
    rng = np.random.default_rng((seed, step))
    tokens = np.empty((global_batch, seq_len + 1), dtype=np.int32)
    tokens[:, 0] = rng.integers(vocab, size=global_batch)
    jump = rng.random((global_batch, seq_len)) < NOISE
    random_tokens = rng.integers(vocab, size=(global_batch, seq_len))
    for t in range(seq_len):
        tokens[:, t + 1] = np.where(jump[:, t], random_tokens[:, t], successor[tokens[:, t]])
    return tokens


def device_batch(tokens: np.ndarray, accum_steps: int, mesh, spec: PartitionSpec) -> jax.Array:
    """Split a global batch into ``[accum_steps, global_batch / accum_steps, seq_len + 1]``
    micro-batches and place it with ``spec``, each process writing only its own shards."""
    b, t = tokens.shape
    per_step = tokens.reshape(accum_steps, b // accum_steps, t)
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(per_step.shape, sharding, lambda index: per_step[index])
