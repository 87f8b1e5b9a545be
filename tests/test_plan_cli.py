"""``python -m jaxlayouts.plan`` as a user runs it: ranks a 65B grid, verifies its top layout by
compiling it, explains a layout, the allocator's limit, bad input."""

import pytest
from conftest import run_module

from jaxlayouts.plan.hardware import load_hardware


def test_plan_ranks_a_65b_grid():
    proc, result = run_module("jaxlayouts.plan", "--model", "llama-65b", "--gpus", "128", "--seq_len", "2048",
                              "--global_batch", "2048", "--hardware", "a100-80gb", "--json", "--top", "5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert result["candidates"] > 1000  # its time is reported, not asserted: the machine is shared
    top = result["top"]
    assert all(r["fits"] for r in top) and [r["mfu"] for r in top] == sorted((r["mfu"] for r in top), reverse=True)
    assert all(r["predicted"] and r["memory_gib"]["total"] <= 80 for r in top)
    assert result["calibration"].startswith("calibration a100-80gb.calibration.yaml: fitted on 639 rows")
    assert all(r["unmeasured_kernels"] == [k for k in (f"attn={r['layout'].split('attn=')[1].split()[0]}",
                                                       f"norm={r['layout'].split('norm=')[1].split()[0]}")
                                           if k not in ("attn=xla", "norm=xla")] for r in top)


def test_plan_verifies_its_top_layout_by_compiling_it():
    proc, result = run_module("jaxlayouts.plan", "--model", "tiny", "--gpus", "8", "--seq_len", "256",
                              "--global_batch", "32", "--top", "2", "--verify", "1", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    first, second = result["top"]
    assert first["compiled"]["peak_gib"] > 0 and first["compiled"]["collective_gib_per_step"] > 0
    assert "compiled" not in second
    assert first["compiled"]["exceeds_usable"] is False  # a tiny model on an A100
    proc, _ = run_module("jaxlayouts.plan", "--model", "tiny", "--gpus", "8", "--seq_len", "256",
                         "--global_batch", "32", "--top", "1", "--verify", "1", "--memory_fraction", "1e-9")
    assert proc.returncode == 0 and "WARNING: the compiled peak exceeds the" in proc.stdout
    assert "trust it" in proc.stdout or "better guide" in proc.stdout  # and says which figure to trust


def test_plan_explains_a_layout_and_rejects_bad_input():
    layout = "dp=4,fsdp=1,tp=8,pp=4 mbs=1 zero=0 sp=1 remat=full attn=pallas norm=pallas pipe=1f1b vstages=1"
    proc, _ = run_module("jaxlayouts.plan", "--model", "llama-65b", "--explain", layout)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "predicted MFU" in proc.stdout and "bubble" in proc.stdout and "activations" in proc.stdout
    assert "calibration a100-80gb.calibration.yaml: fitted on 639 rows (ok/oom)" in proc.stdout
    assert "† uses a kernel no calibration row timed on a100-80gb (attn=pallas, norm=pallas)" in proc.stdout
    assert "re-runs each chunk's forward" not in proc.stdout  # remat=full: the recompute is the policy's
    proc, _ = run_module("jaxlayouts.plan", "--model", "llama-65b", "--explain", layout.replace("remat=full", "remat=none"))
    assert "(recompute with remat=none under pp: the pipeline re-runs each chunk's forward in its backward tick" in proc.stdout
    proc, _ = run_module("jaxlayouts.plan", "--hardware", "v100")
    assert proc.returncode == 2 and "--hardware: unknown hardware 'v100'" in proc.stderr
    proc, _ = run_module("jaxlayouts.plan", "--model", "llama-65b", "--explain", "tp=3,pp=4")
    assert proc.returncode == 2 and "--mesh" in proc.stderr
    proc, _ = run_module("jaxlayouts.plan", "--top", "0")
    assert proc.returncode == 2 and "--top: 0: must be a positive integer" in proc.stderr
    proc, _ = run_module("jaxlayouts.plan", "--fit")
    assert proc.returncode == 2 and "--fit: re-fits the calibration" in proc.stderr
    proc, _ = run_module("jaxlayouts.plan", "validate", "runs.csv", "--predictions", "/no/such/folder/out.csv")
    assert proc.returncode == 2 and "--predictions: /no/such/folder/out.csv: its folder does not exist" in proc.stderr


def test_fits_means_within_the_allocators_limit():
    h200 = load_hardware("h200")
    assert h200.usable_bytes / 2 ** 30 == pytest.approx(105.3, abs=0.05)   # measured bytes_limit: 104.9 GiB
    proc, _ = run_module("jaxlayouts.plan", "--model", "llama-1b", "--gpus", "1", "--global_batch", "8",
                         "--hardware", "h200", "--explain", "dp=1 mbs=1 attn=cudnn", "--memory_fraction", "0.5")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "fits in 70.2 GiB" in proc.stdout
    proc, _ = run_module("jaxlayouts.plan", "--memory_fraction", "1.5")
    assert proc.returncode == 2 and "--memory_fraction: 1.5 is above the largest allowed value 1" in proc.stderr
    proc, _ = run_module("jaxlayouts.plan", "--leave_one_out")
    assert proc.returncode == 2 and "--leave_one_out: validates held-out fits" in proc.stderr


def test_help_says_which_choices_the_search_leaves_out_and_why():
    from jaxlayouts.choices import ATTENTION, NORM, REMAT
    proc, _ = run_module("jaxlayouts.plan", "--help")  # absl's --help exits 1
    left_out = [f"{kind}={name}" for kind, records in (("attn", ATTENTION), ("norm", NORM), ("remat", REMAT))
                for name, r in records.items() if not r.planner_searches]
    assert left_out and all(f"not searched: {choice}: " in proc.stdout for choice in left_out)
    assert "not searched: attn=pallas:" not in proc.stdout and "not searched: remat=full:" not in proc.stdout
