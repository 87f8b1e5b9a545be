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
  stage. Each trainer adds a fixed time per layer and micro-batch (``StepModel.layer_fixed_s``):
  here HBM copies around the layer scan; remat thereby saves the stores of what it drops.
* Pipeline: (V M + P - 1) / V times of the slowest stage (``parallel.schedule.ideal_ticks``,
  Narayanan et al. 2021), the (P - 1) / V fill and drain scaled by ``bubble_factor``.
* Tensor-parallel collectives (Megatron, not overlapped): per layer the trainer's count of
  all-reduces of the b T d activation (SP: reduce-scatter + all-gather, same bytes); ring cost
  2 (t-1)/t V / W plus a latency floor (scaling book: all-reduce ~ 2V/W, all-gather ~ V/W).
* Data-parallel communication: the trainer's table of collectives (:data:`Collective`; this
  project's in :meth:`StepModel.data_collectives`), timed by ring formulas, ``dp_overlap`` of it
  hidden. The same table gives :func:`collective_bytes`. Pipeline point-to-point sends are
  counted in full. The link is NVLink when the group fits in a node, else InfiniBand through as
  many NICs as the group has GPUs per node (``StepModel.per_node``; ``Hardware.link_bandwidth``).
* Gradient accumulation: per micro-batch one read-modify-write of the accumulator in HBM.
* Context parallelism (``cp``; ``model/ring_attention.py``): see "Context parallelism" below.

Memory per device (the busiest stage): weights, gradients and AdamW state (this project: fp32
master + Adam, fp32 accumulator, bf16 compute copy, sharded by ZeRO stage); activations per layer
following Korthikanti et al. 2022 for a LLaMA layer (no dropout, SwiGLU): with TP the
tensor-parallel part is divided by t, with SP all of it; flash attention drops the T x T scores;
an unfused RMSNorm also keeps its float32 input; full recomputation keeps the layer input only.
Every stage is costed with its own parameters and in-flight micro-batches (1F1B: P - s on stage
s; GPipe: M), the last with the LM head's logits, and the largest total counts; activations are
scaled by ``activation_factor`` for fragmentation, and ``overhead_gib`` covers the runtime. A
layout fits when that is at most what the allocator may use (``Hardware.memory_fraction`` of HBM).

Context parallelism (``cp`` > 1) splits every activation's sequence over ``cp`` devices and
replicates the parameters over them (ZeRO shards over ``fsdp`` only), so with ``s = T / cp``:

* Memory: activations, logits and kept scores are those of ``s`` tokens (divided by cp); weights,
  gradients and optimizer state are unchanged. Ring attention (``pp`` = 1) keeps no scores, even
  with ``--attention xla``: its ``custom_vjp`` saves q, k, v, o and the log-sum-exp and recomputes
  each block's scores in the backward (xla blocks hold one causal ``2c x 2c`` block's float32
  scores, their gradient and the probabilities at a time). Inside pipelines (``pp`` > 1, all-gather CP:
  ``model/attention.gathered_attention``) each layer keeps the ``s x T`` probabilities and the
  all-gathered K/V of the whole sequence, ``2 b (T - s) kv_heads head_dim`` more elements.
* Compute: every per-token term runs on ``b s`` tokens. The zigzag order (chunks ``i`` and
  ``2 cp - 1 - i`` on device ``i``) gives each device ``1 / cp`` of the causal attention FLOPs: a
  causal ``2c x 2c`` block and ``cp - 1`` unmasked ``c x 2c`` blocks, ``c = T / (2 cp)``. Unfused
  (xla) blocks compute their masked half too: ``(cp + 1) / (2 cp^2)`` of the full ``T x T``
  matmuls per device, and their backward recomputes the scores (2.5x the forward's matmuls).
* Ring communication per layer and micro-batch (Liu et al. 2023, "Ring Attention with Blockwise
  Transformers", Sec. 3; ``model/ring_attention.py``): the forward sends ``cp - 1`` K/V blocks
  of ``2 b s kv_heads/tp head_dim`` elements in the compute dtype; the backward ``cp - 1`` K/V blocks
  and ``cp`` float32 dK/dV blocks of the same shape (the last brings each accumulator home).
  Each step's send runs beside one ``c x 2c`` block of attention compute, so a step exposes only
  ``max(0, send time - block compute time)`` plus a latency; the last dK/dV send is exposed whole.
  A send goes to the ring's next device: NVLink when the whole ring is inside a node, else one
  NIC per GPU. Remat does not repeat the sends (the compiled step has as many collective-permutes
  with full remat as without). All-gather CP (pp > 1) all-gathers K/V per layer forward (again
  for each recomputed forward) and reduce-scatters dK/dV backward, not overlapped (ring formulas).
* Gradients: cp replicates the parameters, so their gradients are summed over cp. The compiled
  step does this per micro-batch, an all-reduce of every gradient in the compute dtype over
  ``cp``, apart from the step's data-parallel collectives over dp or fsdp
  (``StepModel.data_collectives`` lists both; ``tests/test_plan_context_parallel.py`` pins them to
  the compiled HLO).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

from jaxlayouts import flops
from jaxlayouts.choices import ATTENTION, NORM, REMAT, ZERO, Zero
from jaxlayouts.distributed import split_over_nodes
from jaxlayouts.layout import ContextParallel, ModelConfig, RunConfig, default_scans_layers
from jaxlayouts.parallel.schedule import ideal_ticks
from jaxlayouts.plan.hardware import Calibration, Hardware

GIB = 2 ** 30
ATTENTION_CLASS = {name: a.cost_class for name, a in ATTENTION.items()}
"""This project's attention kernels by cost class (``choices.ATTENTION``); each flash kernel has
its own efficiency, its record's calibration field (``Calibration.cudnn_efficiency`` ...; unset:
``flash2_efficiency``)."""
ATTENTION_CLASSES = ("unfused", "fused", "flash1", "flash2")
"""The cost classes this model knows."""


class Collective(NamedTuple):
    """One gradient or weight collective of a step: its kind, its buffer in bytes per device
    (all-reduce and all-gather results, reduce-scatter inputs, as ``analysis/hlo.py`` counts
    them), how many times a step runs it and the group it runs over: ``data`` (dp or fsdp) or
    ``cp`` (the context-parallel replicas of the parameters)."""

    kind: str        # all-reduce | reduce-scatter | all-gather
    bytes: float
    times: int
    over: str = "data"


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
    return 2 * m.embedding_params + m.d_model


def layer_params(m: ModelConfig) -> int:
    """All parameters of one transformer layer, from ``ModelConfig.n_params``."""
    return (m.n_params - outside_layers_params(m)) // m.num_layers


def in_flight(w: Workload) -> list[int]:
    """Micro-batches each stage keeps in flight: 1F1B P - s on stage s (Narayanan et al. 2021),
    GPipe and circular all M."""
    P, M = w.pp, w.microbatches
    return [1 if P == 1 else (min(P - s, M) if w.schedule == "1f1b" else M) for s in range(P)]


class StepModel:
    """The cost model of this project's step (``train.py``'s ``Trainer``, ``parallel/pipeline.py``).
    Each method is a term in which another trainer's step (``plan/study.py``) differs."""

    name = "jaxlayouts"
    fixed_term = "layer_copies"     # the name of layer_fixed_s in Prediction.time_s
    tp_collectives_per_layer = 7    # see collective_bytes
    pipeline_recompute = True       # the pipeline executor re-runs a chunk's forward in its backward tick
    sp_norm_outputs_whole = False   # under SP the norms' outputs stay sequence-sharded
    grad_bytes = 4                  # float32 gradient accumulator
    context_parallel = True         # has a cp axis (ring attention; all-gather CP in pipelines)

    def stages(self, w: Workload) -> tuple[Stage, ...]:
        """The layers split evenly; embedding and head on every stage; the logits on the last."""
        P, L = w.pp, w.model.num_layers
        return tuple(Stage(L / P, True, s == P - 1, n) for s, n in enumerate(in_flight(w)))

    def stage_params(self, w: Workload, stage: Stage) -> float:
        """Parameters per device on a stage: its layers, embedding, head and final norm (split over tp)."""
        m = w.model
        return stage.layers * layer_params(m) / w.tp + _embedding_params(w)

    def logits_bytes_per_token(self, w: Workload) -> float:
        """The LM head's logits in the compute dtype, their float32 log-softmax and the logits'
        gradient in the compute dtype, split over tp (vocab-parallel head): ``4 + 2 e`` bytes per
        token and vocabulary entry. XLA:GPU's buffer assignment holds about 8.9 (bf16: 8) at the
        head's backward (``../shared/measurements/deviceless-h200-2026-12-04.md``)."""
        return (4 + 2 * w.dtype_bytes) * w.model.vocab_size / w.tp

    def layer_kept_bytes(self, w: Workload, policy: str | None = None) -> float:
        """Bytes one layer keeps for its backward, per micro-batch on one device, under the remat
        ``policy`` (default the workload's): :func:`step_layer_kept_bytes`, what this project's
        compiled step saves."""
        return step_layer_kept_bytes(w, policy or w.remat)

    def activation_scale(self, w: Workload, c: Calibration) -> float:
        """Factor on the activations for allocator fragmentation: none here. XLA plans the step's
        buffers itself, and its compiled peak is what the device allocates (within 1% on 13 H200
        runs, ``targets.py``), so the tensors the program keeps are the whole of it."""
        return 1.0

    def step_buffers(self, w: Workload, stage: Stage) -> tuple[float, float]:
        """Weights and gradients the compiled step holds beyond :meth:`state_bytes`, on one device
        of ``stage`` (bytes). What they are, from XLA:GPU's buffer assignment of the step:

        * pp = 1: one micro-batch's gradient of the scanned layers in the compute dtype, beside the
          float32 accumulator. The backward ``lax.scan`` writes each layer's gradient into a
          stacked ``[layers, ...]`` output allocated whole for the backward (``train.py``). ZeRO-0/1
          (``_per_shard_accumulation``) hold it whole; ZeRO-2/3 constrain it to the sharded
          gradient layout, so each layer's gradient is reduce-scattered as it is written.
        * pp > 1 (``parallel/pipeline.py``): the float32 accumulator is carried through the tick's
          ``lax.switch``, whose output is a second copy of it: the stage's whole gradient under
          ZeRO-0/1, its fsdp shard under ZeRO-2/3, which reduce-scatter each backward tick's
          gradient. Under ZeRO-3 (``Pipeline._gather``) the backward tick re-runs one chunk
          (``L / (P V)`` layers) from its all-gathered weights, tp-sharded since the gathers run per
          tp tile (``Pipeline._per_tile``). The other terms are fitted on the grid's 101 compiled
          pipeline rows (``docs/results/h100-memory-grid.jsonl``, scanned layers), each one chunk
          in the compute dtype, tp-sharded, not read off the buffer assignment:

          - ZeRO-2/3: one chunk's gradient per tick (the backward scan's stacked output; ZeRO-0/1
            make the same gradient, but their rows match without it);
          - ZeRO-2/3 without remat: one more (for ZeRO-3, the forward scan's stacked copy of the
            gathered weights among its residuals; ZeRO-2 rows were 18% low without it);
          - circular schedules (``V`` > 1) under ZeRO-0/1/2: one more (2.4% median error on the
            27 circular rows with it, 7.5% without), presumably the chunk sliced out of the
            stage's weights.

          The embedding and head are gathered in other branches and are not live at that peak.
          Before the per-tile collectives and ZeRO-2's per-tick scatter, llama-65b fsdp=32,tp=2,pp=2
          (ZeRO-2, SP, full remat, mbs 4, scanned) compiled to 173.6 GiB, the same as ZeRO-1, and
          to 76.4 GiB after (ZeRO-3: 80.7 and 75.4 GiB)."""
        e, m = w.dtype_bytes, w.model
        layers = stage.layers * layer_params(m) / w.tp
        if w.pp == 1:
            return 0.0, e * layers / (w.data_parallel if w.zero_stage.shards_gradients else 1)
        accumulator_copy = 4 * self.stage_params(w, stage) / (w.data_parallel if w.zero_stage.shards_gradients else 1)
        chunk = e * layers / w.virtual_stages           # one chunk's weights in the compute dtype, tp-sharded
        sharded = w.zero_stage.shards_gradients
        tick_gradient = chunk if sharded and w.scan_layers else 0.0
        residual_copy = chunk if sharded and not REMAT[w.remat].checkpoints and w.scan_layers else 0.0
        gathered = chunk if w.zero_stage.shards_weights else 0.0
        sliced = chunk if not w.zero_stage.shards_weights and w.virtual_stages > 1 else 0.0
        return gathered + sliced + residual_copy, accumulator_copy + tick_gradient

    def state_bytes(self, w: Workload, params: float) -> tuple[float, float, float]:
        """Weights (bf16 compute copy + fp32 master), fp32 gradient accumulator, Adam moments,
        each sharded over the data axes as the ZeRO stage says (``train.py``; the pipeline executor
        keeps the same split)."""
        zero, shard = w.zero_stage, w.data_parallel
        weights = (w.dtype_bytes * params / (shard if zero.shards_weights else 1)
                   + 4 * params / (shard if zero.shards_state else 1))
        grads = 4 * params / (shard if zero.shards_gradients else 1)
        optimizer = 8 * params / (shard if zero.shards_state else 1)
        return weights, grads, optimizer

    def head_backward_buffers(self, w: Workload) -> float:
        """Bytes beside the logits at the LM head's backward, per device. ZeRO-3 without pp: the
        LM head's weight all-gathered over fsdp in the compute dtype and the embedding's dense
        gradient (the zeroed operand of the token lookup's transposed scatter-add, which XLA
        schedules there), ``e V d / t`` each. XLA:GPU's live ranges of llama-13b fsdp=64, ZeRO-3,
        full remat (``--scan_layers``): the peak (8.96 GiB) is in the head's backward with
        ``all-gather-start`` of ``bf16[5120,128000]`` (1.22 GiB), the scatter-add's
        ``bf16[128000,5120]`` (1.22 GiB), the two float32 logits-sized buffers and the scan's
        stacked layer inputs; this term had it 18% low. At tp = 8 (llama-65b) the rows stay
        25-34% low: part of the embedding gradient is whole over tp there, not modelled."""
        if not w.zero_stage.shards_weights or w.pp > 1:
            return 0.0
        return 2 * w.dtype_bytes * w.model.vocab_size * w.model.d_model / w.tp

    def kept_score_bytes(self, w: Workload) -> float:
        """Bytes per score element unfused attention keeps (``model/attention.xla_attention``):
        the masked float32 scores, their float32 softmax and the probabilities in the compute dtype.
        The H200 measured 9.2 bytes per element over cuDNN's run (llama-1b, ``configs/hardware/
        measured/``); this counted 6 before, which left that row 15% low."""
        return 8 + w.dtype_bytes

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
        kept = layer_activation_bytes(w)
        return (c.layer_copy_passes * weights + c.activation_store_passes * kept) / hw.hbm_bandwidth

    def data_collectives(self, w: Workload, params: float) -> list[Collective]:
        """The data-parallel collectives of a step over ``params`` per device, by ZeRO stage.
        ZeRO-0: one float32 gradient all-reduce. ZeRO-1: a float32 gradient reduce-scatter and one
        all-gather of the weights in the compute dtype (the step casts each master shard before the
        gather: tests/test_plan_cost.py pins it). ZeRO-2: the reduce-scatter per micro-batch (in the
        compute dtype under pp, ``Pipeline._onto_gradient_shard``), the all-gather once. ZeRO-3: per micro-batch the reduce-scatter and the forward and backward all-gathers
        of the compute-dtype weights. With cp > 1 the parameters are replicated over cp too: each
        micro-batch's gradients are all-reduced over cp in the compute dtype before they are
        accumulated, whatever the ZeRO stage (the compiled step's HLO shows it)."""
        mb, e, zero = w.microbatches, w.dtype_bytes, w.zero_stage
        if not zero.shards_state:
            table = [Collective("all-reduce", 4 * params, 1)]
        elif zero.scatters_at_step_end:
            table = [Collective("reduce-scatter", 4 * params, 1), Collective("all-gather", e * params, 1)]
        elif zero.scatters_each_gradient:
            table = [Collective("reduce-scatter", (e if w.pp > 1 else 4) * params, mb),
                     Collective("all-gather", e * params, 1)]
        else:
            table = [Collective("reduce-scatter", 4 * params, mb), Collective("all-gather", e * params, 2 * mb)]
        if w.cp > 1:
            table.append(Collective("all-reduce", e * params, mb, "cp"))
        return table

    def per_node(self, w: Workload, gpus_per_node: int) -> dict:
        """How many GPUs of one tp, data, cp or pp group share a node: node boundaries fall on dp,
        then pp, fsdp, cp and tp (``distributed.split_over_nodes``)."""
        data = {"dp": 1, "fsdp": w.data_parallel} if w.zero_stage.shards_state else {"dp": w.data_parallel, "fsdp": 1}
        mesh = {**data, "cp": w.cp, "tp": w.tp, "pp": w.pp}
        try:
            inside, _ = split_over_nodes(mesh, max(1, w.devices // gpus_per_node))
        except ValueError:  # fewer GPUs than a node, or no even split: treat as one node
            inside = mesh
        return {"tp": inside["tp"], "data": inside["dp"] * inside["fsdp"], "cp": inside["cp"], "pp": inside["pp"]}


JAXLAYOUTS = StepModel()


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
    cp: int = 1                         # context parallel: each sequence split over a ring of cp devices
    sequence_parallel: bool = False
    remat: str = "none"                 # none | full | selective | dots | save_all_but_ffn | offload
    attention: str = "flash2"           # unfused | fused | flash1 | flash2, or a kernel of ATTENTION_CLASS
    fused_norm: bool = False
    norm: str = "xla"                   # this project's norm kernel: xla | pallas | triton
    zero: int = 1
    schedule: str = "1f1b"
    virtual_stages: int = 1
    trainer: StepModel = JAXLAYOUTS       # or plan.study.STUDY: the reference study's trainer
    dtype_bytes: int = 2                # compute dtype: bf16 (float32 in CPU tests)
    scan_layers: bool | None = None     # layers as one lax.scan; unset: as a GPU step runs them by default

    def __post_init__(self):
        if self.scan_layers is None:
            object.__setattr__(self, "scan_layers", default_scans_layers("gpu", self.remat))
        if self.cp < 1 or self.seq_len % self.cp:
            raise ValueError(f"cp={self.cp} must be a positive divisor of seq_len={self.seq_len}")
        if self.cp > 1 and not self.trainer.context_parallel:
            raise ValueError(f"the {self.trainer.name} trainer has no context parallelism (cp={self.cp})")

    @property
    def devices(self) -> int:
        return self.data_parallel * self.cp * self.tp * self.pp

    @property
    def zero_stage(self) -> Zero:
        """The ZeRO stage's record: what it shards (``choices.ZERO``)."""
        return ZERO[self.zero]

    @property
    def local_seq(self) -> int:
        """Tokens of each sequence on one device: ``seq_len / cp``."""
        return self.seq_len // self.cp

    @property
    def ring(self) -> bool:
        """Whether attention is ring attention (``layout.ContextParallel``); inside pipelines cp
        all-gathers K/V instead (``model/attention.gathered_attention``)."""
        return ContextParallel.of(self.cp, self.pp).mode == "ring"

    @property
    def microbatches(self) -> int:
        return self.global_batch // (self.data_parallel * self.micro_batch)

    @classmethod
    def from_run(cls, run: RunConfig, platform: str = "gpu") -> Workload:
        """The run's workload; ``scan_layers`` as the run's layout resolves it on ``platform``
        (``Layout.scans_layers``: the step the bench runs on that platform by default)."""
        lay = run.layout
        return cls(model=run.model, seq_len=run.seq_len, global_batch=run.global_batch,
                   data_parallel=lay.data_parallel, tp=lay.mesh["tp"], pp=lay.mesh["pp"],
                   micro_batch=lay.micro_batch, cp=lay.mesh["cp"], sequence_parallel=lay.sequence_parallel,
                   remat=lay.remat, attention=lay.attention, fused_norm=NORM[lay.norm].fused, norm=lay.norm, zero=lay.zero,
                   schedule=lay.pipeline_schedule, virtual_stages=lay.virtual_stages,
                   dtype_bytes=4 if run.dtype == "float32" else 2, scan_layers=lay.scans_layers(platform))


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


def keeps_layer_input_only(policy: str) -> bool:
    """Whether remat ``policy`` keeps nothing of a layer on the device beyond its input: ``full``,
    and ``offload``, which moves what it saves to host memory (``remat.py``)."""
    return REMAT[policy].keeps_layer_input_only


def layer_activation_bytes(w: Workload) -> float:
    """Bytes one layer keeps for the backward pass, per micro-batch on one device
    (Korthikanti et al. 2022, Sec. 4, for a bf16 LLaMA layer), for the ``s = T / cp`` tokens of
    each sequence that the device holds, under the workload's remat policy."""
    m, t, e = w.model, w.tp, w.dtype_bytes
    s, b, h, f = w.local_seq, w.micro_batch, m.d_model, m.d_ff
    kv_share = m.num_kv_heads / m.num_heads
    if keeps_layer_input_only(w.remat):
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
    scores = gathered = 0.0
    korthikanti_selective = REMAT[w.remat].recomputes == "attention"  # recomputes the attention core
    if attention_class(w) in ("unfused", "fused") and not korthikanti_selective and not w.ring:
        # scores and probabilities of the device's s queries against all T keys (selective remat
        # recomputes them; ring attention keeps none)
        scores = w.trainer.kept_score_bytes(w) * b * m.num_heads * s * w.seq_len
    if w.cp > 1 and not w.ring and not korthikanti_selective:
        gathered = e * (w.seq_len - s) * b * h * 2 * kv_share  # the other devices' K/V, all-gathered
    return replicated / (t if w.sequence_parallel else 1) + whole + (parallel + scores + gathered) / t


def step_layer_kept_bytes(w: Workload, policy: str) -> float:
    """Bytes one layer of this project's step keeps for its backward, per micro-batch on one
    device, for the ``s = T / cp`` tokens the device holds, under remat ``policy``
    (``remat.py``). Counted in tensors of one layer's width, ``E = e s b d`` bytes (``e`` the
    compute dtype's bytes) and ``F = e s b d_ff``; ``kv`` = kv_heads / heads. What each policy
    saves, from the compiled step (XLA:GPU's buffer assignment; one knob changed at a time on
    llama-7b, ``docs/results/h100-memory-grid.jsonl``):

    * ``full``: the layer input (its ``E``, split over tp under SP).
    * ``selective`` (``save_only_these_names``: q, k, v, attention, out_proj): the input, q, k and
      v (``(1 + 2 kv) E / t``), the attention result (``E / t``) and the output projection
      (``E``, as the residual stream is laid out).
    * ``save_all_but_ffn``: selective plus the two norms' outputs (``2 E``) and, with unfused
      attention, the probabilities.
    * ``dots`` (matmul outputs without batch dimensions): the input, the output projection, q, k
      and v and one ``d_ff``-wide projection (``F / t``); XLA recomputes the other one with the
      SwiGLU product (a GPU compile keeps 8 ``E`` on llama-7b at tp = 1, 3 ``E`` at tp = 4).
    * ``none`` (everything saveable): the input and the residual after attention; per unfused
      RMSNorm its float32 input (``2 E`` in bf16), normalised and scaled outputs (``2 E``), a fused
      norm kernel only its output; q, k, v, rotated q and k (``(2 + 3 kv) E / t``) and the attention
      result; in the SwiGLU the gate, up, sigmoid(gate), silu(gate) and their product (``5 F / t``);
      with unfused attention the scores (``kept_score_bytes``).

    The residual-stream tensors are split over tp only under SP; there the norm outputs the
    next matmul all-gathers stay whole. This replaces Korthikanti et al.'s per-layer count
    (``layer_activation_bytes``, which the reference study's trainer keeps), which had this step's
    ``none`` 20-30% low and its ``selective`` equal to ``none``."""
    m, t, e = w.model, w.tp, w.dtype_bytes
    s, b = w.local_seq, w.micro_batch
    E, F = e * s * b * m.d_model, e * s * b * m.d_ff
    kv = m.num_kv_heads / m.num_heads
    rows = t if w.sequence_parallel else 1            # the residual stream's split
    whole = 1 if w.sequence_parallel else rows        # norm outputs the next matmul all-gathers
    if keeps_layer_input_only(policy):
        return E / rows
    qkv = (1 + 2 * kv) * E / t
    scores = 0.0
    remat = REMAT[policy]
    if attention_class(w) in ("unfused", "fused") and not w.ring and remat.keeps_scores:
        scores = w.trainer.kept_score_bytes(w) * b * m.num_heads * s * w.seq_len / t
    gathered = 0.0
    if w.cp > 1 and not w.ring and remat.keeps_gathered_kv:
        gathered = e * (w.seq_len - s) * b * m.d_model * 2 * kv / t  # the other devices' K/V, all-gathered
    if remat.keeps == "attention_projections":
        return E / rows + qkv + E / t + E / rows
    if remat.keeps == "attention_sublayer":
        return E / rows + qkv + E / t + E / rows + 2 * E / whole + scores + gathered
    if remat.keeps == "matmul_outputs":
        return E / rows + E / rows + qkv + F / t + gathered
    assert remat.keeps == "everything", remat
    norm = (2 * E * 4 / (2 * e) + E) / rows + E / whole if not w.fused_norm else E / whole
    return (2 * E / rows + 2 * norm + qkv + (1 + kv) * E / t + E / t + 5 * F / t + scores + gathered)


def memory(w: Workload, hw: Hardware) -> dict:
    """Bytes per device on the pipeline stage that needs the most."""
    return max((stage_memory(w, hw, stage) for stage in stages(w)), key=lambda m: m["total"])


def stage_memory(w: Workload, hw: Hardware, stage: Stage) -> dict:
    c = hw.calibration
    weights, grads, optimizer = w.trainer.state_bytes(w, stage_params(w, stage))
    more_weights, more_grads = w.trainer.step_buffers(w, stage)
    weights, grads = weights + more_weights, grads + more_grads
    activations = _stage_activation_bytes(w, stage) * w.trainer.activation_scale(w, c)
    overhead = c.overhead_gib * GIB
    return {"weights": weights, "gradients": grads, "optimizer": optimizer, "activations": activations,
            "overhead": overhead, "total": weights + grads + optimizer + activations + overhead}


def tp_activation_surcharge(w: Workload) -> bool:
    """Whether ``tp_activation_factor`` applies to the workload's activations."""
    return w.trainer.activation_surcharge(w)


def _stage_activation_bytes(w: Workload, stage: Stage) -> float:
    """Activations a stage keeps at its peak, logits included."""
    if w.pp > 1 and w.trainer.pipeline_recompute:
        # This project's executor stashes each in-flight micro-batch's stage input and re-runs the
        # chunk's forward under jax.vjp in its backward tick (parallel/pipeline.py): one chunk's
        # activations at a time, whatever the schedule and the number of micro-batches.
        m = w.model
        stash = stage.in_flight * w.dtype_bytes * w.micro_batch * w.local_seq * m.d_model / (
            w.tp if w.sequence_parallel else 1)
        kept = stash + stage.layers / w.virtual_stages * w.trainer.layer_kept_bytes(w)
    else:
        kept = stage.layers * stage.in_flight * w.trainer.layer_kept_bytes(w)
    recomputed = (w.trainer.layer_kept_bytes(w, "none")  # one layer, re-run whole from its input
                  if REMAT[w.remat].keeps_layer_input_only and stage.layers else 0.0)
    head = 0.0
    if stage.head:
        head = w.trainer.logits_bytes_per_token(w) * w.micro_batch * w.local_seq + w.trainer.head_backward_buffers(w)
    # pp = 1: full remat recomputes a layer in the layer scan's backward, after the head's
    # backward has freed the logits, so the two are not live together and the larger sets the
    # peak (32k-token and mbs=8 full-remat rows were 10-22% high with both); pipelines keep both
    kept += max(recomputed, head) if w.pp == 1 else recomputed + head
    if w.ring and stage.layers and attention_class(w) in ("unfused", "fused"):
        # ring attention keeps no scores, but its unfused backward holds one causal 2c x 2c block's
        # float32 scores and their gradient, and the probabilities in the compute dtype, at a time
        kept += (8 + w.dtype_bytes) * w.micro_batch * w.model.num_heads / w.tp * w.local_seq ** 2
    return kept


def stage_params(w: Workload, stage: Stage | None = None) -> float:
    """Parameters per device on a stage (default: the stage with the most)."""
    if stage is None:
        return max(stage_params(w, s) for s in stages(w))
    return w.trainer.stage_params(w, stage)


def _embedding_params(w: Workload) -> float:
    """Embedding, LM head and final norm per device (split over tp)."""
    m = w.model
    return 2 * m.embedding_params / w.tp + m.d_model


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
    tokens = w.micro_batch * w.local_seq
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
    record = NORM.get(w.norm)  # the study's fused norm (norm "xla", fused) is none of ours: 2 passes
    passes = getattr(c, record.calibration) if record and record.fused else None
    return 2.0 if passes is None else passes


def _flash_efficiency(w: Workload, c: Calibration) -> float:
    """The kernel's efficiency times T / (T + ``flash_half_seq``): short sequences leave a flash
    kernel's tiles underused (cuDNN on an H200: 306 TFLOP/s at T 2048, 436 at 8192)."""
    if w.attention == "flash1":
        return c.flash1_efficiency
    record = ATTENTION.get(w.attention)
    kernel = getattr(c, record.calibration) if record and record.cost_class in ("flash1", "flash2") else None
    efficiency = c.flash2_efficiency if kernel is None else kernel
    keys = w.local_seq  # under cp each ring step's kernel call sees T / cp keys
    return efficiency * keys / (keys + c.flash_half_seq) if c.flash_half_seq else efficiency


def _unfused_share(w: Workload) -> float:
    """The share of the whole T x T score matmuls one device computes with unfused attention:
    all of them at cp = 1; 1/cp with all-gather CP (its queries against every key); with ring
    attention a masked 2c x 2c block and cp - 1 blocks of c x 2c, ``c = T / (2 cp)``:
    (cp + 1) / (2 cp^2)."""
    if w.cp == 1:
        return 1.0
    return (w.cp + 1) / (2 * w.cp ** 2) if w.ring else 1 / w.cp


def _attention_times(w: Workload, hw: Hardware) -> tuple[float, float]:
    """Forward and backward attention of one layer and micro-batch on one device. Under cp the
    zigzag order balances the causal work: each device does 1/cp of it (flash kernels skip the
    masked half; unfused blocks compute it, see ``_unfused_share``)."""
    m, c, t = w.model, hw.calibration, w.tp
    peak = hw.peak_tflops * 1e12
    attention_flops = (flops.attention_forward_flops_per_token(m, w.seq_len) / m.num_layers
                       * w.micro_batch * w.seq_len / t)
    kind = attention_class(w)
    if kind in ("flash1", "flash2"):
        attention = attention_flops / w.cp / 2 / (peak * _flash_efficiency(w, c))
        return attention, 2.5 * attention
    passes = c.unfused_score_passes if kind == "unfused" else c.fused_score_passes
    share = _unfused_share(w)
    score_bytes = 2 * w.micro_batch * m.num_heads / t * w.seq_len ** 2 * share
    matmuls, scores = attention_flops * share / (peak * c.matmul_efficiency), passes * score_bytes / hw.hbm_bandwidth
    if w.ring:  # ring_attention.xla_block_backward recomputes the scores: five matmuls to the forward's two
        return matmuls + scores, 2.5 * matmuls + 2 * scores
    attention = matmuls + scores
    return attention, 2 * attention


def recomputed_time(recomputes: str, layer: LayerTimes) -> float:
    """Forward work a layer repeats per micro-batch when a remat policy recomputes
    ``recomputes`` (``choices.RECOMPUTES``)."""
    return {"nothing": 0.0, "half_forward": 0.5 * layer.forward, "attention": layer.attention,
            "attention_elementwise": layer.attention + layer.elementwise, "forward": layer.forward}[recomputes]


def recompute_time(w: Workload, layer: LayerTimes) -> float:
    """Forward work a layer repeats in its backward, per micro-batch, by remat policy."""
    recompute = recomputed_time(REMAT[w.remat].recomputes, layer)
    if w.trainer.pipeline_recompute and w.pp > 1:
        recompute += layer.forward
    return recompute


def tensor_parallel_time(w: Workload, hw: Hardware, per_node: dict) -> float:
    """The tensor-parallel collectives of one layer and micro-batch: the trainer's count of
    all-reduces of the b T d activation, two more when full remat repeats the forward."""
    row_bytes = w.dtype_bytes * w.micro_batch * w.local_seq * w.model.d_model
    one = 2 * _ring(row_bytes, w.tp, hw.link_bandwidth(w.tp, per_node["tp"]), hw.collective_latency_s)
    return one * (w.trainer.tp_collectives_per_layer + REMAT[w.remat].extra_tp_collectives)


def head_time(w: Workload, hw: Hardware) -> float:
    """LM head forward and backward plus three float32 passes over the logits (softmax, loss, gradient)."""
    m, t = w.model, w.tp
    tokens = w.micro_batch * w.local_seq
    head = 3 * _matmul_time(m.d_model * m.vocab_size / t, m.vocab_size / t, tokens, hw)
    return head + 3 * 3 * 4 * tokens * m.vocab_size / t / hw.hbm_bandwidth


def pipeline_ticks(w: Workload) -> float:
    """Stage-times one pass of the pipeline takes: (V M + P - 1) / V."""
    return ideal_ticks(w.schedule, w.pp, w.virtual_stages, w.microbatches) / w.virtual_stages


def pipeline_p2p_time(w: Workload, hw: Hardware, per_node: dict) -> float:
    """One activation sent forward and one gradient back per tick, each in full. Every tick waits
    for its slowest send: when the stages span nodes (fewer than pp on one node), one send per tick
    crosses a node boundary and runs at the inter-node link's speed."""
    if w.pp == 1:
        return 0.0
    pp_bytes = w.dtype_bytes * w.micro_batch * w.local_seq * w.model.d_model / (w.tp if w.sequence_parallel else 1)
    link = hw.link_bandwidth(2, 2 if per_node["pp"] >= w.pp else 1)
    return 2 * pipeline_ticks(w) * (pp_bytes / link + hw.collective_latency_s)


def data_parallel_time(w: Workload, hw: Hardware, per_node: dict) -> float:
    """The trainer's gradient and weight collectives, over the data axis and (cp > 1) over cp, by
    ring formulas (all-reduce = reduce-scatter + all-gather), the ``dp_overlap`` share hidden
    behind the backward."""
    group = {"data": w.data_parallel, "cp": w.cp}
    ring = lambda c: _ring(c.bytes, group[c.over], hw.link_bandwidth(group[c.over], per_node[c.over]),
                           hw.collective_latency_s)
    total = sum(c.times * (2 if c.kind == "all-reduce" else 1) * ring(c)
                for c in w.trainer.data_collectives(w, stage_params(w)))
    return (1 - hw.calibration.dp_overlap) * total


def kv_block_bytes(w: Workload, dtype_bytes: int | None = None) -> float:
    """One device's K and V of one micro-batch, ``2 b (T/cp) kv_heads/tp head_dim`` elements in
    the compute dtype (or ``dtype_bytes``): what one ring step sends."""
    m = w.model
    e = w.dtype_bytes if dtype_bytes is None else dtype_bytes
    return 2 * w.micro_batch * w.local_seq * m.num_kv_heads / w.tp * m.head_dim * e


class ContextTraffic(NamedTuple):
    """What cp moves per layer and micro-batch on one device."""

    kind: str           # ring (collective-permutes) | all-gather (K/V all-gathered, dK/dV reduce-scattered) | none
    sends: tuple        # (bytes, times) pairs: each transfer as analysis/hlo.py counts it
    bytes: float        # their total


def context_traffic(w: Workload) -> ContextTraffic:
    """Ring attention: ``cp - 1`` K/V sends forward, ``cp - 1`` K/V sends and ``cp`` float32
    dK/dV sends backward (``model/ring_attention._ring_backward``). All-gather CP (pp > 1): the
    whole sequence's K/V all-gathered per forward of the layer (``attention_forwards``) and its
    dK/dV reduce-scattered once."""
    if w.cp == 1:
        return ContextTraffic("none", (), 0.0)
    kv = kv_block_bytes(w)
    if w.ring:
        sends = ((kv, 2 * (w.cp - 1)), (kv_block_bytes(w, 4), w.cp))
    else:
        sends = ((w.cp * kv, attention_forwards(w)), (w.cp * kv, 1))
    return ContextTraffic("ring" if w.ring else "all-gather", sends, sum(b * n for b, n in sends))


def attention_forwards(w: Workload) -> int:
    """How often a layer's attention forward runs per micro-batch: once, once more when remat
    recomputes it, once more in the pipeline executor's backward tick."""
    recomputed = REMAT[w.remat].reruns_attention
    return 1 + recomputed + (w.trainer.pipeline_recompute and w.pp > 1)


def context_parallel_time(w: Workload, hw: Hardware, per_node: dict) -> float:
    """Exposed cp communication of one layer and micro-batch (0 at cp = 1).

    Ring attention (Liu et al. 2023, Sec. 3; ``model/ring_attention.py``): each of the forward's
    ``cp - 1`` steps sends one K/V block while the device computes one ``c x 2c`` block of
    attention, exposing ``max(0, send - block compute)`` plus a latency; each of the backward's
    ``cp - 1`` steps sends K/V and dK/dV beside one block's backward; the last dK/dV send has
    nothing left to hide behind. A device's attention is ``cp`` such blocks with a flash kernel
    (the causal first block counts as one), ``cp + 1`` unfused. The ring's slowest hop sets the
    pace: NVLink when the ring is inside a node, else one NIC per GPU.

    All-gather CP inside pipelines: its collectives by ring formulas, nothing hidden."""
    if w.cp == 1:
        return 0.0
    latency = hw.collective_latency_s
    if not w.ring:
        bandwidth = hw.link_bandwidth(w.cp, per_node["cp"])
        return sum(n * _ring(b, w.cp, bandwidth, latency) for b, n in context_traffic(w).sends)
    bandwidth = hw.link_bandwidth(2, 2 if per_node["cp"] >= w.cp else 1)
    forward, backward = _attention_times(w, hw)
    blocks = w.cp if attention_class(w) in ("flash1", "flash2") else w.cp + 1
    kv, dkv = kv_block_bytes(w), kv_block_bytes(w, 4)
    steps = w.cp - 1
    exposed = steps * (max(0.0, kv / bandwidth - forward / blocks) + latency)
    exposed += steps * (max(0.0, (kv + dkv) / bandwidth - backward / blocks) + 2 * latency)
    return exposed + dkv / bandwidth + latency


def optimizer_time(w: Workload, hw: Hardware) -> float:
    """AdamW reads and writes 16 bytes of state per parameter three times over."""
    return 16 * 3 * stage_params(w) / (w.data_parallel if w.zero_stage.shards_state else 1) / hw.hbm_bandwidth


def accumulation_time(w: Workload, hw: Hardware) -> float:
    """Each micro-batch adds its gradients into the accumulator: read and write it, read them."""
    accumulated = stage_params(w) / (w.data_parallel if w.zero_stage.shards_gradients else 1)
    return w.microbatches * (2 * w.trainer.grad_bytes + w.dtype_bytes) * accumulated / hw.hbm_bandwidth


def predict(w: Workload, hw: Hardware) -> Prediction:
    """Step time by term (see the module docstring), MFU, memory and whether it fits."""
    layer = layer_times(w, hw)
    recompute = recompute_time(w, layer)
    per_node = w.trainer.per_node(w, hw.gpus_per_node)
    tp_layer = tensor_parallel_time(w, hw, per_node)
    cp_layer = context_parallel_time(w, hw, per_node)
    layer_fixed = w.trainer.layer_fixed_s(w, hw)
    per_layer = layer.forward + layer.backward + recompute + tp_layer + cp_layer
    head = head_time(w, hw)
    # the slowest stage paces the pipeline
    stage, layers_per_stage = max((s.layers * (per_layer + layer_fixed) + s.head * head, s.layers) for s in stages(w))
    mb = w.microbatches
    totals = {name: layers_per_stage * term * mb
              for name, term in (("tensor_parallel", tp_layer), ("recompute", recompute), ("fixed", layer_fixed),
                                 ("context_parallel", cp_layer))}
    time_s = {"compute": stage * mb - totals["tensor_parallel"] - totals["recompute"] - totals["fixed"]
              - totals["context_parallel"],
              "recompute": totals["recompute"], w.trainer.fixed_term: totals["fixed"],
              "tensor_parallel": totals["tensor_parallel"],
              "bubble": hw.calibration.bubble_factor * stage * (pipeline_ticks(w) - mb),
              "pipeline_p2p": pipeline_p2p_time(w, hw, per_node),
              "data_parallel": data_parallel_time(w, hw, per_node),
              "grad_accumulation": accumulation_time(w, hw), "optimizer": optimizer_time(w, hw)}
    if w.cp > 1:  # the ring's exposed sends (all-gather CP's collectives inside pipelines)
        time_s["context_parallel"] = totals["context_parallel"]
    model_flops = flops.model_flops_per_token(w.model, w.seq_len) * w.global_batch * w.seq_len
    # No step beats the peak: compute takes at least the model's FLOPs at peak (MFU <= 1).
    time_s["compute"] += max(0.0, model_flops / (w.devices * hw.peak_tflops * 1e12) - sum(time_s.values()))
    step = sum(time_s.values())
    mem, usable = memory(w, hw), w.trainer.usable_bytes(hw)
    return Prediction(step_time_s=step, mfu=model_flops / (w.devices * (hw.peak_tflops * 1e12) * step),
                      memory_bytes=mem, time_s=time_s, fits=mem["total"] <= usable, usable_bytes=usable)


def collective_bytes(w: Workload) -> dict:
    """Bytes per device and step that collectives move, by the axes they run over (``tp``,
    ``data``, ``pp``, ``cp``), counted as ``analysis/hlo.py`` reads a compiled step: each collective at
    its full buffer size (all-reduce and all-gather results, reduce-scatter inputs). Counts follow
    this project's compiled steps: ``tp_collectives_per_layer`` (7) tensor-parallel all-reduces per layer and micro-batch
    (2 forward; 5 backward, since the q, k, v, gate and up input gradients are separate
    collectives) plus one each for the embedding and the LM-head input; the data axis by
    :meth:`StepModel.data_collectives`; pipelines one activation each way per tick and the
    embedding/head gradients summed over ``pp``; ``cp`` the gradients' all-reduce over cp (also
    from :meth:`StepModel.data_collectives`) and per layer and micro-batch :func:`context_traffic`."""
    m, t, e = w.model, w.tp, w.dtype_bytes
    rows = w.micro_batch * w.local_seq * m.d_model * e
    layers = m.num_layers / w.pp
    per_micro = (w.trainer.tp_collectives_per_layer * layers + 2) * rows if t > 1 else 0.0
    if t > 1 and w.sequence_parallel:  # reduce-scatters where all-reduces were, and all-gathers
        per_micro += (6 * layers + 2) * rows
    table = w.trainer.data_collectives(w, stage_params(w))
    data_bytes = cp_bytes = 0.0
    if w.data_parallel > 1:
        data_bytes = sum(c.bytes * c.times for c in table if c.over == "data")
    if w.cp > 1:
        cp_bytes = (sum(c.bytes * c.times for c in table if c.over == "cp")
                    + layers * w.microbatches * context_traffic(w).bytes)
    pp_bytes = 0.0
    if w.pp > 1:
        ticks = 2 * ideal_ticks(w.schedule, w.pp, w.virtual_stages, w.microbatches)
        pp_bytes = 2 * ticks * rows / (t if w.sequence_parallel else 1) + 4 * _embedding_params(w)
    return {"tp": per_micro * w.microbatches, "data": data_bytes, "pp": pp_bytes, "cp": cp_bytes}


def context_parallel_text(w: Workload, p: Prediction) -> str | None:
    """One paragraph on what cp does in ``w`` and costs in its prediction ``p`` (None at cp = 1)."""
    if w.cp == 1:
        return None
    size = lambda b: f"{b / 2**30:.4g} GiB" if b >= 2**30 else f"{b / 2**20:.4g} MiB"
    traffic, kv = context_traffic(w), kv_block_bytes(w)
    gradients = sum(c.bytes * c.times for c in w.trainer.data_collectives(w, stage_params(w)) if c.over == "cp")
    split = (f"cp={w.cp}: each sequence split over {w.cp} devices ({w.local_seq} tokens each, in zigzag "
             f"order); parameters replicated over cp, their gradients all-reduced over cp every micro-batch "
             f"({size(gradients)} per step, in data_parallel). ")
    if traffic.kind == "ring":
        sends = (f"Ring attention (Liu et al. 2023): per layer and micro-batch {w.cp - 1} K/V send(s) of {size(kv)} "
                 f"forward, {w.cp - 1} K/V and {w.cp} float32 dK/dV sends of {size(kv_block_bytes(w, 4))} backward "
                 f"({size(traffic.bytes)} in all), each beside one block of attention")
    else:
        sends = (f"Inside the pipeline K/V are all-gathered over cp, {attention_forwards(w)} time(s) per layer and "
                 f"micro-batch (each forward of it), and dK/dV reduce-scattered: {size(traffic.bytes)} per layer "
                 "and micro-batch, not overlapped")
    return split + sends + f"; exposed: {p.time_s['context_parallel']:.4g} s per step (context_parallel)."
