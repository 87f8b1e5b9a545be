"""From knob values (flags, a sweep point, keywords) to a checked run and the bench's options.

The knobs are declared once, as the fields of :class:`~jaxlayouts.layout.Layout`,
:class:`~jaxlayouts.layout.RunConfig`, :class:`ModelChoice` and :class:`BenchOptions` (see
``schema.knob``). Everything else is derived from those declarations: the absl flags of every
entry point (:func:`define_flags`), the names a sweep grid may set, the keywords ``explore``
takes, the fields of a result row (:func:`describe`). Adding a knob means adding one field and the
code that honours it. Importing this module defines no flag and imports no JAX.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import sys

from absl import flags

from jaxlayouts.layout import (ACTIVATION_AXES, MAX_EMULATED_DEVICES, MESH_AXES, PARAM_AXES, Layout, RunConfig,
                               load_model_config, parse_mesh)
from jaxlayouts.results import Results
from jaxlayouts.schema import InvalidInput, checked, creatable, kind_of, knob, knobs, refuse_special


@dataclasses.dataclass(frozen=True)
class ModelChoice:
    """Which model a run trains."""

    model: str = knob("tiny", "Model config name under configs/models/ or a YAML path.", example="llama-1b")
    vocab_size: int | None = knob(None, "Override the model's vocabulary size.", low=2, example=32000)


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    """How the bench measures, saves and joins a run (nothing here changes the step)."""

    steps: int = knob(5, "Timed steps.", low=1, high=10**6)
    warmup: int = knob(2, "Untimed steps before the timed ones.", low=0, high=10**6)
    num_devices: int | None = knob(None, "Emulated CPU devices (default: what the mesh needs).", low=1,
                                   high=MAX_EMULATED_DEVICES, example=8)
    axis_rules: str = knob("", "Override logical-axis rules, e.g. 'vocab=none,embed=fsdp+tp'.",
                           example="vocab=none")
    output: str | None = knob(None, "Append the result as one JSON line to this file.", example="results.jsonl")
    profile_dir: str | None = knob(None, "Write a jax.profiler trace of the timed steps here.", example="profiles")
    peak_tflops: float | None = knob(None, "Peak TFLOP/s per device for MFU (default: by device kind).",
                                     above=0, example=989)
    checkpoint_dir: str | None = knob(None, "Save sharded train-state checkpoints (orbax) here.",
                                      example="checkpoints")
    checkpoint_every: int = knob(100, "Save a checkpoint every this many steps (with --checkpoint_dir).", low=1)
    restore: bool = knob(False, "Resume from the latest complete checkpoint in --checkpoint_dir, under this "
                         "run's layout and device count.")
    coordinator_address: str | None = knob(None, "host:port of process 0 for a multi-process run (SLURM is "
                                           "detected without it; launch/local.sh sets it).",
                                           example="127.0.0.1:12345")
    num_processes: int | None = knob(None, "Processes in a multi-process run.", low=1, example=2)
    process_id: int | None = knob(None, "This process's index in a multi-process run.", low=0, example=0)
    init_timeout_s: int = knob(120, "Give up joining a multi-process run after this long.", low=1)
    heartbeat_timeout_s: int = knob(30, "End a multi-process run this long after a peer stops answering.", low=1)
    device_memory_gb: float | None = knob(None, "Device memory capacity: a step whose compiled peak exceeds "
                                          "it is reported as oom before it runs (default: the device's own "
                                          "limit, where it reports one; none on CPU).", above=0, example=80)


SOURCES = (ModelChoice, Layout, RunConfig, BenchOptions)
DECLARED = {field.name: (cls, field) for cls in SOURCES for field in knobs(cls)}
"""Every knob by name: its declaring class and field."""
KNOB_NAMES = tuple(DECLARED)
NOT_A_RUN_KNOB = tuple(f.name for f in knobs(BenchOptions))


def defaults() -> dict:
    """Every knob with its default; the mesh in its text form."""
    values = {name: field.default if field.default is not dataclasses.MISSING else field.default_factory()
              for name, (_, field) in DECLARED.items()}
    values["mesh"] = "dp=1"
    return values


def values_with(where: str = "keyword", **overrides) -> dict:
    """The defaults with ``overrides``; an unknown name is :class:`InvalidInput`."""
    unknown = sorted(set(overrides) - set(DECLARED))
    if unknown:
        raise InvalidInput(unknown[0], f"unknown {where} {unknown}; the knobs are {', '.join(KNOB_NAMES)}")
    return {**defaults(), **overrides}


def check_values(values: dict) -> dict:
    """Every knob's value coerced to its type and checked against its declaration."""
    out = dict(values)
    for name, (cls, field) in DECLARED.items():
        if name != "mesh" and name in out:
            out[name] = checked(cls, {name: out[name]})[name]
    if not isinstance(out.get("mesh"), str):
        raise InvalidInput("mesh", f"{out.get('mesh')!r} is not text; e.g. dp=8,tp=4,pp=1")
    return out


def options(values: dict) -> BenchOptions:
    """The bench's options from checked values, with the rules that tie them to the file system."""
    opts = BenchOptions(**{f.name: values[f.name] for f in knobs(BenchOptions)})
    if opts.restore and not opts.checkpoint_dir:
        raise InvalidInput("restore", "needs --checkpoint_dir, the directory to resume from")
    for name in ("checkpoint_dir", "profile_dir"):
        path = getattr(opts, name)
        if path is None:
            continue
        path = pathlib.Path(path)
        refuse_special(path, name, knob_example(name))
        if path.is_file() or not creatable(path):
            problem = "is a file" if path.is_file() else "cannot be created here (no such folder, or no permission)"
            raise InvalidInput(name, f"{path} {problem}; give a directory path in a writable folder, "
                               f"e.g. --{name} {knob_example(name)}")
    if opts.output is not None:
        Results(opts.output, knob="output", keyed=False).create()  # a results file, or one made now
    parse_axis_rules(opts.axis_rules)
    return opts


def knob_example(name: str):
    return DECLARED[name][1].metadata["example"]


def run_config(values: dict, num_devices: int | None = None) -> RunConfig:
    """The run from checked values; ``num_devices`` resolves a ``-1`` mesh axis."""
    mesh = parse_mesh(values["mesh"], num_devices)
    model = load_model_config(values["model"], vocab_size=values["vocab_size"])
    layout = Layout(mesh=mesh, **{f.name: values[f.name] for f in knobs(Layout) if f.name != "mesh"})
    return RunConfig(model=model, layout=layout, **{f.name: values[f.name] for f in knobs(RunConfig)})


def emulated_device_count(values: dict) -> int | None:
    """Devices the bench emulates on CPU for these values (None: a ``-1`` axis without
    --num_devices); more than ``MAX_EMULATED_DEVICES`` is :class:`InvalidInput` before any exists."""
    count = values["num_devices"]
    if count is None and "-1" not in values["mesh"]:
        count = math.prod(parse_mesh(values["mesh"]).values())
    if count is not None and count > MAX_EMULATED_DEVICES:
        raise InvalidInput("mesh", f"{values['mesh']} needs {count} devices; CPU emulation builds at most "
                           f"{MAX_EMULATED_DEVICES} (explore and plan look at larger clusters without running)")
    return count


def parse_axis_rules(text: str) -> dict:
    """``'vocab=none,embed=fsdp+tp'`` -> ``{'vocab': None, 'embed': ('fsdp', 'tp')}``."""
    rules = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in PARAM_AXES + ACTIVATION_AXES:
            raise InvalidInput("axis_rules", f"cannot read {item!r}; write LOGICAL=AXIS[+AXIS] with "
                               f"LOGICAL in {', '.join(PARAM_AXES + ACTIVATION_AXES)}, e.g. vocab=none")
        axes = tuple(a for a in value.split("+") if a and a != "none")
        unknown = [a for a in axes if a not in MESH_AXES]
        if unknown:
            raise InvalidInput("axis_rules", f"{item!r}: {unknown} are not mesh axes ({', '.join(MESH_AXES)}) or none")
        twice = sorted({a for a in axes if axes.count(a) > 1})
        if twice:
            raise InvalidInput("axis_rules", f"{item!r} names {', '.join(twice)} twice; a dimension is split over "
                               f"a mesh axis once, e.g. {name}={'+'.join(dict.fromkeys(axes))}")
        if name in rules:
            raise InvalidInput("axis_rules", f"{name} is given twice in {text!r}; give each logical axis once")
        rules[name] = None if not axes else axes[0] if len(axes) == 1 else axes
    return rules


def describe(run: RunConfig) -> dict:
    """The run's fields as every result row has them: each declared layout and run knob (pipeline
    knobs null when pp = 1, the flush size resolved), plus what follows from them."""
    from jaxlayouts.parallel.schedule import bubble_fraction  # imports JAX: only once devices exist

    lay = run.layout
    row = {"model": run.model.name, "n_params": run.model.n_params, "layout": str(lay)}
    row.update({f.name: getattr(lay, f.name) for f in knobs(Layout)})
    row["mesh"] = dict(lay.mesh)
    row.update({f.name: getattr(run, f.name) for f in knobs(RunConfig)})
    row["grad_accum_steps"] = run.grad_accum_steps
    pipelined = [f.name for f in knobs(Layout) if f.metadata["written"] == "pipeline"]
    if lay.mesh["pp"] == 1:
        row.update({name: None for name in pipelined}, bubble_fraction=None)
    else:
        m = lay.pipeline_microbatches or run.grad_accum_steps
        row.update(pipeline_microbatches=m, bubble_fraction=bubble_fraction(
            lay.pipeline_schedule, lay.mesh["pp"], lay.virtual_stages, m))
    return row


def define_flags(flag_values, names=KNOB_NAMES) -> None:
    """Define the knobs ``names`` as absl flags on ``flag_values``. Only booleans are typed flags:
    every other value arrives as text and is checked by :func:`check_values`, so a bad one is an
    ``invalid`` result naming the knob (exit 2), never an absl usage error."""
    values = defaults()
    for name in names:
        cls, field = DECLARED[name]
        kind = kind_of(cls, field)[0]
        default, help_text = values[name], field.metadata["help"]
        if kind is bool:
            flags.DEFINE_bool(name, default, help_text, flag_values=flag_values)
        else:
            flags.DEFINE_string(name, None if default is None else str(default),
                                f"{help_text} [{kind.__name__}]", flag_values=flag_values)


def values_from_flags(flag_values) -> dict:
    """Checked values of the knobs defined on ``flag_values``, defaults for the rest."""
    given = {name: flag_values[name].value for name in KNOB_NAMES if name in flag_values}
    return check_values({**defaults(), **given})


def flags_parser(report_invalid):
    """An ``app.run`` flags parser that turns a malformed command line (an unknown flag, a value
    for a boolean flag, a non-number for a typed flag) into ``report_invalid(error)`` and exit 2."""
    def parse(argv: list[str]) -> list[str]:
        try:
            return flags.FLAGS(argv)
        except (flags.Error, ValueError) as error:  # absl raises ValueError for '--noflag=1'
            report_invalid(InvalidInput("flags", str(error)))
            sys.exit(2)
    return parse


def print_invalid(error: InvalidInput) -> None:
    """How the inspection tools (explore, plan) report bad input: one line on stderr."""
    print(f"invalid: {error}", file=sys.stderr)
