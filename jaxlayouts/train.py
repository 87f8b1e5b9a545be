"""Train state, optimizer and one training step with gradient accumulation, for any layout.

Mixed precision as in Megatron: float32 master weights and AdamW state; the step casts the master
weights to the compute dtype once, runs every micro-batch in that dtype, and accumulates gradients
in float32.

What is sharded over the ``fsdp`` axis, per ZeRO stage (Rajbhandari et al. 2020):

| zero | master weights + Adam state | gradient accumulator | weights during compute         |
|------|-----------------------------|----------------------|--------------------------------|
| 0    | replicated                  | replicated           | replicated (gathered once)     |
| 1    | sharded                     | replicated           | replicated (gathered once)     |
| 2    | sharded                     | sharded              | replicated (gathered once)     |
| 3    | sharded                     | sharded              | sharded, all-gathered per layer|

Gradient reduction over the data axes: with ZeRO 0/1 every data shard accumulates its own
gradients over the micro-batches (a ``vmap`` over the shards) and the reduction runs once per step
(all-reduce, or reduce-scatter + gather for ZeRO-1), as DDP's ``no_sync`` and Megatron do. With
ZeRO 2/3 each micro-batch's gradients are reduce-scattered into the sharded accumulator, as
DeepSpeed ZeRO-2/3 and FSDP do, so no full gradient is ever held.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from jaxlayouts.layout import DATA_AXES, ContextParallel, Layout, RunConfig
from jaxlayouts.mesh import compute_rules, sharding_context, spec, state_rules
from jaxlayouts.model.llama import Llama
from jaxlayouts.parallel.pipeline import Pipeline, storage_order

BATCH_SPEC = PartitionSpec(None, DATA_AXES, None)
"""Device batch ``[accum_steps, micro-batch rows of all shards, seq_len + 1]``."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # float32 master weights
    opt_state: Any


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


class Trainer:
    """Everything derived from a :class:`RunConfig` on a mesh: model, optimizer, shardings, step.
    ``scan_layers`` says whether the layers run as one scan (``model.llama.scanned_blocks``): the
    layout's choice, else as ``Layout.scans_layers`` decides for the platform."""

    def __init__(self, run: RunConfig, mesh, axis_rules: dict | None = None):
        self.run, self.mesh = run, mesh
        layout = run.layout
        self.dtype = jnp.dtype(run.dtype)
        self.scan_layers = layout.scans_layers(mesh.devices.flat[0].platform)
        self.model = Llama(run.model, self.dtype, layout.attention, layout.norm, layout.remat, self.scan_layers,
                           layout.context_parallel)
        # cp changes no parameter, and init's two-token sequence cannot be split over it
        self._init_model = self.model.clone(context_parallel=ContextParallel())
        self.optimizer = optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(run.learning_rate, b1=0.9, b2=0.95, weight_decay=0.1))
        self.compute_rules = compute_rules(layout, overrides=axis_rules)
        self.state_rules = state_rules(layout, overrides=axis_rules)
        # Inside the per-shard vmap of ZeRO 0/1 the batch axis is the vmapped one.
        self.replica_rules = compute_rules(layout, batch_axes=None, overrides=axis_rules)

        boxed = jax.eval_shape(self._init_model.init, jax.random.key(0), jnp.zeros((1, 2), jnp.int32))
        self.logical_axes = nn.get_partition_spec(boxed)["params"]
        zero = layout.zero_stage
        by_stage = lambda sharded: self.state_rules if sharded else self.compute_rules
        self.master_shardings = self._shardings(by_stage(zero.shards_state))
        self.grad_shardings = self._shardings(by_stage(zero.shards_gradients))
        self.compute_shardings = self._shardings(by_stage(zero.shards_weights))
        self.abstract_state = jax.eval_shape(self._init, jax.random.key(0))
        replicated = NamedSharding(mesh, PartitionSpec())
        self.state_shardings = TrainState(
            step=replicated, params=self.master_shardings,
            opt_state=optax.tree_map_params(
                self.optimizer, lambda _, sharding: sharding, self.abstract_state.opt_state,
                self.master_shardings, transform_non_params=lambda _: replicated))
        self.batch_sharding = NamedSharding(mesh, BATCH_SPEC)
        self.pipeline = None
        if layout.mesh["pp"] > 1:
            specs = lambda shardings: jax.tree.map(lambda s: s.spec, shardings)
            rules = compute_rules(layout, batch_axes=None, overrides={**(axis_rules or {}), "layers": None})
            self.pipeline = Pipeline(run, mesh, rules, specs(self.compute_shardings), specs(self.master_shardings))

    def _shardings(self, rules):
        return jax.tree.map(lambda names: NamedSharding(self.mesh, spec(tuple(names), rules)),
                            self.logical_axes, is_leaf=_is_spec)

    # -- state ---------------------------------------------------------------------------------

    def _init(self, key) -> TrainState:
        params = nn.meta.unbox(self._init_model.init(key, jnp.zeros((1, 2), jnp.int32)))["params"]
        lay = self.run.layout
        if lay.virtual_stages > 1:  # the stored layer order puts each device's chunks together
            order = storage_order(self.run.model.num_layers, lay.mesh["pp"], lay.virtual_stages)
            params["layers"] = jax.tree.map(lambda w: w[order], params["layers"])
        return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                          opt_state=self.optimizer.init(params))

    def from_layer_order(self, state: TrainState, saved: Layout) -> TrainState:
        """``state`` stored in ``saved``'s layer order (see ``pipeline.storage_order``), put into
        this layout's order: every array under a ``layers`` key is permuted on its first axis."""
        order = lambda lay: storage_order(self.run.model.num_layers, lay.mesh["pp"], lay.virtual_stages)
        saved_order, order_now = order(saved), order(self.run.layout)
        if (saved_order == order_now).all():
            return state
        position_of = np.argsort(saved_order)[order_now]
        permute = lambda path, x: x[position_of] if any(getattr(k, "key", None) == "layers" for k in path) else x
        return jax.jit(lambda s: jax.tree_util.tree_map_with_path(permute, s),
                       out_shardings=self.state_shardings)(state)

    def init_state(self) -> TrainState:
        """Parameters from ``run.seed``, created directly in their shards (never whole on one device)."""
        init = jax.jit(self._init, out_shardings=self.state_shardings)
        return init(jax.random.key(self.run.seed))

    # -- step ----------------------------------------------------------------------------------

    def loss(self, params, inputs, targets):
        """Mean next-token cross-entropy of ``inputs, targets [batch, seq_len]``."""
        logits = self.model.apply({"params": params}, inputs)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def inputs_and_targets(self, batch):
        """``batch [..., seq_len + 1]`` -> the model's inputs and their next tokens, each
        ``[..., seq_len]`` and, under context parallelism, in zigzag order (``ContextParallel.order``)."""
        inputs, targets = batch[..., :-1], batch[..., 1:]
        cp = self.run.layout.context_parallel
        if cp.mode != "none":
            order = cp.order(self.run.seq_len)
            inputs, targets = inputs[..., order], targets[..., order]
        return inputs, targets

    def gradients(self, master_params, batch):
        """Mean loss gradients (float32, laid out like the master weights) and per-micro-batch
        losses over ``batch [accum_steps, rows, seq_len + 1]``."""
        # Cast where the master copy lives, then lay out for compute: ZeRO-1/2 gather the compute
        # dtype (half of float32's bytes), once per step, outside the micro-batch loop.
        params = jax.tree.map(lambda p: p.astype(self.dtype), master_params)
        params = jax.lax.with_sharding_constraint(params, self.master_shardings)
        params = jax.lax.with_sharding_constraint(params, self.compute_shardings)
        inputs, targets = self.inputs_and_targets(batch)
        if self.pipeline is not None:
            return self.pipeline.gradients(params, inputs, targets)
        if self.run.layout.zero_stage.shards_gradients:
            return self._sharded_accumulation(params, inputs, targets)
        return self._per_shard_accumulation(params, inputs, targets)

    def step(self, state: TrainState, batch):
        """One optimizer step; returns the new state and the mean loss."""
        grads, losses = self.gradients(state.params, batch)
        grads = jax.lax.with_sharding_constraint(grads, self.master_shardings)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        new_state = TrainState(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                               opt_state=opt_state)
        return new_state, losses.mean()

    def _sharded_accumulation(self, params, inputs, targets):
        """ZeRO 2/3: reduce-scatter each micro-batch's gradients into a sharded accumulator."""
        def micro_step(acc, micro_batch):
            with sharding_context(self.mesh, self.compute_rules):
                loss, grads = jax.value_and_grad(self.loss)(params, *micro_batch)
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
            grads = jax.lax.with_sharding_constraint(grads, self.grad_shardings)
            return jax.tree.map(jnp.add, acc, grads), loss

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        zeros = jax.lax.with_sharding_constraint(zeros, self.grad_shardings)
        grads, losses = jax.lax.scan(micro_step, zeros, (inputs, targets))
        return jax.tree.map(lambda g: g / inputs.shape[0], grads), losses

    def _per_shard_accumulation(self, params, inputs, targets):
        """ZeRO 0/1: each data shard accumulates locally; one reduction per step."""
        shards = self.run.layout.data_parallel
        per_shard_sharding = jax.tree.map(
            lambda names: NamedSharding(self.mesh, PartitionSpec(DATA_AXES, *spec(tuple(names), self.compute_rules))),
            self.logical_axes, is_leaf=_is_spec)
        shard_grads = jax.vmap(jax.value_and_grad(self.loss), in_axes=(None, 0, 0),
                               spmd_axis_name=DATA_AXES)

        def micro_step(acc, micro_batch):
            by_shard = (x.reshape(shards, -1, x.shape[-1]) for x in micro_batch)
            with sharding_context(self.mesh, self.replica_rules):
                loss, grads = shard_grads(params, *by_shard)
            grads = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), acc, grads)
            return jax.lax.with_sharding_constraint(grads, per_shard_sharding), loss.mean()

        zeros = jax.tree.map(lambda p: jnp.zeros((shards, *p.shape), jnp.float32), params)
        zeros = jax.lax.with_sharding_constraint(zeros, per_shard_sharding)
        acc, losses = jax.lax.scan(micro_step, zeros, (inputs, targets))
        grads = jax.tree.map(lambda g: g.sum(0) / (shards * inputs.shape[0]), acc)
        return jax.lax.with_sharding_constraint(grads, self.master_shardings), losses

    # -- compile -------------------------------------------------------------------------------

    def abstract_batch(self) -> jax.ShapeDtypeStruct:
        run = self.run
        accum = run.grad_accum_steps
        return jax.ShapeDtypeStruct((accum, run.global_batch // accum, run.seq_len + 1), jnp.int32,
                                    sharding=self.batch_sharding)

    def abstract_state_with_shardings(self):
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract_state, self.state_shardings)

    def lower(self):
        """Lower the step on abstract inputs: nothing is allocated, any device count works."""
        step = jax.jit(self.step, donate_argnums=0,
                       out_shardings=(self.state_shardings, NamedSharding(self.mesh, PartitionSpec())))
        return step.lower(self.abstract_state_with_shardings(), self.abstract_batch())
