"""The tensor-parallel modules on real gloo ranks, against the single-device model on identical weights:
outputs, every gradient, one SGD step, collective counts, the bias added once, uneven sizes, 3-D
inputs, state dicts, bad input and torch.compile."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from numerics import assert_close_to_ref, assert_compiled_matches_eager, compare_params, same_everywhere
from spawn import check_scenario, rank_setups, run_scenarios, scenario_outcomes
from tpkernels import ColumnParallelLinear, FP8Recipe, RowParallelLinear, TensorParallelMLP, overlap, perfmodel, reference
from tpkernels import initialization
from tpkernels import distributed as tpd
from tpkernels.dtensor import local

WORLD_SIZES = [1, 2, 3, 4]
IN, HIDDEN, OUT = 10, 13, 7  # 13 and 10 divide by none of 2, 3, 4
LEAD = (2, 3)  # 3-D inputs


def _fp64(module):
    return copy.deepcopy(module).double()


def _compare(out, eager, ref, name):
    assert_close_to_ref(out, eager, ref, name)


def _expected(world, count):
    return 0 if world == 1 else count


def _forward_backward(name, tp, dense, x, grad, x_part=slice(None), y_part=slice(None), act=lambda t: t):
    """tp on this rank's part of x, the dense model (fp32 eager and fp64 reference) on all of it; then the
    same output gradient through all three and one SGD step each. Compares the output and the input
    gradient; returns the fp64 model and the collectives counted forward and backward."""
    dense64 = _fp64(dense)
    x_tp = x[..., x_part].clone().requires_grad_()
    x_eager, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    with tpd.count_collectives() as fwd:
        y_tp = tp(x_tp)
    y_eager, y64 = act(dense(x_eager)), act(dense64(x64))
    _compare(y_tp, y_eager[..., y_part], y64[..., y_part], f"{name} output")
    with tpd.count_collectives() as bwd:
        y_tp.backward(grad[..., y_part])
    y_eager.backward(grad)
    y64.backward(grad.double())
    _compare(x_tp.grad, x_eager.grad[..., x_part], x64.grad[..., x_part], f"{name} input grad")
    return dense64, fwd, bwd


def column(rank, world):
    counts = {}
    for activation, gather in ((None, True), ("gelu", False), ("gelu_tanh", True)):
        torch.manual_seed(1)
        dense = nn.Linear(IN, HIDDEN)
        torch.manual_seed(1)
        tp = ColumnParallelLinear(IN, HIDDEN, activation=activation, gather_output=gather)
        rows = slice(tp.shard_start, tp.shard_stop)
        # the fresh sharded layer is the slice of the dense one built under the same seed
        assert torch.equal(local(tp.weight), dense.weight[rows]) and torch.equal(local(tp.bias), dense.bias[rows])
        act = {None: lambda t: t, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[activation]
        x, grad = same_everywhere(*LEAD, IN, seed=2), same_everywhere(*LEAD, HIDDEN, seed=3)
        dense64, fwd, bwd = _forward_backward(f"column {activation}", tp, dense, x, grad,
                                              y_part=slice(None) if gather else rows, act=act)
        compare_params("column", tp, dense, dense64, {"weight": rows, "bias": rows})
        assert fwd.count() == _expected(world, 1 if gather else 0), fwd.records
        assert bwd.count("all_reduce") == _expected(world, 1) and bwd.count() == bwd.count("all_reduce")
        counts[(activation, gather)] = (fwd.count(), bwd.count())
    return counts


def row(rank, world):
    for input_is_parallel in (True, False):
        torch.manual_seed(4)
        dense = nn.Linear(HIDDEN, OUT)
        torch.manual_seed(4)
        tp = RowParallelLinear(HIDDEN, OUT, input_is_parallel=input_is_parallel)
        cols = slice(tp.shard_start, tp.shard_stop)
        assert torch.equal(local(tp.weight), dense.weight[:, cols]) and torch.equal(local(tp.bias), dense.bias)
        x, grad = same_everywhere(*LEAD, HIDDEN, seed=5), same_everywhere(*LEAD, OUT, seed=6)
        dense64, fwd, bwd = _forward_backward("row", tp, dense, x, grad,
                                              x_part=cols if input_is_parallel else slice(None))
        # the replicated bias: the single-device gradient on every rank, not scaled by world size
        compare_params("row", tp, dense, dense64, {"weight": (slice(None), cols), "bias": slice(None)})
        assert fwd.count("all_reduce") == _expected(world, 1) and fwd.count() == fwd.count("all_reduce")
        assert bwd.count() == _expected(world, 0 if input_is_parallel else 1), bwd.records
    return "ok"


def mlp(rank, world):
    counts = {}
    for approximate, reduce_dtype in (("none", None), ("tanh", torch.float32)):
        torch.manual_seed(7)
        dense = reference.MLP(IN, HIDDEN, OUT, approximate=approximate)
        torch.manual_seed(7)
        tp = TensorParallelMLP(IN, HIDDEN, OUT, approximate=approximate, reduce_dtype=reduce_dtype)
        hidden = slice(tp.fc1.shard_start, tp.fc1.shard_stop)
        assert torch.equal(local(tp.fc1.weight), dense.fc1.weight[hidden])
        assert torch.equal(local(tp.fc2.weight), dense.fc2.weight[:, hidden]) and torch.equal(local(tp.fc2.bias), dense.fc2.bias)
        x, grad = same_everywhere(*LEAD, IN, seed=8), same_everywhere(*LEAD, OUT, seed=9)
        dense64, fwd, bwd = _forward_backward("mlp", tp, dense, x, grad)
        compare_params("mlp", tp, dense, dense64, {"fc1.weight": hidden, "fc1.bias": hidden,
                                                    "fc2.weight": (slice(None), hidden), "fc2.bias": slice(None)})
        assert (fwd.count("all_reduce"), bwd.count("all_reduce")) == (_expected(world, 1), _expected(world, 1))
        assert fwd.count() + bwd.count() == _expected(world, 2)
        counts[approximate] = (fwd.count(), bwd.count())
    return counts


def bias_added_once(rank, world):
    tp = RowParallelLinear(HIDDEN, OUT, input_is_parallel=False)
    with torch.no_grad():
        local(tp.weight).zero_()
        local(tp.bias).copy_(torch.arange(1.0, OUT + 1))  # the same on every rank
    y = tp(same_everywhere(4, HIDDEN, seed=10))
    assert torch.equal(y, torch.arange(1.0, OUT + 1).expand(4, OUT)), f"bias added {y[0, 0].item()} times"
    return "ok"


def state_dicts(rank, world):
    torch.manual_seed(11)
    dense = reference.MLP(IN, HIDDEN, OUT)
    torch.manual_seed(11)
    tp = TensorParallelMLP(IN, HIDDEN, OUT)
    hidden = tp.fc1.shard_stop - tp.fc1.shard_start
    shapes = {k: tuple(local(v).shape) for k, v in tp.state_dict().items()}
    assert shapes == {"fc1.weight": (hidden, IN), "fc1.bias": (hidden,), "fc2.weight": (OUT, hidden),
                      "fc2.bias": (OUT,)}, shapes
    # DTensors that say how they are sharded (torch.distributed.checkpoint reads that), global shapes
    placements = {k: str(v.placements[0]) for k, v in tp.state_dict().items()}
    assert placements == {"fc1.weight": "S(0)", "fc1.bias": "S(0)", "fc2.weight": "S(1)", "fc2.bias": "R"}, placements
    assert {k: tuple(v.shape) for k, v in tp.state_dict().items()} == {
        "fc1.weight": (HIDDEN, IN), "fc1.bias": (HIDDEN,), "fc2.weight": (OUT, HIDDEN), "fc2.bias": (OUT,)}
    # sharded -> dense: the gathered state dict loads into the dense MLP and equals it
    full = tp.full_state_dict()
    restored = reference.MLP(IN, HIDDEN, OUT)
    restored.load_state_dict(full)
    for k, v in dense.state_dict().items():
        assert torch.equal(restored.state_dict()[k], v), k
    # dense -> sharded, in place (an optimizer keeps its parameters) and through from_dense
    other = TensorParallelMLP(IN, HIDDEN, OUT)
    before = [id(p) for p in other.parameters()]
    other.load_full_state_dict(dense.state_dict())
    assert [id(p) for p in other.parameters()] == before
    from_dense = TensorParallelMLP.from_dense(dense.fc1, dense.fc2)
    for module in (other, from_dense):
        for k, v in tp.state_dict().items():
            assert torch.equal(local(module.state_dict()[k]), local(v)), k
    # the layers alone, from an existing nn.Linear
    column = ColumnParallelLinear.from_linear(dense.fc1, activation="gelu")
    row_layer = RowParallelLinear.from_linear(dense.fc2)
    assert torch.equal(local(column.weight), local(tp.fc1.weight))
    assert torch.equal(local(row_layer.weight), local(tp.fc2.weight))
    for layer, linear in ((column, dense.fc1), (row_layer, dense.fc2)):
        for k, v in layer.full_state_dict().items():
            assert torch.equal(v, linear.state_dict()[k]), k
    # load_state_dict: its own DTensors, or the dense tensors (sliced here); plain shards are refused,
    # since they are what torch.distributed.checkpoint would collapse to one rank's copy
    again = TensorParallelMLP(IN, HIDDEN, OUT)
    again.load_state_dict(tp.state_dict())
    assert all(torch.equal(local(a), local(b)) for a, b in zip(again.parameters(), tp.parameters()))
    again.load_state_dict(dense.state_dict())
    assert all(torch.equal(local(a), local(b)) for a, b in zip(again.parameters(), tp.parameters()))
    on_meta = TensorParallelMLP(IN, HIDDEN, OUT, device="meta")
    on_meta.load_state_dict(dense.state_dict(), assign=True)  # takes the values and their device
    assert all(not p.is_meta and torch.equal(local(p), local(q)) for p, q in zip(on_meta.parameters(), tp.parameters()))
    # full_state_dict holds copies, not the live parameters
    full = again.full_state_dict()
    with torch.no_grad():
        for p in again.parameters():
            p.add_(1.0)
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in full.items())
    if world > 1:
        plain = {k: local(v).clone() for k, v in tp.state_dict().items()}
        with pytest.raises(ValueError, match=r"fc1.weight is a plain tensor of shape .* a DTensor of global shape"):
            again.load_state_dict(plain)
    return "ok"


def bad_input(rank, world):
    with tpd.count_collectives() as counts:
        if world > 1:
            row_layer = RowParallelLinear(HIDDEN, OUT)
            in_r = row_layer.shard_stop - row_layer.shard_start
            with pytest.raises(ValueError, match=rf"input has {HIDDEN} features .* takes {in_r} of in_features={HIDDEN}"):
                row_layer(torch.randn(3, HIDDEN))  # full width, but input_is_parallel=True
        with pytest.raises(ValueError, match="unknown activation 'relu'"):
            ColumnParallelLinear(IN, HIDDEN, activation="relu")
        with pytest.raises(ValueError, match=rf"input has 9 features .* in_features={IN}"):
            ColumnParallelLinear(IN, HIDDEN)(torch.randn(3, 9))
        with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
            TensorParallelMLP(IN, HIDDEN, approximate="erf")
        with pytest.raises(TypeError, match="takes an nn.Linear"):
            ColumnParallelLinear.from_linear(nn.Conv1d(3, 3, 1))
        with pytest.raises(ValueError, match="fc1.out_features=13 but fc2.in_features=12"):
            TensorParallelMLP.from_dense(nn.Linear(IN, HIDDEN), nn.Linear(12, OUT))
    assert counts.count() == 0, "bad input must be refused before any collective"
    return "ok"


def empty_shards(rank, world):
    """Hidden widths that leave the last ranks without features in torch.chunk's layout (5 on 4 ranks: 2, 2,
    1, 0; 1 on any number): those ranks hold empty DTensor pieces, add nothing to the sum, and the MLP
    still equals the dense one, output, input gradient and every parameter's gradient and step."""
    for hidden in (5, 1):
        torch.manual_seed(15)
        dense = reference.MLP(IN, hidden, OUT)
        torch.manual_seed(15)
        tp = TensorParallelMLP(IN, hidden, OUT)
        rows = slice(tp.fc1.shard_start, tp.fc1.shard_stop)
        assert tuple(local(tp.fc1.weight).shape) == (len(range(hidden)[rows]), IN)
        x, grad = same_everywhere(*LEAD, IN, seed=16), same_everywhere(*LEAD, OUT, seed=17)
        dense64, _, _ = _forward_backward(f"mlp hidden {hidden}", tp, dense, x, grad)
        compare_params("mlp", tp, dense, dense64, {"fc1.weight": rows, "fc1.bias": rows,
                                                    "fc2.weight": (slice(None), rows), "fc2.bias": slice(None)})
        column = ColumnParallelLinear(IN, hidden, activation="gelu", gather_output=True)
        torch.testing.assert_close(column(x), F.gelu(F.linear(x, *column.full_state_dict().values())))
        # a row layer over the empty shard: fp8, and overlapped (their reshapes of an empty input)
        for options in (dict(overlap=True), dict(fp8=FP8Recipe())):
            row_layer = RowParallelLinear(hidden, OUT, input_is_parallel=False, **options)
            full = row_layer.full_state_dict()
            torch.testing.assert_close(row_layer(x[..., :hidden]), F.linear(x[..., :hidden], full["weight"], full["bias"]),
                                       rtol=0.1 if "fp8" in options else 1e-5, atol=0.1 if "fp8" in options else 1e-5)
    return "ok"


def compiled_mlp(rank, world):
    torch.manual_seed(12)
    tp = TensorParallelMLP(IN, HIDDEN, OUT, approximate="tanh")
    assert_compiled_matches_eager(tp, torch.compile(tp, fullgraph=True), same_everywhere(*LEAD, IN, seed=13),
                                  same_everywhere(*LEAD, OUT, seed=14))
    return "ok"


# One spawn per setup runs every scenario (`spawn.scenario_outcomes`), and each test reads one scenario's
# outcome.
SCENARIOS = [column, row, mlp, bias_added_once, state_dicts, bad_input, empty_shards]
_outcomes = scenario_outcomes(SCENARIOS)  # one spawn per (backend, device, world size), cached


@pytest.mark.parametrize("setup", rank_setups(WORLD_SIZES))
@pytest.mark.parametrize("scenario", [s.__name__ for s in SCENARIOS])
def test_modules_on_ranks(scenario, setup):
    values = check_scenario(_outcomes(setup), scenario)
    if scenario in ("column", "mlp"):
        assert all(v == values[0] for v in values), f"ranks disagree on collective counts: {values}"


def test_torch_compile_fullgraph_of_the_mlp_on_two_ranks():
    check_scenario(run_scenarios([compiled_mlp], 2), "compiled_mlp")


def test_modules_run_without_torch_distributed():
    torch.manual_seed(0)
    dense = reference.MLP(IN, HIDDEN, OUT)
    tp = TensorParallelMLP.from_dense(dense.fc1, dense.fc2)
    x = torch.randn(*LEAD, IN)
    assert_close_to_ref(tp(x), dense(x), _fp64(dense)(x.double()))


@pytest.mark.gpu
@pytest.mark.parametrize("process_group", ["none", "nccl"])
def test_cuda_graph_capture_and_replay_of_a_training_step(process_group, tmp_path):
    """A TensorParallelMLP forward and backward, a TensorParallelGatedMLP's, and the two fused functions,
    captured in one CUDA graph and replayed on new inputs: equal to eager, so no host sync, no allocation
    capture forbids, and the autotuner settled before capture (world size 1; with "nccl", under a one-rank
    NCCL group)."""
    import torch.distributed as dist

    import tpkernels

    if process_group == "nccl":
        dist.init_process_group("nccl", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        dtype = torch.bfloat16
        mlp = TensorParallelMLP(256, 1024, approximate="tanh", device="cuda", dtype=dtype)
        dense = reference.MLP(256, 1024, approximate="tanh", device="cuda", dtype=dtype)
        dense.load_state_dict(mlp.full_state_dict())
        gated = tpkernels.TensorParallelGatedMLP(256, 512, device="cuda", dtype=dtype)
        dense_gated = reference.GatedMLP(256, 512, device="cuda", dtype=dtype)
        dense_gated.load_state_dict(gated.full_state_dict())
        w = torch.randn(512, 256, device="cuda", dtype=dtype) * 0.05
        static_x = torch.randn(64, 256, device="cuda", dtype=dtype)
        static_grad = torch.randn(64, 256, device="cuda", dtype=dtype)

        def step():
            y = mlp(static_x)
            y.backward(static_grad)
            y_gated = gated(static_x)
            y_gated.backward(static_grad)
            return (y, tpkernels.linear_gelu(static_x, w), tpkernels.linear_partial(static_x, w, out_dtype=torch.float32),
                    y_gated)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: the autotuner and the compiles settle here
            for _ in range(3):
                mlp.zero_grad(set_to_none=False)
                gated.zero_grad(set_to_none=False)
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        mlp.zero_grad(set_to_none=False)
        gated.zero_grad(set_to_none=False)
        with torch.cuda.graph(graph):
            outs = step()
        for _ in range(2):
            static_x.copy_(torch.randn_like(static_x))
            static_grad.copy_(torch.randn_like(static_grad))
            for p in [*mlp.parameters(), *gated.parameters()]:
                p.grad.zero_()
            graph.replay()
            torch.cuda.synchronize()
            x = static_x.clone().requires_grad_()
            y = dense(x)
            y.backward(static_grad)
            x64 = static_x.double()
            ref = reference.MLP(256, 1024, approximate="tanh", device="cuda", dtype=torch.float64)
            ref.load_state_dict({k: v.double() for k, v in dense.state_dict().items()})
            assert_close_to_ref(outs[0], y, ref(x64), "replayed MLP output")
            assert_close_to_ref(outs[1], F.gelu(static_x @ w.t()), F.gelu(x64 @ w.double().t()), "replayed linear_gelu")
            assert_close_to_ref(outs[2], (static_x @ w.t()).float(), x64 @ w.double().t(), "replayed linear_partial")
            dense_grads = {k: p.grad for k, p in dense.named_parameters()}
            for k, p in mlp.named_parameters():
                torch.testing.assert_close(p.grad.float(), dense_grads[k].float(), rtol=5e-2, atol=5e-2)
            dense.zero_grad()
            y_gated = dense_gated(x)
            y_gated.backward(static_grad)
            gated64 = reference.GatedMLP(256, 512, device="cuda", dtype=torch.float64)
            gated64.load_state_dict({k: v.double() for k, v in dense_gated.state_dict().items()})
            assert_close_to_ref(outs[3], y_gated, gated64(x64), "replayed gated MLP output")
            dense_grads = {k: p.grad for k, p in dense_gated.named_parameters()}
            for k, p in gated.named_parameters():
                torch.testing.assert_close(p.grad.float(), dense_grads[k].float(), rtol=5e-2, atol=5e-2)
            dense_gated.zero_grad()
    finally:
        if process_group == "nccl":
            dist.destroy_process_group()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_a_shard_is_initialised_without_the_dense_weight(dtype, monkeypatch):
    """Each shard equals the slice of nn.Linear under the same seed, drawn in chunks of rows on the CPU,
    and nothing as large as the dense weight is ever allocated; on the meta device nothing is drawn."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class LargestAllocation(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.largest = max(self.largest, out.numel())
            return out

    monkeypatch.setattr(initialization, "_INIT_CHUNK_ELEMENTS", 3 * 37)  # 3 rows of 37 at a time
    K, N = 37, 29
    torch.manual_seed(5)
    dense = nn.Linear(K, N, dtype=dtype)
    for world in (2, 3, 4):
        for rank in range(world):
            for dim in (0, 1):
                start, stop = tpd.shard_range(N if dim == 0 else K, world, rank)
                torch.manual_seed(5)
                with LargestAllocation() as mode:
                    weight, bias = initialization.init_linear_shard(K, N, True, dim, start, stop, None, dtype)
                expected = dense.weight[start:stop] if dim == 0 else dense.weight[:, start:stop]
                assert torch.equal(weight, expected) and weight.dtype == dtype
                assert torch.equal(bias, dense.bias[start:stop] if dim == 0 else dense.bias)
                assert mode.largest < N * K, f"a {mode.largest}-element tensor: the dense weight has {N * K}"
    weight, bias = initialization.init_linear_shard(K, N, True, 0, 0, 10, "meta", dtype)
    assert weight.is_meta and bias.is_meta and weight.shape == (10, K)


class _CudaLike:
    """What overlap="auto" reads of an input: where it lives and its element size (bf16)."""

    is_cuda = True

    def element_size(self):
        return 2


def test_overlap_auto_follows_the_machine_and_chunks_set_now(monkeypatch):
    """overlap="auto" asks the performance model about tpkernels.overlap.OVERLAP_MACHINE and OVERLAP_CHUNKS as
    they are at the call, not as they were at the first call. At W = 8, hidden 8192, ffn 28672 the model
    breaks even at 2048 tokens on an NVLink node, 4096 across InfiniBand, and 1024 with 2 chunks."""
    x, shape = _CudaLike(), (8192, 28672, 8)
    assert overlap.overlapping("auto", x, 3000, *shape)  # NVLink, the default: 3000 >= 2048
    monkeypatch.setattr(overlap, "OVERLAP_MACHINE", "h100-ib")
    assert not overlap.overlapping("auto", x, 3000, *shape)  # InfiniBand: 3000 < 4096
    monkeypatch.setattr(overlap, "OVERLAP_MACHINE", perfmodel.MACHINES["h100-nvlink"])  # a Machine works too
    assert not overlap.overlapping("auto", x, 1500, *shape)
    monkeypatch.setattr(overlap, "OVERLAP_CHUNKS", 2)
    assert overlap.overlapping("auto", x, 1500, *shape)  # 2 chunks: 1500 >= 1024
    monkeypatch.setattr(overlap, "OVERLAP_MACHINE", "h200-typo")
    with pytest.raises(ValueError, match="unknown machine 'h200-typo'"):
        overlap.overlapping("auto", x, 1500, *shape)
