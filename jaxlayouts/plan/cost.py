"""Analytic cost model of this project's training step (``train.py``): step time and memory per
device for a layout on given hardware. The reference study's trainer differs in a few terms and
is costed by ``plan/study.py``; a :class:`Workload` names its trainer, which supplies those terms.

Time per step = pipeline compute (bubble included) + exposed communication + gradient
accumulation + optimizer update:

* Compute per layer and micro-batch, for the busiest stage. Weight matmuls: 2 FLOPs per weight
  and token at ``matmul_efficiency * w / (w + matmul_half_width)`` of peak, ``w`` the per-device
  width of the weight (tensor parallelism makes matmuls narrower and slower). Attention
  (``flops.attention_forward_flops_per_token``): flash kernels at their efficiency on the causal
  FLOPs (half of them); unfused attention runs the full T x T matmuls plus ``*_score_passes`` HBM
  passes over the bf16 score matrix. Norms and other elementwise work are HBM passes over the
  activations (a fused RMSNorm makes 2 passes). Backward = 2x forward (flash attention: 2.5x);
  full recomputation adds a forward; this project's pipeline executor adds one more forward per
  stage. Each trainer adds a fixed time per layer and micro-batch (``Trainer.layer_fixed_s``):
  here HBM copies around the layer scan; remat thereby saves the stores of what it drops.
* Pipeline: (V M + P - 1) / V times of the slowest stage (``parallel.schedule.ideal_ticks``,
  Narayanan et al. 2021), the (P - 1) / V fill and drain scaled by ``bubble_factor``.
* Tensor-parallel collectives (Megatron, not overlapped): per layer the trainer's count of
  all-reduces of the b T d activation (SP: reduce-scatter + all-gather, same bytes); ring cost
  2 (t-1)/t V / W plus a latency floor (scaling book: all-reduce ~ 2V/W, all-gather ~ V/W).
* Data-parallel communication: the trainer's table of collectives (:data:`Collective`; this
  project's in :meth:`Trainer.data_collectives`), timed by ring formulas, ``dp_overlap`` of it
  hidden. The same table gives :func:`collective_bytes`. Pipeline point-to-point sends are
  counted in full. The link is NVLink when the group fits in a node, else InfiniBand through as
  many NICs as the group has GPUs per node (``Trainer.per_node``; ``Hardware.link_bandwidth``).
* Gradient accumulation: per micro-batch one read-modify-write of the accumulator in HBM.

Memory per device (the busiest stage): weights, gradients and AdamW state (this project: fp32
master + Adam, fp32 accumulator, bf16 compute copy, sharded by ZeRO stage); activations per layer
following Korthikanti et al. 2022 for a LLaMA layer (no dropout, SwiGLU): with TP the
tensor-parallel part is divided by t, with SP all of it; flash attention drops the T x T scores;
an unfused RMSNorm also keeps its float32 input; full recomputation keeps the layer input only.
Every stage is costed with its own parameters and in-flight micro-batches (1F1B: P - s on stage
s; GPipe: M), the last with the LM head's logits, and the largest total counts; activations are
scaled by ``activation_factor`` for fragmentation, and ``overhead_gib`` covers the runtime. A
layout fits when that is at most what the allocator may use (``Hardware.memory_fraction`` of HBM).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

from jaxlayouts import flops
from jaxlayouts.distributed import split_over_nodes
from jaxlayouts.layout import ModelConfig, RunConfig
from jaxlayouts.parallel.schedule import ideal_ticks
from jaxlayouts.plan.hardware import Calibration, Hardware

GIB = 2 ** 30
ATTENTION_CLASS = {"xla": "unfused", "cudnn": "flash2", "pallas": "flash2", "pallas_jax": "flash2"}
"""This project's attention kernels by cost class; each flash kernel has its own efficiency
(``Calibration.cudnn_efficiency`` ...; unset: ``flash2_efficiency``)."""


class Collective(NamedTuple):
    """One data-parallel collective of a step: its kind, its buffer in bytes per device (all-reduce
    and all-gather results, reduce-scatter inputs, as ``analysis/hlo.py`` counts them) and how
    many times a step runs it."""

    kind: str        # all-reduce | reduce-scatter | all-gather
    bytes: float
    times: int


@dataclasses.dataclass(frozen=True)
class Stage:
    """What one pipeline stage holds and runs (one stage at pp=1)."""

    layers: float        # transformer layers
    embedding: bool      # the input embedding
    head: bool           # final norm, LM head and loss: the logits are computed here
    in_flight: int       # micro-batches whose activations it keeps at its peak


def layer_matmul_params(m: ModelConfig) -> dict:
    """The weights of one layer's matmuls: fused q, k, v; the attention output; the SwiGLU MLP."""
    d, hd = m.d_model, m.head_dim
    return {"qkv": d * (m.num_heads + 2 * m.num_kv_heads) * hd, "out": m.num_heads * hd * d,
            "mlp": 3 * d * m.d_ff}


def outside_layers_params(m: ModelConfig) -> int:
    """Input embedding, LM head and final norm."""
    return 2 * m.vocab_size * m.d_model + m.d_model


def layer_params(m: ModelConfig) -> int:
    """All parameters of one transformer layer, from ``ModelConfig.n_params``."""
    return (m.n_params - outside_layers_params(m)) // m.num_layers


def in_flight(w: Workload) -> list[int]:
    """Micro-batches each stage keeps in flight: 1F1B P - s on stage s (Narayanan et al. 2021),
    GPipe and circular all M."""
    P, M = w.pp, w.microbatches
    return [1 if P == 1 else (min(P - s, M) if w.schedule == "1f1b" else M) for s in range(P)]


class Trainer:
    """This project's step (``train.py``, ``parallel/pipeline.py``). Each method is a term in
    which another trainer (``plan/study.py``) differs."""

    name = "jaxlayouts"
    fixed_term = "layer_copies"     # the name of layer_fixed_s in Prediction.time_s
    tp_collectives_per_layer = 7    # see collective_bytes
    pipeline_recompute = True       # the pipeline executor re-runs a chunk's forward in its backward tick
    sp_norm_outputs_whole = False   # under SP the norms' outputs stay sequence-sharded
    grad_bytes = 4                  # float32 gradient accumulator

    def stages(self, w: Workload) -> tuple[Stage, ...]:
        """The layers split evenly; embedding and head on every stage; the logits on the last."""
        P, L = w.pp, w.model.num_layers
        return tuple(Stage(L / P, True, s == P - 1, n) for s, n in enumerate(in_flight(w)))

    def stage_params(self, w: Workload, stage: Stage) -> float:
        """Parameters per device on a stage: its layers, embedding, head and final norm (split over tp)."""
        m = w.model
        return stage.layers * layer_params(m) / w.tp + _embedding_params(w)

    def state_bytes(self, w: Workload, params: float) -> tuple[float, float, float]:
        """Weights (bf16 compute copy + fp32 master), fp32 gradient accumulator, Adam moments."""
        shard = w.data_parallel
        weights = (w.dtype_bytes * params / (shard if w.zero >= 3 else 1)
                   + 4 * params / (shard if w.zero >= 1 else 1))
        grads = 4 * params / (shard if w.zero >= 2 else 1)
        optimizer = 8 * params / (shard if w.zero >= 1 else 1)
        return weights, grads, optimizer

    def logits_bytes_per_token(self, w: Workload) -> float:
        """Float32 logits, softmax and gradient, split over tp (vocab-parallel LM head)."""
        return 12 * w.model.vocab_size / w.tp

    def kept_score_bytes(self, w: Workload) -> float:
        """Bytes per score element unfused attention keeps: float32 scores, probabilities in the
        compute dtype (``model/attention.xla_attention``)."""
        return 4 + w.dtype_bytes

    def activation_surcharge(self, w: Workload) -> bool:
        """Whether ``tp_activation_factor`` applies (never here)."""
        return False

    def usable_bytes(self, hw: Hardware) -> float:
        """JAX's allocator limit: ``memory_fraction`` of HBM."""
        return hw.usable_bytes

    def layer_fixed_s(self, w: Workload, hw: Hardware) -> float:
        """Memory traffic per layer and micro-batch that the FLOP terms miss (the H200 profile of
        the step: 14% of device time in copies around the layer scan, 5% stacking residuals):
        ``layer_copy_passes`` over the layer's compute-dtype weights (weight and gradient slices)
        and ``activation_store_passes`` over what the layer keeps for its backward (stacked into
        the scan's residuals and read back; full remat keeps only the layer input)."""
        c, m = hw.calibration, w.model
        weights = w.dtype_bytes * layer_params(m) / w.tp
        kept = layer_activation_bytes(w, per_layer_input_only=w.remat in ("full", "offload"))
        return (c.layer_copy_passes * weights + c.activation_store_passes * kept) / hw.hbm_bandwidth

    def data_collectives(self, w: Workload, params: float) -> list[Collective]:
        """The data-parallel collectives of a step over ``params`` per device, by ZeRO stage.
        ZeRO-0: one float32 gradient all-reduce. ZeRO-1 (and 2 with pp > 1, whose executor
        accumulates per stage): a float32 gradient reduce-scatter and one all-gather of the weights
        in the compute dtype (the step casts each master shard before the gather:
        tests/test_plan.py pins it). ZeRO-2: the reduce-scatter per micro-batch, the all-gather
        once. ZeRO-3: per micro-batch the reduce-scatter and the forward and backward all-gathers
        of the compute-dtype weights."""
        mb, e = w.microbatches, w.dtype_bytes
        if w.zero == 0:
            return [Collective("all-reduce", 4 * params, 1)]
        if w.zero == 1 or (w.zero == 2 and w.pp > 1):
            return [Collective("reduce-scatter", 4 * params, 1), Collective("all-gather", e * params, 1)]
        if w.zero == 2:
            return [Collective("reduce-scatter", 4 * params, mb), Collective("all-gather", e * params, 1)]
        return [Collective("reduce-scatter", 4 * params, mb), Collective("all-gather", e * params, 2 * mb)]

    def per_node(self, w: Workload, gpus_per_node: int) -> dict:
        """How many GPUs of one tp, data or pp group share a node: node boundaries fall on dp,
        then pp, fsdp and tp (``distributed.split_over_nodes``)."""
        data = {"dp": w.data_parallel, "fsdp": 1} if w.zero == 0 else {"dp": 1, "fsdp": w.data_parallel}
        mesh = {**data, "cp": 1, "tp": w.tp, "pp": w.pp}
        try:
            inside, _ = split_over_nodes(mesh, max(1, w.devices // gpus_per_node))
        except ValueError:  # fewer GPUs than a node, or no even split: treat as one node
            inside = mesh
        return {"tp": inside["tp"], "data": inside["dp"] * inside["fsdp"], "pp": inside["pp"]}


JAXLAYOUTS = Trainer()


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the cost model needs of a run: shapes, degrees, kernel classes and the trainer."""

    model: ModelConfig
    seq_len: int
    global_batch: int
    data_parallel: int
    tp: int
    pp: int
    micro_batch: int
    sequence_parallel: bool = False
    remat: str = "none"                 # none | full | selective | dots | save_all_but_ffn | offload
    attention: str = "flash2"           # unfused | fused | flash1 | flash2, or a kernel of ATTENTION_CLASS
    fused_norm: bool = False
    norm: str = "xla"                   # this project's norm kernel: xla | pallas | triton
    zero: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    trainer: Trainer = JAXLAYOUTS       # or plan.study.STUDY: the reference study's trainer
    dtype_bytes: int = 2                # compute dtype: bf16 (float32 in CPU tests)

    @property
    def devices(self) -> int:
        return self.data_parallel * self.tp * self.pp

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.data_parallel * self.micro_batch)

    @classmethod
    def from_run(cls, run: RunConfig) -> Workload:
        lay = run.layout
        return cls(model=run.model, seq_len=run.seq_len, global_batch=run.global_batch,
                   data_parallel=lay.data_parallel, tp=lay.mesh["tp"], pp=lay.mesh["pp"],
                   micro_batch=lay.micro_batch, sequence_parallel=lay.sequence_parallel, remat=lay.remat,
                   attention=lay.attention, fused_norm=lay.norm != "xla", norm=lay.norm, zero=lay.zero,
                   schedule=lay.pipeline_schedule, virtual_stages=lay.virtual_stages,
                   dtype_bytes=4 if run.dtype == "float32" else 2)


@dataclasses.dataclass
class Prediction:
    step_time_s: float
    mfu: float
    memory_bytes: dict          # per device: weights, gradients, optimizer, activations, overhead, total
    time_s: dict                # seconds per step by term (see predict)
    fits: bool
    usable_bytes: float         # the memory the trainer's allocator may use

    @property
    def dominant(self) -> list[str]:
        return [k for k, _ in sorted(self.time_s.items(), key=lambda kv: -kv[1])[:3]]


# -- memory ------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def stages(w: Workload) -> tuple[Stage, ...]:
    """The pipeline stages as the workload's trainer cuts them."""
    return w.trainer.stages(w)


def layer_activation_bytes(w: Workload, per_layer_input_only: bool = False) -> float:
    """Bytes one layer keeps for the backward pass, per micro-batch on one device
    (Korthikanti et al. 2022, Sec. 4, for a bf16 LLaMA layer)."""
    m, t, e = w.model, w.tp, w.dtype_bytes
    s, b, h, f = w.seq_len, w.micro_batch, m.d_model, m.d_ff
    kv_share = m.num_kv_heads / m.num_heads
    if per_layer_input_only:
        return e * s * b * h / (t if w.sequence_parallel else 1)
    replicated = e * s * b * h * 4                  # the two norms' inputs and outputs
    if not w.fused_norm:                            # an unfused norm also keeps its float32 input
        replicated += 4 * s * b * h * 2
    whole = 0.0
    if w.sequence_parallel and w.trainer.sp_norm_outputs_whole:
        # the norms all-gather their outputs and the next linear keeps them whole
        replicated -= 2 * e * s * b * h
        whole = 2 * e * s * b * h
    parallel = e * s * b * h * (2 + 2 * kv_share)   # q, k, v, attention output
    parallel += e * s * b * f * 4                   # gate, up, silu(gate), their product
    scores = 0.0
    if attention_class(w) in ("unfused", "fused") and w.remat != "selective":  # selective recomputes them
        scores = w.trainer.kept_score_bytes(w) * b * m.num_heads * s * s    # scores and probabilities
    return replicated / (t if w.sequence_parallel else 1) + whole + (parallel + scores) / t


def memory(w: Workload, hw: Hardware) -> dict:
    """Bytes per device on the pipeline stage that needs the most."""
    return max((stage_memory(w, hw, stage) for stage in stages(w)), key=lambda m: m["total"])


def stage_memory(w: Workload, hw: Hardware, stage: Stage) -> dict:
    c = hw.calibration
    weights, grads, optimizer = w.trainer.state_bytes(w, stage_params(w, stage))
    activations = _stage_activation_bytes(w, stage) * c.activation_factor
    if tp_activation_surcharge(w):
        activations *= c.tp_activation_factor
    overhead = c.overhead_gib * GIB
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": activations,
            "overhead": overhead, "total": weights + grads + optimizer + activations + overhead}


def tp_activation_surcharge(w: Workload) -> bool:
    """Whether ``tp_activation_factor`` applies to the workload's activations."""
    return w.trainer.activation_surcharge(w)


def _stage_activation_bytes(w: Workload, stage: Stage) -> float:
    """Activations a stage keeps at its peak, logits included."""
    if w.remat == "full":
        kept = stage.layers * stage.in_flight * layer_activation_bytes(w, per_layer_input_only=True)
        if stage.layers:
            kept += layer_activation_bytes(dataclasses.replace(w, remat="none"))  # one layer recomputed
    else:
        kept = stage.layers * stage.in_flight * layer_activation_bytes(w)
    if stage.head:
        kept += w.trainer.logits_bytes_per_token(w) * w.micro_batch * w.seq_len
    return kept


def stage_params(w: Workload, stage: Stage | None = None) -> float:
    """Parameters per device on a stage (default: the stage with the most)."""
    if stage is None:
        return max(stage_params(w, s) for s in stages(w))
    return w.trainer.stage_params(w, stage)


def _embedding_params(w: Workload) -> float:
    """Embedding, LM head and final norm per device (split over tp)."""
    m = w.model
    return 2 * m.vocab_size * m.d_model / w.tp + m.d_model


# -- time --------------------------------------------------------------------------------------


def _ring(bytes_: float, group: int, bandwidth: float, latency: float) -> float:
    """One all-gather or reduce-scatter over ``group`` devices: (g-1)/g V / W + latency."""
    if group <= 1:
        return 0.0
    return (group - 1) / group * bytes_ / bandwidth + (group - 1) * latency


def _matmul_time(params: float, width: float, tokens: float, hw: Hardware) -> float:
    c = hw.calibration
    efficiency = c.matmul_efficiency * width / (width + c.matmul_half_width)
    return 2 * params * tokens / (hw.peak_tflops * 1e12 * efficiency)


class LayerTimes(NamedTuple):
    """One layer, one micro-batch, on one device (seconds)."""

    forward: float
    backward: float
    attention: float            # the forward attention alone (selective remat recomputes it)
    elementwise: float          # the forward norms and elementwise passes alone


def layer_times(w: Workload, hw: Hardware) -> LayerTimes:
    m, c, t = w.model, hw.calibration, w.tp
    tokens = w.micro_batch * w.seq_len
    weights = layer_matmul_params(m)
    matmul = (_matmul_time(weights["qkv"] / t, (m.num_heads + 2 * m.num_kv_heads) * m.head_dim / t, tokens, hw)
              + _matmul_time(weights["out"] / t, m.d_model, tokens, hw)
              + _matmul_time(weights["mlp"] / t, m.d_ff / t, tokens, hw))
    attention, attention_backward = _attention_times(w, hw)
    row_bytes = w.dtype_bytes * tokens * m.d_model
    norm_passes = _norm_passes(w, c)
    elementwise = (2 * norm_passes * row_bytes / (t if w.sequence_parallel else 1)
                   + c.elementwise_passes * row_bytes * (m.d_ff / m.d_model) / t) / hw.hbm_bandwidth
    return LayerTimes(forward=matmul + attention + elementwise,
                      backward=2 * (matmul + elementwise) + attention_backward,
                      attention=attention, elementwise=elementwise)


def attention_class(w: Workload) -> str:
    """unfused | fused | flash1 | flash2."""
    return ATTENTION_CLASS.get(w.attention, w.attention)


def _norm_passes(w: Workload, c: Calibration) -> float:
    """HBM passes of one RMSNorm: unfused ``norm_passes``; a fused kernel 2 unless calibrated."""
    if not w.fused_norm:
        return c.norm_passes
    passes = {"pallas": c.pallas_norm_passes, "triton": c.triton_norm_passes}.get(w.norm)
    return 2.0 if passes is None else passes


def _flash_efficiency(w: Workload, c: Calibration) -> float:
    """The kernel's efficiency times T / (T + ``flash_half_seq``): short sequences leave a flash
    kernel's tiles underused (cuDNN on an H200: 306 TFLOP/s at T 2048, 436 at 8192)."""
    if w.attention == "flash1":
        return c.flash1_efficiency
    kernel = {"cudnn": c.cudnn_efficiency, "pallas": c.pallas_efficiency,
              "pallas_jax": c.pallas_jax_efficiency}.get(w.attention)
    efficiency = c.flash2_efficiency if kernel is None else kernel
    return efficiency * w.seq_len / (w.seq_len + c.flash_half_seq) if c.flash_half_seq else efficiency


def _attention_times(w: Workload, hw: Hardware) -> tuple[float, float]:
    """Forward and backward attention of one layer and micro-batch on one device."""
    m, c, t = w.model, hw.calibration, w.tp
    peak = hw.peak_tflops * 1e12
    attention_flops = (flops.attention_forward_flops_per_token(m, w.seq_len) / m.num_layers
                       * w.micro_batch * w.seq_len / t)
    kind = attention_class(w)
    if kind in ("flash1", "flash2"):
        attention = attention_flops / 2 / (peak * _flash_efficiency(w, c))
        return attention, 2.5 * attention
    passes = c.unfused_score_passes if kind == "unfused" else c.fused_score_passes
    score_bytes = 2 * w.micro_batch * m.num_heads / t * w.seq_len ** 2
    attention = attention_flops / (peak * c.matmul_efficiency) + passes * score_bytes / hw.hbm_bandwidth
    return attention, 2 * attention


def recompute_time(w: Workload, layer: LayerTimes) -> float:
    """Forward work a layer repeats in its backward, per micro-batch, by remat policy."""
    recompute = {"full": layer.forward, "selective": layer.attention,
                 "dots": layer.attention + layer.elementwise, "save_all_but_ffn": 0.5 * layer.forward,
                 "offload": layer.forward}.get(w.remat, 0.0)
    if w.trainer.pipeline_recompute and w.pp > 1:
        recompute += layer.forward
    return recompute


def tensor_parallel_time(w: Workload, hw: Hardware, per_node: dict) -> float:
    """The tensor-parallel collectives of one layer and micro-batch: the trainer's count of
    all-reduces of the b T d activation, two more when full remat repeats the forward."""
    row_bytes = w.dtype_bytes * w.micro_batch * w.seq_len * w.model.d_model
    one = 2 * _ring(row_bytes, w.tp, hw.link_bandwidth(w.tp, per_node["tp"]), hw.collective_latency_s)
    return one * (w.trainer.tp_collectives_per_layer + (2 if w.remat in ("full", "offload") else 0))


def head_time(w: Workload, hw: Hardware) -> float:
    """LM head forward and backward plus three float32 passes over the logits (softmax, loss, gradient)."""
    m, t = w.model, w.tp
    tokens = w.micro_batch * w.seq_len
    head = 3 * _matmul_time(m.d_model * m.vocab_size / t, m.vocab_size / t, tokens, hw)
    return head + 3 * 3 * 4 * tokens * m.vocab_size / t / hw.hbm_bandwidth


def pipeline_ticks(w: Workload) -> float:
    """Stage-times one pass of the pipeline takes: (V M + P - 1) / V."""
    return ideal_ticks(w.schedule, w.pp, w.virtual_stages, w.microbatches) / w.virtual_stages


def pipeline_p2p_time(w: Workload, hw: Hardware, per_node: dict) -> float:
    """One activation sent forward and one gradient back per tick, each in full."""
    if w.pp == 1:
        return 0.0
    pp_bytes = w.dtype_bytes * w.micro_batch * w.seq_len * w.model.d_model / (w.tp if w.sequence_parallel else 1)
    link = hw.link_bandwidth(2, min(2, per_node["pp"]))
    return 2 * pipeline_ticks(w) * (pp_bytes / link + hw.collective_latency_s)


def data_parallel_time(w: Workload, hw: Hardware, per_node: dict) -> float:
    """The trainer's data-parallel collectives by ring formulas (all-reduce = reduce-scatter +
    all-gather), the ``dp_overlap`` share hidden behind the backward."""
    bandwidth = hw.link_bandwidth(w.data_parallel, per_node["data"])
    ring = lambda bytes_: _ring(bytes_, w.data_parallel, bandwidth, hw.collective_latency_s)
    total = sum(c.times * (2 if c.kind == "all-reduce" else 1) * ring(c.bytes)
                for c in w.trainer.data_collectives(w, stage_params(w)))
    return (1 - hw.calibration.dp_overlap) * total


def optimizer_time(w: Workload, hw: Hardware) -> float:
    """AdamW reads and writes 16 bytes of state per parameter three times over."""
    return 16 * 3 * stage_params(w) / (w.data_parallel if w.zero >= 1 else 1) / hw.hbm_bandwidth


def accumulation_time(w: Workload, hw: Hardware) -> float:
    """Each micro-batch adds its gradients into the accumulator: read and write it, read them."""
    accumulated = stage_params(w) / (w.data_parallel if w.zero >= 2 else 1)
    return w.microbatches * (2 * w.trainer.grad_bytes + w.dtype_bytes) * accumulated / hw.hbm_bandwidth


def predict(w: Workload, hw: Hardware) -> Prediction:
    """Step time by term (see the module docstring), MFU, memory and whether it fits."""
    layer = layer_times(w, hw)
    recompute = recompute_time(w, layer)
    per_node = w.trainer.per_node(w, hw.gpus_per_node)
    tp_layer = tensor_parallel_time(w, hw, per_node)
    layer_fixed = w.trainer.layer_fixed_s(w, hw)
    per_layer = layer.forward + layer.backward + recompute + tp_layer
    head = head_time(w, hw)
    # the slowest stage paces the pipeline
    stage, layers_per_stage = max((s.layers * (per_layer + layer_fixed) + s.head * head, s.layers) for s in stages(w))
    mb = w.microbatches
    totals = {name: layers_per_stage * term * mb
              for name, term in (("tensor_parallel", tp_layer), ("recompute", recompute), ("fixed", layer_fixed))}
    time_s = {"compute": stage * mb - totals["tensor_parallel"] - totals["recompute"] - totals["fixed"],
              "recompute": totals["recompute"], w.trainer.fixed_term: totals["fixed"],
              "tensor_parallel": totals["tensor_parallel"],
              "bubble": hw.calibration.bubble_factor * stage * (pipeline_ticks(w) - mb),
              "pipeline_p2p": pipeline_p2p_time(w, hw, per_node),
              "data_parallel": data_parallel_time(w, hw, per_node),
              "grad_accumulation": accumulation_time(w, hw), "optimizer": optimizer_time(w, hw)}
    step = sum(time_s.values())
    model_flops = flops.model_flops_per_token(w.model, w.seq_len) * w.global_batch * w.seq_len
    mem, usable = memory(w, hw), w.trainer.usable_bytes(hw)
    return Prediction(step_time_s=step, mfu=model_flops / (w.devices * (hw.peak_tflops * 1e12) * step),
                      memory_bytes=mem, time_s=time_s, fits=mem["total"] <= usable, usable_bytes=usable)


def collective_bytes(w: Workload) -> dict:
    """Bytes per device and step that collectives move, by the axes they run over (``tp``,
    ``data``, ``pp``), counted as ``analysis/hlo.py`` reads a compiled step: each collective at
    its full buffer size (all-reduce and all-gather results, reduce-scatter inputs). Counts follow
    this project's compiled steps: 7 tensor-parallel all-reduces per layer and micro-batch
    (2 forward; 5 backward, since the q, k, v, gate and up input gradients are separate
    collectives) plus one each for the embedding and the LM-head input; the data axis by
    :meth:`Trainer.data_collectives`; pipelines one activation each way per tick and the
    embedding/head gradients summed over ``pp``."""
    m, t, e = w.model, w.tp, w.dtype_bytes
    rows = w.micro_batch * w.seq_len * m.d_model * e
    layers = m.num_layers / w.pp
    per_micro = (7 * layers + 2) * rows if t > 1 else 0.0
    if t > 1 and w.sequence_parallel:  # reduce-scatters where all-reduces were, and all-gathers
        per_micro += (6 * layers + 2) * rows
    data_bytes = 0.0
    if w.data_parallel > 1:
        data_bytes = sum(c.bytes * c.times for c in w.trainer.data_collectives(w, stage_params(w)))
    pp_bytes = 0.0
    if w.pp > 1:
        ticks = 2 * ideal_ticks(w.schedule, w.pp, w.virtual_stages, w.microbatches)
        pp_bytes = 2 * ticks * rows / (t if w.sequence_parallel else 1) + 4 * _embedding_params(w)
    return {"tp": per_micro * w.microbatches, "data": data_bytes, "pp": pp_bytes}
