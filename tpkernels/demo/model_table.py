"""`python -m tpkernels model`: the performance model's predictions as a table (world sizes, overlap, the
break-even token count; gated: the column stage fused against unfused)."""
import dataclasses

from tpkernels.perfmodel import MACHINES, break_even_m, gated_column_times, predict

__all__ = ["main", "table"]


def table(tokens, hidden, ffn, worlds, machine, element_size=2, chunks=None, gated=False):
    """A markdown table of `predict` for each world size, with the break-even M (and, gated, the column stage
    fused against unfused)."""
    lines = [f"{machine.name}; M={tokens}, hidden={hidden}, ffn={ffn}, {element_size}-byte elements"
             + (", gated MLP (gate and up)" if gated else ""),
             "",
             "| W | forward ms | forward, overlap ms | step ms | step, overlap ms | comm share | overlap pays from M |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for world in worlds:
        p = predict(tokens, hidden, ffn, world, machine, element_size, chunks, gated=gated)
        even = break_even_m(hidden, ffn, world, machine, element_size, chunks, gated=gated)
        lines.append(f"| {world} | {p['forward'] * 1e3:.3f} | {p['forward_overlap'] * 1e3:.3f} | {p['step'] * 1e3:.3f} | "
                     f"{p['step_overlap'] * 1e3:.3f} | {p['communication_share']:.0%} | "
                     f"{'never' if even is None else even} |")
    if gated:
        lines += ["", "| W | gated column stage, fused us | unfused (merged GEMM + act * up) us | fused speedup |",
                  "| --- | --- | --- | --- |"]
        for world in worlds:
            g = gated_column_times(tokens, hidden, ffn, world, machine, element_size)
            lines.append(f"| {world} | {g['fused'] * 1e6:.1f} | {g['unfused'] * 1e6:.1f} | "
                         f"{g['unfused'] / g['fused']:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tpkernels model", description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=8192, help="the model width K")
    parser.add_argument("--ffn", type=int, default=28672, help="the MLP's hidden width H (all ranks together)")
    parser.add_argument("--tokens", type=int, default=4096, help="M, tokens per rank")
    parser.add_argument("--world-size", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--machine", choices=sorted(MACHINES), default="h100-nvlink")
    parser.add_argument("--bus-bandwidth", type=float, help="GB/s, overriding the machine's")
    parser.add_argument("--latency-us", type=float, help="overriding the machine's")
    parser.add_argument("--chunks", type=int, help="overlap chunks (default: the world size)")
    parser.add_argument("--element-size", type=int, default=2, help="bytes (2: bf16)")
    parser.add_argument("--gated", action="store_true", help="a gated MLP (Llama's): gate and up in the column stage")
    args = parser.parse_args(argv)
    for name in ("hidden", "ffn", "tokens", "element_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if any(w < 1 or w > args.ffn for w in args.world_size):
        parser.error(f"--world-size {args.world_size}: each must be between 1 and --ffn {args.ffn}")
    machine = MACHINES[args.machine]
    if args.bus_bandwidth is not None:
        machine = dataclasses.replace(machine, bus_bandwidth=args.bus_bandwidth * 1e9)
    if args.latency_us is not None:
        machine = dataclasses.replace(machine, latency=args.latency_us * 1e-6)
    print(table(args.tokens, args.hidden, args.ffn, args.world_size, machine, args.element_size, args.chunks,
                gated=args.gated))
    return 0
