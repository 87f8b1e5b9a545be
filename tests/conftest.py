"""Tests run on 8 emulated CPU devices in float32, so that layouts can be compared exactly."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

from jaxlayouts.layout import Layout, RunConfig, load_model_config, parse_mesh  # noqa: E402

SEQ_LEN = 32
GLOBAL_BATCH = 8


def make_run(mesh: str, *, seq_len=SEQ_LEN, global_batch=GLOBAL_BATCH, dtype="float32", **layout):
    return RunConfig(model=load_model_config("tiny"), layout=Layout(mesh=parse_mesh(mesh), **layout),
                     seq_len=seq_len, global_batch=global_batch, dtype=dtype)


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) == 8, "tests expect 8 emulated CPU devices"
    return jax.devices()
