"""Tuning harness: time candidate launch configurations of the Pallas kernels on this device,
print the fastest per shape and (``--write``) record them in the table :mod:`jaxlayouts.kernels.tuning`
reads.

    python -m jaxlayouts.kernels.tune --write                        # GPU: both kernels, default shapes
    python -m jaxlayouts.kernels.tune --kernel attention --seq_lens 2048,8192 --heads 16 --kv_heads 16
    python -m jaxlayouts.kernels.tune --dry-run --table /tmp/t.json --write   # CPU: tiny, interpret mode

Attention: the forward candidates (tiles, warps, stages) are timed on the forward pass; the
backward candidates on forward+backward with the fastest forward. RMSNorm: likewise, the forward
pass then forward+backward. Each candidate's output must match the first candidate's (relative
error below ``TOLERANCE``) or it is dropped as wrong. A candidate that fails to compile (e.g. too
much shared memory) is reported and skipped. Times are medians of ``--iters`` synchronised runs
(:func:`jaxlayouts.timing.timed`); a dry run's times measure interpret mode on tiny shapes, i.e.
nothing about the kernels. The last stdout line is one JSON object with the winners.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlayouts.kernels import tuning
from jaxlayouts.kernels.flash_attention import flash_attention
from jaxlayouts.kernels.rms_norm import rms_norm_pallas
from jaxlayouts.schema import creatable
from jaxlayouts.timing import timed

TOLERANCE = 2e-2
"""Largest relative error between candidates (bf16 outputs accumulated in different orders)."""


def attention_candidates(dry_run: bool) -> tuple[list[dict], list[dict]]:
    """Forward and backward candidates: tiles in 32..128 and Triton's usual 4/8 warps, 2/3 stages."""
    if dry_run:
        return ([{"block_q": 32, "block_k": 16}, {"block_q": 16, "block_k": 16}],
                [{"block_q_backward": 16, "block_k_backward": 32}, {"block_q_backward": 16, "block_k_backward": 16}])
    launch = list(itertools.product((4, 8), (2, 3)))
    forward = [{"block_q": q, "block_k": k, "num_warps": w, "num_stages": s}
               for (q, k), (w, s) in itertools.product(((64, 64), (128, 64), (128, 128), (64, 128)), launch)]
    backward = [{"block_q_backward": q, "block_k_backward": k, "num_warps_backward": w, "num_stages_backward": s}
                for (q, k), (w, s) in itertools.product(((32, 64), (64, 64), (64, 128), (128, 64)), launch)]
    return forward, backward


def norm_candidates(width: int, dry_run: bool) -> tuple[list[dict], list[dict]]:
    """Forward (rows, warps) and backward (rows, warps, programs per core) candidates whose row
    block holds at most 32768 elements."""
    if dry_run:
        return ([{"block_rows": 1, "num_warps": 4}, {"block_rows": 4, "num_warps": 4}],
                [{"backward_block_rows": 2, "backward_num_warps": 4, "backward_programs_per_core": 2},
                 {"backward_block_rows": 1, "backward_num_warps": 4, "backward_programs_per_core": 3}])
    fits = lambda rows: rows * tuning.next_power_of_2(width) <= 32768
    forward = [{"block_rows": r, "num_warps": w} for r, w in itertools.product((1, 2, 4, 8), (4, 8, 16, 32)) if fits(r)]
    backward = [{"backward_block_rows": r, "backward_num_warps": w, "backward_programs_per_core": p}
                for r, w, p in itertools.product((1, 2, 4), (4, 8, 16), (1, 2, 4, 8)) if fits(r)]
    return forward, backward


def _relative_error(got, expected) -> float:
    got, expected = (np.asarray(x, np.float32) for x in (got, expected))
    return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def fastest(name: str, candidates: list, build, args, runs: dict) -> tuple[object, dict]:
    """Time ``build(candidate)`` on ``args`` for each candidate; print each; return the fastest
    correct one and its time. ``build`` returns a jitted function."""
    reference, best = None, None
    for candidate in candidates:
        try:
            fn = build(candidate)
            out = jax.tree.leaves(fn(*args))
            if reference is None:
                reference = out
            error = max(_relative_error(g, e) for g, e in zip(out, reference))
            if error > TOLERANCE:
                print(f"  {name} {candidate}: wrong (relative error {error:.2g} against the first candidate)")
                continue
            measured = timed(fn, *args, **runs)
        except Exception as failure:  # a configuration the compiler rejects is a result too
            print(f"  {name} {candidate}: failed: {type(failure).__name__}: {str(failure).splitlines()[0][:160]}")
            continue
        print(f"  {name} {candidate}: {measured['time_s'] * 1e3:.3f} ms")
        if best is None or measured["time_s"] < best[1]["time_s"]:
            best = (candidate, measured)
    if best is None:
        raise RuntimeError(f"{name}: no candidate compiled and matched")
    return best


def tune_attention(seq_len, batch, heads, kv_heads, head_dim, dtype, dry_run, runs) -> tuple[str, tuning.BlockSizes, dict]:

    keys = jax.random.split(jax.random.key(seq_len), 4)
    q = jax.random.normal(keys[0], (batch, seq_len, heads, head_dim), dtype)
    k, v = (jax.random.normal(key, (batch, seq_len, kv_heads, head_dim), dtype) for key in keys[1:3])
    do = jax.random.normal(keys[3], q.shape, dtype)
    forward_candidates, backward_candidates = attention_candidates(dry_run)

    def forward(candidate):
        return jax.jit(lambda q, k, v: flash_attention(q, k, v, tuning.BlockSizes(**candidate)))

    def forward_backward(candidate):
        blocks = tuning.BlockSizes(**best_forward, **candidate)
        attend = lambda q, k, v: flash_attention(q, k, v, blocks)
        return jax.jit(lambda q, k, v, do: jax.vjp(attend, q, k, v)[1](do))

    key = tuning.attention_key(seq_len, head_dim, heads // kv_heads)
    print(f"attention {key} (batch {batch}, {heads}/{kv_heads} heads):")
    best_forward, forward_time = fastest("forward", forward_candidates, forward, (q, k, v), runs)
    best_backward, backward_time = fastest("forward+backward", backward_candidates, forward_backward,
                                           (q, k, v, do), runs)
    return key, tuning.BlockSizes(**best_forward, **best_backward), {
        "forward_ms": forward_time["time_s"] * 1e3, "forward_backward_ms": backward_time["time_s"] * 1e3}


def tune_norm(width, rows, dtype, dry_run, runs) -> tuple[str, tuning.NormConfig, dict]:

    keys = jax.random.split(jax.random.key(width), 3)
    x = jax.random.normal(keys[0], (rows, width), dtype)
    scale = 1.0 + 0.1 * jax.random.normal(keys[1], (width,), jnp.float32)
    dy = jax.random.normal(keys[2], x.shape, dtype)
    forward_candidates, backward_candidates = norm_candidates(width, dry_run)
    start = tuning.default_norm_config(width)

    def forward(candidate):
        config = dataclasses.replace(start, **candidate)
        return jax.jit(lambda x, s: rms_norm_pallas(x, s, 1e-5, config=config))

    def forward_backward(candidate):
        config = dataclasses.replace(start, **best_forward, **candidate)
        norm = lambda x, s: rms_norm_pallas(x, s, 1e-5, config=config)
        return jax.jit(lambda x, s, dy: jax.vjp(norm, x, s)[1](dy))

    print(f"rms_norm {rows} x {width}:")
    best_forward, forward_time = fastest("forward", forward_candidates, forward, (x, scale), runs)
    best_backward, backward_time = fastest("forward+backward", backward_candidates, forward_backward,
                                           (x, scale, dy), runs)
    return str(width), dataclasses.replace(start, **best_forward, **best_backward), {
        "rows": rows, "forward_ms": forward_time["time_s"] * 1e3,
        "forward_backward_ms": backward_time["time_s"] * 1e3}


def _positive_list(text: str) -> list[int]:
    try:
        values = [int(t) for t in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give positive integers separated by commas, e.g. 2048,8192")
    return values


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive integer")
    return int(text)


def parse(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jaxlayouts.kernels.tune", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel", choices=("attention", "rms_norm", "both"), default="both")
    parser.add_argument("--seq_lens", type=_positive_list, default=[2048, 4096, 8192])
    parser.add_argument("--heads", type=_positive, default=32)
    parser.add_argument("--kv_heads", type=_positive, default=4)
    parser.add_argument("--head_dim", type=_positive, default=128)
    parser.add_argument("--tokens", type=_positive, default=16384, help="batch x seq_len per attention call")
    parser.add_argument("--widths", type=_positive_list, default=[2048, 5120, 8192], help="RMSNorm row widths")
    parser.add_argument("--rows", type=_positive, default=16384, help="RMSNorm rows")
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=_positive, default=10)
    parser.add_argument("--write", action="store_true", help="record the winners in --table")
    parser.add_argument("--table", type=Path, default=tuning.TABLE, help="tuned table (default: %(default)s)")
    parser.add_argument("--dry-run", "--dry_run", dest="dry_run", action="store_true",
                        help="tiny shapes, two candidates each, interpret mode on CPU: checks the harness only")
    args = parser.parse_args(argv)
    if args.heads % args.kv_heads:
        parser.error(f"--kv_heads {args.kv_heads} must divide --heads {args.heads}")
    if args.warmup < 0:
        parser.error(f"--warmup {args.warmup}: must be at least 0")
    if args.dry_run and args.write and args.table == tuning.TABLE:
        parser.error(f"--dry-run --write needs --table PATH: {tuning.TABLE} holds GPU measurements only")
    if args.write and (args.table.is_dir() or not creatable(args.table)):
        parser.error(f"--table {args.table}: a folder or not writable; give a JSON file, e.g. --table tuned.json")
    if args.table.is_file():
        try:
            table = json.loads(args.table.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            table = None
        if not isinstance(table, dict):
            parser.error(f"--table {args.table}: not a tuned table (a JSON object by device kind)")
    if args.dry_run:
        args.seq_lens, args.heads, args.kv_heads, args.head_dim, args.tokens = [24], 2, 1, 16, 24
        args.widths, args.rows, args.warmup, args.iters = [96], 20, 0, 1
    return args


def main(argv=None) -> None:
    args = parse(sys.argv[1:] if argv is None else argv)
    if jax.default_backend() != "gpu" and not args.dry_run:
        print(f"no GPU (platform is {jax.default_backend()}): times in interpret mode mean nothing; "
              "use --dry-run to check the harness", file=sys.stderr)
        sys.exit(2)
    device_kind = jax.devices()[0].device_kind
    dtype = jnp.dtype(args.dtype)
    runs = {"warmup": args.warmup, "iters": args.iters}
    winners = {"device_kind": device_kind, "dry_run": args.dry_run, "attention": {}, "rms_norm": {}}
    results = []
    if args.kernel in ("attention", "both"):
        for seq_len in args.seq_lens:
            batch = max(1, args.tokens // seq_len)
            results.append(("attention", *tune_attention(seq_len, batch, args.heads, args.kv_heads,
                                                         args.head_dim, dtype, args.dry_run, runs)))
    if args.kernel in ("rms_norm", "both"):
        for width in args.widths:
            results.append(("rms_norm", *tune_norm(width, args.rows, dtype, args.dry_run, runs)))
    for kernel, key, config, measured in results:
        print(f"best {kernel} {key}: {dataclasses.asdict(config)} {measured}")
        winners[kernel][key] = {"config": dataclasses.asdict(config), **measured}
        if args.write:
            tuning.record(device_kind, kernel, key, config, measured, args.table)
    if args.write:
        print(f"wrote {len(results)} entries for {device_kind} to {args.table}")
    print(json.dumps(winners))


if __name__ == "__main__":
    main()
