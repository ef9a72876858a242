"""The gated MLP: linear_glu and glu_mlp_shard against eager and fp64 (every kernel of the family that has a
gated form), bad input, torch.compile; TensorParallelGatedMLP on 1 to 4 ranks against the dense block,
with sizes that do not divide, empty shards, a merged gate_up weight, sequence parallelism and overlap."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tpkernels
from numerics import (DEVICES, DTYPES, assert_close_to_ref, assert_compiled_matches_eager, check_forward_backward,
                      compare_params, linear_inputs, randn, same_everywhere)
from spawn import check_scenario, rank_setups, run_scenarios, scenario_outcomes
from tpkernels import TensorParallelGatedMLP, custom_ops_gated, launch, reference
from tpkernels import distributed as tpd
from tpkernels.dtensor import local
from tpkernels.kernels import GLU
from tpkernels.ops import GATED_ACTIVATIONS

ACTIVATIONS = list(GATED_ACTIVATIONS)
# (leading dims, K, F, activation, bias): odd sizes, every activation, with and without a bias
CASES = [((1,), 33, 17, "silu", True), ((3, 5), 24, 35, "silu", False), ((3, 5), 24, 35, "gelu_tanh", True),
         ((1,), 33, 17, "gelu", False)]


def _glu_inputs(lead, K, F_, dtype, device, bias):
    x, w, b = linear_inputs(lead, K, 2 * F_, dtype, device, bias=bias, requires_grad=True)
    return x, w, b


def _eager_glu(activation):
    code = GATED_ACTIVATIONS[activation]

    def eager(x, w, b):
        g, u = F.linear(x, w, b).chunk(2, dim=-1)
        return reference.activation(g, code) * u

    return eager


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,K,F_,activation,bias", CASES)
def test_linear_glu_matches_eager(device, dtype, lead, K, F_, activation, bias):
    x, w, b = _glu_inputs(lead, K, F_, dtype, device, bias)

    def fused(x, w, b):
        return tpkernels.linear_glu(x, w, b, activation=activation)

    check_forward_backward(fused, _eager_glu(activation), (x, w, b), ("x", "weight", "bias"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernel", ["pointer", "splitk", "tma"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_the_gated_kernel_writes_every_output_once(device, kernel, activation):
    """The one launch on poisoned buffers, on the pointer, split-K (M = 3, a long K: several splits) and
    persistent TMA kernels (16-bit, as the launcher runs it): h and the stored [g | u] are all written, and
    right; the launch is one kernel, and the launch it binds (for TMA: descriptors over the whole [2F, K])
    gives the same bits."""
    M, K, F_ = (3, 256, 45) if kernel != "tma" else (37, 96, 40)  # TMA: 16-byte aligned rows
    dtype = torch.float16 if kernel == "tma" else torch.float32
    x, w, b = linear_inputs((M,), K, 2 * F_, dtype, device)
    h = torch.full((M, F_), float("nan"), device=device, dtype=dtype)
    gu = torch.full((M, 2 * F_), float("nan"), device=device, dtype=dtype)
    code = GATED_ACTIVATIONS[activation]
    with launch.use_matmul_kernel(kernel), launch.record_launches() as launches:
        launch.linear(x, w[:F_], h, bias=b[:F_], preact=gu[:, :F_], activation=GLU + code)
    assert len(launches) == 1 and launches[0].startswith(kernel), launches
    if kernel == "splitk" and device == "cpu":
        assert "split=1" not in launches[0], launches
    z64 = F.linear(x.double(), w.double(), b.double())
    eager = _eager_glu(activation)(x, w, b)
    ref = _eager_glu(activation)(x.double(), w.double(), b.double())
    assert_close_to_ref(h, eager, ref, "h")
    assert_close_to_ref(gu, F.linear(x, w, b), z64, "[g | u]")
    again = torch.full_like(h, float("nan"))  # the launch bound by the first call
    with launch.use_matmul_kernel(kernel):
        launch.linear(x, w[:F_], again, bias=b[:F_], preact=gu[:, :F_], activation=GLU + code)
    assert torch.equal(again, h)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation,owner,residual,fp32_out", [("silu", True, True, False),
                                                                 ("gelu_tanh", False, False, True),
                                                                 ("gelu", True, False, True)])
def test_glu_mlp_shard_matches_eager(device, dtype, activation, owner, residual, fp32_out):
    """Both stages in one op, forward and every gradient: [dG | dU] from the dH GEMM's epilogue, dX, the
    gate's and up's dW and db, dW2, db2 and the residual's gradient against eager and fp64."""
    lead, K, F_, N = (3, 7), 24, 37, 19
    x, gate, gate_bias = linear_inputs(lead, K, F_, dtype, device, requires_grad=True)
    _, up, up_bias = linear_inputs((1,), K, F_, dtype, device, requires_grad=True)
    _, w2, b2 = linear_inputs((1,), F_, N, dtype, device, requires_grad=True)
    out_dtype = torch.float32 if fp32_out else None
    r = randn(*lead, N, dtype=out_dtype or dtype, device=device, requires_grad=True) if residual else None
    code = GATED_ACTIVATIONS[activation]

    def fused(x, gate, up, gate_bias, up_bias, w2, b2, r):
        return tpkernels.glu_mlp_shard(x, gate, up, gate_bias, up_bias, w2, b2, activation=activation, residual=r,
                                       owner=owner, out_dtype=out_dtype)

    def eager(x, gate, up, gate_bias, up_bias, w2, b2, r):
        h = reference.glu(x, gate, up, gate_bias, up_bias, code)
        if x.dtype == torch.float64:
            return reference.linear_partial(h, w2, b2, residual=r, owner=owner)
        return reference.linear_partial(h, w2, b2, residual=r, owner=owner, out_dtype=out_dtype)

    names = ("x", "gate", "up", "gate_bias", "up_bias", "w2", "b2", "residual")
    check_forward_backward(fused, eager, (x, gate, up, gate_bias, up_bias, w2, b2, r), names)


@pytest.mark.parametrize("device", DEVICES)
def test_gate_and_up_in_two_buffers_are_still_right(device):
    """gate and up that are not one buffer (FSDP2's unsharded parameters, a user's two tensors): the forward
    copies them together, the backward's dX runs as two GEMMs, and every result is the same."""
    x, gate, _ = linear_inputs((5,), 24, 13, torch.float32, device, bias=False, requires_grad=True)
    up = randn(13, 24, device=device, scale=0.2, requires_grad=True)
    _, w2, _ = linear_inputs((1,), 13, 9, torch.float32, device, bias=False, requires_grad=True)
    assert not custom_ops_gated.adjacent(gate, up)
    merged = torch.cat([gate, up]).detach().requires_grad_()
    assert custom_ops_gated.adjacent(merged[:13], merged[13:])
    out = tpkernels.glu_mlp_shard(x, gate, up, None, None, w2, None)
    out_merged = tpkernels.glu_mlp_shard(x, merged[:13], merged[13:], None, None, w2, None)
    torch.testing.assert_close(out, out_merged)
    grad = torch.randn_like(out)
    out.backward(grad)
    out_merged.backward(grad)
    torch.testing.assert_close(torch.cat([gate.grad, up.grad]), merged.grad)


def test_bad_input_is_refused_with_the_numbers():
    x, w, b = linear_inputs((4,), 8, 6, torch.float32, "cpu")
    with pytest.raises(ValueError, match="5 rows, an odd number"):
        tpkernels.linear_glu(x, w[:5])
    with pytest.raises(ValueError, match="in_features=8"):
        tpkernels.linear_glu(x[:, :5], w)
    with pytest.raises(ValueError, match=r"bias has shape \(5,\)"):
        tpkernels.linear_glu(x, w, b[:5])
    with pytest.raises(ValueError, match="'relu'"):
        tpkernels.linear_glu(x, w, activation="relu")
    with pytest.raises(TypeError, match="float16"):
        tpkernels.linear_glu(x, w.half())
    with pytest.raises(ValueError, match="no gated"):
        tpkernels.linear_glu(x, w, backend="cublaslt")
    with pytest.raises(ValueError, match=r"up has shape \(2, 8\)"):
        tpkernels.glu_mlp_shard(x, w[:3], w[3:5], None, None, torch.randn(5, 3), None)
    with pytest.raises(ValueError, match="w2 must be"):
        tpkernels.glu_mlp_shard(x, w[:3], w[3:], None, None, torch.randn(5, 4), None)
    with pytest.raises(TypeError, match="FP8Recipe"):
        TensorParallelGatedMLP(8, 6, fp8="e4m3")
    from tpkernels.fp8 import FP8Scaling, MLP_TENSORS, fp8_glu_mlp_shard

    scaling = FP8Scaling(tpkernels.FP8Recipe(), MLP_TENSORS)
    for bad in ("relu", 7, True):
        with pytest.raises(ValueError, match="activation must be one of"):
            fp8_glu_mlp_shard(x, w[:3], w[3:], None, None, torch.randn(5, 3), None, scaling, activation=bad)
    with pytest.raises(ValueError, match="'tanh'"):
        TensorParallelGatedMLP(8, 6, activation="tanh")


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph_has_no_eager_gemm_or_activation(device):
    """One graph; its GEMMs and activations are the tpkernels ops, forward and backward, and the result is
    eager's."""
    seen = []

    def backend(gm, example_inputs):
        seen.extend(str(node.target) for node in gm.graph.nodes if node.op == "call_function")
        return gm.forward

    def block(x, gate, up, w2):
        return tpkernels.glu_mlp_shard(x, gate, up, None, None, w2, None, activation="silu")

    torch._dynamo.reset()
    x, gate, _ = linear_inputs((2, 7), 24, 40, torch.float32, device, bias=False, requires_grad=True)
    _, up, _ = linear_inputs((1,), 24, 40, torch.float32, device, bias=False, requires_grad=True)
    _, w2, _ = linear_inputs((1,), 40, 24, torch.float32, device, bias=False, requires_grad=True)
    out = torch.compile(block, fullgraph=True, backend=backend)(x, gate, up, w2)
    assert any("glu_mlp_shard" in t for t in seen), seen
    assert not any(name in t for t in seen for name in ("mm", "linear", "silu", "sigmoid", "gelu")
                   if "tpkernels" not in t), seen
    torch.testing.assert_close(out, block(x, gate, up, w2))
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True)
    inputs = (x, gate, up, w2)
    out = compiled(*inputs)
    grad = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, inputs, grad),
                               torch.autograd.grad(block(*inputs), inputs, grad))


# ---------------------------------------------------------------------------------------------------
# The module on ranks (gloo), against the dense block

IN, HIDDEN, OUT = 10, 13, 7  # 13 and 10 divide by none of 2, 3, 4
LEAD = (2, 3)


def _hidden_shards(tp):
    return slice(tp.gate_proj.shard_start, tp.gate_proj.shard_stop)


def _check_block(name, tp, dense, x, grad, world):
    """Output, input gradient, every parameter's gradient and SGD step against the dense block and fp64;
    one all-reduce forward and one backward."""
    import copy

    dense64 = copy.deepcopy(dense).double()
    x_tp, x_eager, x64 = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    with tpd.count_collectives() as fwd:
        y = tp(x_tp)
    y_eager, y64 = dense(x_eager), dense64(x64)
    assert_close_to_ref(y, y_eager, y64, f"{name} output")
    with tpd.count_collectives() as bwd:
        y.backward(grad)
    y_eager.backward(grad)
    y64.backward(grad.double())
    assert_close_to_ref(x_tp.grad, x_eager.grad, x64.grad, f"{name} input grad")
    rows = _hidden_shards(tp)
    shards = {"gate_proj.weight": rows, "up_proj.weight": rows, "down_proj.weight": (slice(None), rows)}
    if tp.down_proj.bias is not None:
        shards.update({"gate_proj.bias": rows, "up_proj.bias": rows, "down_proj.bias": slice(None)})
    compare_params(name, tp, dense, dense64, shards)
    return fwd.count(), bwd.count()


def gated(rank, world):
    counts = set()
    for activation, bias, hidden in (("silu", False, HIDDEN), ("gelu_tanh", True, HIDDEN), ("gelu", True, 5)):
        torch.manual_seed(21)
        dense = reference.GatedMLP(IN, hidden, OUT, bias=bias, activation=activation)
        torch.manual_seed(21)
        tp = TensorParallelGatedMLP(IN, hidden, OUT, bias=bias, activation=activation)
        rows = _hidden_shards(tp)
        # the fresh sharded block is the slice of the dense one built under the same seed, gate and up one buffer
        assert torch.equal(local(tp.gate_proj.weight), dense.gate_proj.weight[rows])
        assert torch.equal(local(tp.up_proj.weight), dense.up_proj.weight[rows])
        assert custom_ops_gated.adjacent(local(tp.gate_proj.weight), local(tp.up_proj.weight))
        x, grad = same_everywhere(*LEAD, IN, seed=22), same_everywhere(*LEAD, OUT, seed=23)
        counts.add(_check_block(f"gated {activation} hidden {hidden}", tp, dense, x, grad, world))
    assert counts == {(0, 0) if world == 1 else (1, 1)}, counts
    return "ok"


def built_from_dense_and_merged(rank, world):
    """from_dense of Llama-named layers and from_merged of a Phi-3 gate_up_proj give the dense block; the
    state dicts come back in the block's own names; a naive consecutive split of the merged weight would not."""
    torch.manual_seed(24)
    dense = reference.GatedMLP(IN, HIDDEN, OUT, bias=True)
    x = same_everywhere(*LEAD, IN, seed=25)
    expected = dense(x)
    tp = TensorParallelGatedMLP.from_dense(dense.gate_proj, dense.up_proj, dense.down_proj)
    torch.testing.assert_close(tp(x), expected)
    full = tp.full_state_dict()
    assert sorted(full) == sorted(dense.state_dict())
    for k, v in dense.state_dict().items():
        assert torch.equal(full[k], v), k
    merged = nn.Linear(IN, 2 * HIDDEN)
    with torch.no_grad():
        merged.weight.copy_(torch.cat([dense.gate_proj.weight, dense.up_proj.weight]))
        merged.bias.copy_(torch.cat([dense.gate_proj.bias, dense.up_proj.bias]))
    phi = TensorParallelGatedMLP.from_merged(merged, dense.down_proj)
    torch.testing.assert_close(phi(x), expected)
    full = phi.full_state_dict()
    assert sorted(full) == ["down_proj.bias", "down_proj.weight", "gate_up_proj.bias", "gate_up_proj.weight"]
    assert torch.equal(full["gate_up_proj.weight"], merged.weight) and torch.equal(full["gate_up_proj.bias"], merged.bias)
    # state_dict(): each of gate and up its own Shard(0) DTensor, never one merged tensor
    if world > 1:
        state = tp.state_dict()
        for key in ("gate_proj.weight", "up_proj.weight"):
            assert state[key].placements[0].is_shard(0) and tuple(state[key].shape) == (HIDDEN, IN)
    # up rows first in the merged weight ([up; gate]): the same block, and the same merged tensor back
    swapped = nn.Linear(IN, 2 * HIDDEN)
    with torch.no_grad():
        swapped.weight.copy_(torch.cat([dense.up_proj.weight, dense.gate_proj.weight]))
        swapped.bias.copy_(torch.cat([dense.up_proj.bias, dense.gate_proj.bias]))
    up_first = TensorParallelGatedMLP.from_merged(swapped, dense.down_proj, up_first=True)
    torch.testing.assert_close(up_first(x), expected)
    assert torch.equal(up_first.full_state_dict()["gate_up_proj.weight"], swapped.weight)
    # the trap, at a width every world size splits evenly (12): rank r's consecutive piece of the merged
    # [gate; up] is not [gate_r; up_r], and the block it makes is wrong
    torch.manual_seed(25)
    even = reference.GatedMLP(IN, 12, OUT)
    merged_even = nn.Linear(IN, 24, bias=False)
    with torch.no_grad():
        merged_even.weight.copy_(torch.cat([even.gate_proj.weight, even.up_proj.weight]))
    naive = TensorParallelGatedMLP.from_merged(merged_even, even.down_proj)
    with torch.no_grad():
        torch.testing.assert_close(naive(x), even(x))
        piece = tpd.shard(merged_even.weight.detach(), world, rank, 0)
        half = piece.shape[0] // 2
        assert half == local(naive.gate_proj.weight).shape[0]
        local(naive.gate_proj.weight).copy_(piece[:half])
        local(naive.up_proj.weight).copy_(piece[half:])
        error = (naive(x) - even(x)).abs().max().item()
    assert (error > 1e-2) == (world > 1), error  # one rank's one piece is the whole: right there
    return "ok"


def parallel_options(rank, world):
    """Sequence parallelism and overlap give the dense block's results on this rank's rows."""
    torch.manual_seed(26)
    dense = reference.GatedMLP(IN, HIDDEN, OUT, bias=False)
    x, grad = same_everywhere(7, IN, seed=27), same_everywhere(7, OUT, seed=28)
    for options in (dict(sequence_parallel=True, sequence_dim=0), dict(overlap=True),
                    dict(sequence_parallel=True, sequence_dim=0, overlap=True)):
        tp = TensorParallelGatedMLP.from_dense(dense.gate_proj, dense.up_proj, dense.down_proj, **options)
        part = tpd.shard(torch.arange(7), world, rank, 0) if options.get("sequence_parallel") else torch.arange(7)
        x_tp = x[part].clone().requires_grad_()
        y = tp(x_tp)
        x_ref = x.clone().requires_grad_()
        y_ref = dense(x_ref)
        torch.testing.assert_close(y, y_ref[part].detach(), msg=f"{options}")
        y.backward(grad[part])
        y_ref.backward(grad)
        torch.testing.assert_close(x_tp.grad, x_ref.grad[part], msg=f"{options}")
        dense.zero_grad()
    return "ok"


def compiled_gated(rank, world):
    torch.manual_seed(29)
    tp = TensorParallelGatedMLP(IN, HIDDEN, OUT)
    assert_compiled_matches_eager(tp, torch.compile(tp, fullgraph=True), same_everywhere(*LEAD, IN, seed=30),
                                  same_everywhere(*LEAD, OUT, seed=31))
    return "ok"


SCENARIOS = [gated, built_from_dense_and_merged, parallel_options]
_outcomes = scenario_outcomes(SCENARIOS)  # one spawn per (backend, device, world size), cached


@pytest.mark.parametrize("setup", rank_setups([1, 2, 3, 4]))
@pytest.mark.parametrize("scenario", [s.__name__ for s in SCENARIOS])
def test_gated_mlp_on_ranks(scenario, setup):
    check_scenario(_outcomes(setup), scenario)


def test_torch_compile_fullgraph_of_the_gated_mlp_on_two_ranks():
    check_scenario(run_scenarios([compiled_gated], 2), "compiled_gated")


def test_packing_survives_moves_and_loads():
    """gate and up stay one buffer after .to(), load_state_dict and load_full_state_dict, and a block whose
    buffers were split apart (assign=True) is still right."""
    torch.manual_seed(32)
    dense = reference.GatedMLP(IN, HIDDEN, OUT)
    tp = TensorParallelGatedMLP.from_dense(dense.gate_proj, dense.up_proj, dense.down_proj)
    x = torch.randn(3, IN)

    def packed(m):
        return custom_ops_gated.adjacent(m.gate_proj.weight, m.up_proj.weight)

    assert packed(tp)
    tp.to(torch.float64)
    assert packed(tp) and tp.gate_proj.weight.dtype == torch.float64
    tp.to(torch.float32)
    tp.load_state_dict(dense.state_dict(), assign=True)
    assert packed(tp)
    torch.testing.assert_close(tp(x), dense(x))


def test_packing_keeps_the_parameters_an_optimizer_holds():
    """.to() after the optimizer is built: the block packs gate and up into one buffer again, and the
    optimizer's parameters are still the block's (their objects kept), so its steps move the block."""
    torch.manual_seed(33)
    block = TensorParallelGatedMLP(IN, HIDDEN, OUT)
    params = list(block.parameters())
    optimizer = torch.optim.SGD(block.parameters(), lr=0.5)
    block.to(torch.float64).to(torch.float32)
    assert all(a is b for a, b in zip(params, block.parameters()))
    assert custom_ops_gated.adjacent(block.gate_proj.weight, block.up_proj.weight)
    before = block.gate_proj.weight.detach().clone()
    block(torch.randn(3, IN)).sum().backward()
    optimizer.step()
    assert not torch.equal(block.gate_proj.weight, before)


def test_the_block_pickles_and_keeps_gradients_and_hooks_through_moves(tmp_path):
    """torch.save of the block (its load hook a module-level function), and a move after a backward: the
    gradients and hooks stay on the parameters (the packing leaves a parameter with either as it is)."""
    torch.manual_seed(34)
    block = TensorParallelGatedMLP(IN, HIDDEN, OUT)
    torch.save(block, tmp_path / "block.pt")
    loaded = torch.load(tmp_path / "block.pt", weights_only=False)
    x = torch.randn(3, IN)
    torch.testing.assert_close(loaded(x), block(x))
    seen = []
    block.gate_proj.weight.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad.dtype))
    block(x).sum().backward()
    grad = block.gate_proj.weight.grad.clone()
    block.half()
    assert block.gate_proj.weight.grad is not None
    torch.testing.assert_close(block.gate_proj.weight.grad, grad.half())
    block(x.half()).sum().backward()
    assert seen == [torch.float32, torch.float16]
