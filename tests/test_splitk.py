"""The split-K kernel (`kernels/matmul_splitk.py`): every epilogue, behind every public function, forward
and backward; bitwise repeatable; its counters back at 0 after every call; its workspace reused."""
import pytest
import torch

import tpkernels
from numerics import DEVICES, assert_close_to_ref, check_forward_backward, linear_inputs, matmul_reference, randn
from tpkernels import MatmulConfig, launch, pin_config, reference, workspace
from tpkernels.kernels import GELU, GELU_TANH, GLU, MAX_SPLIT_K, SPLITK_CONFIGS, split_k

# Small tiles, so that test-sized shapes split K many ways under the interpreter.
CONFIG = MatmulConfig(16, 32, 32, group_m=2, num_stages=1, epilogue_subtile=2)


def _poison_workspaces():
    """NaN in every workspace: a partial read before it was written, or past M or N, shows."""
    for partials, _ in workspace.WORKSPACES.values():
        partials.fill_(float("nan"))


def _counters_are_zero():
    return all(int(counters.abs().sum()) == 0 for _, counters in workspace.WORKSPACES.values())


def _splits(launches):
    return [int(line.split("split=")[1]) for line in launches if line.startswith("splitk")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("M,K,N", [(1, 1009, 33), (2, 5, 31), (3, 256, 64), (17, 97, 1)])
def test_every_epilogue(device, dtype, M, K, N):
    """K prime and far past the tile (1009 = 32 K-tiles of 32), K under one K-tile (split 1), M = 1 to 3
    and past one row block, odd N: bias, exact and tanh GELU, the stored pre-activation, the residual,
    16-bit and fp32 outputs, and the dGELU epilogue, into poisoned outputs and a poisoned workspace."""
    a = randn(M, K, dtype=dtype, device=device)
    b = randn(N, K, dtype=dtype, device=device, scale=K**-0.5).t()  # w.T, as the forward reads it
    bias = randn(N, dtype=dtype, device=device)
    z = randn(M, N, dtype=dtype, device=device, scale=2.0)
    expected_split = split_k(M, N, K, CONFIG, launch.INTERPRETER_PROGRAMS)
    cases = [dict(activation=GELU, bias=bias, store_preact=True),
             dict(activation=GELU_TANH, bias=bias, residual=randn(M, N, dtype=dtype, device=device)),
             dict(out_dtype=torch.float32, bias=bias, residual=randn(M, N, dtype=torch.float32, device=device)),
             dict(grad_activation=GELU, z=z),
             dict(grad_activation=GELU_TANH, z=z)]
    with launch.use_matmul_kernel("splitk"), pin_config(CONFIG), launch.record_launches() as launches:
        for case in cases:
            out_dtype = case.pop("out_dtype", dtype)
            c = torch.full((M, N), float("nan"), dtype=out_dtype, device=device)
            preact = torch.full((M, N), float("nan"), dtype=dtype, device=device) if case.pop("store_preact", False) \
                else None
            _poison_workspaces()
            launch.matmul(a, b, c, preact=preact, **case)
            assert _counters_are_zero()
            ref, ref_pre = matmul_reference(a, b, **case)
            eager, eager_pre = matmul_reference(a, b, **case, dtype=dtype)
            assert_close_to_ref(c, eager.to(out_dtype), ref, f"{case.keys()}")
            if preact is not None:
                assert_close_to_ref(preact, eager_pre, ref_pre, "preact")
    assert _splits(launches) == [expected_split] * len(cases)
    if K >= 256:
        assert expected_split > 1


@pytest.mark.parametrize("device", DEVICES)
def test_bitwise_repeatable_with_other_sizes_in_between(device):
    """The last program to arrive sums the partials in split order, so a call repeats bit for bit; calls
    of other sizes in between (which grow the shared workspace) change nothing."""
    x, w, b = linear_inputs((2,), 700, 45, torch.float32, device)
    with launch.use_matmul_kernel("splitk"), pin_config(CONFIG), launch.record_launches() as launches:
        first = tpkernels.linear_gelu(x, w, b)
        for lead, K, N in [((3,), 70, 20), ((40,), 300, 130), ((1,), 1000, 7)]:
            tpkernels.linear_gelu(*linear_inputs(lead, K, N, torch.float32, device))
            assert _counters_are_zero()
        _poison_workspaces()
        again = tpkernels.linear_gelu(x, w, b)
    assert torch.equal(first, again)
    assert _splits(launches)[0] > 1 and len(set(_splits(launches))) > 1, launches


@pytest.mark.parametrize("device", DEVICES)
def test_every_arrival_order_gives_the_same_bits(device):
    """Whichever split's program arrives last reduces, and it sums the partials in split order: with the
    programs remapped (`launch.splitk_order`: reversed, rotated), another split's program is the reducer
    (the interpreter runs them in order), and every result, GELU, gated and the gated backward's
    [dG | dU], is bitwise the one of the default order, the counters back at 0 and NaN workspaces unread."""
    x, w, b = linear_inputs((3,), 700, 90, torch.float32, device)
    w2 = randn(600, 45, device=device)  # the dH GEMM's K: 600, long enough to split
    dy = randn(3, 600, device=device)
    results = {}
    for order in ("in order", "reversed", "rotated"):
        _poison_workspaces()
        with launch.use_matmul_kernel("splitk"), pin_config(CONFIG), launch.splitk_order(order), \
                launch.record_launches() as launches:
            gelu = tpkernels.linear_gelu(x, w, b)
            gated, gu = torch.ops.tpkernels.fused_glu(x, w[:45], w[45:], b[:45], b[45:], 3, True)
            dgu = torch.full((3, 90), float("nan"), device=device)
            launch.matmul(dy, w2, dgu[:, :45], z=gu[:, :45], grad_activation=GLU + 3)
        assert _counters_are_zero()
        assert all(s > 2 for s in _splits(launches)), launches
        results[order] = (gelu, gated, dgu)
    for order in ("reversed", "rotated"):
        for got, expected in zip(results[order], results["in order"]):
            assert torch.equal(got, expected), order
    with pytest.raises(ValueError, match="'reversed'"):
        launch.splitk_order("backwards")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_public_functions_forward_and_backward(device, dtype, approximate):
    """linear_gelu, linear_partial and mlp_shard, every gradient, with every matmul on the split-K kernel."""
    lead, K, H, N = (3,), 300, 70, 33
    x, w1, b1 = linear_inputs(lead, K, H, dtype, device, requires_grad=True)
    _, w2, b2 = linear_inputs((1,), H, N, dtype, device, requires_grad=True)
    r = randn(*lead, N, dtype=torch.float32, device=device, requires_grad=True)
    with launch.use_matmul_kernel("splitk"), pin_config(CONFIG), launch.record_launches() as launches:
        check_forward_backward(lambda x, w, b: tpkernels.linear_gelu(x, w, b, approximate=approximate),
                               lambda x, w, b: reference.linear_gelu(x, w, b, approximate=approximate),
                               (x, w1, b1), ("x", "weight", "bias"))
        h = randn(*lead, H, dtype=dtype, device=device, requires_grad=True)
        check_forward_backward(lambda h, w, b, r: tpkernels.linear_partial(h, w, b, residual=r, out_dtype=torch.float32),
                               lambda h, w, b, r: reference.linear_partial(
                                   h, w, b, residual=r, out_dtype=None if h.dtype == torch.float64 else torch.float32),
                               (h, w2, b2, r), ("h", "weight", "bias", "residual"))
        check_forward_backward(
            lambda x, w1, b1, w2, b2: tpkernels.mlp_shard(x, w1, b1, w2, b2, approximate=approximate),
            lambda x, w1, b1, w2, b2: reference.linear_partial(
                reference.linear_gelu(x, w1, b1, approximate=approximate), w2, b2),
            (x, w1, b1, w2, b2), ("x", "w1", "b1", "w2", "b2"))
    kernels = {line.split()[0] for line in launches}
    assert "splitk" in kernels and "pointer" not in kernels, launches
    assert _counters_are_zero()


def test_split_rule():
    """Splits reach one wave where K allows, never exceed MAX_SPLIT_K or the K-tiles, never leave a split
    empty; the "auto" rule splits decode shapes only."""
    for m, n, k in [(1, 2048, 4096), (16, 8192, 4096), (128, 2048, 4096), (1, 64, 100000), (4, 32, 33)]:
        for config in SPLITK_CONFIGS:
            s = split_k(m, n, k, config, 132)
            k_tiles = -(-k // config.block_k)
            per_split = -(-k_tiles // s)
            assert 1 <= s <= min(MAX_SPLIT_K, k_tiles)
            assert (s - 1) * per_split < k_tiles  # the last split has K-tiles
            tiles = -(-m // config.block_m) * -(-n // config.block_n)
            assert tiles * s <= max(132, tiles)
    assert split_k(1, 2048, 4096, MatmulConfig(16, 64, 128), 132) == 4  # 32 tiles, 32 K-tiles
    assert launch.splitk_pays(1, 2048, 4096, 132) and launch.splitk_pays(16, 4096, 4096, 132)
    assert not launch.splitk_pays(16, 16384, 4096, 132)  # 256 tiles of 64 x 64: already two waves
    assert not launch.splitk_pays(1024, 2048, 4096, 132) and not launch.splitk_pays(1, 2048, 256, 132)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_graph_replays_and_streams(dtype):
    """Two CUDA graphs of one split-K shape, each captured with a workspace of its own, replayed at once on
    two streams while eager launches of the shape run on a third: every result equals the eager one and
    the counters end at 0. With one workspace per stream baked into both graphs, their programs would
    count each other's arrivals and sum each other's partials."""
    x, w, b = linear_inputs((4,), 4096, 2048, dtype, "cuda")
    with launch.use_matmul_kernel("splitk"), launch.record_launches() as launches:
        eager = tpkernels.linear_gelu(x, w, b)
        graphs, outs = [], []
        for _ in range(2):
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outs.append(tpkernels.linear_gelu(x, w, b))
            graphs.append(graph)
        streams = [torch.cuda.Stream() for _ in range(3)]
        for _ in range(5):
            for out in outs:
                out.fill_(float("nan"))
            torch.cuda.synchronize()
            for graph, stream in zip(graphs, streams):
                with torch.cuda.stream(stream):
                    graph.replay()
            with torch.cuda.stream(streams[2]):
                others = [tpkernels.linear_gelu(x, w, b) for _ in range(3)]
            torch.cuda.synchronize()
            assert all(torch.equal(out, eager) for out in outs + others)
            assert _counters_are_zero()
    assert len({key[1] for key in workspace.WORKSPACES}) >= 2
    assert _splits(launches)[0] > 1, launches
