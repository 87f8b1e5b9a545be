"""The one formatter of byte sizes for people: binary units up to PiB."""

from __future__ import annotations

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def bytes_text(num_bytes: float | None) -> str:
    """``num_bytes`` in the largest binary unit it fills, 4 significant digits: ``20.65 TiB``,
    ``512 B``; ``n/a`` for None."""
    if num_bytes is None:
        return "n/a"
    value, unit = float(num_bytes), UNITS[0]
    for unit in UNITS:
        if abs(value) < 1024 or unit == UNITS[-1]:
            break
        value /= 1024
    return f"{value:.4g} {unit}"
