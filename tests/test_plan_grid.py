"""``plan grid`` and ``plan validate`` on compiled rows: the grid command appends one row per
layout, resumes, and records a failing point as a row; validation of a small committed fixture of
XLA:GPU compiled rows gives the expected error figures."""

import json
import pathlib

import pytest

from jaxlayouts.plan import memcheck
from jaxlayouts.plan.grid import read_grid, run_grid
from jaxlayouts.plan.hardware import load_hardware

FIXTURE = pathlib.Path(__file__).resolve().parent / "data" / "h100_grid_rows.jsonl"

GRID = """
groups:
  - {model: tiny, seq_len: 32, global_batch: 8, dtype: float32,
     base: "dp=2 mbs=1 zero=0", vary: {remat: [none, full]}}
  - {model: tiny, seq_len: 32, global_batch: 8, dtype: float32,
     layouts: ["fsdp=2 mbs=1 zero=1", "dp=2 mbs=3 zero=0"]}
"""


def test_grid_reads_products_and_text_forms(tmp_path):
    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    points = read_grid(str(path))
    assert [p.layout for p in points] == [
        "dp=2,fsdp=1,tp=1,pp=1 mbs=1 zero=0 sp=0 remat=none attn=xla norm=xla",
        "dp=2,fsdp=1,tp=1,pp=1 mbs=1 zero=0 sp=0 remat=full attn=xla norm=xla",
        "dp=1,fsdp=2,tp=1,pp=1 mbs=1 zero=1 sp=0 remat=none attn=xla norm=xla",
        "dp=2,fsdp=1,tp=1,pp=1 mbs=3 zero=0 sp=0 remat=none attn=xla norm=xla"]


def test_grid_compiles_resumes_and_records_failures(tmp_path, monkeypatch):
    import jaxlayouts.analysis.compiled as compiled

    path, out = tmp_path / "grid.yaml", tmp_path / "rows.jsonl"
    path.write_text(GRID)
    real = compiled.compile_step

    def failing(run, devices=None):  # the ZeRO-1 point fails to compile, as XLA errors do
        if run.layout.zero == 1:
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while compiling (test)")
        return real(run, devices)

    monkeypatch.setattr(compiled, "compile_step", failing)
    hw, log = load_hardware("h100-80gb"), []
    counts = run_grid(str(path), "cpu", str(out), hw=hw, log=log.append)
    assert counts == {"points": 4, "skipped": 0, "compiled": 2, "error": 1, "invalid": 1}
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["compiled", "compiled", "error", "invalid"]
    ok = rows[0]
    assert ok["memory"]["compiled_peak_bytes"] > 0 and ok["compile_s"] > 0 and ok["planner_memory_gib"]["total"] > 0
    assert ok["source"].startswith("XLA:CPU") and ok["jax_version"] and "commit" in ok
    assert "RESOURCE_EXHAUSTED" in rows[2]["error"] and "global_batch" in rows[3]["error"]
    assert any("[1/4] compiled" in line for line in log)
    again = run_grid(str(path), "cpu", str(out), hw=hw, log=log.append)   # resumes: nothing left
    assert again["skipped"] == 4 and again["compiled"] == 0 and len(out.read_text().splitlines()) == 4
    monkeypatch.setattr(compiled, "compile_step", real)
    retried = run_grid(str(path), "cpu", str(out), hw=hw, retry_errors=True, log=log.append)
    assert retried["compiled"] == 1 and len(out.read_text().splitlines()) == 5


def test_a_point_whose_compile_aborted_the_process_is_an_error_row_on_rerun(tmp_path):
    """An XLA check failure kills the process mid-compile; the marker it leaves makes the rerun
    record that point as an error and go on (not abort again on it)."""
    path, out = tmp_path / "grid.yaml", tmp_path / "rows.jsonl"
    path.write_text(GRID)
    first = read_grid(str(path))[0]
    pathlib.Path(f"{out}.compiling").write_text(first.key("cpu"))
    run_grid(str(path), "cpu", str(out), hw=load_hardware("h100-80gb"), log=lambda _: None)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["key"] == first.key("cpu") and rows[0]["status"] == "error" and "aborted" in rows[0]["error"]
    assert [r["status"] for r in rows[1:]] == ["compiled", "compiled", "invalid"]
    assert not pathlib.Path(f"{out}.compiling").exists()


def test_validate_on_compiled_rows_gives_the_expected_errors():
    rows, statuses = memcheck.read_grid_rows(str(FIXTURE))
    result = memcheck.evaluate_grid(rows, load_hardware("h100-80gb"))
    assert statuses == EXPECTED["statuses"] and result["layouts"] == EXPECTED["layouts"]
    for name in ("median_abs", "p90_abs", "max_abs"):
        assert result["memory"][name] == pytest.approx(EXPECTED[name], abs=5e-4), name
    assert result["fits_agreement"] == pytest.approx(EXPECTED["fits_agreement"])
    text = memcheck.report(str(FIXTURE), result, statuses, load_hardware("h100-80gb"))
    assert "compiled peak" in text and "measured" not in text.replace("not measured", "")


EXPECTED = {"statuses": {"compiled": 10}, "layouts": 10, "median_abs": 0.0233, "p90_abs": 0.0638,
            "max_abs": 0.1262, "fits_agreement": 1.0}
"""``plan validate tests/data/h100_grid_rows.jsonl --hardware h100-80gb``: ten XLA:GPU rows of the
committed grid (llama-7b and 13b; ZeRO 0-3, every remat policy, SP, each pipeline schedule; the
four pipeline rows compiled again on 2026-12-05 after the pipeline's collectives went per tp
tile). The largest error is llama-7b ZeRO-3 circular with full remat (+12.6%)."""
