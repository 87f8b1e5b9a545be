"""Deviceless XLA:GPU compiles (targets.py): the GPU program, not XLA:CPU's, from a CPU machine."""

import importlib.metadata
import json
import re

import pytest
from conftest import make_run, run_module

from jaxlayouts import targets
from jaxlayouts.analysis import hlo
from jaxlayouts.analysis.compiled import compile_step
from jaxlayouts.kernels import compiling_for, interpret_mode
from jaxlayouts.mesh import build_mesh
from jaxlayouts.plan.hardware import load_hardware
from jaxlayouts.schema import InvalidInput

H100 = targets.resolve("h100-80gb")
MESH_SHAPE = lambda run: {a: run.layout.mesh[a] for a in ("dp", "fsdp", "cp", "tp", "pp")}


def gpu_step(mesh, **layout):
    run = make_run(mesh, dtype="bfloat16", global_batch=16, **layout)
    return run, compile_step(run, targets.devices(H100, run.layout.num_devices))


@pytest.mark.parametrize("name", targets.gpu_targets())
def test_each_target_description_is_its_hardware_file(name):
    """One device's description agrees with the hardware file that names it (HBM size), and
    every supported jaxlib parses it into a device of that kind."""
    target = targets.resolve(name)
    size = int(re.search(r"device_memory_size:\s*(\d+)", target.description)[1])
    assert size == target.hardware.hbm_bytes
    (device,) = targets.devices(target, 1)
    assert (device.platform, device.device_kind) == ("gpu", target.device_kind)


def test_gpu_compile_plans_less_memory_than_xla_cpu(devices):
    """XLA:CPU plans its own buffers (no bf16 GEMM, no reduce-scatter): its peak is above the GPU's."""
    run, gpu = gpu_step("fsdp=2", zero=2)
    cpu = compile_step(run, devices)
    assert (gpu.backend, cpu.backend) == ("gpu", "cpu")
    assert gpu.memory["argument_bytes"] == cpu.memory["argument_bytes"]  # the same training state
    assert 0 < gpu.memory["compiled_peak_bytes_per_device"] < cpu.memory["compiled_peak_bytes_per_device"]


@pytest.mark.parametrize("mesh, layout, axes", [("fsdp=2", {"zero": 2}, ("fsdp",)),
                                                ("tp=2", {"sequence_parallel": True}, ("tp",))])
def test_zero2_and_sequence_parallel_reduce_scatter_on_gpu(mesh, layout, axes):
    """XLA:GPU emits real reduce-scatters, which XLA:CPU lowers to all-reduce + slice."""
    run, step = gpu_step(mesh, **layout)
    scatters = [c for c in hlo.collectives(step.hlo_text, MESH_SHAPE(run)) if c.kind == "reduce-scatter"]
    assert scatters and all(c.lowered_as is None and c.axes == axes for c in scatters)


def test_pallas_kernels_compile_as_triton_for_a_gpu_target():
    """Our flash attention and RMSNorm are Triton custom calls in the GPU program, not the
    interpreter's loops (interpret mode follows the compile target, not JAX's default backend)."""
    _, step = gpu_step("dp=1", attention="pallas", norm="pallas")
    names = set(re.findall(r"(flash_attention_\w+|rms_norm_\w+)", step.hlo_text))
    assert step.hlo_text.count('custom_call_target="__gpu$xla.gpu.triton"') >= 5
    assert {"flash_attention_forward", "flash_attention_dkv", "flash_attention_dq",
            "rms_norm_forward", "rms_norm_backward"} <= names
    (device,) = targets.devices(H100, 1)
    with compiling_for(device):
        assert interpret_mode(None) is False
    assert interpret_mode(None) is True  # this process's default devices are CPUs


def test_a_layout_across_two_hosts_has_two_processes():
    """16 H100s are two hosts of 8: the topology puts devices on two processes, and the mesh
    keeps tp inside a host (the launcher's node-aware order)."""
    assert H100.topology(16) == "1x2x8" and H100.topology(4) == "1x1x4"
    found = targets.devices(H100, 16)
    assert sorted({d.process_index for d in found}) == [0, 1]
    mesh = build_mesh(make_run("fsdp=2,tp=8").layout, found)
    for row in mesh.devices.reshape(2, 8):  # fsdp x tp
        assert len({d.process_index for d in row}) == 1
    with pytest.raises(InvalidInput, match="multiple of 8"):
        H100.topology(12)


def test_without_the_plugin_a_gpu_target_names_the_install_line(monkeypatch):
    real = importlib.metadata.version

    def version(name):
        if name == "jax-cuda12-plugin":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)
    monkeypatch.setattr(importlib.metadata, "version", version)
    with pytest.raises(InvalidInput, match=re.escape("pip install -e '.[gpu-aot]'")):
        targets.check_compiler()
    with pytest.raises(InvalidInput, match="choose cpu or one of a100-80gb, h100-80gb, h200"):
        targets.resolve("h100")


def test_explore_for_a_gpu_target_reports_xla_gpu_memory(tmp_path):
    """The command line: XLA:GPU's figure in memory.compiled.peak, the target in the JSON, the
    GPU program written by --hlo_out, the usable memory of the target's hardware file."""
    hlo_path = tmp_path / "step.hlo"
    proc, report = run_module("jaxlayouts.explore", "--mesh", "fsdp=2", "--zero", "3", "--dtype", "bfloat16",
                              "--target", "h100-80gb", "--hlo_out", str(hlo_path), "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert report["target"] == "h100-80gb" and report["compiler"].startswith("XLA:GPU (NVIDIA H100")
    assert report["hardware"] == "h100-80gb" and report["memory"]["usable"] == load_hardware("h100-80gb").usable_bytes
    assert "Trust the XLA:GPU figure" in report["memory"]["notes"][-1]
    text = hlo_path.read_text()
    assert "HloModule" in text and "reduce-scatter" in text
    assert report["memory"]["compiled"]["peak"] > report["memory"]["compiled"]["parameters"] > 0
    bad, _ = run_module("jaxlayouts.explore", "--mesh", "dp=2", "--target", "h100")
    assert bad.returncode == 2 and "--target: unknown target 'h100'" in bad.stderr


def test_target_check_compares_compiled_with_measured_peaks(tmp_path):
    """The validation table's arithmetic on one row (a made-up measured peak, this test's only)."""
    from jaxlayouts.target_check import check, markdown
    row = {"status": "ok", "model": "tiny", "layout": "dp=1 mbs=1", "seq_len": 32, "global_batch": 8,
           "dtype": "bfloat16", "mfu": 0.5, "step_time_s": 1.0, "device_kind": "NVIDIA H100 80GB HBM3", "memory": {"device_peak_bytes": 2**20}}
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n" + json.dumps({**row, "status": "oom"}) + "\n")
    result = check(str(path), H100)
    (only,) = result["rows"]
    assert only["error"] == pytest.approx((only["compiled_peak_bytes"] - 2**20) / 2**20)
    assert result["median_abs_error"] == abs(only["error"])
    assert f"{only['error']:+.2%}" in markdown(result)


def test_plan_verify_compiles_its_picks_for_the_gpu_target():
    proc, out = run_module("jaxlayouts.plan", "--model", "tiny", "--gpus", "8", "--hardware", "h100-80gb",
                           "--seq_len", "64", "--global_batch", "16", "--top", "1", "--verify", "1",
                           "--target", "h100-80gb", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    (pick,) = out["top"]
    assert pick["compiled"]["compiler"] == "XLA:GPU for h100-80gb" and pick["compiled"]["peak_gib"] > 0


def test_target_check_refuses_before_compiling(tmp_path, capsys):
    """Its own input as --markdown, rows of two devices, a row without its model: exit 2, the rows
    file untouched, a message naming the knob."""
    from jaxlayouts import target_check
    row = {"status": "ok", "model": "tiny", "layout": "dp=1 mbs=1", "seq_len": 32, "global_batch": 8,
           "dtype": "bfloat16", "mfu": 0.5, "step_time_s": 1.0, "device_kind": "NVIDIA H200",
           "memory": {"device_peak_bytes": 2**20}}
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(row) + "\n")
    before = rows.read_text()
    assert target_check.main([str(rows), "--markdown", str(rows)]) == 2 and rows.read_text() == before
    assert "--markdown" in capsys.readouterr().err
    rows.write_text(before + json.dumps({**row, "device_kind": "NVIDIA H100 80GB HBM3"}) + "\n")
    assert target_check.main([str(rows)]) == 2 and "several device kinds" in capsys.readouterr().err
    rows.write_text(json.dumps({k: v for k, v in row.items() if k != "model"}) + "\n")
    assert target_check.main([str(rows)]) == 2 and "missing ['model']" in capsys.readouterr().err


def test_plan_target_without_verify_and_malformed_grids_are_refused(tmp_path):
    from jaxlayouts.plan.grid import read_grid
    proc, _ = run_module("jaxlayouts.plan", "--model", "tiny", "--gpus", "8", "--target", "h200")
    assert proc.returncode == 2 and "--target: h200 is what --verify compiles for" in proc.stderr
    grid = tmp_path / "grid.yaml"
    for group in ('base: "dp=8 mbs"', 'layouts: [5]', 'base: "dp=2", vary: [zero, 1]'):
        grid.write_text(f"groups:\n  - {{model: tiny, seq_len: 32, global_batch: 8, {group}}}\n")
        with pytest.raises(InvalidInput, match="group 1: base must be a layout text"):
            read_grid(str(grid))


def test_target_check_errors_median_and_max_are_exact(tmp_path, monkeypatch):
    """With the compile fixed at 1.5 MiB: rows measured at 1 and 2 MiB are +50% and -25%; the
    median |error| is 37.5% and the max 50%, and the table prints both rows' errors."""
    import types

    from jaxlayouts.analysis import compiled
    from jaxlayouts.target_check import check, markdown
    fixed = types.SimpleNamespace(memory={"compiled_peak_bytes_per_device": 3 * 2**19})
    monkeypatch.setattr(compiled, "compile_step", lambda run, devices: fixed)
    row = {"status": "ok", "model": "tiny", "seq_len": 32, "global_batch": 8, "dtype": "bfloat16", "mfu": 0.5,
           "step_time_s": 1.0, "device_kind": "NVIDIA H100 80GB HBM3"}
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({**row, "layout": f"dp=1 mbs={m}", "memory": {"device_peak_bytes": peak}}) + "\n"
                            for m, peak in ((1, 2**20), (2, 2**21))))
    result = check(str(path), H100)
    assert [r["error"] for r in result["rows"]] == [0.5, -0.25]
    assert (result["median_abs_error"], result["max_abs_error"]) == (0.375, 0.5)
    assert "+50.00%" in markdown(result) and "-25.00%" in markdown(result)
