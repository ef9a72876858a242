"""The public functional API: linear_gelu and linear_partial against eager, forward and backward,
every option, bad input, dispatch, and torch.compile."""
import pytest
import torch
import torch.nn.functional as F

import tpkernels
from numerics import DEVICES, DTYPES, assert_close_to_ref, check_forward_backward, fp64, linear_inputs, randn
from spawn import run_python
from tpkernels import custom_ops, extension, launch, ops, reference

SHAPES = [  # (leading dims, in_features K, out_features N)
    ((1,), 33, 17),
    ((37,), 50, 45),
    ((3, 5), 24, 70),
    ((2, 3, 4), 7, 40),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_gelu_matches_eager(device, dtype, lead, K, N, approximate, bias):
    x, w, b = linear_inputs(lead, K, N, dtype, device, bias=bias, requires_grad=True)

    def fused(x, w, b):
        return tpkernels.linear_gelu(x, w, b, approximate=approximate)

    def eager(x, w, b):
        return reference.linear_gelu(x, w, b, approximate=approximate)

    check_forward_backward(fused, eager, (x, w, b), ("x", "weight", "bias"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES[1:3])
@pytest.mark.parametrize("owner", [True, False])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("fp32_out", [True, False])
def test_linear_partial_matches_eager(device, dtype, lead, K, N, owner, residual, fp32_out):
    x, w, b = linear_inputs(lead, K, N, dtype, device, requires_grad=True)
    out_dtype = torch.float32 if fp32_out else None
    r = randn(*lead, N, dtype=out_dtype or dtype, device=device, requires_grad=True) if residual else None

    def fused(x, w, b, r):
        return tpkernels.linear_partial(x, w, b, residual=r, owner=owner, out_dtype=out_dtype)

    def eager(x, w, b, r):
        if x.dtype == torch.float64:  # the reference: no rounding to the partial's dtype
            return reference.linear_partial(x, w, b, residual=r, owner=owner)
        return reference.linear_partial(x, w, b, residual=r, owner=owner, out_dtype=out_dtype)

    if owner:
        check_forward_backward(fused, eager, (x, w, b, r), ("x", "weight", "bias", "residual"))
        return
    # Not the owner: no bias or residual in the partial, yet the replicated bias and residual still get
    # the full gradient, sum(dY) and dY, so that every rank's replica stays the same.
    out = fused(x, w, b, r)
    assert_close_to_ref(out, eager(x, w, None, None), eager(*fp64(x, w, None, None)))
    grad_out = randn(*out.shape, dtype=out.dtype, device=device)
    grads = torch.autograd.grad(out, [t for t in (b, r) if t is not None], grad_out)
    torch.testing.assert_close(grads[0].double(), grad_out.double().flatten(0, -2).sum(0), rtol=1e-2, atol=1e-2)
    if residual:
        assert torch.equal(grads[1], grad_out.to(r.dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs_run_without_a_copy(device, monkeypatch):
    base_x = randn(40, 64, device=device)
    x = base_x[::2, 3:53]  # strided rows and an offset: [20, 50]
    w = randn(50, 45, device=device, scale=50**-0.5).t()  # [45, 50], column-major
    b = randn(90, device=device)[::2]
    seen = []
    real_linear = launch.linear

    def spy(a, weight, c, **kwargs):
        seen.append(a.data_ptr())
        return real_linear(a, weight, c, **kwargs)

    monkeypatch.setattr(launch, "linear", spy)
    out = tpkernels.linear_gelu(x, w, b)
    assert seen == [x.data_ptr()], "a 2-D strided x must reach the kernel as it is"
    eager = reference.linear_gelu(x, w, b)
    assert_close_to_ref(out, eager, reference.linear_gelu(*fp64(x, w, b)))
    # 3-D, transposed in its leading dims: a copy is unavoidable, and the result is still right
    x3 = randn(6, 5, 50, device=device).transpose(0, 1)
    out = tpkernels.linear_partial(x3, w, b)
    assert_close_to_ref(out, reference.linear_partial(x3, w, b), reference.linear_partial(*fp64(x3, w, b)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_out_buffer_and_in_place_residual(device, dtype):
    x, w, b = linear_inputs((4, 9), 30, 21, dtype, device)
    r = randn(4, 9, 21, dtype=torch.float32, device=device)
    ref = reference.linear_partial(*fp64(x, w, b), residual=r.double())
    eager = reference.linear_partial(x, w, b, residual=r, out_dtype=torch.float32)

    buffer = torch.full((4, 9, 21), float("nan"), dtype=torch.float32, device=device)
    result = tpkernels.linear_partial(x, w, b, residual=r, out=buffer)
    assert result is buffer
    assert_close_to_ref(buffer, eager, ref)

    in_place = r.clone()
    tpkernels.linear_partial(x, w, b, residual=in_place, out=in_place)
    assert_close_to_ref(in_place, eager, ref, "out=residual")

    not_owner = torch.full_like(buffer, float("nan"))
    tpkernels.linear_partial(x, w, b, residual=r, owner=False, out=not_owner)
    eager = reference.linear_partial(x, w, None, out_dtype=torch.float32)
    assert_close_to_ref(not_owner, eager, reference.linear_partial(*fp64(x, w, None)), "owner=False")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_nan_and_inf_propagate_like_the_fp64_reference(device, approximate):
    x, w, b = linear_inputs((12,), 16, 20, torch.float32, device)
    x[2, 3] = float("nan")
    x[5, 0] = float("inf")
    x[7, 9] = float("-inf")
    w[4, 0] = 0.0  # inf * 0 = NaN in one column of row 5
    ref = reference.linear_gelu(*fp64(x, w, b), approximate=approximate)
    out = tpkernels.linear_gelu(x, w, b, approximate=approximate)
    assert ref.isnan().any() and ref.isinf().any()
    assert_close_to_ref(out, reference.linear_gelu(x, w, b, approximate=approximate), ref)
    partial = tpkernels.linear_partial(x, w, b, out_dtype=torch.float32)
    assert_close_to_ref(partial, reference.linear_partial(x, w, b), reference.linear_partial(*fp64(x, w, b)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_fp16_gelu_of_large_values_is_never_nan(device, approximate):
    x = randn(16, 32, dtype=torch.float16, device=device, scale=300.0, requires_grad=True)
    w = randn(24, 32, dtype=torch.float16, device=device, requires_grad=True)
    out = tpkernels.linear_gelu(x, w, approximate=approximate)
    eager = reference.linear_gelu(x, w, approximate=approximate)
    assert not eager.isnan().any()
    assert not out.isnan().any()
    assert out.abs().max() > 1000  # the inputs did reach the large-|x| range
    grads = torch.autograd.grad(out, (x, w), torch.ones_like(out))
    assert not any(g.isnan().any() for g in grads)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_inputs(device):
    w, b = randn(6, 5, device=device), randn(6, device=device)
    x = randn(0, 5, device=device, requires_grad=True)
    out = tpkernels.linear_gelu(x, w, b)
    assert out.shape == (0, 6)
    out.sum().backward()
    assert x.grad.shape == (0, 5)
    assert tpkernels.linear_partial(randn(2, 0, 5, device=device), w, b).shape == (2, 0, 6)
    # in_features == 0: the output is the epilogue of a zero matmul
    out = tpkernels.linear_gelu(randn(3, 0, device=device), randn(6, 0, device=device), b)
    torch.testing.assert_close(out, F.gelu(b).expand(3, 6))


def test_bad_input_is_refused_before_launch(monkeypatch):
    def no_launch(*args, **kwargs):
        raise AssertionError("a kernel launched on bad input")

    monkeypatch.setattr(launch, "matmul", no_launch)
    monkeypatch.setattr(launch, "linear", no_launch)
    x, w, b = linear_inputs((8,), 16, 12, torch.float32, "cpu")
    cases = [
        (ValueError, r"in_features=17 .* in_features=16", lambda: tpkernels.linear_gelu(randn(8, 17), w, b)),
        (ValueError, r"bias has shape \(11,\) .* out_features=12", lambda: tpkernels.linear_gelu(x, w, b[:11])),
        (ValueError, r"weight must be 2-D", lambda: tpkernels.linear_gelu(x, w[None], b)),
        (TypeError, r"weight.dtype is torch.float16 but x.dtype is torch.float32",
         lambda: tpkernels.linear_gelu(x, w.half(), b)),
        (TypeError, r"bias.dtype is torch.float64", lambda: tpkernels.linear_partial(x, w, b.double())),
        (TypeError, r"supported dtypes are", lambda: tpkernels.linear_gelu(x.double(), w.double())),
        (TypeError, r"x must be a torch.Tensor", lambda: tpkernels.linear_gelu(x.tolist(), w)),
        (ValueError, r"approximate must be 'none' or 'tanh', got 'erf'",
         lambda: tpkernels.linear_gelu(x, w, b, approximate="erf")),
        (ValueError, r"x is on cpu but weight is on meta", lambda: tpkernels.linear_gelu(x, w.to("meta"))),
        (TypeError, r"out_dtype is torch.float16", lambda: tpkernels.linear_partial(x, w, out_dtype=torch.float16)),
        (ValueError, r"residual has shape \(8, 13\) but the output is \(8, 12\)",
         lambda: tpkernels.linear_partial(x, w, b, residual=randn(8, 13))),
        (TypeError, r"residual.dtype is torch.float16",
         lambda: tpkernels.linear_partial(x, w, b, residual=randn(8, 12).half())),
        (ValueError, r"out has shape \(12, 8\)", lambda: tpkernels.linear_partial(x, w, out=randn(12, 8))),
        (ValueError, r"out= does not support autograd",
         lambda: tpkernels.linear_partial(x, w.clone().requires_grad_(), out=randn(8, 12))),
        (ValueError, r"out shares memory with x", lambda: tpkernels.linear_partial(x, randn(16, 16), out=x)),
        (ValueError, r"cannot be viewed as \[8, 12\] rows",
         lambda: tpkernels.linear_partial(x.view(2, 4, 16), w, out=randn(4, 2, 12).transpose(0, 1))),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.skipif(not ops.INTERPRETED, reason="needs TRITON_INTERPRET=1")
def test_cpu_runs_the_triton_kernel_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(reference, "fused_linear", lambda *a, **k: pytest.fail("the eager fallback ran"))
    x, w, b = linear_inputs((8,), 16, 12, torch.float32, "cpu", requires_grad=True)
    with launch.record_launches() as launches:
        tpkernels.linear_gelu(x, w, b).sum().backward()
        kinds = [line.split()[0] for line in launches]
        assert kinds == ["pointer", "dgelu", "pointer", "pointer"], launches  # forward; dZ and db, dX, dW
        tpkernels.linear_partial(x, w, b)
    assert len(launches) == 5 and launches[-1].startswith("pointer")


def test_cpu_auto_follows_the_cpu_table():
    """Without the interpreter, auto on CPU tensors runs what tpkernels/backend_table_cpu.json chose: the
    extension exactly inside its rules for the packed-weight cache's state (where it was measured faster
    than eager in that state), eager elsewhere, and eager without the extension. Not a timing: the
    table's rules, one point inside each and one outside, with the cache off and on."""
    code = (
        "import json, os, torch, tpkernels, tpkernels.ops as ops\n"
        "from tpkernels import extension, reference\n"
        "assert not ops.INTERPRETED\n"
        "table = json.load(open(os.path.join(os.path.dirname(ops.__file__), 'backend_table_cpu.json')))\n"
        "cpu = extension.has('cpu')\n"
        "def expected(dtype, M, activation, packed, KN):  # the table read by hand: its first matching, available rule\n"
        "    for r in table['rules']:\n"
        "        if dtype in r.get('dtypes', [dtype]) and activation in r.get('activations', [activation]) \\\n"
        "                and r.get('min_m', 0) <= M <= r.get('max_m', M) and r.get('packed', packed) == packed \\\n"
        "                and KN >= r.get('min_weight_elements', 0) and (cpu or r['backend'] != 'cpu'):\n"
        "            return r['backend']\n"
        "    return 'eager'\n"
        "for packed in (False, True) if cpu else (False,):\n"
        "    if cpu:\n"
        "        extension.cpu_weight_cache(enabled=packed)\n"
        "    for rule in table['rules']:\n"
        "        for M in {rule.get('min_m', 1), rule.get('max_m', 1 << 20), rule.get('max_m', 1 << 20) + 1}:\n"
        "            for dtype in rule.get('dtypes', ['float32', 'bfloat16']):\n"
        "                for activation in rule.get('activations', [0, 1, 2]):\n"
        "                    for N, K in ((4096, 4096), (64, 64)):  # a weight above the smallest measured, one below\n"
        "                        got = ops.auto_backend('cpu', getattr(torch, dtype), M, N, K, activation)\n"
        "                        want = expected(dtype, M, activation, packed, N * K)\n"
        "                        assert got == want, (rule, M, N, K, dtype, activation, packed, got)\n"
        "assert not cpu or ops.auto_backend('cpu', torch.float32, 64, 4096, 4096, 1) == 'cpu', 'the table has no win'\n"
        "assert ops.auto_backend('cpu', torch.float64, 8, 64, 64, 1) == 'eager'  # no rule names float64\n"
        "x, w, b = torch.randn(5, 7), torch.randn(3, 7), torch.randn(3)\n"
        "torch.testing.assert_close(tpkernels.linear_gelu(x, w, b), reference.linear_gelu(x, w, b))\n"
        "assert torch.equal(tpkernels.linear_gelu(x, w, b, backend='eager'), reference.linear_gelu(x, w, b))\n"
        "assert torch.equal(tpkernels.linear_partial(x, w, b, backend='eager'), torch.nn.functional.linear(x, w, b))\n"
        "print('ok')\n"
    )
    assert run_python(code) == "ok"


@pytest.mark.parametrize("device", DEVICES)
def test_custom_ops_pass_opcheck(device):
    x, w, b = linear_inputs((6,), 10, 9, torch.float32, device, requires_grad=True)
    r = randn(6, 9, device=device, requires_grad=True)
    torch.library.opcheck(torch.ops.tpkernels.fused_linear.default, (x, w, b, r, 1, True, torch.float32, True))
    torch.library.opcheck(torch.ops.tpkernels.fused_linear.default, (x, w, b, None, 0, False, torch.float32, False))
    out = torch.empty(6, 9, device=device)
    torch.library.opcheck(torch.ops.tpkernels.fused_linear_out.default, (x.detach(), w.detach(), b.detach(), None, True, out))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_forward_and_backward(device):
    def mlp(x, w1, b1, w2, b2, r):
        h = tpkernels.linear_gelu(x, w1, b1, approximate="tanh")
        return tpkernels.linear_partial(h, w2, b2, residual=r, out_dtype=torch.float32) * 0.5

    torch._dynamo.reset()
    compiled = torch.compile(mlp, fullgraph=True)
    x, w1, b1 = linear_inputs((2, 7), 24, 40, torch.float32, device, requires_grad=True)
    _, w2, b2 = linear_inputs((1,), 40, 24, torch.float32, device, requires_grad=True)
    r = randn(2, 7, 24, device=device, requires_grad=True)
    inputs = (x, w1, b1, w2, b2, r)
    out = compiled(*inputs)
    expected = mlp(*inputs)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, inputs, grad_out), torch.autograd.grad(expected, inputs, grad_out)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_inference_runs_the_op_directly_only_in_plain_eager(device, monkeypatch):
    """Without autograd, linear_gelu, linear_partial and mlp_shard call their op's implementation
    directly (no dispatcher: half of a call's host time); torch.compile, FakeTensor tracing and dispatch
    modes still see the op, and the results are the op's."""
    x, w1, b1 = linear_inputs((5,), 24, 40, torch.float32, device)
    _, w2, b2 = linear_inputs((1,), 40, 24, torch.float32, device)
    calls = []
    for name in ("fused_linear_inference", "mlp_shard_impl"):
        real = getattr(custom_ops, name)
        monkeypatch.setattr(custom_ops, name, lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))

    def model(x):
        h = tpkernels.linear_gelu(x, w1, b1, backend="triton")
        return tpkernels.linear_partial(h, w2, b2, backend="triton"), tpkernels.mlp_shard(x, w1, b1, w2, b2,
                                                                                            backend="triton")

    with torch.no_grad():
        direct = model(x)
    # linear_gelu, linear_partial, then mlp_shard (whose two stages are the same function)
    assert calls == ["fused_linear_inference"] * 2 + ["mlp_shard_impl"] + ["fused_linear_inference"] * 2
    torch.testing.assert_close(direct[0], direct[1])
    expected = reference.linear_partial(reference.linear_gelu(x, w1, b1), w2, b2)
    assert_close_to_ref(direct[0], expected, reference.linear_partial(
        reference.linear_gelu(x.double(), w1.double(), b1.double()), w2.double(), b2.double()))

    calls.clear()
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake = model(mode.from_tensor(x))  # the op's fake impl: no launch on a fake tensor
    assert [tuple(t.shape) for t in fake] == [(5, 24), (5, 24)] and calls == []
    assert ops.direct_call_ok(x) and not ops.direct_call_ok(mode.from_tensor(x))

    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)(x)
    torch.testing.assert_close(compiled, direct)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("owner,residual,fp32_out", [(True, True, False), (False, True, True), (True, False, True)])
def test_mlp_shard_matches_eager(device, dtype, approximate, owner, residual, fp32_out):
    """Both shards in one op, forward and every gradient: the backward's dGELU epilogue, dX, dW1, db1, dW2,
    db2 and the residual's gradient against eager and fp64."""
    lead, K, H, N = (3, 7), 24, 37, 19
    x, w1, b1 = linear_inputs(lead, K, H, dtype, device, requires_grad=True)
    _, w2, b2 = linear_inputs((1,), H, N, dtype, device, requires_grad=True)
    out_dtype = torch.float32 if fp32_out else None
    r = randn(*lead, N, dtype=out_dtype or dtype, device=device, requires_grad=True) if residual else None

    def fused(x, w1, b1, w2, b2, r):
        return tpkernels.mlp_shard(x, w1, b1, w2, b2, approximate=approximate, residual=r, owner=owner,
                                   out_dtype=out_dtype)

    def eager(x, w1, b1, w2, b2, r):
        h = reference.linear_gelu(x, w1, b1, approximate=approximate)
        if not owner:
            b2, r = b2 * 0, None if r is None else r * 0  # not the owner: no bias, no residual, same graph
        if x.dtype == torch.float64:
            return reference.linear_partial(h, w2, b2, residual=r)
        return reference.linear_partial(h, w2, b2, residual=r, out_dtype=out_dtype)

    if owner:
        check_forward_backward(fused, eager, (x, w1, b1, w2, b2, r), ("x", "w1", "b1", "w2", "b2", "residual"))
        return
    out = fused(x, w1, b1, w2, b2, r)
    assert_close_to_ref(out, eager(x, w1, b1, w2, b2, r), eager(*fp64(x, w1, b1, w2, b2, r)))
    grad_out = randn(*out.shape, dtype=out.dtype, device=device)
    db2, dr = torch.autograd.grad(out, [b2, r], grad_out)  # replicated: the full gradient on every rank
    torch.testing.assert_close(db2.double(), grad_out.double().flatten(0, -2).sum(0), rtol=1e-2, atol=2e-2)
    assert torch.equal(dr, grad_out.to(r.dtype))


@pytest.mark.parametrize("device", DEVICES)
def test_mlp_shard_backward_launches_plain_gemms(device, monkeypatch):
    """The MLP backward: one dGELU-epilogue GEMM for dZ, then plain GEMMs; no elementwise dGELU pass."""
    if not launch.runs_triton(torch.empty(0, device=device)):
        pytest.skip("CPU tensors run eager without TRITON_INTERPRET=1")
    launches = []
    real_matmul, real_linear = launch.matmul, launch.linear
    monkeypatch.setattr(launch, "matmul", lambda *a, **k: launches.append(k.get("grad_activation", 0)) or real_matmul(*a, **k))
    monkeypatch.setattr(launch, "linear", lambda *a, **k: launches.append(0) or real_linear(*a, **k))
    monkeypatch.setattr(launch, "dgelu", lambda *a, **k: pytest.fail("the MLP backward must not run a dGELU pass"))
    x, w1, b1 = linear_inputs((8,), 16, 12, torch.float32, device, requires_grad=True)
    _, w2, b2 = linear_inputs((1,), 12, 10, torch.float32, device, requires_grad=True)
    tpkernels.mlp_shard(x, w1, b1, w2, b2).sum().backward()
    assert launches == [0, 0, 0, ops.GELU, 0, 0]  # fc1, fc2 forward; dW2, dZ, dX, dW1


def test_mlp_shard_bad_input_is_refused_before_launch(monkeypatch):
    for name in ("matmul", "linear"):
        monkeypatch.setattr(launch, name, lambda *a, **k: pytest.fail("a kernel launched on bad input"))
    x, w1, b1 = linear_inputs((8,), 16, 12, torch.float32, "cpu")
    _, w2, b2 = linear_inputs((1,), 12, 10, torch.float32, "cpu")
    cases = [
        (ValueError, r"w2 has shape \(10, 11\) but w1 \(12, 16\) makes 12 hidden features",
         lambda: tpkernels.mlp_shard(x, w1, b1, w2[:, :11], b2)),
        (ValueError, r"bias has shape \(9,\)", lambda: tpkernels.mlp_shard(x, w1, b1, w2, b2[:9])),
        (TypeError, r"weight.dtype is torch.float16", lambda: tpkernels.mlp_shard(x, w1, b1, w2.half(), b2)),
        (ValueError, r"residual has shape \(8, 9\) but the output is \(8, 10\)",
         lambda: tpkernels.mlp_shard(x, w1, b1, w2, b2, residual=randn(8, 9))),
        (ValueError, r"approximate must be", lambda: tpkernels.mlp_shard(x, w1, b1, w2, b2, approximate="erf")),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


@pytest.mark.parametrize("device", DEVICES)
def test_mlp_shard_ops_pass_opcheck(device):
    x, w1, b1 = linear_inputs((6,), 10, 9, torch.float32, device, requires_grad=True)
    _, w2, b2 = linear_inputs((1,), 9, 7, torch.float32, device, requires_grad=True)
    torch.library.opcheck(torch.ops.tpkernels.mlp_shard.default,
                          (x, w1, b1, w2, b2, None, 1, True, torch.float32, True, False))
    inference = [t.detach() for t in (x, w1, b1, w2, b2)]  # nothing stored: no gradient to take
    torch.library.opcheck(torch.ops.tpkernels.mlp_shard.default,
                          (*inference, None, 2, False, torch.float32, False, False))
    if extension.has(device):
        torch.library.opcheck(torch.ops.tpkernels.mlp_shard.default,
                              (x, w1, b1, w2, b2, None, 2, True, torch.float32, True, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_mlp_shard_on_the_tma_kernel(device, dtype):
    """The persistent TMA kernel behind the autograd op, forward and backward (every layout it takes)."""
    x, w1, b1 = linear_inputs((2, 9), 24, 40, dtype, device, requires_grad=True)
    _, w2, b2 = linear_inputs((1,), 40, 16, dtype, device, requires_grad=True)

    def fused(x, w1, b1, w2, b2):
        with ops.use_matmul_kernel("tma"):
            return tpkernels.mlp_shard(x, w1, b1, w2, b2, approximate="tanh")

    def eager(x, w1, b1, w2, b2):
        return reference.linear_partial(reference.linear_gelu(x, w1, b1, approximate="tanh"), w2, b2)

    with ops.use_matmul_kernel("tma"), launch.record_launches() as launches:
        check_forward_backward(fused, eager, (x, w1, b1, w2, b2), ("x", "w1", "b1", "w2", "b2"))
    if launch.runs_triton(x):
        assert [line.split()[0] for line in launches] == ["tma"] * 6, launches  # fc1, fc2; dW2, dZ, dX, dW1


needs_extension = pytest.mark.skipif(not extension.has("cpu"), reason="the native extension is not built")


def _check_both_functions_on(backend, approximate, x, w, b, r):
    """linear_gelu, and linear_partial with an fp32 residual and fp32 partials, on one backend: forward
    and backward against eager and fp64."""

    def fused(x, w, b):
        return tpkernels.linear_gelu(x, w, b, approximate=approximate, backend=backend)

    def eager(x, w, b):
        return reference.linear_gelu(x, w, b, approximate=approximate)

    check_forward_backward(fused, eager, (x, w, b), ("x", "weight", "bias"))

    def fused_partial(x, w, b, r):
        return tpkernels.linear_partial(x, w, b, residual=r, out_dtype=torch.float32, backend=backend)

    def eager_partial(x, w, b, r):
        if x.dtype == torch.float64:
            return reference.linear_partial(x, w, b, residual=r)
        return reference.linear_partial(x, w, b, residual=r, out_dtype=torch.float32)

    check_forward_backward(fused_partial, eager_partial, (x, w, b, r), ("x", "weight", "bias", "residual"))


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,N", SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_native_cpu_backend_matches_eager(dtype, lead, K, N, approximate):
    """The C++ extension's CPU kernels (GEMM, then one vectorized parallel epilogue pass) forward and
    backward, through the public functions, against eager and fp64."""
    x, w, b = linear_inputs(lead, K, N, dtype, "cpu", requires_grad=True)

    _check_both_functions_on("cpu", approximate, x, w, b, randn(*lead, N, dtype=torch.float32, requires_grad=True))


@needs_extension
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_native_mlp_shard_matches_eager(dtype, approximate):
    """mlp_shard on the extension: its backward's dGELU-epilogue GEMM (epilogue_dgelu_linear) included."""
    x, w1, b1 = linear_inputs((3, 7), 24, 37, dtype, "cpu", requires_grad=True)
    _, w2, b2 = linear_inputs((1,), 37, 19, dtype, "cpu", requires_grad=True)

    def fused(x, w1, b1, w2, b2):
        return tpkernels.mlp_shard(x, w1, b1, w2, b2, approximate=approximate, backend="cpu")

    def eager(x, w1, b1, w2, b2):
        return reference.linear_partial(reference.linear_gelu(x, w1, b1, approximate=approximate), w2, b2)

    check_forward_backward(fused, eager, (x, w1, b1, w2, b2), ("x", "w1", "b1", "w2", "b2"))


def _check_gelu_on_cpu_backend(x, w, b):
    out = tpkernels.linear_gelu(x, w, b, backend="cpu")
    assert_close_to_ref(out, reference.linear_gelu(x, w, b), reference.linear_gelu(*fp64(x, w, b)))


@pytest.fixture
def weight_cache():
    """The CPU backend's packed-weight cache, on for the test and back as it was after."""
    before = extension.cpu_weight_cache()
    yield extension.cpu_weight_cache(enabled=True, max_bytes=1 << 30)
    extension.cpu_weight_cache(enabled=before["enabled"], max_bytes=before["max_bytes"])


@needs_extension
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")
def test_native_cpu_backend_packs_each_weight_version_once(weight_cache):
    """With the cache on, the CPU backend runs oneDNN on a packed copy of the weight: made on first use,
    found again by a view made anew for the call, made again after an in-place write (a stale copy would
    give the old weight's result), not kept for inference tensors or over the budget, dropped with the
    weight, and not made at all with the cache off."""
    x, w, b = linear_inputs((5,), 24, 40, torch.float32, "cpu")

    def delta(before):
        after = extension.cpu_weight_cache()
        return {k: after[k] - before[k] for k in ("hits", "packs", "refused")}

    start = extension.cpu_weight_cache()
    _check_gelu_on_cpu_backend(x, w, b)
    assert delta(start) == {"hits": 0, "packs": 1, "refused": 0}
    start = extension.cpu_weight_cache()
    _check_gelu_on_cpu_backend(randn(3, 24), w.view(40, 24), b)  # a new TensorImpl over the same view
    _check_gelu_on_cpu_backend(x, w, b)
    assert delta(start) == {"hits": 2, "packs": 0, "refused": 0}
    start = extension.cpu_weight_cache()
    _check_gelu_on_cpu_backend(randn(1, 24), randn(40, 24, scale=24 ** -0.5), b)  # fp32 at one row: plain
    assert delta(start) == {"hits": 0, "packs": 0, "refused": 0}

    start = extension.cpu_weight_cache()
    with torch.no_grad():
        w.copy_(randn(40, 24, scale=24 ** -0.5))  # what an optimizer step or load_state_dict does
    _check_gelu_on_cpu_backend(x, w, b)
    big = randn(80, 24, scale=24 ** -0.5)
    _check_gelu_on_cpu_backend(x, big[40:], b)  # a shard: its own view of another storage
    _check_gelu_on_cpu_backend(x, big[:40], b)
    assert delta(start) == {"hits": 0, "packs": 3, "refused": 0}

    held = extension.cpu_weight_cache()["weights"]
    del big
    _check_gelu_on_cpu_backend(x, randn(40, 24, scale=24 ** -0.5), b)  # freed weights go at the next copy
    assert extension.cpu_weight_cache()["weights"] <= held - 1

    with torch.inference_mode():  # no version counter: always plain
        x_inf, w_inf, b_inf = linear_inputs((5,), 24, 40, torch.float32, "cpu")
        start = extension.cpu_weight_cache()
        _check_gelu_on_cpu_backend(x_inf, w_inf, b_inf)
        assert delta(start) == {"hits": 0, "packs": 0, "refused": 0}

    small = extension.cpu_weight_cache(max_bytes=40 * 24 * 4 - 1)  # one byte short of w's copy
    assert small["bytes"] == 0 and small["weights"] == 0
    start = extension.cpu_weight_cache()
    _check_gelu_on_cpu_backend(x, w, b)
    assert delta(start) == {"hits": 0, "packs": 0, "refused": 1}

    off = extension.cpu_weight_cache(enabled=False, max_bytes=1 << 30)
    assert not off["enabled"] and off["weights"] == 0
    start = extension.cpu_weight_cache()
    _check_gelu_on_cpu_backend(x, w, b)
    assert delta(start) == {"hits": 0, "packs": 0, "refused": 0}
    with pytest.raises(ValueError, match="max_bytes must be None or an int >= 0, got -5"):
        extension.cpu_weight_cache(max_bytes=-5)
    with pytest.raises(TypeError, match="enabled must be None, True or False, got 1"):
        extension.cpu_weight_cache(enabled=1)


@needs_extension
def test_weight_cache_environment_switch():
    """TPKERNELS_CPU_WEIGHT_CACHE=1 turns the cache on at import, 0 leaves it off, anything else is refused."""
    import os
    import subprocess
    import sys

    code = "import tpkernels; print(tpkernels.extension.cpu_weight_cache()['enabled'])"
    for value, expected in (("1", "True"), ("0", "False"), ("yes", None)):
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                env=dict(os.environ, TPKERNELS_CPU_WEIGHT_CACHE=value))
        if expected is None:
            assert result.returncode != 0 and "TPKERNELS_CPU_WEIGHT_CACHE='yes': use 1" in result.stderr
        else:
            assert result.returncode == 0 and result.stdout.strip() == expected, result.stderr[-2000:]


@needs_extension
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_native_cpu_backend_matches_eager_with_packed_weights(weight_cache, dtype):
    """Forward and backward with the cache on (the training forward stores z; the row stage's fp32
    partials of bf16 operands run on a widened packed copy), twice, so the second call runs the copy."""
    x, w, b = linear_inputs((3, 7), 40, 24, dtype, "cpu", requires_grad=True)
    r = randn(3, 7, 24, dtype=torch.float32, requires_grad=True)
    for _ in range(2):
        _check_both_functions_on("cpu", "tanh", x, w, b, r)
    assert extension.cpu_weight_cache()["hits"] > weight_cache["hits"]


@needs_extension
def test_native_cpu_backend_ops_pass_opcheck_and_compile():
    x, w, b = linear_inputs((6,), 10, 9, torch.float32, "cpu", requires_grad=True)
    r = randn(6, 9, requires_grad=True)
    torch.library.opcheck(torch.ops.tpkernels.epilogue_linear.default, (x, w, b, r, 2, True, torch.float32, True))
    torch.library.opcheck(torch.ops.tpkernels.epilogue_linear.default, (x, w, b, None, 0, False, torch.float32, False))
    # The row stage's pre-activation is its output before the residual, whatever path adds it.
    for args in ((x, w, b, r, 0, True, torch.float32, True), (x, w, b, r, 0, True, torch.float32, False)):
        out, preact = torch.ops.tpkernels.epilogue_linear(*args)
        torch.testing.assert_close(out, torch.nn.functional.linear(x, w, b) + r)
        if args[-1]:
            torch.testing.assert_close(preact, torch.nn.functional.linear(x, w, b))
    torch.library.opcheck(torch.ops.tpkernels.epilogue_dgelu_linear.default,
                          (randn(6, 4), randn(4, 9), randn(6, 9), 1, True))

    def f(x, w, b):
        return tpkernels.linear_gelu(x, w, b, approximate="tanh", backend="cpu") * 2

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(x, w, b), f(x, w, b))


def test_out_buffer_calls_resolve_their_backend(monkeypatch):
    """linear_partial(..., out=buf) checks and follows `backend` as every other call does: an unknown or
    unavailable backend is refused before anything runs, and eager never launches a kernel."""
    x, w, b = linear_inputs((2, 4), 8, 6, torch.float32, "cpu")
    residual = randn(2, 4, 6)
    out = torch.full((2, 4, 6), float("nan"))
    for backend, message in (("nonsense", "backend must be one of"), ("cublaslt", "backend='cublaslt' needs CUDA")):
        with pytest.raises(ValueError, match=message):
            tpkernels.linear_partial(x, w, b, residual=residual, out=out, backend=backend)
    assert out.isnan().all(), "a refused call wrote into out"
    for name in ("matmul", "linear"):
        monkeypatch.setattr(launch, name, lambda *a, **k: pytest.fail("backend='eager' launched a kernel"))
    result = tpkernels.linear_partial(x, w, b, residual=residual, out=out, backend="eager")
    assert result is out
    torch.testing.assert_close(out, reference.linear_partial(x, w, b, residual=residual))
    if not extension.has("cpu"):
        with pytest.raises(ValueError, match="backend='cpu' needs CPU tensors"):
            tpkernels.linear_partial(x, w, b, out=out, backend="cpu")
        return
    out.fill_(float("nan"))
    tpkernels.linear_partial(x, w, b, residual=residual, out=out, backend="cpu")
    torch.testing.assert_close(out, reference.linear_partial(x, w, b, residual=residual))


def test_backend_choice_and_refusals(monkeypatch):
    x, w, b = linear_inputs((4,), 8, 6, torch.float32, "cpu")
    with pytest.raises(ValueError, match="backend must be one of auto, triton, cublaslt, cpu, eager, got 'fast'"):
        tpkernels.linear_gelu(x, w, b, backend="fast")
    with pytest.raises(ValueError, match="backend='cublaslt' needs CUDA tensors"):
        tpkernels.linear_gelu(x, w, b, approximate="tanh", backend="cublaslt")
    with pytest.raises(ValueError, match="backend must be one of"):
        tpkernels.TensorParallelMLP(8, 16, backend="cuBLAS")
    # auto on CUDA follows the committed table; cuBLASLt only where the extension has CUDA kernels
    monkeypatch.setattr(extension, "has", lambda device_type: True)
    # the H200 table: cuBLASLt where it won beyond the noise (bf16 tanh GELU below 2048 rows), Triton on a tie
    assert ops.auto_backend("cuda", torch.bfloat16, 64, 4096, 4096, ops.GELU_TANH) == "cublaslt"
    assert ops.auto_backend("cuda", torch.bfloat16, 1, 4096, 4096, ops.GELU_TANH) == "cublaslt"
    assert ops.auto_backend("cuda", torch.bfloat16, 64, 4096, 4096, ops.GELU) == "triton"  # exact GELU
    assert ops.auto_backend("cuda", torch.bfloat16, 8192, 4096, 4096, ops.GELU_TANH) == "triton"  # a tie
    assert ops.auto_backend("cuda", torch.bfloat16, 8192, 4096, 4096, ops.IDENTITY) == "triton"  # a tie
    assert ops.auto_backend("cuda", torch.float32, 64, 4096, 4096, ops.GELU_TANH) == "triton"  # not measured
    monkeypatch.setattr(extension, "has", lambda device_type: False)
    assert ops.auto_backend("cuda", torch.bfloat16, 64, 4096, 4096, ops.GELU_TANH) == "triton"
    report = tpkernels.backends()
    assert set(report) == {"extension", "triton", "table", "cpu_table", "cpu_weight_cache", "auto"}
    assert report["cpu_weight_cache"] is None  # no CPU kernels, no cache
    assert "cpu float32 M=1" in report["auto"] and "cpu bfloat16 M=4096" in report["auto"]


def test_the_package_works_without_its_extension():
    """As after a failed or skipped build: the import still works, and CPU tensors run Triton or eager."""
    code = (
        "import sys, torch\n"
        "sys.modules['tpkernels._C'] = None  # an import of it now fails, as when it was not built\n"
        "import tpkernels, tpkernels.ops as ops\n"
        "assert not tpkernels.extension.LOADED and not tpkernels.extension.has('cpu')\n"
        "assert 'not built' in tpkernels.backends()['extension']\n"
        "x, w, b = torch.randn(5, 7), torch.randn(3, 7), torch.randn(3)\n"
        "torch.testing.assert_close(tpkernels.linear_gelu(x, w, b), tpkernels.reference.linear_gelu(x, w, b))\n"
        "try:\n"
        "    tpkernels.linear_gelu(x, w, b, backend='cpu')\n"
        "except ValueError as e:\n"
        "    assert 'native extension' in str(e)\n"
        "else:\n"
        "    raise AssertionError('backend=cpu ran without the extension')\n"
        "print('ok')\n"
    )
    for interpret in (False, True):
        assert run_python(code, interpret=interpret) == "ok"



@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_cublaslt_backend_matches_eager(dtype):
    """The extension's cuBLASLt epilogues: GELU_AUX_BIAS forward, BGRADB backward, residual through C,
    fp32 partials through D's type, and the MLP's DGELU_BGRAD, against eager and fp64."""
    if not extension.has("cuda"):
        pytest.skip("the extension's CUDA part is not built")
    x, w, b = linear_inputs((3, 70), 96, 136, dtype, "cuda", requires_grad=True)

    r = randn(3, 70, 136, dtype=torch.float32, device="cuda", requires_grad=True)
    _check_both_functions_on("cublaslt", "tanh", x, w, b, r)
    _, w2, b2 = linear_inputs((1,), 136, 96, dtype, "cuda", requires_grad=True)

    def fused_mlp(x, w, b, w2, b2):
        return tpkernels.mlp_shard(x, w, b, w2, b2, approximate="tanh", backend="cublaslt")

    def eager_mlp(x, w, b, w2, b2):
        return reference.linear_partial(reference.linear_gelu(x, w, b, approximate="tanh"), w2, b2)

    check_forward_backward(fused_mlp, eager_mlp, (x, w, b, w2, b2), ("x", "w1", "b1", "w2", "b2"))


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_a_non_owner_still_gives_bias_and_residual_their_gradient(backend, with_residual):
    """owner=False adds neither bias nor residual, yet their gradients are sum(dY) and dY on every rank
    (replicated parameters stay identical), on the eager path too (it gave None for the bias)."""
    x = torch.randn(3, 8, requires_grad=True)
    w = torch.randn(5, 8, requires_grad=True)
    b = torch.randn(5, requires_grad=True)
    r = torch.randn(3, 5, requires_grad=True) if with_residual else None
    grad = torch.randn(3, 5)
    out = tpkernels.linear_partial(x, w, b, residual=r, owner=False, backend=backend)
    torch.testing.assert_close(out, x @ w.t())
    grads = torch.autograd.grad(out, (b, r) if with_residual else (b,), grad)
    torch.testing.assert_close(grads[0], grad.sum(0))
    if with_residual:
        torch.testing.assert_close(grads[1], grad)
