"""The seed notebook's question on real ranks: the notebook's cells, and four strategies for an MLP.

    y = gelu(X @ W1) @ W2     (the notebook's layout; an nn.Linear weight is W.T)

Column-wise, W1 split by output features: GELU commutes with the concatenation, so each rank applies
it to its own shard. Row-wise, W2 split by input features: the partial sums must be added before any
nonlinearity. Column, GELU, row, then one all-reduce: the one-collective path. The strategies:

    (a) column -> all-gather -> GELU -> column -> all-gather
    (b) row -> all-reduce -> GELU -> row -> all-reduce
    (c) column (GELU fused) -> row -> all-reduce      (TensorParallelMLP)
    (d) all-gather -> column (GELU fused) -> row -> reduce-scatter
                                                      (TensorParallelMLP(sequence_parallel=True): x and
                                                       y are each rank's shard of the tokens)

`rank_main` is what each spawned rank runs; `python -m tpkernels` spawns them.
"""
import datetime
import statistics
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import tpkernels
from tpkernels import distributed as tpd
from tpkernels import perfmodel
from tpkernels.kernels import INTERPRETED
from tpkernels.reference import MLP

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _print0(rank, *args):
    if rank == 0:
        print(*args, flush=True)


def _show(rank, label, t):
    rows = ["[" + ", ".join(f"{v:7.4f}" for v in row) + "]" for row in t.tolist()]
    _print0(rank, f"  {label:<40} " + ("\n  " + " " * 41).join(rows))


def _backend(device):
    if device.type == "cuda":
        return "the Triton kernels on CUDA"
    if INTERPRETED:
        return "the Triton kernels under the interpreter (TRITON_INTERPRET=1)"
    return "the eager reference (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU)"


# ---------------------------------------------------------------------------------------------------
# The notebook, on real ranks


def notebook(rank, world, device):

    torch.manual_seed(42)
    X, W = torch.randn(2, 4).to(device), torch.randn(4, 4).to(device)
    baseline = F.gelu(X @ W)
    _print0(rank, "Column-wise: W split by output features, GELU on each rank's shard, then all-gather")
    _show(rank, "baseline gelu(X @ W)", baseline)
    w_shard_n = tpd.shard(W.t(), world, rank, 0)  # nn.Linear layout: rows are W's columns
    column = tpd.gather_from(tpkernels.linear_gelu(X, w_shard_n), 4)
    _show(rank, "all-gather(gelu(X @ W_r))", column)
    column_ok = torch.allclose(column, baseline, rtol=1e-5, atol=1e-5)
    _print0(rank, f"  column-wise {'match' if column_ok else 'MISMATCH'}\n")

    _print0(rank, "Row-wise: X and W split along the inner dim, partial sums all-reduced")
    x_shard_k = tpd.shard(X, world, rank, 1)
    w_shard_k = tpd.shard(W.t(), world, rank, 1)
    partial = tpkernels.linear_partial(x_shard_k, w_shard_k)
    gelu_then_sum = tpd.reduce_from(F.gelu(partial))
    sum_then_gelu = F.gelu(tpd.reduce_from(partial))
    _show(rank, "all-reduce(gelu(X_r @ W_r))", gelu_then_sum)
    _show(rank, "gelu(all-reduce(X_r @ W_r))", sum_then_gelu)
    row_mismatch = not torch.allclose(gelu_then_sum, sum_then_gelu, rtol=1e-5, atol=1e-5)
    _print0(rank, f"  GELU on partial sums: {'mismatch, as the notebook says' if row_mismatch else 'MATCH?'}\n")

    _print0(rank, "Column, GELU, row, one all-reduce: gelu(X @ W1) @ W2 as a TensorParallelMLP")
    for _ in range(2):  # the notebook's last cell ran twice before its output was saved
        X, W1, W2 = torch.randn(2, 4), torch.randn(4, 4), torch.randn(4, 4)
    X, W1, W2 = X.to(device), W1.to(device), W2.to(device)
    baseline = F.gelu(X @ W1) @ W2
    fc1, fc2 = torch.nn.Linear(4, 4, bias=False, device=device), torch.nn.Linear(4, 4, bias=False, device=device)
    with torch.no_grad():
        fc1.weight.copy_(W1.t())
        fc2.weight.copy_(W2.t())
    mlp = tpkernels.TensorParallelMLP.from_dense(fc1, fc2)
    with torch.no_grad():
        column_row = mlp(X)
    _show(rank, "baseline", baseline)
    _show(rank, "TensorParallelMLP", column_row)
    column_row_ok = torch.allclose(column_row, baseline, rtol=1e-5, atol=1e-5)
    _print0(rank, f"  column -> row {'match' if column_row_ok else 'MISMATCH'}\n")
    return column_ok and row_mismatch and column_row_ok and gated(rank, world, device)


def gated(rank, world, device):
    """The gated MLP, down(silu(x @ Wg.T) * (x @ Wu.T)), with gate and up in one merged [gate; up] weight (Phi-3's
    gate_up_proj): split by the same rows of gate and up it is exact; cut into consecutive pieces, it pairs
    gate features with the wrong up features."""
    _print0(rank, "Gated: down(silu(x @ Wg.T) * (x @ Wu.T)), gate and up in one merged [gate; up] weight")
    torch.manual_seed(43)
    K, F_ = 4, 8
    x = torch.randn(2, K).to(device)
    gate_up, down = torch.nn.Linear(K, 2 * F_, bias=False), torch.nn.Linear(F_, K, bias=False)
    gate_up, down = gate_up.to(device), down.to(device)
    with torch.no_grad():
        baseline = down(F.silu(x @ gate_up.weight[:F_].t()) * (x @ gate_up.weight[F_:].t()))
        same_rows = tpkernels.TensorParallelGatedMLP.from_merged(gate_up, down)(x)
        # the trap: rank r takes the r-th consecutive piece of the merged weight as its [gate_r; up_r]
        piece = tpd.shard(gate_up.weight, world, rank, 0)
        half = piece.shape[0] // 2
        h = F.silu(x @ piece[:half].t()) * (x @ piece[half:2 * half].t())
        naive = tpd.reduce_from(h @ tpd.shard(down.weight, world, rank, 1)[:, :half].t())
    same_error = (same_rows - baseline).abs().max().item()
    naive_error = (naive - baseline).abs().max().item()
    _print0(rank, f"  gate and up split by the same rows (TensorParallelGatedMLP): max |error| {same_error:.1e}")
    _print0(rank, f"  merged weight cut into {world} consecutive pieces:            max |error| {naive_error:.1e}"
                  + (" (one rank: one piece, nothing to pair wrong)" if world == 1 else ""))
    same_ok = same_error <= 1e-5
    naive_wrong = world == 1 or naive_error > 1e-3
    _print0(rank, f"  same rows {'exact' if same_ok else 'MISMATCH'}; consecutive pieces "
                  f"{'wrong, as the math says' if naive_wrong else 'RIGHT?'}\n")
    return same_ok and naive_wrong


# ---------------------------------------------------------------------------------------------------
# The four strategies


def _strategy_a(x, w1, b1, w2, b2, world, rank):
    """column -> all-gather -> GELU -> column -> all-gather."""

    hidden, out = w1.shape[0], w2.shape[0]
    h_shard = tpkernels.linear_partial(x, tpd.shard(w1, world, rank), tpd.shard(b1, world, rank))
    g = F.gelu(tpd.gather_from(h_shard, hidden))
    y_shard = tpkernels.linear_partial(g, tpd.shard(w2, world, rank), tpd.shard(b2, world, rank))
    return tpd.gather_from(y_shard, out)


def _strategy_b(x, w1, b1, w2, b2, world, rank):
    """row -> all-reduce -> GELU -> row -> all-reduce."""

    x_shard = tpd.shard(x, world, rank, -1)
    h = tpd.reduce_from(tpkernels.linear_partial(x_shard, tpd.shard(w1, world, rank, 1), b1,
                                                 owner=rank == 0))
    g_shard = tpd.shard(F.gelu(h), world, rank, -1)
    return tpd.reduce_from(tpkernels.linear_partial(g_shard, tpd.shard(w2, world, rank, 1), b2,
                                                    owner=rank == 0))


def strategies(rank, world, device, args):

    dtype = DTYPES[args.dtype]
    M, K, H, N = args.tokens, args.in_features, args.hidden, args.out_features or args.in_features
    torch.manual_seed(0)
    dense = MLP(K, H, N, device=device, dtype=dtype)
    x = torch.randn(M, K, device=device, dtype=dtype)
    ref = MLP(K, H, N, device=device, dtype=torch.float64)
    ref.load_state_dict(dense.state_dict())
    y_ref = ref(x.double())
    eager_error = (dense(x).double() - y_ref).abs().max().item()
    w1, b1, w2, b2 = (p.detach() for p in (dense.fc1.weight, dense.fc1.bias, dense.fc2.weight, dense.fc2.bias))
    mlp = tpkernels.TensorParallelMLP.from_dense(dense.fc1, dense.fc2)
    sequence_mlp = tpkernels.TensorParallelMLP.from_dense(dense.fc1, dense.fc2, sequence_parallel=True)
    x_tokens = tpd.shard(x, world, rank)
    b = torch.finfo(dtype).bits // 8
    ring = (world - 1) / world
    longest = -(-M // world)  # an all-gather or reduce-scatter of uneven token shards pads them to this
    runs = {
        "a": ("column -> all-gather -> GELU -> column -> all-gather",
              lambda: _strategy_a(x, w1, b1, w2, b2, world, rank), ring * M * (H + N) * b,
              "(W-1)/W * M * (H + N) * b"),
        "b": ("row -> all-reduce -> GELU -> row -> all-reduce",
              lambda: _strategy_b(x, w1, b1, w2, b2, world, rank), 2 * ring * M * (H + N) * b,
              "2 (W-1)/W * M * (H + N) * b"),
        "c": ("column (GELU fused) -> row -> all-reduce", lambda: mlp(x), 2 * ring * M * N * b,
              "2 (W-1)/W * M * N * b"),
        "d": ("all-gather -> column (GELU) -> row -> reduce-scatter", lambda: sequence_mlp(x_tokens),
              (world - 1) * longest * (K + N) * b, "(W-1) * ceil(M/W) * (K + N) * b"),
    }
    y_parts = {"a": y_ref, "b": y_ref, "c": y_ref, "d": tpd.shard(y_ref, world, rank)}
    predicted = perfmodel.strategy_times(M, K, H, N, world, perfmodel.machine(perfmodel.DEFAULT_MACHINE), b)
    _print0(rank, f"Strategies for y = MLP(x): M={M} tokens, in={K}, hidden={H}, out={N}, {args.dtype}, "
                  f"{world} ranks, {args.repeat} timed runs each (eager single-device error: {eager_error:.2e})")
    results = {}
    for key, (name, run, formula_bytes, formula) in runs.items():
        _print0(rank, f"  ({key}) {name} ...")
        with torch.no_grad():
            with tpd.count_collectives() as counts:
                y = run()
            error = (y.double() - y_parts[key]).abs().max().item() if y.numel() else 0.0
            times = []
            for _ in range(args.repeat):
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
        data = [r for r in counts.records if r["kind"] != "shape_exchange"]  # (d)'s check of the shards
        results[key] = dict(name=name, collectives=len(data), sent=sum(r["sent_bytes"] for r in data),
                            checks=counts.count("shape_exchange"), formula_bytes=formula_bytes, formula=formula,
                            error=error, out_bytes=y.numel() * y.element_size(), model_us=1e6 * predicted[key],
                            ms=1e3 * statistics.median(times))
    if rank == 0:
        _table(results, device, dict(M=M, K=K, H=H, N=N, world=world))
    return results


def _table(results, device, shape):
    print(f"\n  {'strategy':<56}{'collectives':>12}{'bytes sent/rank':>17}{'formula':>12}  "
          f"{'output/rank':>12}{'max error':>10}{'ms':>9}{'model us':>10}")
    for key, r in results.items():
        print(f"  ({key}) {r['name']:<52}{r['collectives']:>12}{r['sent']:>17,}{int(r['formula_bytes']):>12,}  "
              f"{r['out_bytes']:>12,}{r['error']:>10.2e}{r['ms']:>9.2f}{r['model_us']:>10.1f}")
    print("  formulas: " + "; ".join(f"({k}) {r['formula']}" for k, r in results.items())
          + " (b: bytes per element; an all-gather of uneven shards pads them to the largest)")
    print(f"  output/rank: the activation each rank holds after the block. model us: "
          f"{perfmodel.machine(perfmodel.DEFAULT_MACHINE).name}, predicted by tpkernels.perfmodel.strategy_times "
          f"(roofline GEMMs, alpha-beta collectives; assumed figures, not this machine's). (d) also "
          f"exchanges each rank's shard shape first ({results['d']['checks']} small collective, not counted above).")
    M, H, N, world = shape["M"], shape["H"], shape["N"], shape["world"]
    if world == 1:
        print("\n  One rank: no strategy communicates, so they differ only in their kernels.")
        return
    def best(value):
        low = min(value(r) for r in results.values())
        return " ".join(f"({k})" for k, r in results.items() if value(r) == low)

    fastest = min(results, key=lambda k: results[k]["model_us"])
    a, c, d = results["a"], results["c"], results["d"]
    print(f"\n  Fewest bytes: {best(lambda r: r['sent'])}. Fewest collectives: {best(lambda r: r['collectives'])}. "
          f"Fastest by the model: ({fastest}).")
    lines = [f"(c) keeps GELU on whole hidden features, which the column split leaves on one rank, so the "
             f"hidden activation never crosses the network: one all-reduce of the [M, out] partial sums, "
             f"{c['sent']:,} bytes per rank. (b) reduces both layers' outputs, because GELU must not see a partial sum."]
    if a["sent"] < c["sent"]:
        lines.append(f"Here (a) sends fewer bytes ({a['sent']:,}) than (c): it gathers [M, hidden] and [M, out] "
                     f"once each, while an all-reduce of [M, out] costs twice that tensor, so (a) wins on bytes "
                     f"whenever hidden ({H}) < out ({N}). It issues two collectives to (c)'s one, and each pays "
                     f"a latency: at {M} tokens the model's latency term decides, and it picks ({fastest}).")
    lines.append(f"(d) moves the bytes of (c)'s all-reduce as an all-gather of the input and a reduce-scatter of "
                 f"the output ({d['sent']:,} bytes here; it gathers [M, in] where (c) reduces [M, out]), in two "
                 f"collectives, and leaves each rank 1/{world} of the output ({d['out_bytes']:,} bytes against "
                 f"{c['out_bytes']:,}): it pays where activation memory does, in training.")
    for line in lines:
        print("  " + line)
    if device.type == "cpu":
        print("  Times are CPU times with gloo (and the Triton interpreter when it is on): they show the "
              "ranking of communication, not kernel speed.")


# ---------------------------------------------------------------------------------------------------
# Ranks


def rank_main(rank, world, init_file, device_type, args):
    if device_type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", init_method=f"file://{init_file}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(seconds=args.timeout))
    try:
        _print0(rank, f"tpkernels: {world} ranks on {dist.get_backend()}, running {_backend(device)}\n")
        ok = True
        if world <= 4:
            ok = notebook(rank, world, device)
        else:
            _print0(rank, "(the notebook's 4 features cannot be split over more than 4 ranks: skipping it)\n")
        strategies(rank, world, device, args)
        if not ok:
            raise RuntimeError("the notebook's checks did not come out as the notebook says")
        dist.barrier()  # no rank tears its group down while another still talks to it
    finally:
        dist.destroy_process_group()
