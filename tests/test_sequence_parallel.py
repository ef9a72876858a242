"""Sequence parallelism and comm/compute overlap on real gloo ranks, against the single-device model on
identical weights: uneven sequence lengths and feature splits, outputs, every gradient, one SGD step,
collective counts and bytes (chunking adds none), overlap on and off alike, and bad input refused on
every rank before data moves."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from numerics import assert_close_to_ref, assert_compiled_matches_eager, compare_params, same_everywhere
from spawn import check_scenario, rank_setups, scenario_outcomes
from tpkernels import (ColumnParallelLinear, RowParallelLinear, TensorParallelGatedMLP, TensorParallelMLP, reference,
                       set_sequence_length)
from tpkernels import distributed as tpd

WORLD_SIZES = [1, 2, 3, 4]
IN, HIDDEN, OUT = 10, 13, 7  # 13 and 10 divide by none of 2, 3, 4
# (full input shape, sequence_dim): 7 and 9 positions split unevenly over 2, 3 and 4 ranks
LAYOUTS = [((2, 7, IN), -2), ((9, IN), 0), ((7, 2, IN), 0)]


def _mine(t, world, rank, dim):
    return tpd.shard(t, world, rank, dim)


def _check_against_dense(name, tp, dense, x, grad, dim, world, rank, x_sharded=True, y_sharded=True,
                         x_features=slice(None), act=lambda t: t):
    """tp on this rank's shard of x against the dense model (fp32 eager, fp64 reference) on all of it:
    output, input gradient; returns the fp64 model and the collectives counted forward and backward."""
    dense64 = copy.deepcopy(dense).double()
    x_in = _mine(x, world, rank, dim) if x_sharded else x
    x_tp = x_in[..., x_features].clone().requires_grad_()
    x_eager, x64 = x.clone().requires_grad_(), x.double().requires_grad_()
    with tpd.count_collectives() as fwd:
        y_tp = tp(x_tp)
    y_eager, y64 = act(dense(x_eager)), act(dense64(x64))

    def part(t, features=slice(None)):
        return (_mine(t, world, rank, dim) if y_sharded else t)[..., features]

    out_features = slice(tp.shard_start, tp.shard_stop) if isinstance(tp, ColumnParallelLinear) else slice(None)
    assert_close_to_ref(y_tp, part(y_eager, out_features), part(y64, out_features), f"{name} output")
    with tpd.count_collectives() as bwd:
        y_tp.backward(part(grad, out_features))
    y_eager.backward(grad)  # a column's input gradient sums every rank's features: the reduce-scatter's job
    y64.backward(grad.double())

    def x_part(t):
        return (_mine(t, world, rank, dim) if x_sharded else t)[..., x_features]

    assert_close_to_ref(x_tp.grad, x_part(x_eager.grad), x_part(x64.grad), f"{name} input grad")
    return dense64, fwd, bwd


def _kinds(counts):
    return {kind: counts.count(kind) for kind in ("shape_exchange", "all_gather", "reduce_scatter", "all_reduce")
            if counts.count(kind)}


def _data_bytes(counts):
    return sum(r["sent_bytes"] for r in counts.records if r["kind"] != "shape_exchange")


def sequence_parallel_mlp(rank, world):
    """TensorParallelMLP(sequence_parallel=True): shards in, shards out; overlap on and off."""
    results = {}
    for shape, dim in LAYOUTS:
        sent = {}
        for overlap in (False, True):
            torch.manual_seed(21)
            dense = reference.MLP(IN, HIDDEN, OUT, approximate="tanh")
            torch.manual_seed(21)
            tp = TensorParallelMLP(IN, HIDDEN, OUT, approximate="tanh", sequence_parallel=True, sequence_dim=dim,
                                   overlap=overlap)
            x, grad = same_everywhere(*shape, seed=22), same_everywhere(*shape[:-1], OUT, seed=23)
            name = f"sp mlp {shape} dim={dim} overlap={overlap}"
            dense64, fwd, bwd = _check_against_dense(name, tp, dense, x, grad, dim, world, rank)
            hidden = slice(tp.fc1.shard_start, tp.fc1.shard_stop)
            # the row bias: the single-device gradient on every rank (added once, not world_size times)
            compare_params(name, tp, dense, dense64, {"fc1.weight": hidden, "fc1.bias": hidden,
                                                     "fc2.weight": (slice(None), hidden), "fc2.bias": slice(None)})
            if world == 1:
                assert fwd.count() == bwd.count() == 0, (fwd.records, bwd.records)
            elif not overlap:
                assert _kinds(fwd) == {"shape_exchange": 1, "all_gather": 1, "reduce_scatter": 1}, fwd.records
                assert _kinds(bwd) == {"all_gather": 1, "reduce_scatter": 1}, bwd.records
            else:  # chunked: one all-gather and one reduce-scatter per non-empty chunk, each way
                kinds = _kinds(fwd)
                assert kinds["shape_exchange"] == 1 and kinds["all_gather"] == kinds["reduce_scatter"] > 1, kinds
                assert _kinds(bwd) == {"all_gather": kinds["all_gather"], "reduce_scatter": kinds["all_gather"]}
            sent[overlap] = (_data_bytes(fwd), _data_bytes(bwd))
        assert sent[True] == sent[False], f"chunking changed the bytes sent: {sent}"
        results[f"{shape} dim={dim}"] = sent[False]
    return results


def sequence_parallel_layers(rank, world):
    """The layers alone: a sequence-parallel column (all-gather in) and row (reduce-scatter out)."""
    for overlap in (False, True):
        shape, dim = (2, 7, IN), -2
        torch.manual_seed(24)
        dense = nn.Linear(IN, HIDDEN)
        torch.manual_seed(24)
        column = ColumnParallelLinear(IN, HIDDEN, activation="gelu", sequence_parallel=True, overlap=overlap)
        rows = slice(column.shard_start, column.shard_stop)
        x, grad = same_everywhere(*shape, seed=25), same_everywhere(2, 7, HIDDEN, seed=26)
        name = f"sp column overlap={overlap}"
        dense64, fwd, bwd = _check_against_dense(name, column, dense, x, grad, dim, world, rank, y_sharded=False,
                                                 act=F.gelu)
        compare_params(name, column, dense, dense64, {"weight": rows, "bias": rows})
        if world > 1:
            assert fwd.count("reduce_scatter") == 0 and bwd.count("all_gather") == 0
            assert bwd.count("reduce_scatter") == fwd.count("all_gather") >= 1

        torch.manual_seed(27)
        dense = nn.Linear(HIDDEN, OUT)
        torch.manual_seed(27)
        row = RowParallelLinear(HIDDEN, OUT, sequence_parallel=True, overlap=overlap)
        cols = slice(row.shard_start, row.shard_stop)
        x, grad = same_everywhere(2, 7, HIDDEN, seed=28), same_everywhere(2, 7, OUT, seed=29)
        name = f"sp row overlap={overlap}"
        dense64, fwd, bwd = _check_against_dense(name, row, dense, x, grad, dim, world, rank, x_sharded=False,
                                                 x_features=cols)
        compare_params(name, row, dense, dense64, {"weight": (slice(None), cols), "bias": slice(None)})
        if world > 1:
            assert fwd.count("all_reduce") == 0 and fwd.count("reduce_scatter") == bwd.count("all_gather") >= 1
    return "ok"


def overlap_without_sequence_parallel(rank, world):
    """overlap=True on the plain path: the row stage's all-reduce, and a column layer's backward
    all-reduce, in chunks of rows; same numbers and bytes."""
    sent = {}
    for overlap in (False, True):
        torch.manual_seed(30)
        dense = reference.MLP(IN, HIDDEN, OUT)
        torch.manual_seed(30)
        tp = TensorParallelMLP(IN, HIDDEN, OUT, overlap=overlap)
        x, grad = same_everywhere(2, 7, IN, seed=31), same_everywhere(2, 7, OUT, seed=32)
        name = f"mlp overlap={overlap}"
        dense64, fwd, bwd = _check_against_dense(name, tp, dense, x, grad, 0, world, rank, x_sharded=False,
                                                 y_sharded=False)
        hidden = slice(tp.fc1.shard_start, tp.fc1.shard_stop)
        compare_params(name, tp, dense, dense64, {"fc1.weight": hidden, "fc2.weight": (slice(None), hidden),
                                                 "fc2.bias": slice(None)})
        if world > 1:
            assert fwd.count() == fwd.count("all_reduce") == (4 if overlap else 1), fwd.records
            assert bwd.count() == bwd.count("all_reduce") == (4 if overlap else 1)
        sent[overlap] = (fwd.sent_bytes, bwd.sent_bytes)

        torch.manual_seed(33)
        dense = nn.Linear(HIDDEN, OUT)
        torch.manual_seed(33)
        row = RowParallelLinear(HIDDEN, OUT, overlap=overlap, reduce_dtype=torch.float32)
        cols = slice(row.shard_start, row.shard_stop)
        x, grad = same_everywhere(3, HIDDEN, seed=34), same_everywhere(3, OUT, seed=35)
        _check_against_dense(f"row overlap={overlap}", row, dense, x, grad, 0, world, rank, x_sharded=False,
                             y_sharded=False, x_features=cols)

        # a column layer alone: no forward collective; overlap chunks the backward's all-reduce of dX
        torch.manual_seed(36)
        dense = nn.Linear(IN, HIDDEN)
        torch.manual_seed(36)
        column = ColumnParallelLinear(IN, HIDDEN, activation="gelu", overlap=overlap)
        x, grad = same_everywhere(2, 7, IN, seed=37), same_everywhere(2, 7, HIDDEN, seed=38)
        _, fwd, bwd = _check_against_dense(f"column overlap={overlap}", column, dense, x, grad, 0, world, rank,
                                           x_sharded=False, y_sharded=False, act=F.gelu)
        if world > 1:
            assert fwd.count() == 0 and bwd.count() == bwd.count("all_reduce") == (4 if overlap else 1), bwd.records
        sent[overlap] += (bwd.sent_bytes,)
    assert sent[True] == sent[False], f"chunking changed the bytes sent: {sent}"
    return sent[False]


def sequence_parallel_bad_input(rank, world):
    """Every rank raises the same error, before any collective that moves data."""
    with pytest.raises(ValueError, match="overlap must be False, True or 'auto', got 'always'"):
        TensorParallelMLP(IN, HIDDEN, overlap="always")
    with pytest.raises(TypeError, match="sequence_parallel must be True or False"):
        ColumnParallelLinear(IN, HIDDEN, sequence_parallel="yes")
    tp = TensorParallelMLP(IN, HIDDEN, sequence_parallel=True, sequence_dim=3)
    with tpd.count_collectives() as counts:
        with pytest.raises(ValueError, match=r"sequence_dim=3 is out of range for a 3-d input"):
            tp(torch.randn(2, 4, IN))
        with pytest.raises(ValueError, match=r"sequence_dim=-1 .*the last holds features"):
            TensorParallelMLP(IN, HIDDEN, sequence_parallel=True, sequence_dim=-1)(torch.randn(4, IN))
    assert counts.count() == 0, counts.records
    if world > 1:
        # rank 0 holds one position too many: every rank learns it from the shape exchange
        lengths = tpd.shard_sizes(7, world)
        mine = lengths[rank] + (1 if rank == 0 else 0)
        tp = TensorParallelMLP(IN, HIDDEN, sequence_parallel=True)
        with tpd.count_collectives() as counts:
            with pytest.raises(ValueError, match=r"shards along dim 1 must be \[.*\] long .* rank 0: \(2, "
                                                 rf"{lengths[0] + 1}, {IN}\)"):
                tp(torch.randn(2, mine, IN))
            # and a batch dim that differs
            with pytest.raises(ValueError, match="every other dim equal"):
                tp(torch.randn(2 + rank, lengths[rank], IN))
        assert _kinds(counts) == {"shape_exchange": 2}, counts.records
    return "ok"


def compiled_sequence_parallel(rank, world):
    """torch.compile of a sequence-parallel, overlapped MLP: the shard-shape exchange reads the ranks'
    lengths on the host, a graph break; the rest compiles, and the numbers are eager's."""
    torch.manual_seed(36)
    tp = TensorParallelMLP(IN, HIDDEN, OUT, approximate="tanh", sequence_parallel=True, overlap=True)
    x = _mine(same_everywhere(2, 7, IN, seed=37), world, rank, 1)
    grad = _mine(same_everywhere(2, 7, OUT, seed=38), world, rank, 1)
    torch._dynamo.reset()
    assert_compiled_matches_eager(tp, torch.compile(tp), x, grad)
    return "ok"


def stated_sequence_length(rank, world):
    """With the full length stated once (`set_sequence_length`), the sequence-parallel MLP, gated MLP and
    column layer give the dense results with no shape exchange (no collective beyond the data's, no host
    sync), compile into one graph, and a rank whose shard does not fit the stated length raises."""
    torch.manual_seed(40)
    shape, dim = (2, 7, IN), 1
    x, grad = same_everywhere(*shape, seed=41), same_everywhere(2, 7, OUT, seed=42)
    dense = reference.MLP(IN, HIDDEN, OUT, approximate="tanh")
    gated_dense = reference.GatedMLP(IN, HIDDEN, OUT)
    models = {
        "mlp": (TensorParallelMLP.from_dense(dense.fc1, dense.fc2, approximate="tanh", sequence_parallel=True,
                                             sequence_dim=dim), dense),
        "gated": (TensorParallelGatedMLP.from_dense(gated_dense.gate_proj, gated_dense.up_proj, gated_dense.down_proj,
                                                    sequence_parallel=True, sequence_dim=dim), gated_dense),
    }
    for name, (tp, reference_model) in models.items():
        assert set_sequence_length(tp, 7) >= 1 and tp.sequence_length == 7  # the block and its column layers
        _, fwd, bwd = _check_against_dense(f"stated {name}", tp, reference_model, x, grad, dim, world, rank)
        assert "shape_exchange" not in _kinds(fwd) and "shape_exchange" not in _kinds(bwd), fwd.records
        if world > 1:
            assert _kinds(fwd) == {"all_gather": 1, "reduce_scatter": 1}, fwd.records
    column = ColumnParallelLinear(IN, HIDDEN, activation="gelu", sequence_parallel=True, sequence_dim=dim)
    set_sequence_length(column, 7)
    with tpd.count_collectives() as counts:
        column(_mine(x, world, rank, dim))
    assert "shape_exchange" not in _kinds(counts)
    tp = models["gated"][0]
    if world == 2:  # one world size proves it: compiling on 2 CPU cores costs a minute a rank
        tp.zero_grad(set_to_none=True)  # the dense comparison's gradients
        torch._dynamo.reset()
        assert_compiled_matches_eager(tp, torch.compile(tp, fullgraph=True), _mine(x, world, rank, dim),
                                      _mine(grad, world, rank, dim))
    set_sequence_length(tp, 100)  # every rank's shard is shorter than 100 positions give it
    with tpd.count_collectives() as counts:
        with pytest.raises(ValueError, match=f"sequence_length=100 gives rank {rank}"):
            tp(_mine(x, world, rank, dim))
    assert counts.count() == 0
    with pytest.raises(ValueError, match="an int >= 0"):
        set_sequence_length(tp, -1)
    return "ok"


def overlap_repeated(rank, world):
    """Many overlapped steps in a row (eager kernels, so they are quick): with several gloo collectives
    in flight at once this corrupted the heap in about one run in three (a rank died of SIGABRT or
    SIGSEGV), before gloo's chunk collectives were waited at once."""
    torch.manual_seed(39)
    tp = TensorParallelMLP(IN, HIDDEN, OUT, approximate="tanh", sequence_parallel=True, overlap=True, backend="eager")
    for step in range(300):
        x = _mine(same_everywhere(2, 7, IN, seed=step), world, rank, 1).requires_grad_()
        tp(x).sum().backward()
    return "ok"


# One spawn per setup runs every scenario (`spawn.scenario_outcomes`), and each test reads one scenario's
# outcome.
SCENARIOS = [sequence_parallel_mlp, sequence_parallel_layers, overlap_without_sequence_parallel,
             sequence_parallel_bad_input, compiled_sequence_parallel, stated_sequence_length, overlap_repeated]
_outcomes = scenario_outcomes(SCENARIOS)  # one spawn per (backend, device, world size), cached


@pytest.mark.parametrize("setup", rank_setups(WORLD_SIZES))
@pytest.mark.parametrize("scenario", [s.__name__ for s in SCENARIOS])
def test_sequence_parallel_on_ranks(scenario, setup):
    values = check_scenario(_outcomes(setup), scenario)
    assert all(v == values[0] for v in values), f"ranks disagree: {values}"


@pytest.mark.gpu
def test_cuda_graph_capture_of_the_stated_sequence_parallel_path():
    """The static sequence-parallel path (`set_sequence_length`) captures in a CUDA graph at world size 2:
    a host sync (the shape exchange's `.tolist()`) would fail the capture. One GPU cannot run two NCCL ranks,
    so the group is torch's fake process group (world size 2, collectives that move nothing): what this proves
    is the host side, no sync and nothing capture forbids; the numbers are the gloo tests'."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        torch.manual_seed(43)
        dtype = torch.bfloat16
        blocks = [TensorParallelMLP(256, 1024, approximate="tanh", sequence_parallel=True, device="cuda", dtype=dtype),
                  TensorParallelGatedMLP(256, 512, sequence_parallel=True, device="cuda", dtype=dtype)]
        for block in blocks:
            set_sequence_length(block, 128)  # 64 positions a rank
        static_x = torch.randn(2, 64, 256, device="cuda", dtype=dtype, requires_grad=True)
        static_grad = torch.randn(2, 64, 256, device="cuda", dtype=dtype)

        def step():
            outs = [block(static_x) for block in blocks]
            torch.autograd.backward(outs, [static_grad] * len(outs))
            return outs

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up: the autotuner and the compiles settle here
            for _ in range(3):
                step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with tpd.count_collectives() as counts, torch.cuda.graph(graph):
            outs = step()
        assert "shape_exchange" not in _kinds(counts), counts.records
        for _ in range(2):
            static_x.data.copy_(torch.randn_like(static_x))
            graph.replay()
        torch.cuda.synchronize()
        assert all(out.shape == (2, 64, 256) for out in outs)
    finally:
        dist.destroy_process_group()
