"""The prepared GPU session (launch/gpu_session.sh) on CPU: its steps log their exit status, and the
deviceless step compiles the kit's rows for the GPU they were measured on."""

import json
import os
import pathlib
import re
import subprocess

from conftest import clean_env

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "launch" / "gpu_session.sh"


def test_the_deviceless_step_compares_the_kits_rows_with_xla_gpu(tmp_path):
    kit = tmp_path / "kit"
    kit.mkdir()
    row = {"status": "ok", "model": "tiny", "layout": "dp=1 mbs=1", "seq_len": 32, "global_batch": 8,
           "dtype": "bfloat16", "mfu": 0.5, "step_time_s": 1.0, "device_kind": "NVIDIA H200",
           "memory": {"device_peak_bytes": 2**20}}  # a made-up peak: this test checks the path only
    (kit / "nvidia-h200-2026-12-04.raw.jsonl").write_text(json.dumps(row) + "\n")
    env = clean_env(OUT=str(tmp_path), SESSION_STEPS="deviceless")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)
    log = (tmp_path / "session.log").read_text()
    assert proc.returncode == 0 and "=== deviceless: exit 0" in log, log[-3000:]
    assert "=== kit" not in log and "=== tune" not in log  # the steps not asked for
    table = (tmp_path / "deviceless.md").read_text()
    assert "Compiled for `h200` without a GPU" in table and "Median |error|" in table


def test_the_session_fits_one_device_call():
    """The script parses, and its steps' time limits add up to less than one device call (600 s)."""
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0 and os.access(SCRIPT, os.X_OK)
    text = SCRIPT.read_text()
    limits = {}
    for name, limit in re.findall(r"^\s*step (\w+) (\S+) ", text, re.M):
        seconds = int(text.split("KIT_BUDGET_S:-")[1].split("}")[0]) + 20 if name == "kit" else int(limit)
        limits[name] = max(limits.get(name, 0), seconds)
    assert set(limits) == {"kit", "tune", "profile", "deviceless"} and sum(limits.values()) <= 580, limits
