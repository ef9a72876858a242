"""The auto tables a run argues for (`tpkernels/backend_table.json`, `backend_table_cpu.json`,
`kernel_table.json`), from its paired ratio bands; their schema is `tpkernels.tables`'."""
import torch

from tpkernels import autotune, launch, ops, tables
from harness.cases import KERNEL_PROVIDERS


def _rules_from_bands(rows, provider, baseline, backend, default, keep):
    """(rules, measured shapes): per dtype and activation (column_fwd: its GELU form; row_fwd: none),
    `backend` from each measured M where `provider`'s paired ratio to `baseline` has its whole band below
    1 at every measured shape of that M, up to the next measured M; then `default` for everything else."""
    wins, shapes = {}, set()
    for r in rows:
        activation = {"column_fwd": {"tanh": ops.GELU_TANH, "none": ops.GELU}.get(r["gelu"]),
                      "row_fwd": ops.IDENTITY}.get(r["op"])
        band = r.get(f"ratio_vs_{baseline}_band")
        if r["provider"] != provider or activation is None or band is None or not keep(r):
            continue
        shapes.add((r["op"], r["M"], r["K"], r["N"], r["dtype"]))
        wins.setdefault((r["dtype"], activation), {}).setdefault(r["M"], []).append(band[1] < 1.0)
    rules = []
    for (dtype, activation), by_m in sorted(wins.items()):
        ms = sorted(by_m)
        for i, M in enumerate(ms):
            if all(by_m[M]):
                rules.append(tables.backend_rule(backend, dtypes=[dtype], activations=[activation], min_m=M,
                                                 max_m=ms[i + 1] - 1 if i + 1 < len(ms) else None))
    rules.append(tables.backend_rule(default))
    return rules, ", ".join(f"{op} M={M} K={K} N={N} {dt}" for op, M, K, N, dt in sorted(shapes))


def _source(env):
    return (f"measured: {env['device']}, {env['date']}, git {env['git_sha']}{' (dirty)' if env['git_dirty'] else ''}, "
            f"`{env['command']}`")


def _table(rules, measured, env, scope, rule):
    return tables.table(_source(env), rule, rules,
                        shapes=f"measured at {measured}; the M ranges are applied to every K and N{scope} (extrapolated)")


def backend_table(rows, env):
    """The `tpkernels/backend_table.json` these GPU rows argue for: cuBLASLt only where its paired ratio
    to Triton lies wholly below 1 at every measured shape of an M; a tie or a loss keeps Triton. The
    file says which shapes were measured, and that the others are extrapolated."""
    rules, measured = _rules_from_bands(rows, "tpkernels_cublaslt", "tpkernels_triton", "cublaslt", "triton",
                                        keep=lambda r: not r["cpu"])
    return _table(rules, measured, env, "", "cuBLASLt where its paired ratio band to Triton lies wholly below 1 at "
                                            "every measured shape of that M; otherwise Triton")


def cpu_backend_table(rows, env):
    """The `tpkernels/backend_table_cpu.json` these CPU rows argue for: the extension ("cpu") only where
    its paired ratio to eager lies wholly below 1 at every measured shape of an M, in rules for the
    packed-weight cache off (tpkernels_cpu's rows) and on (tpkernels_cpu_packed's); eager elsewhere."""
    rules, measured = [], ""
    # Below the smallest measured weight the extension's host cost (~27 us a call against eager's ~13)
    # can outweigh its GEMM: its rules stop there.
    smallest = min((r["K"] * r["N"] for r in rows if r["provider"] == "tpkernels_cpu"), default=0)
    for provider, packed in (("tpkernels_cpu", False), ("tpkernels_cpu_packed", True)):
        wins, shapes = _rules_from_bands(rows, provider, "eager", "cpu", None, keep=lambda r: True)
        measured = measured or shapes
        rules += [{**rule, "packed": packed, "min_weight_elements": smallest}
                  for rule in wins if rule["backend"] == "cpu"]
    return _table(rules + [tables.backend_rule("eager")], measured, env,
                  f" with at least {smallest} weight elements (K x N), and every CPU",
                  "the extension where its paired ratio band to eager lies wholly below 1 at every measured shape "
                  "of that M, with the packed-weight cache off (\"packed\": false: tpkernels_cpu's rows) or on "
                  "(true: tpkernels_cpu_packed's), for weights of at least the smallest measured K x N; otherwise "
                  "eager")


def kernel_table(rows, env, sms=None, capability=None):
    """The `tpkernels/kernel_table.json` these GPU rows argue for: at each measured forward point, the
    kernel with the lowest median time (as its row's recorded launches name it) when its paired ratio
    band to each other kernel's row lies wholly below 1 and `launch.rule_kernel` would pick another."""
    by_point, entries = {}, []
    for r in rows:
        if r["provider"] in KERNEL_PROVIDERS and r["ms"] and not r["cpu"] and r["op"] in ("column_fwd", "row_fwd"):
            by_point.setdefault((r["op"], r["M"], r["K"], r["N"], r["dtype"], r["gelu"]), []).append(r)
    if sms is None:  # the run's device
        sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
        capability = torch.cuda.get_device_capability(torch.cuda.current_device())
    for (op, M, K, N, dtype, gelu), group in sorted(by_point.items()):
        ran = {(r["config"] or "").split()[0]: r for r in group}  # a "tma" row may have run the pointer kernel
        best = min(group, key=lambda r: r["ms"])
        kernel = (best["config"] or "").split()[0]
        wins = all(best.get(f"ratio_vs_{r['provider']}_band", [2, 2])[1] < 1 for r in group if r is not best)
        if kernel in KERNEL_PROVIDERS.values() and wins and kernel != launch.rule_kernel(M, N, K, sms, capability,
                                                                                         "tma" in ran):
            entry = tables.kernel_entry(3, dtype, autotune.bucket(M), N, K, kernel)
            if entry not in entries:
                entries.append(entry)
    measured = ", ".join(f"{op} M={M} K={K} N={N} {dt} {g}" for op, M, K, N, dt, g in sorted(by_point))
    return tables.table(f"{_source(env)}; at {measured}", launch.KERNEL_TABLE["rule"], entries, kernel=True)
