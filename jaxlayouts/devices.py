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


PLATFORMS = ("cpu", "cuda", "gpu", "rocm", "tpu", "metal")
"""The names JAX_PLATFORMS may hold."""
_XLA_FLAG = re.compile(r"--[A-Za-z][A-Za-z0-9_]*(=\S*)?")


def check_environment() -> str | None:
    """What is wrong with JAX_PLATFORMS or XLA_FLAGS, found before JAX starts (XLA aborts the
    process on a malformed XLA_FLAGS, with no chance to report), as ``"VARIABLE: problem; fix"``;
    None when nothing is. An unknown flag name is found by a short probe in a child process."""
    platforms = [p.strip() for p in os.environ.get("JAX_PLATFORMS", "").split(",") if p.strip()]
    unknown = [p for p in platforms if p not in PLATFORMS]
    if unknown:
        return (f"JAX_PLATFORMS: {', '.join(map(repr, unknown))} is not a platform; use some of "
                f"{', '.join(PLATFORMS)}, e.g. JAX_PLATFORMS=cpu, or unset it")
    tokens = os.environ.get("XLA_FLAGS", "").split()
    bad = [t for t in tokens if not _XLA_FLAG.fullmatch(t)]
    if bad:
        return (f"XLA_FLAGS: {bad[0][:60]!r} is not --name=value (XLA would read it as a file of flags "
                f"and abort); e.g. XLA_FLAGS={_COUNT_FLAG}=8")
    others = [t for t in tokens if not t.startswith(_COUNT_FLAG + "=")]
    if others:
        return _probe_xla_flags()
    return None


def _probe_xla_flags() -> str | None:
    """Start XLA's CPU client in a child with this XLA_FLAGS: an unknown flag aborts it there."""
    import subprocess
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = re.sub(_COUNT_FLAG + r"=\d+", "", env.get("XLA_FLAGS", "")).strip()
    try:
        proc = subprocess.run([sys.executable, "-c", "import jax; jax.devices('cpu')"], env=env,
                              capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None  # the run itself will tell
    if proc.returncode == 0:
        return None
    unknown = re.search(r"Unknown flags? in XLA_FLAGS: (.*)", proc.stderr)
    cause = unknown[1].strip() if unknown else (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return f"XLA_FLAGS: XLA refuses {cause[:200]!r}; remove it or correct its name"


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
