"""The GPU kit: its plan and budget in-process, and its dry run on CPU as a user runs it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import clean_env

from jaxlayouts import flops, gpu_check
from jaxlayouts.layout import load_model_config

TORCH = gpu_check.torch_missing() is None


def run_kit(out_dir, **popen):
    command = [sys.executable, "-m", "jaxlayouts.gpu_check", "--dry-run", "--out_dir", str(out_dir)]
    # one OpenMP thread: at these tiny shapes the peer's threads only spin against the other test worker
    return subprocess.Popen(command, text=True, env=clean_env(OMP_NUM_THREADS="1"), **popen)


def outputs(out_dir):
    (json_path,) = out_dir.glob("cpu-*[0-9].json")
    return json.loads(json_path.read_text()), json_path.with_suffix(".md").read_text()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("kit")
    proc = run_kit(out_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    return out_dir, *outputs(out_dir), stderr


def test_plan_puts_the_targets_first_and_keeps_every_point_once():
    tasks = gpu_check.plan(gpu_check.GPU)
    keys = [t["key"] for t in tasks]
    assert keys[:9] == ["jaxlayouts/2048/1/none/cudnn/xla", "torch_compile/2048/1",
                        "jaxlayouts/2048/4/none/cudnn/xla", "torch_compile/2048/4",
                        "jaxlayouts/8192/1/none/cudnn/xla", "torch_compile/8192/1",
                        "jaxlayouts/2048/4/full/cudnn/xla", "jaxlayouts/2048/4/selective/cudnn/xla", "kernels"]
    assert len(keys) == len(set(keys)) == 2 * 4 * 3 * 2 * 2 + 2 * 2 * 4 + 1
    assert all(gpu_check.GPU.global_batch % mb == 0 for mb in gpu_check.GPU.micro_batches)
    # without torch, one note row per peer replaces the peer's points
    noted = gpu_check.plan(gpu_check.GPU, "torch is not installed")
    peers = [t for t in noted if t["tool"] in gpu_check.PEERS]
    assert [(t["tool"], t["reason"]) for t in peers] == [(p, "torch is not installed") for p in gpu_check.PEERS]
    assert gpu_check.estimate(peers[0], {}, gpu_check.GPU) == 0  # a note always fits
    row = gpu_check.execute(peers[0], 10, gpu_check.GPU, None)
    assert row["status"] == "skipped" and row["reason"] == "torch is not installed" and row["step_time_s"] is None


def test_budget_starts_only_tasks_whose_estimate_fits():
    grid = gpu_check.DRY_RUN
    tasks = gpu_check.plan(grid)
    now = [0.0]
    durations = {"jaxlayouts": 5.0, "torch_compile": 30.0, "torch_eager": 1.0, "kernels": 2.0}
    ran, records = [], []

    def execute(t, timeout_s):
        ran.append((t["key"], timeout_s))
        now[0] += durations[t["tool"]]
        return {"kind": "row", "key": t["key"], "status": "ok"}

    # priors: jaxlayouts 20 s, torch_compile 15 s; the first torch_compile takes 30 s, so the
    # second (estimated 30 s from it) no longer fits in the 25 s left after 5 + 30 + 5 s, while
    # the kernels (prior 20 s) and the eager peer still do
    gpu_check.run_tasks(tasks, grid, deadline=65.0, execute=execute, record=records.append, clock=lambda: now[0])
    assert [k for k, _ in ran] == ["jaxlayouts/32/1/none/xla/xla", "torch_compile/32/1",
                                   "jaxlayouts/32/2/none/xla/xla", "kernels", "torch_eager/32/1", "torch_eager/32/2"]
    assert ran[1][1] == 60.0  # a task may use the budget left
    skipped = [r for r in records if r["kind"] == "not_run"]
    assert [r["key"] for r in skipped] == ["torch_compile/32/2"] and "30 s needed" in skipped[0]["reason"]


def test_bad_flags_exit_2_naming_the_flag(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    for args, flag in ((["--budget_s", "0"], "--budget_s"), (["--budget_s", "soon"], "--budget_s"),
                       (["--out_dir", str(tmp_path / "file")], "--out_dir")):
        with pytest.raises(SystemExit) as exit_info:
            gpu_check.parse_args(args)
        assert exit_info.value.code == 2 and flag in capsys.readouterr().err


def test_dry_run_measures_every_tool_and_renders_its_ratios(dry_run):
    out_dir, doc, md, stderr = dry_run
    assert doc["device"] == "cpu" and doc["dry_run"] and doc["complete"] and doc["not_run"] == []
    assert set(gpu_check.PACKAGES) | {"python", "driver"} <= set(doc["versions"])
    assert doc["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert doc["ceilings"]["matmul_tflops"] > 0 and doc["ceilings"]["copy_gbs"] > 0
    rows = doc["rows"]
    assert {r["tool"] for r in rows} == set(gpu_check.TOOLS)
    assert sum(r["tool"] == "jaxlayouts" for r in rows) == 2
    cfg = load_model_config("tiny")
    measured = [r for r in rows if r["status"] == "ok"]
    assert len(measured) == (6 if TORCH else 2) and len(rows) == (6 if TORCH else 4)
    for r in measured:
        assert isinstance(r["micro_batch"], int) and isinstance(r["seq_len"], int) and r["step_time_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["global_batch"] * r["seq_len"] / r["step_time_s"])
        assert r["mfu"] is None and r["peak_bytes"] is None  # CPU: no datasheet peak, no device memory
        # one MFU formula for every tool
        assert r["model_tflops_per_device"] == pytest.approx(flops.mfu(cfg, r["seq_len"], r["tokens_per_s"], 1, None)[0])
        assert r["vs_matmul_ceiling"] == pytest.approx(r["model_tflops_per_device"] / doc["ceilings"]["matmul_tflops"])
        for peer in gpu_check.PEERS:
            theirs = [p for p in measured if p["tool"] == peer and (p["seq_len"], p["micro_batch"]) == (r["seq_len"], r["micro_batch"])]
            assert r[f"vs_{peer}"] == (pytest.approx(r["tokens_per_s"] / theirs[0]["tokens_per_s"]) if theirs else None)
        assert r["loss_last"] < 10
    if not TORCH:
        assert all(r["status"] == "skipped" and "torch" in r["reason"] for r in rows if r["tool"] != "jaxlayouts")
    kernels = {(k["kernel"], k["implementation"]): k["status"] for k in doc["kernels"]}
    assert kernels == {("attention", "xla"): "ok", ("rms_norm", "xla"): "ok", ("rms_norm", "pallas"): "ok"}
    assert "CPU dry run" in md and "measure only the code path" in md and doc["command"] in md
    assert md.count("| jaxlayouts | 32 |") == 2 and "Incomplete" not in md
    lines = [json.loads(line) for line in next(out_dir.glob("*[0-9].jsonl")).read_text().splitlines()]
    assert [r["kind"] for r in lines].count("row") == len(rows) and lines[-1]["kind"] == "done"
    raw = [json.loads(line) for line in next(out_dir.glob("*.raw.jsonl")).read_text().splitlines()]
    assert len(raw) == len(measured) and all(r["status"] == "ok" for r in raw)
    assert "device cpu (cpu)" in stderr


def test_a_run_cut_off_keeps_what_it_measured(tmp_path):
    proc = run_kit(tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if list(tmp_path.glob("cpu-*[0-9].json")) and outputs(tmp_path)[0]["rows"]:
                break
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the kit and its children: a cut-off run
        proc.communicate()
    doc, md = outputs(tmp_path)
    assert not doc["complete"] and "Incomplete" in md
    assert [r["key"] for r in doc["rows"]] == ["jaxlayouts/32/1/none/xla/xla"] and doc["rows"][0]["status"] == "ok"
    assert [t["key"] for t in doc["not_run"]] == [t["key"] for t in gpu_check.plan(gpu_check.DRY_RUN, gpu_check.torch_missing())][1:]
    assert all(t["reason"].startswith("not reached") for t in doc["not_run"])
    assert "| jaxlayouts | 32 | 1 |" in md
