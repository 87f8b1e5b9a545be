"""What this machine's JAX runs on, in a few lines: is the GPU install working?

    python -m jaxlayouts.gpu_info            # text
    python -m jaxlayouts.gpu_info --json     # one JSON object

Prints the platform, the devices with their kind and memory (JAX's ``memory_stats()`` where the
device has them, else the hardware file's HBM, marked as such), the JAX, jaxlib and plugin
versions, the allocator's memory fraction, and whether each of our kernels can run here: the Triton
RMSNorm (an NVIDIA GPU and a matching jax-triton/triton pair), cuDNN attention (an NVIDIA GPU),
the Pallas kernels (Triton on an NVIDIA GPU, interpret mode on a CPU). Exit code 0 when it ran,
1 when JAX could not start its backend. The long GPU measurement is ``python -m jaxlayouts.gpu_check``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from jaxlayouts import devices as emulated
from jaxlayouts.gpu_check import versions
from jaxlayouts.kernels import triton_versions
from jaxlayouts.plan.hardware import MEMORY_FRACTION_VARIABLES, allocator_fraction, load_hardware

GPU_PLATFORMS = ("gpu", "cuda")
CUDNN = ("nvidia-cudnn-cu12", "nvidia-cudnn-cu13")
SHOWN = ("jax", "jaxlib", "jax-triton", "triton", "python", "driver") + CUDNN
"""The versions printed (with every jax-cuda plugin): what decides whether our kernels run."""
CPU_MEANING = ("no GPU: JAX runs on this CPU. bench emulates a mesh's devices on it (timings are CPU "
               "timings, not a GPU's); cuDNN attention and the Triton norm cannot run; the Pallas kernels run "
               "in interpret mode (correct, slow); explore --target h100-80gb and plan --verify still compile "
               "for GPUs without one (the [gpu-aot] extra). For a GPU: pip install -e '.[cuda]' on a GPU node.")


def memory(device) -> dict:
    """The device's memory: JAX's ``memory_stats()`` limit, else its hardware file's HBM (on a GPU
    kind a target names) or this host's memory (a CPU), each with its source."""
    stats = device.memory_stats() or {}
    if stats.get("bytes_limit"):
        return {"bytes": stats["bytes_limit"], "source": "memory_stats bytes_limit (what JAX's allocator may use)"}
    if device.platform == "cpu":
        from jaxlayouts.bench import host_bytes
        return {"bytes": host_bytes(), "source": "host memory, shared by all CPU devices; a CPU has no memory_stats"}
    from jaxlayouts.targets import matching
    name = matching(device.device_kind)
    if name:
        return {"bytes": load_hardware(name).hbm_bytes, "source": f"HBM of configs/hardware/{name}.yaml, not measured"}
    return {"bytes": None, "source": "unknown: no memory_stats and no hardware file names this device kind"}


def kernels(platform: str) -> dict:
    """For each kernel family, whether it can run on ``platform`` and why (not)."""
    gpu = platform in GPU_PLATFORMS
    triton = triton_versions.unavailable_reason()
    return {
        "norm=triton": (f"no: {triton}" if triton else "yes (jax-triton)") if gpu else
        f"no: needs an NVIDIA GPU (platform is {platform}); use --norm pallas or xla",
        "attention=cudnn": "yes (cuDNN flash attention through XLA)" if gpu else
        f"no: needs an NVIDIA GPU with cuDNN (platform is {platform}); use --attention pallas or xla",
        "pallas (attention, norm)": "yes, compiled by Triton" if gpu else
        "interpret mode only (correct, slow: for tests, not for timing)",
    }


def info() -> dict:
    """Devices, versions, memory fraction and kernels, as one object (starts JAX)."""
    import jax

    devices = jax.devices()
    platform = devices[0].platform
    found = {**versions(), **triton_versions.installed(CUDNN)}
    found = {k: v for k, v in found.items() if v is not None and (k in SHOWN or k.startswith("jax-cuda"))}
    set_by = next((n for n in MEMORY_FRACTION_VARIABLES if os.environ.get(n)), None)
    return {"platform": platform, "device_count": len(devices), "process_count": jax.process_count(),
            "devices": [{"id": d.id, "kind": d.device_kind, "platform": d.platform,
                         "compute_capability": getattr(d, "compute_capability", None), "memory": memory(d)}
                        for d in devices],
            "versions": found,
            "memory_fraction": None if platform == "cpu" else allocator_fraction(),
            "memory_fraction_set_by": set_by or ("JAX's default" if platform != "cpu" else None),
            "kernels": kernels(platform),
            "meaning": CPU_MEANING if platform == "cpu" else None}


def text(result: dict) -> str:
    gib = lambda b: f"{b / 2**30:.1f} GiB" if b else "unknown"
    lines = [f"platform    {result['platform']}: {result['device_count']} device(s), "
             f"{result['process_count']} process(es)"]
    if result["meaning"]:
        lines.append(f"            {result['meaning']}")
    for d in result["devices"][:8]:
        cc = f", compute capability {d['compute_capability']}" if d["compute_capability"] else ""
        lines.append(f"device {d['id']:<4} {d['kind']}{cc}: {gib(d['memory']['bytes'])} ({d['memory']['source']})")
    if len(result["devices"]) > 8:
        lines.append(f"            ... and {len(result['devices']) - 8} more of the same kind")
    lines.append("versions    " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()))
    if result["memory_fraction"] is not None:
        lines.append(f"allocator   memory_fraction {result['memory_fraction']:g} ({result['memory_fraction_set_by']}); "
                     "plan and explore assume the hardware file's (launch/slurm.sbatch exports it)")
    lines.append("kernels")
    lines += [f"  {name:<26} {verdict}" for name, verdict in result["kernels"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxlayouts.gpu_info", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not os.environ.get("JAX_PLATFORMS") and not emulated.accelerator_present():
        os.environ["JAX_PLATFORMS"] = "cpu"  # no NVIDIA device files: keep an installed CUDA plugin quiet
    try:
        result = info()
    except RuntimeError as error:  # JAX could not start a backend (a driver/plugin mismatch, a busy GPU)
        print(f"JAX could not start: {error}\nno NVIDIA device files (/dev/nvidia*) means no GPU here; on a GPU "
              "node, check nvidia-smi and pip install -e '.[cuda]'", file=sys.stderr)
        return 1
    print(json.dumps(result) if args.json else text(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
