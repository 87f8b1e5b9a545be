"""The layout value and the run it belongs to: parsing, printing and validation.

A *layout* is how a training step is spread over devices: mesh degrees, micro-batch size, ZeRO
stage, sequence parallelism, remat policy, attention kernel. A *run* adds what is trained (model,
sequence length, global batch, dtype). Everything else (the mesh, PartitionSpecs, the compiled
step, a result row) is derived from these two values.

This module imports no JAX, so entry points can parse a mesh before JAX is imported (emulated CPU
devices must be requested through XLA_FLAGS before that).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import numpy as np

from jaxlayouts import choices
from jaxlayouts.kernels import triton_versions
from jaxlayouts.schema import (InvalidInput, check_instance, checked, from_mapping, knob, knobs, load_yaml,
                               refuse_special)

MESH_AXES = ("dp", "fsdp", "cp", "tp", "pp")
"""Mesh axes in mesh order: data replicas, ZeRO/FSDP shards, context parallel (the sequence split
over a ring), tensor parallel, pipeline stages. ``tp`` sits inside ``cp`` so that on a GPU
cluster it stays inside a node before the ring does."""

OPTIONAL_AXES = ("cp",)
"""Axes the text form writes only when their size is not 1, so that layouts written before the
axis existed keep their text (and their result keys)."""

DATA_AXES = ("dp", "fsdp")
"""The axes the batch is split over."""

PARAM_AXES = ("layers", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp")
ACTIVATION_AXES = ("batch", "act_seq", "seq", "act_embed", "act_heads", "act_mlp", "act_vocab")
"""Logical axis names of parameters and activations (``mesh.py`` maps them to mesh axes)."""

REMAT_CHOICES = tuple(choices.REMAT)
ATTENTION_CHOICES = tuple(choices.ATTENTION)
RING_ATTENTION = tuple(name for name, a in choices.ATTENTION.items() if a.ring)
"""Attention implementations that run per ring step under cp > 1: they return (or compute) the
log-sum-exp that merges one key block's result with the others'."""
NORM_CHOICES = tuple(choices.NORM)
DTYPE_CHOICES = ("bfloat16", "float32")
PIPELINE_SCHEDULES = ("gpipe", "circular", "1f1b")
ZERO_CHOICES = tuple(choices.ZERO)

REQUIRED = dataclasses.MISSING
CONFIG_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"
MAX_EMULATED_DEVICES = 8192
"""The most CPU devices one process emulates: XLA's CPU client builds every device up front, and
above this a mesh costs gigabytes before it is checked."""


# ---------------------------------------------------------------------------------------------
# Model configuration


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """LLaMA shapes (Touvron et al. 2023): pre-norm RMSNorm, SwiGLU FFN, rotary embeddings,
    grouped-query attention when ``num_kv_heads < num_heads``, untied input/output embeddings."""

    name: str = knob(REQUIRED, "The model's name, as result rows show it.", example="llama-1b")
    num_layers: int = knob(REQUIRED, "Transformer layers.", low=1, high=10_000)
    d_model: int = knob(REQUIRED, "Residual stream width.", low=1, high=2**20)
    num_heads: int = knob(REQUIRED, "Query heads.", low=1, high=2**16)
    num_kv_heads: int = knob(REQUIRED, "Key/value heads (grouped-query attention when fewer than num_heads).",
                              low=1, high=2**16)
    d_ff: int = knob(REQUIRED, "SwiGLU hidden width.", low=1, high=2**22)
    vocab_size: int = knob(REQUIRED, "Vocabulary size.", low=1, high=2**24)
    rope_theta: float = knob(10000.0, "Rotary embedding base.", above=0)
    norm_eps: float = knob(1e-5, "RMSNorm epsilon.", above=0, high=1.0)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def n_params(self) -> int:
        """Exact parameter count, embeddings and LM head included (both count in 6N of MFU)."""
        d, hd = self.d_model, self.head_dim
        attention = d * self.num_heads * hd * 2 + d * self.num_kv_heads * hd * 2
        ffn = 3 * d * self.d_ff
        per_layer = attention + ffn + 2 * d
        return self.num_layers * per_layer + 2 * self.embedding_params + d

    @property
    def embedding_params(self) -> int:
        """One vocabulary table: the input embedding's, and the (untied) LM head's of the same size."""
        return self.vocab_size * self.d_model


def model_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml"))


def load_model_config(name_or_path: str, **overrides) -> ModelConfig:
    """Load ``configs/models/NAME.yaml`` (or a YAML path); ``overrides`` replace fields that are
    not None (e.g. ``vocab_size``)."""
    path = pathlib.Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / "models" / f"{name_or_path}.yaml"
    refuse_special(path, "model", "configs/models/tiny.yaml")
    if not path.is_file():
        raise InvalidInput(
            "model", f"unknown model {name_or_path!r}; choose one of {', '.join(model_names())} "
            "or give the path of a YAML file with the same fields")
    fields = load_yaml(path, "model")
    fields.update({k: v for k, v in overrides.items() if v is not None})
    return from_mapping(ModelConfig, fields, path, "model")


# ---------------------------------------------------------------------------------------------
# Mesh degrees


def parse_mesh(text: str, num_devices: int | None = None) -> dict[str, int]:
    """Parse ``"dp=8,tp=4,pp=1"`` into every mesh axis (missing ones are 1).

    One axis may be ``-1``: it takes the devices the others leave, which needs ``num_devices``.
    """
    mesh = {axis: 1 for axis in MESH_AXES}
    rest, seen = None, set()
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in MESH_AXES:
            raise InvalidInput(
                "mesh", f"cannot read {item!r}; write AXIS=SIZE pairs over {'/'.join(MESH_AXES)}, "
                "e.g. --mesh dp=8,tp=4,pp=1")
        if name in seen:
            raise InvalidInput("mesh", f"{name} is given twice in {text!r}; give each axis once, e.g. dp=8,tp=4")
        seen.add(name)
        digits = value[1:] if value.startswith("-") else value
        if not (digits.isascii() and digits.isdigit()) or len(digits) > 18:
            raise InvalidInput("mesh", f"{name}={value[:40]!r} is not an integer: write a positive size "
                               f"(or -1 for the rest) with one sign at most, e.g. {name}=2")
        size = int(value)
        if size == -1:
            if rest is not None:
                raise InvalidInput("mesh", f"only one axis may be -1 (both {rest} and {name} are)")
            rest = name
        elif size < 1:
            raise InvalidInput("mesh", f"{name}={size}: sizes are positive integers (or -1 for the rest)")
        mesh[name] = size
    if rest is not None:
        others = math.prod(size for axis, size in mesh.items() if axis != rest)
        if num_devices is None:
            raise InvalidInput("mesh", f"{rest}=-1 needs a known device count; give --num_devices "
                                 "or write the size explicitly")
        if num_devices % others:
            raise InvalidInput("mesh", f"{rest}=-1: {num_devices} devices are not divisible by the "
                                 f"other axes' product {others}")
        mesh[rest] = num_devices // others
    return mesh


def mesh_text(mesh: dict[str, int]) -> str:
    """``"dp=8,fsdp=1,tp=4,pp=1"``: every axis, an optional one (``cp``) only when it is not 1."""
    return ",".join(f"{axis}={mesh.get(axis, 1)}" for axis in MESH_AXES
                    if axis not in OPTIONAL_AXES or mesh.get(axis, 1) != 1)


# ---------------------------------------------------------------------------------------------
# Layout and run


def default_scans_layers(platform: str, remat: str) -> bool:
    """Whether a step runs its layers as one scan when the layout does not say
    (:meth:`Layout.scans_layers` gives the reason): on CPU, and under a remat policy."""
    return platform == "cpu" or choices.REMAT[remat].checkpoints


def zigzag_order(seq_len: int, cp: int) -> np.ndarray:
    """The sequence positions in storage order: device ``i``'s two chunks, ``i`` and
    ``2 cp - 1 - i``, for ``i = 0 .. cp - 1``; the identity when ``cp == 1`` (any ``seq_len``, odd
    ones too: validation asks ``seq_len`` to be a multiple of ``2 cp`` only when ``cp > 1``)."""
    if cp == 1:
        return np.arange(seq_len)
    chunks = np.arange(seq_len).reshape(2 * cp, seq_len // (2 * cp))
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * cp - 1 - i]]) for i in range(cp)])


@dataclasses.dataclass(frozen=True)
class ContextParallel:
    """How attention runs over the ``cp`` mesh axis, decided here once (:meth:`of`) and carried
    by the model as a field. ``ring``: ring attention (``model/ring_attention.py``). Inside a
    pipeline (pp > 1) ``all_gather`` (``model/attention.gathered_attention``): the stages run
    different branches of one program, and a ring's collective-permutes there would have to be
    taken by every device. ``none`` at cp = 1. Under cp > 1 the sequence is stored in zigzag order."""

    size: int = 1
    mode: str = "none"                  # none | ring | all_gather

    ATTENTION = {"ring": RING_ATTENTION, "all_gather": tuple(
        name for name, a in choices.ATTENTION.items() if a.all_gather)}
    """The attention implementations each mode runs: ring steps merge blocks by their
    log-sum-exp; all-gather CP masks the gathered keys by position, with XLA."""

    @classmethod
    def of(cls, cp: int, pp: int) -> ContextParallel:
        return cls(cp, "none" if cp == 1 else "all_gather" if pp > 1 else "ring")

    def runs(self, attention: str) -> bool:
        """Whether ``attention`` runs under this mode (every implementation at cp = 1)."""
        return self.mode == "none" or attention in self.ATTENTION[self.mode]

    def order(self, seq_len: int) -> np.ndarray:
        """The positions of the stored sequence: :func:`zigzag_order`, the identity at cp = 1."""
        return zigzag_order(seq_len, self.size)


@dataclasses.dataclass(frozen=True)
class Layout:
    """How one step is parallelised. ``zero`` shards over the ``fsdp`` axis: 1 = optimizer state
    and fp32 master weights, 2 = + gradients, 3 = + parameters (gathered per layer)."""

    mesh: dict = knob({"dp": 1}, "Mesh degrees over dp,fsdp,cp,tp,pp, e.g. dp=8,tp=4,pp=1 or dp=2,cp=4,tp=2; "
                      "-1 = the rest.",
                      example="dp=8,tp=4,pp=1")
    micro_batch: int = knob(1, "Sequences per data shard per accumulation step.", key="mbs", low=1)
    zero: int | None = knob(None, "ZeRO stage over the fsdp axis (0-3); default 3 if fsdp>1 else 0.",
                           key="zero", choices=ZERO_CHOICES, noun="ZeRO stage", example=1)
    sequence_parallel: bool = knob(False, "Megatron sequence parallelism inside the tp group.", key="sp")
    remat: str = knob("none", f"Activation checkpointing policy: {', '.join(REMAT_CHOICES)}.", key="remat",
                      choices=REMAT_CHOICES, noun="policy")
    attention: str = knob("xla", f"Attention implementation: {', '.join(ATTENTION_CHOICES)}.", key="attn",
                          choices=ATTENTION_CHOICES, noun="implementation")
    norm: str = knob("xla", f"RMSNorm implementation: {', '.join(NORM_CHOICES)}.", key="norm",
                     choices=NORM_CHOICES, noun="implementation")
    pipeline_schedule: str = knob("1f1b", f"Pipeline schedule for pp>1: {', '.join(PIPELINE_SCHEDULES)}.",
                                   key="pipe", choices=PIPELINE_SCHEDULES, noun="schedule", written="pipeline")
    virtual_stages: int = knob(1, "Layer chunks per pipeline stage (circular schedule).", key="vstages",
                                low=1, written="pipeline")
    pipeline_microbatches: int | None = knob(None, "Micro-batches per pipeline flush (default: all of the "
                                              "step's; fewer means several flushes per step).", key="pmb",
                                              low=1, example=8, written="pipeline")
    scan_layers: bool | None = knob(None, "Run the decoder layers as one scan (true: compile time independent "
                                    "of depth, per-layer copies of weight slices and saved activations) or "
                                    "unrolled (false: no such copies, a lower peak, compile time growing with "
                                    "depth). Default: unrolled on a GPU without remat, else scanned (CPU emulation, "
                                    "remat policies); see docs/gpu-program.md.",
                                    key="scan", written="changed")

    def __post_init__(self):
        if self.zero is None:
            object.__setattr__(self, "zero", 3 if self.mesh.get("fsdp", 1) > 1 else 0)
        object.__setattr__(self, "mesh", {axis: int(self.mesh.get(axis, 1)) for axis in MESH_AXES})

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh.values())

    def scans_layers(self, platform: str) -> bool:
        """Whether the layers run as one scan on devices of ``platform``: as set; else on CPU, and
        on a GPU under a remat policy. Unrolled, XLA:GPU schedules the recomputation of many
        layers ahead of their backward, so their activations are live at once (llama-1b, full
        remat, micro-batch 8, two micro-batches: 44.26 GiB unrolled against 23.91 GiB scanned on
        one H100; docs/gpu-program.md). Without remat, unrolled layers remove the scan's per-layer
        copies and lower the peak."""
        return self.scan_layers if self.scan_layers is not None else default_scans_layers(platform, self.remat)

    @property
    def zero_stage(self) -> choices.Zero:
        """The ZeRO stage's record: what it shards (``choices.ZERO``)."""
        return choices.ZERO[self.zero]

    @property
    def context_parallel(self) -> ContextParallel:
        return ContextParallel.of(self.mesh["cp"], self.mesh["pp"])

    @property
    def data_parallel(self) -> int:
        """Number of batch shards (``dp * fsdp``)."""
        return self.mesh["dp"] * self.mesh["fsdp"]

    def __str__(self) -> str:
        """The text form: the mesh, then ``key=value`` for every keyed field (pipeline fields only
        when pp > 1, an unset one never)."""
        items = [mesh_text(self.mesh)]
        for field in knobs(Layout):
            key, value = field.metadata["key"], getattr(self, field.name)
            when = field.metadata["written"]
            if (key is None or value is None or (when == "pipeline" and self.mesh["pp"] == 1)
                    or (when == "changed" and value == field.default)):
                continue
            items.append(f"{key}={int(value) if isinstance(value, bool) else value}")
        return " ".join(items)

    @classmethod
    def parse(cls, text: str) -> "Layout":
        """Inverse of ``str(layout)``: ``"dp=8,tp=4 mbs=1 zero=0 sp=0 remat=none attn=xla norm=xla"``."""
        by_key = {f.metadata["key"]: f for f in knobs(cls) if f.metadata["key"]}
        mesh_part, *rest = text.split() or [""]
        fields: dict = {"mesh": parse_mesh(mesh_part)}
        for item in rest:
            key, _, value = item.partition("=")
            if key not in by_key:
                raise InvalidInput("layout", f"unknown field {key!r} in {text!r}; known: {sorted(by_key)}")
            fields[by_key[key].name] = value
        try:
            return cls(**checked(cls, fields))
        except InvalidInput as error:
            raise InvalidInput("layout", f"{text!r}: {error}") from None


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A model, its training batch and the layout it runs under."""

    model: ModelConfig
    layout: Layout
    seq_len: int = knob(256, "Tokens per sequence.", low=2, high=2**24, example=128)
    global_batch: int = knob(32, "Sequences per optimizer step (all data shards, all micro-batches).", low=1,
                             high=2**24)
    dtype: str = knob("bfloat16", f"Compute dtype: {', '.join(DTYPE_CHOICES)} (master weights are float32).",
                      choices=DTYPE_CHOICES, noun="dtype")
    learning_rate: float = knob(1e-3, "AdamW learning rate.", above=0, high=10.0)
    seed: int = knob(0, "Seed for parameters and synthetic data.", low=0)

    @property
    def grad_accum_steps(self) -> int:
        """Micro-batches per optimizer step: global_batch / (dp * fsdp * micro_batch)."""
        return self.global_batch // (self.layout.data_parallel * self.layout.micro_batch)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len


def validate(run: RunConfig, num_devices: int, platform: str | None = None) -> None:
    """Raise :class:`InvalidInput` for the first thing that cannot work, before any compile."""
    m, lay = run.model, run.layout
    dp, fsdp, cp, tp, pp = (lay.mesh[a] for a in MESH_AXES)
    if lay.num_devices != num_devices:
        raise InvalidInput("mesh", f"{mesh_text(lay.mesh)} uses {lay.num_devices} devices but "
                           f"{num_devices} are present; make the product {num_devices} "
                           "(or use -1 on one axis for the rest)")
    check_instance(m, "model", where=f"{m.name}: ")
    check_instance(lay)
    check_instance(run)
    if m.d_model % m.num_heads or m.head_dim % 2:
        raise InvalidInput("model", f"{m.name}: d_model={m.d_model} must be num_heads={m.num_heads} times "
                           "an even head dimension (rotary embeddings rotate pairs)")
    for (name, choice), alternative in choices.GPU_ONLY.items():
        if getattr(lay, name) == choice and platform not in (None, "gpu", "cuda"):
            raise InvalidInput(name, f"{choice} needs an NVIDIA GPU (platform is {platform}); {alternative}")
    if choices.NORM[lay.norm].needs and (reason := triton_versions.unavailable_reason()):  # jax-triton, triton
        raise InvalidInput("norm", reason)
    if lay.zero_stage.shards_state and fsdp == 1:
        raise InvalidInput("zero", f"zero={lay.zero} shards over the fsdp mesh axis, which has size 1; "
                           "put the data-parallel degree on fsdp (e.g. --mesh fsdp=8 instead of dp=8) "
                           "or use --zero 0")
    if lay.zero_stage.shards_state and m.d_model % fsdp:
        raise InvalidInput("mesh", f"fsdp={fsdp} does not divide d_model={m.d_model} (ZeRO shards "
                           "that dimension); choose an fsdp degree that divides it")
    for what, size in (("num_heads", m.num_heads), ("num_kv_heads", m.num_kv_heads),
                       ("d_ff", m.d_ff), ("vocab_size", m.vocab_size)):
        if size % tp:
            raise InvalidInput("mesh", f"tp={tp} does not divide {what}={size} of {m.name}; "
                                 f"choose a tp that divides it, e.g. tp={math.gcd(size, tp)}")
    if m.num_heads % m.num_kv_heads:
        raise InvalidInput("model", f"num_kv_heads={m.num_kv_heads} must divide num_heads={m.num_heads}")
    _validate_context_parallel(run)
    if lay.sequence_parallel and run.seq_len % (cp * tp):
        split = f"cp*tp={cp}*{tp}={cp * tp}" if cp > 1 else f"tp={tp}"
        raise InvalidInput("seq_len", f"sequence parallelism splits the sequence over {split}, "
                           f"but seq_len={run.seq_len} is not divisible by it; "
                           f"e.g. --seq_len {_multiple(run.seq_len, math.lcm(cp * tp, 2 * cp if cp > 1 else 1))}")
    if lay.sequence_parallel and tp == 1:
        raise InvalidInput("sequence_parallel", "sequence parallelism works inside the tp group, "
                           "which has size 1; add tp>1 to --mesh or drop --sequence_parallel")
    shards = lay.data_parallel * lay.micro_batch
    if run.global_batch % shards:
        raise InvalidInput("global_batch", f"{run.global_batch} is not divisible by dp*fsdp*micro_batch="
                           f"{dp}*{fsdp}*{lay.micro_batch}={shards}; e.g. --global_batch "
                           f"{max(1, run.global_batch // shards) * shards}")
    _validate_pipeline(run)


def _multiple(value: int, of: int) -> int:
    """The nearest multiple of ``of`` at or below ``value`` (``of`` itself if none is)."""
    return value // of * of or of


def _validate_context_parallel(run: RunConfig) -> None:
    """Ring attention over ``cp`` (see ``model/ring_attention.py``): each device holds two of
    the sequence's ``2 cp`` chunks, and each ring step runs an attention kernel on one block."""
    cp, lay = run.layout.mesh["cp"], run.layout
    if cp == 1:
        return
    if run.seq_len % (2 * cp):
        raise InvalidInput("seq_len", f"context parallelism gives each of cp={cp} devices two of the "
                           f"sequence's 2*cp={2 * cp} chunks (causal load balance), but seq_len={run.seq_len} "
                           f"is not divisible by {2 * cp}; e.g. --seq_len {_multiple(run.seq_len, 2 * cp)}")
    if not ContextParallel.of(cp, pp=1).runs(lay.attention):
        raise InvalidInput("attention", f"{lay.attention} cannot run per ring step under cp={cp}: it returns "
                           "no log-sum-exp to merge one key block's result with the next; use --attention "
                           f"{' or '.join(RING_ATTENTION)}")
    if not lay.context_parallel.runs(lay.attention):
        raise InvalidInput("attention", f"{lay.attention} does not run under cp={cp} with pp={lay.mesh['pp']}: "
                           "inside a pipeline context parallelism all-gathers K/V and attends with XLA "
                           "(a ring's collective-permutes cannot sit in the stages' branches); use --attention xla")


def _validate_pipeline(run: RunConfig) -> None:
    lay, layers = run.layout, run.model.num_layers
    pp, v, schedule = lay.mesh["pp"], lay.virtual_stages, lay.pipeline_schedule
    if v > 1 and schedule != "circular":
        raise InvalidInput("virtual_stages", f"{v} virtual stages need --pipeline_schedule circular "
                           f"({schedule} runs one chunk per stage; interleaved 1F1B is not implemented)")
    if v > 1 and pp == 1:
        raise InvalidInput("virtual_stages", "virtual stages split a pipeline, but pp=1; add pp>1 to --mesh")
    if layers % (pp * v):
        raise InvalidInput("mesh", f"pp={pp} x virtual_stages={v} = {pp * v} stages do not divide "
                           f"num_layers={layers} of {run.model.name}; choose degrees whose product divides it")
    if pp > 1 and not choices.ATTENTION[lay.attention].pp:
        raise InvalidInput("attention", f"{lay.attention} does not run inside pipeline stages; use --attention "
                           f"{' or '.join(n for n, a in choices.ATTENTION.items() if a.pp)}")
    if pp == 1:
        if lay.pipeline_microbatches is not None:
            raise InvalidInput("pipeline_microbatches", "applies to pipelines only (pp=1); drop it or add pp>1")
        return
    accum = run.grad_accum_steps
    m = lay.pipeline_microbatches or accum
    if m < 1 or accum % m:
        raise InvalidInput("pipeline_microbatches", f"{m} must divide the step's {accum} micro-batches "
                           f"(global_batch / (dp*fsdp*micro_batch)); e.g. --pipeline_microbatches {accum}")
    if m < pp:
        raise InvalidInput("pipeline_microbatches", f"{m} micro-batches cannot fill {pp} stages (the "
                           f"pipeline would mostly idle); use at least {pp}: raise --global_batch or "
                           "lower --micro_batch")
    if schedule == "circular" and m % pp:
        raise InvalidInput("pipeline_microbatches", f"the circular schedule feeds micro-batches in groups "
                           f"of pp={pp}; {m} is not a multiple, e.g. {m // pp * pp or pp}")
