"""How an explore report reads: text for a terminal, HTML tables for a notebook, JSON for programs,
the placement of one array over the mesh, and several layouts side by side.

Everything here works on the report's plain data (``explore.explore`` makes it), so a report
compiled in a child process shows the same. No JAX import.
"""

from __future__ import annotations

import html
import itertools
import json

from jaxlayouts.analysis.census import table_rows as census_rows
from jaxlayouts.layout import MESH_AXES, mesh_text
from jaxlayouts.units import bytes_text

GIB, MIB = 2**30, 2**20
MEMORY_ROWS = (
    ("parameters", "parameters", "parameters"),
    ("optimizer state", "optimizer", "optimizer"),
    ("gradients", None, "gradients"),
    ("activations, temporaries", "gradients_activations_temporaries", "activations"),
    ("runtime overhead", None, "overhead"),
    ("peak / total", "peak", "total"),
)
"""(row label, key in the compiled figures, key in the analytic figures); None: not reported there."""


def _gib(value) -> str:
    return "n/a" if value is None else f"{value / GIB:.4g}"


def _table_text(header: list[str], rows: list[list]) -> str:
    widths = [max(len(str(x)) for x in column) for column in zip(header, *rows)]
    line = lambda cells: "  " + "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _table_html(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def placement(entry: dict, mesh: dict) -> list[tuple[str, str]]:
    """Which devices hold which shard of one array: ``(slices, devices)`` per distinct shard.
    ``devices`` names the mesh coordinates of the sharding axes; ``*`` marks the axes the shard is
    replicated over."""
    sharded = [axis for dims in entry["spec_axes"] if dims for axis in dims]
    out = []
    for coords in itertools.product(*(range(mesh[a]) for a in sharded)):
        at = dict(zip(sharded, coords))
        slices = []
        for size, dims, shard in zip(entry["shape"], entry["spec_axes"], entry["shard_shape"]):
            index = 0
            for axis in dims or ():
                index = index * mesh[axis] + at[axis]
            slices.append(f"{index * shard}:{min((index + 1) * shard, size)}")
        devices = ", ".join(f"{a}={at[a]}" if a in at else f"{a}=*" for a in MESH_AXES if mesh.get(a, 1) > 1) or "the one device"
        out.append((f"[{', '.join(slices)}]", devices))
    return out


class Report:
    """One layout's report: ``print(r)`` or ``r.text()``; in a notebook, tables; ``r.to_dict()``,
    ``r.to_json()``; ``r.show(name)`` for one parameter or activation."""

    def __init__(self, data: dict):
        self.data = data

    def to_dict(self) -> dict:
        return self.data

    def to_json(self) -> str:
        return json.dumps(self.data)

    def __getitem__(self, key):
        return self.data[key]

    # -- the parts, as header and rows ---------------------------------------------------------

    def _arrays(self, kind: str):
        header = ["name", "logical axes", "spec", "shape", "per device", "MiB/device"]
        return header, [[e["name"], "(" + ", ".join(str(a) for a in e["logical_axes"]) + ")", e["spec"],
                         "x".join(map(str, e["shape"])), "x".join(map(str, e["shard_shape"])),
                         f"{e['bytes_per_device'] / MIB:.4g}"] for e in self.data[kind]]

    def _memory(self):
        compiled, analytic = self.data["memory"]["compiled"], self.data["memory"]["analytic"]
        rows = [[label, _gib(compiled.get(c)) if c else "(in temporaries)" if a == "gradients" else "n/a",
                 _gib(analytic.get(a))] for label, c, a in MEMORY_ROWS]
        compiler = self.data.get("compiler", "XLA").split(" (")[0]
        return ["memory per device, GiB", f"compiled ({compiler})", "analytic (plan/cost.py)"], rows

    def _collectives(self):
        return (["collective", "mesh axes", "size per device", "count per step", "bytes per step"],
                [[c["kind"], ",".join(c["axes"]), bytes_text(c["bytes"]), c["count"], bytes_text(c["bytes"] * c["count"])]
                 for c in self.data["collectives"]])

    def _census(self):
        return (["op (loop trips multiplied in)", "count per step", "bytes per step"],
                census_rows(self.data["census"]))

    def _summary(self) -> list[str]:
        d, p = self.data, self.data["predicted"]
        lines = [f"layout      {d['layout']} ({d['model']}, {d['num_devices']} devices)",
                 f"compiled    by {d.get('compiler', 'XLA')} for target {d.get('target', 'cpu')}",
                 f"model FLOPs {d['model_flops_per_step']:.4g} per step",
                 f"predicted   {p['step_time_s']:.4g} s per step, MFU {p['mfu']:.1%} on {d['hardware']} "
                 f"({'fits' if p['fits'] else 'does not fit'}; plan/cost.py)"]
        if d.get("context_parallel"):
            lines.append(f"context     {d['context_parallel']}")
        if d.get("compiled_as"):
            lines.append(f"note        {d['compiled_as']}")
        return lines

    # -- views ---------------------------------------------------------------------------------

    def text(self) -> str:
        parts = ["\n".join(self._summary()),
                 "parameters (stored, per device)\n" + _table_text(*self._arrays("params")),
                 "activations (one micro-batch, compute dtype)\n" + _table_text(*self._arrays("activations")),
                 _table_text(*self._memory()) + "\n" + "\n".join(f"  - {n}" for n in self.data["memory"]["notes"]),
                 "collectives per step (compiled HLO)\n" + _table_text(*self._collectives())]
        if self.data.get("census"):
            parts.append("census of the compiled program\n" + _table_text(*self._census()))
        return "\n\n".join(parts)

    __str__ = text

    def _repr_html_(self) -> str:
        summary = "<br>".join(html.escape(line) for line in self._summary())
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.data["memory"]["notes"])
        census = (f"<h4>Census of the compiled program</h4>{_table_html(*self._census())}"
                  if self.data.get("census") else "")
        return (f"<div><p><tt>{summary}</tt></p><h4>Parameters (stored, per device)</h4>"
                f"{_table_html(*self._arrays('params'))}<h4>Activations (one micro-batch)</h4>"
                f"{_table_html(*self._arrays('activations'))}<h4>Memory per device</h4>"
                f"{_table_html(*self._memory())}<ul>{notes}</ul><h4>Collectives per step</h4>"
                f"{_table_html(*self._collectives())}{census}</div>")

    def show(self, name: str, limit: int = 32) -> None:
        """Print :meth:`placement_text` (returns nothing, so a notebook shows it once)."""
        print(self.placement_text(name, limit))

    def placement_text(self, name: str, limit: int = 32) -> str:
        """How one parameter or activation is laid out over the mesh: each distinct shard, its
        index ranges, and the devices that hold it."""
        entries = {e["name"]: e for e in self.data["params"] + self.data["activations"]}
        if name not in entries:
            raise KeyError(f"{name!r} is not a parameter or activation of this report; choose one of "
                           f"{', '.join(entries)}")
        entry, mesh = entries[name], self.data["mesh"]
        shards = placement(entry, mesh)
        replicas = self.data["num_devices"] // len(shards)
        lines = [f"{name} {'x'.join(map(str, entry['shape']))} {entry['dtype']}, spec {entry['spec']} over "
                 f"{mesh_text(mesh)}: {len(shards)} distinct shard(s) of "
                 f"{'x'.join(map(str, entry['shard_shape']))}, each on {replicas} device(s)"]
        lines += [f"  {slices:<40} on {where}" for slices, where in shards[:limit]]
        if len(shards) > limit:
            lines.append(f"  ... and {len(shards) - limit} more")
        return "\n".join(lines)


class Comparison:
    """Several reports side by side: ``c.rows`` (one dict per layout), ``print(c)``, tables in a
    notebook, and ``c.figure`` (memory, collective bytes by axis, predicted MFU)."""

    def __init__(self, reports: list[Report]):
        self.reports = reports
        self.axes = sorted({",".join(c["axes"]) for r in reports for c in r["collectives"]})
        self.rows = [{"layout": r["layout"], "compiled_peak_gib": r["memory"]["compiled"]["peak"] / GIB,
                      "analytic_total_gib": r["memory"]["analytic"]["total"] / GIB,
                      **{f"collective_gib[{axes}]": sum(c["bytes"] * c["count"] for c in r["collectives"]
                                                        if ",".join(c["axes"]) == axes) / GIB for axes in self.axes},
                      "predicted_step_time_s": r["predicted"]["step_time_s"], "predicted_mfu": r["predicted"]["mfu"]}
                     for r in reports]
        self._figure = None

    def _table(self):
        """``rows`` for people: sizes in binary units, MFU as a percentage."""
        cell = lambda k, v: (v if isinstance(v, str) else bytes_text(v * GIB) if "_gib" in k
                             else f"{v:.1%}" if k.endswith("mfu") else f"{v:.4g}")
        header = [k.replace("_gib", "") for k in self.rows[0]]
        return header, [[cell(k, v) for k, v in row.items()] for row in self.rows]

    def text(self) -> str:
        return _table_text(*self._table())

    __str__ = text

    def _repr_html_(self) -> str:
        return _table_html(*self._table())

    def to_dict(self) -> dict:
        return {"rows": self.rows, "reports": [r.to_dict() for r in self.reports]}

    @property
    def figure(self):
        """A matplotlib figure: compiled memory, collective GiB per step by mesh axes, predicted MFU."""
        if self._figure is None:
            import matplotlib.pyplot as plt  # only when a figure is asked for
            fig, axes = plt.subplots(1, 3, figsize=(15, 5.5))
            plt.close(fig)  # shown once in a notebook, as this value, not also as pyplot's open figure
            names = [f"#{i + 1}" for i in range(len(self.rows))]
            axes[0].bar(names, [r["compiled_peak_gib"] for r in self.rows])
            axes[0].set_title("compiled peak per device (GiB)")
            bottom = [0.0] * len(self.rows)
            for ax_name in self.axes:
                values = [r[f"collective_gib[{ax_name}]"] for r in self.rows]
                axes[1].bar(names, values, bottom=bottom, label=ax_name)
                bottom = [b + v for b, v in zip(bottom, values)]
            axes[1].set_title("collectives per step per device (GiB)")
            axes[1].legend(title="mesh axes", fontsize=11, title_fontsize=11)
            axes[2].bar(names, [100 * r["predicted_mfu"] for r in self.rows])
            axes[2].set_title("predicted MFU (%)")
            for ax in axes:
                ax.tick_params(labelsize=11)
            fig.text(0.01, 0.01, "\n".join(f"{n}: {r['layout']}" for n, r in zip(names, self.rows)), fontsize=10,
                     family="monospace", va="bottom")
            fig.tight_layout(rect=(0, 0.045 * len(self.rows), 1, 1))
            self._figure = fig
        return self._figure
