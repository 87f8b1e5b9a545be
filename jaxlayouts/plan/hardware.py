"""Hardware descriptions (``configs/hardware/NAME.yaml``) and their fitted calibration constants
(``configs/hardware/NAME.calibration.yaml``, written by ``python -m jaxlayouts.plan validate --fit``)."""

from __future__ import annotations

import dataclasses
import pathlib

import yaml

from jaxlayouts.layout import CONFIG_DIR, InvalidInput

HARDWARE_DIR = CONFIG_DIR / "hardware"


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
    calibration: Calibration = Calibration()
    calibration_source: str = "defaults (not fitted)"

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
    """``configs/hardware/NAME.yaml`` (or a YAML path) with its calibration if one was fitted,
    else the A100 fit (efficiencies are fractions, so they transfer as a first guess)."""
    path = pathlib.Path(name_or_path)
    if not path.suffix:
        path = HARDWARE_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise InvalidInput("hardware", f"unknown hardware {name_or_path!r}; choose one of "
                           f"{', '.join(hardware_names())} or give a YAML path with the same fields")
    fields = yaml.safe_load(path.read_text())
    known = {f.name for f in dataclasses.fields(Hardware)} - {"calibration", "calibration_source"}
    if not isinstance(fields, dict) or set(fields) - known or known - set(fields):
        raise InvalidInput("hardware", f"{path}: fields must be exactly {sorted(known)}")
    # YAML 1.1 reads 2.5e10 (no dot, no exponent sign) as a string: convert by the field's type.
    fields = {k: v if k == "name" else _number(path, k, v, int if k == "gpus_per_node" else float)
              for k, v in fields.items()}
    for candidate in (calibration_path(fields["name"]), calibration_path("a100-80gb")):
        if candidate.is_file():
            constants = yaml.safe_load(candidate.read_text())
            if not isinstance(constants, dict) or set(constants) - set(Calibration.fields()):
                raise InvalidInput("hardware", f"{candidate}: calibration constants are a subset of "
                                   f"{Calibration.fields()}")
            constants = {k: _number(candidate, k, v, float) for k, v in constants.items()}
            return Hardware(**fields, calibration=Calibration(**constants),
                            calibration_source=candidate.name)
    return Hardware(**fields)


def _number(path: pathlib.Path, field: str, value, kind: type):
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise InvalidInput("hardware", f"{path}: {field} is {value!r}; it must be a number") from None


def save_calibration(name: str, calibration: Calibration, header: str) -> pathlib.Path:
    path = calibration_path(name)
    body = yaml.safe_dump({k: float(f"{float(v):.4g}") for k, v in dataclasses.asdict(calibration).items()},
                          sort_keys=False)
    path.write_text("".join(f"# {line}\n" for line in header.splitlines()) + body)
    return path
