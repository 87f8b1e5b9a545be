"""Activation-checkpointing (remat) policies, applied per transformer layer by ``--remat``.

* ``none``: keep every activation the backward pass needs (no recomputation of compute).
* ``full``: keep only each layer's input and recompute the layer in the backward pass (the
  reference study's ``every_layer`` checkpointing).
* ``dots``: keep the outputs of matmuls without batch dimensions (the projections and FFN
  matmuls); recompute norms, activations and the attention core.
* ``save_attention_proj``: keep only the attention projections (q, k, v, output) and the
  attention result; recompute the softmax core's internals, the norms and the whole FFN.
  (Saving "everything but the FFN" cannot be said with names alone: the FFN's unnamed
  intermediates would still be kept, and a nested checkpoint does not help under an outer
  save-everything policy; measured, it saved nothing.)

Every policy keeps tensors in their *stored* layout, never a resharded copy: outputs of sharding
constraints (and weights, tag ``weight``) are recomputed from their saved input. So under ZeRO-3
the backward pass all-gathers each layer's weights again instead of keeping all layers gathered,
which is what makes ZeRO-3/FSDP save memory (Zhao et al. 2023), and under sequence parallelism it
saves the sequence-sharded layer input and all-gathers it again (Korthikanti et al. 2022, Sec. 4.2.2).
"""

from __future__ import annotations

import jax

WEIGHT_TAG = "weight"


def _stored_layout_only(policy):
    """Wrap a ``jax.checkpoint`` policy so that resharded copies are never saved."""
    def keep(prim, *avals, **params):
        if prim.name == "sharding_constraint":
            return False
        if prim.name == "name" and params.get("name") == WEIGHT_TAG:
            return False
        return policy(prim, *avals, **params)
    return keep


POLICIES = {
    "none": _stored_layout_only(jax.checkpoint_policies.everything_saveable),
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": _stored_layout_only(jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
    "save_attention_proj": jax.checkpoint_policies.save_only_these_names(
        "query_proj", "key_proj", "value_proj", "attention", "out_proj"),
}
