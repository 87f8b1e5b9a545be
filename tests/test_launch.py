"""The launcher and the SLURM scripts: a failing worker stops the others; one array task per point."""

import os
import pathlib
import subprocess
import sys
import time

from conftest import clean_env

from jaxlayouts import launch


def test_the_launcher_stops_the_others_and_returns_the_failure():
    script = "import os, sys, time; i = int(os.environ['JAXLAYOUTS_PROCESS_ID']); time.sleep(0.5); sys.exit(3) if i == 1 else time.sleep(60)"
    start = time.time()
    assert launch.launch(2, [sys.executable, "-c", script], grace_s=2) == 3
    assert time.time() - start < 20


def test_slurm_sweep_submits_one_array_task_per_point(tmp_path):
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "sbatch").write_text('#!/bin/sh\necho "sbatch $*"\n')
    (fake / "sbatch").chmod(0o755)
    env = clean_env(PATH=f"{fake}:{pathlib.Path(sys.executable).parent}:{os.environ['PATH']}")
    proc = subprocess.run(["bash", "launch/slurm_sweep.sh", "configs/sweeps/study_13b_2k_64gpu.yaml",
                           str(tmp_path / "out"), "--partition=gpu"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "sbatch --array=0-95 --nodes=8 --partition=gpu" in proc.stdout
    assert "on 8 nodes each (memory fraction 0.75, h100-80gb)" in proc.stdout  # the hardware file's, as the jobs run
    assert "jaxlayouts.sweep 'configs/sweeps/study_13b_2k_64gpu.yaml' --index $SLURM_ARRAY_TASK_ID" in proc.stdout
    assert subprocess.run(["bash", "-n", "launch/slurm.sbatch"]).returncode == 0
