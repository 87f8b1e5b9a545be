"""Hardware descriptions (``configs/hardware/NAME.yaml``) and their fitted calibration constants
(``configs/hardware/NAME.calibration.yaml``, written by ``python -m jaxlayouts.plan validate --fit``).

One field from the shell, for scripts (``launch/slurm.sbatch`` exports the allocator's fraction so):

    python -m jaxlayouts.plan.hardware --hardware h100-80gb --print memory_fraction
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import re
import sys

import yaml

from jaxlayouts.layout import CONFIG_DIR
from jaxlayouts.schema import InvalidInput, coerce, from_mapping, knob, knobs, load_yaml, refuse_special

HARDWARE_DIR = CONFIG_DIR / "hardware"
REQUIRED = dataclasses.MISSING
JAX_MEMORY_FRACTION = 0.75
"""The share of a GPU's memory JAX's allocator takes when no variable says otherwise."""
MEMORY_FRACTION_VARIABLES = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")
"""Where jaxlib reads that share (``xla_client.py``), the second deprecated; both set is an error there."""
BASE_CALIBRATION = "a100-80gb"
"""The calibration fitted on the reference study's runs: the fallback, and where a fit of this
project's step starts (constants no bench row exercises keep its values)."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The cost model's few fitted constants, each a physical quantity (see ``plan/cost.py``)."""

    matmul_efficiency: float = knob(0.75, "Fraction of peak a large bf16 matmul reaches.", low=0)
    matmul_half_width: float = knob(256.0, "Per-device weight width at which that halves.", low=0)
    flash2_efficiency: float = knob(0.55, "FlashAttention-2 fraction of peak on causal FLOPs.", low=0)
    flash1_efficiency: float = knob(0.40, "FlashAttention-1 fraction of peak on causal FLOPs.", low=0)
    unfused_score_passes: float = knob(10.0, "HBM passes over the T x T scores, unfused attention.", low=0)
    fused_score_passes: float = knob(6.0, "HBM passes over the T x T scores with a fused softmax kernel.", low=0)
    norm_passes: float = knob(8.0, "HBM passes of one unfused RMSNorm (fused: 2).", low=0)
    elementwise_passes: float = knob(12.0, "Other passes per layer over the d-wide activations.", low=0)
    dp_overlap: float = knob(0.5, "Fraction of gradient reduction hidden behind backward.", low=0)
    network_efficiency: float = knob(0.8, "Achieved fraction of the inter-node link bandwidth.", low=0)
    nvlink_efficiency: float = knob(0.8, "Achieved fraction of the intra-node link bandwidth.", low=0)
    bubble_factor: float = knob(1.0, "Measured pipeline fill/drain over (P-1) stage-times.", low=0)
    layer_launch_s: float = knob(1e-3, "Host time to launch one layer's kernels, fwd + bwd (eager).", low=0)
    # this project's step (None: as flash2_efficiency; a fused norm's 2 passes)
    cudnn_efficiency: float | None = knob(None, "cuDNN flash attention, fraction of peak on causal FLOPs.", low=0)
    pallas_efficiency: float | None = knob(None, "This project's Pallas flash attention.", low=0)
    pallas_jax_efficiency: float | None = knob(None, "JAX's Pallas flash attention op.", low=0)
    flash_half_seq: float = knob(0.0, "Sequence length at which a flash kernel's efficiency halves (0: none).", low=0)
    pallas_norm_passes: float | None = knob(None, "HBM passes of the Pallas RMSNorm kernel.", low=0)
    triton_norm_passes: float | None = knob(None, "HBM passes of the Triton RMSNorm kernel.", low=0)
    layer_copy_passes: float = knob(0.0, "Per layer and micro-batch, HBM passes over the layer's weights (scan copies).", low=0)
    activation_store_passes: float = knob(0.0, "HBM passes over each byte a layer keeps for its backward.", low=0)
    activation_factor: float = knob(1.0, "Allocator fragmentation on activations.", low=0)
    tp_activation_factor: float = knob(1.0, "Allocator fragmentation under tp > 1 in the study's eager trainer.", low=0)
    overhead_gib: float = knob(4.0, "Runtime context, communication buffers, workspace.", low=0)

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in knobs(cls)]


@dataclasses.dataclass(frozen=True)
class FittedOn:
    """What a calibration was fitted on (the ``fitted_on`` mapping of its file, written by
    ``--fit``): printed with every ranking, so a prediction says how far to trust it."""

    file: str
    rows: int                       # rows measured ok or oom
    hardware: tuple[str, ...]       # the chips the rows ran on
    attention: tuple[str, ...] = ()  # this project's kernels some ok row timed (``validate.fitted_on``)
    norm: tuple[str, ...] = ()
    heldout: str = "not measured for this fit"

    def unmeasured(self, attention: str, norm: str, hardware: str) -> list[str]:
        """The kernels of a layout no row timed on ``hardware``'s chip (all of them when no row
        ran on that chip), as ``attn=K`` / ``norm=K``."""
        on_chip = chip(hardware) in map(chip, self.hardware)
        return ([f"attn={attention}"] if not on_chip or attention not in self.attention else []) + \
               ([f"norm={norm}"] if not on_chip or norm not in self.norm else [])


def chip(name: str) -> str:
    """The chip a hardware name or device kind names: ``NVIDIA H200`` and ``h200`` -> ``h200``,
    ``a100-80gb`` and ``NVIDIA A100-SXM4-80GB`` -> ``a100``."""
    match = re.search(r"([a-z]+\d+)", name.lower().replace("nvidia", ""))
    return match.group(1) if match else name.lower()


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str = knob(REQUIRED, "The hardware's name.", example="h200")
    peak_tflops: float = knob(REQUIRED, "Dense bf16 peak per GPU, TFLOP/s.", above=0, example=989)
    hbm_bytes: float = knob(REQUIRED, "HBM per GPU, bytes.", above=0, example=85899345920)
    hbm_bandwidth: float = knob(REQUIRED, "HBM bandwidth per GPU, bytes/s.", above=0, example=3.35e12)
    intra_node_bandwidth: float = knob(REQUIRED, "NVLink bandwidth per GPU and direction, bytes/s.", above=0,
                                       example=4.5e11)
    inter_node_bandwidth: float = knob(REQUIRED, "Network bandwidth per GPU and direction, bytes/s.", above=0,
                                       example=5.0e10)
    gpus_per_node: int = knob(REQUIRED, "GPUs per node.", low=1, example=8)
    collective_latency_s: float = knob(REQUIRED, "Latency of one collective step, seconds.", low=0, example=2.0e-5)
    memory_fraction: float = knob(JAX_MEMORY_FRACTION, "Share of HBM the framework's allocator may use (JAX's default 0.75; "
                                  "XLA_PYTHON_CLIENT_MEM_FRACTION changes it).", above=0, high=1)
    calibration_from: str | None = knob(None, "Use another hardware's calibration (same chip).",
                                        example="h200")
    gpu_target: str | None = knob(None, "XLA:GPU target description under configs/hardware/targets/ (no "
                                  "suffix), for compiling without the GPU (explore --target).",
                                  example="h100-sxm-80gb")
    calibration: Calibration = Calibration()
    calibration_source: str = "defaults (not fitted)"
    fitted_on: FittedOn | None = None

    @property
    def usable_bytes(self) -> float:
        """What the framework's allocator may use: ``memory_fraction`` of HBM."""
        return self.hbm_bytes * self.memory_fraction

    def link_bandwidth(self, group: int, per_node: int) -> float:
        """Per-GPU bandwidth of a ring collective over ``group`` GPUs, ``per_node`` of them on
        each node. Inside a node: NVLink. Across nodes, NCCL runs one ring per NIC, so the group
        moves its data through ``per_node`` NICs per node (at most NVLink's bandwidth)."""
        if per_node >= group:
            return self.intra_node_bandwidth * self.calibration.nvlink_efficiency
        return min(self.intra_node_bandwidth,
                   per_node * self.inter_node_bandwidth) * self.calibration.network_efficiency


def hardware_names() -> list[str]:
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml") if not p.stem.endswith(".calibration"))


def calibration_path(name: str) -> pathlib.Path:
    return HARDWARE_DIR / f"{name}.calibration.yaml"


def load_hardware(name_or_path: str) -> Hardware:
    """``configs/hardware/NAME.yaml`` (or a YAML path) with its calibration if one was fitted (or
    that of the hardware its ``calibration_from`` names), else the A100 fit (efficiencies are
    fractions, so they transfer as a first guess)."""
    path = pathlib.Path(name_or_path)
    if not path.suffix:
        path = HARDWARE_DIR / f"{name_or_path}.yaml"
    refuse_special(path, "hardware", "configs/hardware/h200.yaml")
    if not path.is_file():
        raise InvalidInput("hardware", f"unknown hardware {name_or_path!r}; choose one of "
                           f"{', '.join(hardware_names())} or give a YAML path with the same fields")
    hardware = from_mapping(Hardware, load_yaml(path, "hardware"), path, "hardware")
    for field in ("name", "calibration_from", "gpu_target"):
        value = getattr(hardware, field)
        if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            raise InvalidInput("hardware", f"{path}: {field} {value!r} is not a plain name (letters, digits, "
                               "'.', '_', '-'): it names calibration files, e.g. h200")
    if hardware.calibration_from and not calibration_path(hardware.calibration_from).is_file():
        raise InvalidInput("hardware", f"{path}: calibration_from {hardware.calibration_from!r} has no calibration "
                           f"file; choose one of {', '.join(p.name.split('.')[0] for p in HARDWARE_DIR.glob('*.calibration.yaml'))}")
    for candidate in (calibration_path(hardware.calibration_from or hardware.name),
                      calibration_path(BASE_CALIBRATION)):
        if candidate.is_file():
            return dataclasses.replace(hardware, calibration=read_calibration(candidate),
                                       calibration_source=candidate.name, fitted_on=read_fitted_on(candidate))
    return hardware


def read_calibration(path: pathlib.Path) -> Calibration:
    constants = {k: v for k, v in load_yaml(path, "hardware").items() if k != "fitted_on"}
    return from_mapping(Calibration, constants, path, "hardware")


def read_fitted_on(path: pathlib.Path) -> FittedOn | None:
    """The file's ``fitted_on`` mapping, or None (a calibration written before it existed)."""
    data = load_yaml(path, "hardware").get("fitted_on")
    if data is None:
        return None
    fields = [f.name for f in dataclasses.fields(FittedOn)]
    if not isinstance(data, dict) or set(data) - set(fields) or not {"file", "rows", "hardware"} <= set(data):
        raise InvalidInput("hardware", f"{path}: fitted_on must map {fields} (file, rows and hardware at least), "
                           f"as --fit writes it")
    return FittedOn(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def check_memory_fraction(value: float) -> None:
    """The declared bounds of ``memory_fraction``, for a value given as a flag."""
    coerce(Hardware, next(f for f in knobs(Hardware) if f.name == "memory_fraction"), value)


def allocator_fraction(environ=os.environ) -> float:
    """The share of GPU memory JAX's allocator takes in this environment: the first of
    :data:`MEMORY_FRACTION_VARIABLES` that is set, else JAX's default."""
    for name in MEMORY_FRACTION_VARIABLES:
        if environ.get(name):
            try:
                value = float(environ[name])
            except ValueError:
                raise InvalidInput("environment", f"{name}={environ[name]!r} is not a number; e.g. "
                                   f"{name}={JAX_MEMORY_FRACTION}, or unset it") from None
            if not 0 < value <= 1:
                raise InvalidInput("environment", f"{name}={environ[name]!r} is not a share of memory in (0, 1]; "
                                   f"e.g. {name}={JAX_MEMORY_FRACTION}, or unset it")
            return value
    return JAX_MEMORY_FRACTION


def save_calibration(name: str, calibration: Calibration, header: str, fitted_on: FittedOn) -> pathlib.Path:
    path = calibration_path(name)
    constants = {k: float(f"{float(v):.4g}") for k, v in dataclasses.asdict(calibration).items() if v is not None}
    trust = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(fitted_on).items()}
    body = yaml.safe_dump({**constants, "fitted_on": trust}, sort_keys=False)
    path.write_text("".join(f"# {line}\n" for line in header.splitlines()) + body)
    return path


def main(argv=None) -> int:
    """Print one field of a hardware file (``usable_bytes`` too), for shell scripts."""
    from jaxlayouts.config import print_invalid

    fields = [f.name for f in knobs(Hardware)] + ["usable_bytes"]
    parser = argparse.ArgumentParser(prog="python -m jaxlayouts.plan.hardware", description=main.__doc__)
    parser.add_argument("--hardware", required=True, help=f"one of {', '.join(hardware_names())}, or a YAML path")
    parser.add_argument("--print", dest="field", required=True, help=f"one of {', '.join(fields)}")
    args = parser.parse_args(argv)
    try:
        if args.field not in fields:
            raise InvalidInput("print", f"{args.field!r} is not a hardware field; choose one of {', '.join(fields)}, "
                               "e.g. --print memory_fraction")
        print(getattr(load_hardware(args.hardware), args.field))
    except InvalidInput as error:
        print_invalid(error)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
