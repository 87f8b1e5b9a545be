"""The peer baseline: a plain PyTorch LLaMA, as a user would write it in an afternoon.

    python -m jaxlayouts.peers.torch_llama --model llama-1b --seq_len 2048 --global_batch 8 --micro_batch 4 --compile

The same shapes as jaxlayouts' model (:class:`jaxlayouts.layout.ModelConfig`: pre-norm RMSNorm,
rotary embeddings on the two halves of each head, grouped-query attention, SwiGLU, untied
embedding and LM head), float32 weights under bf16 autocast, AdamW (fused on CUDA),
``scaled_dot_product_attention`` (causal, grouped-query heads; PyTorch's dispatcher chooses the
kernel, flash attention where it applies), and gradient accumulation over micro-batches. ``--compile`` wraps the model
(loss included) in ``torch.compile``. Tokens are uniform random (never zeros). Each step ends with
``torch.cuda.synchronize`` before the clock is read; the step time is the median of ``--steps``
steps after ``--warmup`` steps, and MFU uses :mod:`jaxlayouts.flops`, the formula the bench uses.

Only the GPU kit (as a subprocess) and its tests import this module; the package never depends on
torch. The last stdout line is one JSON object (also appended to ``--output``). Exit codes as the
bench's: 0 ok, 1 error, 2 invalid input, 3 out of memory.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from jaxlayouts import flops
from jaxlayouts.layout import InvalidInput, load_model_config

TOOLS = {False: "torch_eager", True: "torch_compile"}
EXIT_CODES = {"ok": 0, "error": 1, "invalid": 2, "oom": 3}
GQA_IN_SDPA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)
"""``scaled_dot_product_attention(enable_gqa=True)`` exists from torch 2.5; before, K/V heads are repeated."""


class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


def rotary(x, cos, sin):
    """Rotary embedding (Su et al. 2021) of ``x [b, heads, t, hd]``, rotating the two halves."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.d_model, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.d_model, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.d_model, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x, cos, sin):
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        if GQA_IN_SDPA:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:
            group = self.heads // self.kv_heads
            out = F.scaled_dot_product_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1),
                                                 is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    """FFN(x) = W2 (silu(W1 x) * W3 x) (Shazeer 2020)."""

    def __init__(self, cfg):
        super().__init__()
        self.w1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w3 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.w2 = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps), RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn, self.mlp = Attention(cfg), SwiGLU(cfg)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


class Llama(nn.Module):
    """Decoder-only LLaMA; ``forward(inputs, targets)`` returns the mean next-token cross-entropy."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for name, p in self.named_parameters():  # the JAX model's initialisation
            if p.dim() == 2:
                nn.init.normal_(p, std=1.0 if name == "embedding.weight" else 0.02)

    def forward(self, inputs, targets):
        t, half = inputs.shape[1], self.cfg.head_dim // 2
        freqs = self.cfg.rope_theta ** (-torch.arange(0, half, device=inputs.device, dtype=torch.float32) / half)
        angles = torch.arange(t, device=inputs.device, dtype=torch.float32)[:, None] * freqs[None, :]
        cos, sin = angles.cos(), angles.sin()
        x = self.embedding(inputs)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.final_norm(x))
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def train_step(model, optimizer, tokens, micro_batch: int, device_type: str):
    """One optimizer step over ``tokens [global_batch, seq_len + 1]``, accumulating gradients
    over micro-batches of ``micro_batch`` sequences; returns the mean loss (a tensor)."""
    chunks = tokens.split(micro_batch)
    total = torch.zeros((), device=tokens.device)
    for chunk in chunks:
        with torch.autocast(device_type, dtype=torch.bfloat16):
            loss = model(chunk[:, :-1], chunk[:, 1:]) / len(chunks)
        loss.backward()
        total += loss.detach()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total


def run(model_name: str, seq_len: int, global_batch: int, micro_batch: int, *, compile: bool = False,
        compile_backend: str = "inductor", steps: int = 4, warmup: int = 2, seed: int = 0, learning_rate: float = 1e-3,
        peak_tflops: float | None = None, device: str | None = None) -> dict:
    """Train ``warmup + steps`` steps and return the measured fields of a result row."""
    cfg = load_model_config(model_name)
    for knob, value in (("seq_len", seq_len), ("global_batch", global_batch), ("micro_batch", micro_batch),
                        ("steps", steps)):
        if value < 1:
            raise InvalidInput(knob, f"{value}: give a positive integer")
    if warmup < 0:
        raise InvalidInput("warmup", f"{warmup}: give 0 or more warm-up steps")
    if global_batch % micro_batch:
        raise InvalidInput("micro_batch", f"{micro_batch} does not divide --global_batch {global_batch}")
    if peak_tflops is not None and peak_tflops <= 0:
        raise InvalidInput("peak_tflops", f"{peak_tflops}: give the device's peak in TFLOP/s, e.g. 989")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(seed)
    model = Llama(cfg).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, fused=device.type == "cuda")
    forward = torch.compile(model, backend=compile_backend) if compile else model
    generator = torch.Generator(device=device).manual_seed(seed)
    batches = [torch.randint(0, cfg.vocab_size, (global_batch, seq_len + 1), device=device, generator=generator)
               for _ in range(warmup + steps)]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    losses, times = [], []
    for step, batch in enumerate(batches):
        sync()
        start = time.perf_counter()
        loss = train_step(forward, optimizer, batch, micro_batch, device.type)
        sync()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    step_time = statistics.median(times[warmup:])
    tokens_per_s = global_batch * seq_len / step_time
    device_kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = peak_tflops if peak_tflops is not None else flops.peak_tflops(device_kind)
    achieved, mfu = flops.mfu(cfg, seq_len, tokens_per_s, 1, peak)
    return {"model": cfg.name, "n_params": sum(p.numel() for p in model.parameters()),
            "device_kind": device_kind, "torch_version": torch.__version__,
            "first_step_s": times[0], "step_time_s": step_time, "step_times_s": times[warmup:],
            "tokens_per_s": tokens_per_s, "model_tflops_per_device": achieved, "mfu": mfu, "peak_tflops": peak,
            "peak_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            "losses": losses}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jaxlayouts.peers.torch_llama", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--global_batch", type=int, default=8)
    parser.add_argument("--micro_batch", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (loss included)")
    parser.add_argument("--compile_backend", default="inductor",
                        help="torch.compile backend: inductor (default) or, for a quick CPU check, aot_eager")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--peak_tflops", type=float, default=None, help="per-device peak for MFU (default: by device)")
    parser.add_argument("--output", default=None, help="append the result as one JSON line to this file")
    args = parser.parse_args(argv)
    row = {"tool": TOOLS[args.compile], "status": "ok", "error": None, "model": args.model,
           "seq_len": args.seq_len, "global_batch": args.global_batch, "micro_batch": args.micro_batch,
           "grad_accum_steps": args.global_batch // args.micro_batch if args.micro_batch > 0 else None,
           "remat": "none", "attention": "sdpa", "norm": "torch",
           "compile_backend": args.compile_backend if args.compile else None, "steps": args.steps, "warmup": args.warmup,
           "command": " ".join(["python -m jaxlayouts.peers.torch_llama"] + sys.argv[1:])}
    try:
        row.update(run(args.model, args.seq_len, args.global_batch, args.micro_batch, compile=args.compile,
                       compile_backend=args.compile_backend, steps=args.steps, warmup=args.warmup, seed=args.seed, peak_tflops=args.peak_tflops))
    except InvalidInput as error:
        row.update(status="invalid", error=str(error))
    except torch.cuda.OutOfMemoryError as error:
        row.update(status="oom", error=f"OutOfMemoryError: {str(error).splitlines()[0]}")
    except Exception as error:  # recorded as data, as the bench does
        row.update(status="error", error=f"{type(error).__name__}: {str(error)[:2000]}")
    line = json.dumps({k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()})
    print(line, flush=True)
    if args.output:
        with open(args.output, "a") as out:
            out.write(line + "\n")
    return EXIT_CODES[row["status"]]


if __name__ == "__main__":
    sys.exit(main())
