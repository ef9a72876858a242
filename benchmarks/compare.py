"""Compare two benchmark runs point by point, each change judged against its own noise.

    python benchmarks/compare.py OLD.jsonl NEW.jsonl                   # markdown to stdout
    python benchmarks/compare.py OLD.jsonl NEW.jsonl --baseline eager  # normalise by another provider

For every (op, M, K, N, dtype, gelu, provider) timed in both runs:
- `time`: new / old median time, with the band [new min / old max, new max / old min] over their rounds;
- `vs baseline`: new / old of the provider's paired ratio to the baseline provider (torch_mm by default:
  the same library GEMM in both runs, so a clock or driver change between the runs cancels), with the
  band [new lo / old hi, new hi / old lo] of the two ratio bands.
The verdict uses the baseline-normalised band where both runs have it, else the time band: "faster" or
"slower" only when the whole band is on one side of 1, otherwise "within noise".
"""
import argparse
import json
import sys


def load(path):
    rows = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if r.get("ms"):
                key = (r["op"], r["M"], r["K"], r["N"], r["dtype"], r.get("gelu", "tanh"), r["provider"])
                rows[key] = r
    return rows


def judge(lo, hi):
    return "faster" if hi < 1 else "slower" if lo > 1 else "within noise"


def compare(old, new, baseline):
    """One dict per point and provider in both runs: the time change, the normalised change, a verdict."""
    out = []
    for key in sorted(set(old) & set(new), key=str):
        o, n = old[key], new[key]
        row = dict(zip(("op", "M", "K", "N", "dtype", "gelu", "provider"), key))
        row["time"] = n["ms"] / o["ms"]
        row["time_band"] = [n["ms_min"] / o["ms_max"], n["ms_max"] / o["ms_min"]]
        field = f"ratio_vs_{baseline}"
        if key[-1] != baseline and field in o and field in n:
            row["vs_baseline"] = n[field] / o[field]
            (olo, ohi), (nlo, nhi) = o[f"{field}_band"], n[f"{field}_band"]
            row["vs_baseline_band"] = [nlo / ohi, nhi / olo]
            row["verdict"] = judge(*row["vs_baseline_band"])
        else:
            row["verdict"] = judge(*row["time_band"])
        out.append(row)
    return out


def markdown(rows, baseline):
    lines = [f"| op | M | K | N | dtype | gelu | provider | new / old time (band) | new / old vs {baseline} (band) "
             f"| verdict |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        normalised = "-"
        if "vs_baseline" in r:
            lo, hi = r["vs_baseline_band"]
            normalised = f"{r['vs_baseline']:.3f} ({lo:.3f}-{hi:.3f})"
        lo, hi = r["time_band"]
        lines.append(f"| {r['op']} | {r['M']} | {r['K']} | {r['N']} | {r['dtype']} | {r['gelu']} | {r['provider']} | "
                     f"{r['time']:.3f} ({lo:.3f}-{hi:.3f}) | {normalised} | {r['verdict']} |")
    counts = {v: sum(r["verdict"] == v for r in rows) for v in ("faster", "slower", "within noise")}
    lines.append("")
    lines.append(f"{len(rows)} points in both runs: " + ", ".join(f"{n} {v}" for v, n in counts.items()))
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--baseline", default="torch_mm", help="the provider to normalise by (default: torch_mm)")
    args = parser.parse_args(argv)
    old, new = load(args.old), load(args.new)
    rows = compare(old, new, args.baseline)
    if not rows:
        print(f"no point and provider is timed in both {args.old} and {args.new}", file=sys.stderr)
        return 1
    print(markdown(rows, args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
