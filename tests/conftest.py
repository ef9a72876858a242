import os
import sys
import types

import pytest
import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    # Without a GPU the kernels can only run under the interpreter, which triton reads as it decorates
    # them; the README's command sets it too.
    if "triton" in sys.modules:
        raise RuntimeError("set TRITON_INTERPRET=1 before triton is imported: TRITON_INTERPRET=1 pytest tests")
    os.environ["TRITON_INTERPRET"] = "1"


# How many tests `pytest tests -m gpu` collects: the GPU suite's size, stated once and checked on the CPU
# (test_suite.py), so that a change adding GPU cases says so, and the GPU run's time stays in view.
GPU_TESTS = 450


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _unbound_launches():
    """Every test starts and ends with no bound launches (`bound.BOUND`): one bound in another test, or
    around a patched kernel, would skip the path a test means to check."""
    from tpkernels import bound

    bound.BOUND.clear()
    yield
    bound.BOUND.clear()


@pytest.fixture
def monkeypatch(monkeypatch):
    """pytest's monkeypatch, except that patching a tpkernels module's name that no tpkernels code reads
    through that module fails the test (`patching.looked_up`): such a patch would change nothing."""
    from patching import looked_up

    setattr_ = monkeypatch.setattr

    def checked_setattr(target, name, *args, **kwargs):
        if isinstance(target, types.ModuleType) and target.__name__.startswith("tpkernels") \
                and not looked_up(target, name):
            pytest.fail(f"monkeypatch.setattr({target.__name__}, {name!r}, ...) changes nothing: no tpkernels code "
                        f"reads {name} through {target.__name__}; patch the module whose code looks it up")
        from tpkernels import bound

        bound.BOUND.clear()  # a launch bound before the patch would not see it
        return setattr_(target, name, *args, **kwargs)

    monkeypatch.setattr = checked_setattr
    return monkeypatch
