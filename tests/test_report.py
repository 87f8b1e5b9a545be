"""The report: reads the reference study's CSV format, refuses files that are not results."""

import pytest

from jaxlayouts import report


def test_report_reads_the_reference_study_format(tmp_path):
    csv = tmp_path / "runs.csv"
    csv.write_text(
        "sweep,model,seq_len,world_size,micro_batch_size,tp,pp,sequence_parallel,activation_checkpointing,"
        "kernel,status,step_time_s,mfu,tflops_megatron\n"
        "s,13B,2048,64,1,1,1,False,disabled,flash_attention2,ok,30.0,0.55,180\n"
        "s,13B,2048,64,1,2,1,False,every_layer,flash_attention2,ok,40.0,0.45,150\n"
        "s,13B,2048,64,8,2,2,False,disabled,torch,oom,,,\n"
        "t,13B,2048,32,1,1,1,False,disabled,flash_attention2,ok,55.0,0.60,190\n")
    rows = report.load(csv)
    assert rows[1]["remat"] == "full" and rows[1]["layout"] == "dp=32,tp=2,pp=1 mbs=1 sp=0 remat=full kernel=flash_attention2"
    made = report.write_report(csv, tmp_path / "out")
    assert "step_time_scaling.png" in made and "tp_pp_heatmap.png" in made
    text = (tmp_path / "out" / "report.md").read_text()
    assert "Metric: MFU" in text
    assert "| s | `dp=64,tp=1,pp=1 mbs=1 sp=0 remat=none kernel=flash_attention2` | 55.0% | 30 |" in text


def test_report_of_a_missing_file_exits_2(tmp_path):
    assert report.main([str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2


def test_report_rejects_files_that_are_not_results(tmp_path):
    foreign = tmp_path / "foreign.jsonl"
    foreign.write_text('{"foo": 1}\n')
    with pytest.raises(ValueError, match="foreign.jsonl:1 is not a bench or sweep result"):
        report.load(foreign)
    table = tmp_path / "table.csv"
    table.write_text("sweep,model\ns,13B\n")
    with pytest.raises(ValueError, match="no column .*'tp'"):
        report.load(table)
    assert report.main([str(foreign), "--out", str(tmp_path / "out")]) == 2


def _row(**changes):
    import json
    base = {"status": "ok", "key": "k", "sweep": "s", "model": "tiny", "layout": "dp=2 mbs=1", "error": None,
            "step_time_s": 0.5, "mfu": 0.25, "seq_len": 32, "num_devices": 2, "mesh": {"tp": 1, "pp": 1}}
    return json.dumps({**base, **changes}) + "\n"


def test_table_cells_escape_pipes_and_line_breaks(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(_row(sweep="a|b\nc", layout="dp=2 | x`y") +
                    _row(key="j", status="error", error="boom | bang\nTraceback", sweep="a|b\nc"))
    text = report.markdown(report.load(path), "x|y.jsonl", [])
    assert len([line for line in text.splitlines() if line.startswith("| a\\|b c |")]) == 4
    assert "| a\\|b c | `dp=2 \\| x'y` | ok | 25.0% | 0.5 |" in text
    assert "boom \\| bang Traceback |" in text and "Source: `x\\|y.jsonl`" in text
    # every table row has as many unescaped cell separators as its header
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if line.startswith("|")]
        if lines:
            counts = {line.replace("\\|", "").count("|") for line in lines}
            assert len(counts) == 1, lines


@pytest.mark.parametrize("step_time", [0, 0.0])
def test_a_row_that_ran_in_no_time_is_refused(tmp_path, step_time):
    path = tmp_path / "r.jsonl"
    path.write_text(_row() + _row(key="z", step_time_s=step_time))
    with pytest.raises(ValueError, match=f"r.jsonl:2: step_time_s is {step_time!r}"):
        report.load(path)
    path.write_text(_row(key="z", status="invalid", step_time_s=0))   # a row that measured nothing may hold it
    assert report.load(path)[0]["status"] == "invalid"


def test_cpu_timings_carry_a_caveat_wherever_they_are_ranked(tmp_path):
    import json
    from jaxlayouts.sweep import cpu_caveat
    rows = [{"status": "ok", "platform": "cpu", "steps": 2, "model": "tiny", "layout": f"dp=2 remat={remat}",
             "step_time_s": t, "model_tflops_per_device": 1 / t} for remat, t in (("full", 0.40), ("none", 1.03))]
    path = tmp_path / "cpu.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report.write_report(path, tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    caveat = cpu_caveat(rows)
    assert caveat.startswith("2 timing(s) here come from emulated CPU devices (XLA:CPU on a shared host, 2 timed step(s) each)")
    assert f"**Caveat:** {caveat}." in text and text.count("(CPU emulation: see the caveat above.)") == 2
    assert cpu_caveat([{**rows[0], "platform": "gpu"}]) is None
