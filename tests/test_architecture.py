"""The package's floor order: every module imports only modules on floors below its own, so
layers only run downward (no import circle, and no lower layer that changes when a tool above it
does). Imports are read with ``ast``, function-level ones included; nothing is imported."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "jaxlayouts"

FLOORS = (
    # 0. Leaves: they import nothing of the package.
    ("", "analysis", "analysis.hlo", "analysis.memory", "analysis.profile", "choices", "data", "devices", "kernels",
     "kernels.triton_versions", "kernels.tuning", "model", "model.axes", "model.matmul", "parallel",
     "parallel.schedule", "peers", "plan", "remat", "schema", "timing", "units"),
    # 1. Records: layouts and their validation, result files, the kernels.
    ("analysis.census", "ceilings", "kernels.flash_attention", "kernels.rms_norm", "layout", "results"),
    # 2. What a layout implies: flags, FLOPs, processes; kernels built on kernels; ring attention.
    ("checkpoint", "config", "distributed", "explore_view", "flops", "kernels.rms_norm_triton", "kernels.tune",
     "model.ring_attention"),
    # 3. Meshes and their rules, launchers, hardware.
    ("launch", "mesh", "peers.torch_llama", "plan.hardware"),
    # 4. The model's layers; the cost model; sweeps and compile targets.
    ("model.attention", "model.norm", "plan.cost", "sweep", "targets"),
    # 5. The model; what reads the cost model; tools over one kernel or a sweep.
    ("gpu_check", "kernel_bench", "model.llama", "plan.memcheck", "plan.search", "plan.study"),
    # 6. The pipeline executor; the planner's validation against measurements.
    ("parallel.pipeline", "plan.validate"),
    # 7. The training step; the report over sweeps and studies.
    ("report", "train"),
    # 8. What compiles or runs the step.
    ("analysis.compiled", "bench"),
    # 9. Tools over compiled steps and the planner.
    ("explore", "gpu_info", "plan.grid", "target_check"),
    # 10. The planner's command line.
    ("plan.__main__",),
)


def modules() -> dict[str, pathlib.Path]:
    """Every module of the package by dotted name below ``jaxlayouts`` (a package by its own name)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, source: str, known) -> set[str]:
    """The package's modules that ``source`` (module ``name``) imports anywhere in it: ``from
    jaxlayouts.x import y`` counts as ``x.y`` when that is a module, else as ``x``."""
    def module_of(dotted: str) -> str:
        while dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted

    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            assert not node.level, f"{name}: the package imports by absolute names"
            if node.module.split(".")[0] == "jaxlayouts":
                stem = node.module.removeprefix("jaxlayouts").lstrip(".")
                found |= {module_of(f"{stem}.{a.name}".lstrip(".")) for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {module_of(a.name.removeprefix("jaxlayouts").lstrip("."))
                      for a in node.names if a.name.split(".")[0] == "jaxlayouts"}
    return found - {name}


def upward_imports(sources: dict[str, str], floors=FLOORS) -> list[str]:
    """Each import of a module on the importer's floor or above, as ``importer (floor) -> module (floor)``."""
    floor = {m: i for i, names in enumerate(floors) for m in names}
    return [f"{name} ({floor[name]}) -> {target} ({floor[target]})"
            for name, source in sorted(sources.items()) for target in sorted(imports(name, source, floor))
            if floor[target] >= floor[name]]


def test_every_module_has_one_floor():
    listed = [m for names in FLOORS for m in names]
    assert len(listed) == len(set(listed))
    assert sorted(listed) == sorted(modules())


def test_no_module_imports_one_on_its_floor_or_above():
    sources = {name: path.read_text() for name, path in modules().items()}
    assert upward_imports(sources) == []


def test_an_upward_import_is_caught():
    """The check reads function-level and ``import jaxlayouts.x`` imports too, and same-floor ones."""
    sources = {"model.ring_attention": "def f():\n    from jaxlayouts.parallel.pipeline import Pipeline\n",
               "layout": "import jaxlayouts.train\nfrom jaxlayouts import schema, results\n"}
    assert upward_imports(sources) == ["layout (1) -> results (1)", "layout (1) -> train (7)",
                                       "model.ring_attention (2) -> parallel.pipeline (6)"]
