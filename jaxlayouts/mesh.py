"""Device meshes and the rules that turn logical axis names into PartitionSpecs.

Every parameter and activation in the model carries *logical* axis names (``embed``, ``heads``,
``batch``, ...). A rule table maps each name to mesh axes. Two functions here build the tables,
the idea of haliax's "parameter" vs "compute" mappings:

* ``compute_rules``: how tensors are laid out while a layer computes (Megatron TP: heads and FFN
  columns on ``tp``; the batch on ``dp`` x ``fsdp``; with context parallelism every sequence axis
  on ``cp``; with sequence parallelism the residual stream's sequence axis also on ``tp``).
* ``state_rules``: how stored state is laid out: the compute rules plus ``embed -> fsdp``, which is
  the ZeRO shard. Which pieces of state use it depends on the ZeRO stage (see ``train.py``).

The trainer (``train.py``) builds four tables from them: the compute and state rules, the replica
rules (``compute_rules`` with ``batch_axes=None``: inside the per-shard ``vmap`` of ZeRO 0/1 the
batch axis is the vmapped one) and, when pp > 1, the pipeline's rules (the same, with ``layers``
unmapped, for inside its ``shard_map``).

Read the tables with ``print(format_rules(compute_rules(layout)))``; override entries with
``overrides`` (``{"vocab": None}`` keeps the vocabulary unsharded); the bench's ``--axis_rules``.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxlayouts import distributed
from jaxlayouts.kernels import compiling_for
from jaxlayouts.layout import DATA_AXES, MESH_AXES, InvalidInput, Layout

Rules = tuple[tuple[str, object], ...]
"""(logical name, mesh axis | tuple of mesh axes | None) pairs."""


def build_mesh(layout: Layout, devices=None) -> Mesh:
    """A mesh with axes ``dp, fsdp, cp, tp, pp`` (classic GSPMD propagation: ``AxisType.Auto``).
    When the devices span several processes (nodes), each process holds a block of the inner
    axes, so ``tp`` stays inside a node (see ``distributed.split_over_nodes``)."""
    shape = tuple(layout.mesh[a] for a in MESH_AXES)
    devices = list(devices) if devices is not None else jax.devices()
    if len(devices) != layout.num_devices:
        raise InvalidInput("mesh", f"the layout needs {layout.num_devices} devices, {len(devices)} given")
    axis_types = (AxisType.Auto,) * len(MESH_AXES)
    if len({d.process_index for d in devices}) > 1:
        return Mesh(distributed.hybrid_devices(layout, devices), MESH_AXES, axis_types=axis_types)
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)


def compute_rules(layout: Layout, *, batch_axes=DATA_AXES, overrides: dict | None = None) -> Rules:
    """Megatron-style tensor parallelism plus data parallelism over ``batch_axes``."""
    rules = {
        "layers": "pp",
        "vocab": "tp",
        "embed": None,
        "heads": "tp",
        "kv_heads": "tp",
        "head_dim": None,
        "mlp": "tp",
        "batch": batch_axes,
        "act_seq": _sequence_axes(layout, inside_layer=False),
        "seq": _sequence_axes(layout, inside_layer=True),
        "act_embed": None,
        "act_heads": "tp",
        "act_mlp": "tp",
        "act_vocab": "tp",
    }
    rules.update(overrides or {})
    return tuple(rules.items())


def _sequence_axes(layout: Layout, inside_layer: bool):
    """Mesh axes of the sequence: ``cp`` everywhere under context parallelism (two chunks per
    device, see ``model/ring_attention.py``), and for the residual stream (not a layer's
    input) also ``tp`` under sequence parallelism."""
    axes = ("cp",) if layout.mesh["cp"] > 1 else ()
    if layout.sequence_parallel and not inside_layer:
        axes += ("tp",)
    return None if not axes else axes[0] if len(axes) == 1 else axes


def state_rules(layout: Layout, *, overrides: dict | None = None) -> Rules:
    """Compute rules with the model dimension sharded over ``fsdp`` (the ZeRO shard)."""
    return tuple((name, "fsdp" if name == "embed" else axes)
                 for name, axes in compute_rules(layout, overrides=overrides))


def spec(logical: tuple, rules: Rules) -> PartitionSpec:
    """PartitionSpec for a tuple of logical names. A mesh axis is used at most once (the first
    name that asks for it gets it); names missing from the table stay unsharded."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in logical:
        axes = table.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
        axes = tuple(a for a in axes if a not in used)
        used.update(axes)
        out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def format_rules(rules: Rules) -> str:
    return "\n".join(f"  {name:>10} -> {axes}" for name, axes in rules)


# ---------------------------------------------------------------------------------------------
# Activation constraints inside the model

_CONTEXT: contextvars.ContextVar = contextvars.ContextVar("jaxlayouts_sharding", default=None)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: Rules):
    """While tracing the model, make :func:`constrain` lay tensors out with ``rules`` on ``mesh``,
    and build kernels for the mesh's devices (``kernels.compiling_for``)."""
    token = _CONTEXT.set((mesh, rules))
    try:
        with compiling_for(mesh.devices.flat[0]):
            yield
    finally:
        _CONTEXT.reset(token)


def constrain(x, logical: tuple):
    """``with_sharding_constraint`` by logical names; a no-op outside :func:`sharding_context`."""
    context = _CONTEXT.get()
    if context is None:
        return x
    mesh, rules = context
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec(logical, rules)))


def per_shard(fn, in_axes: tuple, out_axes: tuple):
    """Run ``fn`` on each device's shard (``shard_map``), inputs and output laid out by logical
    names; ``fn`` itself unchanged outside :func:`sharding_context`. For kernels (Pallas, Triton,
    cuDNN) that XLA's partitioner cannot split: it would otherwise gather their inputs. Inside a
    region already manual over some axes (the pipeline), it maps over the remaining ones."""
    context = _CONTEXT.get()
    if context is None:
        return fn
    mesh, rules = context
    manual = set(getattr(jax.sharding.get_abstract_mesh(), "manual_axes", ()))
    if manual:
        mesh = jax.sharding.get_abstract_mesh()
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(spec(a, rules) for a in in_axes),
                         out_specs=spec(out_axes, rules), axis_names=set(mesh.axis_names) - manual,
                         check_vma=False)
