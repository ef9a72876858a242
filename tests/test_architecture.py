"""The layers of docs/ARCHITECTURE.md, checked: each tpkernels module imports only from its own layer or the
layers below, and each says its job in the first line of its docstring."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "tpkernels"

# (layer, module name prefixes), bottom up, as docs/ARCHITECTURE.md's table; a module may import its own
# layer's and the layers' below.
LAYERS = [
    ("kernels", ["kernels"]),
    ("leaves, native and settings", ["_C", "extension", "settings", "tables", "reference", "perfmodel",
                                     "initialization"]),
    ("launch", ["autotune", "workspace", "bound", "launch"]),
    ("ops and distributed", ["custom_ops", "custom_ops_gated", "custom_ops_fp8", "ops", "distributed",
                             "sequence_parallel", "dtensor", "overlap", "fp8"]),
    ("modules", ["nn"]),
    ("model surgery and checkpoints", ["parallelize", "checkpoint", "checkpoint_files"]),
    ("demo and the package's front", ["demo", "__main__", ""]),
]


def _layer(module):
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or (p and module.startswith(p + ".")) for p in prefixes):
            return index
    raise AssertionError(f"tpkernels.{module} is in no layer of tests/test_architecture.py (and ARCHITECTURE.md)")


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path


def _imports(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "tpkernels":
            if node.module == "tpkernels":
                yield from (alias.name for alias in node.names)
            else:
                yield node.module[len("tpkernels."):]
        elif isinstance(node, ast.Import):
            yield from (a.name[len("tpkernels."):] for a in node.names if a.name.startswith("tpkernels."))


@pytest.mark.parametrize("module, path", list(_modules()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_a_module_imports_only_its_layer_and_below(module, path):
    tree = ast.parse(path.read_text())
    mine = _layer(module)
    above = {name: LAYERS[_layer(name)][0] for name in _imports(tree) if _layer(name) > mine}
    assert not above, f"tpkernels.{module} ({LAYERS[mine][0]}) imports from layers above it: {above}"
    docstring = ast.get_docstring(tree)
    assert docstring and docstring.splitlines()[0].strip(), f"tpkernels.{module}: no docstring saying its job"


def test_the_layers_cover_every_module():
    assert len(list(_modules())) > 30
    for module, _ in _modules():
        _layer(module)
