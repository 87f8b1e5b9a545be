"""Tests run on 8 emulated CPU devices in float32, so that layouts can be compared exactly."""

import json
import os
import subprocess
import sys
import tempfile

# One compilation cache per test run (shared by xdist workers and inherited by the subprocesses
# the tests start): many tests compile the same step, often in separate processes.
run_id = os.environ.get("PYTEST_XDIST_TESTRUNUID", str(os.getpid()))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"jaxlayouts-tests-{run_id}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The steps are tiny and run a few times: without LLVM's optimisations XLA:CPU compiles them in
# about half the time. The optimised HLO, its collectives and XLA's memory analysis, which the
# tests read, are the same. Inherited by every subprocess the tests start, sweep points included.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS)
import pytest  # noqa: E402

from jaxlayouts.layout import Layout, RunConfig, load_model_config, parse_mesh  # noqa: E402

def clean_env(**extra) -> dict:
    """This environment without device or multi-process settings (a subprocess sets its own)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("JAXLAYOUTS_")}
    env.update(extra)
    return env


def run_bench(*args, launcher_processes=None, timeout=300):
    """``python -m jaxlayouts.bench ARGS`` (under ``jaxlayouts.launch N`` when asked) as a user
    runs it: returns (exit code, last stdout line as JSON, the finished process)."""
    command = [sys.executable, "-m", "jaxlayouts.bench", *args]
    if launcher_processes:
        command = [sys.executable, "-m", "jaxlayouts.launch", str(launcher_processes), "--", *command]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=clean_env())
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1]), proc


def run_module(*args, timeout=300):
    proc = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env())
    last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "null"
    return proc, json.loads(last) if last.startswith("{") else None


SEQ_LEN = 32
GLOBAL_BATCH = 8


def make_run(mesh: str, *, seq_len=SEQ_LEN, global_batch=GLOBAL_BATCH, dtype="float32", **layout):
    return RunConfig(model=load_model_config("tiny"), layout=Layout(mesh=parse_mesh(mesh), **layout),
                     seq_len=seq_len, global_batch=global_batch, dtype=dtype)


def train_losses(devices, mesh: str, steps: int = 3, **kwargs):
    """Per-step losses of ``steps`` training steps under a layout, in process."""
    import numpy as np

    from jaxlayouts.bench import benchmark
    run = make_run(mesh, **kwargs)
    result = benchmark(run, steps=steps, warmup=0, devices=devices[:run.layout.num_devices], log=lambda _: None)
    return np.array(result["losses"])


def step_gradients(devices, mesh: str, **layout):
    """The first step's gradients (leaves) and per-micro-batch losses under a layout."""
    import numpy as np

    from jaxlayouts.data import device_batch, global_batch_tokens
    from jaxlayouts.mesh import build_mesh
    from jaxlayouts.train import BATCH_SPEC, Trainer

    run = make_run(mesh, global_batch=16, **layout)
    device_mesh = build_mesh(run.layout, devices[:run.layout.num_devices])
    trainer = Trainer(run, device_mesh)
    tokens = global_batch_tokens(0, 0, run.global_batch, run.seq_len, run.model.vocab_size)
    batch = device_batch(tokens, run.grad_accum_steps, device_mesh, BATCH_SPEC)
    grads, losses = jax.jit(trainer.gradients)(trainer.init_state().params, batch)
    return jax.tree.leaves(grads), np.asarray(losses)


@pytest.fixture(scope="session")
def devices():
    assert len(jax.devices()) == 8, "tests expect 8 emulated CPU devices"
    return jax.devices()


@pytest.fixture(scope="session")
def profiled_bench(tmp_path_factory):
    """One bench run with ``--profile_dir`` (and ``--peak_tflops`` for its MFU), read by
    test_bench and test_analysis_profile: ``(exit code, JSON result, process, profile dir)``."""
    profile_dir = tmp_path_factory.mktemp("profile")
    return (*run_bench("--mesh", "dp=2", "--peak_tflops", "1", "--profile_dir", str(profile_dir), "--seq_len", "32",
                       "--global_batch", "8", "--steps", "2", "--warmup", "1"), profile_dir)


@pytest.fixture(scope="session")
def reference(devices):
    """Per-step losses of the single-device run, which every layout reproduces (test_train,
    test_parallel_pipeline): computed once per test process."""
    return train_losses(devices, "dp=1")


@pytest.fixture(scope="session")
def single_device_gradients(devices):
    """The single-device run's first-step gradients and per-micro-batch losses (step_gradients)."""
    return step_gradients(devices, "dp=1")
