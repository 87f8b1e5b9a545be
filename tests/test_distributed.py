"""Multi-process runs (2 processes x 4 CPU devices, gloo), checkpoints across layouts, failures."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import clean_env, run_bench

from jaxlayouts import distributed, launch
from jaxlayouts.layout import Layout, parse_mesh

QUICK = ["--dtype", "float32", "--seq_len", "32", "--global_batch", "8", "--warmup", "0"]


def test_two_processes_give_the_losses_of_one(tmp_path):
    code, multi, proc = run_bench("--mesh", "dp=2,fsdp=2,tp=2", "--steps", "3", *QUICK, launcher_processes=2)
    assert code == 0, proc.stderr[-3000:]
    assert multi["num_processes"] == 2 and multi["num_devices"] == 8
    assert "mesh over 2 processes: dp=2 (2 across x 1 inside)" in proc.stderr
    assert "[Gloo]" not in proc.stdout and "[Gloo]" in proc.stderr  # library chatter kept off stdout
    assert proc.stdout.count('"status": "ok"') == 1  # process 0 alone reports
    code, single, _ = run_bench("--mesh", "dp=2,fsdp=2,tp=2", "--steps", "3", *QUICK)
    assert code == 0 and single["num_processes"] == 1
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-5)


def test_restore_under_another_layout_and_device_count(tmp_path):
    ckpt = str(tmp_path / "ckpt")
    code, first, proc = run_bench("--mesh", "dp=2,fsdp=2,tp=2", "--steps", "2", "--checkpoint_dir", ckpt,
                              "--checkpoint_every", "2", *QUICK)
    assert code == 0, proc.stderr[-3000:]
    saved = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if "checkpoint: saving" in line]
    assert saved == [f"checkpoint: saving step 2 to {ckpt}"] and _complete_steps(pathlib.Path(ckpt)) == [2]
    code, resumed, proc = run_bench("--mesh", "fsdp=2,tp=2", "--zero", "1", "--steps", "2", "--checkpoint_dir", ckpt,
                                "--restore", *QUICK)
    assert code == 0, proc.stderr[-3000:]
    assert resumed["first_step"] == 2 and resumed["num_devices"] == 4
    assert resumed["restored_from"].startswith("dp=2,fsdp=2,tp=2,pp=1")
    code, straight, _ = run_bench("--mesh", "dp=1", "--steps", "4", *QUICK)
    np.testing.assert_allclose(first["losses"] + resumed["losses"], straight["losses"], rtol=1e-5)


def test_restore_without_a_checkpoint_dir_is_invalid():
    code, result, _ = run_bench("--mesh", "dp=1", "--restore", *QUICK, "--steps", "1")
    assert code == 2 and result["error"].startswith("--restore: needs --checkpoint_dir")


def _complete_steps(directory: pathlib.Path) -> list[int]:
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.exists() else []


def test_a_save_killed_part_way_leaves_the_previous_checkpoint(tmp_path):
    ckpt = tmp_path / "ckpt"
    command = [sys.executable, "-m", "jaxlayouts.bench", "--mesh", "dp=2", "--steps", "500",
               "--checkpoint_dir", str(ckpt), "--checkpoint_every", "1", *QUICK]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env())
    deadline = time.time() + 200
    while time.time() < deadline and len(_complete_steps(ckpt)) < 3:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)  # saves run back to back: this lands in or near one
    proc.wait()
    saved = _complete_steps(ckpt)
    assert len(saved) >= 3
    code, resumed, out = run_bench("--mesh", "dp=2", "--steps", "1", "--checkpoint_dir", str(ckpt), "--restore", *QUICK)
    assert code == 0, out.stderr[-3000:]
    assert resumed["first_step"] >= saved[0]


def test_killing_one_process_ends_the_other_with_an_error():
    address = f"127.0.0.1:{launch.free_port()}"
    command = [sys.executable, "-m", "jaxlayouts.bench", "--mesh", "dp=2,fsdp=2,tp=2", "--steps", "1000",
               "--heartbeat_timeout_s", "10", *QUICK]
    env = lambda i: clean_env(JAXLAYOUTS_COORDINATOR_ADDRESS=address, JAXLAYOUTS_NUM_PROCESSES="2",
                              JAXLAYOUTS_PROCESS_ID=str(i))
    survivor = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(0))
    victim = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env(1))
    lines = []
    for line in survivor.stderr:  # wait until training is under way
        lines.append(line)
        if "step 3/" in line:
            break
    victim.kill()
    killed_at = time.time()
    code = survivor.wait(timeout=120)
    assert code != 0
    assert time.time() - killed_at < 60
    assert '"status": "error"' in survivor.stdout.read()


def test_the_launcher_stops_the_others_and_returns_the_failure():
    script = "import os, sys, time; i = int(os.environ['JAXLAYOUTS_PROCESS_ID']); time.sleep(0.5); sys.exit(3) if i == 1 else time.sleep(60)"
    start = time.time()
    assert launch.launch(2, [sys.executable, "-c", script], grace_s=2) == 3
    assert time.time() - start < 20


def test_an_unreachable_coordinator_is_an_error_not_a_hang():
    start = time.time()
    command = [sys.executable, "-m", "jaxlayouts.bench", "--mesh", "dp=2", "--coordinator_address",
               f"127.0.0.1:{launch.free_port()}", "--num_processes", "2", "--process_id", "1",
               "--init_timeout_s", "5", *QUICK, "--steps", "1"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, env=clean_env())
    assert proc.returncode != 0 and time.time() - start < 90


def test_tp_stays_inside_a_node_and_crossing_is_warned():
    inside, across = distributed.split_over_nodes(Layout(mesh=parse_mesh("dp=2,fsdp=4,tp=8")).mesh, 4)
    assert across == {"dp": 2, "fsdp": 2, "cp": 1, "tp": 1, "pp": 1} and inside["tp"] == 8
    assert "WARNING" not in distributed.describe_topology(Layout(mesh=parse_mesh("dp=4,tp=8")), 4)
    text = distributed.describe_topology(Layout(mesh=parse_mesh("dp=1,tp=16")), 2)
    assert "tp=16 (2 across x 8 inside)" in text and "WARNING: tp crosses" in text


def test_cluster_detection(monkeypatch):
    for name in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_PROCID", "JAXLAYOUTS_COORDINATOR_ADDRESS",
                 "JAXLAYOUTS_NUM_PROCESSES", "JAXLAYOUTS_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert not distributed.detect().multi_process
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    monkeypatch.setenv("SLURM_PROCID", "2")
    assert distributed.detect() == distributed.Cluster(None, 4, 2, slurm=True)
    assert distributed.detect("h:1", 2, 0) == distributed.Cluster("h:1", 2, 0)
    with pytest.raises(ValueError, match="needs all of --coordinator_address"):
        distributed.detect("h:1")


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
    assert "jaxlayouts.sweep 'configs/sweeps/study_13b_2k_64gpu.yaml' --index $SLURM_ARRAY_TASK_ID" in proc.stdout
    assert subprocess.run(["bash", "-n", "launch/slurm.sbatch"]).returncode == 0
