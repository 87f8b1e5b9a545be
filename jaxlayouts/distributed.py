"""Multi-process runs on JAX's own distributed runtime, and meshes that respect node boundaries.

A run is multi-process when it is given a coordinator (flags ``--coordinator_address``,
``--num_processes``, ``--process_id``, or the same as ``JAXLAYOUTS_*`` environment variables,
which ``launch/local.sh`` sets) or when it runs as several SLURM tasks (``jax.distributed``
detects SLURM itself). Otherwise it stays single-process and nothing here does anything.

On CPU the collectives go through gloo. Timeouts are short and explicit, so a dead peer or an
unreachable coordinator ends the run with an error instead of a hang: initialisation gives up
after ``init_timeout_s``, and a process whose peers stop sending heartbeats for
``heartbeat_timeout_s`` is terminated by the runtime. JAX is imported inside the functions: the
bench imports this module before it has asked for its devices.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys

import numpy as np

from jaxlayouts.layout import MESH_AXES, Layout

ENV_PREFIX = "JAXLAYOUTS_"
ACROSS_NODES_PREFERENCE = ("dp", "pp", "fsdp", "cp", "tp")
"""Which axes span processes (nodes) first: data replicas and pipeline stages communicate least
per byte of compute; the cp ring passes K/V once per layer and overlaps it with attention;
tensor parallelism communicates most, so it stays inside a node whenever it can."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    coordinator_address: str | None = None
    num_processes: int = 1
    process_id: int = 0
    slurm: bool = False

    @property
    def multi_process(self) -> bool:
        return self.num_processes > 1


def detect(coordinator_address=None, num_processes=None, process_id=None) -> Cluster:
    """The cluster this process belongs to, from flags, then JAXLAYOUTS_* variables, then SLURM."""
    env = lambda name: os.environ.get(ENV_PREFIX + name)
    address = coordinator_address or env("COORDINATOR_ADDRESS")
    count = num_processes or (int(env("NUM_PROCESSES")) if env("NUM_PROCESSES") else None)
    index = process_id if process_id is not None else (int(env("PROCESS_ID")) if env("PROCESS_ID") else None)
    if address or count:
        if not (address and count and index is not None):
            raise ValueError("a multi-process run needs all of --coordinator_address, --num_processes "
                             "and --process_id (or the JAXLAYOUTS_* variables); e.g. use launch/local.sh")
        check_address(address)
        if not 0 <= index < count:
            raise ValueError(f"process {index} of {count}: --process_id runs from 0 to --num_processes - 1")
        return Cluster(address, count, index)
    tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    if "SLURM_JOB_ID" in os.environ and tasks > 1:
        return Cluster(None, tasks, int(os.environ.get("SLURM_PROCID", "0")), slurm=True)
    return Cluster()


def check_address(address: str) -> None:
    """``host:port`` (a name, an IPv4 address or a bracketed IPv6 one; port 1-65535), else ValueError."""
    host, sep, port = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if (not sep or not host or any(c.isspace() for c in address) or not (port.isascii() and port.isdigit())
            or not 0 < int(port[:6]) < 65536 or (":" in host and not bracketed)):
        raise ValueError(f"{address[:80]!r} is not host:port (port 1-65535); e.g. 127.0.0.1:12345")


def initialize(cluster: Cluster, *, cpu: bool, init_timeout_s: int = 120, heartbeat_timeout_s: int = 30):
    """Start ``jax.distributed`` for a multi-process cluster (no-op for a single process)."""
    if not cluster.multi_process:
        return
    import jax

    if cpu:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {} if cluster.slurm else {"coordinator_address": cluster.coordinator_address,
                                       "num_processes": cluster.num_processes,
                                       "process_id": cluster.process_id}
    jax.distributed.initialize(**kwargs, initialization_timeout=init_timeout_s,
                               heartbeat_timeout_seconds=heartbeat_timeout_s)


def split_over_nodes(mesh: dict, num_nodes: int) -> tuple[dict, dict]:
    """Per-axis (inside-node, across-node) degrees of ``mesh`` (axis -> size): node boundaries go
    to the axes of ``ACROSS_NODES_PREFERENCE`` first. Raises if it cannot be split evenly."""
    across = {axis: 1 for axis in MESH_AXES}
    remaining = num_nodes
    for axis in ACROSS_NODES_PREFERENCE:
        share = math.gcd(mesh[axis], remaining)
        across[axis], remaining = share, remaining // share
    if remaining != 1:
        raise ValueError(f"cannot split {mesh} over {num_nodes} processes evenly")
    inside = {axis: mesh[axis] // across[axis] for axis in MESH_AXES}
    return inside, across


def hybrid_devices(layout: Layout, devices) -> np.ndarray:
    """Devices in mesh shape with each process's devices in one block of the inner axes
    (``mesh_utils.create_hybrid_device_mesh`` with the process as the unit of locality)."""
    from jax.experimental import mesh_utils

    processes = len({d.process_index for d in devices})
    inside, across = split_over_nodes(layout.mesh, processes)
    return mesh_utils.create_hybrid_device_mesh(
        [inside[a] for a in MESH_AXES], [across[a] for a in MESH_AXES], devices, process_is_granule=True)


def describe_topology(layout: Layout, num_nodes: int) -> str:
    """One line saying which axes stay inside a node and which cross nodes; warns when tp crosses."""
    inside, across = split_over_nodes(layout.mesh, num_nodes)
    parts = [f"{axis}={layout.mesh[axis]}" + (f" ({across[axis]} across x {inside[axis]} inside)"
                                              if across[axis] > 1 else "") for axis in MESH_AXES]
    text = f"mesh over {num_nodes} processes: " + ", ".join(parts)
    if across["tp"] > 1:
        text += ("\nWARNING: tp crosses process (node) boundaries; its per-layer collectives will run "
                 "over the slower inter-node network. Put more devices on dp/fsdp/pp or use a smaller tp.")
    return text


def barrier(name: str, timeout_s: int = 600):
    """Wait until every process reaches ``name`` (a no-op for one process). Uses the coordination
    service's barrier, not a collective: gloo gives peers only 30 s to join a collective, and on a
    small machine one process can still be compiling when another starts the first step."""
    import jax

    if jax.process_count() == 1:
        return
    try:
        from jax._src import distributed as jax_distributed  # the runtime client, as orbax uses it
        client = jax_distributed.global_state.client
    except (ImportError, AttributeError):
        client = None
    if client is None:  # a JAX without that client: fall back to a (collective) barrier
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(name, timeout_s * 1000)


def log_once(message: str):
    """Print from process 0 only."""
    if "jax" not in sys.modules or sys.modules["jax"].process_index() == 0:
        print(message, file=sys.stderr, flush=True)
