"""The bench as a user runs it: a subprocess, a summary, one JSON object as the last line."""

import json

import numpy as np
import pytest

from conftest import run_bench

from jaxlayouts.bench import is_oom

QUICK = ["--seq_len", "32", "--global_batch", "8", "--steps", "2", "--warmup", "1"]


def test_layouts_report_the_same_losses_as_one_device(tmp_path):
    out = tmp_path / "results.jsonl"
    code, hybrid, proc = run_bench("--mesh", "dp=2,fsdp=2,tp=2", "--dtype", "float32", "--output", str(out), *QUICK)
    assert code == 0, proc.stderr
    code, single, _ = run_bench("--mesh", "dp=1", "--dtype", "float32", "--output", str(out), *QUICK)
    assert code == 0
    np.testing.assert_allclose(hybrid["losses"], single["losses"], rtol=1e-4)
    # the harness emulated exactly the devices each mesh needs
    assert (hybrid["num_devices"], single["num_devices"]) == (8, 1)
    assert hybrid["mesh"] == {"dp": 2, "fsdp": 2, "cp": 1, "tp": 2, "pp": 1} and hybrid["zero"] == 3
    for field in ("status", "error", "model", "n_params", "platform", "device_kind", "seq_len",
                  "global_batch", "micro_batch", "grad_accum_steps", "remat", "attention",
                  "sequence_parallel", "dtype", "compile_time_s", "step_time_s", "step_times_s",
                  "tokens_per_s", "model_tflops_per_device", "peak_tflops", "jax_version"):
        assert field in hybrid
    assert hybrid["mfu"] is None and hybrid["peak_tflops"] is None  # CPU: no made-up MFU
    assert len(hybrid["losses"]) == 3 and len(hybrid["step_times_s"]) == 2
    assert hybrid["step_time_s"] == pytest.approx(float(np.median(hybrid["step_times_s"])))
    assert hybrid["tokens_per_s"] == pytest.approx(8 * 32 / hybrid["step_time_s"])
    assert hybrid["memory"]["compiled_peak_bytes_per_device"] > 0
    assert "layout      dp=2,fsdp=2,tp=2,pp=1" in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["layout"] for r in rows] == [hybrid["layout"], single["layout"]]


def test_peak_flag_gives_mfu_and_profile_dir_gets_a_trace(profiled_bench):
    # --mesh dp=2 --peak_tflops 1 --profile_dir with QUICK's sizes; tmp_path: its profile dir
    code, result, proc, tmp_path = profiled_bench
    assert code == 0, proc.stderr
    assert result["mfu"] == pytest.approx(result["model_tflops_per_device"] / 1.0)
    assert list(tmp_path.rglob("*.xplane.pb"))


@pytest.mark.parametrize("args, knob", [
    (["--mesh", "dp=4", "--num_devices", "8"], "--mesh"),
    (["--mesh", "dp=2,tp=3"], "--mesh"),
    (["--mesh", "dp=2", "--remat", "sometimes"], "--remat"),
    (["--mesh", "dp=2", "--attention", "magic"], "--attention"),
    (["--mesh", "dp=2", "--model", "llama-3b"], "--model"),
    (["--mesh", "dp=4", "--global_batch", "6"], "--global_batch"),
    (["--mesh", "dp=2", "--axis_rules", "vocab=xx"], "--axis_rules"),
    (["--mesh", "dp=2", "--steps", "0"], "--steps"),
    (["--mesh", "dp=2", "--coordinator_address", "127.0.0.1:1"], "--coordinator_address"),
    (["--mesh", "dp=2", "--num_devices", "3"], "--mesh"),
    (["--mesh", "dp=2", "--checkpoint_dir", "/tmp/x", "--checkpoint_every", "0"], "--checkpoint_every"),
    (["--mesh", "dp=2", "--device_memory_gb", "-1"], "--device_memory_gb"),
    (["--mesh", "dp=2", "--heartbeat_timeout_s", "0"], "--heartbeat_timeout_s"),
    (["--mesh", "dp=2", "--peak_tflops", "0"], "--peak_tflops"),
    (["--mesh", "dp=2", "--vocab_size", "0"], "--vocab_size"),
])
def test_bad_input_is_invalid_before_compiling(args, knob):
    code, result, proc = run_bench(*args)
    assert code == 2
    assert result["status"] == "invalid" and result["error"].startswith(knob)
    assert "compiling" not in proc.stderr
    assert proc.stdout.startswith("INVALID: " + knob)


def test_out_of_memory_message_tells_its_numbers_apart():
    from jaxlayouts.bench import OutOfMemory, check_fits
    from jaxlayouts.config import BenchOptions
    with pytest.raises(OutOfMemory, match="compiled peak 0.0401 GiB per device exceeds the device memory 0.04 GiB"):
        check_fits({"compiled_peak_bytes_per_device": 0.0401 * 2**30}, None, BenchOptions(device_memory_gb=0.04))


def test_oom_messages_are_classified():
    assert is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 3.2GiB"))
    assert is_oom(RuntimeError("CUDA_ERROR_OUT_OF_MEMORY: out of memory"))
    assert not is_oom(ValueError("shapes do not match"))
