"""Inspect a layout at any cluster size without the cluster: shardings, memory, collectives, FLOPs.

    python -m jaxlayouts.explore --model llama-65b --mesh dp=4,tp=8,pp=4 --seq_len 2048 \\
        --global_batch 512 --micro_batch 1 [--hardware a100-80gb] [--json]

It compiles the training step ahead of time on emulated CPU devices (one per device of the
layout, no parameter memory: abstract shapes only) and reports, per device: every parameter
with its logical axes, PartitionSpec and bytes; memory from XLA's compiled memory analysis
next to the analytic model's (``plan/cost.py``); every collective of the compiled step with its
mesh axes, bytes and executions per step (loop trip counts multiplied in); model FLOPs per step.
It takes the bench's flags. JAX is imported inside the functions: the CLI asks for the emulated
devices before JAX starts. In a notebook (JAX imported with enough emulated devices)::

    from jaxlayouts.explore import explore
    report = explore(run)            # run: a jaxlayouts.layout.RunConfig
"""

from __future__ import annotations

import json
import math
import sys

from absl import app, flags

from jaxlayouts import config, devices
from jaxlayouts.analysis.memory import compiled_memory
from jaxlayouts.layout import MAX_EMULATED_DEVICES, RunConfig, parse_mesh, validate
from jaxlayouts.plan.hardware import load_hardware
from jaxlayouts.schema import InvalidInput

FLAGS = flags.FLAGS


def parameter_table(trainer) -> list[dict]:
    """Each parameter: logical axes, stored PartitionSpec, global shape, float32 bytes per device."""
    import jax
    rows = []
    leaves = jax.tree_util.tree_leaves_with_path(trainer.abstract_state.params)
    axes = jax.tree.leaves(trainer.logical_axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    for (path, value), logical, sharding in zip(leaves, axes, jax.tree.leaves(trainer.master_shardings)):
        shard = sharding.shard_shape(value.shape)
        rows.append({"name": "/".join(str(getattr(k, "key", k)) for k in path), "logical_axes": list(logical),
                     "spec": str(sharding.spec), "shape": list(value.shape),
                     "bytes_per_device": math.prod(shard) * value.dtype.itemsize})
    return rows


def _state_bytes(tree, shardings) -> int:
    import jax
    return sum(math.prod(s.shard_shape(a.shape)) * a.dtype.itemsize
               for a, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)))


def explore(run: RunConfig, hardware: str = "a100-80gb", devices_=None) -> dict:
    """The report for ``run`` (see the module docstring), compiled on ``devices_`` (default: the
    first devices JAX has; they only need to exist, nothing is allocated)."""
    import jax

    from jaxlayouts import flops
    from jaxlayouts.analysis import hlo
    from jaxlayouts.mesh import build_mesh
    from jaxlayouts.plan import cost
    from jaxlayouts.train import Trainer

    count = run.layout.num_devices
    validate(run, count)
    devices_ = list(devices_ if devices_ is not None else jax.devices())[:count]
    mesh = build_mesh(run.layout, devices_)
    trainer = Trainer(run, mesh)
    compiled = trainer.lower().compile()
    memory = compiled_memory(compiled)
    found = hlo.collectives(compiled.as_text(), dict(mesh.shape))
    per_step = {}
    for c in (c for c in found if c.axes):  # groups of one device are no-ops (size-1 mesh axes)
        key = (c.kind, c.axes, c.bytes)
        per_step[key] = per_step.get(key, 0) + c.executions
    params = _state_bytes(trainer.abstract_state.params, trainer.master_shardings)
    optimizer = _state_bytes(trainer.abstract_state.opt_state, trainer.state_shardings.opt_state)
    analytic = cost.memory(cost.Workload.from_run(run), load_hardware(hardware))
    return {
        "layout": str(run.layout), "model": run.model.name, "num_devices": count,
        "params": parameter_table(trainer),
        "memory": {
            "compiled": {"parameters": params, "optimizer": optimizer,
                         "gradients_activations_temporaries": memory["temp_bytes"],
                         "arguments": memory["argument_bytes"], "outputs": memory["output_bytes"],
                         "aliased": memory["alias_bytes"], "peak": memory["compiled_peak_bytes_per_device"]},
            "analytic": {"parameters": analytic["weights"], "optimizer": analytic["optimizer"],
                         "gradients": analytic["gradients"], "activations": analytic["activations"],
                         "overhead": analytic["overhead"], "total": analytic["total"]},
        },
        "collectives": [{"kind": k, "axes": list(a), "bytes": b, "count": n}
                        for (k, a, b), n in sorted(per_step.items(), key=lambda kv: -kv[0][2] * kv[1])],
        "model_flops_per_step": flops.model_flops_per_token(run.model, run.seq_len) * run.tokens_per_step,
    }


def _gib(value) -> str:
    return f"{value / 2**30:10.3f}"


def print_report(report: dict) -> None:
    print(f"layout      {report['layout']} ({report['model']}, {report['num_devices']} devices)")
    print(f"model FLOPs {report['model_flops_per_step']:.4g} per step")
    print("\nparameters (stored, per device)")
    print(f"  {'name':<34} {'logical axes':<34} {'spec':<34} {'MiB/device':>10}")
    for p in report["params"]:
        print(f"  {p['name']:<34} {str(tuple(p['logical_axes'])):<34} {p['spec']:<34} "
              f"{p['bytes_per_device'] / 2**20:10.2f}")
    compiled, analytic = report["memory"]["compiled"], report["memory"]["analytic"]
    print("\nmemory per device, GiB      compiled (XLA)   analytic (plan/cost.py)")
    print(f"  parameters                {_gib(compiled['parameters'])}       {_gib(analytic['parameters'])}"
          " (fp32 master + the compute copy, which XLA counts in temp)")
    print(f"  optimizer state           {_gib(compiled['optimizer'])}       {_gib(analytic['optimizer'])}")
    print(f"  gradients                 {'(in temp)':>10}       {_gib(analytic['gradients'])}")
    print(f"  activations, temporaries  {_gib(compiled['gradients_activations_temporaries'])}       "
          f"{_gib(analytic['activations'])} (+ gradients above)")
    print(f"  runtime overhead          {'n/a':>10}       {_gib(analytic['overhead'])}")
    print(f"  peak / total              {_gib(compiled['peak'])}       {_gib(analytic['total'])}")
    print("\ncollectives per step (compiled HLO)")
    for c in report["collectives"]:
        print(f"  {c['kind']:<18} over {','.join(c['axes']) or '-':<12} {c['bytes'] / 2**20:12.3f} MiB x {c['count']}")


def main(argv):
    try:
        if len(argv) > 1:
            raise InvalidInput("flags", f"unexpected arguments {argv[1:]}; all options are --flags")
        values = config.values_from_flags(FLAGS)
        count = values["num_devices"] or math.prod(parse_mesh(values["mesh"]).values())
        if count < 1:
            raise InvalidInput("mesh", f"{values['mesh']}: -1 needs --num_devices (the cluster size)")
        if count > MAX_EMULATED_DEVICES:
            raise InvalidInput("mesh", f"{values['mesh']} needs {count} devices; explore compiles on at most "
                               f"{MAX_EMULATED_DEVICES} emulated CPU devices (plan --explain costs any size)")
        run = config.run_config(values, count)
        validate(run, count)
        load_hardware(FLAGS.hardware)
        devices.emulate_cluster(count)
    except InvalidInput as error:
        config.print_invalid(error)
        sys.exit(2)
    try:
        report = explore(run, FLAGS.hardware)
    except Exception as error:  # XLA's own limits (e.g. of its CPU backend at thousands of devices)
        print(f"error: XLA could not compile {run.layout} on {count} emulated CPU devices: "
              f"{type(error).__name__}: {str(error).splitlines()[0][:300]}", file=sys.stderr)
        sys.exit(1)
    if not FLAGS.json:
        print_report(report)
    print(json.dumps(report))


if __name__ == "__main__":
    # The CLI takes the run's knobs plus its own; importing this module as a library (as the
    # planner's --verify does) defines no flag.
    config.define_flags(FLAGS, [n for n in config.KNOB_NAMES if n not in config.NOT_A_RUN_KNOB or n == "num_devices"])
    flags.DEFINE_bool("json", False, "Print only the report as one JSON object (last stdout line).")
    flags.DEFINE_string("hardware", "a100-80gb", "Hardware for the analytic memory model (configs/hardware/).")
    app.run(main, flags_parser=config.flags_parser(config.print_invalid))
