"""Checkpoints: restored under another layout, device count or pipeline layer order with the losses
of a straight run; a save killed part way leaves the previous one."""

import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import clean_env, make_run, run_bench, train_losses as losses

from jaxlayouts.bench import benchmark

QUICK = ["--dtype", "float32", "--seq_len", "32", "--global_batch", "8", "--warmup", "0"]


@pytest.fixture(scope="module")
def straight(devices):
    """Four straight steps on one device (what ``bench --mesh dp=1 --steps 4`` with QUICK reports),
    which a run restored part way must reproduce."""
    return {"losses": losses(devices, "dp=1", steps=4)}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two steps under ``dp=2,fsdp=2,tp=2`` saved at step 2: ``(checkpoint dir, result, process)``."""
    ckpt = str(tmp_path_factory.mktemp("saved") / "ckpt")
    code, first, proc = run_bench("--mesh", "dp=2,fsdp=2,tp=2", "--steps", "2", "--checkpoint_dir", ckpt,
                                  "--checkpoint_every", "2", *QUICK)
    assert code == 0, proc.stderr[-3000:]
    return ckpt, first, proc


def test_restore_under_another_layout_and_device_count(saved, straight):
    ckpt, first, proc = saved
    lines = [line.strip() for line in (proc.stdout + proc.stderr).splitlines() if "checkpoint: saving" in line]
    assert lines == [f"checkpoint: saving step 2 to {ckpt}"] and _complete_steps(pathlib.Path(ckpt)) == [2]
    code, resumed, proc = run_bench("--mesh", "fsdp=2,tp=2", "--zero", "1", "--steps", "2", "--checkpoint_dir", ckpt,
                                "--restore", *QUICK)
    assert code == 0, proc.stderr[-3000:]
    assert resumed["first_step"] == 2 and resumed["num_devices"] == 4
    assert resumed["restored_from"].startswith("dp=2,fsdp=2,tp=2,pp=1")
    np.testing.assert_allclose(first["losses"] + resumed["losses"], straight["losses"], rtol=1e-5)


@pytest.mark.parametrize("changes, message", [
    ({"seq_len": 16}, "other settings (seq_len 32 there, 16 here)"),
    ({"global_batch": 16, "seed": 7}, "(global_batch 8 there, 16 here; seed 0 there, 7 here)"),
    ({"vocab_size": 256}, "it holds 'tiny' and this run trains 'tiny': vocab_size 512 there, 256 here"),
])
def test_restore_refuses_another_model_or_other_run_settings(devices, saved, changes, message):
    """Before compiling: a checkpoint resumes only the model it holds, on the data it was at."""
    import dataclasses

    from jaxlayouts.layout import InvalidInput
    vocab = changes.pop("vocab_size", None)
    run = dataclasses.replace(make_run("fsdp=2,tp=2"), **changes)
    if vocab:
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, vocab_size=vocab))
    with pytest.raises(InvalidInput, match=r"--restore: the checkpoint of step 2 in .* does not fit this run") as error:
        benchmark(run, devices=devices[:4], steps=1, warmup=0, checkpoint_dir=saved[0], restore=True,
                  log=lambda _: None)
    assert message in str(error.value), str(error.value)


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


def test_checkpoint_restores_across_pipeline_layer_orders(devices, tmp_path, straight):
    """A circular pipeline stores each device's chunks together; a checkpoint it saves restores
    into a plain layout (and back) with every layer in its place."""
    straight = straight["losses"]
    run = make_run("dp=2,pp=2", pipeline_schedule="circular", virtual_stages=2)
    first = benchmark(run, steps=2, warmup=0, devices=devices[:4], checkpoint_dir=str(tmp_path),
                      checkpoint_every=2, log=lambda _: None)
    second = benchmark(make_run("dp=1"), steps=2, warmup=0, devices=devices[:1], checkpoint_dir=str(tmp_path),
                       checkpoint_every=2, restore=True, log=lambda _: None)
    assert second["restored_from"] == str(run.layout)
    np.testing.assert_allclose(first["losses"] + second["losses"], straight, rtol=1e-5)
