"""The census of a compiled step: what the program runs per step, loop trip counts multiplied in.

Read from the optimized HLO (``compiled.as_text()``; on a GPU target XLA:GPU's own program, see
``targets.py``), with :mod:`analysis.hlo`'s parsing (computations, loop trips, collectives). Only
what runs as a kernel of its own is counted: instructions of the entry computation, loop bodies and
conditions, and called computations, not the instructions inside a fusion.

- **GEMMs** by input and output dtype (``"bf16,bf16->bf16"``): Triton GEMM fusions (the input
  dtypes of the ``dot`` inside, the fusion's result dtype), cuBLAS/cuBLASLt custom calls, cuDNN GEMM fusions, and any ``dot`` left
  unfused (XLA:CPU's program).
- **Copy-like ops**, count and bytes moved (the result; a dynamic-update-slice's update):
  ``copy`` (top-level copies, ``copy-start``); ``dynamic-slice (memcpy)`` and
  ``dynamic-update-slice (memcpy)``, XLA:GPU's ``dynamic_slice_fusion`` custom fusions that run as a
  device memcpy (the per-layer slices of a scan's stacked weights and saved activations, and
  their stacking back); ``dynamic-slice (loop kernel)`` and ``dynamic-update-slice (loop kernel)``,
  fusions whose root is one (or an unfused instruction: XLA:CPU); and ``loop predicate to host``,
  the device-to-host copy of a ``while`` loop's condition, once per trip plus the exit check.
- **Fusions**: every fusion kernel launched (GEMM fusions included), and among them
  ``loop add`` fusions (elementwise fusions whose root is an ``add``: gradient accumulation).
- **Collectives** by kind and mesh axes, count and bytes (:func:`hlo.collectives`).

A ``dynamic_slice_fusion`` that holds a GEMM (XLA:GPU's ``--xla_gpu_enable_dynamic_slice_fusion``,
which lets cuBLAS read a slice in place) is a GEMM, not a copy.
"""

from __future__ import annotations

import re

from jaxlayouts.analysis import hlo
from jaxlayouts.units import bytes_text

COPY_KINDS = ("copy", "dynamic-slice (memcpy)", "dynamic-update-slice (memcpy)", "dynamic-slice (loop kernel)",
              "dynamic-update-slice (loop kernel)", "loop predicate to host")
GEMM_CUSTOM_CALLS = ("__cublas$gemm", "__cublas$lt$matmul", "__cublas$lt$matmul$f8", "__cudnn$convForward")
GEMM_FUSION_KINDS = ("__triton_gemm", "__triton_nested_gemm_fusion", "__cudnn$fusion", "__triton_fusion")

_KERNEL = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+"
                     r"(?P<op>fusion|custom-call|copy|copy-start|dynamic-slice|dynamic-update-slice|dot|while)"
                     r"\((?P<operands>[^)]*)\)(?P<attrs>.*)$")


def _root(body: list[str]) -> tuple[str, str] | None:
    """(op, line) of a computation's ROOT instruction."""
    for line in body:
        if line.lstrip().startswith("ROOT "):
            m = hlo._OPERATION.match(line)
            return (m["op"], line) if m else None
    return None


def _root_ops(body: list[str]) -> list[str]:
    """The root's op, or the ops of a tuple root's elements (a multi-output fusion)."""
    root = _root(body)
    if root is None:
        return []
    op, line = root
    if op != "tuple":
        return [op]
    defined = {m["name"]: m["op"] for m in map(hlo._OPERATION.match, body) if m}
    operands = re.findall(r"%([\w.\-]+)", re.sub(r"/\*.*?\*/", "", hlo._OPERATION.match(line)["operands"]))
    return [defined.get(name, "?") for name in operands]


def _dtype_of(name: str, body: list[str]) -> str:
    for line in body:
        d = hlo._DEFINITION.match(line)
        if d and d["name"] == name:
            return d["dtype"]
    return "?"


def _operand_dtypes(operands: str, body: list[str], count: int) -> list[str]:
    names = re.findall(r"%([\w.\-]+)", re.sub(r"/\*.*?\*/", "", operands))[:count]
    return [_dtype_of(name, body) for name in names]


def _result_dtype(shape: str) -> str:
    first = hlo._ARRAY.search(shape)
    return first["dtype"] if first else "?"


def _gemm_dtypes(computations: dict, name: str) -> str | None:
    """``"in,in->out"`` of the first dot or GEMM custom call inside computation ``name`` or what it
    calls (a Triton nested GEMM fusion keeps its operands in nested fusions), else None."""
    seen, todo = set(), [name]
    while todo:
        current = todo.pop(0)
        if current in seen or current not in computations:
            continue
        seen.add(current)
        body = computations[current]
        for line in body:
            m = hlo._OPERATION.match(line)
            if not m:
                continue
            target = re.search(r'custom_call_target="([^"]+)"', line)
            if m["op"] == "dot" or (m["op"] == "custom-call" and target and target[1] in GEMM_CUSTOM_CALLS):
                return f"{','.join(_operand_dtypes(m['operands'], body, 2))}->{_result_dtype(m['shape'])}"
        for line in body:
            todo.extend(re.findall(r"calls=%?([\w.\-]+)", line))
    return None


def census(hlo_text: str, mesh_shape: dict | None = None) -> dict:
    """The per-step census of ``hlo_text`` as plain data (see the module docstring)::

        {"gemms": {"total": n, "by_dtype": {"bf16,bf16->bf16": n, ...}},
         "copy_like": {"total": {"count": n, "bytes": b}, "by_kind": {kind: {"count", "bytes"}}},
         "fusions": n, "loop_add_fusions": n, "while_loops": [{"body", "trips", "executions"}],
         "collectives": [{"kind", "axes", "count", "bytes"}]}

    ``mesh_shape`` (axis -> size in mesh order, ``dict(mesh.shape)``) names the collectives' axes;
    without it no collective is listed."""
    computations = hlo._computations(hlo_text)
    executions = hlo._executions(computations)
    fused = {callee for body in computations.values() for line in body if " fusion(" in line
             for callee in re.findall(r"calls=%?([\w.\-]+)", line)}
    gemms: dict = {}
    copies = {kind: [0, 0] for kind in COPY_KINDS}
    fusions = loop_adds = 0
    loops = []

    def add_copy(kind, times, moved):
        copies[kind][0] += times
        copies[kind][1] += times * moved

    for computation, body in computations.items():
        if computation in fused:
            continue
        times = executions.get(computation, 1)
        for line in body:
            m = _KERNEL.match(line)
            if not m:
                continue
            op, attrs = m["op"], m["attrs"]
            if op == "while":
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', attrs)
                loop_body = re.search(r"body=%?([\w.\-]+)", attrs)[1]
                n = int(trips[1]) if trips else executions.get(loop_body, times) // max(times, 1)
                loops.append({"body": loop_body, "trips": n, "executions": times})
                add_copy("loop predicate to host", times * (n + 1), 1)
                continue
            if op in ("copy", "copy-start"):
                add_copy("copy", times, hlo.shape_bytes(m["shape"] if op == "copy" else _start_result(m["shape"])))
                continue
            if op in ("dynamic-slice", "dynamic-update-slice"):
                moved = (hlo.shape_bytes(m["shape"]) if op == "dynamic-slice"
                         else _update_bytes(m["operands"], body))
                add_copy(f"{op} (loop kernel)", times, moved)
                continue
            if op in ("dot", "custom-call"):
                target = re.search(r'custom_call_target="([^"]+)"', attrs)
                if op == "dot" or (target and target[1] in GEMM_CUSTOM_CALLS):
                    dtypes = f"{','.join(_operand_dtypes(m['operands'], body, 2))}->{_result_dtype(m['shape'])}"
                    gemms[dtypes] = gemms.get(dtypes, 0) + times
                continue
            # a fusion
            fusions += times
            called = re.search(r"calls=%?([\w.\-]+)", attrs)[1]
            kind = re.search(r'"fusion_backend_config":\{"kind":"([^"]+)"', attrs)
            custom = re.search(r'"custom_fusion_config":\{"name":"([^"]+)"', attrs)
            fused_body = computations.get(called, [])
            dtypes = _gemm_dtypes(computations, called)
            if dtypes and ((kind and kind[1] in GEMM_FUSION_KINDS) or custom):
                dtypes = f"{dtypes.split('->')[0]}->{_result_dtype(m['shape'])}"  # the kernel writes the fusion's result
                gemms[dtypes] = gemms.get(dtypes, 0) + times
                continue
            roots = _root_ops(fused_body)
            if custom and custom[1] == "dynamic_slice_fusion" or (kind and "memcpy" in kind[1]):
                if "dynamic-update-slice" in roots:
                    add_copy("dynamic-update-slice (memcpy)", times, _fused_update_bytes(fused_body))
                else:
                    add_copy("dynamic-slice (memcpy)", times, hlo.shape_bytes(m["shape"]))
            elif "dynamic-update-slice" in roots:
                add_copy("dynamic-update-slice (loop kernel)", times, _fused_update_bytes(fused_body))
            elif roots and all(r == "dynamic-slice" for r in roots):
                add_copy("dynamic-slice (loop kernel)", times, hlo.shape_bytes(m["shape"]))
            elif "kind=kLoop" in attrs and roots == ["add"]:
                loop_adds += times
    found = [c for c in hlo.collectives(hlo_text, mesh_shape) if c.axes] if mesh_shape else []
    return {
        "gemms": {"total": sum(gemms.values()), "by_dtype": dict(sorted(gemms.items()))},
        "copy_like": {"total": {"count": sum(c for c, _ in copies.values()), "bytes": sum(b for _, b in copies.values())},
                      "by_kind": {kind: {"count": c, "bytes": b} for kind, (c, b) in copies.items()}},
        "fusions": fusions,
        "loop_add_fusions": loop_adds,
        "while_loops": loops,
        "collectives": [{"kind": kind, "axes": list(axes), "count": n, "bytes": b}
                        for (kind, axes), (n, b) in sorted(hlo.per_step(found).items(), key=lambda kv: -kv[1][1])],
    }


def _start_result(shape: str) -> str:
    """An async start's result array (its tuple's second element), else the shape."""
    arrays = hlo._ARRAY.findall(shape)
    return "{}[{}]".format(*arrays[1]) if shape.startswith("(") and len(arrays) > 1 else shape


def _update_bytes(operands: str, body: list[str]) -> int:
    """Bytes of a dynamic-update-slice's update (its second operand)."""
    names = re.findall(r"%([\w.\-]+)", re.sub(r"/\*.*?\*/", "", operands))
    for line in body:
        d = hlo._DEFINITION.match(line)
        if d and len(names) > 1 and d["name"] == names[1]:
            return hlo.shape_bytes(f"{d['dtype']}[{d['dims']}]")
    return 0


def _fused_update_bytes(body: list[str]) -> int:
    """Bytes written by the dynamic-update-slices of a fused computation (their updates)."""
    total = 0
    for line in body:
        m = hlo._OPERATION.match(line)
        if m and m["op"] == "dynamic-update-slice":
            total += _update_bytes(m["operands"], body)
    return total


def table_rows(c: dict) -> list[list]:
    """``[what, count per step, bytes per step]`` rows, in the report's order."""
    rows = [[f"GEMM {dtypes}", n, ""] for dtypes, n in c["gemms"]["by_dtype"].items()]
    rows.append(["GEMMs in all", c["gemms"]["total"], ""])
    rows += [[kind, v["count"], bytes_text(v["bytes"])] for kind, v in c["copy_like"]["by_kind"].items()]
    rows.append(["copy-like in all", c["copy_like"]["total"]["count"], bytes_text(c["copy_like"]["total"]["bytes"])])
    rows += [["fusions (kernels)", c["fusions"], ""], ["  of which loop add fusions", c["loop_add_fusions"], ""]]
    rows += [[f"{x['kind']} over {','.join(x['axes'])}", x["count"], bytes_text(x["bytes"])] for x in c["collectives"]]
    return rows
