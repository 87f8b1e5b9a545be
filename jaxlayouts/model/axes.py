"""Logical axis names of the activations the model lays out (see ``mesh.compute_rules``)."""

RESIDUAL = ("batch", "act_seq", "act_embed")
"""The residual stream between sublayers (sequence-sharded under sequence parallelism)."""
LAYER_INPUT = ("batch", "seq", "act_embed")
"""A sublayer's normalised input, gathered along the sequence before the projections."""
HEADS = ("batch", "seq", "act_heads", None)
"""Per-head activations ``[batch, seq, heads, head_dim]`` (heads on ``tp``)."""
