"""The package's layers (docs/design.md §2): every import, at module level or inside a function,
runs down the layer table or stays within its own layer, never up."""
import ast
import os

import pytest

import courier_fast
import courier_fast.kernels

# Lowest first. A module may import from its own layer and the layers below it. The longest
# matching prefix names a module's layer; `courier_fast` alone is the package's facade
# (__init__.py: the public names), which sits on top with the CLI.
LAYERS = [
    ("base", ["courier_fast._C", "courier_fast._extension", "courier_fast._validate", "courier_fast._metadata",
              "courier_fast.atomic"]),
    ("data", ["courier_fast.data"]),
    ("ops core", ["courier_fast.ops.reference", "courier_fast.ops.jagged", "courier_fast.ops.attention_layout",
                  "courier_fast.ops.row_norms"]),
    ("kernels", ["courier_fast.kernels"]),
    ("backends", ["courier_fast.ops.backends"]),
    ("ops", ["courier_fast.ops"]),
    ("selfcheck", ["courier_fast.ops.selfcheck"]),
    ("nn", ["courier_fast.nn"]),
    ("models", ["courier_fast.models"]),
    ("training", ["courier_fast.training"]),
    ("pipeline", ["courier_fast.pipeline"]),
    ("app", ["courier_fast", "courier_fast.cli", "courier_fast.__main__", "courier_fast.info"]),
]
RANK = {prefix: rank for rank, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes}


def layer_of(module):
    """(rank, layer name) of a dotted module name under courier_fast."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in RANK:
            return RANK[prefix], LAYERS[RANK[prefix]][0]
    raise AssertionError(f"{module} is in no layer of the table: add it to LAYERS")


def package_modules():
    """(dotted name, path) of every module of the package, kernels/ as courier_fast.kernels."""
    roots = [(os.path.dirname(courier_fast.__file__), "courier_fast"),
             (os.path.dirname(courier_fast.kernels.__file__), "courier_fast.kernels")]
    for root, dotted in roots:
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d != "__pycache__" and not os.path.islink(os.path.join(folder, d))]
            rel = os.path.relpath(folder, root)
            base = dotted if rel == "." else dotted + "." + rel.replace(os.sep, ".")
            for f in files:
                if f.endswith(".py"):
                    yield (base if f == "__init__.py" else f"{base}.{f[:-3]}"), os.path.join(folder, f)


def imported_modules(path):
    """(line, dotted name) of every courier_fast module a file imports, wherever the import is."""
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "courier_fast":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "courier_fast":
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                yield node.lineno, f"{node.module}.{alias.name}" if _is_module(f"{node.module}.{alias.name}") else node.module


def _is_module(dotted):
    import importlib.util

    try:
        return importlib.util.find_spec(dotted) is not None
    except (ImportError, ValueError):
        return False


def test_every_import_runs_down_the_layers():
    upward = []
    for module, path in package_modules():
        rank, name = layer_of(module)
        for line, target in imported_modules(path):
            t_rank, t_name = layer_of(target)
            if t_rank > rank:
                upward.append(f"{os.path.relpath(path)}:{line} {module} ({name}) imports {target} ({t_name})")
    assert not upward, "imports that run up the layers:\n" + "\n".join(upward)


def test_the_check_sees_an_upward_import(tmp_path):
    """The walk would catch a violation: a synthetic ops-core module importing the pipeline."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from courier_fast.pipeline import demo\n")
    (line, target), = imported_modules(str(bad))
    assert line == 2 and layer_of(target)[0] > layer_of("courier_fast.ops.reference")[0]


@pytest.mark.parametrize("module", ["courier_fast.ops.reference", "courier_fast.nn.loss", "courier_fast.training.loop",
                                    "courier_fast.kernels.contrastive_lse", "courier_fast.data.loader"])
def test_known_modules_have_a_layer(module):
    assert layer_of(module)[1] != "app"
