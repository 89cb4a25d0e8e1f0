"""The layers of ../shared/DESIGN.md, checked on the code: core <- serving <- cloud <- commands, arrows only down,
no cycle, and a served model that needs no torch."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "bin_counter"
TOP = {"cli", "config", "tracking", "plots", "pyfunc", "__main__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def type_only(tree: ast.Module) -> set[int]:
    """The ids of the nodes under `if TYPE_CHECKING:`: imports for annotations, never run."""
    guards = [node for node in ast.walk(tree) if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING"]
    return {id(inner) for guard in guards for statement in guard.body for inner in ast.walk(statement)}


def run_time_nodes(path: Path) -> list[ast.AST]:
    """Every node of `path` that can run: at module level or inside a function, not under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    skipped = type_only(tree)
    return [node for node in ast.walk(tree) if id(node) not in skipped]


def imports_of(path: Path) -> set[str]:
    """Every bin_counter module `path` imports at run time, at module level or inside a function."""
    found = set()
    for node in run_time_nodes(path):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("bin_counter"):
            for alias in node.names:  # `from bin_counter.core import abid` imports the module bin_counter.core.abid
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists()
                          else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("bin_counter")}
    return found - {"bin_counter"}


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 else "top"


def test_the_core_imports_only_the_core():
    upward = {m: sorted(d for d in deps if layer(d) != "core") for m, deps in GRAPH.items() if layer(m) == "core"}
    assert {m: d for m, d in upward.items() if d} == {}


def test_the_serving_package_imports_only_itself_and_the_core():
    """A logged model ships the serving package: it must not need the CLI, the commands, the cloud adapters or
    the top modules (tracking, config, plots)."""
    upward = {m: sorted(d for d in deps if layer(d) not in ("core", "serving"))
              for m, deps in GRAPH.items() if layer(m) == "serving"}
    assert {m: d for m, d in upward.items() if d} == {}


def module_level_imports(path: Path) -> set[str]:
    """The top-level packages `path` imports when it is imported (not inside functions)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_a_slim_model_imports_no_torch_when_it_loads():
    from bin_counter.serving.packaging import served_modules

    heavy = {"torch", "torchvision", "efficientnet_pytorch", "efficientnet_lite_pytorch", "tqdm", "boto3"}
    shipped = {relative: module_level_imports(PACKAGE / relative) & heavy for relative in served_modules("cpu")}
    assert {r: sorted(h) for r, h in shipped.items() if h} == {}


def test_cloud_adapters_import_no_command_and_no_cli():
    upward = {m: sorted(d for d in deps if layer(d) == "commands" or d == "bin_counter.cli")
              for m, deps in GRAPH.items() if layer(m) == "cloud"}
    assert {m: d for m, d in upward.items() if d} == {}


def test_nothing_below_the_cli_imports_it_except_the_entry_points():
    users = sorted(m for m, deps in GRAPH.items() if "bin_counter.cli" in deps)
    assert users == ["bin_counter.__main__", "bin_counter.sagemaker_entry"]


def test_the_import_graph_has_no_cycle():
    state: dict[str, int] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in GRAPH.get(module, ()):
            assert state.get(dep) != 1, " -> ".join([*path, dep])
            if dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in GRAPH:
        if module not in state:
            visit(module, [module])


def test_the_package_never_imports_the_tools():
    """tools/ (the team server launcher, the sample maker) sits outside the package: the logged model and the CLI
    must work without it."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(name == "tools" or name.startswith("tools.") for name in names):
                found.setdefault(module_name(path), []).extend(names)
    assert found == {}


CORE = sorted(p for p in (PACKAGE / "core").glob("*.py"))
# what moved into the core from the commands (issue 20): the loop, its losses, the choices' table, dataset building
MOVED_IN = {"bin_counter.core.training", "bin_counter.core.losses", "bin_counter.core.choices",
            "bin_counter.core.dataset"}


def third_party_imports(path: Path) -> set[str]:
    found = set()
    for node in run_time_nodes(path):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
    return found


def test_the_modules_moved_into_the_core_are_checked_as_core():
    assert MOVED_IN <= {m for m in GRAPH if layer(m) == "core"}


def test_the_core_imports_no_mlflow():
    """The core reports through callbacks (core.training.Recorder); logging to a run is a command's."""
    users = sorted(module_name(p) for p in CORE if "mlflow" in third_party_imports(p))
    assert users == []


def test_the_core_and_its_training_loop_print_nothing():
    """The lines SageMaker reads its metrics from are the train command's (RunRecorder), not the loop's."""
    printing = {module_name(p): [node.lineno for node in run_time_nodes(p) if isinstance(node, ast.Call)
                                 and isinstance(node.func, ast.Name) and node.func.id == "print"] for p in CORE}
    assert "bin_counter.core.training" in printing
    assert {m: lines for m, lines in printing.items() if lines} == {}


def test_the_choices_table_imports_no_library():
    """config.py validates against core.choices, and the CLI builds its parser from config: no torch on the way."""
    imported = third_party_imports(PACKAGE / "core" / "choices.py") - {"__future__", "dataclasses"}
    assert imported == set()
