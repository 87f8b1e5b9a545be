"""One record per value of the layout's kernel and memory choices: ``--attention``, ``--norm``,
``--remat`` and ``--zero``. A record says what the value needs (a GPU, libraries), which function
implements it, how the planner costs it (its cost class and calibration field), what it keeps and
recomputes, whether it composes with context and pipeline parallelism, and whether the planner
searches it (and why not). Validation (``layout.py``), the model (``model/attention.py``,
``model/norm.py``), the trainer, the planner (``plan/cost.py``, ``plan/search.py``,
``plan/validate.py``, ``plan/study.py``) and the kernel benchmark read these records; a new kernel
or policy is one record here plus its function. ``tests/test_choices.py`` checks that every
consumer covers every record. This module imports nothing of the package, and no JAX.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Attention:
    """One ``--attention`` implementation."""

    name: str
    function: str                 # its function in model/attention.py
    cost_class: str               # plan/cost.py: unfused | fused | flash1 | flash2
    calibration: str              # its field of plan.hardware.Calibration (a flash kernel's: its efficiency)
    per_shard: bool = True        # a kernel opaque to XLA's partitioner: runs on each device's shard
    gpu_only: str | None = None   # needs an NVIDIA GPU: the alternative the error names
    needs: tuple[str, ...] = ()   # Python packages beyond JAX
    ring: bool = False            # runs per ring step under cp > 1 (returns the log-sum-exp that merges
                                  # one key block's result with the others'): model/ring_attention.BLOCKS
    all_gather: bool = False      # runs under all-gather CP (cp > 1 inside a pipeline): masks by position
    pp: bool = True               # runs inside a pipeline's stages
    planner_searches: bool = True
    not_searched: str = ""        # why plan/search.py leaves it out
    benchmarked: bool = True      # in kernel_bench.py's default --attention list
    not_benchmarked: str = ""


@dataclasses.dataclass(frozen=True)
class Norm:
    """One ``--norm`` (RMSNorm) implementation."""

    name: str
    function: str                 # its function in model/norm.py
    fused: bool                   # one kernel: no float32 copy of its input kept (plan/cost.py fused_norm)
    calibration: str              # its field of plan.hardware.Calibration (HBM passes)
    per_shard: bool = True        # a kernel opaque to XLA's partitioner: runs on each device's shard
    gpu_only: str | None = None
    needs: tuple[str, ...] = ()   # Python packages beyond JAX (jax-triton, triton: kernels/triton_versions.py)
    planner_searches: bool = True
    not_searched: str = ""
    benchmarked: bool = True
    not_benchmarked: str = ""


KEEPS = ("everything", "attention_sublayer", "matmul_outputs", "attention_projections", "input")
"""What a remat policy keeps of a layer on the device, most first (``plan/cost.py``
``step_layer_kept_bytes`` has one answer for each; the planner searches policies in this order)."""

RECOMPUTES = ("nothing", "half_forward", "attention", "attention_elementwise", "forward")
"""What a remat policy recomputes in the backward pass (``plan/cost.py`` ``recompute_time``)."""


@dataclasses.dataclass(frozen=True)
class Remat:
    """One ``--remat`` policy (its JAX policy: ``remat.POLICIES[name]``)."""

    name: str
    keeps: str                    # one of KEEPS
    recomputes: str               # one of RECOMPUTES
    reruns_attention: bool        # the backward runs the attention forward again (a cp all-gather more)
    keeps_scores: bool            # with unfused attention, keeps the scores/probabilities (all-gather CP:
    keeps_gathered_kv: bool       # and the gathered K/V)
    gpu_only: str | None = None
    planner_searches: bool = True
    not_searched: str = ""

    @property
    def keeps_layer_input_only(self) -> bool:
        """Keeps nothing of a layer on the device beyond its input."""
        return self.keeps == "input"

    @property
    def extra_tp_collectives(self) -> int:
        """Tensor-parallel all-reduces per layer beyond the trainer's: the repeated forward's two."""
        return 2 if self.recomputes == "forward" else 0

    @property
    def checkpoints(self) -> bool:
        """Runs the layer under ``jax.checkpoint`` (recomputes something in the backward)."""
        return self.recomputes != "nothing"


@dataclasses.dataclass(frozen=True)
class Zero:
    """One ``--zero`` stage: what it shards over the data axis (fsdp); ``train.py``'s table."""

    stage: int
    shards_state: bool            # fp32 master weights and Adam moments
    shards_gradients: bool        # the fp32 gradient accumulator
    shards_weights: bool          # the compute-dtype weights during the forward and backward

    @property
    def scatters_each_gradient(self) -> bool:
        """Reduce-scatters each micro-batch's (each pipeline tick's) gradient itself: ZeRO-2.
        ZeRO-3's gathers do it as their transpose; ZeRO-0/1 reduce once per step."""
        return self.shards_gradients and not self.shards_weights

    @property
    def scatters_at_step_end(self) -> bool:
        """Reduce-scatters the step's whole gradient onto the optimizer's shard once: ZeRO-1."""
        return self.shards_state and not self.shards_gradients


def _by_name(*records):
    return {r.name: r for r in records}


ATTENTION = _by_name(
    Attention("xla", "xla_attention", "unfused", "unfused_score_passes", per_shard=False, ring=True,
              all_gather=True),
    Attention("cudnn", "cudnn_attention", "flash2", "cudnn_efficiency", gpu_only="use --attention pallas or xla",
              planner_searches=False,
              not_searched="GPU only: plan --verify compiles on XLA:CPU by default, where it cannot run; rank it "
                           "with --explain 'attn=cudnn ...' (its own constant, cudnn_efficiency)"),
    Attention("pallas", "flash_attention", "flash2", "pallas_efficiency", ring=True),
    Attention("pallas_jax", "pallas_jax_attention", "flash2", "pallas_jax_efficiency",
              planner_searches=False,
              not_searched="JAX's bundled Pallas op, kept to compare ours with (no GQA, no ring step); rank it "
                           "with --explain"),
)
"""``--attention`` choices, in the order the flag's help lists them."""

NORM = _by_name(
    Norm("xla", "rms_norm_reference", False, "norm_passes", per_shard=False),
    Norm("pallas", "rms_norm_pallas", True, "pallas_norm_passes"),
    Norm("triton", "_triton", True, "triton_norm_passes", gpu_only="use --norm pallas or xla",
         needs=("jax-triton", "triton"), planner_searches=False,
         not_searched="GPU only and needs jax-triton; a fused norm like pallas"),
)
"""``--norm`` choices, in the order the flag's help lists them."""

REMAT = _by_name(
    Remat("none", "everything", "nothing", False, keeps_scores=True, keeps_gathered_kv=True),
    Remat("full", "input", "forward", True, keeps_scores=False, keeps_gathered_kv=False),
    Remat("selective", "attention_projections", "attention", True, keeps_scores=False, keeps_gathered_kv=False),
    Remat("dots", "matmul_outputs", "attention_elementwise", True, keeps_scores=False, keeps_gathered_kv=True,
          planner_searches=False, not_searched="between none and selective in memory and recompute"),
    Remat("save_all_but_ffn", "attention_sublayer", "half_forward", False, keeps_scores=True,
          keeps_gathered_kv=True, planner_searches=False,
          not_searched="between none and selective in memory and recompute"),
    Remat("offload", "input", "forward", True, keeps_scores=False, keeps_gathered_kv=False,
          gpu_only="use --remat full or selective", planner_searches=False,
          not_searched="GPU only (pinned host memory); costed like full, whose device memory it keeps"),
)
"""``--remat`` choices, in the order the flag's help lists them."""

ZERO = {z.stage: z for z in (
    Zero(0, shards_state=False, shards_gradients=False, shards_weights=False),
    Zero(1, shards_state=True, shards_gradients=False, shards_weights=False),
    Zero(2, shards_state=True, shards_gradients=True, shards_weights=False),
    Zero(3, shards_state=True, shards_gradients=True, shards_weights=True),
)}
"""``--zero`` stages."""

GPU_ONLY = {(kind, r.name): r.gpu_only for kind, records in (("attention", ATTENTION), ("norm", NORM),
                                                              ("remat", REMAT))
            for r in records.values() if r.gpu_only}
"""Choices that need an NVIDIA GPU, with the alternative to name in the error."""
