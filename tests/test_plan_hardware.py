"""Hardware descriptions and their calibration files load with numbers; bad fields are named."""

import pytest

from jaxlayouts.layout import InvalidInput
from jaxlayouts.plan.hardware import hardware_names, load_hardware


def test_hardware_descriptions_load_with_numbers(tmp_path, monkeypatch):
    assert {"a100-80gb", "h100-80gb", "h200"} <= set(hardware_names())
    a100, h200 = load_hardware("a100-80gb"), load_hardware("h200")
    assert a100.peak_tflops == 312 and a100.gpus_per_node == 8 and isinstance(a100.inter_node_bandwidth, float)
    assert h200.hbm_bytes > a100.hbm_bytes and h200.peak_tflops > a100.peak_tflops
    assert a100.calibration_source == "a100-80gb.calibration.yaml"
    with pytest.raises(InvalidInput, match="--hardware: unknown hardware 'tpu'"):
        load_hardware("tpu")
    from jaxlayouts.plan import hardware
    own = tmp_path / "own.yaml"
    own.write_text((hardware.HARDWARE_DIR / "a100-80gb.yaml").read_text().replace("name: a100-80gb", "name: own"))
    monkeypatch.setattr(hardware, "HARDWARE_DIR", tmp_path)
    calibration = tmp_path / "own.calibration.yaml"
    calibration.write_text("activation_factr: 1.2\n")
    with pytest.raises(InvalidInput, match="own.calibration.yaml: unknown fields \\['activation_factr'\\]"):
        load_hardware(str(own))
    calibration.write_text("activation_factor: high\n")
    with pytest.raises(InvalidInput, match="activation_factor 'high' is not a number"):
        load_hardware(str(own))
    calibration.write_text("activation_factor: 1.3\n")
    assert load_hardware(str(own)).calibration.activation_factor == 1.3
    own.write_text(own.read_text().replace("peak_tflops: 312", "peak_tflops: fast"))
    with pytest.raises(InvalidInput, match="peak_tflops 'fast' is not a number"):
        load_hardware(str(own))


def test_a_calibration_says_what_it_was_fitted_on_and_which_kernels_no_row_timed():
    a100, h200, h100 = load_hardware("a100-80gb"), load_hardware("h200"), load_hardware("h100-80gb")
    assert (a100.fitted_on.rows, a100.fitted_on.hardware) == (639, ("a100-80gb",))
    assert a100.fitted_on.unmeasured("pallas", "pallas", "a100-80gb") == ["attn=pallas", "norm=pallas"]
    assert a100.fitted_on.unmeasured("xla", "xla", "a100-80gb") == []  # the study's unfused kernels' constants
    assert (h200.fitted_on.rows, h200.fitted_on.hardware) == (7, ("NVIDIA H200",))
    assert h200.fitted_on.unmeasured("cudnn", "pallas", "h200") == []
    assert h200.fitted_on.unmeasured("pallas_jax", "triton", "h200") == ["attn=pallas_jax", "norm=triton"]
    assert h100.fitted_on == h200.fitted_on  # calibration_from: h200's rows, none on an H100
    assert h100.fitted_on.unmeasured("cudnn", "xla", "h100-80gb") == ["attn=cudnn", "norm=xla"]
