"""The shape that keeps the code easy to change: short functions with few parameters, imports that flow one way
(tools -> entry scripts -> engine -> model / checkpoint -> data -> utils / config -> errors) without a circle, one
home per concept."""
import ast
import glob
import os

import pytest

from conftest import ROOT

TOOLS = {"bench", "ablation", "tune"}
ENTRY_SCRIPTS = {"train", "inference", "augment_preview"}
MODULES = {os.path.splitext(os.path.basename(p))[0]: p for p in glob.glob(os.path.join(ROOT, "*.py"))}
SOURCES = sorted(MODULES.values()) + sorted(glob.glob(os.path.join(ROOT, "scripts", "*.py")))


def parse(path):
    with open(path) as f:
        return ast.parse(f.read(), path)


def functions(path):
    for node in ast.walk(parse(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def parameters(node):
    args = node.args
    names = [a.arg for a in args.posonlyargs + args.args + args.kwonlyargs]
    names += [a.arg for a in (args.vararg, args.kwarg) if a is not None]
    return [n for n in names if n not in ("self", "cls")]


def project_imports(path):
    """The repository's own modules that a file imports, at any depth (imports inside functions count too)."""
    found = set()
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: os.path.relpath(p, ROOT))
def test_functions_are_short_and_take_few_parameters(path):
    for node in functions(path):
        where = f"{os.path.relpath(path, ROOT)}:{node.lineno} {node.name}"
        assert node.end_lineno - node.lineno + 1 <= 60, f"{where} is longer than 60 lines"
        assert len(parameters(node)) <= 6, f"{where} takes {len(parameters(node))} parameters"


def test_test_functions_are_short_too():
    for path in glob.glob(os.path.join(ROOT, "tests", "*.py")):
        for node in functions(path):  # a test's parameters are its fixtures and cases: no limit on them
            assert node.end_lineno - node.lineno + 1 <= 60, f"{os.path.relpath(path, ROOT)}: {node.name}"


def test_train_main_reads_as_a_table_of_contents():
    main = next(node for node in functions(MODULES["train"]) if node.name == "main")
    assert main.end_lineno - main.lineno + 1 <= 50


def test_imports_flow_one_way():
    assert project_imports(MODULES["errors"]) == set()
    assert project_imports(MODULES["config"]) <= {"errors"}
    for name, path in MODULES.items():
        imported = project_imports(path) - {name}
        if name not in TOOLS:
            assert not imported & TOOLS, f"{name}.py imports a tool: {imported & TOOLS}"
        if name not in TOOLS | ENTRY_SCRIPTS:
            assert not imported & ENTRY_SCRIPTS, f"{name}.py imports an entry script: {imported & ENTRY_SCRIPTS}"


def import_graph():
    return {name: project_imports(path) - {name} for name, path in MODULES.items()}


def test_the_modules_import_each_other_without_a_circle():
    """Type-only imports count too: a type lives below the modules that use it."""
    graph, state, path = import_graph(), {}, []

    def visit(name):
        state[name] = "open"
        path.append(name)
        for other in sorted(graph[name]):
            assert state.get(other) != "open", " -> ".join(path[path.index(other):] + [other])
            if other not in state:
                visit(other)
        path.pop()
        state[name] = "done"
    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_only_the_tools_above_it_import_train_py_and_the_engine_has_its_users():
    graph = import_graph()
    assert {name for name, imported in graph.items() if "train" in imported} <= {"tune", "ablation"}
    assert {name for name, imported in graph.items() if "inference" in imported} <= {"ablation"}
    assert {name for name, imported in graph.items() if "engine" in imported} == {"train", "lr_finder", "bench",
                                                                                      "budget"}
    # the LR finder runs the engine's own step: it is not handed one
    find_lr = next(node for node in functions(MODULES["lr_finder"]) if node.name == "find_lr")
    assert "train_step" not in parameters(find_lr)


def test_data_sits_below_the_model():
    """The data code is handed the run's input settings as values; it never asks the model (or anything above)."""
    data = {"images", "augment", "batches", "dataset"}
    for name in data:
        assert project_imports(MODULES[name]) <= data | {"errors", "config", "utils", "distributed"}, name
    # prediction is shared below the entry scripts: inference.py, bench.py and the tests import it from here
    assert {name for name, imported in import_graph().items() if "predict" in imported} >= {"inference", "bench"}


def test_the_readme_file_map_names_every_module():
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    table = text[text.index("| file | what it holds |"):text.index("## Where to change what")]
    for name in MODULES:
        assert f"| `{name}.py` |" in table, name


def test_one_module_writes_and_reads_checkpoints():
    """torch.save and torch.load of our checkpoints happen in checkpoint.py alone."""
    for name, path in MODULES.items():
        if name in {"checkpoint"} | TOOLS:
            continue
        calls = {f"{node.func.value.id}.{node.func.attr}" for node in ast.walk(parse(path))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                 and isinstance(node.func.value, ast.Name)}
        assert not calls & {"torch.save", "torch.load"}, f"{name}.py saves or loads a checkpoint itself"


def names_used_across_modules():
    """(module, name) for every name of one of our modules that another module imports or reads as module.name."""
    used = set()
    for path in SOURCES:
        me, tree = os.path.splitext(os.path.basename(path))[0], parse(path)
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in MODULES and node.module != me:
                used |= {(node.module, a.name) for a in node.names}
            elif isinstance(node, ast.Import):
                aliases.update({a.asname or a.name: a.name for a in node.names if a.name in MODULES and a.name != me})
        used |= {(aliases[node.value.id], node.attr) for node in ast.walk(tree) if isinstance(node, ast.Attribute)
                 and isinstance(node.value, ast.Name) and node.value.id in aliases}
    return used


def test_functions_that_other_modules_call_have_type_hints():
    used = names_used_across_modules()
    bare = []
    for name, path in MODULES.items():
        for node in parse(path).body:
            if isinstance(node, ast.FunctionDef) and (name, node.name) in used:
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                if node.returns is None or any(a.annotation is None for a in args if a.arg not in ("self", "cls")):
                    bare.append(f"{name}.{node.name}")
    assert len(used) > 80 and not bare, bare
