"""The reference study's trainer as the cost model sees it: the terms in which its authors'
Megatron-style eager PyTorch trainer (published as Aleph-Alpha/scaling) differs from this
project's step (``plan/cost.py``). ``plan/validate.py`` costs the study's measured runs with it.

* Pipeline stages: the list [embedding, layer 1..L, final norm, LM head] cut into P contiguous
  runs with the most parameters on any stage as small as it can be (its
  ``pipe_partition_balanced``, DeepSpeed's "parameters" method): with a large vocabulary the
  first and last stages get fewer layers.
* State: bf16 weights and bf16 gradients, 12 bytes of fp32 master weights and Adam moments per
  parameter, the latter sharded under ZeRO-1 (its 13B tp=1, pp=1 runs fit 80 GB only so).
* Data parallel: a float32 gradient all-reduce (``allreduce_tensor_in_float32``) before the
  ZeRO-1 step, then an all-gather of the bf16 weights.
* Tensor parallel: 4 activation all-reduces per layer (Megatron); under SP its norms all-gather
  their outputs and the next linear keeps them whole; the LM head gathers the whole
  vocabulary's logits on every tp rank before the loss (``parallel_output=False``): it behaves as
  if each GPU held 16 bytes per token and vocabulary entry (this fits its OOMs at 8k tokens).
* Host: ``layer_launch_s`` per layer and micro-batch (kernel launches, blocking collectives), a
  third more with full recomputation; this makes many thin micro-batches and high tp slow.
* Activations under tp > 1 take ``tp_activation_factor`` more. It is fitted on the trainer's
  out-of-memory pattern: with one factor, 13 of the 14 runs wrongly predicted not to fit have
  tp = 1 and all 4 wrongly predicted to fit have tp > 1. A likely cause: PyTorch's caching
  allocator holds tensors handed to collectives on another stream until the collective ends.
* Ranks ordered as Megatron does, tp, data, pp (pipeline outermost).
* No context parallelism: the study ran none, and a :class:`Workload` of this trainer with
  ``cp`` > 1 is refused, so every term here is costed at cp = 1.
"""

from __future__ import annotations

import dataclasses

from jaxlayouts.choices import REMAT
from jaxlayouts.plan.cost import Collective, Stage, StepModel, Workload, in_flight, layer_activation_bytes, layer_params
from jaxlayouts.plan.hardware import Hardware


class Study(StepModel):
    name = "study"
    fixed_term = "host_launch"
    tp_collectives_per_layer = 4
    pipeline_recompute = False
    sp_norm_outputs_whole = True
    grad_bytes = 2                  # bf16 gradients
    context_parallel = False        # the study's trainer has no cp axis

    def stages(self, w: Workload) -> tuple[Stage, ...]:
        m, L = w.model, w.model.num_layers
        items = [m.embedding_params] + [layer_params(m)] * L + [m.d_model, m.embedding_params]
        result, start = [], 0
        for size, flight in zip(balanced_partition(items, w.pp), in_flight(w)):
            end = start + size
            layers = len(range(max(start, 1), min(end, L + 1)))
            result.append(Stage(layers, start == 0, end == len(items), flight))
            start = end
        return tuple(result)

    def stage_params(self, w: Workload, stage: Stage) -> float:
        m = w.model
        layers = stage.layers * layer_params(m) / w.tp
        return layers + (stage.embedding + stage.head) * m.embedding_params / w.tp + stage.head * m.d_model

    def state_bytes(self, w: Workload, params: float) -> tuple[float, float, float]:
        return 2 * params, 2 * params, 12 * params / (w.data_parallel if w.zero_stage.shards_state else 1)

    def logits_bytes_per_token(self, w: Workload) -> float:
        return 16 * w.model.vocab_size

    def layer_kept_bytes(self, w: Workload, policy: str | None = None) -> float:
        """Korthikanti et al.'s count (``cost.layer_activation_bytes``): the study's trainer."""
        policy = policy or w.remat
        return layer_activation_bytes(dataclasses.replace(w, remat=policy))

    def activation_scale(self, w: Workload, c) -> float:
        """``activation_factor`` for PyTorch's caching allocator, times ``tp_activation_factor``
        under tp > 1 (fitted on the study's out-of-memory pattern, see the module docstring)."""
        return c.activation_factor * (c.tp_activation_factor if self.activation_surcharge(w) else 1.0)

    def step_buffers(self, w: Workload, stage) -> tuple[float, float]:
        """None beyond its bf16 weights and gradients (``state_bytes``)."""
        return 0.0, 0.0

    def kept_score_bytes(self, w: Workload) -> float:
        return 2 * w.dtype_bytes

    def activation_surcharge(self, w: Workload) -> bool:
        return w.tp > 1

    def usable_bytes(self, hw: Hardware) -> float:
        """PyTorch's caching allocator may take all of HBM."""
        return hw.hbm_bytes

    def layer_fixed_s(self, w: Workload, hw: Hardware) -> float:
        return hw.calibration.layer_launch_s * (4 / 3 if REMAT[w.remat].recomputes == "forward" else 1)

    def data_collectives(self, w: Workload, params: float) -> list[Collective]:
        gather = [Collective("all-gather", 2 * params, 1)] if w.zero_stage.shards_state else []
        return [Collective("all-reduce", 4 * params, 1), *gather]

    def per_node(self, w: Workload, gpus_per_node: int) -> dict:
        fill = lambda stride, size: min(size, max(1, gpus_per_node // stride))
        return {"tp": fill(1, w.tp), "data": fill(w.tp, w.data_parallel), "pp": fill(w.tp * w.data_parallel, w.pp)}


STUDY = Study()


def balanced_partition(weights: list[float], parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous, non-empty runs of ``weights`` whose largest sum is smallest
    (bisection on that sum, greedy packing)."""
    def pack(limit):
        sizes, total, count = [], 0.0, 0
        for i, weight in enumerate(weights):
            if count and (total + weight > limit or len(weights) - i <= parts - len(sizes) - 1):
                sizes.append(count)
                total, count = 0.0, 0
            total, count = total + weight, count + 1
        sizes.append(count)
        return sizes if len(sizes) == parts and total <= limit else None
    low, high = max(weights), sum(weights)
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if pack(middle) else (middle, high)
    return pack(high)
