"""Timing harness: train a LLaMA under one layout and report step time, tokens/s, MFU and memory.

    python -m jaxlayouts.bench --mesh dp=8,tp=4,pp=1
    python -m jaxlayouts.bench --model llama-13b --mesh fsdp=8 --zero 1 --seq_len 2048 --global_batch 64

Without an accelerator the harness emulates as many CPU devices as the mesh needs. Method:
compile ahead of time (timed on its own), run ``--warmup`` steps, then time ``--steps`` steps,
each ended by ``block_until_ready`` before the clock is read; report the median. The summary goes
to stdout and its last line is one JSON object (also appended to ``--output`` as a JSON line).
Every input is checked before any device exists (``config.py``, ``layout.validate``). JAX is
imported inside the functions that run once the devices are set up: emulated CPU devices must be
requested before JAX starts.
Exit codes: 0 ok, 1 error, 2 invalid input, 3 out of memory, 4 compile error, 5 a write failed
(``--output``, a checkpoint or a profile: a full disk is never out of memory), 130 interrupted
(Ctrl-C: the row says ``interrupted``).
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import importlib.metadata
import json
import math
import os
import signal
import statistics
import sys
import time

from absl import app, flags, logging

from jaxlayouts import config, devices, distributed, launch
from jaxlayouts.analysis import hlo, profile
from jaxlayouts.analysis.memory import compiled_memory
from jaxlayouts.config import BenchOptions
from jaxlayouts.layout import Layout, RunConfig, validate
from jaxlayouts.plan.hardware import allocator_fraction
from jaxlayouts.results import Results, WriteError
from jaxlayouts.schema import InvalidInput, check_instance, finite_json

FLAGS = flags.FLAGS
EXIT_CODES = {"ok": 0, "error": 1, "invalid": 2, "oom": 3, "compile_error": 4, "write_error": 5,
              "interrupted": 130}
HOST_MEMORY_SHARE = 0.25
"""At most this share of the host's memory goes to the synthetic token batches."""


class OutOfMemory(RuntimeError):
    """The compiled step needs more memory per device than the device has."""


class CompileError(RuntimeError):
    """XLA could not compile the step (other than for lack of memory)."""


def is_oom(error: BaseException) -> bool:
    """Device memory ran out; a file that could not be written (a full disk) never counts."""
    if isinstance(error, OutOfMemory):
        return True
    text = str(error)
    if isinstance(error, OSError) or "No space left on device" in text or "ENOSPC" in text:
        return False
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


# ---------------------------------------------------------------------------------------------
# Before any device exists


def check_before_devices(values: dict, opts: BenchOptions) -> tuple[int | None, RunConfig | None]:
    """Everything that can be checked without devices: the run itself (when the mesh names every
    size), the emulated device count and the host memory the batches will take. Returns the
    count and the run, both None for a ``-1`` axis on an accelerator (JAX counts the devices)."""
    problem = devices.check_environment()
    if problem:
        raise InvalidInput("environment", problem)
    allocator_fraction()  # a memory fraction that is not a number, named before JAX reads it
    count = config.emulated_device_count(values)
    if count is None:  # a -1 axis on an accelerator: checked once JAX has counted the devices (measure)
        return None, None
    run = config.run_config(values, count)
    validate(run, run.layout.num_devices)
    check_host_memory(run, opts)
    return count, run


STATE_BYTES_PER_PARAMETER = 16
"""float32 master weights, gradients and AdamW's two moments: the least a training step holds."""


def host_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def state_bytes_on_host(run: RunConfig) -> int:
    """The least memory the training state takes over all of the mesh's devices: each device
    holds its shard of the float32 weights, gradients and AdamW moments (split over tp and pp,
    the weights and moments also over fsdp from ZeRO-1, the gradients from ZeRO-2), and every
    replica (dp, cp, fsdp without ZeRO) holds its own copy. On CPU emulation all of them live
    in this host's memory."""
    mesh, zero = run.layout.mesh, run.layout.zero_stage
    split = mesh["tp"] * mesh["pp"]
    weights_and_moments = 12 * run.model.n_params // (split * (mesh["fsdp"] if zero.shards_state else 1))
    gradients = 4 * run.model.n_params // (split * (mesh["fsdp"] if zero.shards_gradients else 1))
    return (weights_and_moments + gradients) * run.layout.num_devices


def check_host_memory(run: RunConfig, opts: BenchOptions) -> None:
    """On CPU emulation every device lives in this host's memory: refuse a run whose batches, or
    whose training state on all devices (replicas counted each), would not fit in it, before
    anything is allocated."""
    host = host_bytes()
    batch_bytes = (opts.warmup + opts.steps) * run.global_batch * (run.seq_len + 1) * 4
    if batch_bytes > HOST_MEMORY_SHARE * host:
        raise InvalidInput("global_batch", f"{opts.warmup + opts.steps} steps of {run.global_batch} x "
                           f"{run.seq_len + 1} tokens take {batch_bytes / 2**30:.4g} GiB of host memory, more "
                           f"than {HOST_MEMORY_SHARE:.0%} of this machine's {host / 2**30:.4g} GiB; "
                           "lower --global_batch, --seq_len or --steps")
    state_bytes = state_bytes_on_host(run)
    if not devices.accelerator_present() and state_bytes > host:
        single = STATE_BYTES_PER_PARAMETER * run.model.n_params
        knob = "model" if single > host else "mesh"
        fix = ("run it on GPUs" if knob == "model" else
               "use fewer replicas (a smaller dp or cp), shard the state (--zero 1-3 over fsdp, tp, pp), "
               "or run it on GPUs")
        raise InvalidInput(knob, f"training {run.model.name} under {run.layout} on "
                           f"{run.layout.num_devices} emulated CPU devices needs at least {state_bytes / 2**30:.4g} "
                           f"GiB of this host's memory (float32 weights, gradients and AdamW moments, "
                           f"{STATE_BYTES_PER_PARAMETER} bytes per parameter, on every device that holds them) and "
                           f"it has {host / 2**30:.4g} GiB; {fix}, or look at the layout without memory: "
                           "python -m jaxlayouts.explore with the same flags")


def prepare_devices(count: int | None, values: dict, opts: BenchOptions) -> int:
    """Ask for ``count`` emulated CPU devices (before JAX is imported; None: a ``-1`` axis) and join
    a multi-process run when one is configured; returns the global device count."""
    try:
        cluster = distributed.detect(opts.coordinator_address, opts.num_processes, opts.process_id)
    except ValueError as error:
        raise InvalidInput("coordinator_address", str(error)) from None
    accelerator = devices.accelerator_present()
    if count is None and not accelerator:
        raise InvalidInput("mesh", f"{values['mesh']}: -1 needs a device count on CPU emulation; "
                           "give --num_devices")
    if count is not None and not accelerator:
        if count % cluster.num_processes:
            raise InvalidInput("num_processes", f"{count} devices do not split over "
                               f"{cluster.num_processes} processes")
        devices.request_host_devices(count // cluster.num_processes)
    try:
        distributed.initialize(cluster, cpu=not accelerator, init_timeout_s=opts.init_timeout_s,
                               heartbeat_timeout_s=opts.heartbeat_timeout_s)
    except Exception as error:  # an unreachable coordinator, a peer that never starts: one line
        raise RuntimeError(f"joining the run at {cluster.coordinator_address or 'SLURM'} as process "
                           f"{cluster.process_id} of {cluster.num_processes} failed: {first_line(error)}") from None
    start_backend()
    if count is None:
        import jax  # only now: an accelerator decides the device count
        count = jax.device_count()
    return count


def first_line(error: BaseException, limit: int = 300) -> str:
    text = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return text if len(text) <= limit else text[:limit] + " ..."


def start_backend() -> None:
    """Start JAX's backend now, so that JAX_PLATFORMS naming a platform this machine lacks is
    ``invalid`` (naming the variable) instead of a failure deep in the run."""
    import jax
    try:
        jax.devices()
    except RuntimeError as error:
        if "Unable to initialize backend" not in str(error) and "JAX_PLATFORMS" not in str(error):
            raise
        raise InvalidInput("environment", f"JAX_PLATFORMS={os.environ.get('JAX_PLATFORMS', '')!r}: "
                           f"{first_line(error, 200)}; name a platform this machine has, e.g. "
                           "JAX_PLATFORMS=cpu, or unset it") from None


# ---------------------------------------------------------------------------------------------
# The harness: compile, check memory, initialise or restore, time the steps


def benchmark(run: RunConfig, options: BenchOptions | None = None, *, axis_rules: dict | None = None,
              devices=None, log=print, **overrides) -> dict:
    """Validate, compile, train ``warmup + steps`` steps on ``devices`` (default: all) and return
    the measured fields. ``overrides`` replace fields of ``options`` (``steps=2``). With
    ``checkpoint_dir``, save every ``checkpoint_every`` steps and (with ``restore``) resume from the
    latest complete checkpoint, resharded into this layout."""
    import jax

    from jaxlayouts import checkpoint, train
    from jaxlayouts import mesh as meshes

    opts = BenchOptions(**{**(options or BenchOptions()).__dict__, **overrides})
    devices = list(devices) if devices is not None else jax.devices()
    # the CLI checked the run before devices existed; this adds the platform's checks (GPU-only
    # kernels), and is the only check a Python caller gets
    validate(run, len(devices), devices[0].platform)
    check_instance(opts)
    device_mesh = meshes.build_mesh(run.layout, devices)
    if jax.process_count() > 1:
        distributed.log_once(distributed.describe_topology(run.layout, jax.process_count()))
    trainer = train.Trainer(run, device_mesh, axis_rules)
    saver = checkpoint.Checkpoints(opts.checkpoint_dir, opts.checkpoint_every) if opts.checkpoint_dir else None
    try:
        if opts.restore:
            check_restorable(saver, run)
        cache = enable_compilation_cache(devices[0].platform)
        log(f"compiling {run.model.name} under {run.layout} on {len(devices)} x {devices[0].platform} "
            f"(layers {'scanned' if trainer.scan_layers else 'unrolled'}{f'; compilation cache {cache}' if cache else ''}) ...")
        compiled, compile_time = compile_step(trainer)
        local_device = next(d for d in devices if d.process_index == jax.process_index())
        memory = compiled_memory(compiled)
        check_fits(memory, local_device, opts, sum(d.process_index == jax.process_index() for d in devices))
        state, first_step, restored_from = initial_state(trainer, saver, opts.restore, log)
        losses, step_times = train_steps(trainer, compiled, state, first_step, opts, saver, log)
    finally:
        if saver:
            saver.close()
    return {"num_devices": len(devices), "platform": devices[0].platform, "compile_time_s": compile_time,
            "scan_layers": trainer.scan_layers,  # resolved: the layout's choice, else the platform's default
            "first_step": first_step, "restored_from": restored_from, "num_processes": jax.process_count(),
            **measured_fields(run, opts, local_device, len(devices), losses, step_times, memory)}


def check_restorable(saver, run: RunConfig) -> None:
    """Before compiling: the latest checkpoint exists and was saved by a run of this model with
    the same data settings (``checkpoint.mismatch``), else :class:`InvalidInput` for --restore."""
    from jaxlayouts import checkpoint

    try:
        step, record = saver.latest_record()
    except FileNotFoundError as error:
        raise InvalidInput("restore", f"{error}; run once without --restore to save one") from None
    problem = checkpoint.mismatch(record, run)
    if problem:
        raise InvalidInput("restore", f"the checkpoint of step {step} in {saver.manager.directory} does not fit "
                           f"this run: {problem}")


COMPILATION_CACHE = "~/.cache/jaxlayouts/xla"
"""Where the bench keeps JAX's persistent compilation cache on a GPU, unless one is configured
(``JAX_COMPILATION_CACHE_DIR``): a GPU step has its layers unrolled, whose compile took 1.2-3.2x the
scanned one's (docs/gpu-program.md); a rerun of the same step with the same jaxlib loads the
executable instead of compiling it."""


def enable_compilation_cache(platform: str) -> str | None:
    """On an accelerator, JAX's persistent compilation cache in :data:`COMPILATION_CACHE` unless a
    cache directory is configured already; returns the directory in use (None on CPU)."""
    import jax

    if platform == "cpu":
        return jax.config.jax_compilation_cache_dir
    if not jax.config.jax_compilation_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(COMPILATION_CACHE))
    return jax.config.jax_compilation_cache_dir


def compile_step(trainer) -> tuple:
    """The compiled step and its compile time; a failure other than memory is a CompileError."""
    start = time.perf_counter()
    try:
        compiled = trainer.lower().compile()
    except Exception as error:
        if is_oom(error):
            raise
        raise CompileError(f"{type(error).__name__}: {error}") from error
    return compiled, time.perf_counter() - start


def check_fits(memory: dict, device, opts: BenchOptions, local_devices: int = 1) -> None:
    """OutOfMemory when the compiled peak exceeds the device's capacity (``--device_memory_gb``,
    else what the device reports), or, on CPU emulation, when the ``local_devices`` peaks together
    exceed this host's memory, which they all share."""
    capacity = (opts.device_memory_gb * 2**30 if opts.device_memory_gb
                else (device.memory_stats() or {}).get("bytes_limit"))
    peak = memory["compiled_peak_bytes_per_device"]
    if capacity and peak and peak > capacity:
        raise OutOfMemory(f"compiled peak {peak / 2**30:.4g} GiB per device exceeds the "
                          f"device memory {capacity / 2**30:.4g} GiB")
    cpu = device is not None and device.platform == "cpu"
    if cpu and peak and peak * local_devices > host_bytes():  # emulated devices share this host's memory
        raise OutOfMemory(f"compiled peak {peak / 2**30:.4g} GiB per device x {local_devices} emulated CPU devices "
                          f"exceeds this host's {host_bytes() / 2**30:.4g} GiB; use fewer devices or a "
                          "smaller batch, or look at the layout with python -m jaxlayouts.explore")


def initial_state(trainer, saver, restore: bool, log) -> tuple:
    """``(state, first step, layout restored from)``: fresh from the seed, or (``--restore``) the
    latest complete checkpoint of ``saver``."""
    if not restore:
        distributed.barrier("jaxlayouts_compiled")  # init_state runs collectives
        return trainer.init_state(), 0, None
    state, record = saver.restore(trainer.abstract_state_with_shardings())
    state = trainer.from_layer_order(state, Layout.parse(record["layout"]))
    log(f"restored step {record['next_step']} (saved under {record['layout']}) into {trainer.run.layout}")
    return state, record["next_step"], record["layout"]


def train_steps(trainer, compiled, state, first_step: int, opts: BenchOptions, saver, log) -> tuple[list, list]:
    """Run the warm-up and timed steps, saving to ``saver`` on its interval; returns every loss
    and the timed steps' seconds."""
    import jax

    from jaxlayouts import checkpoint, data, train

    run = trainer.run
    batches = [data.device_batch(
        data.global_batch_tokens(run.seed, step, run.global_batch, run.seq_len, run.model.vocab_size),
        run.grad_accum_steps, trainer.mesh, train.BATCH_SPEC)
        for step in range(first_step, first_step + opts.warmup + opts.steps)]
    jax.block_until_ready(batches)
    distributed.barrier("jaxlayouts_ready_to_train")
    losses, step_times = [], []
    for step, batch in enumerate(batches):
        if step == opts.warmup and opts.profile_dir:
            with writing("profile_dir", opts.profile_dir):
                jax.profiler.start_trace(opts.profile_dir, create_perfetto_trace=True)
        start = time.perf_counter()
        state, loss = compiled(state, batch)
        jax.block_until_ready((state, loss))
        elapsed = time.perf_counter() - start
        check_interrupt()  # a Ctrl-C that arrived inside JAX's dispatch
        losses.append(float(loss))
        if not math.isfinite(losses[-1]):
            raise RuntimeError(f"the loss is {losses[-1]} at step {first_step + step + 1}: training diverged "
                               "(a lower --learning_rate, or float32, may help)")
        if step >= opts.warmup:
            step_times.append(elapsed)
        log(f"  step {step + 1}/{opts.warmup + opts.steps} {'(warm-up) ' if step < opts.warmup else ''}"
            f"loss {losses[-1]:.4f}  {elapsed:.3f} s")
        done = first_step + step + 1
        if saver and done % opts.checkpoint_every == 0:
            if saver.save(done, state, checkpoint.record_of(run, done)):
                log(f"  checkpoint: saving step {done} to {opts.checkpoint_dir}")
    if opts.profile_dir:
        with writing("profile_dir", opts.profile_dir):
            jax.profiler.stop_trace()
        try:
            axes = hlo.collective_axes(compiled.as_text(), dict(trainer.mesh.shape))
            log(profile.report(opts.profile_dir, opts.steps, axes=axes))
        except Exception as error:  # the summary is a reading aid: it never costs the measurement
            log(f"profile: trace written to {opts.profile_dir}; its summary failed ({type(error).__name__}: {error})")
    return losses, step_times


@contextlib.contextmanager
def writing(knob: str, path: str):
    """A failure inside is a :class:`WriteError` naming ``--knob path`` (status ``write_error``)."""
    try:
        yield
    except WriteError:
        raise
    except Exception as error:
        raise WriteError(getattr(error, "errno", None) or errno.EIO, f"--{knob} {path}: could not be written "
                         f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from error


def measured_fields(run: RunConfig, opts: BenchOptions, device, num_devices: int, losses: list,
                    step_times: list, memory: dict) -> dict:
    """Step time, throughput, MFU and memory of a finished run (the result row's measured part)."""
    from jaxlayouts import flops

    step_time = statistics.median(step_times)
    tokens_per_s = run.tokens_per_step / step_time
    peak = opts.peak_tflops if opts.peak_tflops is not None else flops.peak_tflops(device.device_kind)
    achieved, mfu = flops.mfu(run.model, run.seq_len, tokens_per_s, num_devices, peak)
    if mfu is not None and mfu > 1:
        raise InvalidInput("peak_tflops", f"the step ran at {achieved:.4g} model TFLOP/s per device, above the "
                           f"peak of {peak:g}: give the device's real bf16 peak, e.g. --peak_tflops 989")
    stats = device.memory_stats() or {}
    memory = {**memory, "device_peak_bytes": stats.get("peak_bytes_in_use"), "device_bytes_limit": stats.get("bytes_limit")}
    return {"device_kind": device.device_kind, "step_time_s": step_time, "step_times_s": step_times,
            # the share of GPU memory JAX's allocator took (plan validate holds it to the hardware file's)
            "memory_fraction": None if device.platform == "cpu" else allocator_fraction(),
            "tokens_per_s": tokens_per_s, "model_flops_per_token": flops.model_flops_per_token(run.model, run.seq_len),
            "model_tflops_per_device": achieved, "mfu": mfu, "peak_tflops": peak, "memory": memory,
            "losses": losses, "steps": opts.steps, "warmup": opts.warmup}


# ---------------------------------------------------------------------------------------------
# The command line


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


def measure(result: dict, log) -> None:
    """Fill ``result`` from the flags: check them, make the devices, run the benchmark."""
    values = config.values_from_flags(FLAGS)
    opts = config.options(values)
    count, run = check_before_devices(values, opts)
    total = prepare_devices(count, values, opts)
    if run is None:  # a -1 axis, resolved only now that the accelerator's devices are counted
        run = config.run_config(values, total)
        check_host_memory(run, opts)
    result.update(config.describe(run))
    axis_rules = config.parse_axis_rules(opts.axis_rules)
    result["axis_rules"] = axis_rules or None
    result.update(benchmark(run, opts, axis_rules=axis_rules, log=log))


def report(result: dict) -> None:
    """Process 0 appends the row to ``--output`` (when that is a results file, or none yet), then
    prints the summary and the JSON line. A row that could not be appended (a full disk) turns an
    ``ok`` into ``write_error`` naming the file; the printed row says what happened either way."""
    output = FLAGS["output"].value
    if output and not (result["error"] or "").startswith("--output:"):  # not when --output is the problem
        try:
            Results(output, knob="output", keyed=False).append(finite_json(result))
        except (InvalidInput, OSError) as error:
            message = f"could not append the result to --output {output}: {error}"
            print(message, file=sys.stderr)
            if result["status"] == "ok":
                result.update(status="write_error", error=message)
    print(summary(result))
    print(json.dumps(finite_json(result)), flush=True)


def main(argv):
    launch.die_with_parent()
    signal.signal(signal.SIGINT, _on_interrupt)
    sys.unraisablehook = _quiet_interrupts
    result = {"status": "ok", "error": None, "model": FLAGS.model, "mesh": FLAGS.mesh,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python -m jaxlayouts.bench"] + sys.argv[1:])}
    log = distributed.log_once
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
        if len(argv) > 1:
            raise InvalidInput("flags", f"unexpected arguments {argv[1:]}; all options are --flags, "
                               "e.g. --mesh dp=8")
        measure(result, log)
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C cannot tear the row
        result.update(status="interrupted", error=INTERRUPTED)
    except InvalidInput as error:
        result.update(status="invalid", error=str(error))
    except CompileError as error:
        result.update(status="compile_error", error=str(error))
    except WriteError as error:
        result.update(status="write_error", error=str(error))
    except Exception as error:  # recorded as data: the sweep reads status and error
        result.update(status="oom" if is_oom(error) else "error", error=f"{type(error).__name__}: {error}")
    result["jax_version"] = importlib.metadata.version("jax")
    jax = sys.modules.get("jax")
    process = process_index(jax)
    if process == 0:  # only process 0 reports
        report(result)
    elif result["status"] != "ok":
        log(f"process {process}: {summary(result)}")
    code = EXIT_CODES[result["status"]]
    if code:
        # Leave at once: a clean shutdown would wait for peers that may never get here, or for
        # background threads of a failed checkpoint save. The launcher (or srun --kill-on-bad-exit)
        # stops the peers; the runtime's heartbeat does too.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


INTERRUPTED = "interrupted (Ctrl-C / SIGINT); nothing after this point was measured"
_interrupt_seen = False


def _on_interrupt(signum, frame):
    """SIGINT: remember it, then raise KeyboardInterrupt as Python does. JAX's dispatch can swallow
    an exception raised inside it, so the timed loop also checks :func:`check_interrupt`."""
    global _interrupt_seen
    _interrupt_seen = True
    raise KeyboardInterrupt


def _quiet_interrupts(unraisable, default=sys.unraisablehook) -> None:
    """A Ctrl-C that lands in a callback Python cannot raise from (JAX's garbage-collection hook)
    is dropped there without a traceback; :func:`check_interrupt` acts on it after the step."""
    if not issubclass(unraisable.exc_type, KeyboardInterrupt):
        default(unraisable)


def check_interrupt() -> None:
    if _interrupt_seen:
        raise KeyboardInterrupt


def process_index(jax) -> int:
    """This process's index in a multi-process run (0 when JAX never started, or failed to)."""
    try:
        return jax.process_index() if jax else 0
    except Exception:  # a backend that failed to start has no index: report as process 0
        return 0


def report_invalid_flags(error: InvalidInput) -> None:
    """A malformed command line is an ``invalid`` result like any other bad input."""
    result = {"status": "invalid", "error": str(error), "jax_version": importlib.metadata.version("jax")}
    print(summary(result))
    print(json.dumps(result), flush=True)


def entry():
    config.define_flags(FLAGS)
    try:
        app.run(main, flags_parser=config.flags_parser(report_invalid_flags))
    except KeyboardInterrupt:  # before main could record it (while flags were read)
        result = {"status": "interrupted", "error": INTERRUPTED, "jax_version": importlib.metadata.version("jax")}
        print(summary(result))
        print(json.dumps(result), flush=True)
        sys.exit(EXIT_CODES["interrupted"])


if __name__ == "__main__":
    entry()
