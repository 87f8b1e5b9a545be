"""Explore from Python and the shell: the notebook's calls, any scale, the report's fields."""

import json
import pathlib
import subprocess
import sys

import pytest
from conftest import clean_env, make_run, run_module

from jaxlayouts.analysis.compiled import XLA_CPU_DEVICE_LIMIT, compiled_run
from jaxlayouts.schema import InvalidInput

ROOT = pathlib.Path(__file__).resolve().parent.parent


NOTEBOOK = ROOT / "docs" / "explore.ipynb"


def test_the_notebook_runs_top_to_bottom_in_a_fresh_python(tmp_path):
    """The notebook's code cells, in order, in a new interpreter with no environment set up, on
    the tiny model (its first cell holds the run's sizes)."""
    cells = ["".join(c["source"]) for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code"]
    assert cells[0].startswith("# The run") and "MODEL, SEQ_LEN, GLOBAL_BATCH =" in cells[0]
    assert 'TARGET = "h100-80gb"' in cells[0]  # the notebook leads with XLA:GPU's program
    cells[0] = 'MODEL, SEQ_LEN, GLOBAL_BATCH = "tiny", 32, 64\nTARGET = "h100-80gb"'
    script = "\n".join(cells) + ("\nprint(r.text()); print(c.text())\nc.figure.savefig('compare.png')\n"
                                  # shown once in a notebook: show() returns nothing, the figure is not pyplot's
                                  "import matplotlib.pyplot as plt\nassert r.show('residual') is None\n"
                                  "assert c.figure is c.figure and plt.get_fignums() == []\n")
    env = {k: v for k, v in clean_env().items() if k not in ("JAX_PLATFORMS",)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "layers/attn/wq 4x128x8x16 float32" in out and "8 distinct shard(s) of 4x16x8x16, each on 1" in out
    assert "residual 32x32x128 bfloat16" in out and "8 distinct shard(s) of 4x32x128, each on 1" in out
    assert "dp=1,fsdp=2,tp=4,pp=1 mbs=4 zero=2" in out and "predicted_mfu" in out
    assert "compiled    by XLA:GPU (NVIDIA H100 80GB HBM3, no GPU) for target h100-80gb" in out
    assert "Trust the XLA:GPU figure" in out and "on h100-80gb (fits;" in out
    assert (tmp_path / "compare.png").stat().st_size > 10_000


def test_too_few_devices_in_this_process_compile_in_a_child(capsys):
    """The tests' JAX started with 8 devices: a 16-device layout compiles in a child process."""
    from jaxlayouts import explore
    report = explore.layout("tiny", mesh="dp=4,tp=4", seq_len=32, global_batch=4, zero=0, vocab_size=1024)
    assert "compiling on 16 emulated CPU devices in a child process" in capsys.readouterr().out
    assert report["num_devices"] == 16 and report["layout"].startswith("dp=4,fsdp=1,tp=4,pp=1")
    assert {p["name"]: p["shape"] for p in report["params"]}["embedding"] == [1024, 128]  # every knob reaches it
    assert any(c["axes"] == ["tp"] for c in report["collectives"])


def test_layouts_beyond_the_cpu_limit_compile_with_fewer_replicas():
    run = make_run(f"dp={2 * XLA_CPU_DEVICE_LIMIT}", global_batch=4 * XLA_CPU_DEVICE_LIMIT)
    smaller, note = compiled_run(run)
    assert smaller.layout.mesh["dp"] == XLA_CPU_DEVICE_LIMIT and smaller.global_batch == 2 * XLA_CPU_DEVICE_LIMIT
    assert smaller.grad_accum_steps == run.grad_accum_steps and "only the dp groups are 2x smaller" in note
    assert compiled_run(make_run("dp=2"))[1] is None
    with pytest.raises(InvalidInput, match="the other axes use at most that many"):
        compiled_run(make_run(f"fsdp={2 * XLA_CPU_DEVICE_LIMIT}", global_batch=2 * XLA_CPU_DEVICE_LIMIT))


def test_the_command_line_prints_text_or_json_not_both():
    args = [sys.executable, "-m", "jaxlayouts.explore", "--mesh", "dp=2,tp=2", "--seq_len", "32", "--global_batch", "4"]
    text = subprocess.run(args, capture_output=True, text=True, timeout=300, env=clean_env(), cwd=ROOT)
    assert text.returncode == 0 and not text.stdout.strip().splitlines()[-1].startswith("{")
    assert "collectives per step" in text.stdout and "predicted" in text.stdout
    data = subprocess.run([*args, "--json"], capture_output=True, text=True, timeout=300, env=clean_env(), cwd=ROOT)
    assert data.returncode == 0 and len(data.stdout.strip().splitlines()) == 1
    assert json.loads(data.stdout)["layout"].startswith("dp=2,fsdp=1,tp=2,pp=1")


def test_explore_reports_shardings_memory_and_collectives():
    proc, report = run_module("jaxlayouts.explore", "--mesh", "dp=2,tp=2,pp=2", "--dtype", "float32", "--json")
    assert proc.returncode == 0, proc.stderr[-2000:]
    params = {p["name"]: p for p in report["params"]}
    assert params["layers/mlp/w1"]["spec"] == "P('pp', None, 'tp')"
    assert params["layers/mlp/w1"]["logical_axes"] == ["layers", "embed", "mlp"]
    assert params["layers/mlp/w1"]["bytes_per_device"] == 4 * 128 * 384 * 4 // 4  # 4 layers / pp / tp
    assert set(report["memory"]) == {"compiled", "analytic", "notes", "usable"}
    assert report["memory"]["usable"] == 0.75 * 80 * 2**30  # a100-80gb: JAX's 75% of 80 GiB
    assert (report["target"], report["compiler"]) == ("cpu", "XLA:CPU (emulated devices)")
    assert report["memory"]["compiled"]["peak"] > report["memory"]["compiled"]["parameters"] > 0
    kinds = {(c["kind"], tuple(c["axes"])) for c in report["collectives"]}
    assert ("collective-permute", ("pp",)) in kinds and ("all-reduce", ("tp",)) in kinds
    assert report["model_flops_per_step"] == 7084800 * 32 * 256  # 6N + 12 L d T per token at T = 256
