"""Peer baselines: the same training step written the plain way in another framework, measured
side by side by the GPU kit. Never imported by the package itself; each peer imports its own
framework, which the package does not depend on."""
