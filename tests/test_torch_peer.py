"""The PyTorch peer: jaxlayouts' shapes, a training step that learns, the project's MFU formula.

torch.compile is checked here with the ``aot_eager`` backend (Dynamo and AOTAutograd, no code
generation); Inductor takes a minute to compile on 2 CPU cores, so it is exercised only by the GPU
kit on a GPU.
"""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from jaxlayouts import flops  # noqa: E402
from jaxlayouts.layout import InvalidInput, load_model_config  # noqa: E402
from jaxlayouts.peers import torch_llama  # noqa: E402

torch.set_num_threads(1)  # tiny shapes: OpenMP threads only spin against the other test worker


@pytest.mark.parametrize("name", ["tiny", "llama-1b"])
def test_the_peer_has_jaxlayouts_parameter_count(name):
    cfg = load_model_config(name)
    with torch.device("meta"):
        model = torch_llama.Llama(cfg)
    assert sum(p.numel() for p in model.parameters()) == cfg.n_params
    assert model.layers[0].attn.wk.weight.shape == (cfg.num_kv_heads * cfg.head_dim, cfg.d_model)  # GQA
    assert model.lm_head.weight is not model.embedding.weight  # untied


class GradientCopier:
    """An optimizer stand-in that keeps the accumulated gradients of each step."""

    def __init__(self, model):
        self.model, self.grads = model, []

    def step(self):
        self.grads.append([p.grad.clone() for p in self.model.parameters()])

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def test_accumulating_micro_batches_gives_the_whole_batch_gradient():
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    model = torch_llama.Llama(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (4, 17), generator=torch.Generator().manual_seed(1))
    losses, grads = [], []
    for micro_batch in (4, 1):
        optimizer = GradientCopier(model)
        losses.append(float(torch_llama.train_step(model, optimizer, tokens, micro_batch, "cpu")))
        grads.append(optimizer.grads[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    for whole, accumulated in zip(*grads):
        np.testing.assert_allclose(accumulated.numpy(), whole.numpy(), rtol=0.05, atol=0.02 * whole.abs().max().item())


def test_the_step_learns_a_repeated_batch():
    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    model = torch_llama.Llama(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tokens = torch.randint(0, cfg.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    losses = [float(torch_llama.train_step(model, optimizer, tokens, 1, "cpu")) for _ in range(8)]
    assert losses[0] == pytest.approx(np.log(cfg.vocab_size), rel=0.05)  # chance at the start
    assert losses[-1] < 0.6 * losses[0]


def test_a_run_reports_the_projects_mfu_and_compile_matches_eager():
    eager = torch_llama.run("tiny", 16, 2, 1, steps=2, warmup=1, peak_tflops=2.0)
    cfg = load_model_config("tiny")
    assert eager["tokens_per_s"] == pytest.approx(2 * 16 / eager["step_time_s"])
    assert eager["step_time_s"] == pytest.approx(float(np.median(eager["step_times_s"])))
    achieved, mfu = flops.mfu(cfg, 16, eager["tokens_per_s"], 1, 2.0)
    assert (eager["model_tflops_per_device"], eager["mfu"]) == (pytest.approx(achieved), pytest.approx(mfu))
    assert eager["n_params"] == cfg.n_params and eager["peak_bytes"] is None and len(eager["losses"]) == 3
    compiled = torch_llama.run("tiny", 16, 2, 1, compile=True, compile_backend="aot_eager", steps=2, warmup=1)
    np.testing.assert_allclose(compiled["losses"], eager["losses"], rtol=2e-3)
    assert compiled["mfu"] is None  # CPU: no datasheet peak


def test_bad_input_is_invalid_and_names_the_flag(capsys):
    with pytest.raises(InvalidInput, match="--micro_batch"):
        torch_llama.run("tiny", 16, 4, 3)
    assert torch_llama.main(["--global_batch", "4", "--micro_batch", "3"]) == 2
    row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert row["status"] == "invalid" and row["error"].startswith("--micro_batch") and row["tool"] == "torch_eager"
    assert torch_llama.main(["--model", "llama-3b"]) == 2
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"].startswith("--model")
