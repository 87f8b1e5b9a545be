"""Kernel benchmark: attention forward and forward+backward per implementation, RMSNorm bandwidth.

    python -m jaxlayouts.kernel_bench                       # GPU: T = 2k/4k/8k, d = 128, bf16
    python -m jaxlayouts.kernel_bench --markdown docs/results/kernels-h100.md
    python -m jaxlayouts.kernel_bench --ceilings ceilings.json   # reuse measured ceilings

Attention TFLOP/s count the causal FLOPs as FlashAttention's benchmarks do (the two matmuls,
halved by the mask; backward = 2.5 x forward; softmax not counted), see
:func:`jaxlayouts.flops.attention_flops`. ``vs_cudnn`` is the speed ratio to the
``cudnn`` row measured in the same run. RMSNorm GB/s count the bytes a fused kernel must move
(forward: read x, write y; backward: read x and dy, write dx), so the plain version's extra
passes show up as lower GB/s. Each row is also read against the device's ceilings
(:mod:`jaxlayouts.ceilings`, measured at start unless ``--ceilings`` gives them): attention
TFLOP/s as a fraction of the matmul TFLOP/s (``*_tflops_vs_matmul``), RMSNorm GB/s as a fraction
of the copy GB/s (``*_vs_copy``). Every row carries the same keys (``None`` where one does not
apply, e.g. ``seq_len`` and ``*_vs_cudnn`` for RMSNorm). Inputs are random normal, never zeros; each time is the median of
``--iters`` runs after ``--warmup`` runs, each run synchronised with ``block_until_ready``; the
compile is timed separately. On CPU the Pallas kernels run in interpret mode and the shapes are
tiny: those numbers test the harness, not the kernels. The last stdout line is one JSON object.
"""

from __future__ import annotations

import datetime
import json
import math
import pathlib
import sys

import jax
import jax.numpy as jnp
from absl import app, flags

from jaxlayouts import choices, config
from jaxlayouts.ceilings import measure
from jaxlayouts.ceilings import text as ceilings_text
from jaxlayouts.flops import attention_flops
from jaxlayouts.kernels import interpret_mode
from jaxlayouts.kernels.triton_versions import unavailable_reason
from jaxlayouts.model.attention import IMPLEMENTATIONS as ATTENTION
from jaxlayouts.model.norm import IMPLEMENTATIONS as NORM
from jaxlayouts.schema import creatable, json_value, read_input
from jaxlayouts.timing import timed

FLAGS = flags.FLAGS
flags.DEFINE_list("seq_lens", None, "Sequence lengths (default: 2048,4096,8192 on GPU, 128,256 on CPU).")
flags.DEFINE_integer("head_dim", 128, "Head dimension.")
flags.DEFINE_integer("tokens", None, "batch x seq_len per call (default: 16384 on GPU, 256 on CPU).")
flags.DEFINE_integer("heads", None, "Query heads (default: 16 on GPU, 2 on CPU).")
flags.DEFINE_integer("kv_heads", None, "K/V heads (default: as many as query heads).")
flags.DEFINE_string("dtype", "bfloat16", "bfloat16 or float32.")
flags.DEFINE_list("attention", [n for n, a in choices.ATTENTION.items() if a.benchmarked], "Attention implementations.")
flags.DEFINE_list("norm", [n for n, r in choices.NORM.items() if r.benchmarked], "RMSNorm implementations.")
flags.DEFINE_integer("norm_rows", None, "Rows for RMSNorm (default: 16384 on GPU, 256 on CPU).")
flags.DEFINE_integer("d_model", 8192, "RMSNorm row width.")
flags.DEFINE_integer("warmup", 3, "Untimed runs after the compile.")
flags.DEFINE_integer("iters", 10, "Timed runs (the median is reported).")
flags.DEFINE_string("markdown", None, "Also write the tables as Markdown to this file.")
flags.DEFINE_string("ceilings", None, "JSON file with matmul_tflops and copy_gbs to read the kernels "
                    "against (default: measure them now; tiny shapes on CPU).")

CEILING_KEYS = ("matmul_tflops", "copy_gbs")
ROW_KEYS = ("kernel", "implementation", "seq_len", "forward_ms", "forward_backward_ms",
            "forward_tflops", "forward_backward_tflops", "forward_tflops_vs_matmul",
            "forward_backward_tflops_vs_matmul", "forward_gbs", "forward_backward_gbs",
            "forward_vs_copy", "forward_backward_vs_copy", "forward_vs_cudnn",
            "forward_backward_vs_cudnn", "forward_vs_xla", "forward_backward_vs_xla")
"""Keys every row carries (``None`` where they do not apply), for the GPU kit's tables."""


def _unavailable(implementation: str, kind: str, platform: str) -> str | None:
    if (kind, implementation) in choices.GPU_ONLY and platform != "gpu":
        return f"needs an NVIDIA GPU (platform is {platform})"
    if kind == "norm" and choices.NORM[implementation].needs:  # jax-triton, triton
        return unavailable_reason()
    return None


def load_ceilings(path: str) -> dict:
    """Ceilings from a JSON file with positive ``matmul_tflops`` and ``copy_gbs``; a problem is
    a ``ValueError`` naming ``--ceilings``."""
    try:
        ceilings = json_value(read_input(path, "ceilings", limit=2**20))
    except OSError as error:
        raise ValueError(f"--ceilings: cannot read {path}: {error.strerror}") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"--ceilings: {path} is not JSON ({error.msg} at line {error.lineno})") from None
    except (ValueError, UnicodeDecodeError) as error:  # a device or FIFO, too large, nested too deep
        raise ValueError(str(error) if str(error).startswith("--ceilings") else f"--ceilings: {path}: {error}") from None
    bad = [key for key in CEILING_KEYS if not isinstance(ceilings, dict) or isinstance(ceilings.get(key), bool)
           or not isinstance(ceilings.get(key), (int, float)) or not math.isfinite(ceilings[key]) or ceilings[key] <= 0]
    if bad:
        raise ValueError(f"--ceilings: {path} needs positive numbers for {', '.join(bad)}, "
                         'e.g. {"matmul_tflops": 668, "copy_gbs": 2585}')
    return {**ceilings, "source": path}


def against_ceilings(rows: list[dict], ceilings: dict) -> list[dict]:
    """Add the fractions of the matmul and copy ceilings, and every key of ``ROW_KEYS``."""
    for row in rows:
        for mode in ("forward", "forward_backward"):
            if row.get(f"{mode}_tflops") is not None:
                row[f"{mode}_tflops_vs_matmul"] = row[f"{mode}_tflops"] / ceilings["matmul_tflops"]
            if row.get(f"{mode}_gbs") is not None:
                row[f"{mode}_vs_copy"] = row[f"{mode}_gbs"] / ceilings["copy_gbs"]
        for key in ROW_KEYS:
            row.setdefault(key, None)
    return rows


def attention_rows(platform: str) -> list[dict]:


    gpu = platform == "gpu"
    seq_lens = [int(t) for t in FLAGS.seq_lens or ([2048, 4096, 8192] if gpu else [128, 256])]
    heads = FLAGS.heads or (16 if gpu else 2)
    kv_heads = FLAGS.kv_heads or heads
    dtype = jnp.dtype(FLAGS.dtype)
    rows = []
    for seq_len in seq_lens:
        batch = max(1, (FLAGS.tokens or (16384 if gpu else 256)) // seq_len)
        keys = jax.random.split(jax.random.key(seq_len), 4)
        q = jax.random.normal(keys[0], (batch, seq_len, heads, FLAGS.head_dim), dtype)
        k, v = (jax.random.normal(key, (batch, seq_len, kv_heads, FLAGS.head_dim), dtype) for key in keys[1:3])
        do = jax.random.normal(keys[3], q.shape, dtype)
        for name in FLAGS.attention:
            row = {"kernel": "attention", "implementation": name, "seq_len": seq_len, "batch": batch,
                   "heads": heads, "kv_heads": kv_heads, "head_dim": FLAGS.head_dim, "dtype": dtype.name}
            reason = _unavailable(name, "attention", platform)
            if reason is None:
                fn = ATTENTION[name]
                forward = jax.jit(fn)
                backward = jax.jit(lambda q, k, v, do: jax.vjp(fn, q, k, v)[1](do))
                try:
                    for mode, call, args in (("forward", forward, (q, k, v)),
                                             ("forward_backward", backward, (q, k, v, do))):
                        measured = timed(call, *args, warmup=FLAGS.warmup, iters=FLAGS.iters)
                        flop = attention_flops(batch, seq_len, heads, FLAGS.head_dim, mode != "forward")
                        row[f"{mode}_ms"] = measured["time_s"] * 1e3
                        row[f"{mode}_tflops"] = flop / measured["time_s"] / 1e12
                        row[f"{mode}_compile_s"] = measured["compile_s"]
                except Exception as error:  # a kernel that fails for a shape is a result too
                    reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            row["status"] = "ok" if reason is None else "unavailable"
            row["reason"] = reason
            rows.append(row)
        for mode in ("forward", "forward_backward"):
            cudnn = next((r.get(f"{mode}_ms") for r in rows if r["seq_len"] == seq_len
                          and r["implementation"] == "cudnn" and r["status"] == "ok"), None)
            for r in rows:
                if r["seq_len"] == seq_len:
                    ok = cudnn is not None and r["status"] == "ok"
                    r[f"{mode}_vs_cudnn"] = cudnn / r[f"{mode}_ms"] if ok else None
    return rows


def norm_rows(platform: str) -> list[dict]:


    dtype = jnp.dtype(FLAGS.dtype)
    n = FLAGS.norm_rows or (16384 if platform == "gpu" else 256)
    d = FLAGS.d_model
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (n, d), dtype)
    scale = 1.0 + 0.1 * jax.random.normal(keys[1], (d,), jnp.float32)
    dy = jax.random.normal(keys[2], (n, d), dtype)
    moved = {"forward": 2 * n * d * dtype.itemsize, "forward_backward": 5 * n * d * dtype.itemsize}
    rows = []
    for name in FLAGS.norm:
        row = {"kernel": "rms_norm", "implementation": name, "seq_len": None, "rows": n, "d_model": d,
               "dtype": dtype.name}
        reason = _unavailable(name, "norm", platform)
        if reason is None:
            fn = lambda x, scale, name=name: NORM[name](x, scale, 1e-5)
            try:
                calls = {"forward": (jax.jit(fn), (x, scale)),
                         "forward_backward": (jax.jit(lambda x, s, dy: jax.vjp(fn, x, s)[1](dy)), (x, scale, dy))}
                for mode, (call, args) in calls.items():
                    measured = timed(call, *args, warmup=FLAGS.warmup, iters=FLAGS.iters)
                    row[f"{mode}_ms"] = measured["time_s"] * 1e3
                    row[f"{mode}_gbs"] = moved[mode] / measured["time_s"] / 1e9
            except Exception as error:
                reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
        row["status"] = "ok" if reason is None else "unavailable"
        row["reason"] = reason
        rows.append(row)
    plain = next((r for r in rows if r["implementation"] == "xla" and r["status"] == "ok"), None)
    for r in rows:
        for mode in ("forward", "forward_backward"):
            ok = plain is not None and r["status"] == "ok"
            r[f"{mode}_vs_xla"] = plain[f"{mode}_ms"] / r[f"{mode}_ms"] if ok else None
    return rows


def _cell(value, spec=".2f"):
    return "n/a" if value is None else format(value, spec)


def markdown(header: dict, attention: list[dict], norm: list[dict]) -> str:
    ceilings = header["ceilings"]
    lines = [f"# Kernel benchmark on {header['device_kind']}", "",
             f"{header['date']}, jax {header['jax_version']}, {header['platform']}"
             f"{' (Pallas in interpret mode: tiny shapes, not kernel performance)' if header['interpret'] else ''}.",
             f"Command: `{header['command']}`", "",
             f"Ceilings ({ceilings['source']}): {ceilings_text(ceilings, header['platform'])}.", "",
             "## Attention (causal; TFLOP/s count causal FLOPs: 2 matmuls halved, backward 2.5x)", "",
             "| T | batch x heads x d | impl | fwd ms | fwd TFLOP/s | fwd vs matmul | fwd vs cudnn | "
             "fwd+bwd ms | fwd+bwd TFLOP/s | fwd+bwd vs matmul | fwd+bwd vs cudnn | note |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in attention:
        lines.append(f"| {r['seq_len']} | {r['batch']}x{r['heads']}x{r['head_dim']} | {r['implementation']} | "
                     f"{_cell(r['forward_ms'])} | {_cell(r['forward_tflops'], '.3g')} | "
                     f"{_cell(r['forward_tflops_vs_matmul'])} | {_cell(r['forward_vs_cudnn'])} | "
                     f"{_cell(r['forward_backward_ms'])} | {_cell(r['forward_backward_tflops'], '.3g')} | "
                     f"{_cell(r['forward_backward_tflops_vs_matmul'])} | {_cell(r['forward_backward_vs_cudnn'])} | "
                     f"{r['reason'] or ''} |")
    lines += ["", "## RMSNorm (GB/s of the bytes a fused kernel moves)", "",
              "| rows x d | impl | fwd ms | fwd GB/s | fwd vs copy | fwd vs xla | fwd+bwd ms | fwd+bwd GB/s | "
              "fwd+bwd vs copy | fwd+bwd vs xla | note |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in norm:
        lines.append(f"| {r['rows']}x{r['d_model']} | {r['implementation']} | {_cell(r['forward_ms'])} | "
                     f"{_cell(r['forward_gbs'])} | {_cell(r['forward_vs_copy'])} | {_cell(r['forward_vs_xla'])} | "
                     f"{_cell(r['forward_backward_ms'])} | {_cell(r['forward_backward_gbs'])} | "
                     f"{_cell(r['forward_backward_vs_copy'])} | {_cell(r['forward_backward_vs_xla'])} | "
                     f"{r['reason'] or ''} |")
    return "\n".join(lines) + "\n"


def main(argv):



    problems = []
    for knob, chosen, known in (("attention", FLAGS.attention, ATTENTION), ("norm", FLAGS.norm, NORM)):
        unknown = [c for c in chosen if c not in known]
        if unknown or not chosen:
            problems.append(f"--{knob}: unknown {unknown or 'nothing given'}; choose from {', '.join(known)}")
    if FLAGS.markdown is not None and (pathlib.Path(FLAGS.markdown).is_dir() or not creatable(pathlib.Path(FLAGS.markdown))):
        problems.append(f"--markdown: {FLAGS.markdown} is a folder or cannot be written; give a file, e.g. "
                        "--markdown kernels.md")
    if FLAGS.dtype not in ("bfloat16", "float32"):
        problems.append(f"--dtype: {FLAGS.dtype!r}; choose bfloat16 or float32")
    if FLAGS.seq_lens and not all(t.isdigit() and int(t) > 0 for t in FLAGS.seq_lens):
        problems.append(f"--seq_lens: {','.join(FLAGS.seq_lens)}; give positive integers, e.g. 2048,4096")
    for knob, least in (("iters", 1), ("warmup", 0), ("head_dim", 2), ("d_model", 1)):
        if FLAGS[knob].value < least:
            problems.append(f"--{knob}: {FLAGS[knob].value}; must be at least {least}")
    for knob in ("tokens", "heads", "kv_heads", "norm_rows"):
        if FLAGS[knob].value is not None and FLAGS[knob].value < 1:
            problems.append(f"--{knob}: {FLAGS[knob].value}; must be a positive integer")
    if FLAGS.heads and FLAGS.kv_heads and FLAGS.heads % FLAGS.kv_heads:
        problems.append(f"--kv_heads: {FLAGS.kv_heads} must divide --heads {FLAGS.heads}")
    ceilings = None
    if FLAGS.ceilings:
        try:
            ceilings = load_ceilings(FLAGS.ceilings)
        except ValueError as error:
            problems.append(str(error))
    if problems:
        print("\n".join(problems), file=sys.stderr)
        sys.exit(2)
    platform = jax.default_backend()
    header = {"device_kind": jax.devices()[0].device_kind, "platform": platform,
              "jax_version": jax.__version__, "interpret": interpret_mode(None),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python -m jaxlayouts.kernel_bench", *sys.argv[1:]])}
    if header["interpret"]:
        print("note: no GPU; Pallas kernels run in interpret mode on tiny shapes (harness check only)")
    header["ceilings"] = ceilings or {**measure(small=platform == "cpu"), "source": "measured"}
    attention = against_ceilings(attention_rows(platform), header["ceilings"])
    norm = against_ceilings(norm_rows(platform), header["ceilings"])
    table = markdown(header, attention, norm)
    print(table)
    if FLAGS.markdown:
        with open(FLAGS.markdown, "w") as f:
            f.write(table)
    print(json.dumps({**header, "attention": attention, "rms_norm": norm}))


if __name__ == "__main__":
    app.run(main, flags_parser=config.flags_parser(config.print_invalid))
