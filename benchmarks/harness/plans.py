"""The plans: which points a run measures (the suites, the headline plan, the CPU results), and how long
it will take."""
import torch

from harness.cases import FP8, FP8_PROVIDERS, KERNEL_CHOICE_MAX_M, KERNEL_PROVIDERS


# The suites. Column (K, N) per shard and row (K, N) per shard, M tokens per rank.
COLUMN_KN = [(4096, 8192), (4096, 2048), (8192, 14336), (8192, 3584), (12288, 6144)]
ROW_KN = [(2048, 4096), (3584, 8192), (6144, 12288)]
M_VALUES = [1, 16, 64, 128, 256, 512, 2048, 8192, 16384]
SMOKE_SHAPES = [(16, 32, 48), (40, 64, 32)]
# The headline plan: the points that decide the backend table, the kernel choice and the targets, sized
# to fit a short GPU slot. (op, M, K, N, dtype, gelu).
_BF16, _FP8 = "bfloat16", "fp8"
HEADLINE = (
    [("column_fwd", M, 4096, 2048, _BF16, "tanh") for M in (1, 64, 256, 8192)]
    + [("column_fwd", M, 4096, 8192, _BF16, "tanh") for M in (1, 64, 256, 2048, 8192)]
    + [("row_fwd", M, 3584, 8192, _BF16, "tanh") for M in (1, 256, 8192)]
    + [("column_bwd", M, 4096, 8192, _BF16, "tanh") for M in (256, 8192)]
    + [("mlp_shard", M, 4096, 3584, _BF16, "tanh") for M in (256, 8192)]
    + [("column_fwd", M, 4096, 8192, _BF16, "none") for M in (16, 8192)]
    + [("tp_mlp", 4096, 4096, 16384, _BF16, "tanh")]
    # fp8 (issue 18's targets): the MLP step, the column forward against the bare fp8 GEMM, decode
    + [("mlp_shard", 8192, 4096, 3584, _FP8, "tanh")]
    + [("column_fwd", M, 4096, 8192, _FP8, "tanh") for M in (16, 8192)]
    # the gated MLP's column stage (silu(x Wg) * (x Wu), N = F_r): Llama-3-8B and -70B at TP 8, decode and prefill
    + [("gated_fwd", M, 4096, 1792, _BF16, "none") for M in (1, 64, 2048, 8192)]
    + [("gated_fwd", M, 8192, 3584, _BF16, "none") for M in (1, 64, 8192)]
)
# `--cpu-results`: the CPU backends as real results on the machine at hand, decode and prefill shapes,
# fp32 and bf16, both GELU forms (exact: the modules' default) and the row stage with fp32 partials.
CPU_RESULTS = ([("column_fwd", M, K, N, dt, gelu) for dt in ("float32", "bfloat16") for gelu in ("none", "tanh")
                for M, K, N in ((1, 4096, 2048), (16, 4096, 2048), (64, 1024, 4096), (512, 1024, 4096))]
               + [("row_fwd", M, K, N, dt, "none") for dt in ("float32", "bfloat16")
                  for M, K, N in ((1, 2048, 4096), (64, 1024, 4096), (512, 1024, 4096))]
               # the gated column stage (auto is eager on plain CPU tensors): Llama-3-8B's TP 8 shard, and prefill
               + [("gated_fwd", M, K, N, dt, "none") for dt in ("float32", "bfloat16")
                  for M, K, N in ((1, 4096, 1792), (16, 4096, 1792), (512, 1024, 2048))])
CPU_RESULTS_PROVIDERS = ("tpkernels", "tpkernels_packed", "tpkernels_cpu", "tpkernels_cpu_packed", "eager", "torch_mm")
HEADLINE_PROVIDERS = ("tpkernels", "tpkernels_triton", "tpkernels_cublaslt", "eager", "torch_mm", "cublaslt",
                      "tpkernels_overlap", "tpkernels_pointer", "tpkernels_splitk", "tpkernels_tma", "tpkernels_fp8",
                      "fp8_unfused", "scaled_mm")


def suite(ops_wanted, shapes, smoke, dtypes, gelus, plan=None):
    """The (op, M, K, N, dtype, gelu) points to run."""
    if plan == "headline":
        return [p for p in HEADLINE if p[0] in ops_wanted]
    if plan == "cpu-results":
        return [p for p in CPU_RESULTS if p[0] in ops_wanted]
    if shapes or smoke:
        base = [(op, *shape) for op in ops_wanted for shape in (shapes or SMOKE_SHAPES)]
    else:
        base = []
        for op in ops_wanted:
            kn = ROW_KN if op == "row_fwd" else COLUMN_KN
            if op == "mlp_shard":  # (K model width, N hidden shard) of the column shapes
                kn = [(k, n) for k, n in COLUMN_KN if n < k] or COLUMN_KN
            if op == "tp_mlp":
                kn = [(4096, 16384)]
            base += [(op, M, K, N) for K, N in kn for M in M_VALUES]
    # row_fwd has no GELU, gated_fwd runs SiLU: one form of each
    return [(*p, dtype, gelu) for p in base for dtype in dtypes
            for gelu in (gelus if p[0] not in ("row_fwd", "gated_fwd") else gelus[:1])]


# Providers that apply per op on a GPU, and the distinct autotuned launches (keys) of one of our calls.
_APPLIES = {"column_fwd": {"tpkernels", "tpkernels_triton", "tpkernels_cublaslt", "eager", "torch_mm", "compile",
                           "cublaslt", *KERNEL_PROVIDERS},
            "row_fwd": {"tpkernels", "tpkernels_triton", "tpkernels_cublaslt", "eager", "torch_mm", "compile",
                        *KERNEL_PROVIDERS},
            "column_bwd": {"tpkernels", "tpkernels_triton", "tpkernels_cublaslt", "eager", "torch_mm"},
            "mlp_shard": {"tpkernels", "tpkernels_triton", "tpkernels_cublaslt", "eager", "torch_mm", "compile"},
            "tp_mlp": {"tpkernels", "tpkernels_overlap", "tpkernels_sp", "tpkernels_sp_overlap", "eager"},
            # the kernel providers time no gated point (the slot is short): the gated row records its kernel
            "gated_fwd": {"tpkernels", "tpkernels_triton", "eager", "torch_mm", "compile"}}
_APPLIES_FP8 = {"column_fwd": {"tpkernels", "eager", "torch_mm", *FP8_PROVIDERS},
                "row_fwd": {"tpkernels", "eager", "torch_mm", *FP8_PROVIDERS},
                "mlp_shard": {"tpkernels", "eager", "torch_mm", "tpkernels_fp8", "fp8_unfused"}}
_AUTOTUNED_LAUNCHES = {"column_fwd": 1, "row_fwd": 1, "column_bwd": 2, "mlp_shard": 6, "tp_mlp": 6, "gated_fwd": 1}


def predicted_seconds(points, providers, rounds, host_calls):
    """(seconds on a GPU with a warm triton cache, kernel compiles a cold cache adds). Assumed costs: 20 s
    to start (imports, ceilings); per point, 2 s of autotuning benchmarks per autotuned launch of the
    first of our providers, and as much again for each kernel provider (each kernel tunes its own); 0.3 s
    per provider for its check and 0.3 s for its graph capture; per round 3 replays of about 1 ms plus
    telemetry; host calls at 0.2 ms. A cold cache compiles every config the autotuner tries (15 per
    launch and specialization, and per kernel provider), about 1.5 s each."""
    total, compiles, seen, tuned = 20.0, 0, set(), set()
    for op, M, K, N, dtype, gelu in points:
        applies = _APPLIES_FP8.get(op, set()) if dtype == FP8 else _APPLIES[op]
        applying = [p for p in providers if p in applies and not (p == "cublaslt" and gelu == "none")
                    and not (p == "tpkernels_cublaslt" and gelu == "none" and op != "row_fwd")
                    and not (p in KERNEL_PROVIDERS and M > KERNEL_CHOICE_MAX_M)]
        # The paths our providers tune: at an fp8 point the bf16 one (tuned already if the plan has its
        # bf16 twin: the autotuner keeps its picks) and the fp8 one.
        paths = [(dtype, p) for p in applying if p == "tpkernels_fp8" or p in KERNEL_PROVIDERS]
        if any(p.startswith("tpkernels") and p not in FP8_PROVIDERS for p in applying):
            paths.append((torch.bfloat16 if dtype == FP8 else dtype, "tpkernels"))
        for path_dtype, provider in paths:
            if (op, M, K, N, path_dtype, gelu, provider) in tuned:
                continue
            tuned.add((op, M, K, N, path_dtype, gelu, provider))
            total += 2.0 * _AUTOTUNED_LAUNCHES[op]
            specialization = (op, path_dtype, gelu, M == 1, M > 128, provider)  # M = 1, TMA compile apart
            if specialization not in seen:
                seen.add(specialization)
                compiles += 15 * _AUTOTUNED_LAUNCHES[op]
        total += len(applying) * (0.6 + rounds * 0.01 + host_calls * 2e-4)
    return total, compiles


def parse_shapes(values):
    shapes = []
    for value in values or []:
        if value == "smoke":
            shapes += SMOKE_SHAPES
            continue
        try:
            M, K, N = (int(v) for v in value.split(","))
        except ValueError:
            raise SystemExit(f"--shapes: {value!r} is not M,K,N (three integers) nor 'smoke'") from None
        shapes.append((M, K, N))
    return shapes
