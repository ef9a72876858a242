"""The report: the environment a row records, what ran, the markdown table, the paired ratios and their
verdicts against the targets, and the plot."""
import datetime
import os
import statistics
import subprocess
import sys

import torch
import triton

from tpkernels import ops
from harness.cases import FP8, FP8_PROVIDERS, OPS

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # benchmarks/


def paired_ratios(rows):
    """Give every timed row of one point `ratio_vs_<other>` (the median of the per-round ratios of its
    time to the other provider's) and `ratio_vs_<other>_band` ([min, max] of them)."""
    timed = [r for r in rows if r["ms_rounds"]]
    for r in timed:
        for other in timed:
            if other is r or len(other["ms_rounds"]) != len(r["ms_rounds"]):
                continue
            ratios = [a / b for a, b in zip(r["ms_rounds"], other["ms_rounds"])]
            r[f"ratio_vs_{other['provider']}"] = statistics.median(ratios)
            r[f"ratio_vs_{other['provider']}_band"] = [min(ratios), max(ratios)]


def verdict(band, limit, at_most=True):
    """"met" or "missed" when the whole band [lo, hi] is on one side of `limit`, else "within noise".
    at_most: the target is ratio <= limit (else ratio >= limit)."""
    lo, hi = band
    if at_most:
        return "met" if hi <= limit else "missed" if lo > limit else "within noise"
    return "met" if lo >= limit else "missed" if hi < limit else "within noise"


def environment(device):
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True,
                           text=True).stdout.strip()
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    elif ops.INTERPRETED:
        name = "cpu (triton interpreter)"
    else:
        name = f"cpu {cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"
    return dict(device=name, torch=torch.__version__, triton=triton.__version__, git_sha=sha, git_dirty=bool(dirty),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                command=" ".join([os.path.basename(sys.executable)] + sys.argv))


def cpu_model():
    """The CPU's model name (lscpu's "Model name"), from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return " ".join(line.split(":", 1)[1].split())
    except OSError:
        pass
    return "unknown model"


_LIBRARY_PATHS = {
    "eager": "aten, unfused (autograd)", "torch_mm": "aten mm alone (lower bound: no epilogue)",
    "compile": "torch.compile of eager", "cublaslt": "torch._addmm_activation (cuBLASLt GELU epilogue)",
    "tpkernels_cublaslt": "tpkernels._C cuBLASLt epilogues",
    "tpkernels_cpu": "tpkernels._C oneDNN GEMM, epilogue as its post-ops",
    "tpkernels_cpu_packed": "tpkernels._C as tpkernels_cpu, on the packed-weight cache's copy",
    "tpkernels_packed": "backend=auto with the packed-weight cache on",
    "wrong": "planted error", "no_residual": "planted: skips the residual",
}


def describe(provider, launches):
    """What a provider ran: for our Triton paths the kernels and tiles of one call (`launches`, recorded
    during its check), else the library path."""
    if provider in _LIBRARY_PATHS:
        return _LIBRARY_PATHS[provider]
    if not launches:
        return "no Triton launch (eager fallback or the extension)"
    counts = {}
    for line in launches:
        counts[line] = counts.get(line, 0) + 1
    return "; ".join(f"{n} x {line}" if n > 1 else line for line, n in counts.items())


def markdown(rows):
    lines = ["| op | M | K | N | dtype | gelu | provider | timer | ms (round min-max) | TFLOP/s | % of floor | host us "
             "| / tpkernels (band) | / torch_mm (band) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def ratio(r, other):
        if f"ratio_vs_{other}" not in r:
            return "-"
        lo, hi = r[f"ratio_vs_{other}_band"]
        return f"{r[f'ratio_vs_{other}']:.3g} ({lo:.3g}-{hi:.3g})"

    for r in rows:
        head = f"| {r['op']} | {r['M']} | {r['K']} | {r['N']} | {r['dtype']} | {r['gelu']} | {r['provider']} |"
        if r["ms"] is None:
            lines.append(f"{head} | {r['status']} | | | | | | |")
            continue
        name = r["provider"] + (" (lower bound)" if r["provider"] == "torch_mm" else "")
        head = head.replace(f"| {r['provider']} |", f"| {name} |")
        lines.append(f"{head} {r['timer']} | {r['ms']:.4g} ({r['ms_min']:.4g}-{r['ms_max']:.4g}) | {r['tflops']:.3g} | "
                     f"{r['pct_of_floor']:.1f} | {r['host_us']:.1f} | {ratio(r, 'tpkernels')} | {ratio(r, 'torch_mm')} |")
    return "\n".join(lines)


# (name, op, numerator, denominator, which rows, limit, at_most): each is judged per point on the band
# of the paired ratio numerator / denominator.
TARGETS = [
    ("column fwd tpkernels / torch_mm <= 1.0, M <= 64", "column_fwd", "tpkernels", "torch_mm",
     lambda r: r["M"] <= 64, 1.0, True),
    ("column fwd eager / tpkernels >= 1.2, M <= 64", "column_fwd", "eager", "tpkernels", lambda r: r["M"] <= 64, 1.2,
     False),
    ("column fwd tpkernels / torch_mm <= 1.05, M >= 2048", "column_fwd", "tpkernels", "torch_mm",
     lambda r: r["M"] >= 2048, 1.05, True),
    ("row fwd tpkernels / tpkernels_cublaslt <= 1.0, M <= 16", "row_fwd", "tpkernels", "tpkernels_cublaslt",
     lambda r: r["M"] <= 16, 1.0, True),
    # Issue 17, the Triton kernels themselves at decode ("tpkernels" may run cuBLASLt there, by the table).
    ("column fwd Triton / torch_mm <= 1.0, M <= 64", "column_fwd", "tpkernels_triton", "torch_mm",
     lambda r: r["M"] <= 64, 1.0, True),
    ("column fwd eager / Triton >= 1.2, M <= 64", "column_fwd", "eager", "tpkernels_triton", lambda r: r["M"] <= 64,
     1.2, False),
    ("row fwd Triton / tpkernels_cublaslt <= 1.0, M <= 16", "row_fwd", "tpkernels_triton", "tpkernels_cublaslt",
     lambda r: r["M"] <= 16, 1.0, True),
    ("split-K / pointer kernel <= 1.0, M <= 64", None, "tpkernels_splitk", "tpkernels_pointer",
     lambda r: r["M"] <= 64, 1.0, True),
    ("column bwd tpkernels / eager <= 1.0", "column_bwd", "tpkernels", "eager", lambda r: True, 1.0, True),
    # Issue 18, fp8 (rows of --dtypes fp8: "eager" and "torch_mm" there are bf16's).
    ("fp8 mlp_shard / bf16 eager <= 1 / 1.5, M >= 8192", "mlp_shard", "tpkernels_fp8", "eager",
     lambda r: r["M"] >= 8192, 1 / 1.5, True),
    ("fp8 mlp_shard / unfused fp8 <= 1 / 1.1, M >= 8192", "mlp_shard", "tpkernels_fp8", "fp8_unfused",
     lambda r: r["M"] >= 8192, 1 / 1.1, True),
    ("fp8 column fwd / bare scaled_mm <= 1.1, M >= 2048", "column_fwd", "tpkernels_fp8", "scaled_mm",
     lambda r: r["M"] >= 2048, 1.1, True),
    ("fp8 decode / bf16 torch_mm <= 1 / 1.6, M <= 16", None, "tpkernels_fp8", "torch_mm", lambda r: r["M"] <= 16,
     1 / 1.6, True),
    ("mlp_shard tpkernels / eager <= 1.0", "mlp_shard", "tpkernels", "eager", lambda r: True, 1.0, True),
]
CPU_TARGETS = [
    ("eager / auto >= 1.0", None, "eager", "tpkernels", lambda r: True, 1.0, False),
    ("eager / auto >= 1.0, packed-weight cache on", None, "eager", "tpkernels_packed", lambda r: True, 1.0, False),
    ("eager / extension >= 1.1, M >= 64, fp32", "column_fwd", "eager", "tpkernels_cpu",
     lambda r: r["M"] >= 64 and r["dtype"] == "float32", 1.1, False),
]


def targets(rows):
    """The targets, judged per point on the paired ratio's band: met, missed, or within noise."""
    if all(r["cpu"] for r in rows) and all("interpreter" in r["device"] for r in rows):
        return "CPU smoke run (the interpreter): the targets are for GPU rows and CPU results, and none are here."
    checks = CPU_TARGETS if all(r["cpu"] for r in rows) else TARGETS
    lines = ["| target | point | ratio (band) | verdict |", "| --- | --- | --- | --- |"]
    for name, op, num, den, keep, limit, at_most in checks:
        for r in rows:
            fp8_row = r["dtype"] == str(FP8).replace("torch.", "")
            if fp8_row != (num in FP8_PROVIDERS):
                continue  # an fp8 point's bf16 providers are its baselines, judged at their own bf16 points
            if (op is None or r["op"] == op) and r["provider"] == num and keep(r) and f"ratio_vs_{den}" in r:
                band = r[f"ratio_vs_{den}_band"]
                lines.append(f"| {name} | {r['op']} M={r['M']} K={r['K']} N={r['N']} {r['dtype']} {r['gelu']} | "
                             f"{r[f'ratio_vs_{den}']:.3f} ({band[0]:.3f}-{band[1]:.3f}) | {verdict(band, limit, at_most)} |")
    lines += _decode_targets(rows)
    return "\n".join(lines) if len(lines) > 2 else "No row has the providers the targets compare."


# Issue 17's two targets that are not paired time ratios.
STREAMING_TARGET = 0.85  # the Triton column forward at N = 8192, M <= 64: this share of the run's copy bandwidth
HOST_TARGET = 1.5  # the Triton path's host time per call against torch.mm's, same point and run


def _decode_targets(rows):
    """Weight streaming (bytes over time against the run's copy bandwidth; the band from the fastest and
    slowest round) and host time (medians only: no band) at the decode points, for the Triton backend."""
    lines = []
    if all(r["cpu"] for r in rows):
        return lines
    mm_host = {(r["op"], r["M"], r["K"], r["N"], r["dtype"], r["gelu"]): r["host_us"] for r in rows
               if r["provider"] == "torch_mm" and r["host_us"]}
    for r in rows:
        if r["provider"] != "tpkernels_triton" or not r["ms"] or r["M"] > 64:
            continue
        point = f"{r['op']} M={r['M']} K={r['K']} N={r['N']} {r['dtype']} {r['gelu']}"
        if r["op"] == "column_fwd" and r["N"] == 8192:
            share = [r["gbps"] * r["ms"] / ms / r["bandwidth_gbps"] for ms in (r["ms_max"], r["ms_min"])]
            lines.append(f"| weight streaming >= {STREAMING_TARGET:.0%} of copy bandwidth | {point} | "
                         f"{r['gbps'] / r['bandwidth_gbps']:.3f} ({share[0]:.3f}-{share[1]:.3f}) | "
                         f"{verdict(share, STREAMING_TARGET, at_most=False)} |")
        mm = mm_host.get((r["op"], r["M"], r["K"], r["N"], r["dtype"], r["gelu"]))
        if mm:
            ratio = r["host_us"] / mm
            lines.append(f"| host time / torch_mm's <= {HOST_TARGET} (medians, no band) | {point} | {ratio:.3f} | "
                         f"{'met' if ratio <= HOST_TARGET else 'missed'} |")
    return lines


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["ms"]]
    op_names = [o for o in OPS if any(r["op"] == o for r in timed)]
    if not op_names:
        return False
    fig, axes = plt.subplots(1, len(op_names), figsize=(5 * len(op_names), 4), squeeze=False)
    for ax, op in zip(axes[0], op_names):
        lines = {}
        for r in timed:
            if r["op"] == op:
                lines.setdefault((r["provider"], r["K"], r["N"], r["dtype"], r["gelu"]), []).append((r["M"], r["tflops"]))
        for (provider, K, N, dtype, gelu), points in sorted(lines.items()):
            points.sort()
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o",
                    label=f"{provider} K={K} N={N} {dtype} {gelu}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("M (tokens)")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(op)
        ax.legend(fontsize=6)
    fig.suptitle(f"{rows[0]['device']} | torch {rows[0]['torch']} | triton {rows[0]['triton']} | {rows[0]['git_sha']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
