"""Sweeps: grids resolve as written, bad points become rows, and a sweep survives kill -9."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from jaxlayouts import report, sweep
from jaxlayouts.schema import InvalidInput


CPU_SMOKE = "configs/sweeps/cpu_smoke.yaml"


def write_sweep(tmp_path, text):
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return sweep.load_sweep(path)


def test_grid_product_skip_and_derived_data_axis(tmp_path):
    s = write_sweep(tmp_path, """
devices: 16
data_axis: fsdp
base: {model: tiny, zero: 1}
grid: {tp: [1, 2], pp: [1, 2], sequence_parallel: [false, true]}
skip: [{sequence_parallel: true, tp: 1}]
""")
    pts = sweep.points(s)
    assert len(pts) == 6
    assert {p["mesh"] for p in pts} == {f"dp=1,fsdp=-1,tp={tp},pp={pp}" for tp in (1, 2) for pp in (1, 2)}
    assert all(p["zero"] == 1 and p["model"] == "tiny" for p in pts)


def test_point_keys_are_stable_and_distinct(tmp_path):
    s = write_sweep(tmp_path, "devices: 8\ngrid: {tp: [1, 2], micro_batch: [1, 2]}\n")
    keys = [sweep.point_key(p, s) for p in sweep.points(s)]
    again = [sweep.point_key(p, s) for p in sweep.points(s)]
    assert keys == again and len(set(keys)) == 4


@pytest.mark.parametrize("text, message", [
    ("grid: {tp: [1]}\nbase: {colour: red}\n", "base: unknown knobs \\['colour'\\]"),
    ("grid: {tp: 2}\n", "grid.tp: give a non-empty list"),
    ("grid: {tp: [2]}\n", "devices: the mesh dp=-1"),
    ("grid: {tp: [2]}\nwhatever: 1\n", "unknown fields \\['whatever'\\]"),
    ("devices: 8\ndata_axis: tp\ngrid: {tp: [2]}\n", "data_axis: unknown data axis 'tp'; choose one of dp, fsdp"),
    ("devices: 8\ngrid: {tp: [2]}\nskip: [tp]\n", "skip: give a list of partial points"),
])
def test_bad_sweep_files_name_the_key(tmp_path, text, message):
    with pytest.raises(InvalidInput, match=message):
        sweep.points(write_sweep(tmp_path, text))


def test_bad_sweep_file_exits_2(tmp_path):
    (tmp_path / "s.yaml").write_text("grid: {tp: 2}\n")
    assert sweep.main([str(tmp_path / "s.yaml"), "--out", str(tmp_path / "r.jsonl")]) == 2


def test_invalid_points_are_found_without_launching(tmp_path):
    s = write_sweep(tmp_path, "devices: 8\nbase: {model: tiny}\ngrid: {tp: [8]}\n")
    (point,) = sweep.points(s)
    row = sweep.prevalidate(point, s)
    assert row["status"] == "invalid" and "tp=8 does not divide num_kv_heads=4" in row["error"]
    assert row["layout"].startswith("dp=1,fsdp=1,tp=8")


def test_dry_run_writes_nothing(tmp_path):
    (tmp_path / "s.yaml").write_text("devices: 1\nbase: {model: tiny}\ngrid: {micro_batch: [1, 1, 2]}\n")
    out = tmp_path / "r.jsonl"
    out.write_text('{"key": "x", "status": "ok"}')  # a complete row without its newline
    assert sweep.main([str(tmp_path / "s.yaml"), "--out", str(out), "--dry-run"]) == 0
    assert out.read_text() == '{"key": "x", "status": "ok"}'
    assert len(sweep.points(sweep.load_sweep(tmp_path / "s.yaml"))) == 2  # duplicate values: one point


def test_bad_points_become_invalid_rows_and_the_rest_runs(tmp_path):
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\nnum_layers: [4\n")
    (tmp_path / "s.yaml").write_text(
        f"devices: 1\nbase: {{seq_len: 16, global_batch: 2, steps: 1, warmup: 0, dtype: float32}}\n"
        f"grid: {{model: [{broken}, tiny], micro_batch: [1, x]}}\n")
    out = tmp_path / "r.jsonl"
    assert sweep.main([str(tmp_path / "s.yaml"), "--out", str(out)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_status = {}
    for row in rows:
        by_status.setdefault(row["status"], []).append(row)
    assert len(rows) == 4 and len(by_status["ok"]) == 1 and len(by_status["invalid"]) == 3
    errors = " ".join(r["error"] for r in by_status["invalid"])
    assert "--model: " in errors and "cannot read it as YAML" in errors
    assert "--micro_batch: 'x' is not an integer" in errors


def _bench_processes():
    out = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    # cpu_smoke's points, not benches other tests run at the same time
    return [line for line in out.splitlines() if "-m jaxlayouts.bench" in line and "device_memory_gb=0.04" in line]


def test_cpu_smoke_survives_kill_9_and_reports(tmp_path):
    out = tmp_path / "cpu_smoke.jsonl"
    total = len(sweep.points(sweep.load_sweep(CPU_SMOKE)))
    command = [sys.executable, "-m", "jaxlayouts.sweep", CPU_SMOKE, "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while time.time() < deadline and (not out.exists() or out.read_text().count("\n") < 3):
        time.sleep(0.5)
    time.sleep(2)  # the next point is in flight
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    assert not _bench_processes(), "the point in flight outlived its sweep"
    before = {json.loads(line)["key"]: json.loads(line) for line in out.read_text().splitlines()}
    assert 3 <= len(before) < total

    subprocess.run(command, check=True, capture_output=True, timeout=900)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    keys = [r["key"] for r in rows]
    assert len(keys) == len(set(keys)) == total  # every point once, none lost, none twice
    for key, row in before.items():  # points recorded before the kill were not run again
        assert next(r for r in rows if r["key"] == key) == row
    statuses = {r["status"] for r in rows}
    assert {"ok", "oom", "invalid"} <= statuses
    assert all(r["error"] for r in rows if r["status"] != "ok")

    again = subprocess.run(command, check=True, capture_output=True, text=True, timeout=120)
    assert f"{total} already in" in again.stderr and out.read_text().count("\n") == total

    made = report.write_report(out, tmp_path / "report")
    assert {"by_checkpointing.png", "by_micro_batch.png", "by_sequence_parallel.png",
            "tp_pp_heatmap.png"} <= set(made)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| cpu_smoke | " in text and "| oom |" in text and "| invalid |" in text


def test_index_runs_one_point_for_a_job_array(tmp_path):
    out = tmp_path / "point.jsonl"
    total = len(sweep.points(sweep.load_sweep(CPU_SMOKE)))
    assert sweep.main([CPU_SMOKE, "--out", str(out), "--index", str(total - 1)]) == 0  # a tp=8 point
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["status"] == "invalid" and row["point"]["mesh"] == "dp=-1,fsdp=1,tp=8,pp=1"
    assert sweep.main([CPU_SMOKE, "--out", str(out), "--index", str(total)]) == 2
    assert sweep.main([CPU_SMOKE, "--out", str(out), "--timeout", "-5"]) == 2


def test_a_point_past_its_timeout_is_recorded_as_timeout(tmp_path):
    (tmp_path / "s.yaml").write_text("devices: 1\ntimeout_s: 1\nbase: {model: tiny}\ngrid: {micro_batch: [1]}\n")
    out = tmp_path / "r.jsonl"
    assert sweep.main([str(tmp_path / "s.yaml"), "--out", str(out)]) == 0
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["status"] == "timeout" and "no result within 1 s" in row["error"]


@pytest.mark.parametrize("path", sorted(str(p) for p in pathlib.Path("configs/sweeps").glob("*.yaml")))
def test_every_shipped_sweep_file_resolves(path):
    s = sweep.load_sweep(path)
    points = sweep.points(s)
    assert points and len({sweep.point_key(p, s) for p in points}) == len(points)
