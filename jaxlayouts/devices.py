"""Emulated CPU devices: must be requested before JAX is imported.

When no accelerator is present, the entry points ask XLA's CPU client for as many devices as the
mesh needs (``--xla_force_host_platform_device_count=N``), so a laptop can run any layout.
"""

from __future__ import annotations

import glob
import os
import re
import sys

_COUNT_FLAG = "--xla_force_host_platform_device_count"


def accelerator_present() -> bool:
    """A best guess made without importing JAX: NVIDIA or TPU device files, or JAX_PLATFORMS."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms:
        return any(p.strip() not in ("", "cpu") for p in platforms.split(","))
    return bool(glob.glob("/dev/nvidia[0-9]*") or glob.glob("/dev/accel[0-9]*")
                or glob.glob("/dev/vfio/[0-9]*"))


def request_host_devices(count: int) -> int | None:
    """Ask for ``count`` emulated CPU devices unless an accelerator is present or the user already
    set the flag. Returns the count now in force, or None when the accelerator decides."""
    flags = os.environ.get("XLA_FLAGS", "")
    existing = re.search(_COUNT_FLAG + r"=(\d+)", flags)
    if existing:
        return int(existing[1])
    if accelerator_present():
        return None
    if "jax" in sys.modules:
        raise RuntimeError("request_host_devices must run before JAX is imported")
    os.environ["XLA_FLAGS"] = f"{flags} {_COUNT_FLAG}={count}".strip()
    # No GPU here: don't let an installed CUDA plugin (the [gpu-aot] extra) probe for a driver.
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    return count


def emulate_cluster(count: int) -> None:
    """``count`` emulated CPU devices whatever this machine has (explore and plan --verify look at
    a cluster without it); must run before JAX is imported."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:
        raise RuntimeError("emulate_cluster must run before JAX is imported")
    os.environ["XLA_FLAGS"] = (re.sub(_COUNT_FLAG + r"=\d+", "", os.environ.get("XLA_FLAGS", ""))
                               + f" {_COUNT_FLAG}={count}").strip()
