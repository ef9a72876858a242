"""Shared test numerics: the fp64 "2x eager error" rule, fresh inputs, devices and dtypes, and the
comparisons of a tensor-parallel model with its dense twin that the rank tests share."""
import pytest
import torch
import torch.nn.functional as F

from tpkernels.kernels import GELU_TANH, IDENTITY, INTERPRETED
from tpkernels.dtensor import local

# The small absolute slack on top of 2x eager's error, per dtype.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

DEVICES = [
    pytest.param(
        "cpu",
        marks=pytest.mark.skipif(not INTERPRETED, reason="CPU tensors run the eager reference without TRITON_INTERPRET=1"),
    ),
    pytest.param("cuda", marks=pytest.mark.gpu),
]


def randn(*shape, dtype=torch.float32, device="cpu", scale=1.0, requires_grad=False):
    t = (torch.randn(*shape, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def linear_inputs(lead, K, N, dtype, device, bias=True, requires_grad=False):
    """Fresh x [*lead, K], weight [N, K] scaled like nn.Linear's init, bias [N]."""
    x = randn(*lead, K, dtype=dtype, device=device, requires_grad=requires_grad)
    w = randn(N, K, dtype=dtype, device=device, scale=max(K, 1) ** -0.5, requires_grad=requires_grad)
    b = randn(N, dtype=dtype, device=device, requires_grad=requires_grad) if bias else None
    return x, w, b


def assert_close_to_ref(out, eager, ref, name="output"):
    """max|out - ref| <= 2 max|eager - ref| + atol, with ref in fp64 and eager in out's dtype.

    Non-finite values must sit where the fp64 reference has them, with the same sign.
    """
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == eager.dtype, f"{name}: dtype {out.dtype} != eager's {eager.dtype}"
    atol = ATOL[eager.dtype]
    out, eager, ref = out.detach().double().cpu(), eager.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.equal(out.isnan(), ref.isnan()), f"{name}: NaN where the fp64 reference has none, or vice versa"
    assert torch.equal(out.isposinf(), ref.isposinf()) and torch.equal(out.isneginf(), ref.isneginf()), (
        f"{name}: infinities differ from the fp64 reference"
    )
    finite = ref.isfinite() & eager.isfinite()
    if not finite.any():
        return
    err = (out - ref)[finite].abs().max().item()
    eager_err = (eager - ref)[finite].abs().max().item()
    assert err <= 2 * eager_err + atol, (
        f"{name}: max error {err:.3e} exceeds 2 x eager's {eager_err:.3e} + atol {atol:.0e} ({eager.dtype})"
    )


def fp64(*tensors):
    return [None if t is None else t.detach().double().requires_grad_(t.requires_grad) for t in tensors]


def _grads(out, inputs, grad_out):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    return torch.autograd.grad(out, wanted, grad_out)


def check_forward_backward(fused_fn, eager_fn, inputs, names):
    """Compare fused_fn with eager_fn (same dtype) and eager_fn in fp64, outputs and gradients."""
    out = fused_fn(*inputs)
    eager = eager_fn(*inputs)
    ref = eager_fn(*fp64(*inputs))
    assert_close_to_ref(out, eager, ref)
    grad_out = randn(*out.shape, dtype=out.dtype, device=out.device)
    ref_inputs = fp64(*inputs)
    ref = eager_fn(*ref_inputs)
    for name, g, e, r in zip(
        [n for n, t in zip(names, inputs) if t is not None and t.requires_grad],
        _grads(out, inputs, grad_out),
        _grads(eager, inputs, grad_out),
        _grads(ref, ref_inputs, grad_out.double()),
    ):
        assert_close_to_ref(g, e, r, f"grad of {name}")


def matmul_reference(a, b, *, bias=None, residual=None, activation=IDENTITY, z=None, grad_activation=IDENTITY,
                     dtype=torch.float64, out_dtype=None):
    """The same math in eager, in `dtype` (fp64 for the reference, the operands' dtype for eager)."""
    pre = a.to(dtype) @ b.to(dtype)
    if bias is not None:
        pre = pre + bias.to(dtype)
    out = pre if activation == IDENTITY else F.gelu(pre, approximate="tanh" if activation == GELU_TANH else "none")
    if grad_activation != IDENTITY:
        out = torch.ops.aten.gelu_backward(
            out, z.to(dtype), approximate="tanh" if grad_activation == GELU_TANH else "none"
        )
    if residual is not None:
        out = out + residual.to(dtype)
    return out.to(out_dtype or dtype), pre


def same_everywhere(*shape, seed):
    """The same random fp32 tensor on every rank, drawn on the CPU, on the default device."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), device="cpu").to(
        torch.get_default_device())


def compare_params(name, tp, dense, dense64, shards, lr=0.1):
    """Every parameter's gradient, then its value after one SGD step (lr), against the dense slices.

    shards maps a parameter name to the index of this rank's shard in the dense parameter."""
    models = (tp, dense, dense64)
    for what in ("grad", "after SGD"):
        if what == "after SGD":
            for model in models:
                torch.optim.SGD(model.parameters(), lr=lr).step()
        tp_params, eager_params, params64 = (dict(m.named_parameters()) for m in models)
        for param, index in shards.items():
            pick = (lambda p: p.grad) if what == "grad" else (lambda p: p)
            assert_close_to_ref(local(pick(tp_params[param])), pick(eager_params[param])[index],
                                pick(params64[param])[index], f"{name} {param} {what}")


def assert_compiled_matches_eager(module, compiled, x, grad):
    """compiled(x) and module(x) agree: output, input gradient and every parameter's gradient."""
    x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_compiled = compiled(x_compiled)
    y_compiled.backward(grad)
    compiled_grads = [p.grad.clone() for p in module.parameters()]
    module.zero_grad()
    y_eager = module(x_eager)
    y_eager.backward(grad)
    torch.testing.assert_close(y_compiled, y_eager)
    torch.testing.assert_close(x_compiled.grad, x_eager.grad)
    for got, expected in zip(compiled_grads, (p.grad for p in module.parameters())):
        torch.testing.assert_close(got, expected)
