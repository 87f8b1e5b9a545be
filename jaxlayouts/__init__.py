"""jaxlayouts: parallelization layouts for LLaMA training in JAX, measured and explained.

Importing the package does not import JAX: entry points first request emulated CPU devices
(``jaxlayouts.devices``), which must happen before JAX starts.
"""
