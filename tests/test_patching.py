"""The check behind conftest.py's monkeypatch: a patch of a name no code reads through its module fails."""
import pytest

from patching import looked_up
from tpkernels import custom_ops, extension, launch, ops
from tpkernels.nn import linear as nn_linear


def test_reads_through_a_module_are_found():
    assert looked_up(launch, "matmul")  # custom_ops calls launch.matmul
    assert looked_up(launch, "INT32_LIMIT")  # a global of launch's own functions
    assert looked_up(extension, "has")  # ops calls extension.has
    assert looked_up(custom_ops, "fused_linear_inference")
    assert looked_up(nn_linear, "linear_gelu")  # the column layer's own binding, imported from ops


def test_a_patch_that_changes_nothing_fails(monkeypatch):
    # nn.linear imported linear_gelu from ops: patching ops' binding leaves the modules' calls as they were
    assert not looked_up(ops, "linear_gelu")
    with pytest.raises(pytest.fail.Exception, match="changes nothing"):
        monkeypatch.setattr(ops, "linear_gelu", lambda *a, **k: None)
    assert ops.linear_gelu.__name__ == "linear_gelu"
    monkeypatch.setattr(nn_linear, "linear_gelu", lambda *a, **k: None)  # the binding the layer's code reads
