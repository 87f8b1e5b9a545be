"""Whether the installed jax-triton, triton and jax can run ``--norm triton``, and what to install.

jax-triton states which triton and jax it works with in its own requirements, and breaks outside
them: jax-triton 0.4.x (``triton>=3.7``, ``jax>=0.11``) imports ``TMA_TF32`` from
``triton.backends.nvidia.driver`` in a try block; when that fails (as it evidently does with
triton 3.6) it replaces the NVIDIA backend by a stub, and the first kernel call fails with
``AttributeError: '_Stub' object has no attribute 'backend'`` (seen on the H200 image: jax 0.11.2,
triton 3.6.0, jax-triton 0.4.1). jax-triton 0.3.1 is the last release for triton 3.6
(``triton>=3.6``, ``jax>=0.8.2``): the one to install beside a triton 3.6 that another package
(e.g. torch) holds in place. This module checks the installed versions against jax-triton's
declared requirements (read with ``importlib.metadata``) before any import, so a mismatch is a
clear message instead of an AttributeError deep in a trace.
"""

from __future__ import annotations

import importlib.metadata

from packaging.requirements import Requirement
from packaging.version import Version

RELEASES = "jax-triton 0.3.1 needs triton>=3.6 and jax>=0.8.2; jax-triton 0.4 needs triton>=3.7 and jax>=0.11"
"""What each recent jax-triton release declares (0.3.1 is the last one for triton 3.6)."""

CHECKED = ("jax", "triton")
"""jax-triton's requirements that decide whether its kernel calls work."""


def installed(names=("jax", "jax-triton", "triton")) -> dict[str, str | None]:
    """Installed version of each distribution (``None`` if absent)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def unavailable_reason() -> str | None:
    """Why ``--norm triton`` cannot run with the installed packages, naming their versions and
    what to install; ``None`` when jax-triton's requirements on jax and triton are met."""
    versions = installed()
    missing = [name for name in ("jax-triton", "triton") if versions[name] is None]
    if missing:
        return (f"triton needs the optional packages {' and '.join(missing)} (not installed): "
                "pip install 'jaxlayouts[gpu]' (or use --norm pallas)")
    unmet = []
    for line in importlib.metadata.requires("jax-triton") or ():
        requirement = Requirement(line)
        if requirement.name not in CHECKED or (requirement.marker and not requirement.marker.evaluate({"extra": ""})):
            continue
        if not requirement.specifier.contains(Version(versions[requirement.name]), prereleases=True):
            unmet.append(f"{requirement.name}{requirement.specifier} (installed: {versions[requirement.name]})")
    if not unmet:
        return None
    return (f"triton: jax-triton {versions['jax-triton']} needs {', '.join(unmet)}; install a matching "
            f"set ({RELEASES}): e.g. pip install 'jax-triton==0.3.1' to keep triton 3.6, "
            "or pip install 'triton>=3.7' (or use --norm pallas)")
