"""The benchmark harness's command line (the harness itself: `benchmarks/harness/`).

    python benchmarks/run.py --plan headline --out DIR      # a GPU: the points that decide things, < 5 min
    python benchmarks/run.py --plan headline --dry-run      # its points and predicted duration, then stop
    python benchmarks/run.py --out DIR                     # a GPU: the full suite
    python benchmarks/run.py --smoke --out DIR             # the CPU smoke run (the default without a GPU)
    python benchmarks/run.py --cpu-results --out DIR       # the CPU backends as results, no interpreter
    python benchmarks/run.py --ops column_fwd --providers tpkernels torch_mm --dtypes bfloat16 --gelu none \\
        --shapes 2048,4096,8192 --rounds 7 --out DIR

The ops, the providers and the method: `benchmarks/harness/__init__.py` and `docs/benchmarks.md`.
"""
import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")

# harness sets TRITON_INTERPRET before anything imports triton
from harness.cases import DTYPES, GELU_FORMS, KERNEL_PROVIDERS, OPS, PROVIDERS, TEST_PROVIDERS, make_op  # noqa: E402
from harness.plans import CPU_RESULTS_PROVIDERS, HEADLINE_PROVIDERS, parse_shapes, predicted_seconds, suite  # noqa: E402
from harness.report import describe, environment, markdown, paired_ratios, plot, targets  # noqa: E402
from harness.tables import backend_table, cpu_backend_table, kernel_table  # noqa: E402
from harness.timing import (check, host_times_us, make_timer, measure_ceilings, peak_flops, rotation,  # noqa: E402
                            telemetry)

import torch  # noqa: E402

import tpkernels  # noqa: E402
from tpkernels import extension, launch, ops



def _init_distributed():
    if "RANK" not in os.environ or torch.distributed.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    torch.distributed.init_process_group(backend)


def precompile(points, providers, device):
    """Compile, in parallel, every kernel and config our providers' calls at these points could launch
    (`launch.precompiling` under triton's AsyncCompileMode, a thread per core): on a cold cache the
    compiles are most of a run, and one at a time they would not fit a short GPU slot. Nothing runs; a
    call that fails here fails again, reported, at its point. Returns (calls, seconds)."""
    from concurrent.futures import ThreadPoolExecutor

    from triton.runtime._async_compile import AsyncCompileMode

    start, calls = time.time(), 0
    with ThreadPoolExecutor(os.cpu_count() or 4) as executor:
        with AsyncCompileMode(executor, ignore_errors=True), launch.precompiling():
            for op_name, M, K, N, dtype, gelu in points:
                op = make_op(op_name, M, K, N, dtype, device, gelu)
                for provider in (providers if op is not None else ()):
                    fn = op.run(provider) if provider.startswith("tpkernels") else None
                    if fn is None:
                        continue
                    try:
                        fn()
                        calls += 1
                    except Exception:  # noqa: BLE001 (reported when the point runs)
                        pass
                del op
    return calls, time.time() - start


def run_point(point, providers, device, env, ceilings, rounds, host_calls, seed, l2_bytes, cpu_calls=2):
    """Every provider's row at one point: checked, then timed in `rounds` shuffled rounds."""
    op_name, M, K, N, dtype, gelu = point
    op = make_op(op_name, M, K, N, dtype, device, gelu)
    if op is None:
        return []
    peak, peak_source = peak_flops(env["device"], dtype, ceilings[0])
    bandwidth = ceilings[1]
    floor_s = max(op.flops() / peak, op.bytes() / bandwidth)
    copies = None
    rows, timers = {}, {}
    for provider in providers:
        row = dict(op=op_name, provider=provider, M=M, K=K, N=N, dtype=str(dtype).replace("torch.", ""), gelu=gelu,
                   world_size=tpkernels.distributed.get_world_size(), cpu=device.type == "cpu", status=None,
                   timer=None, rounds=0, ms_rounds=[], order_rounds=[], ms=None, ms_min=None, ms_max=None,
                   tflops=None, gbps=None, pct_of_floor=None, host_us=None, config=None, floor_ms=floor_s * 1e3,
                   peak_tflops=peak / 1e12, peak_source=peak_source, bandwidth_gbps=bandwidth / 1e9,
                   sm_clock_mhz=None, power_w=None, **env)
        rows[provider] = row
        fn = op.run(provider)
        if fn is None:
            row["status"] = "n/a"
            continue
        try:  # the check also autotunes and compiles, before any timing; its one call is what a row ran
            with launch.record_launches() as launches:
                problem = check(op, provider, fn)
        except Exception as error:  # a provider that cannot run this point is reported, not fatal
            problem = f"failed: {type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
        if problem:
            row["status"] = problem if problem.startswith("failed") else f"wrong: {problem}"
            continue
        row["config"] = describe(provider, launches)
        if copies is None:
            copies = rotation(op, device, l2_bytes)
        # torch.compile guards on the tensors its closure captures: one compiled copy, not a recompile per
        # copy (past dynamo's recompile limit it would fall back to eager unseen). Its row says so.
        mine = copies[:1] if provider == "compile" else copies
        timers[provider] = make_timer([c.run(provider) for c in mine], device, floor_s * 1e3, cpu_calls)
        row.update(status="ok", timer=timers[provider].name, copies=len(mine))
    order_rng = random.Random(seed)
    samples = {p: [] for p in timers}
    for _ in range(rounds):
        order = list(timers)
        order_rng.shuffle(order)
        for position, provider in enumerate(order):
            rows[provider]["ms_rounds"].append(timers[provider].measure())
            rows[provider]["order_rounds"].append(position)
            samples[provider].append(telemetry(slow_ok=False))
    for provider in timers:
        if not any(c is not None for c, _ in samples[provider]):  # no NVML: one nvidia-smi sample, after its rounds
            samples[provider].append(telemetry())
        fn = op.run(provider)
        host = [t for _ in range(rounds) for t in host_times_us(fn, max(1, host_calls // rounds))]
        ms_rounds = rows[provider]["ms_rounds"]
        ms = statistics.median(ms_rounds)
        clocks = [c for c, _ in samples[provider] if c is not None]
        powers = [w for _, w in samples[provider] if w is not None]
        rows[provider].update(rounds=len(ms_rounds), ms=ms, ms_min=min(ms_rounds), ms_max=max(ms_rounds),
                              tflops=op.flops() / (ms * 1e-3) / 1e12, gbps=op.bytes() / (ms * 1e-3) / 1e9,
                              pct_of_floor=100 * floor_s / (ms * 1e-3), host_us=statistics.median(host),
                              sm_clock_mhz=statistics.median(clocks) if clocks else None,
                              power_w=statistics.median(powers) if powers else None)
        if provider == "torch_mm" and op.extra_epilogue_bytes():
            # the bare GEMM plus the bytes our epilogue adds, at this run's copy bandwidth
            rows[provider]["ms_with_epilogue_bytes"] = ms + op.extra_epilogue_bytes() / bandwidth * 1e3
    paired_ratios(list(rows.values()))
    return list(rows.values())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS + TEST_PROVIDERS,
                        help="default: every provider (the headline plan: its own list)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES),
                        help="default: bfloat16 on a GPU, float32 and float16 on the CPU")
    parser.add_argument("--gelu", nargs="+", choices=GELU_FORMS, default=["tanh"],
                        help="GELU forms: tanh (cuBLASLt's, the default) and/or none (exact, the modules' default)")
    parser.add_argument("--shapes", nargs="+", help="M,K,N triples, or 'smoke'; default: the suite")
    parser.add_argument("--plan", choices=["headline"], help="a fixed set of points (it sets dtypes and GELU per point)")
    parser.add_argument("--no-precompile", action="store_true",
                        help="on a GPU, compile each kernel when its point first runs it, one at a time, instead "
                             "of a point's kernels in parallel before it runs")
    parser.add_argument("--dry-run", action="store_true", help="print the points and the predicted duration, then stop")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes under the interpreter (the CPU default)")
    parser.add_argument("--cpu-results", action="store_true",
                        help="the CPU backends as results on this machine, without the interpreter: decode and "
                             "prefill shapes, fp32 and bf16, written with the CPU's name; also a CPU auto table")
    parser.add_argument("--rounds", type=int, help="rounds per point (default: 5 on a GPU, 2 on the CPU)")
    parser.add_argument("--host-calls", type=int, help="calls timed for host_us (default: 200 on a GPU, 2 on the CPU)")
    parser.add_argument("--seed", type=int, default=0, help="the shuffles' seed")
    parser.add_argument("--out", help="folder for results.jsonl, table.md, plot.png (default: a new temp folder)")
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="start no new point after this many seconds")
    args = parser.parse_args(argv)

    on_gpu = torch.cuda.is_available() and not args.cpu_results
    if args.cpu_results:
        if ops.INTERPRETED:
            parser.error("--cpu-results times the CPU backends in their normal state: unset TRITON_INTERPRET")
        if args.plan:
            parser.error("--cpu-results is a plan of its own; drop --plan")
        args.plan = "cpu-results"
    default_providers = {"headline": HEADLINE_PROVIDERS, "cpu-results": CPU_RESULTS_PROVIDERS}.get(args.plan, PROVIDERS)
    providers = args.providers or list(default_providers)
    dtypes = [DTYPES[d] for d in args.dtypes] if args.dtypes else (
        [torch.bfloat16] if on_gpu else [torch.float32, torch.float16])
    rounds = args.rounds or (5 if on_gpu or args.cpu_results else 2)
    host_calls = args.host_calls or (200 if on_gpu else 10 if args.cpu_results else 2)
    if rounds < 1 or host_calls < 1:
        parser.error(f"--rounds ({rounds}) and --host-calls ({host_calls}) must be at least 1")
    smoke = args.smoke or (not on_gpu and args.plan is None)
    points = suite(args.ops, parse_shapes(args.shapes), smoke, dtypes, args.gelu, args.plan)
    points = [(op, M, K, N, DTYPES[dt] if isinstance(dt, str) else dt, gelu) for op, M, K, N, dt, gelu in points]
    predicted, compiles = predicted_seconds(points, providers, rounds, host_calls)
    print(f"{len(points)} points x {len(providers)} providers, {rounds} rounds each")
    if args.dry_run:
        for op, M, K, N, dtype, gelu in points:
            print(f"  {op} M={M} K={K} N={N} {str(dtype)[6:]} gelu={gelu}")
    if not args.cpu_results:
        print(f"predicted: {predicted:.0f} s on a GPU with a warm triton cache; a cold one adds about {compiles} "
              f"kernel compiles (~{1.5 * compiles:.0f} s one at a time; the run compiles each point's in parallel "
              f"before it, a gain not yet measured on the GPU machines)", flush=True)
    if args.dry_run:
        return 0

    _init_distributed()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    if device.type == "cpu":
        torch.manual_seed(0)
    out = args.out or tempfile.mkdtemp(prefix="tpkernels-bench-")
    if device.type == "cpu" and not args.cpu_results and os.path.realpath(out).startswith(os.path.realpath(RESULTS)):
        parser.error(f"--out {out}: smoke rows are never written under {RESULTS}; results there are GPU runs and "
                     f"--cpu-results")
    os.makedirs(out, exist_ok=True)
    env = environment(device)
    ceilings = measure_ceilings(device)
    l2_bytes = torch.cuda.get_device_properties(device).L2_cache_size if on_gpu else 0
    if rank == 0:
        print(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['git_sha']}"
              f"{' (dirty)' if env['git_dirty'] else ''} | torch.mm {ceilings[0] / 1e12:.3g} TFLOP/s, copy "
              f"{ceilings[1] / 1e9:.3g} GB/s | {len(points)} points -> {out}", flush=True)
    cache_before = None
    if device.type == "cpu" and "tpkernels_cpu_packed" in providers and extension.has("cpu"):
        # On for tpkernels_cpu_packed's calls, paused for every other provider's (`_with_packed_weights`).
        cache_before = extension.cpu_weight_cache()
        extension.cpu_weight_cache(enabled=True)
        extension.pause_weight_cache(True)
    rows, start = [], time.time()
    progress = _progress(total=len(points), disable=rank != 0)
    for index, point in enumerate(points):
        if time.time() - start > args.max_seconds:
            if rank == 0:
                print(f"--max-seconds {args.max_seconds:g} reached: {index} of {len(points)} points done", flush=True)
            break
        op, M, K, N, dtype, gelu = point
        progress.set_description(f"{op} M={M} K={K} N={N} {str(dtype)[6:]} {gelu}")
        if on_gpu and not args.no_precompile:  # point by point, so that --max-seconds still bounds the run
            precompile([point], providers, device)
        rows += run_point(point, providers, device, env, ceilings, rounds, host_calls, args.seed + index, l2_bytes,
                          cpu_calls=None if args.cpu_results else 2)
        progress.update()
    progress.close()
    if cache_before is not None:
        extension.cpu_weight_cache(enabled=cache_before["enabled"])
    if rank != 0:
        return 0
    with open(os.path.join(out, "results.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    table = markdown(rows)
    summary = targets(rows)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(f"{env['device']} | torch {env['torch']} | triton {env['triton']} | {env['git_sha']}"
                f"{' (dirty)' if env['git_dirty'] else ''} | {env['date']}\n\n`{env['command']}`\n\n"
                f"torch.mm {ceilings[0] / 1e12:.4g} TFLOP/s, copy {ceilings[1] / 1e9:.4g} GB/s; {rounds} rounds a point; "
                f"torch_mm is a lower bound (no epilogue)\n\n{table}\n\n## Targets\n\n{summary}\n")
    plotted = plot(rows, os.path.join(out, "plot.png"))
    if not all(r["cpu"] for r in rows) and any(r["provider"] == "tpkernels_cublaslt" and r["ms"] for r in rows):
        with open(os.path.join(out, "backend_table.json"), "w") as f:
            json.dump(backend_table(rows, env), f, indent=2)
        print(f"backend table from these rows: {out}/backend_table.json (commit it as tpkernels/backend_table.json)")
    if any(r["provider"] in KERNEL_PROVIDERS and r["ms"] for r in rows):
        with open(os.path.join(out, "kernel_table.json"), "w") as f:
            json.dump(kernel_table(rows, env), f, indent=2)
        print(f"kernel table from these rows: {out}/kernel_table.json (commit it as tpkernels/kernel_table.json)")
    if args.cpu_results:
        with open(os.path.join(out, "backend_table_cpu.json"), "w") as f:
            json.dump(cpu_backend_table(rows, env), f, indent=2)
        print(f"CPU auto table from these rows: {out}/backend_table_cpu.json (commit it as tpkernels/backend_table_cpu.json)")
    print(table)
    print(summary)
    wrong = [r for r in rows if r["status"].startswith(("wrong", "failed"))]
    print(f"{len(rows)} rows, {sum(r['status'] == 'ok' for r in rows)} timed, {len(wrong)} wrong or failed -> "
          f"{out}/results.jsonl, table.md{', plot.png' if plotted else ''}; {time.time() - start:.0f} s")
    return 0


def _progress(total, disable):
    try:
        from tqdm import tqdm

        return tqdm(total=total, disable=disable, dynamic_ncols=True)
    except ImportError:  # the benchmarks extra brings tqdm; without it, a line per point
        class Lines:
            def __init__(self):
                self.done = 0

            def set_description(self, text):
                if not disable:
                    print(f"[{self.done + 1}/{total}] {text}", flush=True)

            def update(self):
                self.done += 1

            def close(self):
                pass

        return Lines()


if __name__ == "__main__":
    sys.exit(main())
