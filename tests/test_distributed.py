"""Multi-process runs (2 processes x 4 CPU devices, gloo): the losses of one process, failures end
the run, and tp stays inside a node."""

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
