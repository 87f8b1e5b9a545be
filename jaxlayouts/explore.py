"""Inspect a layout at any cluster size without the cluster: shardings, memory, collectives, FLOPs.

From Python or a notebook, with no set-up (the emulated devices are arranged here)::

    from jaxlayouts import explore
    r = explore.layout("llama-7b", mesh="fsdp=8,tp=4", seq_len=2048, global_batch=64, micro_batch=1)
    r                       # tables in a notebook, text in a terminal (print(r))
    r.show("layers/attn/wq")             # which device holds which shard
    explore.compare(["fsdp=32", "fsdp=8,tp=4", "dp=4,tp=8"], model="llama-7b", seq_len=2048, global_batch=64)

From the shell, with the bench's knobs: ``python -m jaxlayouts.explore --model llama-65b --mesh
dp=4,tp=8,pp=4 --seq_len 2048 --global_batch 512 [--target h100-80gb] [--census] [--json] [--hlo_out FILE]``.

The training step is compiled ahead of time for ``target`` (abstract shapes, so no parameter
memory): a GPU hardware such as ``h100-80gb`` compiles XLA:GPU's own program without a GPU
(``targets.py``; the ``[gpu-aot]`` extra), whose memory is the figure to trust; ``cpu`` (the
default) compiles on emulated CPU devices, one per device of the layout. The report holds, per device: every parameter and the
main activations with their logical axes, PartitionSpec, shapes and bytes; memory from XLA's
compiled memory analysis beside the analytic model's (``plan/cost.py``), with why they differ;
every collective of the compiled step with its mesh axes, bytes and executions per step (loop trip
counts multiplied in); model FLOPs per step; the planner's predicted step time and MFU. With
``--census`` (``census=True``), the census of the compiled program (``analysis/census.py``): GEMMs by
dtype, copy-like ops, fusions and collectives per step; ``--hlo_out`` writes the program it read.

XLA's CPU client compiles for at most 2048 devices in one process. A larger layout is compiled
there with fewer data-parallel replicas (``dp``) and the global batch cut in the same proportion:
every device holds and does exactly what it would in the full layout, so per-device memory,
shardings and collective sizes are those of the full layout (only the dp groups are smaller); the
report says so. A GPU target compiles every layout whole.
The compile itself is ``analysis/compiled.py``'s, which the planner's ``--verify`` shares.
JAX is imported inside the functions: the devices must be arranged before JAX starts.

Under context parallelism (``cp`` > 1) the activations' sequence axis is sharded over ``cp``, the
collectives show ring attention's collective-permutes over ``cp`` (all-gathers inside pipelines),
and the report's ``context_parallel`` paragraph says what the planner charges for them.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys

from absl import app, flags

from jaxlayouts import config, flops, targets
from jaxlayouts.analysis.census import census as program_census
from jaxlayouts.analysis.compiled import compile_step, compiled_run, which_figure_to_trust
from jaxlayouts.explore_view import Comparison, Report
from jaxlayouts.layout import MAX_EMULATED_DEVICES, Layout, RunConfig, mesh_text, parse_mesh, validate
from jaxlayouts.plan import cost
from jaxlayouts.plan.hardware import load_hardware
from jaxlayouts.schema import InvalidInput, creatable, knobs, refuse_special

FLAGS = flags.FLAGS
MAX_TARGET_DEVICES = 65536
"""The largest GPU cluster explore compiles for (a deviceless topology has no device limit; compile
time and host memory grow with the device count: see docs/deviceless.md's measured sizes)."""
CLI_KNOBS = tuple(n for n in config.KNOB_NAMES if n not in config.NOT_A_RUN_KNOB or n == "num_devices")
"""The knobs the command line takes: the run's, and the cluster size for a ``-1`` axis."""
ACTIVATIONS = {
    "residual": ("batch", "act_seq", "act_embed"),
    "attention_heads": ("batch", "seq", "act_heads", "head_dim"),
    "mlp_hidden": ("batch", "seq", "act_mlp"),
    "logits": ("batch", "seq", "act_vocab"),
}
"""The activations a report lays out: one layer's residual stream (what sequence parallelism
shards), its query heads, the SwiGLU hidden layer and the logits, by logical axes."""


# ---------------------------------------------------------------------------------------------
# One call from Python


def layout(model: str = "tiny", *, layout: str | None = None, target: str = targets.CPU,
           hardware: str | None = None, census: bool = False, **values) -> Report:
    """The report for one layout: ``model`` and any bench knob as a keyword (``mesh="fsdp=8,tp=4"``,
    ``seq_len=2048``, ...), or ``layout=`` the layout's text form; compiled for ``target``
    (``"h100-80gb"``: XLA:GPU without a GPU; ``"cpu"``: emulated CPU devices). The analytic model
    costs it on ``hardware`` (default: the target's, else a100-80gb); ``census=True`` adds the census of
    the compiled program (``analysis/census.py``). Arranges the devices itself;
    where JAX already started unsuited, compiles in a child process (and says so)."""
    _text_argument("layout", layout, "fsdp=8,tp=4 mbs=1", optional=True)
    _text_argument("target", target, targets.CPU)
    _text_argument("hardware", hardware, "a100-80gb", optional=True)
    if not isinstance(census, bool):
        raise InvalidInput("census", f"{census!r:.40} is not True or False; e.g. census=True")
    run, checked = _run(model, layout, values)
    chosen = targets.resolve(target)
    hardware = _hardware(hardware, target, chosen)
    count = compiled_count(run, chosen)
    if chosen.is_gpu:
        chosen.topology(count)
    if _devices_ready(chosen, count):
        return Report(explore(run, hardware, target=target, census=census))
    return Report(_in_child_process(checked, hardware, target, "XLA:GPU" if chosen.is_gpu
                                    else f"{count} emulated CPU devices", census))


def compare(layouts: list[str], *, model: str = "tiny", target: str = targets.CPU, hardware: str | None = None,
            **values) -> Comparison:
    """Several layouts (text forms, or meshes such as ``"fsdp=8,tp=4"``) of one run side by side:
    memory per device, collective bytes by mesh axis, predicted step time and MFU, and a figure."""
    if isinstance(layouts, (str, bytes)) or not isinstance(layouts, (list, tuple)) or not layouts:
        raise InvalidInput("layouts", f"{layouts!r:.80} is not a non-empty list of layouts; give one, e.g. "
                           "compare([\"fsdp=8,tp=4\", \"dp=8,tp=4\"], model=\"llama-7b\")")
    for i, text in enumerate(layouts):
        _text_argument(f"layouts[{i}]", text, "fsdp=8,tp=4")
    _text_argument("target", target, targets.CPU)
    _text_argument("hardware", hardware, "a100-80gb", optional=True)
    runs = [_run(model, text, values)[0] for text in layouts]
    chosen = targets.resolve(target)
    _devices_ready(chosen, max(compiled_count(run, chosen) for run in runs))
    return Comparison([layout(model, layout=text, target=target, hardware=hardware, **values) for text in layouts])


def _hardware(name: str | None, target_name: str, target: targets.Target) -> str:
    """The analytic model's hardware: as given, else the target's own file (``target_name``, a name
    or YAML path), else the study's A100."""
    name = name or (target_name if target.is_gpu else "a100-80gb")
    load_hardware(name)
    return name


def compiled_count(run: RunConfig, target: targets.Target) -> int:
    """Devices the compile needs: the layout's on a GPU target, :func:`compiled_run`'s on XLA:CPU."""
    return run.layout.num_devices if target.is_gpu else compiled_run(run)[0].layout.num_devices


def _text_argument(name: str, value, example: str, optional: bool = False) -> None:
    """:class:`InvalidInput` naming the argument ``name`` unless ``value`` is non-empty text
    (or None where ``optional``)."""
    if value is None and optional:
        return
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput(name, f"{value!r:.80} is not {'text' if not isinstance(value, str) else 'a value'}; "
                           f"give one, e.g. {example!r}")


def _run(model: str, text: str | None, values: dict) -> tuple[RunConfig, dict]:
    """A checked run and its knob values from keywords; ``text`` is a layout's text form (or a bare
    mesh): the fields it names override the keywords."""
    overrides = dict(values)
    if text is not None:
        parsed = Layout.parse(text)
        named = {item.partition("=")[0] for item in text.split()[1:]}
        overrides.update({f.name: getattr(parsed, f.name) for f in knobs(Layout)
                          if f.metadata["key"] in named}, mesh=mesh_text(parsed.mesh))
    checked = config.check_values(config.values_with(model=model, **overrides))
    run = config.run_config(checked, checked["num_devices"])
    validate(run, run.layout.num_devices)
    return run, checked


def _devices_ready(target: targets.Target, count: int) -> bool:
    """Arrange the devices for ``target`` if JAX has not started; whether this process can
    compile for it (``count`` emulated CPU devices, or a CPU-only JAX for a GPU target)."""
    targets.prepare(target, count)
    import jax
    if target.is_gpu:
        return os.environ.get("JAX_PLATFORMS") == targets.CPU
    return jax.default_backend() == "cpu" and jax.device_count() >= count


def _in_child_process(values: dict, hardware: str, target: str, on: str, census: bool = False) -> dict:
    """The report compiled by ``python -m jaxlayouts.explore`` with the same knob values."""
    import jax
    print(f"explore: JAX already started with {jax.device_count()} {jax.default_backend()} device(s); "
          f"compiling on {on} in a child process")
    args = [f"--{name}={values[name]}" if not isinstance(values[name], bool) else f"--{'' if values[name] else 'no'}{name}"
            for name in CLI_KNOBS if values.get(name) is not None]
    proc = subprocess.run([sys.executable, "-m", "jaxlayouts.explore", *args, f"--hardware={hardware}",
                           f"--target={target}", "--json", *(["--census"] if census else [])],
                          capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"explore's child process failed: {(proc.stderr or proc.stdout).strip()[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# The report


def explore(run: RunConfig, hardware: str = "a100-80gb", devices_=None, target: str = targets.CPU,
            hlo_out: str | None = None, census: bool = False) -> dict:
    """The report of ``run`` as a dict (see the module docstring), compiled for ``target`` on
    ``devices_`` (default: the target's; they only need to exist, nothing is allocated); with
    ``hlo_out``, the compiled step's optimized HLO is written there; with ``census``, the report's
    ``census`` holds :func:`analysis.census.census` of that program."""
    chosen = targets.resolve(target)
    if devices_ is None and chosen.is_gpu:
        devices_ = targets.devices(chosen, run.layout.num_devices)
    step = compile_step(run, devices_)
    if hlo_out:
        pathlib.Path(hlo_out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(hlo_out).write_text(step.hlo_text)
    hw = load_hardware(hardware)
    workload = cost.Workload.from_run(run, step.backend)  # the step compiled: scanned on CPU by default
    prediction = cost.predict(workload, hw)
    report = {
        "layout": str(run.layout), "model": run.model.name, "num_devices": run.layout.num_devices,
        "mesh": dict(run.layout.mesh), "hardware": hw.name, "target": chosen.name,
        "compiler": f"XLA:GPU ({step.device_kind}, no GPU)" if step.backend != "cpu" else "XLA:CPU (emulated devices)",
        "compiled_as": step.note, "scan_layers": step.trainer.scan_layers,
        "params": parameter_table(step.trainer), "activations": activation_table(run, step.trainer),
        "memory": memory_report(run, step.trainer, step.memory, cost.memory(workload, hw)),
        "collectives": collective_table(step.collectives),
        "model_flops_per_step": flops.model_flops_per_token(run.model, run.seq_len) * run.tokens_per_step,
        "predicted": {"step_time_s": prediction.step_time_s, "mfu": prediction.mfu, "fits": prediction.fits},
    }
    context = cost.context_parallel_text(workload, prediction)
    if context:  # under cp > 1 only: other reports keep their keys
        report["context_parallel"] = context
    if census:
        report["census"] = program_census(step.hlo_text, dict(step.trainer.mesh.shape))
    report["memory"]["usable"] = hw.usable_bytes
    report["memory"]["notes"] = memory_notes(run, report["memory"], step.backend, hw)
    return report


def _named(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _shard_row(name, logical, sharding, shape, dtype) -> dict:
    shard = sharding.shard_shape(tuple(shape))
    return {"name": name, "logical_axes": [a for a in logical], "spec": str(sharding.spec),
            "spec_axes": [[a] if isinstance(a, str) else list(a) if a else None for a in sharding.spec]
            + [None] * (len(shape) - len(sharding.spec)),
            "shape": list(shape), "shard_shape": list(shard), "dtype": str(dtype),
            "bytes": math.prod(shape) * dtype.itemsize, "bytes_per_device": math.prod(shard) * dtype.itemsize}


def parameter_table(trainer) -> list[dict]:
    """Each parameter as stored (float32 master): logical axes, PartitionSpec, global and
    per-device shapes and bytes."""
    import jax
    leaves = jax.tree_util.tree_leaves_with_path(trainer.abstract_state.params)
    axes = jax.tree.leaves(trainer.logical_axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    return [_shard_row(_named(path), logical, sharding, value.shape, value.dtype)
            for (path, value), logical, sharding in zip(leaves, axes, jax.tree.leaves(trainer.master_shardings))]


def activation_table(run: RunConfig, trainer) -> list[dict]:
    """The main activations of one micro-batch in the compute dtype, laid out by the compute rules
    (per device as ``trainer`` compiled them; global shapes those of ``run``, which may have more
    dp replicas than the compiled layout)."""
    import jax.numpy as jnp
    from jax.sharding import NamedSharding

    from jaxlayouts.mesh import spec

    def shapes(r: RunConfig) -> dict:
        m, rows = r.model, r.layout.micro_batch * r.layout.data_parallel
        return {"residual": (rows, r.seq_len, m.d_model), "attention_heads": (rows, r.seq_len, m.num_heads, m.head_dim),
                "mlp_hidden": (rows, r.seq_len, m.d_ff), "logits": (rows, r.seq_len, m.vocab_size)}
    compiled, full, dtype = shapes(trainer.run), shapes(run), jnp.dtype(run.dtype)
    table = []
    for name, logical in ACTIVATIONS.items():
        row = _shard_row(name, logical, NamedSharding(trainer.mesh, spec(logical, trainer.compute_rules)),
                         compiled[name], dtype)
        table.append({**row, "shape": list(full[name]), "bytes": math.prod(full[name]) * dtype.itemsize})
    return table


def _state_bytes(tree, shardings) -> int:
    import jax
    return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
               for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def memory_report(run: RunConfig, trainer, memory: dict, analytic: dict) -> dict:
    """Per-device bytes: XLA's compiled analysis beside the analytic model's."""
    return {
        "compiled": {"parameters": _state_bytes(trainer.abstract_state.params, trainer.master_shardings),
                     "optimizer": _state_bytes(trainer.abstract_state.opt_state, trainer.state_shardings.opt_state),
                     "gradients_activations_temporaries": memory["temp_bytes"],
                     "arguments": memory["argument_bytes"], "outputs": memory["output_bytes"],
                     "aliased": memory["alias_bytes"], "peak": memory["compiled_peak_bytes_per_device"]},
        "analytic": {"parameters": analytic["weights"], "optimizer": analytic["optimizer"],
                     "gradients": analytic["gradients"], "activations": analytic["activations"],
                     "overhead": analytic["overhead"], "total": analytic["total"]},
    }


def memory_notes(run: RunConfig, memory: dict, backend: str, hw) -> list[str]:
    """Why the compiled and analytic figures differ, for this layout, and which to trust."""
    compiled, analytic = memory["compiled"]["peak"], memory["analytic"]["total"] - memory["analytic"]["overhead"]
    compiler = "XLA:GPU" if backend != "cpu" else "XLA:CPU"
    fits = "fits in" if compiled + memory["analytic"]["overhead"] <= hw.usable_bytes else "EXCEEDS"
    notes = [f"{compiler}'s compiled peak is {compiled / 2**30:.4g} GiB per device, the analytic model's "
             f"{analytic / 2**30:.4g} GiB without runtime overhead ({(compiled - analytic) / max(analytic, 1):+.0%}).",
             "XLA's parameters are the stored float32 master weights; it counts the compute-dtype copy of "
             "the weights and the gradient accumulator among its temporaries, where the analytic model lists "
             "them under parameters and gradients.",
             f"The analytic total adds {memory['analytic']['overhead'] / 2**30:.4g} GiB of runtime overhead (CUDA "
             "context, communication buffers) that XLA does not see.",
             f"With the runtime overhead, the compiled peak {fits} the {hw.usable_bytes / 2**30:.4g} GiB the "
             f"allocator may use on {hw.name} (memory_fraction {hw.memory_fraction:g} of "
             f"{hw.hbm_bytes / 2**30:.4g} GiB).",
             which_figure_to_trust(run.layout, backend)]
    return notes


def collective_table(found) -> list[dict]:
    """Collectives per step by kind, mesh axes and bytes (groups of one device are no-ops)."""
    per_step = {}
    for c in (c for c in found if c.axes):
        key = (c.kind, c.axes, c.bytes)
        per_step[key] = per_step.get(key, 0) + c.executions
    return [{"kind": k, "axes": list(a), "bytes": b, "count": n}
            for (k, a, b), n in sorted(per_step.items(), key=lambda kv: -kv[0][2] * kv[1])]


# ---------------------------------------------------------------------------------------------
# The command line


def main(argv):
    try:
        if len(argv) > 1:
            raise InvalidInput("flags", f"unexpected arguments {argv[1:]}; all options are --flags")
        values = config.values_from_flags(FLAGS)
        count = values["num_devices"] or math.prod(parse_mesh(values["mesh"]).values())  # -1 without it: refused
        target = targets.resolve(FLAGS.target)
        limit = MAX_TARGET_DEVICES if target.is_gpu else MAX_EMULATED_DEVICES
        if count > limit:
            raise InvalidInput("mesh", f"{values['mesh']} needs {count} devices; explore compiles for {target.name} "
                               f"clusters of at most {limit} (plan --explain costs any size)")
        if target.is_gpu:
            target.topology(count)
        run = config.run_config(values, count)
        validate(run, count, platform="gpu" if target.is_gpu else "cpu")
        hardware = _hardware(FLAGS.hardware, FLAGS.target, target)
        if FLAGS.hlo_out is not None:
            out = pathlib.Path(FLAGS.hlo_out)
            refuse_special(out, "hlo_out", "step.hlo")
            if not FLAGS.hlo_out.strip() or out.is_dir() or not creatable(out):
                raise InvalidInput("hlo_out", f"{FLAGS.hlo_out!r} is a folder or cannot be written; give a file, "
                                   "e.g. --hlo_out step.hlo")
        targets.prepare(target, compiled_count(run, target))
    except InvalidInput as error:
        config.print_invalid(error)
        sys.exit(2)
    try:
        report = Report(explore(run, hardware, target=FLAGS.target, hlo_out=FLAGS.hlo_out, census=FLAGS.census))
    except OSError as error:  # the compile succeeded; --hlo_out could not be written
        print(f"error: --hlo_out: cannot write {FLAGS.hlo_out} ({error.strerror or error})", file=sys.stderr)
        sys.exit(5)
    except Exception as error:  # XLA's own limits, named rather than a traceback
        print(f"error: XLA could not compile {run.layout}: {type(error).__name__}: "
              f"{str(error).splitlines()[0][:300]}", file=sys.stderr)
        sys.exit(1)
    print(report.to_json() if FLAGS.json else report.text())


if __name__ == "__main__":
    # Importing this module as a library (as the planner's --verify does) defines no flag.
    config.define_flags(FLAGS, CLI_KNOBS)
    flags.DEFINE_bool("json", False, "Print the report as one JSON object instead of text.")
    flags.DEFINE_string("target", targets.CPU, "Compile for: cpu (XLA:CPU, emulated devices) or a GPU hardware "
                        "such as h100-80gb or h200 (XLA:GPU's own program without a GPU; the [gpu-aot] extra).")
    flags.DEFINE_string("hardware", None, "Hardware for the analytic model (configs/hardware/; default: the "
                        "target's, else a100-80gb).")
    flags.DEFINE_string("hlo_out", None, "Write the compiled step's optimized HLO to this file.")
    flags.DEFINE_bool("census", False, "Add the census of the compiled program: GEMMs by dtype, copy-like ops "
                      "(copies, dynamic-slice/-update-slice kernels, loop predicates), fusions and collectives per "
                      "step, loop trips multiplied in (analysis/census.py).")
    app.run(main, flags_parser=config.flags_parser(config.print_invalid))
