"""Activation-checkpointing (remat) policies, applied per transformer layer by ``--remat``.

* ``none``: keep every activation the backward pass needs (no recomputation of compute).
* ``full``: keep only each layer's input and recompute the layer in the backward pass (the
  reference study's ``every_layer`` checkpointing).
* ``dots``: keep the outputs of matmuls without batch dimensions (the projections and FFN
  matmuls); recompute norms, activations and the attention core.
* ``selective``: keep only the attention projections (q, k, v, output) and the attention
  result; recompute the attention core's internals, the norms and the whole FFN (the attention
  core is what Megatron's selective recomputation recomputes, Korthikanti et al. 2022).
* ``save_all_but_ffn``: keep every named tensor of the attention sublayer (its normalised input,
  q/k/v, the softmax probabilities of ``--attention xla``, the attention result, the output
  projection) and the FFN's normalised input; recompute the whole FFN. (Said by names because
  a "save everything except the FFN names" policy still keeps the unnamed matmul outputs the
  names are attached to, and a nested checkpoint around the FFN inherits the outer policy.)
* ``offload``: keep nothing on the device; copy the attention projections, the attention result
  and the FFN's two input projections to pinned host memory and bring them back for the backward
  pass (GPU only).

Every policy keeps tensors in their *stored* layout, never a resharded copy: outputs of sharding
constraints (and weights, tag ``weight``) are recomputed from their saved input. So under ZeRO-3
the backward pass all-gathers each layer's weights again instead of keeping all layers gathered,
which is what makes ZeRO-3/FSDP save memory (Zhao et al. 2023), and under sequence parallelism it
saves the sequence-sharded layer input and all-gathers it again (Korthikanti et al. 2022, Sec. 4.2.2).
"""

from __future__ import annotations

import jax

WEIGHT_TAG = "weight"
ATTENTION_NAMES = ("query_proj", "key_proj", "value_proj", "attention", "out_proj")
ATTENTION_SUBLAYER_NAMES = ("attention_norm", *ATTENTION_NAMES, "attention_probs", "mlp_norm")
"""``checkpoint_name`` tags the model puts on each layer's tensors."""


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
    "selective": jax.checkpoint_policies.save_only_these_names(*ATTENTION_NAMES),
    "dots": _stored_layout_only(jax.checkpoint_policies.dots_with_no_batch_dims_saveable),
    "save_all_but_ffn": jax.checkpoint_policies.save_only_these_names(*ATTENTION_SUBLAYER_NAMES),
    "offload": jax.checkpoint_policies.save_and_offload_only_these_names(
        names_which_can_be_saved=[], names_which_can_be_offloaded=[*ATTENTION_NAMES, "mlp_gate", "mlp_up"],
        offload_src="device", offload_dst="pinned_host"),
}
