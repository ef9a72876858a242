"""The benchmark harness, by job: `cases` (what is timed), `timing` (the check and the timers), `plans`
(which points), `report` (rows, table, verdicts, plot), `tables` (the auto tables a run argues for); the
CLI is `benchmarks/run.py`.

One benchmark harness: ops x providers x shapes x dtypes x GELU forms, each provider checked against
fp64 before it is timed, in shuffled rounds with paired ratios; JSON lines, a markdown table and a plot.

The command line: `benchmarks/run.py`.

Ops (per-rank shapes; M tokens, K input features, N output features of the shard):
    column_fwd  h = gelu(x @ w.T + b)                  x [M, K], w [N, K]
    row_fwd     p = x @ w.T + b + residual, fp32 out    x [M, K], w [N, K], residual [M, N] fp32
    column_bwd  dX, dW, db of column_fwd, given dY (the forward's graph is built outside the timing)
    mlp_shard   forward and backward of one rank's column [N, K] and row [K, N] shards
    tp_mlp      a TensorParallelMLP step (forward and backward) over the process group: world size 1
                in-process, more under torchrun (gloo on CPU, NCCL on GPUs); rank 0 writes
GELU is `--gelu tanh` (the default: cuBLASLt's epilogue has only the tanh form) or `none` (exact, the
modules' default), per point.

Providers: tpkernels (backend="auto"); tpkernels_triton (backend="triton", on CUDA); tpkernels_cublaslt
and tpkernels_cpu (the native extension's, where built); tpkernels_cpu_packed (tpkernels_cpu with its
packed-weight cache in use: `extension.cpu_weight_cache`), tpkernels_packed (auto with it); eager
(autograd over the unfused ops, doing the same work as ours: the row stage's GEMM in fp32 plus the fp32
residual); torch_mm (the GEMMs alone: a lower bound that skips the epilogue; row rows also give it plus
the epilogue's extra bytes at the measured bandwidth); compile (torch.compile of eager); cublaslt (torch._addmm_activation, CUDA, tanh GELU);
tpkernels_overlap, tpkernels_sp, tpkernels_sp_overlap (tp_mlp: TensorParallelMLP with overlap=True,
sequence_parallel=True, both). Test providers, only when asked for: wrong (eager with an error planted)
and no_residual (the row stage without its residual): the fp64 check must refuse both.

Method. Every provider's output is compared with an fp64 reference by the 2x-eager rule before it is
timed; a wrong one is reported and not timed. One timer for every point and provider on a GPU: a CUDA
graph of a batch of calls that rotate over enough copies of the operands that the working set exceeds
three times the L2, so every call reads from HBM and no host time is inside ("graph"; the row's
`copies` says how many, and `compile` keeps one, since each copy would recompile); a provider that
cannot be captured is timed the same way with events around the calls ("events", which counts host
time when the host is slower). Each point runs `--rounds` rounds (5 on a GPU, 2 on the CPU), the
providers in a new shuffled order each round, on the same tensors; a row keeps its per-round times, and
its ratio to every other provider is computed round by round: `ratio_vs_<provider>` is their median and
`ratio_vs_<provider>_band` their [min, max]. A target is met or missed only when the whole band is on one
side of it; otherwise it is within noise. host_us is the median CPU time of one call issued without
waiting for the device (200 calls over the rounds on a GPU). Each row also says what ran (`config`: the
kernel and tile, or the library path), the SM clock and power sampled while it ran (null on the CPU),
the floor's peak and bandwidth, the git sha and whether the tree was dirty. Smoke rows are labelled
(device "cpu (triton interpreter)") and are never written under benchmarks/results/; `--cpu-results`
rows name the CPU (model, cores, threads) and are results, with a CPU auto table beside them.
"""
import os
import sys

import torch

if not torch.cuda.is_available() and "--cpu-results" not in sys.argv:
    # Without a GPU the kernels run under the interpreter, which triton reads as it decorates them; CPU
    # results time the CPU backends in their normal state, without it. Before any harness module imports
    # triton.
    os.environ.setdefault("TRITON_INTERPRET", "1")
