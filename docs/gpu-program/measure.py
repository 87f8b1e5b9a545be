"""One deviceless GPU compile of the step under one option (docs/gpu-program.md's table): writes the
optimized HLO, the compile seconds, the compiled peak and the census as JSON under --out. One option
per process (XLA flags are read when JAX starts). From the checkout:

    PYTHONPATH=. python docs/gpu-program/measure.py --name 1b-m1-scan --scan 1
    PYTHONPATH=. python docs/gpu-program/measure.py --name 1b-m1-u2 --scan u2       # scan, unroll factor 2
    PYTHONPATH=. python docs/gpu-program/measure.py --name 1b-m1-cublas --flags=--xla_gpu_enable_triton_gemm=false
    PYTHONPATH=. python docs/gpu-program/measure.py --name 65s-tp8-noscan --scan 0 \
        --model docs/gpu-program/llama-65b-stage.yaml --mesh tp=8 --sp --gb 8 --target h100-80gb
"""
import argparse, json, os, sys, time
p = argparse.ArgumentParser()
p.add_argument("--name", required=True)
p.add_argument("--model", default="llama-1b")
p.add_argument("--mesh", default="dp=1")
p.add_argument("--target", default="h200")
p.add_argument("--seq", type=int, default=2048)
p.add_argument("--gb", type=int, default=8)
p.add_argument("--mbs", type=int, default=1)
p.add_argument("--zero", type=int, default=None)
p.add_argument("--sp", action="store_true")
p.add_argument("--remat", default="none")
p.add_argument("--attn", default="cudnn")
p.add_argument("--scan", default="1", help="1 = scanned, 0 = unrolled, uK = a scan with unroll factor K")
p.add_argument("--flags", default="")
p.add_argument("--out", default="gpu-program-runs")
a = p.parse_args()
os.makedirs(a.out, exist_ok=True)
if a.flags:
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + a.flags).strip()
from jaxlayouts import config, targets
vals = dict(model=a.model, mesh=a.mesh, seq_len=a.seq, global_batch=a.gb, micro_batch=a.mbs, remat=a.remat,
            attention=a.attn, dtype="bfloat16", sequence_parallel=a.sp, scan_layers=a.scan != "0")
if a.zero is not None:
    vals["zero"] = a.zero
v = config.check_values(config.values_with(**vals))
run = config.run_config(v, None)
t = targets.resolve(a.target)
targets.prepare(t, run.layout.num_devices)
if a.scan.startswith("u"):
    import flax.linen as nn
    from jaxlayouts.model import llama
    from jaxlayouts.remat import POLICIES as REMAT
    k = int(a.scan[1:])
    def scanned_blocks(remat, length, scan=True):
        block = nn.remat(llama.Block, policy=REMAT[remat], prevent_cse=False)
        return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=length,
                       unroll=k, metadata_params={nn.PARTITION_NAME: "layers"})
    llama.scanned_blocks = scanned_blocks
from jaxlayouts.analysis.compiled import compile_step
devs = targets.devices(t, run.layout.num_devices)
t0 = time.perf_counter()
step = compile_step(run, devs)
seconds = time.perf_counter() - t0
hlo_path = f"{a.out}/{a.name}.hlo"
open(hlo_path, "w").write(step.hlo_text)
res = dict(name=a.name, args=vars(a), layout=str(run.layout), compile_s=round(seconds, 1),
           peak_gib=round(step.memory["compiled_peak_bytes_per_device"] / 2**30, 2), hlo=hlo_path,
           mesh=dict(step.trainer.mesh.shape))
try:
    from jaxlayouts.analysis import census
    res["census"] = census.summary(census.census(step.hlo_text, dict(step.trainer.mesh.shape)))
except Exception as e:
    res["census_error"] = repr(e)
open(f"{a.out}/{a.name}.json", "w").write(json.dumps(res))
print(json.dumps({k: res[k] for k in ("name", "compile_s", "peak_gib")}))
