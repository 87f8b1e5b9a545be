"""Analytic cost model: step time and memory per device for a layout on given hardware.

Time per step = pipeline compute (bubble included) + exposed communication + gradient
accumulation + optimizer update:

* Compute per layer and micro-batch, for the busiest stage. Weight matmuls: 2 FLOPs per weight
  and token at ``matmul_efficiency * w / (w + matmul_half_width)`` of peak, ``w`` the per-device
  width of the weight (tensor parallelism makes matmuls narrower and slower). Attention: flash
  kernels at their efficiency on the causal FLOPs (4 b T^2 d / 2); unfused attention runs the
  full T x T matmuls plus ``*_score_passes`` HBM passes over the bf16 score matrix. Norms and
  other elementwise work are HBM passes over the activations (a fused RMSNorm makes 2 passes).
  Backward = 2x forward (flash attention: 2.5x); full recomputation adds a forward; this
  project's pipeline executor adds one more forward per stage (``framework="jaxlayouts"``).
  The study's eager trainer also pays ``layer_launch_s`` per layer and micro-batch (host
  launches, blocking collectives), which makes many thin micro-batches and high tp slow.
* Pipeline: (M + P - 1) / V times of the slowest stage for P > 1 (Narayanan et al. 2021), the
  (P - 1) / V fill and drain scaled by ``bubble_factor``. Stages follow ``stages``: the study's
  trainer balances embedding, layers and head by parameter count, so its stages differ.
* Tensor-parallel collectives (Megatron, not overlapped): per layer two all-reduces forward and
  two backward of the b T d activation (SP: reduce-scatter + all-gather, same bytes); ring cost
  2 (t-1)/t V / W plus a latency floor (scaling book: all-reduce ~ 2V/W, all-gather ~ V/W).
* Data-parallel communication (ring formulas): ZeRO-0 one gradient all-reduce per step; ZeRO-1
  one reduce-scatter of gradients and one all-gather of bf16 weights per step; ZeRO-2 a
  reduce-scatter per micro-batch; ZeRO-3 also two weight all-gathers per micro-batch (forward
  and backward). The study's trainer all-reduces float32 gradients before its ZeRO-1 step
  (Aleph-Alpha/scaling, ``allreduce_tensor_in_float32``). ``dp_overlap`` of it is hidden.
  Pipeline point-to-point sends are counted in full. The link is NVLink when the group fits in a
  node, else InfiniBand through as many NICs as the group has GPUs per node (``_per_node``
  places the ranks; ``Hardware.link_bandwidth``).
* Gradient accumulation: per micro-batch one read-modify-write of the accumulator in HBM.

Memory per device (the busiest stage): weights, gradients and AdamW state by ZeRO stage (the
study's trainer: bf16 weights + bf16 gradients + 12 bytes of fp32 master/Adam state per
parameter, the latter sharded under ZeRO-1; this project: fp32 master + Adam, fp32 accumulator,
bf16 compute copy); activations per layer following Korthikanti et al. 2022 for a LLaMA layer
(no dropout, SwiGLU): with TP the tensor-parallel part is divided by t, with SP all of it except,
in the study's trainer, the all-gathered norm outputs the next linears keep; flash attention
drops the T x T scores; an unfused RMSNorm also keeps its float32 input; full recomputation keeps
the layer input only.
Every stage is costed with its own parameters and in-flight micro-batches (1F1B: P - s on stage
s; GPipe: M), the last with the LM head's logits, and the largest total counts; activations are
scaled by ``activation_factor`` for fragmentation, and ``overhead_gib`` covers the runtime. In
the study's eager trainer activations under tp > 1 take ``tp_activation_factor`` more. It is
fitted on the trainer's out-of-memory pattern: with one factor, 13 of the 14 runs wrongly
predicted not to fit have tp = 1 and all 4 wrongly predicted to fit have tp > 1. A likely cause:
PyTorch's caching allocator holds tensors handed to collectives on another stream until the
collective ends.
"""

from __future__ import annotations

import dataclasses
import functools

from jaxlayouts import flops
from jaxlayouts.distributed import split_over_nodes
from jaxlayouts.layout import ModelConfig, RunConfig
from jaxlayouts.plan.hardware import Hardware

GIB = 2 ** 30
ATTENTION_CLASS = {"xla": "unfused", "cudnn": "flash2", "pallas": "flash2", "pallas_jax": "flash2"}
"""This project's attention implementations by cost class (no GPU measurement separates them yet)."""


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the cost model needs of a run: shapes, degrees and kernel classes."""

    model: ModelConfig
    seq_len: int
    global_batch: int
    data_parallel: int
    tp: int
    pp: int
    micro_batch: int
    sequence_parallel: bool = False
    remat: str = "none"                 # none | full | selective | dots | save_all_but_ffn | offload
    attention: str = "flash2"           # unfused | fused | flash1 | flash2
    fused_norm: bool = False
    zero: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    framework: str = "jaxlayouts"       # or "study": the reference study's Megatron-style trainer
    dtype_bytes: int = 2                # compute dtype: bf16 (float32 in CPU tests)

    @property
    def devices(self) -> int:
        return self.data_parallel * self.tp * self.pp

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.data_parallel * self.micro_batch)

    @classmethod
    def from_run(cls, run: RunConfig) -> "Workload":
        lay = run.layout
        return cls(model=run.model, seq_len=run.seq_len, global_batch=run.global_batch,
                   data_parallel=lay.data_parallel, tp=lay.mesh["tp"], pp=lay.mesh["pp"],
                   micro_batch=lay.micro_batch, sequence_parallel=lay.sequence_parallel, remat=lay.remat,
                   attention=ATTENTION_CLASS[lay.attention], fused_norm=lay.norm != "xla", zero=lay.zero,
                   schedule=lay.pipeline_schedule, virtual_stages=lay.virtual_stages,
                   dtype_bytes=4 if run.dtype == "float32" else 2)


@dataclasses.dataclass
class Prediction:
    step_time_s: float
    mfu: float
    memory_bytes: dict          # per device: weights, gradients, optimizer, activations, overhead, total
    time_s: dict                # seconds per step by term (see predict)
    fits: bool

    @property
    def dominant(self) -> list[str]:
        return [k for k, _ in sorted(self.time_s.items(), key=lambda kv: -kv[1])[:3]]


def _layer_params(m: ModelConfig) -> dict:
    d, hd = m.d_model, m.head_dim
    return {"qkv": d * (m.num_heads + 2 * m.num_kv_heads) * hd, "out": m.num_heads * hd * d,
            "mlp": 3 * d * m.d_ff}


def _ring(bytes_: float, group: int, bandwidth: float, latency: float) -> float:
    """One all-gather or reduce-scatter over ``group`` devices: (g-1)/g V / W + latency."""
    if group <= 1:
        return 0.0
    return (group - 1) / group * bytes_ / bandwidth + (group - 1) * latency


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
    if w.sequence_parallel and w.framework == "study":
        # its norms all-gather their outputs and the next linear keeps them whole
        replicated -= 2 * e * s * b * h
        whole = 2 * e * s * b * h
    parallel = e * s * b * h * (2 + 2 * kv_share)   # q, k, v, attention output
    parallel += e * s * b * f * 4                   # gate, up, silu(gate), their product
    scores = 0.0
    if w.attention in ("unfused", "fused") and w.remat != "selective":  # selective recomputes them
        scores = 2 * e * b * m.num_heads * s * s    # scores and probabilities
    return replicated / (t if w.sequence_parallel else 1) + whole + (parallel + scores) / t


@dataclasses.dataclass(frozen=True)
class Stage:
    """What one pipeline stage holds and runs (one stage at pp=1)."""

    layers: float        # transformer layers
    embedding: bool      # the input embedding
    head: bool           # final norm, LM head and loss: the logits are computed here
    in_flight: int       # micro-batches whose activations it keeps at its peak


@functools.lru_cache(maxsize=4096)
def stages(w: Workload) -> tuple[Stage, ...]:
    """The pipeline stages. The study's trainer (its authors' framework, published as
    Aleph-Alpha/scaling) cuts the list [embedding, layer 1..L, final norm, LM head] into P
    contiguous runs with the most parameters on any stage as small as it can be (its
    ``pipe_partition_balanced``, DeepSpeed's "parameters" method): with a large vocabulary the
    first and last stages get fewer layers. This project splits the layers evenly and replicates
    embedding and head on every stage; the logits live on the last. 1F1B keeps P - s micro-batches
    in flight on stage s (Narayanan et al. 2021); GPipe and circular keep all M."""
    P, L, M = w.pp, w.model.num_layers, w.microbatches
    in_flight = [1 if P == 1 else (min(P - s, M) if w.schedule == "1f1b" else M) for s in range(P)]
    if w.framework != "study":
        return tuple(Stage(L / P, True, s == P - 1, in_flight[s]) for s in range(P))
    m = w.model
    items = [m.vocab_size * m.d_model] + [sum(_layer_params(m).values())] * L + [m.d_model, m.vocab_size * m.d_model]
    result, start = [], 0
    for s, size in enumerate(_balanced_partition(items, P)):
        end = start + size
        layers = len(range(max(start, 1), min(end, L + 1)))
        result.append(Stage(layers, start == 0, end == len(items), in_flight[s]))
        start = end
    return tuple(result)


def _balanced_partition(weights: list[float], parts: int) -> list[int]:
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


def memory(w: Workload, hw: Hardware) -> dict:
    """Bytes per device on the pipeline stage that needs the most."""
    return max((stage_memory(w, hw, stage) for stage in stages(w)), key=lambda m: m["total"])


def stage_memory(w: Workload, hw: Hardware, stage: Stage) -> dict:
    c = hw.calibration
    params = _stage_params(w, stage)
    shard = w.data_parallel
    if w.framework == "study":  # bf16 gradients: the study's 13B tp=1,pp=1 runs fit 80 GB only so
        weights, grads = 2 * params, 2 * params
        optimizer = 12 * params / (shard if w.zero >= 1 else 1)
    else:
        weights = (w.dtype_bytes * params / (shard if w.zero >= 3 else 1)
                   + 4 * params / (shard if w.zero >= 1 else 1))
        grads = 4 * params / (shard if w.zero >= 2 else 1)
        optimizer = 8 * params / (shard if w.zero >= 1 else 1)
    activations = _stage_activation_bytes(w, stage) * c.activation_factor
    if tp_activation_surcharge(w):
        activations *= c.tp_activation_factor
    overhead = c.overhead_gib * GIB
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": activations,
            "overhead": overhead, "total": weights + grads + optimizer + activations + overhead}


def tp_activation_surcharge(w: Workload) -> bool:
    """Whether ``tp_activation_factor`` applies: tp > 1 in the study's eager trainer."""
    return w.tp > 1 and w.framework == "study"


def _stage_activation_bytes(w: Workload, stage: Stage) -> float:
    """Activations a stage keeps at its peak, logits included."""
    m = w.model
    if w.remat == "full":
        kept = stage.layers * stage.in_flight * layer_activation_bytes(w, per_layer_input_only=True)
        if stage.layers:
            kept += layer_activation_bytes(dataclasses.replace(w, remat="none"))  # one layer recomputed
    else:
        kept = stage.layers * stage.in_flight * layer_activation_bytes(w)
    if stage.head:
        # Here: float32 logits, softmax and gradient, split over tp (vocab-parallel LM head).
        # The study's trainer gathers the whole vocabulary's logits on every tp rank before the
        # loss (ColumnParallelLinear, parallel_output=False); it behaves as if each GPU held
        # 16 bytes per token and vocabulary entry (this fits its OOMs at 8k tokens).
        per_token = 16 * m.vocab_size if w.framework == "study" else 12 * m.vocab_size / w.tp
        kept += per_token * w.micro_batch * w.seq_len
    return kept


def _matmul_time(params: float, width: float, tokens: float, hw: Hardware) -> float:
    c = hw.calibration
    efficiency = c.matmul_efficiency * width / (width + c.matmul_half_width)
    return 2 * params * tokens / (hw.peak_tflops * 1e12 * efficiency)


def predict(w: Workload, hw: Hardware) -> Prediction:
    m, c, t = w.model, hw.calibration, w.tp
    peak = hw.peak_tflops * 1e12
    tokens = w.micro_batch * w.seq_len
    layers = _layer_params(m)
    h, hd = m.d_model, m.head_dim
    # -- one layer, one micro-batch, forward ------------------------------------------------
    matmul = (_matmul_time(layers["qkv"] / t, (m.num_heads + 2 * m.num_kv_heads) * hd / t, tokens, hw)
              + _matmul_time(layers["out"] / t, h, tokens, hw)
              + _matmul_time(layers["mlp"] / t, m.d_ff / t, tokens, hw))
    heads = m.num_heads / t
    attention_flops = 4 * w.micro_batch * heads * w.seq_len ** 2 * hd
    if w.attention in ("flash1", "flash2"):
        efficiency = c.flash2_efficiency if w.attention == "flash2" else c.flash1_efficiency
        attention = attention_flops / 2 / (peak * efficiency)
        attention_backward = 2.5 * attention
    else:
        passes = c.unfused_score_passes if w.attention == "unfused" else c.fused_score_passes
        score_bytes = 2 * w.micro_batch * heads * w.seq_len ** 2
        attention = attention_flops / (peak * c.matmul_efficiency) + passes * score_bytes / hw.hbm_bandwidth
        attention_backward = 2 * attention
    row_bytes = w.dtype_bytes * tokens * h
    norm_passes = 2.0 if w.fused_norm else c.norm_passes
    elementwise = (2 * norm_passes * row_bytes / (t if w.sequence_parallel else 1)
                   + c.elementwise_passes * row_bytes * (m.d_ff / h) / t) / hw.hbm_bandwidth
    forward = matmul + attention + elementwise
    backward = 2 * (matmul + elementwise) + attention_backward
    recompute = {"full": forward, "selective": attention, "dots": attention + elementwise,
                 "save_all_but_ffn": 0.5 * forward, "offload": forward}.get(w.remat, 0.0)
    if w.framework == "jaxlayouts" and w.pp > 1:
        recompute += forward  # the executor re-runs a chunk's forward in its backward tick
    # tensor-parallel collectives: 2 forward + 2 backward per layer (+ recompute), not overlapped
    per_node = _per_node(w, hw.gpus_per_node)
    tp_bandwidth = hw.link_bandwidth(t, per_node["tp"])
    tp_one = 2 * _ring(row_bytes, t, tp_bandwidth, hw.collective_latency_s)
    per_layer = 4 if w.framework == "study" else 7  # see collective_bytes
    tp_layer = tp_one * (per_layer + (2 if w.remat in ("full", "offload") else 0))
    # -- head (last stage) -----------------------------------------------------------------
    head = 3 * _matmul_time(h * m.vocab_size / t, m.vocab_size / t, tokens, hw)
    head += 3 * 3 * 4 * tokens * m.vocab_size / t / hw.hbm_bandwidth
    # -- per step: the slowest stage paces the pipeline ------------------------------------
    layer = forward + backward + recompute + tp_layer
    # a fixed cost per layer and micro-batch that no kernel hides: host launches and the
    # synchronisation of blocking collectives (eager trainer)
    layer_fixed = c.layer_launch_s * (4 / 3 if w.remat in ("full", "offload") else 1) if w.framework == "study" else 0.0
    stage, layers_per_stage = max((s.layers * (layer + layer_fixed) + s.head * head, s.layers) for s in stages(w))
    mb = w.microbatches
    ticks = mb + (w.pp - 1) / w.virtual_stages if w.pp > 1 else mb
    compute_total = stage * mb
    bubble = c.bubble_factor * stage * (ticks - mb)
    pp_bytes = row_bytes / (t if w.sequence_parallel else 1)
    pp_time = 2 * ticks * (pp_bytes / hw.link_bandwidth(2, min(2, per_node["pp"])) + hw.collective_latency_s) if w.pp > 1 else 0.0
    stage_params = _stage_params(w)
    dp_bw = hw.link_bandwidth(w.data_parallel, per_node["data"])
    grad_bytes = 2 if w.framework == "study" else 4
    ring = lambda bytes_: _ring(bytes_, w.data_parallel, dp_bw, hw.collective_latency_s)
    if w.framework == "study":  # float32 gradient all-reduce, then ZeRO-1's bf16 weight all-gather
        dp_time = 2 * ring(4 * stage_params) + (ring(2 * stage_params) if w.zero >= 1 else 0.0)
    elif w.zero == 0:
        dp_time = 2 * ring(grad_bytes * stage_params)                    # one all-reduce per step
    elif w.zero == 1 or (w.zero == 2 and w.pp > 1):
        dp_time = ring(grad_bytes * stage_params) + ring(2 * stage_params)  # RS grads + AG weights
    else:  # ZeRO-2/3: reduce-scatter every micro-batch; ZeRO-3 also gathers weights fwd and bwd
        dp_time = mb * ring(grad_bytes * stage_params) + ring(2 * stage_params)
        if w.zero == 3:
            dp_time += mb * 2 * ring(2 * stage_params)
    dp_exposed = (1 - c.dp_overlap) * dp_time
    optimizer = 16 * 3 * stage_params / (w.data_parallel if w.zero >= 1 else 1) / hw.hbm_bandwidth
    # each micro-batch adds its gradients into the accumulator: read and write it, read them
    accumulated = stage_params / (w.data_parallel if w.zero >= 2 else 1)
    accumulation = mb * (2 * grad_bytes + w.dtype_bytes) * accumulated / hw.hbm_bandwidth
    tp_total = layers_per_stage * tp_layer * mb
    recompute_total = layers_per_stage * recompute * mb
    launch_total = layers_per_stage * layer_fixed * mb
    time_s = {"compute": compute_total - tp_total - recompute_total - launch_total, "recompute": recompute_total,
              "host_launch": launch_total,
              "tensor_parallel": tp_total, "bubble": bubble, "pipeline_p2p": pp_time,
              "data_parallel": dp_exposed, "grad_accumulation": accumulation, "optimizer": optimizer}
    step = sum(time_s.values())
    model_flops = flops.model_flops_per_token(m, w.seq_len) * w.global_batch * w.seq_len
    mem = memory(w, hw)
    return Prediction(step_time_s=step, mfu=model_flops / (w.devices * peak * step), memory_bytes=mem,
                      time_s=time_s, fits=mem["total"] <= hw.hbm_bytes)


def collective_bytes(w: Workload) -> dict:
    """Bytes per device and step that collectives move, by the axes they run over (``tp``,
    ``data``, ``pp``), counted as ``analysis/hlo.py`` reads a compiled step: each collective at
    its full buffer size (all-reduce and all-gather results, reduce-scatter inputs). Counts follow
    this project's compiled steps (``framework="jaxlayouts"``): 7 tensor-parallel all-reduces per
    layer and micro-batch (2 forward; 5 backward, since the q, k, v, gate and up input gradients
    are separate collectives) plus one each for the embedding and the LM-head input; ZeRO-1 one
    gradient reduce-scatter and one fp32 master all-gather per step; ZeRO-2 the reduce-scatter per
    micro-batch; ZeRO-3 per micro-batch a reduce-scatter and the forward and backward weight
    all-gathers; pipelines one activation each way per tick and the embedding/head gradients
    summed over ``pp``."""
    m, t, data, e = w.model, w.tp, w.data_parallel, w.dtype_bytes
    rows = w.micro_batch * w.seq_len * m.d_model * e
    layers = m.num_layers / w.pp
    per_micro = (7 * layers + 2) * rows if t > 1 else 0.0
    if t > 1 and w.sequence_parallel:  # reduce-scatters where all-reduces were, and all-gathers
        per_micro += (6 * layers + 2) * rows
    params = _stage_params(w)
    grads = 4 * params
    if data == 1:
        data_bytes = 0.0
    elif w.zero == 0:
        data_bytes = grads
    elif w.zero == 1 or (w.zero == 2 and w.pp > 1):
        data_bytes = grads + 4 * params
    elif w.zero == 2:
        data_bytes = w.microbatches * grads + 4 * params
    else:
        data_bytes = w.microbatches * (grads + 2 * e * params)
    pp_bytes = 0.0
    if w.pp > 1:
        ticks = 2 * (w.virtual_stages * w.microbatches + w.pp - 1)
        pp_bytes = 2 * ticks * rows / (t if w.sequence_parallel else 1) + 4 * _embedding_params(w)
    return {"tp": per_micro * w.microbatches, "data": data_bytes, "pp": pp_bytes}


def _per_node(w: Workload, gpus_per_node: int) -> dict:
    """How many GPUs of one tp, data or pp group share a node. The study's trainer orders ranks
    as Megatron does, tp, data, pp (pipeline outermost); this project puts node boundaries on dp,
    then pp, fsdp and tp (``distributed.split_over_nodes``)."""
    if w.framework == "study":
        fill = lambda stride, size: min(size, max(1, gpus_per_node // stride))
        return {"tp": fill(1, w.tp), "data": fill(w.tp, w.data_parallel), "pp": fill(w.tp * w.data_parallel, w.pp)}
    data = {"dp": w.data_parallel, "fsdp": 1} if w.zero == 0 else {"dp": 1, "fsdp": w.data_parallel}
    mesh = {**data, "tp": w.tp, "pp": w.pp}
    try:
        inside, _ = split_over_nodes(mesh, max(1, w.devices // gpus_per_node))
    except ValueError:  # fewer GPUs than a node, or no even split: treat as one node
        inside = mesh
    return {"tp": inside["tp"], "data": inside["dp"] * inside["fsdp"], "pp": inside["pp"]}


def _embedding_params(w: Workload) -> float:
    """Embedding, LM head and final norm per device (split over tp)."""
    m = w.model
    return 2 * m.vocab_size * m.d_model / w.tp + m.d_model


def _stage_params(w: Workload, stage: Stage | None = None) -> float:
    """Parameters per device on a stage (default: the stage with the most)."""
    if stage is None:
        return max(_stage_params(w, s) for s in stages(w))
    m = w.model
    layers = stage.layers * (sum(_layer_params(m).values()) + 2 * m.d_model) / w.tp
    if w.framework != "study":
        return layers + _embedding_params(w)
    return layers + (stage.embedding + stage.head) * m.vocab_size * m.d_model / w.tp + stage.head * m.d_model
