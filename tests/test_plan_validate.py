"""The planner against measured runs: fits, validation on small files, the study and the H200 rows."""

import csv
import json
import pathlib

import pytest
from conftest import run_module

from jaxlayouts.layout import CONFIG_DIR, InvalidInput
from jaxlayouts.plan.hardware import load_hardware
from jaxlayouts.plan.validate import evaluate, fit, read_rows

STUDY_CSV = pathlib.Path(__file__).resolve().parents[2] / "shared" / "paper-data" / "calibration_runs.csv"


H200_ROWS = CONFIG_DIR / "hardware" / "measured" / "h200-2026-11-30.jsonl"


def test_fit_lowers_the_error_on_a_small_file(tmp_path):
    from jaxlayouts.plan.validate import evaluate, fit, read_rows
    path = tmp_path / "runs.csv"
    path.write_text("sweep,model,seq_len,world_size,micro_batch_size,tp,pp,sequence_parallel,"
                    "activation_checkpointing,kernel,status,step_time_s,mfu,tflops_megatron\n"
                    + "".join(f"s,13B,2048,64,1,{tp},1,False,disabled,flash_attention2,ok,1,{mfu},1\n"
                              for tp, mfu in ((1, 0.30), (2, 0.28), (4, 0.25)))
                    + "s,13B,2048,64,4,2,1,False,disabled,flash_attention2,oom,,,\n")
    rows, hw = read_rows(str(path)), load_hardware("a100-80gb")
    assert evaluate(rows, hw)["oom_accuracy"] == 0.75   # tp=1 is predicted not to fit
    fitted = fit(rows, hw, rounds=1, log=lambda *_: None)
    assert evaluate(rows, fitted)["oom_accuracy"] == 1.0
    assert evaluate(rows, fitted)["mfu_mape"] < 0.5 * evaluate(rows, hw)["mfu_mape"]


def test_memory_fit_gives_tensor_parallel_activations_their_own_factor(tmp_path):
    # The study's 13B tp=1, pp=1 run fits 80 GB with little room for activations; its 30B tp=2,
    # pp=4 run, with more activations and fewer weights, ran out of memory. No single activation
    # factor (with any overhead >= 0) classifies both; a separate factor for tp > 1 does.
    from jaxlayouts.plan.validate import _with, evaluate, fit_memory, read_rows
    path = tmp_path / "runs.csv"
    path.write_text("sweep,model,seq_len,world_size,micro_batch_size,tp,pp,sequence_parallel,"
                    "activation_checkpointing,kernel,status,step_time_s,mfu,tflops_megatron\n"
                    "a,13B,2048,64,1,1,1,False,disabled,flash_attention2+rms_kernel,ok,26.5,0.706,1\n"
                    "b,30B,2048,256,2,2,4,False,disabled,flash_attention2,oom,,,\n")
    rows, hw = read_rows(str(path)), load_hardware("a100-80gb")
    fitted = fit_memory(rows, hw)
    assert evaluate(rows, fitted)["oom_accuracy"] == 1.0 and fitted.calibration.tp_activation_factor > 1.0
    for factor in (1.0, 1.2, 1.4, 1.6, 1.8, 2.0):
        one = _with(hw, activation_factor=factor, tp_activation_factor=1.0, overhead_gib=0.0)
        assert evaluate(rows, one)["oom_accuracy"] < 1.0


def test_validation_on_a_small_file(tmp_path):
    from jaxlayouts.plan.validate import spearman
    assert spearman([1, 1, 2], [1, 2, 3]) == pytest.approx(0.8660, abs=1e-4)  # ties share a rank
    rows = ["sweep,model,seq_len,world_size,micro_batch_size,tp,pp,sequence_parallel,"
            "activation_checkpointing,kernel,status,step_time_s,mfu,tflops_megatron"]
    rows += [f"s,13B,2048,64,1,{tp},1,False,disabled,flash_attention2+rms_kernel,ok,1,{mfu},1"
             for tp, mfu in ((1, 0.70), (2, 0.62), (4, 0.55), (8, 0.40))]
    rows += ["s,13B,2048,64,8,1,1,False,disabled,torch,oom,,,"]
    path = tmp_path / "runs.csv"
    path.write_text("\n".join(rows) + "\n")
    predictions = tmp_path / "predictions.csv"
    proc, result = run_module("jaxlayouts.plan", "validate", str(path), "--json", "--predictions", str(predictions))
    assert proc.returncode == 0, proc.stderr[-2000:]
    written = list(csv.DictReader(predictions.open()))
    assert [r["mfu"] for r in written] == ["0.7", "0.62", "0.55", "0.4", ""]
    top = max((r for r in written if r["predicted_fits"] == "True"), key=lambda r: float(r["predicted_mfu"]))
    assert float(top["predicted_mfu"]) == pytest.approx(result["sweeps"]["s"]["top_ranked_predicted_mfu"], abs=1e-4)
    assert written[-1]["predicted_fits"] == "False" and float(written[-1]["predicted_memory_gib"]) > 80
    assert result["rows"] == 5 and 0 <= result["oom_accuracy"] <= 1 and result["mfu_mape"] >= 0
    sweep = result["sweeps"]["s"]
    assert sweep["best_measured_mfu"] == 0.70
    assert -1 <= sweep["spearman"] <= 1 and sweep["ok_rows"] == 4
    assert sweep["measured_mfu_of_top_ranked"] in (0.70, 0.62, 0.55, 0.40)
    assert sweep["top_ranked"].startswith("tp=")


@pytest.mark.skipif(not STUDY_CSV.is_file(), reason="the reference study's data is not beside this checkout")
def test_validation_against_the_study_meets_its_targets():
    from jaxlayouts.plan.validate import evaluate, read_rows
    result = evaluate(read_rows(str(STUDY_CSV)), load_hardware("a100-80gb"))
    assert result["rows"] == 639
    assert result["oom_accuracy"] >= 0.90
    assert result["mfu_mape"] <= 0.10
    sweeps = result["sweeps"].values()
    assert all(s["spearman"] >= 0.8 for s in sweeps)
    # the layout ranked first is within 5% of the best measured in 4 of the 6 sweeps (docs/measurements.md)
    assert sum((s["measured_mfu_of_top_ranked"] or 0) >= 0.95 * s["best_measured_mfu"] for s in sweeps) >= 4


def test_validation_names_a_bad_row():
    from jaxlayouts.plan.validate import workload
    row = {"sweep": "s", "model": "13B", "seq_len": "2048", "world_size": "64", "micro_batch_size": "1",
           "tp": "1", "pp": "1", "sequence_parallel": "False", "activation_checkpointing": "disabled"}
    with pytest.raises(InvalidInput, match="kernel 'xformers' in sweep 's'"):
        workload({**row, "kernel": "xformers"})
    with pytest.raises(InvalidInput, match="sweep 's': .*'2k'; sizes are integers"):
        workload({**row, "kernel": "torch", "seq_len": "2k"})
    for bad in ({"pp": "64"}, {"tp": "3"}, {"world_size": "0"}):
        with pytest.raises(InvalidInput, match="sweep 's': .*tp x pp divides world_size"):
            workload({**row, "kernel": "torch", **bad})


def test_a_fit_on_some_h200_rows_predicts_the_held_out_ones():
    """Fit on four of the seven measured rows (pallas attention, xla attention, full remat, pallas
    norm), validate on the other three (every third row: cuDNN at micro-batch 1 and 4, and at
    T 8192), which the fit never sees. Issue 20's targets: MFU error <= 10%, memory within 10%."""
    rows = read_rows(str(H200_ROWS))
    assert len(rows) == 7 and all(r["measured_peak_gib"] for r in rows)
    held_out, fitted_on = rows[0::3], [r for i, r in enumerate(rows) if i % 3]
    hw = fit(fitted_on, load_hardware("h200"), rounds=1, log=lambda *_: None)
    result = evaluate(held_out, hw)
    assert result["mfu_mape"] <= 0.10 and result["memory_mape"] <= 0.10 and result["oom_accuracy"] == 1.0
    sweep = next(iter(result["sweeps"].values()))
    assert sweep["spearman"] == 1.0 and sweep["measured_mfu_of_top_ranked"] == sweep["best_measured_mfu"]


def test_the_shipped_h200_calibration_fits_its_rows():
    result = evaluate(read_rows(str(H200_ROWS)), load_hardware("h200"))
    assert result["mfu_mape"] <= 0.05 and result["memory_mape"] <= 0.05
    assert load_hardware("h100-80gb").calibration == load_hardware("h200").calibration


def test_bench_rows_are_read_or_named(tmp_path):
    good = json.loads(H200_ROWS.read_text().splitlines()[0])
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({**good, "status": "error"}) + "\n" + json.dumps(good) + "\n")
    rows = read_rows(str(path))
    assert len(rows) == 1 and rows[0]["sweep"] == "llama-1b on 1 x NVIDIA H200"
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "layout"}) + "\n")
    with pytest.raises(InvalidInput, match=r"rows.jsonl:1: a bench row needs .*missing \['layout'\]"):
        read_rows(str(path))
    path.write_text(json.dumps({**good, "mfu": None}) + "\n")
    with pytest.raises(InvalidInput, match="mfu is None; it must be a fraction .*an ok row needs one"):
        read_rows(str(path))
    path.write_text("not json\n")  # (a line starting with "{" that does not parse is a torn write: skipped)
    with pytest.raises(InvalidInput, match="rows.jsonl:1: not a JSON bench row"):
        read_rows(str(path))


def test_rows_from_other_hardware_are_warned_about():
    from jaxlayouts.plan.validate import hardware_mismatch
    study, h200 = read_rows("tests/data/study_rows.csv"), read_rows(str(H200_ROWS))
    assert hardware_mismatch(study, load_hardware("a100-80gb")) is None
    assert hardware_mismatch(h200, load_hardware("h200")) is None
    warning = hardware_mismatch(study, load_hardware("h200"))
    assert "--hardware h200, but the rows were measured on a100-80gb (the reference study)" in warning
    assert "e.g. --hardware a100-80gb" in warning
    assert "measured on NVIDIA H200" in hardware_mismatch(h200, load_hardware("a100-80gb"))


def test_rows_run_at_another_memory_fraction_are_warned_about():
    """A bench row records the allocator's fraction it ran with; validating it against a hardware
    file that assumes another names both and the flag that makes them agree."""
    import dataclasses

    from jaxlayouts.plan.validate import hardware_mismatch
    rows = read_rows(str(H200_ROWS))
    h200 = load_hardware("h200")
    rows[0]["_raw"] = {**rows[0]["_raw"], "memory_fraction": 0.95}
    warning = hardware_mismatch(rows, h200)
    assert warning == ("the rows ran with JAX's allocator at memory_fraction 0.95, but h200 assumes 0.75, so what "
                       "fits differs: validate with --memory_fraction 0.95, or bench with the hardware file's "
                       "fraction (launch/slurm.sbatch exports it)")
    assert hardware_mismatch(rows, dataclasses.replace(h200, memory_fraction=0.95)) is None
    rows[0]["_raw"]["memory_fraction"] = 0.75  # the same as the file's: nothing to say
    assert hardware_mismatch(rows, h200) is None


def test_cross_model_fits_on_one_model_and_predicts_the_other(tmp_path):
    from jaxlayouts.plan.validate import cross_model, cross_model_markdown, fitted_on
    path = tmp_path / "runs.csv"
    path.write_text("sweep,model,seq_len,world_size,micro_batch_size,tp,pp,sequence_parallel,"
                    "activation_checkpointing,kernel,status,step_time_s,mfu,tflops_megatron\n"
                    + "".join(f"a,13B,2048,64,1,{tp},1,False,disabled,torch,ok,1,{mfu},1\n"
                              for tp, mfu in ((2, 0.40), (4, 0.35)))
                    + "".join(f"b,30B,2048,64,1,{tp},2,False,disabled,flash_attention2,ok,1,{mfu},1\n"
                              for tp, mfu in ((2, 0.45), (4, 0.40), (8, 0.30))))
    rows, hw = read_rows(str(path)), load_hardware("a100-80gb")
    result = cross_model(rows, hw, rounds=1)
    assert list(result) == ["13B", "30B"] and result["30B"]["fitted_on"] == ["13B"]
    assert (result["30B"]["train_rows"], result["30B"]["heldout"]["rows"]) == (2, 3)
    assert result["30B"]["calibration"] == evaluate(rows[2:], hw)   # the shipped file on the same rows
    heldout = result["13B"]["heldout"]
    assert heldout["mfu_median_ape"] == pytest.approx(heldout["mfu_mape"])  # two rows: median = mean
    table = cross_model_markdown(result, "CMD", "a100-80gb.calibration.yaml", "2026-12-05")
    assert "Generated on 2026-12-05 by `CMD`" in table
    assert f"| 30B | 13B (2 rows) | 3 | {result['30B']['heldout']['oom_accuracy']:.1%} / " in table
    assert f"| b | {result['30B']['heldout']['sweeps']['b']['spearman']:.3f} / " in table
    assert fitted_on(rows, "runs.csv").attention == ("xla",)  # the study's unfused attention is costed as ours
    with pytest.raises(InvalidInput, match="needs two"):
        cross_model(rows[:2], hw)
