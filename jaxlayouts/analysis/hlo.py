"""Collectives in a compiled (post-partitioning) HLO module, named by the mesh axes they span.

Each collective's replica groups are turned into sets of device positions and matched against
the groups that each subset of mesh axes induces, so ``all-gather over ('tp',)`` reads the same
whichever of XLA's three spellings the text uses (explicit ``{{0,1},{2,3}}``, iota
``[2,4]<=[8]`` with an optional transpose, or ``mesh[...] {'axis_1'}``).

XLA's CPU pipeline has no reduce-scatter rewrite: a reduction whose result is immediately sliced
per device compiles to ``all-reduce`` + ``dynamic-slice`` (GPU turns that pair into one
``reduce-scatter``). Such an all-reduce is reported as kind ``reduce-scatter`` with
``lowered_as="all-reduce+dynamic-slice"``, so tests and byte counts mean the same on CPU and GPU.
"""

from __future__ import annotations

import dataclasses
import itertools
import re

import numpy as np


KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
               "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+"
    r"(?P<op>(?:" + "|".join(KINDS) + r"))(?P<start>-start)?\((?P<operands>[^)]*)\)(?P<attrs>.*)$")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?(?P<name>[\w.\-]+)\s.*\{\s*$")
_ARRAY = re.compile(r"(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\]")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str
    axes: tuple  # mesh axes spanned, or ("?",) when the groups match no axis subset
    bytes: int  # bytes of the op's result on one device
    name: str
    computation: str
    lowered_as: str | None = None
    executions: int = 1  # times it runs per call of the program: enclosing loops' trip counts multiplied
    instruction: str = ""  # the HLO instruction (a combined all-reduce's elements share it), as a profile names it


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape such as ``f32[2,16]{1,0}`` or a tuple ``(bf16[4], f32[2,2])``."""
    total = 0
    for match in _ARRAY.finditer(shape):
        dims = [int(d) for d in match["dims"].split(",") if d]
        total += DTYPE_BYTES.get(match["dtype"], 4) * int(np.prod(dims, dtype=np.int64))
    return total


def _groups(attrs: str) -> frozenset | None:
    """Replica groups as a frozenset of frozensets of device positions."""
    m = re.search(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}", attrs)
    if m:
        return frozenset(frozenset(int(d) for d in g.split(",") if d)
                         for g in re.findall(r"\{([\d,]*)\}", m[1]))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
    if m:
        out_shape = [int(x) for x in m[1].split(",")]
        ids = np.arange(int(np.prod([int(x) for x in m[2].split(",")]))).reshape(
            [int(x) for x in m[2].split(",")])
        if m[3]:
            ids = ids.transpose([int(x) for x in m[3].split(",")])
        return frozenset(frozenset(row) for row in ids.reshape(out_shape).tolist())
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\(\[([\d,]+)\](?:T\(([\d,]+)\))?\))?"
                  r"\s*\{([^}]*)\}", attrs)
    if m:
        sizes = [int(s) for s in re.findall(r"=(\d+)", m[1])]
        names = re.findall(r"'([^']+)'=", m[1])
        ids = np.arange(int(np.prod(sizes)))
        if m[2]:  # devices listed as a (transposed) iota
            ids = ids.reshape([int(x) for x in m[2].split(",")])
            if m[3]:
                ids = ids.transpose([int(x) for x in m[3].split(",")])
        chosen = [names.index(a) for a in re.findall(r"'([^']+)'", m[4])]
        return _axis_groups(ids.reshape(sizes), chosen)
    m = re.search(r"source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}", attrs)
    if m:  # collective-permute: each pair lies inside one group of the axis it moves along
        return frozenset(frozenset(int(d) for d in p.split(","))
                         for p in re.findall(r"\{(\d+,\d+)\}", m[1]))
    return None


def _axis_groups(positions: np.ndarray, axes: list[int]) -> frozenset:
    rest = [a for a in range(positions.ndim) if a not in axes]
    moved = positions.transpose(rest + list(axes))
    group_size = int(np.prod([positions.shape[a] for a in axes], dtype=np.int64))
    return frozenset(frozenset(row) for row in moved.reshape(-1, group_size).tolist())


def _mesh_axes_of(groups: frozenset | None, positions: np.ndarray, names: tuple) -> tuple:
    if groups is None:
        return ("?",)
    if all(len(g) == 1 for g in groups):
        return ()
    candidates = [i for i in range(positions.ndim) if positions.shape[i] > 1]
    for r in range(1, len(candidates) + 1):
        for subset in itertools.combinations(candidates, r):
            induced = _axis_groups(positions, list(subset))
            if groups == induced or (all(len(g) == 2 for g in groups)
                                     and all(any(g <= h for h in induced) for g in groups)):
                return tuple(names[i] for i in subset)
    return ("?",)


def collectives(hlo_text: str, mesh_shape: dict) -> list[Collective]:
    """Every collective in ``hlo_text`` (``compiled.as_text()``), with the mesh axes it spans.

    ``mesh_shape`` maps axis name to size in mesh order (``dict(mesh.shape)``); device positions
    are the program's partition ids laid out in that shape.
    """
    computations = _computations(hlo_text)
    executions = _executions(computations)
    names = tuple(mesh_shape)
    num_devices = int(np.prod(list(mesh_shape.values())))
    positions = np.arange(num_devices).reshape(list(mesh_shape.values()))
    found = []
    for computation, body in computations.items():
        for line in body:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            axes = _mesh_axes_of(_groups(m["attrs"]), positions, names)
            shape = _done_shape(m["name"], m["op"], body) if m["start"] else m["shape"]
            for element_name, element_shape in _elements(m["name"], shape, m["op"], body):
                kind, lowered_as = m["op"], None
                if kind == "all-reduce" and _only_sliced(element_name, body, computations):
                    kind, lowered_as = "reduce-scatter", "all-reduce+dynamic-slice"
                found.append(Collective(kind=kind, axes=axes, bytes=shape_bytes(element_shape),
                                        name=element_name, computation=computation,
                                        lowered_as=lowered_as, instruction=m["name"],
                                        executions=executions.get(computation, 1)))
    return found


def collective_axes(hlo_text: str, mesh_shape: dict) -> dict[str, tuple]:
    """Each collective instruction's name -> the mesh axes it spans (``collectives``), to name the
    collectives of a profile (``analysis/profile.py``)."""
    return {c.instruction: c.axes for c in collectives(hlo_text, mesh_shape)}


def _done_shape(name: str, op: str, body: list[str]) -> str:
    """The result of an async collective: the shape of its ``-done`` op. A start op's own shape
    holds its operands too (``((operands), results)`` for all-gather and reduce-scatter, plus
    context for collective-permute), and a combined collective's results form a tuple."""
    done = re.compile(rf"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*(?P<shape>.+?)\s+{op}-done\(%{re.escape(name)}\)")
    return next(m["shape"] for m in map(done.match, body) if m)


def _computations(hlo_text: str) -> dict:
    """``{computation name: its instruction lines}``."""
    computations, current = {}, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m["name"]
            computations[current] = []
        elif current is not None:
            computations[current].append(line)
    return computations


def _executions(computations: dict) -> dict:
    """How often each computation runs per program call: a ``while`` body runs its trip count
    times per execution of its caller; anything else called (fusions, calls, reductions) runs once
    per caller execution. The trip count is XLA's ``known_trip_count`` (compiled modules); before
    optimisation it is read from the loop condition ``i < N`` (how ``lax.scan`` lowers), else 1."""
    calls = {}
    for caller, body in computations.items():
        edges = []
        for line in body:
            loop = re.search(r"\swhile\(.*body=%?([\w.\-]+)", line)
            if loop:
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
                condition = re.search(r"condition=%?([\w.\-]+)", line)
                n = int(trips[1]) if trips else _condition_bound(computations.get(condition[1], []))
                edges.append((loop[1], n))
                continue
            for group in re.findall(r"(?:calls|to_apply|branch_computations)=(\{[^}]*\}|%?[\w.\-]+)", line):
                edges.extend((callee, 1) for callee in re.findall(r"%?([\w.\-]+)", group))
        calls[caller] = edges
    callees = {callee for edges in calls.values() for callee, _ in edges}
    counts = {}

    def visit(name, times):
        counts[name] = counts.get(name, 0) + times
        for callee, trips in calls.get(name, ()):
            visit(callee, times * trips)

    for root in set(computations) - callees:
        visit(root, 1)
    return counts


def _condition_bound(condition: list[str]) -> int:
    """N of a loop condition ``compare(i, constant(N)), direction=LT`` (a counter from 0), else 1."""
    constants = dict(re.findall(r"%?([\w.\-]+)\s*=\s*s32\[\]\s+constant\((\d+)\)", "\n".join(condition)))
    for line in condition:
        m = re.search(r"compare\(%?[\w.\-]+,\s*%?([\w.\-]+)\),\s*direction=LT", line)
        if m and m[1] in constants:
            return int(constants[m[1]])
    return 1


def _elements(name: str, shape: str, op: str, body: list[str]):
    """(value name, shape) per result: a combined (tuple) all-reduce is judged element by element
    through its ``get-tuple-element`` users."""
    if op != "all-reduce" or not shape.startswith("("):
        return [(name, shape)]
    arrays = [f"{dtype}[{dims}]" for dtype, dims in _ARRAY.findall(shape)]
    out = [(f"{name}#{i}", array) for i, array in enumerate(arrays)]
    for line in body:
        g = re.match(rf"^\s*%([\w.\-]+)\s*=.*get-tuple-element\(%{re.escape(name)}\), index=(\d+)", line)
        if g and int(g[2]) < len(out):
            out[int(g[2])] = (g[1], arrays[int(g[2])])
    return out


def _only_sliced(name: str, body: list[str], computations: dict) -> bool:
    """True when every user of ``%name`` takes a per-device dynamic slice of it."""
    users = [line for line in body if re.search(rf"[(,\s]%{re.escape(name)}[,)\s]", line.split("=", 1)[-1])]
    if not users:
        return False
    for line in users:
        if " dynamic-slice(" in line:
            continue
        called = re.search(r"calls=%([\w.\-]+)", line)
        if " fusion(" in line and called and any(" dynamic-slice(" in l for l in computations.get(called[1], [])):
            continue
        return False
    return True


def per_step(found: list[Collective]) -> dict:
    """``{(kind, axes): (executions, bytes)}`` per program call, loop trip counts multiplied in."""
    out: dict = {}
    for c in found:
        count, total = out.get((c.kind, c.axes), (0, 0))
        out[(c.kind, c.axes)] = (count + c.executions, total + c.executions * c.bytes)
    return out


# ---------------------------------------------------------------------------------------------
# Census of the data movement and matmuls of a step

CENSUS_OPS = ("copy", "slice", "dynamic-slice", "dynamic-update-slice", "concatenate", "dot", "convolution", "convert")
_OPERATION = re.compile(
    r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<shape>.+?)\s+(?P<op>[a-z][\w\-]*)\((?P<operands>[^)]*)\)")
_DEFINITION = re.compile(r"^\s*(?:ROOT\s+)?%?(?P<name>[\w.\-]+)\s*=\s*(?P<dtype>[a-z]+\d*)\[(?P<dims>[\d,]*)\](?P<layout>\{[\d,]*\})?")


@dataclasses.dataclass(frozen=True)
class Operation:
    op: str  # "copy", "layout-copy" (a copy that changes the layout: a transpose), "dynamic-slice", ...
    dtypes: str  # operand element types -> result element type, e.g. "bf16,bf16->f32"
    bytes: int  # bytes moved once: the result (a slice, a copy), the update (dynamic-update-slice)
    name: str
    computation: str
    fused: bool  # inside a fusion (runs as part of one kernel) rather than a kernel of its own
    executions: int = 1


def operations(hlo_text: str, ops=CENSUS_OPS) -> list[Operation]:
    """Every ``ops`` instruction of an HLO module (``compiled.as_text()``, or the unoptimised
    ``lowered.compiler_ir("hlo").as_hlo_text()``) with its loops' trip counts multiplied in.

    Read dtypes from the unoptimised module: XLA's CPU backend computes bfloat16 dots and
    elementwise ops in float32, so its compiled text has lost them (a GPU keeps them)."""
    computations = _computations(hlo_text)
    executions = _executions(computations)
    fused = {callee for body in computations.values() for line in body if " fusion(" in line
             for callee in re.findall(r"calls=%?([\w.\-]+)", line)}
    found = []
    for computation, body in computations.items():
        defined = {}
        for line in body:
            d = _DEFINITION.match(line)
            if d:
                defined[d["name"]] = (d["dtype"], d["dims"], d["layout"])
            m = _OPERATION.match(line)
            if not m or m["op"] not in ops:
                continue
            operands = [defined.get(name) for name in re.findall(r"%?([\w.\-]+)", re.sub(r"/\*.*?\*/", "", m["operands"]))]
            op, moved = m["op"], m["shape"]
            if op == "copy" and operands[0] and d and operands[0][2] != d["layout"]:
                op = "layout-copy"
            if op == "dynamic-update-slice" and operands[1]:
                moved = "{}[{}]".format(*operands[1][:2])
            dtypes = ",".join(o[0] if o else "?" for o in operands[:2 if op in ("dot", "convolution") else 1])
            found.append(Operation(op=op, dtypes=f"{dtypes}->{d['dtype'] if d else '?'}",
                                   bytes=shape_bytes(moved), name=m["name"], computation=computation,
                                   fused=computation in fused, executions=executions.get(computation, 1)))
    return found


def census(found: list[Operation]) -> dict:
    """``{op: (executions, bytes)}`` per program call; dots and converts are also told apart by
    dtypes (``"dot bf16,bf16->f32"``)."""
    out: dict = {}
    for o in found:
        for key in {o.op, f"{o.op} {o.dtypes}"} if o.op in ("dot", "convolution", "convert") else {o.op}:
            count, total = out.get(key, (0, 0))
            out[key] = (count + o.executions, total + o.executions * o.bytes)
    return out
