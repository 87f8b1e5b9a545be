"""Timing harness: train a LLaMA under one layout and report step time, tokens/s, MFU and memory.

    python -m jaxlayouts.bench --mesh dp=8,tp=4,pp=1
    python -m jaxlayouts.bench --model llama-13b --mesh fsdp=8 --zero 1 --seq_len 2048 --global_batch 64

Without an accelerator the harness emulates as many CPU devices as the mesh needs. Method:
compile ahead of time (timed on its own), run ``--warmup`` steps, then time ``--steps`` steps,
each ended by ``block_until_ready`` before the clock is read; report the median. The summary goes
to stdout and its last line is one JSON object (also appended to ``--output`` as a JSON line).
Exit codes: 0 ok, 1 error, 2 invalid input, 3 out of memory, 4 compile error.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import math
import os
import statistics
import sys
import time

from absl import app, flags, logging

from jaxlayouts import devices, distributed, launch
from jaxlayouts.analysis import profile
from jaxlayouts.layout import (ATTENTION_CHOICES, DTYPE_CHOICES, MESH_AXES, NORM_CHOICES, PIPELINE_SCHEDULES,
                               REMAT_CHOICES,
                               InvalidLayout, Layout, RunConfig, load_model_config, parse_mesh)

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "tiny", "Model config name under configs/models/ or a YAML path.")
flags.DEFINE_string("mesh", "dp=1", "Mesh degrees over dp,fsdp,tp,pp, e.g. dp=8,tp=4,pp=1; -1 = the rest.")
flags.DEFINE_integer("seq_len", 256, "Tokens per sequence.")
flags.DEFINE_integer("global_batch", 32, "Sequences per optimizer step (all data shards, all micro-batches).")
flags.DEFINE_integer("micro_batch", 1, "Sequences per data shard per accumulation step.")
flags.DEFINE_string("remat", "none", f"Activation checkpointing policy: {', '.join(REMAT_CHOICES)}.")
flags.DEFINE_string("attention", "xla", f"Attention implementation: {', '.join(ATTENTION_CHOICES)}.")
flags.DEFINE_string("norm", "xla", f"RMSNorm implementation: {', '.join(NORM_CHOICES)}.")
flags.DEFINE_string("pipeline_schedule", "1f1b", f"Pipeline schedule for pp>1: {', '.join(PIPELINE_SCHEDULES)}.")
flags.DEFINE_integer("virtual_stages", 1, "Layer chunks per pipeline stage (circular schedule).")
flags.DEFINE_integer("pipeline_microbatches", None, "Micro-batches per pipeline flush (default: all of the "
                     "step's; fewer means several flushes per step).")
flags.DEFINE_bool("sequence_parallel", False, "Megatron sequence parallelism inside the tp group.")
flags.DEFINE_integer("zero", None, "ZeRO stage over the fsdp axis (0-3); default 3 if fsdp>1 else 0.")
flags.DEFINE_string("dtype", "bfloat16", f"Compute dtype: {', '.join(DTYPE_CHOICES)} (master weights are float32).")
flags.DEFINE_integer("steps", 5, "Timed steps.")
flags.DEFINE_integer("warmup", 2, "Untimed steps before the timed ones.")
flags.DEFINE_integer("seed", 0, "Seed for parameters and synthetic data.")
flags.DEFINE_float("learning_rate", 1e-3, "AdamW learning rate.")
flags.DEFINE_integer("vocab_size", None, "Override the model's vocabulary size.")
flags.DEFINE_integer("num_devices", None, "Emulated CPU devices (default: what the mesh needs).")
flags.DEFINE_string("axis_rules", "", "Override logical-axis rules, e.g. 'vocab=none,embed=fsdp+tp'.")
flags.DEFINE_string("output", None, "Append the result as one JSON line to this file.")
flags.DEFINE_string("profile_dir", None, "Write a jax.profiler trace of the timed steps here.")
flags.DEFINE_float("peak_tflops", None, "Peak TFLOP/s per device for MFU (default: by device kind).")

flags.DEFINE_string("checkpoint_dir", None, "Save sharded train-state checkpoints (orbax) here.")
flags.DEFINE_integer("checkpoint_every", 100, "Save a checkpoint every this many steps (with --checkpoint_dir).")
flags.DEFINE_bool("restore", False, "Resume from the latest complete checkpoint in --checkpoint_dir, "
                  "under this run's layout and device count.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0 for a multi-process run "
                    "(SLURM is detected without it; launch/local.sh sets it).")
flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
flags.DEFINE_integer("init_timeout_s", 120, "Give up joining a multi-process run after this long.")
flags.DEFINE_integer("heartbeat_timeout_s", 30, "End a multi-process run this long after a peer stops answering.")
flags.DEFINE_float("device_memory_gb", None, "Device memory capacity: a step whose compiled peak "
                   "exceeds it is reported as oom before it runs (default: the device's own limit, "
                   "where it reports one; none on CPU).")

FLAG_NAMES = tuple(f.name for f in FLAGS.get_flags_for_module(sys.modules[__name__]))
EXIT_CODES = {"ok": 0, "error": 1, "invalid": 2, "oom": 3, "compile_error": 4}


class OutOfMemory(RuntimeError):
    """The compiled step needs more memory per device than the device has."""


def parse_axis_rules(text: str) -> dict:
    """``'vocab=none,embed=fsdp+tp'`` -> ``{'vocab': None, 'embed': ('fsdp', 'tp')}``."""
    from jaxlayouts.mesh import ACTIVATION_AXES, PARAM_AXES

    rules = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in PARAM_AXES + ACTIVATION_AXES:
            raise InvalidLayout("axis_rules", f"cannot read {item!r}; write LOGICAL=AXIS[+AXIS] with "
                                f"LOGICAL in {', '.join(PARAM_AXES + ACTIVATION_AXES)}, e.g. vocab=none")
        axes = tuple(a for a in value.split("+") if a and a != "none")
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise InvalidLayout("axis_rules", f"{item!r}: {unknown} are not mesh axes ({', '.join(MESH_AXES)}) or none")
        rules[name] = None if not axes else axes[0] if len(axes) == 1 else axes
    return rules


class CompileError(RuntimeError):
    """XLA could not compile the step (other than for lack of memory)."""


def is_oom(error: BaseException) -> bool:
    if isinstance(error, OutOfMemory):
        return True
    text = str(error)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def prepare_devices(values: dict) -> int | None:
    """Ask for emulated CPU devices (before JAX is imported) and join a multi-process run when
    one is configured; returns the global device count where it is known."""
    for knob in ("init_timeout_s", "heartbeat_timeout_s"):
        if values[knob] < 1:
            raise InvalidLayout(knob, f"{values[knob]}: give a timeout of at least 1 second")
    try:
        cluster = distributed.detect(values["coordinator_address"], values["num_processes"], values["process_id"])
    except ValueError as error:
        raise InvalidLayout("coordinator_address", str(error)) from None
    count = values["num_devices"]
    accelerator = devices.accelerator_present()
    if count is None and "-1" not in values["mesh"]:
        count = math.prod(parse_mesh(values["mesh"]).values())
    if count is None and not accelerator:
        raise InvalidLayout("mesh", f"{values['mesh']}: -1 needs a device count on CPU emulation; "
                            "give --num_devices")
    if count is not None and not accelerator:
        if count % cluster.num_processes:
            raise InvalidLayout("num_processes", f"{count} devices do not split over "
                                f"{cluster.num_processes} processes")
        devices.request_host_devices(count // cluster.num_processes)
    distributed.initialize(cluster, cpu=not accelerator, init_timeout_s=values["init_timeout_s"],
                           heartbeat_timeout_s=values["heartbeat_timeout_s"])
    if count is None:
        import jax  # an accelerator decides the device count
        count = jax.device_count()
    return count


def run_config(values: dict, num_devices: int | None = None) -> tuple[RunConfig, dict]:
    """Build the run from flag values (the bench's flags, or a sweep point with the same names);
    ``num_devices`` resolves a ``-1`` mesh axis."""
    mesh = parse_mesh(values["mesh"], num_devices)
    model = load_model_config(values["model"], vocab_size=values["vocab_size"])
    layout = Layout(mesh=mesh, micro_batch=values["micro_batch"], zero=values["zero"],
                    sequence_parallel=values["sequence_parallel"], remat=values["remat"],
                    attention=values["attention"], norm=values["norm"],
                    pipeline_schedule=values["pipeline_schedule"], virtual_stages=values["virtual_stages"],
                    pipeline_microbatches=values["pipeline_microbatches"])
    run = RunConfig(model=model, layout=layout, seq_len=values["seq_len"],
                    global_batch=values["global_batch"], dtype=values["dtype"],
                    learning_rate=values["learning_rate"], seed=values["seed"])
    return run, parse_axis_rules(values["axis_rules"])


def flag_defaults() -> dict:
    """Every bench flag with its default value."""
    return {name: FLAGS[name].default for name in FLAG_NAMES}


def describe(run: RunConfig) -> dict:
    """The run's fields as they appear in every result row."""
    lay = run.layout
    return {
        "model": run.model.name, "n_params": run.model.n_params, "layout": str(lay),
        "mesh": dict(lay.mesh), "seq_len": run.seq_len, "global_batch": run.global_batch,
        "micro_batch": lay.micro_batch, "grad_accum_steps": run.grad_accum_steps,
        "remat": lay.remat, "attention": lay.attention, "norm": lay.norm, "sequence_parallel": lay.sequence_parallel,
        "zero": lay.zero, "dtype": run.dtype, **pipeline_fields(run),
    }


def pipeline_fields(run: RunConfig) -> dict:
    """Pipeline fields of a result row: null when the layout has no pipeline (pp=1)."""
    from jaxlayouts.parallel.schedule import bubble_fraction
    lay = run.layout
    if lay.mesh["pp"] == 1:
        return {"pipeline_schedule": None, "virtual_stages": None, "pipeline_microbatches": None,
                "bubble_fraction": None}
    m = lay.pipeline_microbatches or run.grad_accum_steps
    return {"pipeline_schedule": lay.pipeline_schedule, "virtual_stages": lay.virtual_stages,
            "pipeline_microbatches": m,
            "bubble_fraction": bubble_fraction(lay.pipeline_schedule, lay.mesh["pp"], lay.virtual_stages, m)}


def benchmark(run: RunConfig, *, steps: int, warmup: int, axis_rules: dict | None = None,
              peak_tflops: float | None = None, profile_dir: str | None = None, devices=None,
              device_memory_gb: float | None = None, checkpoint_dir: str | None = None,
              checkpoint_every: int = 100, restore: bool = False, log=print) -> dict:
    """Validate, compile, train ``warmup + steps`` steps on ``devices`` (default: all) and return
    the measured fields. With ``checkpoint_dir``, save every ``checkpoint_every`` steps and (with
    ``restore``) resume from the latest complete checkpoint, resharded into this layout."""
    import jax

    from jaxlayouts import checkpoint, data, flops, layout, mesh as meshes, train

    devices = list(devices) if devices is not None else jax.devices()
    platform = devices[0].platform
    layout.validate(run, len(devices), platform)
    if steps < 1 or warmup < 0:
        raise InvalidLayout("steps", f"need --steps >= 1 and --warmup >= 0 (got {steps}, {warmup})")
    if restore and not checkpoint_dir:
        raise InvalidLayout("restore", "needs --checkpoint_dir, the directory to resume from")
    if checkpoint_dir and checkpoint_every < 1:
        raise InvalidLayout("checkpoint_every", f"{checkpoint_every}: save every K >= 1 steps, e.g. --checkpoint_every 100")
    if peak_tflops is not None and peak_tflops <= 0:
        raise InvalidLayout("peak_tflops", f"{peak_tflops}: give the device's peak in TFLOP/s, e.g. --peak_tflops 989")
    if device_memory_gb is not None and device_memory_gb <= 0:
        raise InvalidLayout("device_memory_gb", f"{device_memory_gb}: give the capacity in GB, e.g. --device_memory_gb 80")
    device_mesh = meshes.build_mesh(run.layout, devices)
    if jax.process_count() > 1:
        distributed.log_once(distributed.describe_topology(run.layout, jax.process_count()))
    trainer = train.Trainer(run, device_mesh, axis_rules)

    log(f"compiling {run.model.name} under {run.layout} on {len(devices)} x {platform} ...")
    start = time.perf_counter()
    try:
        compiled = trainer.lower().compile()
    except Exception as error:
        if is_oom(error):
            raise
        raise CompileError(f"{type(error).__name__}: {error}") from error
    compile_time = time.perf_counter() - start
    memory = compiled_memory(compiled)
    local_device = next(d for d in devices if d.process_index == jax.process_index())
    capacity = (device_memory_gb * 2**30 if device_memory_gb
                else (local_device.memory_stats() or {}).get("bytes_limit"))
    peak_bytes = memory["compiled_peak_bytes_per_device"]
    if capacity and peak_bytes and peak_bytes > capacity:
        raise OutOfMemory(f"compiled peak {peak_bytes / 2**30:.2f} GiB per device exceeds the "
                          f"device memory {capacity / 2**30:.2f} GiB")

    checkpoints = checkpoint.Checkpoints(checkpoint_dir, checkpoint_every) if checkpoint_dir else None
    first_step, restored_from = 0, None
    if restore:
        state, record = checkpoints.restore(trainer.abstract_state_with_shardings())
        first_step, restored_from = record["next_step"], record["layout"]
        state = trainer.from_layer_order(state, layout.Layout.parse(restored_from))
        log(f"restored step {first_step} (saved under {restored_from}) into {run.layout}")
    else:
        distributed.barrier("jaxlayouts_compiled")  # init_state runs collectives
        state = trainer.init_state()
    batches = [data.device_batch(
        data.global_batch_tokens(run.seed, step, run.global_batch, run.seq_len, run.model.vocab_size),
        run.grad_accum_steps, device_mesh, train.BATCH_SPEC)
        for step in range(first_step, first_step + warmup + steps)]
    jax.block_until_ready(batches)
    distributed.barrier("jaxlayouts_ready_to_train")

    losses, step_times = [], []
    for step, batch in enumerate(batches):
        if step == warmup and profile_dir:
            jax.profiler.start_trace(profile_dir, create_perfetto_trace=True)
        start = time.perf_counter()
        state, loss = compiled(state, batch)
        jax.block_until_ready((state, loss))
        elapsed = time.perf_counter() - start
        losses.append(float(loss))
        if step >= warmup:
            step_times.append(elapsed)
        log(f"  step {step + 1}/{warmup + steps} {'(warm-up) ' if step < warmup else ''}"
            f"loss {losses[-1]:.4f}  {elapsed:.3f} s")
        if checkpoints:
            done = first_step + step + 1
            checkpoints.save(done, state, {"next_step": done, "layout": str(run.layout),
                                           "model": run.model.name, "seed": run.seed,
                                           "global_batch": run.global_batch, "seq_len": run.seq_len})
    if profile_dir:
        jax.profiler.stop_trace()
        log(profile.report(profile_dir, steps))
    if checkpoints:
        checkpoints.close()

    device = local_device
    step_time = statistics.median(step_times)
    tokens_per_s = run.tokens_per_step / step_time
    peak = peak_tflops if peak_tflops is not None else flops.peak_tflops(device.device_kind)
    achieved, mfu = flops.mfu(run.model, run.seq_len, tokens_per_s, len(devices), peak)
    device_stats = device.memory_stats() or {}
    memory["device_peak_bytes"] = device_stats.get("peak_bytes_in_use")
    return {
        "num_devices": len(devices), "platform": platform, "device_kind": device.device_kind,
        "compile_time_s": compile_time, "step_time_s": step_time, "step_times_s": step_times,
        "tokens_per_s": tokens_per_s, "model_flops_per_token": flops.model_flops_per_token(run.model, run.seq_len),
        "model_tflops_per_device": achieved, "mfu": mfu, "peak_tflops": peak,
        "memory": memory, "losses": losses, "steps": steps, "warmup": warmup,
        "first_step": first_step, "restored_from": restored_from, "num_processes": jax.process_count(),
    }


def compiled_memory(compiled) -> dict:
    """Per-device bytes from XLA's memory analysis of the compiled step; peak = arguments +
    outputs - donated (aliased) + temporaries."""
    stats = compiled.memory_analysis()
    if stats is None:
        return {"compiled_peak_bytes_per_device": None}
    peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)
    return {"compiled_peak_bytes_per_device": peak, "argument_bytes": stats.argument_size_in_bytes,
            "output_bytes": stats.output_size_in_bytes, "alias_bytes": stats.alias_size_in_bytes,
            "temp_bytes": stats.temp_size_in_bytes}


def summary(result: dict) -> str:
    """Readable lines for a result row."""
    if result["status"] != "ok":
        return f"{result['status'].upper()}: {result['error']}"
    mib = lambda b: f"{b / 2**20:,.1f} MiB" if b is not None else "n/a"
    mem = result["memory"]
    mfu = (f"MFU {100 * result['mfu']:.1f}% of {result['peak_tflops']:g} TFLOP/s" if result["mfu"] is not None
           else f"MFU n/a (no peak known for {result['device_kind']!r}; pass --peak_tflops)")
    times = result["step_times_s"]
    return "\n".join([
        f"model       {result['model']} ({result['n_params'] / 1e6:,.1f}M parameters), {result['dtype']}",
        f"devices     {result['num_devices']} x {result['platform']} ({result['device_kind']})",
        f"layout      {result['layout']}",
        f"batch       {result['global_batch']} x {result['seq_len']} tokens, "
        f"{result['grad_accum_steps']} micro-batch(es) of {result['micro_batch']} per shard",
        f"compile     {result['compile_time_s']:.1f} s",
        f"step        median {result['step_time_s']:.4f} s (min {min(times):.4f}, max {max(times):.4f}) "
        f"over {result['steps']} steps after {result['warmup']} warm-up",
        f"throughput  {result['tokens_per_s']:,.0f} tokens/s, "
        f"{result['model_tflops_per_device']:.4g} model TFLOP/s per device, {mfu}",
        f"memory      compiled peak {mib(mem['compiled_peak_bytes_per_device'])} per device, "
        f"device peak {mib(mem.get('device_peak_bytes'))}",
        f"loss        {result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}",
    ])


def _finite(value):
    """JSON has no NaN/inf: write null for them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def main(argv):
    launch.die_with_parent()
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; all options are --flags")
    result = {"status": "ok", "error": None, "model": FLAGS.model, "mesh": FLAGS.mesh,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python -m jaxlayouts.bench"] + sys.argv[1:])}
    log = distributed.log_once
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        values = {name: FLAGS[name].value for name in FLAG_NAMES}
        run, axis_rules = run_config(values, prepare_devices(values))
        result.update(describe(run))
        result["axis_rules"] = axis_rules or None
        result.update(benchmark(run, steps=FLAGS.steps, warmup=FLAGS.warmup, axis_rules=axis_rules,
                                peak_tflops=FLAGS.peak_tflops, profile_dir=FLAGS.profile_dir,
                                device_memory_gb=FLAGS.device_memory_gb,
                                checkpoint_dir=FLAGS.checkpoint_dir, checkpoint_every=FLAGS.checkpoint_every,
                                restore=FLAGS.restore, log=log))
    except InvalidLayout as error:
        result.update(status="invalid", error=str(error))
    except CompileError as error:
        result.update(status="compile_error", error=str(error))
    except Exception as error:  # recorded as data: the sweep reads status and error
        result.update(status="oom" if is_oom(error) else "error", error=f"{type(error).__name__}: {error}")
    result["jax_version"] = importlib.metadata.version("jax")
    jax = sys.modules.get("jax")
    process = jax.process_index() if jax else 0
    if process == 0:  # only process 0 reports
        line = json.dumps(_finite(result))
        print(summary(result))
        print(line, flush=True)
        if FLAGS.output:
            with open(FLAGS.output, "a") as out:
                out.write(line + "\n")
    elif result["status"] != "ok":
        log(f"process {process}: {summary(result)}")
    code = EXIT_CODES[result["status"]]
    if code and jax and jax.process_count() > 1:
        # Leave at once: a clean shutdown would wait for peers that may never get here. The
        # launcher (or srun --kill-on-bad-exit) stops them; the runtime's heartbeat does too.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def entry():
    app.run(main)


if __name__ == "__main__":
    entry()
