"""The call list `tests/gpu_sanitize.sh` runs under compute-sanitizer (`tests/sanitize_calls.py`), run here
as plain tests: under the interpreter on the CPU, and on a GPU with the `gpu` tests."""
import pytest
import torch

from numerics import DEVICES
from sanitize_calls import CALLS, runnable


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(CALLS))
def test_sanitizer_call(device, name):
    if not runnable(name, device):
        pytest.skip("the TMA kernel runs on Hopper")
    CALLS[name](device)
    if device == "cuda":
        torch.cuda.synchronize()


def test_every_kernel_is_in_the_list():
    names = " ".join(CALLS)
    for kernel in ("pointer", "splitk", "tma", "dgelu", "fp8 quantize", "fp8 scale update", "e5m2"):
        assert kernel in names, kernel
