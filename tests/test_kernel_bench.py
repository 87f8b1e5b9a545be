"""The kernel benchmark as a user runs it: every implementation reported, given ceilings, bad input."""

import json
import subprocess
import sys

import pytest
from conftest import clean_env


def test_kernel_benchmark_reports_every_implementation(tmp_path):
    markdown = tmp_path / "kernels.md"
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlayouts.kernel_bench", "--seq_lens", "64", "--head_dim", "64",
         "--d_model", "128", "--norm_rows", "16", "--iters", "2", "--warmup", "1",
         "--markdown", str(markdown)],
        capture_output=True, text=True, timeout=300, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "interpret mode" in proc.stdout
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    ceilings = result["ceilings"]  # measured on tiny shapes (CPU): they test the code path only
    assert ceilings["source"] == "measured" and ceilings["matmul_tflops"] > 0 and ceilings["copy_gbs"] > 0
    for row in result["attention"] + result["rms_norm"]:
        assert {"kernel", "implementation", "seq_len", "forward_backward_vs_cudnn", "forward_gbs",
                "forward_backward_gbs"} <= set(row)
    attention = {r["implementation"]: r for r in result["attention"]}
    assert set(attention) == {"xla", "cudnn", "pallas", "pallas_jax"}
    assert attention["cudnn"]["status"] == "unavailable" and attention["cudnn"]["forward_ms"] is None
    for name in ("xla", "pallas", "pallas_jax"):
        row = attention[name]
        assert row["status"] == "ok" and row["seq_len"] == 64 and row["kernel"] == "attention"
        assert row["forward_backward_tflops"] > 0
        assert row["forward_backward_tflops_vs_matmul"] == pytest.approx(
            row["forward_backward_tflops"] / ceilings["matmul_tflops"])
        assert row["forward_vs_cudnn"] is None  # no cudnn row to compare with
    norms = {r["implementation"]: r for r in result["rms_norm"]}
    assert norms["pallas"]["forward_gbs"] > 0 and norms["xla"]["forward_vs_xla"] == 1.0
    assert norms["pallas"]["forward_backward_vs_copy"] == pytest.approx(
        norms["pallas"]["forward_backward_gbs"] / ceilings["copy_gbs"])
    assert norms["pallas"]["seq_len"] is None and norms["pallas"]["forward_backward_vs_cudnn"] is None
    assert norms["triton"]["status"] == "unavailable"
    assert "| 64 | 4x2x64 | pallas |" in markdown.read_text()
    assert "Ceilings (measured): matmul " in markdown.read_text()
    assert "**These are CPU figures**" in markdown.read_text() and " 0.000 " not in markdown.read_text()


def test_kernel_benchmark_reads_given_ceilings(tmp_path):
    ceilings = tmp_path / "ceilings.json"
    ceilings.write_text(json.dumps({"matmul_tflops": 0.5, "copy_gbs": 2.0}))
    proc = subprocess.run(
        [sys.executable, "-m", "jaxlayouts.kernel_bench", "--attention", "xla", "--norm", "xla", "--seq_lens", "32",
         "--head_dim", "8", "--d_model", "16", "--norm_rows", "8", "--iters", "1", "--warmup", "0",
         "--ceilings", str(ceilings)], capture_output=True, text=True, timeout=120, env=clean_env())
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ceilings"] == {"matmul_tflops": 0.5, "copy_gbs": 2.0, "source": str(ceilings)}
    attention, norm = result["attention"][0], result["rms_norm"][0]
    assert attention["forward_tflops_vs_matmul"] == pytest.approx(attention["forward_tflops"] / 0.5)
    assert norm["forward_vs_copy"] == pytest.approx(norm["forward_gbs"] / 2.0)


@pytest.mark.parametrize("args, message", [
    (["--attention", "flash3"], "--attention: unknown ['flash3']"),
    (["--seq_lens", "2k"], "--seq_lens: 2k; give positive integers"),
    (["--iters", "0"], "--iters: 0; must be at least 1"),
    (["--heads", "6", "--kv_heads", "4"], "--kv_heads: 4 must divide --heads 6"),
    (["--ceilings", "/nonexistent/ceilings.json"], "--ceilings: cannot read /nonexistent/ceilings.json"),
    (["--ceilings", "BAD_JSON"], "is not JSON"),
    (["--ceilings", "ZERO_COPY"], "needs positive numbers for copy_gbs"),
])
def test_kernel_benchmark_rejects_bad_input(args, message, tmp_path):
    files = {"BAD_JSON": "{matmul_tflops: 1", "ZERO_COPY": json.dumps({"matmul_tflops": 600, "copy_gbs": 0})}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    args = [str(tmp_path / a) if a in files else a for a in args]
    proc = subprocess.run([sys.executable, "-m", "jaxlayouts.kernel_bench", *args],
                          capture_output=True, text=True, timeout=120, env=clean_env())
    assert proc.returncode == 2
    assert message in proc.stderr
