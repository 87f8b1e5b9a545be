"""Pipeline parallelism over the ``pp`` mesh axis, as one SPMD program.

The step runs inside a ``shard_map`` that is manual over ``pp`` and the data axes (``dp``,
``fsdp``) and automatic over ``tp``, so tensor and sequence parallelism inside a stage stay with
XLA's partitioner while pipeline and data-parallel communication is explicit. A
:mod:`schedule <jaxlayouts.parallel.schedule>` table says, per tick and stage, whether to idle,
run a chunk's forward, or its backward; a ``lax.scan`` over ticks executes it:

1. store the activation and the gradient received last tick in their stash slots;
2. ``lax.switch`` on this stage's op: forward (stage 0 embeds the tokens) or backward, which
   re-runs the chunk's forward under ``jax.vjp`` from its stashed input and pulls back the
   received gradient (the last stage starts from the loss, the first one ends in the embedding);
   parameter gradients accumulate in float32;
3. send this tick's output to the next stage and its input gradient to the previous one
   (two ``ppermute`` rings, every tick, outside the switch so all stages take part).

What this is and is not: stage *inputs* are what is stashed between a micro-batch's forward and
backward (at most ``P - d`` per stage under 1F1B, all ``M`` under GPipe), and the backward tick
recomputes the chunk's forward, so a pipelined step costs one extra forward pass; remat policies
apply inside that recomputation. Every tick lasts as long as the slowest stage's op, so 1F1B's
mixed ticks cost a backward each: in one SPMD program 1F1B buys bounded memory, not time.
Embedding, final norm and LM head are replicated over ``pp`` and used by the first / last stage.

Gradients over the data axes, per ZeRO stage (what each shards: ``train.py``): ZeRO-0/1 accumulate a
stage's whole gradient and reduce it once per step, after the last tick (an all-reduce over
``dp``; for ZeRO-1 a reduce-scatter over ``fsdp``). ZeRO-2 reduce-scatters each backward tick's
gradient over ``fsdp`` into a sharded accumulator, and ZeRO-3 all-gathers weights per chunk and
tick, whose transpose reduce-scatters the gradient, so neither holds a stage's whole gradient.
Unlike ``train.py``'s ZeRO-2 (float32), both sum over ``fsdp`` in the compute dtype, half the
bytes and one whole gradient per tick, at bf16's precision for that sum.

Collectives over ``fsdp`` run on each device's own tile of the automatic axes
(:meth:`Pipeline._per_tile`): left to the partitioner inside this partially manual ``shard_map``,
XLA replicates the operand over ``tp`` first (a ``tp``-times larger all-gather or gradient).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

from jaxlayouts.layout import DATA_AXES, RunConfig
from jaxlayouts.mesh import constrain, sharding_context
from jaxlayouts.model.axes import RESIDUAL
from jaxlayouts.model.llama import LayerStack, embed, head
from jaxlayouts.parallel.schedule import BACKWARD, FORWARD, IDLE, build

MANUAL_AXES = ("pp", *DATA_AXES)


def _spec_part(spec: PartitionSpec, manual: bool) -> PartitionSpec:
    """The part of a PartitionSpec over the axes the pipeline handles by hand (or the rest)."""
    keep = lambda axes: tuple(a for a in ((axes,) if isinstance(axes, str) else axes or ())
                              if (a in MANUAL_AXES) == manual)
    return PartitionSpec(*(None if not keep(a) else keep(a)[0] if len(keep(a)) == 1 else keep(a) for a in spec))


manual_part = functools.partial(_spec_part, manual=True)
auto_part = functools.partial(_spec_part, manual=False)


def _axis_dim(spec: PartitionSpec, axis: str) -> int | None:
    for dim, axes in enumerate(spec):
        if axes == axis or (isinstance(axes, tuple) and axis in axes):
            return dim
    return None


def storage_order(num_layers: int, stages: int, chunks: int) -> np.ndarray:
    """Which model layer each position of the stored ``layers`` axis holds. The axis is split
    over ``pp`` in contiguous blocks, so device ``d`` stores its chunks ``v`` (virtual stages
    ``v * P + d``, round-robin) one after the other; identity when ``chunks == 1``."""
    per_chunk = num_layers // (stages * chunks)
    return np.array([(v * stages + d) * per_chunk + k
                     for d in range(stages) for v in range(chunks) for k in range(per_chunk)])


class Pipeline:
    """Gradients of one step for a ``pp > 1`` layout (see the module docstring)."""

    def __init__(self, run: RunConfig, mesh, rules, compute_specs, grad_specs):
        lay, self.run, self.mesh, self.rules = run.layout, run, mesh, rules
        self.stages, self.chunks = lay.mesh["pp"], lay.virtual_stages
        self.microbatches = lay.pipeline_microbatches or run.grad_accum_steps
        self.rounds = run.grad_accum_steps // self.microbatches
        self.layers_per_chunk = run.model.num_layers // (self.stages * self.chunks)
        self.schedule = build(lay.pipeline_schedule, self.stages, self.chunks, self.microbatches)
        self.compute_specs, self.grad_specs = compute_specs, grad_specs
        self.zero = lay.zero_stage
        self.dtype = jnp.dtype(run.dtype)
        self.stack = LayerStack(run.model, self.dtype, lay.attention, lay.norm, lay.remat, self.layers_per_chunk,
                                lay.scans_layers(mesh.devices.flat[0].platform), lay.context_parallel)

    # -- pieces of the model --------------------------------------------------------------------

    def _per_tile(self, collective, spec: PartitionSpec):
        """``collective`` (over manual axes) applied to this device's tile of the automatic axes
        of a tensor laid out by ``spec``: a ``shard_map`` nested inside the pipeline's that makes
        ``tp`` and ``cp`` manual too. Without it XLA:GPU all-gathers the operand whole over
        ``tp`` before an ``fsdp`` collective (a reduce-scatter's ``bf16[4,512,512]`` tiles
        all-gathered to ``bf16[4,512,1024]`` first; ZeRO-3's chunk gathers whole over tp)."""
        tile = auto_part(spec)
        auto = {a for a in self.mesh.axis_names if a not in MANUAL_AXES}
        return jax.shard_map(collective, mesh=jax.sharding.get_abstract_mesh(), in_specs=tile, out_specs=tile,
                             axis_names=auto, check_vma=False)

    def _over_fsdp(self, collective, tree, specs):
        """``collective(x, dim)`` on every leaf of ``tree`` whose ``spec`` shards dimension ``dim``
        over ``fsdp``, per tile (:meth:`_per_tile`); leaves with no ``fsdp`` dimension as they are."""
        def leaf(x, spec):
            dim = _axis_dim(spec, "fsdp")
            return x if dim is None else self._per_tile(lambda t: collective(t, dim), spec)(x)
        return jax.tree.map(leaf, tree, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))

    def _gather(self, params, specs):
        """ZeRO-3: all-gather each weight's ``fsdp`` shard (its transpose reduce-scatters the
        gradient); a no-op for other stages."""
        if not self.zero.shards_weights:
            return params
        return self._over_fsdp(lambda p, dim: lax.all_gather(p, "fsdp", axis=dim, tiled=True), params, specs)

    def _onto_gradient_shard(self, grads, specs):
        """ZeRO-2: reduce-scatter one backward tick's gradients over ``fsdp`` onto this device's
        shard of the accumulator, in the compute dtype as ZeRO-3's gather transposes do, so the
        tick holds one whole gradient, not a float32 copy beside it. Other stages keep them as
        they are."""
        if not self.zero.scatters_each_gradient:
            return grads
        scatter = lambda g, dim: lax.psum_scatter(g, "fsdp", scatter_dimension=dim, tiled=True)
        return self._over_fsdp(scatter, grads, specs)

    def _stage(self, chunk, x):
        chunk = self._gather(chunk, self.compute_specs["layers"])
        return self.stack.apply({"params": {"layers": chunk}}, x)

    def _embed(self, other, tokens):
        return embed(self._gather(other, self._other_specs), tokens, self.dtype)

    def _loss(self, other, x, targets):
        lay = self.run.layout
        logits = head(self._gather(other, self._other_specs), x, self.run.model, self.dtype, lay.norm)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    # -- shardings that every branch agrees on -------------------------------------------------

    def _constrain(self, tree, specs):
        pin = lambda x, spec: lax.with_sharding_constraint(x, NamedSharding(self.mesh, auto_part(spec)))
        return jax.tree.map(pin, tree, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))

    def _pin_grads(self, loss, d_layers, d_other, dx):
        chunk_specs = self.compute_specs["layers"]
        if d_layers is not None:
            d_layers = self._constrain(d_layers, chunk_specs)
        return loss, d_layers, self._constrain(d_other, self._other_specs), constrain(dx, RESIDUAL)

    def _pin(self, acts, acc_layers, acc_other, losses, send_forward, send_backward):
        stacked = lambda spec: PartitionSpec(None, *spec)
        acc_specs = jax.tree.map(stacked, self.compute_specs["layers"], is_leaf=lambda x: isinstance(x, PartitionSpec))
        return (constrain(acts, (None, *RESIDUAL)), self._constrain(acc_layers, acc_specs),
                self._constrain(acc_other, self._other_specs), losses,
                constrain(send_forward, RESIDUAL), constrain(send_backward, RESIDUAL))

    # -- one tick -------------------------------------------------------------------------------

    def _tick(self, layers, other, inputs, targets, carry, row):
        p, v_last = self.stages, self.chunks - 1
        stage = lax.axis_index("pp")
        op, micro, chunk, input_slot, grad_slot, store_activation, store_grad = row
        acts, grads, forward_msg, backward_msg, acc_layers, acc_other, losses = carry
        store = lambda buf, slot, msg: lax.cond(
            slot >= 0, lambda b: b.at[jnp.maximum(slot, 0)].set(msg), lambda b: b, buf)
        acts = store(acts, store_activation, forward_msg)
        grads = store(grads, store_grad, backward_msg)
        # Index outside the branches: a collective-permute inside one that not every stage takes
        # deadlocks (CPU's rendezvous waits for all devices), and slicing tokens can produce one.
        micro_inputs, micro_targets = (lax.dynamic_index_in_dim(t, jnp.maximum(micro, 0), keepdims=False)
                                       for t in (inputs, targets))
        first = (stage == 0) & (chunk == 0)
        last = (stage == p - 1) & (chunk == v_last)
        chunk_params = jax.tree.map(lambda w: w[jnp.maximum(chunk, 0)], layers)
        zeros = jnp.zeros_like(forward_msg)

        def idle(acts, acc_layers, acc_other, losses):
            return acts, acc_layers, acc_other, losses, zeros, zeros

        def forward(acts, acc_layers, acc_other, losses):
            x = lax.cond(first, lambda: constrain(self._embed(other, micro_inputs), RESIDUAL),
                         lambda: constrain(acts[input_slot], RESIDUAL))
            acts = acts.at[input_slot].set(x)
            return acts, acc_layers, acc_other, losses, self._stage(chunk_params, x), zeros

        def backward(acts, acc_layers, acc_other, losses):
            x = acts[input_slot]
            scale = 1.0 / (self.microbatches * self.rounds * self.run.layout.data_parallel)

            def from_loss():
                f = lambda lp, o, x: self._loss(o, self._stage(lp, x), micro_targets)
                loss, pull = jax.vjp(f, chunk_params, other, x)
                d_layers, d_other, dx = pull(jnp.asarray(scale, loss.dtype))
                return loss, d_layers, d_other, dx

            def from_next_stage():
                _, pull = jax.vjp(self._stage, chunk_params, x)
                d_layers, dx = pull(grads[jnp.maximum(grad_slot, 0)])
                return jnp.zeros((), jnp.float32), d_layers, jax.tree.map(jnp.zeros_like, other), dx

            loss, d_layers, d_other, dx = lax.cond(
                last, lambda: self._pin_grads(*from_loss()), lambda: self._pin_grads(*from_next_stage()))

            def into_embedding():
                _, pull = jax.vjp(lambda o: self._embed(o, micro_inputs).astype(dx.dtype), other)
                return jax.tree.map(jnp.add, d_other, pull(dx)[0]), zeros

            d_other, send = lax.cond(first, lambda: self._pin_grads(0, None, *into_embedding())[2:],
                                     lambda: self._pin_grads(0, None, d_other, dx)[2:])
            f32 = lambda t: jax.tree.map(lambda g: g.astype(jnp.float32), t)
            d_layers = self._onto_gradient_shard(d_layers, self.grad_specs["layers"])
            other_specs = self._other_specs_of(self.grad_specs)
            if self.zero.scatters_each_gradient:  # only the first and last chunks have embedding/head gradients
                d_other = lax.cond(
                    first | last, lambda: self._constrain(f32(self._onto_gradient_shard(d_other, other_specs)), other_specs),
                    lambda: self._constrain(self._accumulator(d_other, other_specs), other_specs))
            acc_layers = jax.tree.map(lambda acc, g: acc.at[chunk].add(g), acc_layers, f32(d_layers))
            acc_other = jax.tree.map(jnp.add, acc_other, f32(d_other))
            return acts, acc_layers, acc_other, losses.at[micro].add(loss.astype(jnp.float32)), zeros, send

        branches = {IDLE: idle, FORWARD: forward, BACKWARD: backward}
        # XLA wants every branch of a conditional to agree on its outputs' shardings: pin them.
        pinned = lambda branch: lambda *args: self._pin(*branch(*args))
        acts, acc_layers, acc_other, losses, send_forward, send_backward = lax.switch(
            op, [pinned(branches[code]) for code in sorted(branches)], acts, acc_layers, acc_other, losses)
        ring = [(i, (i + 1) % p) for i in range(p)]
        forward_msg = lax.ppermute(send_forward, "pp", ring)
        backward_msg = lax.ppermute(send_backward, "pp", [(b, a) for a, b in ring])
        return (acts, grads, forward_msg, backward_msg, acc_layers, acc_other, losses), None

    # -- the step -------------------------------------------------------------------------------

    def _local_gradients(self, params, inputs, targets):
        """Per-device body: ``inputs, targets [rounds * M, rows of this data shard, seq_len]``."""
        layers = jax.tree.map(lambda w: w.reshape(self.chunks, self.layers_per_chunk, *w.shape[1:]),
                              params["layers"])
        other = {k: w for k, w in params.items() if k != "layers"}
        rows, seq_len = inputs.shape[1], inputs.shape[2]
        s = self.schedule
        msg = jnp.zeros((rows, seq_len, self.run.model.d_model), self.dtype)
        table = tuple(jnp.asarray(t) for t in (s.op, s.micro, s.chunk, s.input_slot, s.grad_slot,
                                                s.store_activation, s.store_grad))
        stage = lax.axis_index("pp")

        def one_round(acc, round_batch):
            acc_layers, acc_other = acc
            carry = (jnp.zeros((s.input_slots, *msg.shape), msg.dtype),
                     jnp.zeros((s.grad_slots, *msg.shape), msg.dtype), msg, msg,
                     acc_layers, acc_other, jnp.zeros((self.microbatches,), jnp.float32))
            tick = functools.partial(self._tick, layers, other, *round_batch)
            rows_of_stage = tuple(t[:, stage] for t in table)
            carry, _ = lax.scan(lambda c, r: tick(c, r), carry, rows_of_stage)
            return (carry[4], carry[5]), carry[6]

        by_round = lambda t: t.reshape(self.rounds, self.microbatches, *t.shape[1:])
        accumulators = (self._accumulator(layers, self.grad_specs["layers"], stacked=True),
                        self._accumulator(other, self._other_specs_of(self.grad_specs)))
        (acc_layers, acc_other), losses = lax.scan(one_round, accumulators, (by_round(inputs), by_round(targets)))
        grads = {"layers": jax.tree.map(lambda g: g.reshape(-1, *g.shape[2:]), acc_layers),
                 **jax.tree.map(lambda g: lax.psum(g, "pp"), acc_other)}
        losses = lax.psum(losses.reshape(-1), ("pp", *DATA_AXES)) / self.run.layout.data_parallel
        return self._reduce_over_data(grads), losses

    def _accumulator(self, params, specs, stacked: bool = False):
        """Float32 zeros for the gradients of ``params`` (this device's part), split over
        ``fsdp`` where ZeRO-2 scatters each tick's gradient (:meth:`_onto_gradient_shard`).
        ``stacked``: ``params`` carry a leading chunk axis that ``specs`` do not describe."""
        def zeros(w, spec):
            shape, dim = list(w.shape), _axis_dim(spec, "fsdp")
            if self.zero.scatters_each_gradient and dim is not None:
                shape[dim + stacked] //= self.mesh.shape["fsdp"]
            return jnp.zeros(shape, jnp.float32)
        return jax.tree.map(zeros, params, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))

    def _reduce_over_data(self, grads):
        """Once per step: all-reduce over ``dp``; over ``fsdp`` a reduce-scatter onto the ZeRO
        shard (ZeRO-1), an all-reduce for ZeRO-0 and for leaves with no ``fsdp`` dimension,
        nothing more for ZeRO-2/3 (done per tick)."""
        zero = self.zero

        def reduce(g, spec):
            dim = _axis_dim(spec, "fsdp")

            def on_tile(t):
                t = lax.psum(t, "dp")
                if dim is None:  # ZeRO-0's specs have no fsdp dimension
                    return lax.psum(t, "fsdp")
                return lax.psum_scatter(t, "fsdp", scatter_dimension=dim, tiled=True) if zero.scatters_at_step_end else t
            return self._per_tile(on_tile, spec)(g)

        return jax.tree.map(reduce, grads, self.grad_specs, is_leaf=lambda x: isinstance(x, PartitionSpec))

    @staticmethod
    def _other_specs_of(specs):
        return {k: v for k, v in specs.items() if k != "layers"}

    @property
    def _other_specs(self):
        return self._other_specs_of(self.compute_specs)

    def gradients(self, params, inputs, targets):
        """Mean-loss gradients (float32, laid out by ``grad_specs``) and per-micro-batch losses of
        ``inputs, targets [accum_steps, rows, seq_len]``; ``params`` in the compute dtype and layout."""
        manual = lambda specs: jax.tree.map(manual_part, specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
        body = jax.shard_map(
            self._local_gradients, mesh=self.mesh,
            in_specs=(manual(self.compute_specs), PartitionSpec(None, DATA_AXES), PartitionSpec(None, DATA_AXES)),
            out_specs=(manual(self.grad_specs), PartitionSpec()),
            axis_names=set(MANUAL_AXES), check_vma=False)
        with sharding_context(self.mesh, self.rules):
            return body(params, inputs, targets)
