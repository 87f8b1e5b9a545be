"""Bad input, by class: every entry point answers with a documented exit code and a message naming
the knob, never a traceback or a hang, and never changes an input file. Ends with a bounded fuzz."""

import hashlib
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import pytest
from absl import flags

from conftest import clean_env

from jaxlayouts import config
from jaxlayouts.layout import Layout, load_model_config
from jaxlayouts.schema import InvalidInput, knobs

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXIT = {"ok": 0, "error": 1, "invalid": 2, "oom": 3, "compile_error": 4}
QUICK = ["--seq_len", "16", "--global_batch", "2", "--steps", "1", "--warmup", "0", "--dtype", "float32"]


def cli(*args, timeout=120, cwd=ROOT):
    """Run ``python -m ARGS`` (from the project root unless ``cwd``); returns the finished process."""
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(PYTHONPATH=str(ROOT)), cwd=cwd)


def assert_clean(proc, codes=(0, 2)):
    """A documented exit code, and no Python traceback on either stream."""
    assert proc.returncode in codes, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]


# ---------------------------------------------------------------------------------------------
# 1. Every flag and file field is checked at the boundary, by type, range, finiteness, existence


@pytest.mark.parametrize("args, knob", [
    (["--seq_len", "abc"], "--seq_len: 'abc' is not an integer"),
    (["--learning_rate", "nan"], "--learning_rate: nan is not a finite number"),
    (["--learning_rate", "-0.1"], "--learning_rate: -0.1 must be greater than 0"),
    (["--peak_tflops", "inf"], "--peak_tflops: inf is not a finite number"),
    (["--micro_batch", "1.5"], "--micro_batch: '1.5' is not an integer"),
    (["--warmup", "-1"], "--warmup: -1 is below the least allowed value 0"),
    (["--mesh", "dp=100000"], "--mesh: dp=100000 needs 100000 devices; CPU emulation builds at most 8192"),
    (["--num_devices", "100000"], "--num_devices: 100000 is above the largest allowed value 8,192"),
    (["--checkpoint_dir", "README.md"], "--checkpoint_dir: README.md is a file"),
    (["--output", "jaxlayouts"], "--output: jaxlayouts is a directory"),
    (["--profile_dir", "README.md/traces"], "--profile_dir: README.md/traces cannot be created"),
    (["--norestore=1"], "--flags: "),
    (["--colour", "red"], "--flags: Unknown command line flag 'colour'"),
    (["extra"], "--flags: unexpected arguments ['extra']"),
    (["--seq_len", "100000000000"], "--seq_len: 100000000000 is above the largest allowed value 16,777,216"),
    (["--seq_len", "1048576", "--global_batch", "4096"], "--global_batch: 7 steps of 4096 x 1048577 tokens take"),
])
def test_bench_flags_are_checked_before_any_device(args, knob):
    proc = cli("jaxlayouts.bench", *args, timeout=60)
    assert_clean(proc, codes=(2,))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["status"] == "invalid" and result["error"].startswith(knob), result["error"]
    assert "compiling" not in proc.stderr


@pytest.mark.parametrize("text, message", [
    ("name: m\nnum_layers: [4\n", "cannot read it as YAML"),
    ("- 1\n- 2\n", "expected a mapping of field: value, found list"),
    ("name: m\nnum_layers: 4\n", "missing fields ['d_model'"),
    ("name: m\nnum_layers: 4\nd_model: 128\nnum_heads: 8\nnum_kv_heads: 4\nd_ff: 384\nvocab_size: 512\n"
     "norm_eps: -1.0e-5\n", "norm_eps -1e-05 must be greater than 0"),
    ("name: m\nnum_layers: four\nd_model: 128\nnum_heads: 8\nnum_kv_heads: 4\nd_ff: 384\nvocab_size: 512\n",
     "num_layers 'four' is not an integer"),
    ("name: m\nnum_layers: 4\nd_model: 128\nnum_heads: 8\nnum_kv_heads: 4\nd_ff: 384\nvocab_size: 512\n"
     "rope_theta: .nan\n", "rope_theta nan is not a finite number"),
    ("name: m\nnum_layers: 4\nd_model: 128\nnum_heads: 8\nnum_kv_heads: 4\nd_ff: 384\nvocab_size: 512\nflavour: 1\n",
     "unknown fields ['flavour']"),
])
def test_model_file_fields_are_checked(tmp_path, text, message):
    path = tmp_path / "m.yaml"
    path.write_text(text)
    with pytest.raises(InvalidInput, match=message.replace("[", "\\[").replace("(", "\\(")) as error:
        load_model_config(str(path))
    assert error.value.knob == "model" and str(path) in str(error.value)


def test_every_layout_field_round_trips_through_flags_text_and_result_row():
    """Each declared layout knob, set away from its default, survives the command line, the
    text form and a result row (the planner and explore build runs from the same values)."""
    non_default = {"micro_batch": "2", "zero": "1", "sequence_parallel": "true", "remat": "full",
                   "attention": "pallas", "norm": "pallas", "pipeline_schedule": "circular",
                   "virtual_stages": "2", "pipeline_microbatches": "4", "scan_layers": "false"}
    declared = [f.name for f in knobs(Layout) if f.name != "mesh"]
    assert sorted(non_default) == sorted(declared), "a new layout knob needs a value here"
    flag_values = flags.FlagValues()
    config.define_flags(flag_values)
    argv = ["bench", "--mesh=fsdp=2,tp=2,pp=2", "--model=tiny", "--global_batch=16", "--seq_len=32"]
    argv += [f"--{k}" if v == "true" else f"--no{k}" if v == "false" else f"--{k}={v}"
             for k, v in non_default.items()]
    flag_values(argv)
    run = config.run_config(config.values_from_flags(flag_values))
    layout = run.layout
    for name in declared:
        assert getattr(layout, name) != getattr(Layout(mesh={}), name), name
    assert Layout.parse(str(layout)) == layout
    row = config.describe(run)
    assert Layout(**{f.name: row[f.name] for f in knobs(Layout)}) == layout
    assert json.loads(json.dumps(row))["layout"] == str(layout)


@pytest.mark.parametrize("keyword, message", [
    ({"colour": "red"}, "unknown keyword \\['colour'\\]"),
    ({"micro_batch": 0}, "--micro_batch: 0 is below the least allowed value 1"),
    ({"remat": "often"}, "--remat: unknown policy 'often'"),
    ({"sequence_parallel": "maybe"}, "--sequence_parallel: 'maybe' is not true or false"),
])
def test_keyword_values_are_checked_like_flags(keyword, message):
    with pytest.raises(InvalidInput, match=message):
        config.check_values(config.values_with(**keyword))


@pytest.mark.parametrize("args, message", [
    (["jaxlayouts.plan", "--gpus", "100000000000"], "--gpus: 100000000000: the planner enumerates at most"),
    (["jaxlayouts.plan", "--gpus", "abc"], "--flags: flag --gpus=abc"),
    (["jaxlayouts.plan", "--explain", "dp=8 mbs=x"], "--layout: 'dp=8 mbs=x': --micro_batch: 'x' is not an integer"),
    (["jaxlayouts.explore", "--mesh", "dp=2", "--remat", "often"], "--remat: unknown policy 'often'"),
    (["jaxlayouts.explore", "--mesh", "dp=2", "--bogus"], "--flags: Unknown command line flag 'bogus'"),
    (["jaxlayouts.report", "jaxlayouts", "--out", "x"], "error: no results file jaxlayouts"),
])
def test_inspection_tools_reject_bad_input_with_exit_2(args, message):
    proc = cli(*args, timeout=60)
    assert_clean(proc, codes=(2,))
    assert message in proc.stderr, proc.stderr[-2000:]


# ---------------------------------------------------------------------------------------------
# 4. Nothing hangs: failure paths exit within a bound


def test_a_huge_cluster_is_refused_at_once_and_a_million_gpus_enumerate_quickly():
    start = time.perf_counter()
    proc = cli("jaxlayouts.plan", "--gpus", "1048576", "--top", "1", timeout=60)
    assert_clean(proc)
    assert time.perf_counter() - start < 30


# ---------------------------------------------------------------------------------------------
# 5. Launch: workers die with their launcher, even under kill -9


def _workers(marker: str) -> list[int]:
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()
            if "-m jaxlayouts.bench" in line and marker in line and "jaxlayouts.launch" not in line]


def test_workers_die_when_the_launcher_is_killed(tmp_path):
    marker = f"--output={tmp_path}/never.jsonl"
    command = [sys.executable, "-m", "jaxlayouts.launch", "2", "--", sys.executable, "-m", "jaxlayouts.bench",
               "--mesh", "dp=2", "--steps", "100000", marker, *QUICK[:4]]
    launcher = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=clean_env(),
                                cwd=ROOT)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and len(_workers(marker)) < 2:
            time.sleep(0.2)
        assert len(_workers(marker)) == 2
        time.sleep(3)  # the workers are past their start (die_with_parent is armed)
    finally:
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
    deadline = time.time() + 15
    while time.time() < deadline and _workers(marker):
        time.sleep(0.2)
    assert not _workers(marker), "workers outlived their launcher"


# ---------------------------------------------------------------------------------------------
# 6. Fuzz: random flag values and broken files for each entry point, for a bounded time


NASTY = ["", "-1", "0", "nan", "-inf", "1e309", "abc", "2.5", "99999999999999999999", "true", "dp=0",
         "dp=-1,tp=-1", "/nonexistent/x", "README.md", "jaxlayouts", "{", "'", "dp=2 mbs=0", "dp=2,dp=4",
         "/proc/x", "٢", "/dev/full", "/dev/zero", "dp=--2", "9" * 40, "fsdp=-+1"]


def _mutations(text: str, rng: random.Random) -> str:
    lines = text.splitlines()
    choice = rng.randrange(7)
    if choice == 5:  # an alias bomb, or nesting past the bound
        return rng.choice([BOMB_TEXT, "x: " + "[" * 200 + "]" * 200 + "\n", '{"status": "ok", "x": '
                           + "[" * 5000 + "]" * 5000 + "}\n"])
    if choice == 6 and lines:  # an integer past any bound
        i = rng.randrange(len(lines))
        lines[i] = f"{lines[i].split(':')[0]}: {'9' * rng.choice([25, 5000])}"
        return "\n".join(lines) + "\n"
    if choice == 0 and lines:
        lines.pop(rng.randrange(len(lines)))
    elif choice == 1 and lines:
        i = rng.randrange(len(lines))
        key = lines[i].split(":")[0]
        lines[i] = f"{key}: {rng.choice(NASTY)}"
    elif choice == 2:
        return text[: rng.randrange(len(text) + 1)]
    elif choice == 3:
        return "".join(rng.choice("{}[]:,-\n \"'x1") for _ in range(rng.randrange(1, 40)))
    else:
        lines.append(f"{rng.choice(['extra', 'grid', 'status', 'key'])}: {rng.choice(NASTY)}")
    return "\n".join(lines) + "\n"


BOMB_TEXT = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{b}: &{b} [{', '.join([f'*{a}'] * 9)}]\n" for a, b in zip("abcdefgh", "bcdefghi"))


def _digest(paths) -> dict:
    return {p: hashlib.sha256(pathlib.Path(p).read_bytes()).hexdigest() for p in paths if pathlib.Path(p).is_file()}


def _fuzz_case(rng: random.Random, tmp: pathlib.Path, n: int):
    """One random command line (and the input files it reads): ``(args, files, codes)``."""
    model = tmp / f"model{n}.yaml"
    model.write_text(_mutations((ROOT / "configs/models/tiny.yaml").read_text(), rng))
    results = tmp / f"results{n}.jsonl"
    results.write_text(_mutations('{"key": "a", "status": "ok", "step_time_s": 1.0}\n', rng))
    sweep_file = tmp / f"sweep{n}.yaml"
    sweep_file.write_text(_mutations("devices: 1\nbase: {model: tiny}\ngrid: {micro_batch: [1, 2]}\n", rng))
    study = tmp / f"study{n}.csv"
    study.write_text(_mutations((ROOT / "tests/data/study_rows.csv").read_text(), rng))
    if rng.random() < 0.15:  # a special file where a file is read or written
        fifo = tmp / f"fifo{n}.jsonl"
        os.mkfifo(fifo)
        results = rng.choice([fifo, pathlib.Path("/dev/full"), pathlib.Path("/dev/null")])
    flag = lambda names: f"--{rng.choice(names)}={rng.choice(NASTY)}"
    # Baselines that stop at a late check (3 data shards cannot split 2 sequences; 0 kernel
    # iterations), so each case runs every earlier check and rarely compiles anything.
    bench = ["jaxlayouts.bench", "--mesh=dp=3", "--global_batch=2", "--seq_len=16", "--steps=1", "--warmup=0"]
    bench_names = [n for n in config.KNOB_NAMES if n not in ("steps", "restore")]
    kernels = ["jaxlayouts.kernel_bench", "--attention=xla", "--norm=xla", "--seq_lens=16", "--iters=0"]
    cases = [
        ([*bench, flag(bench_names)], [], tuple(EXIT.values())),
        ([*bench, f"--model={model}"], [model], tuple(EXIT.values())),
        (["jaxlayouts.sweep", str(sweep_file), "--out", str(results), "--dry-run"], [sweep_file, results], (0, 2)),
        (["jaxlayouts.report", str(rng.choice([results, study])), "--out", str(tmp / f"report{n}")],
         [results, study], (0, 2)),
        (["jaxlayouts.plan", "--gpus=8", "--explain=dp=8 mbs=1", flag(["gpus", "seq_len", "global_batch", "hardware",
                                                                     "explain", "model", "top"])], [], (0, 2)),
        (["jaxlayouts.plan", "validate", str(study), "--hardware", "a100-80gb"], [study], (0, 2)),
        ([*kernels, flag(["seq_lens", "heads", "kv_heads", "tokens", "dtype", "head_dim", "attention", "norm"])],
         [], (0, 2)),
        (["jaxlayouts.launch", rng.choice(["0", "-1", "x", "1"]), "--", sys.executable, "-c", "pass"], [], (0, 2)),
    ]
    return rng.choice(cases)


def test_fuzz_every_entry_point_for_a_bounded_time(tmp_path):
    seed = int(os.environ.get("JAXLAYOUTS_FUZZ_SEED", "20261130"))
    budget_s = float(os.environ.get("JAXLAYOUTS_FUZZ_SECONDS", "30"))
    rng = random.Random(seed)
    work = tmp_path / "cwd"  # relative paths among the random values land here, never in the checkout
    work.mkdir()
    tracked = _digest([ROOT / "README.md", *ROOT.glob("configs/**/*"), *ROOT.glob("tests/data/*")])
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < budget_s:
        args, files, codes = _fuzz_case(rng, tmp_path, n)
        before = _digest(files)
        try:
            proc = cli(*args, timeout=90, cwd=work)
        except subprocess.TimeoutExpired:
            pytest.fail(f"seed {seed} case {n}: {args} hung")
        assert proc.returncode in codes, (seed, n, args, proc.returncode, proc.stderr[-1500:])
        assert "Traceback" not in proc.stdout + proc.stderr, (seed, n, args, proc.stderr[-3000:])
        assert _digest(files) == before, (seed, n, args, "an input file changed")
        if args[0] == "jaxlayouts.bench":
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            assert EXIT[result["status"]] == proc.returncode
        n += 1
    assert n >= 8, f"only {n} fuzz cases ran in {budget_s} s"
    assert _digest(tracked) == tracked, "a fuzz case changed a file of the checkout's inputs"


# ---------------------------------------------------------------------------------------------
# Found by an adversarial review: each once a traceback, a changed file or nonsense reported ok


def _bench_row(tmp_path, **changes) -> pathlib.Path:
    row = json.loads((ROOT / "configs/hardware/measured/h200-2026-11-30.jsonl").read_text().splitlines()[0])
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({**row, **changes}) + "\n")
    return path


@pytest.mark.parametrize("changes, message", [
    ({"seq_len": "abc"}, "--seq_len: 'abc' is not an integer"),
    ({"mfu": 5.0}, "mfu is 5.0; it must be a fraction in (0, 1]"),
    ({"mfu": -0.3}, "mfu is -0.3"),
    ({"memory": [1]}, "memory.device_peak_bytes is 'not a mapping'"),
    ({"dtype": "int4"}, "--dtype: unknown dtype 'int4'"),
    ({"step_time_s": "fast"}, "step_time_s is 'fast'"),
    ({"global_batch": 0}, "--global_batch: 0 is below the least allowed value 1"),
])
def test_plan_validate_checks_every_field_of_a_bench_row(tmp_path, changes, message):
    proc = cli("jaxlayouts.plan", "validate", str(_bench_row(tmp_path, **changes)), "--hardware", "h200", timeout=60)
    assert_clean(proc, codes=(2,))
    assert "rows.jsonl:1: " in proc.stderr and message in proc.stderr, proc.stderr


def test_an_output_that_is_not_a_results_file_is_left_alone(tmp_path):
    model = tmp_path / "model.yaml"
    model.write_text((ROOT / "configs/models/tiny.yaml").read_text())
    before = model.read_text()
    proc = cli("jaxlayouts.bench", f"--model={model}", f"--output={model}", "--micro_batch=0", timeout=60)
    assert_clean(proc, codes=(2,))
    assert model.read_text() == before and "is not a result row" in proc.stdout + proc.stderr


@pytest.mark.parametrize("args, message", [
    (["jaxlayouts.plan", "validate", "tests/data/study_rows.csv", "--predictions", "tests/data/study_rows.csv"],
     "--predictions: tests/data/study_rows.csv is the file being validated"),
    (["jaxlayouts.plan", "validate", "tests"], "--file: tests: cannot read it as text"),
    (["jaxlayouts.plan", "--explain", "dp=8 mbs=1", "--gpus", "16"], "--gpus: 16, but the layout to explain uses 8"),
    (["jaxlayouts.launch", "2", "--", "/nonexistent/command"], "launch: cannot start '/nonexistent/command'"),
    (["jaxlayouts.gpu_check", "--dry-run", "--budget_s", "inf"], "argument --budget_s: inf"),
    (["jaxlayouts.sweep", "configs/sweeps/cpu_smoke.yaml", "--out", "/proc/x.jsonl"], "--out: /proc/x.jsonl: cannot be written"),
    (["jaxlayouts.sweep", "configs/sweeps/cpu_smoke.yaml", "--out", "r.jsonl", "--timeout", "1e300"],
     "--timeout: 1e+300 is above the largest allowed value"),
    (["jaxlayouts.report", "tests/data/study_rows.csv", "--out", "README.md"], "--out: 'README.md' is not a folder"),
])
def test_more_bad_input_exits_2_with_the_knob_named(args, message):
    before = _digest([ROOT / "README.md", ROOT / "tests/data/study_rows.csv"])
    proc = cli(*args, timeout=60)
    assert_clean(proc, codes=(2,))
    assert message in proc.stderr + proc.stdout, proc.stderr
    assert _digest([ROOT / "README.md", ROOT / "tests/data/study_rows.csv"]) == before


def test_repeated_yaml_keys_and_mesh_axes_are_refused(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text((ROOT / "configs/models/tiny.yaml").read_text() + "num_layers: 100000\n")
    with pytest.raises(InvalidInput, match="repeated keys \\['num_layers'\\]"):
        load_model_config(str(path))
    with pytest.raises(InvalidInput, match="dp is given twice"):
        config.run_config(config.check_values(config.values_with(mesh="dp=3,dp=1")))


def test_results_files_with_failed_points_still_validate_and_report(tmp_path):
    """A sweep's results hold failed points (no run fields, or the bad values that failed them),
    torn lines and retried keys: plan validate and report read the rest."""
    rows = (ROOT / "configs/hardware/measured/h200-2026-11-30.jsonl").read_text()
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(rows + '{"status": "timeout", "error": "x", "key": "k", "point": {"micro_batch": -1}}\n'
                     '{"status": "invalid", "error": "--seq_len", "key": "j", "point": {"seq_len": "x"}}\n'
                     '{"key": "c", "sta')
    proc = cli("jaxlayouts.plan", "validate", str(mixed), "--hardware", "h200", "--json", timeout=120)
    assert_clean(proc, codes=(0,))
    assert json.loads(proc.stdout)["rows"] == 7
    proc = cli("jaxlayouts.report", str(mixed), "--out", str(tmp_path / "report"), timeout=120)
    assert_clean(proc, codes=(0,))
    assert "| timeout |" in (tmp_path / "report" / "report.md").read_text()


def test_yaml_merge_keys_still_load(tmp_path):
    from jaxlayouts.schema import load_yaml
    path = tmp_path / "s.yaml"
    path.write_text("shared: &shared {model: tiny, seq_len: 32}\nbase: {<<: *shared, seq_len: 64}\n")
    assert load_yaml(path, "sweep_file")["base"] == {"model": "tiny", "seq_len": 64}


def test_the_launcher_never_blocks_its_workers_on_a_closed_stdout():
    proc = subprocess.Popen([sys.executable, "-m", "jaxlayouts.launch", "1", "--", sys.executable, "-c",
                             "for i in range(200000): print(i)"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=clean_env(), cwd=ROOT)
    assert proc.stdout.readline().strip() == b"0"
    proc.stdout.close()  # as `| head -1` does
    assert proc.wait(timeout=60) == 0


# ---------------------------------------------------------------------------------------------
# Full disks, special files, interrupts, values past validation, nonsense


@pytest.fixture
def special_files(tmp_path):
    """A device that never ends, one that swallows, a link to a device and a FIFO (whose open
    blocks until a writer comes)."""
    link = tmp_path / "zero.jsonl"
    link.symlink_to("/dev/zero")
    fifo = tmp_path / "fifo.jsonl"
    os.mkfifo(fifo)
    return {"/dev/full": ("/dev/full", "a device"), "/dev/null": ("/dev/null", "a device"),
            "link": (str(link), "a device (a link to /dev/zero)"), "fifo": (str(fifo), "a FIFO")}


@pytest.mark.parametrize("special", ["/dev/full", "/dev/null", "link", "fifo"])
def test_special_files_are_refused_before_any_work(special_files, special):
    from jaxlayouts import report
    from jaxlayouts.plan.validate import read_rows
    from jaxlayouts.results import Results
    from jaxlayouts.sweep import load_sweep
    path, kind = special_files[special]
    if special == "/dev/null":  # as an output, the null device is handled: rows are discarded
        for knob in ("out", "output"):
            results = Results(path, knob=knob).create()
            results.append({"status": "ok", "key": "a"})
            assert results.path is None and list(results.rows) == ["a"]
    readers = {} if special == "/dev/null" else {
        "out": lambda: Results(path), "output": lambda: Results(path, knob="output", keyed=False)}
    readers |= {"model": lambda: load_model_config(path), "sweep_file": lambda: load_sweep(path),
                "results": lambda: report.load(path), "file": lambda: read_rows(path),
                "checkpoint_dir": lambda: config.options(config.check_values(config.values_with(checkpoint_dir=path))),
                "profile_dir": lambda: config.options(config.check_values(config.values_with(profile_dir=path)))}
    for knob, read in readers.items():
        with pytest.raises(InvalidInput, match=f"--{knob}: ") as error:
            read()
        # a name without a suffix is a model's name: /dev/full is no model
        assert f"{path} is {kind}, not a regular file" in str(error.value) or (
            knob == "model" and "unknown model '/dev/" in str(error.value)), (knob, str(error.value))


def test_a_bench_output_that_is_a_device_is_invalid_at_once():
    proc = cli("jaxlayouts.bench", "--output", "/dev/full", *QUICK, timeout=60)
    assert_clean(proc, codes=(2,))
    assert json.loads(proc.stdout.splitlines()[-1])["error"].startswith("--output: /dev/full is a device")


def test_a_short_or_failed_write_completes_or_leaves_the_file_as_it_was(tmp_path, monkeypatch):
    """os.write may write part of a row: the rest follows; a disk that fills part way leaves no
    half row behind and names the file."""
    import errno

    from jaxlayouts import results
    path = tmp_path / "r.jsonl"
    path.write_text('{"status": "ok", "key": "a"}\n')
    real_write, calls = os.write, []

    def short(fd, data):
        calls.append(len(data))
        return real_write(fd, bytes(data[:7]))
    monkeypatch.setattr(results.os, "write", short)
    results.Results(path).append({"status": "ok", "key": "b", "note": "x" * 40})
    assert len(calls) > 5 and [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b"]

    def full(fd, data):
        if len(data) < 30:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, bytes(data[:20]))
    monkeypatch.setattr(results.os, "write", full)
    before = path.read_bytes()
    with pytest.raises(results.WriteError, match=f"^{path}: No space left on device after 60 of 81 bytes$"):
        results.Results(path).append({"status": "ok", "key": "c", "note": "y" * 40})
    assert path.read_bytes() == before


def _file_size_limit(limit):
    import resource
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


@pytest.mark.parametrize("target", ["output", "checkpoint_dir"])
def test_a_write_that_fails_is_write_error_never_oom(tmp_path, target):
    """Under a file-size limit (a full disk as one process sees it): the bench's row or its
    checkpoint cannot be written; the run ends write_error (exit 5) naming the path, the results
    file holds only whole rows."""
    output = tmp_path / "out.jsonl"
    output.write_text(json.dumps({"status": "ok", "pad": "x" * 3000}) + "\n")
    limit = output.stat().st_size + 200 if target == "output" else 64 * 1024
    args = [f"--output={output}", *QUICK]
    if target == "checkpoint_dir":
        args += [f"--checkpoint_dir={tmp_path / 'ckpt'}", "--checkpoint_every=1"]
    proc = subprocess.run([sys.executable, "-m", "jaxlayouts.bench", *args], capture_output=True, text=True,
                          timeout=180, cwd=ROOT, preexec_fn=_file_size_limit(limit),
                          env=clean_env(PYTHONPATH=str(ROOT), JAX_ENABLE_COMPILATION_CACHE="false"))
    result = json.loads(proc.stdout.splitlines()[-1])
    assert (proc.returncode, result["status"]) == (5, "write_error"), proc.stderr[-2000:]
    named = str(output) if target == "output" else f"--checkpoint_dir {tmp_path / 'ckpt'}"
    assert named in result["error"] and "Traceback" not in proc.stdout
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert [r["status"] for r in rows] == (["ok"] if target == "output" else ["ok", "write_error"])


def test_a_second_writer_of_a_results_file_is_refused_clearly(tmp_path):
    """A sweep holds its results file's lock while it runs: another sweep (or a bench's row,
    after a short wait) is refused naming the file, instead of doubling its rows."""
    from jaxlayouts import results
    path = tmp_path / "r.jsonl"
    first = results.Results(path).create().hold()
    try:
        with pytest.raises(InvalidInput, match=f"--out: {path} is being written by another process"):
            results.Results(path).create()
        proc = cli("jaxlayouts.sweep", "configs/sweeps/cpu_smoke.yaml", "--out", str(path), timeout=60)
        assert_clean(proc, codes=(2,))
        assert "is being written by another process" in proc.stderr
        first.append({"status": "ok", "key": "a"})  # the holder still writes
    finally:
        first.release()
    results.Results(path).create().append({"status": "ok", "key": "b"})  # and after it, anyone
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b"]


BOMB = BOMB_TEXT


@pytest.mark.parametrize("text, message", [
    (BOMB + "grid: {seed: *i}\n", "expands to more than 100,000 values"),
    ("grid: &g {seed: [*g]}\n", "an alias refers to a value that contains it"),
    ("base: " + "[" * 100 + "]" * 100 + "\n", "nested deeper than 64 levels"),
    ("grid: {seed: [" + "9" * 5000 + "]}\n", "an integer of more than 4,300 digits"),
])
def test_inputs_that_expand_are_refused_in_bounded_time(tmp_path, text, message):
    from jaxlayouts.sweep import load_sweep
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(InvalidInput, match=f"--sweep_file: {path}: {message}"):
        load_sweep(path)
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("line, message", [
    ('{"status": "ok", "key": "k", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nested deeper than 64 levels"),
])
def test_deeply_nested_json_is_refused_not_a_recursion_error(tmp_path, line, message):
    from jaxlayouts import report
    from jaxlayouts.plan.validate import read_rows
    from jaxlayouts.results import Results
    path = tmp_path / "deep.jsonl"
    path.write_text(line + "\n")
    for read, knob in ((lambda: Results(path), "--out: "), (lambda: read_rows(str(path)), "--file: ")):
        with pytest.raises(InvalidInput, match=knob + f".*deep.jsonl:1: .*{message}"):
            read()
    with pytest.raises(ValueError, match=f"deep.jsonl:1: .*{message}"):
        report.load(path)


@pytest.mark.parametrize("values, message", [
    ({"mesh": "dp=--2"}, "--mesh: dp='--2' is not an integer: write a positive size (or -1 for the rest) with one sign"),
    ({"seed": 2**64}, "--seed: 18446744073709551616 does not fit in a signed 64-bit integer"),
    ({"seed": "9" * 5000}, "--seed: '" + "9" * 39 + "... (5002 characters) does not fit"),
    ({"micro_batch": -2**70}, "--micro_batch: -1180591620717411303424 does not fit in a signed 64-bit integer"),
    ({"axis_rules": "embed=fsdp+fsdp"}, "--axis_rules: 'embed=fsdp+fsdp' names fsdp twice"),
    ({"axis_rules": "vocab=tp,vocab=none"}, "--axis_rules: vocab is given twice"),
])
def test_values_past_validation_are_refused_at_the_boundary(values, message):
    """Each once passed the checks and failed later (a traceback, or after compiling)."""
    with pytest.raises(InvalidInput) as error:
        checked = config.check_values(config.values_with(**values))
        config.options(checked)
        config.run_config(checked)
    assert str(error.value).startswith(message), str(error.value)


@pytest.mark.parametrize("args, message", [
    (["jaxlayouts.bench", "--mesh", "dp=--2"], "--mesh: dp='--2' is not an integer"),
    (["jaxlayouts.plan", "--explain", "dp=--2 mbs=1"], "--mesh: dp='--2' is not an integer"),
    (["jaxlayouts.plan", "--gpus", "12"], "--gpus: 12 GPUs do not fill whole nodes of 8"),
])
def test_malformed_mesh_text_and_partial_nodes_exit_2(args, message):
    proc = cli(*args, timeout=60)
    assert_clean(proc, codes=(2,))
    assert message in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_a_bad_value_in_one_grid_point_is_a_row_and_the_rest_run(tmp_path):
    """A mesh with doubled signs, a model file with a 5,000-digit integer, a seed past 64 bits:
    each its point's invalid row, found before any launch; the good point is pending."""
    from jaxlayouts import sweep
    big = tmp_path / "big.yaml"
    big.write_text((ROOT / "configs/models/tiny.yaml").read_text().replace("vocab_size: 512", "vocab_size: " + "9" * 5000))
    path = tmp_path / "s.yaml"
    path.write_text(f"devices: 1\nbase: {{seq_len: 16, global_batch: 2}}\n"
                    f"grid: {{mesh: ['dp=1', 'dp=--1'], model: [tiny, '{big}'], seed: [0, {2**64}]}}\n")
    rows = {(p["mesh"], p["model"] == "tiny", p["seed"]): sweep.prevalidate(p, sweep.load_sweep(path))
            for p in sweep.points(sweep.load_sweep(path))}
    assert rows.pop(("dp=1", True, 0)) is None
    assert all(row["status"] == "invalid" for row in rows.values()) and len(rows) == 7
    assert "--mesh: dp='--1' is not an integer" in rows[("dp=--1", True, 0)]["error"]
    assert "an integer of more than 4,300 digits" in rows[("dp=1", False, 0)]["error"]
    assert "--seed: 18446744073709551616 does not fit" in rows[("dp=1", True, 2**64)]["error"]


def test_the_host_memory_guard_counts_every_replica(monkeypatch):
    """On CPU all emulated devices share the host: llama-1b under dp=8,tp=4 holds 8 replicas of
    a quarter of its state (131 GiB); on a 24 GiB host that is refused before any allocation,
    with the -1 form too; one device's share fits."""
    from jaxlayouts import bench
    monkeypatch.setattr(bench, "host_bytes", lambda: 24 * 2**30)
    monkeypatch.setattr(bench.devices, "accelerator_present", lambda: False)
    for mesh, extra in (("dp=8,tp=4", {}), ("dp=-1,tp=4", {"num_devices": 32})):
        values = config.check_values(config.values_with(model="llama-1b", mesh=mesh, **extra))
        with pytest.raises(InvalidInput, match=r"--mesh: training llama-1b under dp=8,fsdp=1,tp=4,pp=1 .* on 32 "
                           r"emulated CPU devices needs at least 131.1 GiB .* it has 24 GiB; use fewer replicas"):
            bench.check_before_devices(values, config.options(values))
    values = config.check_values(config.values_with(model="llama-1b", mesh="fsdp=8,tp=4", zero=3))
    bench.check_before_devices(values, config.options(values))  # 16.4 GiB of state: not refused here


@pytest.mark.parametrize("env, message", [
    ({"JAX_PLATFORMS": "tpuu"}, "--environment: JAX_PLATFORMS: 'tpuu' is not a platform"),
    ({"XLA_FLAGS": "garbage"}, "--environment: XLA_FLAGS: 'garbage' is not --name=value"),
    ({"XLA_FLAGS": "--xla_no_such_flag=1"}, "--environment: XLA_FLAGS: XLA refuses '--xla_no_such_flag=1'"),
    ({"JAX_PLATFORMS": "tpu"}, "--environment: JAX_PLATFORMS='tpu': Unable to initialize backend 'tpu'"),
    ({"JAXLAYOUTS_COORDINATOR_ADDRESS": "not an address", "JAXLAYOUTS_NUM_PROCESSES": "2",
      "JAXLAYOUTS_PROCESS_ID": "0"}, "--coordinator_address: 'not an address' is not host:port (port 1-65535)"),
])
def test_a_broken_environment_ends_with_the_json_line(env, message):
    """What the environment says (a platform, XLA's flags, a coordinator) is checked like a flag:
    the JSON line, invalid, one line naming the variable; never a C++ abort or a raw library error."""
    proc = subprocess.run([sys.executable, "-m", "jaxlayouts.bench", *QUICK], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**clean_env(PYTHONPATH=str(ROOT)), **env})
    assert_clean(proc, codes=(2,))
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["status"] == "invalid" and result["error"].startswith(message) and "\n" not in result["error"]


@pytest.mark.parametrize("call, knob", [
    (lambda e: e.layout("tiny", layout=5), "--layout: 5 is not text"),
    (lambda e: e.layout("tiny", hardware=3), "--hardware: 3 is not text"),
    (lambda e: e.layout("tiny", mesh="dp=--2"), "--mesh: dp='--2' is not an integer"),
    (lambda e: e.compare([None]), "--layouts[0]: None is not text; give one, e.g. 'fsdp=8,tp=4'"),
    (lambda e: e.compare([]), "--layouts: [] is not a non-empty list of layouts"),
    (lambda e: e.compare("dp=2"), "--layouts: 'dp=2' is not a non-empty list of layouts"),
    (lambda e: e.compare(["dp=2", 3]), "--layouts[1]: 3 is not text"),
    (lambda e: e.compare(["dp=2"], hardware=5), "--hardware: 5 is not text"),
    (lambda e: e.layout("tiny", target=None), "--target: None is not text"),
])
def test_the_python_api_raises_invalid_input_naming_the_argument(call, knob):
    from jaxlayouts import explore
    with pytest.raises(InvalidInput) as error:
        call(explore)
    assert str(error.value).startswith(knob), str(error.value)


def test_ctrl_c_ends_bench_and_sweep_with_an_interrupted_row_and_the_sweep_resumes(tmp_path):
    env = clean_env(PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    bench = subprocess.Popen([sys.executable, "-m", "jaxlayouts.bench", *QUICK[:4], "--steps", "500", "--warmup", "0",
                              "--dtype", "float32", f"--output={tmp_path / 'bench.jsonl'}"], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in bench.stderr:  # interrupted in the timed loop
        if "step 1/" in line:
            break
    bench.send_signal(signal.SIGINT)
    out, err = bench.communicate(timeout=60)
    result = json.loads(out.splitlines()[-1])
    assert bench.returncode == 130 and result["status"] == "interrupted" and "Traceback" not in out + err, err[-2000:]
    assert json.loads((tmp_path / "bench.jsonl").read_text())["status"] == "interrupted"

    grid = tmp_path / "s.yaml"
    grid.write_text("devices: 1\nbase: {seq_len: 16, global_batch: 2, steps: 500, warmup: 0}\ngrid: {seed: [1, 2]}\n")
    out_file = tmp_path / "sweep.jsonl"
    sweep = subprocess.Popen([sys.executable, "-m", "jaxlayouts.sweep", str(grid), "--out", str(out_file)], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "2 to run" in sweep.stderr.readline()
    time.sleep(1.5)  # the first point's bench is running
    sweep.send_signal(signal.SIGINT)
    _, err = sweep.communicate(timeout=60)
    assert sweep.returncode == 130 and "Traceback" not in err, err
    assert "interrupted at dp=-1,fsdp=1,tp=1,pp=1: recorded as interrupted; 0 of 2 points done" in err
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["interrupted"] and rows[0]["point"]["seed"] == 1
    resumed = cli("jaxlayouts.sweep", str(grid), "--out", str(out_file), "--dry-run")
    assert "0 already in" in resumed.stderr and "2 to run" in resumed.stderr, resumed.stderr
