"""Parsing, printing and validation of layouts: every bad input names its knob."""

import dataclasses

import pytest
from conftest import make_run

from jaxlayouts.layout import InvalidInput, Layout, load_model_config, parse_mesh, validate


def test_parse_mesh_fills_missing_axes_and_the_rest():
    assert parse_mesh("dp=8,tp=4") == {"dp": 8, "fsdp": 1, "cp": 1, "tp": 4, "pp": 1}
    assert parse_mesh("dp=-1,tp=2", num_devices=16) == {"dp": 8, "fsdp": 1, "cp": 1, "tp": 2, "pp": 1}


@pytest.mark.parametrize("text, message", [
    ("dq=2", "write AXIS=SIZE"),
    ("dp=two", "is not an integer"),
    ("dp=0", "sizes are positive"),
    ("dp=-1,tp=-1", "only one axis may be -1"),
    ("dp=-1", "needs a known device count"),
])
def test_parse_mesh_errors(text, message):
    with pytest.raises(InvalidInput, match=message) as error:
        parse_mesh(text)
    assert error.value.knob == "mesh"


def test_layout_text_round_trips():
    layout = Layout(mesh=parse_mesh("dp=2,fsdp=2,tp=2"), micro_batch=2, zero=1,
                    sequence_parallel=True, remat="full")
    assert str(layout) == "dp=2,fsdp=2,tp=2,pp=1 mbs=2 zero=1 sp=1 remat=full attn=xla norm=xla"
    assert Layout.parse(str(layout)) == layout


def test_zero_defaults_to_fsdp():
    assert Layout(mesh=parse_mesh("fsdp=8")).zero == 3
    assert Layout(mesh=parse_mesh("dp=8")).zero == 0


def test_model_configs_have_the_reference_shapes():
    for name, shape in {"llama-13b": (40, 5120, 40, 13824), "llama-30b": (60, 6656, 52, 17920),
                        "llama-65b": (80, 8192, 64, 22016)}.items():
        m = load_model_config(name)
        assert (m.num_layers, m.d_model, m.num_heads, m.d_ff) == shape
        assert m.vocab_size == 128000


def test_parameter_counts_match_the_reference_study():
    # The study's MFU column implies about 14.0B / 33.8B / 66.9B parameters (paper-data README).
    for name, billions in {"llama-13b": 14.0, "llama-30b": 33.8, "llama-65b": 66.9}.items():
        assert load_model_config(name).n_params / 1e9 == pytest.approx(billions, abs=0.1)


def test_tiny_accepts_tp_and_pp_up_to_4():
    m = load_model_config("tiny")
    for size in (1, 2, 4):
        assert m.num_heads % size == m.num_kv_heads % size == m.d_ff % size == m.vocab_size % size == 0
        assert m.num_layers % size == 0


@pytest.mark.parametrize("mesh, kwargs, knob, message", [
    ("dp=4", {}, "mesh", "uses 4 devices but 8 are present"),
    ("dp=1,tp=8", {}, "mesh", "tp=8 does not divide num_kv_heads=4 of tiny; choose a tp that divides it"),
    ("dp=2,tp=4", {"sequence_parallel": True, "seq_len": 30}, "seq_len", "not divisible"),
    ("dp=8", {"global_batch": 12}, "global_batch", "not divisible by dp\\*fsdp\\*micro_batch"),
    ("dp=8", {"micro_batch": 2, "global_batch": 8}, "global_batch", "8\\*1\\*2=16; e.g. --global_batch 16"),
    ("dp=2,pp=4", {"global_batch": 4}, "pipeline_microbatches", "2 micro-batches cannot fill 4 stages"),
    ("dp=1,pp=8", {}, "mesh", "pp=8 x virtual_stages=1 = 8 stages do not divide num_layers=4"),
    ("dp=8", {"remat": "sometimes"}, "remat", "unknown policy 'sometimes'; choose one of none, full"),
    ("dp=8", {"attention": "magic"}, "attention", "unknown implementation 'magic'"),
    ("dp=8", {"attention": "cudnn"}, "attention", "needs an NVIDIA GPU"),
    ("dp=8", {"zero": 2}, "zero", "put the data-parallel degree on fsdp"),
    ("fsdp=8", {"zero": 5}, "zero", "unknown ZeRO stage 5; choose one of 0, 1, 2, 3"),
    ("dp=8", {"dtype": "float8"}, "dtype", "choose one of bfloat16, float32"),
    ("dp=8", {"sequence_parallel": True}, "sequence_parallel", "tp group, which has size 1"),
])
def test_validation_names_the_knob(mesh, kwargs, knob, message):
    run_kwargs = {k: kwargs.pop(k) for k in ("seq_len", "global_batch", "dtype") if k in kwargs}
    run = make_run(mesh, **run_kwargs, **kwargs)
    with pytest.raises(InvalidInput, match=message) as error:
        validate(run, 8, platform="cpu")
    assert error.value.knob == knob
    assert str(error.value).startswith(f"--{knob}: ")


@pytest.mark.parametrize("changes, field, value", [
    ({"num_heads": 6, "num_kv_heads": 2, "d_model": 192}, "num_heads", 6),
    ({"d_ff": 390}, "d_ff", 390),
    ({"vocab_size": 510}, "vocab_size", 510),
])
def test_tp_must_divide_heads_ffn_and_vocabulary(changes, field, value):
    model = dataclasses.replace(load_model_config("tiny"), **changes)
    run = dataclasses.replace(make_run("dp=2,tp=4"), model=model)
    with pytest.raises(InvalidInput, match=f"tp=4 does not divide {field}={value}"):
        validate(run, 8, platform="cpu")


@pytest.mark.parametrize("changes, knob, message", [
    ({"vocab_size": 0}, "model", "tiny: vocab_size 0 is below the least allowed value 1"),
    ({"d_model": 100, "num_heads": 3, "num_kv_heads": 3}, "model", "must be num_heads=3 times an even head dimension"),
    ({"d_model": 120}, "model", "an even head dimension"),  # 120 / 8 heads = 15
])
def test_model_shapes_are_checked(changes, knob, message):
    model = dataclasses.replace(load_model_config("tiny"), **changes)
    run = dataclasses.replace(make_run("dp=1"), model=model)
    with pytest.raises(InvalidInput, match=message) as error:
        validate(run, 1, platform="cpu")
    assert error.value.knob == knob


def test_negative_seed_is_invalid():
    with pytest.raises(InvalidInput, match="--seed: -1 is below the least allowed value 0; e.g. 0"):
        validate(dataclasses.replace(make_run("dp=1"), seed=-1), 1, platform="cpu")


def test_unknown_model_lists_the_known_ones():
    with pytest.raises(InvalidInput, match="unknown model 'llama-3b'; choose one of .*llama-13b") as error:
        load_model_config("llama-3b")
    assert error.value.knob == "model"


def test_valid_layouts_pass():
    for mesh, kwargs in [("dp=8", {}), ("dp=2,fsdp=2,tp=2", {}), ("dp=2,tp=4", {"sequence_parallel": True}),
                         ("fsdp=8", {"zero": 1})]:
        validate(make_run(mesh, **kwargs), 8, platform="cpu")


@pytest.mark.parametrize("knob, value, fragment", [
    ("norm", "triton", "--norm: triton needs an NVIDIA GPU (platform is cpu); use --norm pallas"),
    ("attention", "cudnn", "--attention: cudnn needs an NVIDIA GPU (platform is cpu); use --attention pallas"),
    ("remat", "offload", "--remat: offload needs an NVIDIA GPU (platform is cpu)"),
    ("norm", "fused", "--norm: unknown implementation 'fused'; choose one of xla, pallas, triton"),
])
def test_gpu_only_and_unknown_kernels_are_clear_errors(knob, value, fragment):
    from conftest import make_run
    with pytest.raises(InvalidInput) as error:
        validate(make_run("dp=1", **{knob: value}), 1, platform="cpu")
    assert fragment in str(error.value)


def test_an_attention_record_that_does_not_run_in_pipelines_is_refused_under_pp(monkeypatch):
    """``choices.Attention.pp`` is read by validation: a kernel declared unable to run inside
    pipeline stages is refused at pp > 1 (naming the kernels that can) and accepted at pp = 1."""
    from jaxlayouts import choices
    monkeypatch.setitem(choices.ATTENTION, "pallas", dataclasses.replace(choices.ATTENTION["pallas"], pp=False))
    with pytest.raises(InvalidInput, match="--attention: pallas does not run inside pipeline stages; use "
                                           "--attention xla or cudnn or pallas_jax"):
        validate(make_run("pp=2", attention="pallas"), 2)
    validate(make_run("dp=2", attention="pallas"), 2)
