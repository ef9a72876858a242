import os
import sys

import pytest
import torch

if not torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ:
    # Without a GPU the kernels can only run under the interpreter, which triton reads as it decorates
    # them; the README's command sets it too.
    if "triton" in sys.modules:
        raise RuntimeError("set TRITON_INTERPRET=1 before triton is imported: TRITON_INTERPRET=1 pytest tests")
    os.environ["TRITON_INTERPRET"] = "1"


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
