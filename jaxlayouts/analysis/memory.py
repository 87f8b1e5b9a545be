"""Per-device memory of a compiled step, from XLA's own memory analysis: the one place the
compiled peak is computed (the bench, explore and the planner's cross-checks read it here)."""

from __future__ import annotations


def compiled_memory(compiled) -> dict:
    """Per-device bytes from XLA's memory analysis of the compiled step; peak = arguments +
    outputs - donated (aliased) + temporaries."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {"compiled_peak_bytes_per_device": None}
    peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)
    return {"compiled_peak_bytes_per_device": peak, "argument_bytes": stats.argument_size_in_bytes,
            "output_bytes": stats.output_size_in_bytes, "alias_bytes": stats.alias_size_in_bytes,
            "temp_bytes": stats.temp_size_in_bytes}
