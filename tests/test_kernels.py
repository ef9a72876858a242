"""The Triton code itself: GELU as `tl` functions, and every prologue / epilogue of the matmul kernel,
launched through `launch.matmul` with pinned configs into poisoned outputs."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from numerics import DEVICES, assert_close_to_ref, matmul_reference, randn
from spawn import run_python
from tpkernels import MatmulConfig, autotune, launch, ops, pin_config
from tpkernels.kernels import (GELU, GELU_TANH, GPU_CONFIGS, IDENTITY, INTERPRETER_CONFIG, SILU, SPLITK_CONFIGS, TMA_CONFIGS,
                               matmul)

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))
import compile_report  # noqa: E402  (importable under the interpreter: it compiles only in main())

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


@pytest.mark.skipif(not matmul.INTERPRETED, reason="the interpreter raises a static_assert at the call")
def test_activation_codes_are_checked_statically():
    """IDENTITY has no gradient epilogue (the caller skips the multiply), and an unknown code is refused:
    neither may silently run the tanh derivative."""
    x = torch.randn(8)
    y, dy = torch.empty_like(x), torch.empty_like(x)
    for code in (IDENTITY, 7):
        with pytest.raises(Exception, match="GELU"):
            _elementwise_kernel[(1,)](x, y, dy, 8, ACTIVATION=code, BLOCK=8)


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


@pytest.mark.parametrize("device", DEVICES)
def test_silu_and_its_derivative_match_fp64(device):
    """SiLU, the gated MLP's activation, and its derivative: within 1e-6 of fp64 (relative to max(1, |x|))
    wherever fp64 is finite; no overflow to NaN at large |x| (exp(-x) = inf gives sigmoid 0)."""
    x64 = _gelu_values(device)
    x64 = x64[x64.isfinite()].requires_grad_()
    ref = F.silu(x64)
    (ref_grad,) = torch.autograd.grad(ref.sum(), x64)
    x = x64.detach().float()
    y, dy = torch.full_like(x, float("nan")), torch.full_like(x, float("nan"))
    _elementwise_kernel[(triton.cdiv(x.numel(), 256),)](x, y, dy, x.numel(), ACTIVATION=SILU, BLOCK=256)
    scale = x64.detach().abs().clamp(min=1)
    assert ((y.double() - ref.detach()).abs() / scale).max().item() < 1e-6
    assert ((dy.double() - ref_grad).abs()).max().item() < 1e-6


def _run(a, b, *, device, out_dtype=None, bias=None, residual=None, activation=IDENTITY, store_preact=False,
         z=None, grad_activation=IDENTITY):
    M, N = a.shape[0], b.shape[1]
    out_dtype = out_dtype or b.dtype
    c = torch.full((M, N), float("nan"), dtype=out_dtype, device=device)
    preact = torch.full((M, N), float("nan"), dtype=b.dtype, device=device) if store_preact else None
    launch.matmul(a, b, c, bias=bias, residual=residual, preact=preact, z=z, activation=activation,
                grad_activation=grad_activation)
    return c, preact


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
            c, pre = _run(a, b, device=device, bias=bias, residual=residual, activation=activation,
                          store_preact=True)
            ref_c, ref_pre = matmul_reference(a, b, bias=bias, residual=residual, activation=activation)
            eager_c, eager_pre = matmul_reference(a, b, bias=bias, residual=residual, activation=activation, dtype=dtype)
            assert_close_to_ref(c, eager_c, ref_c, f"out (activation {activation})")
            assert_close_to_ref(pre, eager_pre, ref_pre, "preact")
        # fp32 partials without bias: accumulated in fp32 and never rounded to the operands' dtype.
        c, _ = _run(a, b, device=device, out_dtype=torch.float32)
        ref_c, _ = matmul_reference(a, b)
        eager_c, _ = matmul_reference(a, b, dtype=torch.float32)
        assert_close_to_ref(c, eager_c, ref_c, "fp32 partial")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("grad_activation", [GELU, GELU_TANH])
def test_backward_launches(device, config, dtype, grad_activation):
    """The backward's three kinds of launch: the dGELU epilogue (dZ = (dY @ W2) * act'(z)), and dX = dZ @ W
    and dW = dZ.T @ X as plain GEMMs over strided views."""
    M, N, K, H = 45, 38, 29, 33
    dy = randn(M, N, dtype=dtype, device=device)
    w2 = randn(N, H, dtype=dtype, device=device, scale=N**-0.5)
    z = randn(M, H, dtype=dtype, device=device, scale=2.0)
    w = randn(H, K, dtype=dtype, device=device)
    x = randn(M, K, dtype=dtype, device=device)
    with pin_config(config):
        dz, _ = _run(dy, w2, device=device, z=z, grad_activation=grad_activation)
        ref, _ = matmul_reference(dy, w2, z=z, grad_activation=grad_activation)
        eager, _ = matmul_reference(dy, w2, z=z, grad_activation=grad_activation, dtype=dtype)
        assert_close_to_ref(dz, eager, ref, "dZ from the dGELU epilogue")
        dx, _ = _run(dz, w, device=device)
        assert_close_to_ref(dx, matmul_reference(dz, w, dtype=dtype)[0], matmul_reference(dz, w)[0], "dX")
        dw, _ = _run(dz.t(), x, device=device)
        assert_close_to_ref(dw, matmul_reference(dz.t(), x, dtype=dtype)[0], matmul_reference(dz.t(), x)[0], "dW")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("grad_activation", [GELU, GELU_TANH])
@pytest.mark.parametrize("M,N", [(1, 1), (45, 38), (70, 300), (33, 0)])
def test_dgelu_pass_and_its_column_sums(device, dtype, grad_activation, M, N):
    dy = randn(M, N, dtype=dtype, device=device)[:, ::1]
    z = randn(N, M, dtype=dtype, device=device, scale=2.0).t()  # a strided view
    approximate = "tanh" if grad_activation == GELU_TANH else "none"
    dz, db = launch.dgelu(dy, z, grad_activation, need_db=True)
    ref = torch.ops.aten.gelu_backward(dy.double(), z.double(), approximate=approximate)
    eager = torch.ops.aten.gelu_backward(dy, z, approximate=approximate)
    assert_close_to_ref(dz, eager, ref, "dZ")
    assert db.dtype == torch.float32 and db.shape == (N,)
    assert_close_to_ref(db, eager.sum(0, dtype=torch.float32), ref.sum(0), "db")
    dz_only, none = launch.dgelu(dy, z, grad_activation, need_db=False)
    assert none is None and torch.equal(dz_only, dz)


TMA_SHAPES = [(37, 40, 72), (5, 64, 24), (70, 24, 136)]  # 16-byte rows in 16-bit dtypes, ragged tiles


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("M,K,N", TMA_SHAPES)
def test_persistent_tma_kernel(device, dtype, M, K, N, monkeypatch):
    """The Hopper kernel (TMA descriptors, persistent grid) on every launch layout, against the fp64
    reference; the interpreter runs it on CPU tensors."""
    launched = []
    kernel = launch._matmul_tma_persistent_kernel

    class Spy:
        def __getitem__(self, grid):
            launched.append(grid)
            return kernel[grid]

    monkeypatch.setattr(launch, "_matmul_tma_persistent_kernel", Spy())
    x = randn(M, K, dtype=dtype, device=device)
    w = randn(N, K, dtype=dtype, device=device, scale=K**-0.5)
    bias = randn(N, dtype=dtype, device=device)
    residual = randn(M, N, dtype=dtype, device=device)
    dy = randn(M, N, dtype=dtype, device=device)
    with ops.use_matmul_kernel("tma"), pin_config(MatmulConfig(32, 32, 16, group_m=2, epilogue_subtile=2)):
        for activation in (IDENTITY, GELU, GELU_TANH):
            c, pre = _run(x, w.t(), device=device, bias=bias, residual=residual, activation=activation,
                          store_preact=True)
            ref_c, ref_pre = matmul_reference(x, w.t(), bias=bias, residual=residual, activation=activation)
            eager_c, eager_pre = matmul_reference(x, w.t(), bias=bias, residual=residual, activation=activation,
                                            dtype=dtype)
            assert_close_to_ref(c, eager_c, ref_c, f"forward, activation {activation}")
            assert_close_to_ref(pre, eager_pre, ref_pre, "preact")
        z = randn(M, K, dtype=dtype, device=device, scale=2.0)
        dz, _ = _run(dy, w, device=device, z=z, grad_activation=GELU)  # B = w [N, K]: rows
        ref, _ = matmul_reference(dy, w, z=z, grad_activation=GELU)
        assert_close_to_ref(dz, matmul_reference(dy, w, z=z, grad_activation=GELU, dtype=dtype)[0], ref, "dGELU")
        dw, _ = _run(dy.t(), x, device=device)  # A = dY.T: the descriptor covers dY
        assert_close_to_ref(dw, matmul_reference(dy.t(), x, dtype=dtype)[0], matmul_reference(dy.t(), x)[0], "dW")
    assert len(launched) == 5, "the TMA kernel must run every launch above"


@pytest.mark.parametrize("device", DEVICES)
def test_empty_reduction_gives_the_epilogue_of_zero(device):
    a = randn(9, 0, device=device)
    b = randn(0, 11, device=device)
    bias = randn(11, device=device)
    c, _ = _run(a, b, device=device, bias=bias, activation=GELU)
    torch.testing.assert_close(c, F.gelu(bias).expand(9, 11))


@pytest.mark.parametrize("device", DEVICES)
def test_int64_offsets_path(device, monkeypatch):
    # Offsets switch to 64 bits once a tensor spans 2**31 elements; lower the threshold so that the
    # 64-bit path runs on test-sized tensors.
    assert launch.last_offset(torch.empty(3, 5).t()) == 14
    monkeypatch.setattr(launch, "INT32_LIMIT", 64)
    a = randn(37, 50, device=device)
    b = randn(45, 50, device=device).t()
    bias = randn(45, device=device)
    c, pre = _run(a, b, device=device, bias=bias, activation=GELU, store_preact=True)
    ref, ref_pre = matmul_reference(a, b, bias=bias, activation=GELU)
    eager, eager_pre = matmul_reference(a, b, bias=bias, activation=GELU, dtype=torch.float32)
    assert_close_to_ref(c, eager, ref)
    assert_close_to_ref(pre, eager_pre, ref_pre, "preact")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,config", [("pointer", MatmulConfig(64, 64, 64, num_stages=3)),
                                           ("tma", TMA_CONFIGS[-1])], ids=["pointer", "tma"])
def test_int64_offsets_on_a_tensor_past_2_31_elements(kernel, config):
    """A past 2**31 elements on each kernel (the TMA kernel: 32-bit descriptor coordinates, 64-bit epilogue
    offsets), a pinned tile, the first and last rows checked."""
    if kernel == "tma" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA kernel runs on Hopper")
    K, N = 64, 32
    M = 2**31 // K + 100
    a = torch.randn(M, K, dtype=torch.float16, device="cuda")
    b = (torch.randn(N, K, dtype=torch.float16, device="cuda") * K**-0.5).t()
    with ops.use_matmul_kernel(kernel), pin_config(config), launch.record_launches() as launches:
        c, _ = _run(a, b, device="cuda")
    assert launches[0].split()[0] == kernel, launches
    for rows in (slice(0, 256), slice(M - 256, M)):
        ref = a[rows].double() @ b.double()
        eager = a[rows] @ b
        assert_close_to_ref(c[rows], eager, ref, f"rows {rows}")


@pytest.mark.gpu
@pytest.mark.parametrize("kernel,config", [("pointer", c) for c in GPU_CONFIGS]  # TMA_CONFIGS is a subset
                         + [("tma", c) for c in TMA_CONFIGS] + [("splitk", c) for c in SPLITK_CONFIGS], ids=str)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_autotune_config(kernel, config, dtype):
    """Every config each kernel can autotune to, pinned, on the forward, dGELU and dW launches; each
    launch is recorded, so a case that silently ran another kernel fails."""
    if kernel == "tma" and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA kernel runs on Hopper")
    M, K, N = 300, 520, 272
    a = randn(M, K, dtype=dtype, device="cuda")
    b = randn(N, K, dtype=dtype, device="cuda", scale=K**-0.5).t()
    bias = randn(N, dtype=dtype, device="cuda")
    dy = randn(M, N, dtype=dtype, device="cuda")
    z = randn(M, K, dtype=dtype, device="cuda", scale=2.0)
    with ops.use_matmul_kernel(kernel), pin_config(config), launch.record_launches() as launches:
        c, pre = _run(a, b, device="cuda", bias=bias, activation=GELU_TANH, store_preact=True)
        dz, _ = _run(dy, b.t(), device="cuda", z=z, grad_activation=GELU_TANH)
        dw, _ = _run(dy.t(), a, device="cuda")
    assert len(launches) == 3 and all(line.split()[0] == kernel for line in launches), launches
    ref, _ = matmul_reference(a, b, bias=bias, activation=GELU_TANH)
    assert_close_to_ref(c, matmul_reference(a, b, bias=bias, activation=GELU_TANH, dtype=dtype)[0], ref)
    ref_dz, _ = matmul_reference(dy, b.t(), z=z, grad_activation=GELU_TANH)
    assert_close_to_ref(dz, matmul_reference(dy, b.t(), z=z, grad_activation=GELU_TANH, dtype=dtype)[0], ref_dz, "dZ")
    assert_close_to_ref(dw, matmul_reference(dy.t(), a, dtype=dtype)[0], matmul_reference(dy.t(), a)[0], "dW")


def _compile_report(tmp_path, name, *args):
    script = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "compile_report.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    report = tmp_path / f"{name}.jsonl"
    result = subprocess.run([sys.executable, script, *args, "--json", str(report)], env=env, capture_output=True,
                            text=True, timeout=1500)
    return result, [json.loads(line) for line in report.read_text().splitlines()] if report.exists() else []


def test_compile_gate_on_hopper(tmp_path):
    """The gate CI relies on: every kernel, launch mode and Hopper config in bf16 and fp8 (fp16 compiles as
    bf16 does), compiled for sm_90a with the installed triton: no spills, no C75xx warning, wgmma (fp8: QGMMA)
    with A from shared memory, a mainloop within 1.5x the plain Triton GEMM's, shared memory within the
    device's. A promoted fp8 GEMM (K >= 4096) may wait for each wgmma (C7517) and run a longer mainloop:
    that is the promotion."""
    result, rows = _compile_report(tmp_path, "gate", "--gate", "--jobs", str(max(2, os.cpu_count() or 1)))
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    fp8_modes = {m for m, spec in compile_report.MODES.items() if spec.get("fp8")}
    modes = set(compile_report.MODES) - fp8_modes
    assert fp8_modes == {"column_fwd_fp8", "row_fwd_fp8", "dgrad_dgelu_fp8", "wgrad_fp8", "gated_fwd_fp8",
                         "dgrad_dglu_fp8", "column_fwd_fp8_promoted", "wgrad_fp8_promoted"}
    assert {r["dtype"] for r in rows} == {"bf16", "fp8"}
    assert {r["mode"] for r in rows if r["kernel"] == "matmul" and r["dtype"] != "fp8"} == modes
    assert {r["mode"] for r in rows if r["kernel"] == "matmul" and r["dtype"] == "fp8"} == fp8_modes
    # the TMA kernel: every 16-bit mode but fp32 partials and the gated gradient (its dU goes through a pointer)
    assert {r["mode"] for r in rows if r["kernel"] == "matmul_tma"} == modes - {"row_fwd_fp32", "dgrad_dglu"}
    assert {r["kernel"] for r in rows if r["dtype"] == "fp8"} == {"matmul", "matmul_splitk", "fp8_quantize",
                                                                  "fp8_scale_update"}
    for r in rows:
        assert not compile_report.gate_failures(r), r
        if r["kernel"] not in compile_report.MATMULS:
            continue
        if r["config"]["block_m"] >= 64:  # a warpgroup's wgmma tile is 64 rows
            assert r["wgmma"] and not r["wgmma_a_from_registers"], r
        if r["kernel"] == "matmul_tma":
            assert r["tma_loads"] and r["tma_stores"], f"the persistent kernel without TMA: {r}"


def test_kernels_compile_for_ampere(tmp_path):
    result, rows = _compile_report(tmp_path, "ampere", "--targets", "sm80", "--dtypes", "fp16", "fp32",
                                   "--modes", "column_fwd", "wgrad", "dgrad_dgelu", "--jobs", "2")
    assert result.returncode == 0, f"{result.stdout[-6000:]}\n{result.stderr[-3000:]}"
    assert rows and all(r["shared_bytes"] <= r["shared_limit"] for r in rows)
    assert all(r["mma_sync"] for r in rows if r["kernel"] == "matmul" and r["dtype"] == "fp16")
    assert not any(r["kernel"] == "matmul_tma" for r in rows)


def test_gate_catches_what_it_is_for():
    """Each gate rule fails a row that breaks it; a clean row passes."""
    clean = dict(kernel="matmul", target="sm90", dtype="bf16", shared_bytes=1000, shared_limit=2000,
                 spill_store_bytes=0, warnings=[], warning_text=[], wgmma_a_from_registers=False,
                 plain_wgmma_a_from_registers=False, mainloop_ratio=1.0, mainloop_instructions=120,
                 plain_mainloop_instructions=120)
    assert compile_report.gate_failures(clean) == []
    broken = {
        "spill": dict(spill_store_bytes=176),
        "C7515": dict(warnings=["C7515"], warning_text=["wgmma serialized"]),
        "registers": dict(wgmma_a_from_registers=True),
        "1.5x": dict(mainloop_ratio=13.3, mainloop_instructions=1600),
        "shared memory": dict(shared_bytes=3000),
        "no mainloop": dict(mainloop_ratio=None),
        "no wgmma": dict(wgmma=False, plain_wgmma=True),  # fp8: QGMMA where the plain GEMM has it
    }
    for name, change in broken.items():
        assert compile_report.gate_failures({**clean, **change}), name
    assert compile_report.gate_failures({**clean, "target": "sm80", "spill_store_bytes": 8}) == []
    # a promoted fp8 GEMM may wait for each wgmma (C7517) and run a longer mainloop; nothing else is let through
    waits = dict(warnings=["C7517"], warning_text=["wgmma.wait_group is injected"], mainloop_ratio=2.1)
    promoted = {**clean, **waits, "dtype": "fp8", "mode": "wgrad_fp8_promoted"}
    assert compile_report.gate_failures(promoted) == []
    assert compile_report.gate_failures({**promoted, "mode": "wgrad_fp8"})
    assert compile_report.gate_failures({**promoted, "spill_store_bytes": 8})
    assert compile_report.gate_failures({**promoted, "warnings": ["C7517", "C7514"]})
    assert compile_report.gate_failures({**promoted, "mainloop_ratio": 3.0, "mainloop_instructions": 360})
    assert compile_report.gate_failures({**promoted, "wgmma_a_from_registers": True})
    assert compile_report.gate_failures({**promoted, "mainloop_ratio": None})


def test_mainloop_finder_on_a_listing():
    listing = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_1:
        /*0010*/                   LDGSTS.E.BYPASS.128 [R2], desc[UR4][R4.64] ;
        /*0020*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR12], R24 ;
        /*0030*/              @P0 BRA `(.L_x_2) ;
        /*0040*/                   MUFU.EX2 R9, R9 ;
        /*0050*/                   STG.E [R6.64], R9 ;
.L_x_2:
        /*0060*/                   IADD3 R3, R3, 0x1, RZ ;
        /*0070*/              @!P1 BRA `(.L_x_1) ;
        /*0080*/                   EXIT ;
"""
    instructions, labels = compile_report.parse_sass(listing)
    start, stop, body = compile_report.mainloop(instructions, labels)
    assert (start, stop) == (1, 7)
    # the conditional region with no matrix instruction (an epilogue in a flattened loop) is left out
    assert [compile_report._opcode(t) for t in body] == ["LDGSTS.E.BYPASS.128", "HGMMA.64x128x16.F32.BF16",
                                                         "BRA", "IADD3", "BRA"]


def test_autotune_prunes_configs_that_cannot_fit_shared_memory(monkeypatch):
    """The autotuner never launches a config whose pipeline exceeds the device's shared memory."""
    monkeypatch.setattr(autotune, "device_shared_memory", lambda index: 166912)  # an A100
    configs = [c.to_triton() for c in GPU_CONFIGS]
    for dtype, size in ((torch.float32, 4), (torch.bfloat16, 2)):
        kept = autotune.pruner("a_ptr")(configs, {"a_ptr": torch.empty(1, dtype=dtype)})
        assert kept, dtype
        assert all(MatmulConfig.from_triton(c).shared_bytes(size) <= 166912 for c in kept)
        assert (len(kept) < len(configs)) == (dtype == torch.float32)  # fp32 loses its deep pipelines
    # TMA: the staging buffer of C counts too, sliced as the dGELU epilogue slices it
    monkeypatch.setattr(autotune, "device_shared_memory", lambda index: 232448)

    class Desc:
        def __init__(self, dtype):
            self.base = torch.empty(1, dtype=dtype)

    tma = [c.to_triton() for c in TMA_CONFIGS]
    for grad in (IDENTITY, GELU):
        kept = autotune.pruner("a_desc", store_operand="c_desc")(
            tma, {"a_desc": Desc(torch.bfloat16), "c_desc": Desc(torch.bfloat16)}, GRAD_ACTIVATION=grad)
        for c in map(MatmulConfig.from_triton, kept):
            assert c.shared_bytes(2, 2, c.epilogue_slices(grad != IDENTITY)) <= 232448
    # when nothing fits, the smallest config is kept, so that a launch has something to run
    monkeypatch.setattr(autotune, "device_shared_memory", lambda index: 1024)
    (smallest,) = autotune.pruner("a_ptr")(configs, {"a_ptr": torch.empty(1, dtype=torch.float32)})
    assert MatmulConfig.from_triton(smallest).shared_bytes(4) == min(c.shared_bytes(4) for c in GPU_CONFIGS)


def test_autotuned_configs_persist_across_runs(monkeypatch):
    """Both autotuners ask triton to keep their results on disk, unless TPKERNELS_AUTOTUNE_CACHE=0."""
    seen = []
    real = triton.autotune
    monkeypatch.setattr(autotune.triton, "autotune", lambda **kw: seen.append(kw.get("cache_results")) or real(**kw))
    for setting, expected in ((None, True), ("0", False)):
        if setting is None:
            monkeypatch.delenv("TPKERNELS_AUTOTUNE_CACHE", raising=False)
        else:
            monkeypatch.setenv("TPKERNELS_AUTOTUNE_CACHE", setting)
        autotune.make_autotuner(launch._matmul_kernel, configs=[INTERPRETER_CONFIG.to_triton()])
        assert seen[-1] is expected


def test_64_bit_offset_variants_compile_for_hopper():
    """Tensors past 2**31 elements switch both kernels to 64-bit offsets (the TMA kernel keeps 32-bit
    descriptor coordinates): those variants must compile too, though no CPU test can reach them."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {os.path.join(os.path.dirname(__file__), os.pardir, 'benchmarks')!r})\n"
        "import compile_report as cr\n"
        "from tpkernels.kernels import TMA_CONFIGS, configs\n"
        "cr.EPILOGUE_DEFAULTS['INT64_OFFSETS'] = True\n"
        "for kernel, config in (('matmul_tma', TMA_CONFIGS[0]), ('matmul', configs.HOPPER_CONFIGS[0])):\n"
        "    for mode in ('column_fwd', 'dgrad_dgelu', 'wgrad'):\n"
        "        row = cr.compile_variant((kernel, mode, 'bf16', 'sm90', config))\n"
        "        assert row['wgmma'], row\n"
        "print('ok')\n"
    )
    assert run_python(code, timeout=600).endswith("ok")


def test_kernel_choice_is_per_thread():
    """use_matmul_kernel (and pin_config) are context variables: another thread keeps its own choice."""
    import threading

    a, b = torch.randn(32, 16).half(), torch.randn(16, 32).half()
    c = torch.empty(32, 32).half()
    with launch.use_matmul_kernel("tma"):
        assert launch.use_tma(a, b, c, None)
        elsewhere = []
        thread = threading.Thread(target=lambda: elsewhere.append(launch.use_tma(a, b, c, None)))
        thread.start()
        thread.join()
        assert elsewhere == [False]  # "auto" there: no TMA for CPU tensors
    assert not launch.use_tma(a, b, c, None)
