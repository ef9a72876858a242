"""The Triton code itself: GELU as `tl` functions, and every prologue / epilogue of the matmul kernel,
launched through `ops._launch` with pinned configs into poisoned outputs."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from numerics import DEVICES, assert_close_to_ref, randn
from tpkernels import MatmulConfig, ops, pin_config
from tpkernels.kernels import GELU, GELU_TANH, GPU_CONFIGS, IDENTITY, INTERPRETER_CONFIG, matmul

CONFIGS = [
    INTERPRETER_CONFIG,
    MatmulConfig(16, 16, 16, group_m=1),
    MatmulConfig(64, 32, 16, group_m=2),
]


@triton.jit
def _elementwise_kernel(x_ptr, y_ptr, dy_ptr, n, ACTIVATION: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(y_ptr + offs, matmul._activation(x, ACTIVATION), mask=mask)
    tl.store(dy_ptr + offs, matmul._activation_grad(x, ACTIVATION), mask=mask)


def _gelu_values(device):
    special = [0.0, -0.0, 1e-6, -1e-6, 3.0, -3.0, 30.0, -30.0, 1e4, -1e4, 1e15, -1e15, float("inf"), float("-inf")]
    special.append(float("nan"))
    return torch.cat([torch.linspace(-12, 12, 1001, dtype=torch.float64), torch.tensor(special, dtype=torch.float64)]).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_its_derivative_match_fp64(device, approximate):
    x64 = _gelu_values(device).requires_grad_()
    ref = F.gelu(x64, approximate=approximate)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64)
    x = x64.detach().float()
    eager = F.gelu(x.clone().requires_grad_(), approximate=approximate)
    y, dy = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    code = GELU if approximate == "none" else GELU_TANH
    _elementwise_kernel[(triton.cdiv(x.numel(), 256),)](x, y, dy, x.numel(), ACTIVATION=code, BLOCK=256)
    assert_close_to_ref(y, eager.detach(), ref, "gelu")
    # Eager's fp32 derivative is NaN at +-1e15 for tanh (x**2 overflows in its formula), so compare the
    # derivative with the fp64 one directly, and demand that it never invents a NaN.
    finite = ref_grad.isfinite()
    assert torch.equal(dy.isnan(), ~finite)
    assert (dy[finite].double() - ref_grad[finite]).abs().max().item() < 1e-5


def _run(a, b, *, device, out_dtype=None, bias=None, residual=None, activation=IDENTITY, store_preact=False,
         z=None, grad_activation=IDENTITY, rowsum=False):
    M, N = a.shape[0], b.shape[1]
    out_dtype = out_dtype or b.dtype
    c = torch.full((M, N), float("nan"), dtype=out_dtype, device=device)
    preact = torch.full((M, N), float("nan"), dtype=b.dtype, device=device) if store_preact else None
    sums = torch.full((M,), float("nan"), dtype=torch.float32, device=device) if rowsum else None
    ops._launch(a, b, c, bias=bias, residual=residual, preact=preact, z=z, rowsum=sums,
                activation=activation, grad_activation=grad_activation)
    return c, preact, sums


def _reference(a, b, *, bias=None, residual=None, activation=IDENTITY, z=None, grad_activation=IDENTITY,
               dtype=torch.float64, out_dtype=None):
    """The same math in eager, in `dtype` (fp64 for the reference, the operands' dtype for eager)."""
    a = a.to(dtype)
    if grad_activation != IDENTITY:
        a = torch.ops.aten.gelu_backward(
            a, z.to(dtype), approximate="tanh" if grad_activation == GELU_TANH else "none"
        )
    sums = a.double().sum(1)
    pre = a @ b.to(dtype)
    if bias is not None:
        pre = pre + bias.to(dtype)
    out = pre if activation == IDENTITY else F.gelu(pre, approximate="tanh" if activation == GELU_TANH else "none")
    if residual is not None:
        out = out + residual.to(dtype)
    return out.to(out_dtype or dtype), pre, sums


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (37, 50, 45), (70, 9, 33), (5, 100, 3)])
def test_forward_epilogues(device, config, dtype, M, K, N):
    a = randn(M, K, dtype=dtype, device=device)
    b = randn(N, K, dtype=dtype, device=device, scale=K**-0.5).t()  # w.T, a strided view
    bias = randn(N, dtype=dtype, device=device)
    residual = randn(M, N, dtype=dtype, device=device)
    with pin_config(config):
        for activation in (IDENTITY, GELU, GELU_TANH):
            c, pre, _ = _run(a, b, device=device, bias=bias, residual=residual, activation=activation,
                             store_preact=True)
            ref_c, ref_pre, _ = _reference(a, b, bias=bias, residual=residual, activation=activation)
            eager_c, eager_pre, _ = _reference(a, b, bias=bias, residual=residual, activation=activation,
                                               dtype=dtype)
            assert_close_to_ref(c, eager_c, ref_c, f"out (activation {activation})")
            assert_close_to_ref(pre, eager_pre, ref_pre, "preact")
        # fp32 partials without bias: accumulated in fp32 and never rounded to the operands' dtype.
        c, _, _ = _run(a, b, device=device, out_dtype=torch.float32)
        ref_c, _, _ = _reference(a, b)
        eager_c, _, _ = _reference(a, b, dtype=torch.float32)
        assert_close_to_ref(c, eager_c, ref_c, "fp32 partial")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grad_activation", [IDENTITY, GELU, GELU_TANH])
def test_backward_prologue_and_row_sums(device, config, dtype, grad_activation):
    M, N, K = 45, 38, 29
    dy = randn(M, N, dtype=dtype, device=device)
    z = randn(M, N, dtype=dtype, device=device, scale=2.0)
    w = randn(N, K, dtype=dtype, device=device)
    x = randn(M, K, dtype=dtype, device=device)
    with pin_config(config):
        # dX = (dY * act'(z)) @ W
        dx, _, _ = _run(dy, w, device=device, z=z, grad_activation=grad_activation)
        ref, _, _ = _reference(dy, w, z=z, grad_activation=grad_activation)
        eager, _, _ = _reference(dy, w, z=z, grad_activation=grad_activation, dtype=dtype)
        assert_close_to_ref(dx, eager, ref, "dX")
        # dW = (dY * act'(z)).T @ X, with db the row sums of the transposed A
        dw, _, db = _run(dy.t(), x, device=device, z=z.t(), grad_activation=grad_activation, rowsum=True)
        ref, _, ref_db = _reference(dy.t(), x, z=z.t(), grad_activation=grad_activation)
        eager, _, eager_db = _reference(dy.t(), x, z=z.t(), grad_activation=grad_activation, dtype=dtype)
        assert_close_to_ref(dw, eager, ref, "dW")
        assert_close_to_ref(db, eager_db.float(), ref_db, "db")


@pytest.mark.parametrize("device", DEVICES)
def test_row_sums_are_written_when_the_output_has_no_columns(device):
    a = randn(20, 7, device=device)
    b = randn(7, 0, device=device)
    _, _, sums = _run(a, b, device=device, rowsum=True)
    torch.testing.assert_close(sums.double(), a.double().sum(1))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_reduction_gives_the_epilogue_of_zero(device):
    a = randn(9, 0, device=device)
    b = randn(0, 11, device=device)
    bias = randn(11, device=device)
    c, _, _ = _run(a, b, device=device, bias=bias, activation=GELU)
    torch.testing.assert_close(c, F.gelu(bias).expand(9, 11))


@pytest.mark.parametrize("device", DEVICES)
def test_int64_offsets_path(device, monkeypatch):
    # Offsets switch to 64 bits once a tensor spans 2**31 elements; lower the threshold so that the
    # 64-bit path runs on test-sized tensors.
    assert ops._last_offset(torch.empty(3, 5).t()) == 14
    monkeypatch.setattr(ops, "_INT32_LIMIT", 64)
    a = randn(37, 50, device=device)
    b = randn(45, 50, device=device).t()
    bias = randn(45, device=device)
    c, pre, _ = _run(a, b, device=device, bias=bias, activation=GELU, store_preact=True)
    ref, ref_pre, _ = _reference(a, b, bias=bias, activation=GELU)
    eager, eager_pre, _ = _reference(a, b, bias=bias, activation=GELU, dtype=torch.float32)
    assert_close_to_ref(c, eager, ref)
    assert_close_to_ref(pre, eager_pre, ref_pre, "preact")


@pytest.mark.gpu
def test_int64_offsets_on_a_tensor_past_2_31_elements():
    K, N = 64, 32
    M = 2**31 // K + 100
    a = torch.randn(M, K, dtype=torch.float16, device="cuda")
    b = (torch.randn(N, K, dtype=torch.float16, device="cuda") * K**-0.5).t()
    c, _, _ = _run(a, b, device="cuda")
    for rows in (slice(0, 256), slice(M - 256, M)):
        ref = a[rows].double() @ b.double()
        eager = a[rows] @ b
        assert_close_to_ref(c[rows], eager, ref, f"rows {rows}")


@pytest.mark.gpu
@pytest.mark.parametrize("config", GPU_CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_autotune_config(config, dtype):
    M, K, N = 300, 520, 270
    a = randn(M, K, dtype=dtype, device="cuda")
    b = randn(N, K, dtype=dtype, device="cuda", scale=K**-0.5).t()
    bias = randn(N, dtype=dtype, device="cuda")
    dy = randn(M, N, dtype=dtype, device="cuda")
    with pin_config(config):
        c, pre, _ = _run(a, b, device="cuda", bias=bias, activation=GELU_TANH, store_preact=True)
        dw, _, db = _run(dy.t(), a, device="cuda", z=pre.t(), grad_activation=GELU_TANH, rowsum=True)
    ref, ref_pre, _ = _reference(a, b, bias=bias, activation=GELU_TANH)
    eager, _, _ = _reference(a, b, bias=bias, activation=GELU_TANH, dtype=dtype)
    assert_close_to_ref(c, eager, ref)
    ref_dw, _, ref_db = _reference(dy.t(), a, z=pre.t(), grad_activation=GELU_TANH)
    eager_dw, _, eager_db = _reference(dy.t(), a, z=pre.t(), grad_activation=GELU_TANH, dtype=dtype)
    assert_close_to_ref(dw, eager_dw, ref_dw, "dW")
    assert_close_to_ref(db, eager_db.float(), ref_db, "db")


def test_kernel_compiles_for_hopper_and_ampere(tmp_path):
    """The interpreter accepts code the compiler rejects; triton ships ptxas, so compile real launches'
    specialisations for sm_90 and sm_80 here, without a GPU."""
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "compile_report.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    runs = {
        "every config": ["--modes", "column_fwd", "--dtypes", "bf16", "--targets", "sm90", "--all-configs"],
        "backward": ["--modes", "dgrad", "wgrad", "--dtypes", "bf16", "--targets", "sm90"],
        "ampere": ["--modes", "column_fwd", "wgrad", "--dtypes", "fp16", "fp32", "--targets", "sm80"],
    }
    reports = []
    for name, args in runs.items():
        report = tmp_path / f"{name}.jsonl"
        result = subprocess.run([sys.executable, script, *args, "--json", str(report)], env=env,
                                capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{name}:\n{result.stdout}\n{result.stderr}"
        reports += [json.loads(line) for line in report.read_text().splitlines()]
    assert len(reports) == len(GPU_CONFIGS) + 2 + 4
    for r in reports:
        if r["dtype"] != "fp32":
            assert r["wgmma"] or r["mma_sync"], f"no tensor-core instructions: {r}"
        if r["target"] == "sm90" and r["block_m"] >= 64:  # a warpgroup's wgmma tile is 64 rows
            assert r["wgmma"], f"Hopper tile without wgmma: {r}"
        assert r["local_bytes"] == 0, f"register spills: {r}"
