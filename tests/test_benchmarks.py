"""The benchmark harness's CPU smoke run: every op and CPU provider, the JSON schema, shuffled rounds and
paired ratios with their bands, the correctness gate (a deliberately wrong provider, and one that skips the
row stage's residual, are caught and not timed), the table and the plot; the verdicts, compare.py, the
headline plan's dry run and the backend table's rule."""
import json
import os
import statistics
import subprocess
import sys

import pytest

RUN = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "run.py")
FIELDS = {"op", "provider", "M", "K", "N", "dtype", "gelu", "ms", "ms_min", "ms_max", "tflops", "gbps", "pct_of_floor",
          "host_us", "device", "torch", "triton", "git_sha", "git_dirty", "date", "command", "status", "cpu", "floor_ms",
          "timer", "rounds", "ms_rounds", "order_rounds", "config", "peak_tflops", "peak_source", "bandwidth_gbps",
          "sm_clock_mhz", "power_w"}
COMPARE = os.path.join(os.path.dirname(RUN), "compare.py")
CPU_PROVIDERS = {"tpkernels", "tpkernels_cpu", "tpkernels_cpu_packed", "eager", "torch_mm", "compile"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("smoke")
    result = subprocess.run(
        [sys.executable, RUN, "--smoke", "--out", str(out), "--providers", *sorted(CPU_PROVIDERS), "cublaslt", "wrong",
         "no_residual"],
        capture_output=True, text=True, timeout=1200, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    return out, rows, result.stdout


def test_smoke_rows_cover_every_op_and_provider_with_the_schema(smoke):
    _, rows, _ = smoke
    assert rows
    for r in rows:
        assert FIELDS <= set(r), FIELDS - set(r)
        assert r["cpu"] is True and r["device"].startswith("cpu"), "CPU rows must say so"
    ops_ = {"column_fwd", "row_fwd", "column_bwd", "mlp_shard", "tp_mlp", "gated_fwd"}
    assert {r["op"] for r in rows} == ops_
    timed = {(r["op"], r["provider"]) for r in rows if r["status"] == "ok"}
    for op in ops_:
        assert (op, "tpkernels") in timed and (op, "eager") in timed, op
    assert ("column_fwd", "compile") in timed and ("column_fwd", "torch_mm") in timed
    assert all(r["status"] == "n/a" for r in rows if r["provider"] == "cublaslt"), "cuBLASLt is CUDA only"
    from tpkernels import extension

    if extension.has("cpu"):  # the native C++ backend, timed beside the Triton one, plain and packed
        # the gated form has no native epilogue: its CPU backend is eager
        assert {op for op, provider in timed if provider == "tpkernels_cpu"} == ops_ - {"tp_mlp", "gated_fwd"}
        assert {op for op, provider in timed if provider == "tpkernels_cpu_packed"} == ops_ - {"tp_mlp", "gated_fwd"}
        assert not extension.cpu_weight_cache()["enabled"]
    for r in rows:
        if r["status"] == "ok":
            assert r["ms_min"] <= r["ms"] <= r["ms_max"] and r["tflops"] > 0 and r["pct_of_floor"] > 0
            assert r["host_us"] > 0 and r["timer"] == "cpu" and r["rounds"] == 2 == len(r["ms_rounds"])
            assert r["ms"] == statistics.median(r["ms_rounds"]) and r["config"]
            assert r["sm_clock_mhz"] is None and r["power_w"] is None  # no GPU telemetry on the CPU
        else:
            assert r["ms_rounds"] == [] and r["ms"] is None
    assert any("pointer 32x32x32" in r["config"] for r in rows if r["provider"] == "tpkernels" and r["config"])


def _points(rows):
    points = {}
    for r in rows:
        points.setdefault((r["op"], r["M"], r["K"], r["N"], r["dtype"], r["gelu"]), []).append(r)
    return points


def test_rounds_are_shuffled_and_ratios_paired(smoke):
    """Each round runs the providers in a new order; a row's ratio to another is the median of the
    round-by-round ratios of their times, and its band their min and max."""
    _, rows, _ = smoke
    reordered = 0
    for point, group in _points(rows).items():
        timed = [r for r in group if r["ms_rounds"]]
        orders = [sorted(timed, key=lambda r: r["order_rounds"][i]) for i in range(2)]
        reordered += [r["provider"] for r in orders[0]] != [r["provider"] for r in orders[1]]
        for r in timed:
            assert f"ratio_vs_{r['provider']}" not in r
            for other in timed:
                if other is r:
                    continue
                ratios = [a / b for a, b in zip(r["ms_rounds"], other["ms_rounds"])]
                assert r[f"ratio_vs_{other['provider']}"] == pytest.approx(statistics.median(ratios)), point
                assert r[f"ratio_vs_{other['provider']}_band"] == pytest.approx([min(ratios), max(ratios)])
    assert reordered, "the providers ran in the same order in every round of every point"


def test_verdicts_need_the_whole_band_on_one_side():
    sys.path.insert(0, os.path.dirname(RUN))
    from harness.report import verdict

    assert verdict([0.90, 0.98], 1.0) == "met" and verdict([1.02, 1.10], 1.0) == "missed"
    assert verdict([0.95, 1.05], 1.0) == "within noise"
    assert verdict([1.25, 1.4], 1.2, at_most=False) == "met"
    assert verdict([1.1, 1.3], 1.2, at_most=False) == "within noise"


def test_a_wrong_provider_is_caught_and_not_timed(smoke):
    _, rows, _ = smoke
    wrong = [r for r in rows if r["provider"] == "wrong"]
    assert wrong and all(r["status"].startswith("wrong:") and r["ms"] is None for r in wrong)
    # a baseline that skips part of the work (the row stage's residual) fails the same fp64 check
    skipped = [r for r in rows if r["provider"] == "no_residual"]
    assert {r["status"][:6] for r in skipped if r["op"] == "row_fwd"} == {"wrong:"}
    assert all(r["status"] == "n/a" for r in skipped if r["op"] != "row_fwd")
    planted = ("wrong", "no_residual")
    assert not any(r["status"].startswith(("wrong", "failed")) for r in rows if r["provider"] not in planted)


def test_compare_judges_changes_against_their_noise(smoke, tmp_path):
    out, rows, _ = smoke
    same = subprocess.run([sys.executable, COMPARE, str(out / "results.jsonl"), str(out / "results.jsonl")],
                          capture_output=True, text=True, timeout=120)
    assert same.returncode == 0, same.stderr
    timed = sum(1 for r in rows if r["ms"])
    assert f"{timed} points in both runs: 0 faster, 0 slower, {timed} within noise" in same.stdout
    # planted: the new run's tpkernels twice as fast in every round, its noise unchanged
    old = [dict(r, ms_rounds=[1.0, 1.1], ms=1.05, ms_min=1.0, ms_max=1.1) for r in rows if r["ms"]]
    new = []
    for r in old:
        scale = 0.5 if r["provider"] == "tpkernels" else 1.0
        new.append(dict(r, ms=r["ms"] * scale, ms_min=r["ms_min"] * scale, ms_max=r["ms_max"] * scale))
    sys.path.insert(0, os.path.dirname(RUN))
    import run

    for group in (old, new):
        for point in _points(group).values():
            for r in point:
                r["ms_rounds"] = [t * r["ms"] / 1.05 for t in r["ms_rounds"]]
            run.paired_ratios(point)
    for name, group in (("old", old), ("new", new)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in group))
    result = subprocess.run([sys.executable, COMPARE, str(tmp_path / "old.jsonl"), str(tmp_path / "new.jsonl")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    verdicts = {line.split("|")[7].strip(): line.split("|")[-2].strip() for line in result.stdout.splitlines()
                if line.startswith("| ") and not line.startswith("| op") and not line.startswith("| ---")}
    assert verdicts["tpkernels"] == "faster" and verdicts["eager"] == "within noise"


def test_headline_plan_dry_run_fits_five_minutes():
    result = subprocess.run([sys.executable, RUN, "--plan", "headline", "--dry-run"], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    points = [line for line in lines if line.startswith("  ")]
    assert len(points) == 29 and sum("tp_mlp" in p for p in points) == 1
    assert sum("float8_e4m3fn" in p for p in points) == 3
    assert sum("gelu=none" in p and "gated_fwd" not in p for p in points) == 2
    # the gated MLP's column stage: Llama-3-8B's and -70B's TP 8 shards, decode and prefill
    assert sum("gated_fwd" in p for p in points) == 7
    (predicted,) = [line for line in lines if line.startswith("predicted: ")]
    assert int(predicted.split()[1]) < 300


def test_table_and_plot_are_written(smoke):
    out, rows, stdout = smoke
    table = (out / "table.md").read_text()
    assert "| op | M | K | N |" in table and "## Targets" in table
    assert table.count("\n| ") >= len(rows)
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrong or failed" in stdout


def test_cpu_rows_are_never_written_as_results():
    results = os.path.join(os.path.dirname(RUN), "results", "cpu-smoke")
    result = subprocess.run([sys.executable, RUN, "--smoke", "--out", results, "--ops", "column_fwd"],
                            capture_output=True, text=True, timeout=300, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert result.returncode != 0 and "never written" in result.stderr
    assert not os.path.exists(results)


def test_bad_shapes_are_refused():
    result = subprocess.run([sys.executable, RUN, "--shapes", "64,64", "--ops", "column_fwd"], capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert result.returncode != 0 and "is not M,K,N" in (result.stdout + result.stderr)


def test_backend_table_follows_the_faster_backend():
    """The auto table the GPU rows write: cuBLASLt only where its paired ratio band to Triton lies wholly
    below 1 at every measured shape of an M; a band that straddles 1 keeps Triton."""
    sys.path.insert(0, os.path.dirname(RUN))
    import run

    def row(op, M, K, band):
        return dict(op=op, M=M, K=K, N=4096, dtype="bfloat16", gelu="tanh", provider="tpkernels_cublaslt", ms=1.0,
                    cpu=False, ratio_vs_tpkernels_triton=sum(band) / 2, ratio_vs_tpkernels_triton_band=band)

    rows = [row("column_fwd", 64, 4096, [1.1, 1.3]),     # slower: Triton
            row("column_fwd", 256, 4096, [0.95, 1.02]),  # a tie: Triton
            row("column_fwd", 4096, 4096, [0.85, 0.95]), row("column_fwd", 4096, 8192, [0.7, 0.8]),  # cuBLASLt
            row("row_fwd", 4096, 4096, [1.05, 1.2])]
    env = dict(device="NVIDIA H100", date="today", git_sha="abc", git_dirty=False, command="run.py")
    table = run.backend_table(rows, env)
    assert table["rules"] == [{"dtypes": ["bfloat16"], "activations": [2], "min_m": 4096, "backend": "cublaslt"},
                              {"backend": "triton"}]
    assert "NVIDIA H100" in table["source"] and "K=8192" in table["shapes"] and "extrapolated" in table["shapes"]


def test_cpu_results_mode_refuses_the_interpreter_and_writes_a_cpu_table():
    """--cpu-results times the CPU backends in their normal state (no interpreter), and its CPU auto table
    picks the extension only where its paired ratio band to eager lies wholly below 1."""
    result = subprocess.run([sys.executable, RUN, "--cpu-results", "--dry-run"], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert result.returncode != 0 and "unset TRITON_INTERPRET" in result.stderr
    sys.path.insert(0, os.path.dirname(RUN))
    import run

    def row(M, dtype, band, gelu="none", op="column_fwd", provider="tpkernels_cpu"):
        return dict(op=op, M=M, K=1024, N=4096, dtype=dtype, gelu=gelu, provider=provider, ms=1.0, cpu=True,
                    ratio_vs_eager=sum(band) / 2, ratio_vs_eager_band=band)

    rows = [row(1, "float32", [0.97, 1.03]), row(64, "float32", [0.8, 0.9]), row(512, "float32", [0.85, 0.95]),
            row(64, "bfloat16", [1.1, 1.3]), row(64, "float32", [0.9, 0.99], op="row_fwd"),
            row(1, "bfloat16", [0.4, 0.6], provider="tpkernels_cpu_packed"),
            row(64, "bfloat16", [0.9, 1.01], provider="tpkernels_cpu_packed")]
    env = dict(device="cpu AMD EPYC (2 cores, 2 threads)", date="today", git_sha="abc", git_dirty=True, command="run.py")
    table = run.cpu_backend_table(rows, env)
    smallest = {"min_weight_elements": 1024 * 4096}  # the rows' K x N: no rule for smaller weights
    assert table["rules"] == [
        {"dtypes": ["float32"], "activations": [0], "min_m": 64, "backend": "cpu", "packed": False, **smallest},
        {"dtypes": ["float32"], "activations": [1], "min_m": 64, "backend": "cpu", "max_m": 511, "packed": False,
         **smallest},
        {"dtypes": ["float32"], "activations": [1], "min_m": 512, "backend": "cpu", "packed": False, **smallest},
        {"dtypes": ["bfloat16"], "activations": [1], "min_m": 1, "backend": "cpu", "max_m": 63, "packed": True,
         **smallest},
        {"backend": "eager"}]
    assert "(dirty)" in table["source"] and "AMD EPYC" in table["source"]


def test_kernel_table_takes_a_kernel_only_where_it_wins():
    """The kernel table the GPU rows write: at a point, the kernel whose row (by its recorded launches) is
    fastest, only when its band to every other kernel's row lies wholly below 1 and the rule picks another."""
    sys.path.insert(0, os.path.dirname(RUN))
    import run

    def row(M, N, provider, ms, bands, config=None):
        kernel = run.KERNEL_PROVIDERS[provider]
        r = dict(op="column_fwd", M=M, K=4096, N=N, dtype="bfloat16", gelu="tanh", provider=provider, ms=ms,
                 cpu=False, config=config or f"{kernel} 16x64x128 warps=4 stages=4 subtile=1")
        r.update({f"ratio_vs_{other}_band": band for other, band in bands.items()})
        return r

    rows = [  # M = 1: the pointer kernel wins beyond the noise where the rule splits K
        row(1, 2048, "tpkernels_pointer", 5.0, {"tpkernels_splitk": [0.8, 0.9], "tpkernels_tma": [0.5, 0.6]}),
        row(1, 2048, "tpkernels_splitk", 6.0, {"tpkernels_pointer": [1.1, 1.2], "tpkernels_tma": [0.6, 0.7]}),
        row(1, 2048, "tpkernels_tma", 9.0, {"tpkernels_pointer": [1.7, 1.9], "tpkernels_splitk": [1.4, 1.6]}),
        # M = 16: split-K is fastest, but within noise of the pointer kernel: no entry
        row(16, 2048, "tpkernels_pointer", 6.1, {"tpkernels_splitk": [0.98, 1.05]}),
        row(16, 2048, "tpkernels_splitk", 6.0, {"tpkernels_pointer": [0.95, 1.02]}),
        # M = 64: split-K wins and the rule splits there anyway: no entry
        row(64, 2048, "tpkernels_pointer", 9.0, {"tpkernels_splitk": [1.4, 1.6]}),
        row(64, 2048, "tpkernels_splitk", 6.0, {"tpkernels_pointer": [0.6, 0.7]}),
    ]
    env = dict(device="NVIDIA H200", date="today", git_sha="abc", git_dirty=False, command="run.py")
    table = run.kernel_table(rows, env, sms=132, capability=(9, 0))
    assert table["entries"] == [{"layout": 3, "dtype": "bfloat16", "m_bucket": 1, "n": 2048, "k": 4096,
                                 "kernel": "pointer"}]
    assert "NVIDIA H200" in table["source"] and "M=16" in table["source"]


def test_fp8_smoke_checks_and_times_every_fp8_provider(tmp_path):
    """`--dtypes fp8`: our fp8 path, the unfused fp8 path and the bare fp8 GEMM beside the bf16 providers,
    each checked (fp8 ones against the unfused fp8 path's error) and timed; column_bwd has no fp8 form."""
    result = subprocess.run(
        [sys.executable, RUN, "--smoke", "--dtypes", "fp8", "--shapes", "16,32,48", "--ops", "column_fwd", "row_fwd",
         "mlp_shard", "column_bwd", "--providers", "tpkernels_fp8", "fp8_unfused", "scaled_mm", "tpkernels", "eager",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, TRITON_INTERPRET="1"))
    assert result.returncode == 0, f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    status = {(r["op"], r["provider"]): r["status"] for r in rows}
    assert {r["op"] for r in rows} == {"column_fwd", "row_fwd", "mlp_shard"}
    assert all(r["dtype"] == "float8_e4m3fn" for r in rows)
    for op in ("column_fwd", "row_fwd", "mlp_shard"):
        for provider in ("tpkernels_fp8", "fp8_unfused", "tpkernels", "eager"):
            assert status[op, provider] == "ok", (op, provider, status[op, provider])
    assert status["column_fwd", "scaled_mm"] == "ok" and status["mlp_shard", "scaled_mm"] == "n/a"
    fused = next(r for r in rows if r["op"] == "column_fwd" and r["provider"] == "tpkernels_fp8")
    assert "ratio_vs_fp8_unfused_band" in fused and "pointer" in fused["config"]
