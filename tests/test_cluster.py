"""docs/cluster.md's CPU steps, at the doc's sizes where they are quick and smaller where they
compile: the SLURM template exports the fraction the planner assumes, plan prints it, the picks'
sweep holds plan's top 3, explore compiles for an H100 target, validate reads measured rows."""

import os
import pathlib
import re
import subprocess

import pytest
from conftest import clean_env, run_module

from jaxlayouts import config
from jaxlayouts.plan.hardware import hardware_names, load_hardware
from jaxlayouts.sweep import load_sweep, points

ROOT = pathlib.Path(__file__).resolve().parents[1]
PICKS = ROOT / "configs/sweeps/cluster_13b_64gpu_picks.yaml"
PLAN = ("jaxlayouts.plan", "--model", "llama-13b", "--gpus", "64", "--hardware", "h100-80gb", "--top", "3")


def sbatch(tmp_path, **env):
    """launch/slurm.sbatch run as SLURM would, with an ``srun`` that prints the fraction it gets."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "srun").write_text('#!/usr/bin/env bash\necho "fraction=${XLA_CLIENT_MEM_FRACTION:-unset} '
                               'old=${XLA_PYTHON_CLIENT_MEM_FRACTION:-unset}"\n')
    (fake / "srun").chmod(0o755)
    environ = clean_env(PATH=f"{fake}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID="7", SLURM_NNODES="8",
                        PYTHONPATH=str(ROOT), **env)
    return subprocess.run(["bash", str(ROOT / "launch/slurm.sbatch"), "true"], cwd=tmp_path, env=environ,
                          capture_output=True, text=True, timeout=60)


def test_the_slurm_template_runs_at_the_fraction_the_planner_assumes(tmp_path):
    for name in hardware_names():
        proc = sbatch(tmp_path, JAXLAYOUTS_HARDWARE=name)
        assert proc.returncode == 0, proc.stderr
        assert f"fraction={load_hardware(name).memory_fraction} old=unset" in proc.stdout
    mine = tmp_path / "mine.yaml"
    mine.write_text((ROOT / "configs/hardware/h200.yaml").read_text().replace("memory_fraction: 0.75", "memory_fraction: 0.9"))
    proc = sbatch(tmp_path, JAXLAYOUTS_HARDWARE=str(mine), XLA_PYTHON_CLIENT_MEM_FRACTION="0.90")  # agrees: one name
    assert "fraction=0.9 old=unset" in proc.stdout and "WARNING" not in proc.stderr
    proc = sbatch(tmp_path, XLA_PYTHON_CLIENT_MEM_FRACTION="0.95")  # by hand, not what h100-80gb plans with
    assert "fraction=unset old=0.95" in proc.stdout
    assert ("WARNING: the memory fraction was set by hand to 0.95, but h100-80gb's memory_fraction, which plan and "
            "explore fit layouts into, is 0.75: plan with --memory_fraction 0.95, or unset it") in proc.stderr
    proc = sbatch(tmp_path, JAXLAYOUTS_HARDWARE="h300")
    assert proc.returncode == 2 and "invalid: --hardware: unknown hardware 'h300'; choose one of" in proc.stderr


def test_plan_prints_the_usable_memory_and_the_picks_sweep_is_its_top_3():
    proc, _ = run_module(*PLAN, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[2] == ("usable memory per GPU: 64,424,509,440 bytes (60.0 GiB), memory_fraction "
                                           "0.75 of 80 GiB HBM (h100-80gb file)")
    top = [re.match(r"\s*\d+ (.+?)\s{2,}", line)[1] for line in proc.stdout.splitlines() if re.match(r"\s+\d ", line)]
    sweep = load_sweep(PICKS)
    swept = [str(config.run_config(config.check_values(config.values_with("knob", **p)), sweep.devices).layout)
             for p in points(sweep)]
    assert sorted(swept) == sorted(top)


@pytest.mark.parametrize("step", ["explore", "validate"])
def test_the_docs_cpu_steps_run(step):
    if step == "explore":  # cluster.md compiles llama-13b on 64 H100s (about 45 s); tiny on 8 here
        proc, report = run_module("jaxlayouts.explore", "--model", "tiny", "--mesh", "fsdp=8", "--seq_len", "128",
                                  "--global_batch", "8", "--target", "h100-80gb", "--json", timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert report["compiler"] == "XLA:GPU (NVIDIA H100 80GB HBM3, no GPU)"
        assert report["memory"]["usable"] == 60 * 2**30 and report["predicted"]["fits"] is True
    else:
        proc, result = run_module("jaxlayouts.plan", "validate", "configs/hardware/measured/h200-2026-11-30.jsonl",
                                  "--hardware", "h200", "--json", timeout=120)
        assert proc.returncode == 0, proc.stderr
        assert result["rows"] == 7 and result["oom_accuracy"] == 1.0 and result["calibration_source"] == "h200.calibration.yaml"
