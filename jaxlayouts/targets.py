"""Where a step is compiled: XLA:CPU on emulated devices, or XLA:GPU for a named hardware without
any GPU (a deviceless, ahead-of-time compile).

JAX compiles for an NVIDIA GPU on a CPU-only machine when the CUDA plugin of its own version is
installed (``pip install -e '.[gpu-aot]'``) and JAX starts with ``JAX_PLATFORMS=cpu`` (else the
plugin looks for a driver and fails). ``jax.experimental.topologies.get_topology_desc`` then gives
devices of a cluster of ``hosts x GPUs per host``, described by a ``GpuTargetConfigProto``
(``configs/hardware/targets/NAME.txtpb``, named by the hardware file's ``gpu_target``). The step
compiled for them is XLA:GPU's own program: its buffer assignment (memory), its collectives
(reduce-scatters, async pairs, combined collectives) and our Pallas kernels as Triton kernels.
On the llama-1b rows measured on one H200, this compile's peak was within 1.1% of the device's
(``docs/deviceless.md``).

What a deviceless compile does not see: no autotuning (GEMMs get default tiles), the compiler is
this jaxlib's (the cluster's may differ), and runtime buffers outside XLA's program (CUDA
context, NCCL, cuBLAS workspace) are not in its peak.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import re
import sys

from jaxlayouts import devices as emulated
from jaxlayouts.kernels.triton_versions import installed
from jaxlayouts.layout import CONFIG_DIR
from jaxlayouts.plan.hardware import Hardware, hardware_names, load_hardware
from jaxlayouts.schema import InvalidInput

CPU = "cpu"
TARGET_DIR = CONFIG_DIR / "hardware" / "targets"
INSTALL = "pip install -e '.[gpu-aot]'"
"""The extra that brings the CUDA compiler plugin of jax's version and cuDNN (about 2.7 GB)."""
PLUGINS = ("jax-cuda12-plugin", "jax-cuda13-plugin")
"""The CUDA compiler plugins of JAX, either of which compiles for a GPU target."""


@dataclasses.dataclass(frozen=True)
class Target:
    """A compile target: ``cpu`` (XLA:CPU, emulated devices) or a hardware with a GPU target."""

    name: str
    hardware: Hardware | None = None  # None for cpu

    @property
    def is_gpu(self) -> bool:
        return self.hardware is not None

    @property
    def description(self) -> str:
        """The ``GpuTargetConfigProto`` text of one device."""
        return (TARGET_DIR / f"{self.hardware.gpu_target}.txtpb").read_text()

    @property
    def device_kind(self) -> str:
        """The device kind the description names (what ``jax.devices()[0].device_kind`` says)."""
        return re.search(r'device_description_str:\s*"([^"]*)"', self.description)[1]

    def topology(self, count: int) -> str:
        """``1 x hosts x GPUs per host`` for ``count`` GPUs, ``gpus_per_node`` per host (as the
        launcher places processes); fewer than a node's GPUs sit on one host."""
        per_host = min(count, self.hardware.gpus_per_node)
        if count % per_host:
            raise InvalidInput("mesh", f"{count} devices do not fill whole {self.name} nodes of "
                               f"{per_host} GPUs; use a multiple of {per_host}")
        return f"1x{count // per_host}x{per_host}"


def gpu_targets() -> list[str]:
    """Hardware names that have a GPU target description."""
    return [n for n in hardware_names() if load_hardware(n).gpu_target]


def resolve(name: str) -> Target:
    """The target ``name`` (``cpu`` or a hardware file with a ``gpu_target``), checked."""
    if name == CPU:
        return Target(CPU)
    if name not in hardware_names() and not name.endswith((".yaml", ".yml")):
        raise InvalidInput("target", f"unknown target {name!r}; choose cpu or one of {', '.join(gpu_targets())}")
    hardware = load_hardware(name)
    if not hardware.gpu_target:
        raise InvalidInput("target", f"hardware {hardware.name!r} names no gpu_target description; choose cpu "
                           f"or one of {', '.join(gpu_targets())}")
    if not (TARGET_DIR / f"{hardware.gpu_target}.txtpb").is_file():
        raise InvalidInput("target", f"hardware {hardware.name!r}: gpu_target {hardware.gpu_target!r} has no file "
                           f"{TARGET_DIR / hardware.gpu_target}.txtpb")
    return Target(hardware.name, hardware)


def matching(device_kind: str) -> str | None:
    """The GPU target whose description names ``device_kind`` (a bench row's), if any."""
    return next((n for n in gpu_targets() if resolve(n).device_kind == device_kind), None)


def check_compiler() -> None:
    """Refuse a GPU target, naming the install line, unless a CUDA plugin of jax's own version is
    installed (the extra's CUDA 12 one, or a GPU machine's CUDA 13 one; another version's plugin
    does not load)."""
    jax_version = importlib.metadata.version("jax")
    plugins = {name: v for name, v in installed(PLUGINS).items() if v}
    if jax_version not in plugins.values():
        found = (", ".join(f"{n} {v}" for n, v in plugins.items()) + " installed") if plugins else "it is not installed"
        raise InvalidInput("target", f"a GPU target compiles with XLA:GPU, which needs the CUDA compiler plugin "
                           f"of jax {jax_version} ({found}; no GPU is needed): {INSTALL} (about 2.7 GB), "
                           f"or use --target cpu")


def prepare(target: Target, count: int) -> None:
    """Before JAX starts: ``count`` emulated CPU devices for XLA:CPU; for a GPU target, the CPU
    platform only (the plugin then serves topologies without probing for a driver)."""
    if target.is_gpu:
        check_compiler()
    if "jax" not in sys.modules:
        emulated.emulate_cluster(1 if target.is_gpu else count)


def devices(target: Target, count: int) -> list:
    """``count`` devices of ``target`` to compile for (nothing is allocated on them). For a GPU
    target they belong to ``count / gpus_per_node`` processes, as on the cluster."""
    import jax

    if not target.is_gpu:
        return jax.devices()[:count]
    from jax.experimental import topologies

    if os.environ.get("JAX_PLATFORMS", "") != CPU:
        raise InvalidInput("target", "a GPU target needs JAX started with JAX_PLATFORMS=cpu (set it before "
                           "importing JAX, or call explore.layout before anything imports JAX)")
    return list(topologies.get_topology_desc(platform="cuda", topology=target.topology(count),
                                             target_config=target.description).devices)
