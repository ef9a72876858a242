"""The kernel calls `tests/gpu_sanitize.sh` runs under compute-sanitizer: every kernel (pointer, persistent
TMA, split-K, the dGELU pass, the fp8 quantize and scale update), every epilogue (bias, exact and tanh
GELU, the stored pre-activation, the residual, fp32 output, dGELU, the fp8 scales, quantized output and
amax), edge tiles (M, N, K multiples of no tile) and strided views, each on a pinned small config and
checked against fp64 by the 2x-eager rule, so a call that reads or writes out of bounds shows both in
the sanitizer and in its result.

    python tests/sanitize_calls.py                 # every call, on CUDA (what the sanitizer wraps)
    python tests/sanitize_calls.py --only splitk   # the calls whose name holds "splitk"

`tests/test_sanitize_calls.py` runs the same list under the interpreter on the CPU (the TMA call needs
Hopper and is skipped elsewhere on a GPU).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from numerics import assert_close_to_ref, matmul_reference, randn  # noqa: E402
from tpkernels import MatmulConfig, fp8, launch, pin_config, reference  # noqa: E402
from tpkernels.kernels import GELU, GELU_TANH  # noqa: E402

# A tile no test shape divides; the TMA kernel needs 16-byte rows and takes 16-row K tiles.
CONFIG = MatmulConfig(32, 32, 32, group_m=2, num_stages=2, epilogue_subtile=2)
TMA_CONFIG = MatmulConfig(32, 32, 16, group_m=2, num_stages=2, epilogue_subtile=2)
M, K, N = 37, 70, 45


def _operands(kernel, device, dtype, m):
    """a [m, K] and b = w.T [K, N] as the forward reads it. a is a strided view (every other column of a
    wider tensor) except for the TMA kernel, whose descriptors need unit inner strides and 16-byte rows
    (K = 72, N = 48 there: still no multiple of its tiles)."""
    if kernel == "tma":
        return (randn(m, 72, dtype=dtype, device=device),
                randn(48, 72, dtype=dtype, device=device, scale=72 ** -0.5).t())
    a = randn(m, 2 * K, dtype=dtype, device=device)[:, ::2]
    return a, randn(N, K, dtype=dtype, device=device, scale=K ** -0.5).t()


def _matmul_case(kernel, case, device, dtype=torch.float16, m=M):
    a, b = _operands(kernel, device, dtype, m)
    n = b.shape[1]
    extra = dict(case)
    out_dtype = extra.pop("out_dtype", dtype)
    if extra.pop("bias", False):
        extra["bias"] = randn(n, dtype=dtype, device=device)
    if extra.pop("residual", False):
        extra["residual"] = randn(m, n, dtype=out_dtype, device=device)
    if extra.get("grad_activation"):
        extra["z"] = randn(m, n, dtype=dtype, device=device, scale=2.0)
    preact = torch.full((m, n), float("nan"), dtype=dtype, device=device) if extra.pop("preact", False) else None
    c = torch.full((m, n), float("nan"), dtype=out_dtype, device=device)
    config = TMA_CONFIG if kernel == "tma" else CONFIG
    with launch.use_matmul_kernel(kernel), pin_config(config), launch.record_launches() as launches:
        launch.matmul(a, b, c, preact=preact, **extra)
    assert launches and launches[0].split()[0] == kernel, launches
    ref, ref_pre = matmul_reference(a, b, **extra)
    eager, eager_pre = matmul_reference(a, b, **extra, dtype=dtype)
    assert_close_to_ref(c, eager.to(out_dtype), ref.to(torch.float64))
    if preact is not None:
        assert_close_to_ref(preact, eager_pre, ref_pre, "preact")


def _dgelu(device):
    dy = randn(M, N, dtype=torch.float16, device=device)
    z = randn(M, N, dtype=torch.float16, device=device, scale=2.0)
    dz, db = launch.dgelu(dy, z, GELU, True)
    ref = torch.ops.aten.gelu_backward(dy.double(), z.double())
    eager = torch.ops.aten.gelu_backward(dy, z)
    assert_close_to_ref(dz, eager, ref)
    assert_close_to_ref(db.to(torch.float16), eager.float().sum(0).to(torch.float16), ref.sum(0), "db")


def _fp8_quantize(device):
    x = randn(M, 2 * N, device=device)[:, ::2] * 30
    amax = torch.zeros(1, device=device)
    q = fp8.quantize(x, torch.tensor([2.0], device=device), amax)
    expected = reference.fp8_quantize(x, torch.tensor([2.0], device=device))
    assert torch.equal(q.view(torch.uint8), expected.view(torch.uint8)) and amax.item() == x.abs().max().item()


def _fp8_epilogue(kernel, device, m=M):
    x, w = randn(m, K, device=device), randn(N, K, device=device, scale=K ** -0.5)
    x_scale, w_scale = (torch.tensor([448 / t.abs().max().item()], device=device) for t in (x, w))
    x_q, w_q = reference.fp8_quantize(x, x_scale), reference.fp8_quantize(w, w_scale)
    bias = randn(N, device=device)
    out = torch.full((m, N), float("nan"), device=device).to(torch.float8_e4m3fn)
    out_scale, amax = torch.tensor([3.0], device=device), torch.zeros(1, device=device)
    with launch.use_matmul_kernel(kernel), pin_config(CONFIG):
        launch.linear(x_q, w_q, out, bias=bias, activation=GELU_TANH, scales=(1 / x_scale, 1 / w_scale, out_scale, amax))
    eager, _, eager_amax = reference.fp8_linear(x_q, 1 / x_scale, w_q, 1 / w_scale, bias, GELU_TANH,
                                                torch.float8_e4m3fn, out_scale)
    z = (x_q.double() / x_scale.double()) @ (w_q.double() / w_scale.double()).t() + bias.double()
    exact = reference.activation(z, GELU_TANH).clamp(-448 / 3, 448 / 3)
    assert_close_to_ref(out.float() / 3, eager.float() / 3, exact)
    torch.testing.assert_close(amax, eager_amax.reshape(1), rtol=1e-5, atol=0)


def _fp8_mixed_dgrad(device):
    # e5m2 gradients times a K-major e4m3 weight, with the dGELU epilogue: the fp8 backward's GEMM
    dy, w = randn(M, N, device=device), randn(N, K, device=device, scale=N ** -0.5)
    dy_q, w_q = reference.fp8_quantize(dy, torch.ones(1, device=device), torch.float8_e5m2), \
        reference.fp8_quantize(w.t().contiguous(), torch.ones(1, device=device))
    z = randn(M, K, dtype=torch.float16, device=device, scale=2.0)
    dz = torch.full((M, K), float("nan"), dtype=torch.float16, device=device)
    one = torch.ones(1, device=device)
    with launch.use_matmul_kernel("pointer"), pin_config(CONFIG):
        launch.matmul(dy_q, w_q.t(), dz, z=z, grad_activation=GELU, scales=(one, one, None, None))
    exact = torch.ops.aten.gelu_backward(dy_q.double() @ w_q.t().double(), z.double())
    eager = torch.ops.aten.gelu_backward((dy_q.float() @ w_q.t().float()), z.float()).to(torch.float16)
    assert_close_to_ref(dz, eager, exact)


def _fp8_scale_update(device):
    scaling = fp8.FP8Scaling(fp8.FP8Recipe(amax_history_len=5), fp8.MLP_TENSORS, device)
    scaling.amax_history.copy_(torch.rand(5, 4, device=device) + 0.5)
    expected = scaling.fmax / scaling.amax_history.amax(0)
    scaling.update(torch.device(device))
    torch.testing.assert_close(scaling.scale, expected)
    assert not scaling.amax_history[0].any()


CALLS = {
    "pointer forward: bias, exact GELU, stored pre-activation": lambda d: _matmul_case(
        "pointer", dict(bias=True, activation=GELU, preact=True), d),
    "pointer row stage: bias, residual, fp32 out": lambda d: _matmul_case(
        "pointer", dict(bias=True, residual=True, out_dtype=torch.float32), d),
    "pointer dGELU epilogue (tanh)": lambda d: _matmul_case("pointer", dict(grad_activation=GELU_TANH), d),
    "splitk forward: bias, tanh GELU, residual": lambda d: _matmul_case(
        "splitk", dict(bias=True, activation=GELU_TANH, residual=True), d, m=3),
    "splitk dGELU epilogue, fp32 out": lambda d: _matmul_case(
        "splitk", dict(grad_activation=GELU, out_dtype=torch.float32), d, m=5),
    "tma forward: bias, exact GELU, stored pre-activation, residual": lambda d: _matmul_case(
        "tma", dict(bias=True, activation=GELU, preact=True, residual=True), d, dtype=torch.bfloat16
        if d == "cuda" else torch.float16),
    "tma dGELU epilogue": lambda d: _matmul_case("tma", dict(grad_activation=GELU), d),
    "dgelu pass with db": _dgelu,
    "fp8 quantize with amax": _fp8_quantize,
    "fp8 pointer epilogue: scales, bias, GELU, amax, e4m3 store": lambda d: _fp8_epilogue("pointer", d),
    "fp8 splitk epilogue: scales, bias, GELU, amax, e4m3 store": lambda d: _fp8_epilogue("splitk", d, m=4),
    "fp8 e5m2 x e4m3 dgrad with the dGELU epilogue": _fp8_mixed_dgrad,
    "fp8 scale update": _fp8_scale_update,
}


def runnable(name, device):
    """Whether the call can run here: the TMA kernel needs Hopper on a GPU (the interpreter runs it)."""
    return "tma" not in name or device == "cpu" or torch.cuda.get_device_capability()[0] == 9


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="run the calls whose name holds this text")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    names = [name for name in CALLS if args.only is None or args.only in name]
    for name in names:
        if not runnable(name, "cuda"):
            print(f"skipped (needs Hopper): {name}", flush=True)
            continue
        CALLS[name]("cuda")
        torch.cuda.synchronize()
        print(f"ok: {name}", flush=True)
    print(f"{len(names)} calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
