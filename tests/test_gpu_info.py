"""python -m jaxlayouts.gpu_info: what it says on this CPU, and what it would say on an H100."""

import json
import subprocess
import sys
import types

import pytest
from conftest import clean_env, run_module

from jaxlayouts import gpu_info
from jaxlayouts.bench import host_bytes
from jaxlayouts.plan.hardware import allocator_fraction, load_hardware
from jaxlayouts.schema import InvalidInput


def test_on_a_cpu_it_says_so_and_what_that_means():
    proc, result = run_module("jaxlayouts.gpu_info", "--json", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert result["platform"] == "cpu" and result["device_count"] == 1 and result["process_count"] == 1
    assert result["meaning"].startswith("no GPU: JAX runs on this CPU.")
    assert result["devices"][0]["memory"] == {
        "bytes": host_bytes(), "source": "host memory, shared by all CPU devices; a CPU has no memory_stats"}
    assert result["versions"]["jax"] == result["versions"]["jaxlib"] == __import__("jax").__version__
    assert result["memory_fraction"] is None  # the GPU allocator's share means nothing on a CPU
    assert result["kernels"] == {
        "norm=triton": "no: needs an NVIDIA GPU (platform is cpu); use --norm pallas or xla",
        "attention=cudnn": "no: needs an NVIDIA GPU with cuDNN (platform is cpu); use --attention pallas or xla",
        "pallas (attention, norm)": "interpret mode only (correct, slow: for tests, not for timing)"}
    text = gpu_info.text(result)
    assert text.splitlines()[0] == "platform    cpu: 1 device(s), 1 process(es)"
    assert f"device 0    cpu: {host_bytes() / 2**30:.1f} GiB (host memory" in text


def test_on_a_gpu_memory_and_kernels_come_from_the_device():
    """A GPU device without memory_stats gets its hardware file's HBM, marked as not measured; one
    with them gets JAX's limit."""
    h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3", memory_stats=lambda: None)
    assert gpu_info.memory(h100) == {"bytes": load_hardware("h100-80gb").hbm_bytes,
                                     "source": "HBM of configs/hardware/h100-80gb.yaml, not measured"}
    measured = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H200", memory_stats=lambda: {"bytes_limit": 7})
    assert gpu_info.memory(measured)["bytes"] == 7
    unknown = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA B300", memory_stats=lambda: {})
    assert gpu_info.memory(unknown)["bytes"] is None
    verdicts = gpu_info.kernels("gpu")
    assert verdicts["attention=cudnn"].startswith("yes") and verdicts["pallas (attention, norm)"].startswith("yes")
    assert verdicts["norm=triton"].startswith("no: triton needs the optional packages")  # no jax-triton here


def test_the_allocator_fraction_is_read_as_jaxlib_reads_it():
    assert allocator_fraction({}) == 0.75
    assert allocator_fraction({"XLA_PYTHON_CLIENT_MEM_FRACTION": ".9"}) == 0.9
    assert allocator_fraction({"XLA_CLIENT_MEM_FRACTION": "0.8", "XLA_PYTHON_CLIENT_MEM_FRACTION": ".9"}) == 0.8
    with pytest.raises(InvalidInput, match="--environment: XLA_CLIENT_MEM_FRACTION='most' is not a number"):
        allocator_fraction({"XLA_CLIENT_MEM_FRACTION": "most"})
    for outside in ("0", "1.5", "nan"):
        with pytest.raises(InvalidInput, match=f"XLA_CLIENT_MEM_FRACTION='{outside}' is not a share of memory in"):
            allocator_fraction({"XLA_CLIENT_MEM_FRACTION": outside})
    proc = subprocess.run([sys.executable, "-m", "jaxlayouts.bench", "--model", "tiny"], capture_output=True, text=True,
                          timeout=120, env=clean_env(XLA_CLIENT_MEM_FRACTION="most"))
    assert proc.returncode == 2  # the bench names it before JAX reads it
    assert json.loads(proc.stdout.splitlines()[-1])["error"].startswith("--environment: XLA_CLIENT_MEM_FRACTION='most'")


def test_a_gpu_bench_row_records_the_fraction_it_ran_with(monkeypatch):
    from conftest import make_run

    from jaxlayouts.bench import measured_fields
    from jaxlayouts.config import BenchOptions
    monkeypatch.setenv("XLA_CLIENT_MEM_FRACTION", "0.9")
    h100 = types.SimpleNamespace(platform="gpu", device_kind="NVIDIA H100 80GB HBM3",
                                 memory_stats=lambda: {"peak_bytes_in_use": 5, "bytes_limit": 6})
    row = measured_fields(make_run("dp=1"), BenchOptions(), h100, 1, [1.0], [1.0], {})
    assert row["memory_fraction"] == 0.9
    assert row["memory"] == {"device_peak_bytes": 5, "device_bytes_limit": 6}
    cpu = types.SimpleNamespace(platform="cpu", device_kind="cpu", memory_stats=lambda: None)
    assert measured_fields(make_run("dp=1"), BenchOptions(), cpu, 1, [1.0], [1.0], {})["memory_fraction"] is None
