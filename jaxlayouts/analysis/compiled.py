"""A run's training step compiled ahead of time, and what XLA planned for it: per-device memory
(``analysis/memory.py``) and every collective with the mesh axes it spans (``analysis/hlo.py``).
``explore`` builds its report on this, and the planner's ``--verify`` checks its picks with it;
both sit above this module, which imports neither.

The devices decide the compiler: emulated CPU devices give XLA:CPU's program, a deviceless GPU
topology (``targets.devices``) XLA:GPU's. XLA's CPU client compiles for at most
:data:`XLA_CPU_DEVICE_LIMIT` devices in one process. A larger layout is compiled there with fewer
data-parallel replicas (``dp``) and the global batch cut in the same proportion
(:func:`compiled_run`): every device holds and does exactly what it would in the full layout, so
per-device memory, shardings and collective sizes are the full layout's. A GPU topology has no
such limit, and every layout is compiled whole.

JAX is imported inside :func:`compile_step`: the emulated devices must be arranged
(``devices.emulate_cluster``) before JAX starts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import warnings

from jaxlayouts.analysis import hlo
from jaxlayouts.analysis.memory import compiled_memory
from jaxlayouts.layout import Layout, RunConfig, mesh_text, validate
from jaxlayouts.schema import InvalidInput

XLA_CPU_DEVICE_LIMIT = 2048
"""The most devices XLA's CPU client compiles for in one process (beyond it: "Multiprocess
computations aren't implemented on the CPU backend"; seen with jax 0.10.2)."""


def compiled_run(run: RunConfig) -> tuple[RunConfig, str | None]:
    """The run to compile (the run itself, or one with fewer ``dp`` replicas when it needs more
    devices than XLA:CPU compiles for) and a note saying which."""
    count, dp = run.layout.num_devices, run.layout.mesh["dp"]
    if count <= XLA_CPU_DEVICE_LIMIT:
        return run, None
    for k in range(2, dp + 1):
        if dp % k == 0 and count // k <= XLA_CPU_DEVICE_LIMIT and run.global_batch % k == 0:
            lay = dataclasses.replace(run.layout, mesh={**run.layout.mesh, "dp": dp // k})
            smaller = dataclasses.replace(run, layout=lay, global_batch=run.global_batch // k)
            return smaller, (f"compiled as {mesh_text(lay.mesh)} with global batch {smaller.global_batch} "
                             f"(XLA:CPU compiles at most {XLA_CPU_DEVICE_LIMIT} devices): each device holds and "
                             f"does what it would in the full {count}-device layout; only the dp groups are "
                             f"{k}x smaller")
    most = math.prod(v for a, v in run.layout.mesh.items() if a != "dp")
    raise InvalidInput("mesh", f"{mesh_text(run.layout.mesh)}: XLA:CPU compiles at most {XLA_CPU_DEVICE_LIMIT} "
                       f"devices, and explore can stand fewer dp replicas in only when the other axes use at "
                       f"most that many (these use {most}); plan --explain costs any size")


@dataclasses.dataclass
class CompiledStep:
    """One run's step as compiled: ``run`` is what was compiled (see :func:`compiled_run`),
    ``note`` says so when it differs from the run asked for."""

    run: RunConfig
    note: str | None
    trainer: object         # train.Trainer
    compiled: object        # jax.stages.Compiled
    backend: str            # the platform it was compiled for: cpu (emulated) or gpu
    device_kind: str        # e.g. "cpu", "NVIDIA H100 80GB HBM3"

    @functools.cached_property
    def hlo_text(self) -> str:
        """The optimized HLO module of the step, as the compiler will run it."""
        return self.compiled.as_text()

    @functools.cached_property
    def memory(self) -> dict:
        """XLA's per-device memory analysis (:func:`analysis.memory.compiled_memory`)."""
        return compiled_memory(self.compiled)

    @functools.cached_property
    def collectives(self) -> list[hlo.Collective]:
        """Every collective of the compiled step over at least two devices, with its mesh axes
        and executions per step."""
        return [c for c in hlo.collectives(self.hlo_text, dict(self.trainer.mesh.shape)) if c.axes]


def compile_step(run: RunConfig, devices_=None) -> CompiledStep:
    """Validate ``run`` and compile its training step ahead of time on ``devices_`` (default: the
    first devices JAX has; they only need to exist, nothing is allocated). CPU devices compile
    :func:`compiled_run`'s run; GPU devices (a deviceless topology, ``targets.devices``) the run
    itself, and need one device per device of the layout."""
    import jax

    from jaxlayouts.mesh import build_mesh
    from jaxlayouts.train import Trainer

    validate(run, run.layout.num_devices)
    devices_ = list(devices_ if devices_ is not None else jax.devices())
    backend = devices_[0].platform
    target, note = compiled_run(run) if backend == "cpu" else (run, None)
    mesh = build_mesh(target.layout, devices_[:target.layout.num_devices])
    trainer = Trainer(target, mesh)
    with _deviceless_cache_warnings_off(backend != "cpu"):
        compiled = trainer.lower().compile()
    return CompiledStep(target, note, trainer, compiled, backend, devices_[0].device_kind)


@contextlib.contextmanager
def _deviceless_cache_warnings_off(deviceless: bool):
    """A deviceless executable cannot be loaded back from JAX's persistent compilation cache (there
    is no client to load it into): JAX then warns and compiles again, which is what we want."""
    with warnings.catch_warnings():
        if deviceless:
            warnings.filterwarnings("ignore", "Error reading persistent compilation cache entry")
        yield


def which_figure_to_trust(layout: Layout, backend: str) -> str:
    """Whether XLA's compiled peak or the analytic model is the better guide for ``layout``."""
    if backend != "cpu":
        return ("Trust the XLA:GPU figure: it is the GPU compiler's own buffer assignment for this step (on the "
                "H200 rows of docs/deviceless.md: median error 0.5%, max 1.1% against the device's peak). Its caveats: "
                "nothing is autotuned (GEMM workspaces may differ), it is this jaxlib's compiler (the cluster's "
                "may differ), and runtime buffers outside the program (CUDA context, NCCL, cuBLAS workspace; "
                "the analytic overhead term) come on top.")
    if layout.zero_stage.shards_state or layout.sequence_parallel:
        return ("XLA:CPU lowers every reduce-scatter to a full-size all-reduce plus a slice (the compiled "
                "HLO has no reduce-scatter), so its temporaries hold full-size buffers a GPU does not: "
                "here the compiled peak is an upper bound, and the analytic figure is the better guide. "
                "Compile for the GPU (--target h100-80gb) for the figure to trust.")
    return ("XLA:CPU's compiled figure is an upper bound: it plans buffers for a CPU (float32 dots, its own "
            "fusions), not for a GPU. Compile for the GPU (--target h100-80gb) for the figure to trust.")
