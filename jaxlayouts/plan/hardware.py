"""Hardware descriptions (``configs/hardware/NAME.yaml``) and their fitted calibration constants
(``configs/hardware/NAME.calibration.yaml``, written by ``python -m jaxlayouts.plan validate --fit``)."""

from __future__ import annotations

import dataclasses
import pathlib

import yaml

from jaxlayouts.layout import CONFIG_DIR, InvalidLayout

HARDWARE_DIR = CONFIG_DIR / "hardware"
BASE_CALIBRATION = "a100-80gb"
"""The calibration fitted on the reference study's runs: the fallback, and where a fit of this
project's step starts (constants no bench row exercises keep its values)."""


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The cost model's few fitted constants, each a physical quantity (see ``plan/cost.py``)."""

    matmul_efficiency: float = 0.75        # fraction of peak a large bf16 matmul reaches
    matmul_half_width: float = 256.0       # per-device weight width at which that halves
    flash2_efficiency: float = 0.55        # FlashAttention-2 fraction of peak on causal FLOPs
    flash1_efficiency: float = 0.40        # FlashAttention-1
    unfused_score_passes: float = 10.0     # HBM passes over the T x T scores, unfused attention
    fused_score_passes: float = 6.0        # with a fused softmax kernel
    norm_passes: float = 8.0               # HBM passes of one unfused RMSNorm (fused: 2)
    elementwise_passes: float = 12.0       # other passes per layer over the d-wide activations
    dp_overlap: float = 0.5                # fraction of gradient reduction hidden behind backward
    network_efficiency: float = 0.8        # achieved fraction of the inter-node link bandwidth
    nvlink_efficiency: float = 0.8         # achieved fraction of the intra-node link bandwidth
    bubble_factor: float = 1.0             # measured pipeline fill/drain over (P-1) stage-times
    layer_launch_s: float = 1e-3           # host time to launch one layer's kernels, fwd + bwd (eager)
    # this project's step (None: as flash2_efficiency; a fused norm's 2 passes)
    cudnn_efficiency: float | None = None      # cuDNN flash attention, fraction of peak on causal FLOPs
    pallas_efficiency: float | None = None     # this project's Pallas flash attention
    pallas_jax_efficiency: float | None = None  # JAX's Pallas flash attention op
    flash_half_seq: float = 0.0            # sequence length at which a flash kernel's efficiency halves (0: none)
    pallas_norm_passes: float | None = None    # HBM passes of the Pallas RMSNorm kernel
    triton_norm_passes: float | None = None    # of the Triton RMSNorm kernel
    layer_copy_passes: float = 0.0         # per layer and micro-batch, HBM passes over the layer's weights (scan copies)
    activation_store_passes: float = 0.0   # HBM passes over each byte a layer keeps for its backward
    activation_factor: float = 1.0         # allocator fragmentation on activations
    tp_activation_factor: float = 1.0      # more of it under tp > 1 in the study's eager trainer
    overhead_gib: float = 4.0              # runtime context, communication buffers, workspace

    @classmethod
    def fields(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]


@dataclasses.dataclass(frozen=True)
class Hardware:
    name: str
    peak_tflops: float
    hbm_bytes: float
    hbm_bandwidth: float
    intra_node_bandwidth: float
    inter_node_bandwidth: float
    gpus_per_node: int
    collective_latency_s: float
    memory_fraction: float = 0.75         # share of HBM the framework's allocator may use (JAX's default)
    calibration: Calibration = Calibration()
    calibration_source: str = "defaults (not fitted)"

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
    if not path.is_file():
        raise InvalidLayout("hardware", f"unknown hardware {name_or_path!r}; choose one of "
                            f"{', '.join(hardware_names())} or give a YAML path with the same fields")
    fields = yaml.safe_load(path.read_text())
    known = {f.name for f in dataclasses.fields(Hardware)} - {"calibration", "calibration_source"}
    required = known - {"memory_fraction"}
    if not isinstance(fields, dict) or set(fields) - known - {"calibration_from"} or required - set(fields):
        raise InvalidLayout("hardware", f"{path}: fields must be exactly {sorted(required)} and optionally "
                            "memory_fraction and calibration_from (another hardware's calibration)")
    shared = fields.pop("calibration_from", None)
    # YAML 1.1 reads 2.5e10 (no dot, no exponent sign) as a string: convert by the field's type.
    fields = {k: v if k == "name" else _number(path, k, v, int if k == "gpus_per_node" else float)
              for k, v in fields.items()}
    check_memory_fraction(fields.get("memory_fraction", Hardware.memory_fraction), str(path))
    for candidate in (calibration_path(shared or fields["name"]), calibration_path(BASE_CALIBRATION)):
        if candidate.is_file():
            return Hardware(**fields, calibration=read_calibration(candidate), calibration_source=candidate.name)
    return Hardware(**fields)


def read_calibration(path: pathlib.Path) -> Calibration:
    constants = yaml.safe_load(path.read_text())
    if not isinstance(constants, dict) or set(constants) - set(Calibration.fields()):
        raise InvalidLayout("hardware", f"{path}: calibration constants are a subset of {Calibration.fields()}")
    return Calibration(**{k: _number(path, k, v, float) for k, v in constants.items()})


def check_memory_fraction(value: float, where: str) -> None:
    if not 0 < value <= 1:
        raise InvalidLayout("memory_fraction", f"{value} in {where}: the share of HBM the allocator may use "
                            "is in (0, 1], e.g. 0.75 (JAX's default) or 0.9 (XLA_PYTHON_CLIENT_MEM_FRACTION=.9)")


def _number(path: pathlib.Path, field: str, value, kind: type):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise InvalidLayout("hardware", f"{path}: {field} is {value!r}; it must be a number") from None


def save_calibration(name: str, calibration: Calibration, header: str) -> pathlib.Path:
    path = calibration_path(name)
    body = yaml.safe_dump({k: float(f"{float(v):.4g}") for k, v in dataclasses.asdict(calibration).items()
                           if v is not None}, sort_keys=False)
    path.write_text("".join(f"# {line}\n" for line in header.splitlines()) + body)
    return path
