"""The benchmark harness's CPU smoke run: every op and CPU provider, the JSON schema, the correctness
gate (a deliberately wrong provider is caught and not timed), the table and the plot."""
import json
import os
import subprocess
import sys

import pytest

RUN = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "run.py")
FIELDS = {"op", "provider", "M", "K", "N", "dtype", "ms", "ms_min", "ms_max", "tflops", "gbps", "pct_of_floor",
          "host_us", "device", "torch", "triton", "git_sha", "date", "command", "status", "cpu", "floor_ms"}
CPU_PROVIDERS = {"tpkernels", "tpkernels_cpu", "eager", "torch_mm", "compile"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("smoke")
    result = subprocess.run(
        [sys.executable, RUN, "--smoke", "--out", str(out), "--providers", *sorted(CPU_PROVIDERS), "cublaslt", "wrong"],
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
    ops_ = {"column_fwd", "row_fwd", "column_bwd", "mlp_shard", "tp_mlp"}
    assert {r["op"] for r in rows} == ops_
    timed = {(r["op"], r["provider"]) for r in rows if r["status"] == "ok"}
    for op in ops_:
        assert (op, "tpkernels") in timed and (op, "eager") in timed, op
    assert ("column_fwd", "compile") in timed and ("column_fwd", "torch_mm") in timed
    assert all(r["status"] == "n/a" for r in rows if r["provider"] == "cublaslt"), "cuBLASLt is CUDA only"
    from tpkernels import extension

    if extension.has("cpu"):  # the native C++ backend, timed beside the Triton one
        assert {op for op, provider in timed if provider == "tpkernels_cpu"} == ops_ - {"tp_mlp"}
    for r in rows:
        if r["status"] == "ok":
            assert r["ms_min"] <= r["ms"] <= r["ms_max"] and r["tflops"] > 0 and r["pct_of_floor"] > 0
            assert r["host_us"] > 0


def test_a_wrong_provider_is_caught_and_not_timed(smoke):
    _, rows, _ = smoke
    wrong = [r for r in rows if r["provider"] == "wrong"]
    assert wrong and all(r["status"].startswith("wrong:") and r["ms"] is None for r in wrong)
    assert not any(r["status"].startswith(("wrong", "failed")) for r in rows if r["provider"] != "wrong")


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
    """The auto table the GPU rows write: cuBLASLt exactly where it beat Triton on most points."""
    sys.path.insert(0, os.path.dirname(RUN))
    import run

    def row(op, M, K, provider, ms):
        return dict(op=op, M=M, K=K, N=4096, dtype="bfloat16", provider=provider, ms=ms, cpu=False)

    rows = [row("column_fwd", 64, 4096, "tpkernels_triton", 1.0), row("column_fwd", 64, 4096, "tpkernels_cublaslt", 1.2),
            row("column_fwd", 4096, 4096, "tpkernels_triton", 1.0), row("column_fwd", 4096, 4096, "tpkernels_cublaslt", 0.9),
            row("column_fwd", 4096, 8192, "tpkernels_triton", 1.0), row("column_fwd", 4096, 8192, "tpkernels_cublaslt", 0.8),
            row("row_fwd", 4096, 4096, "tpkernels_triton", 1.0), row("row_fwd", 4096, 4096, "tpkernels_cublaslt", 1.1)]
    env = dict(device="NVIDIA H100", date="today", git_sha="abc", command="run.py")
    table = run.backend_table(rows, env)
    assert table["rules"] == [{"dtypes": ["bfloat16"], "activations": [2], "min_m": 4096, "backend": "cublaslt"},
                              {"backend": "triton"}]
    assert "NVIDIA H100" in table["source"]
