"""`python -m tpkernels`: the seed notebook's question, answered on real ranks.

Spawns the ranks: 2 CPU ranks on gloo by default, one rank per GPU on NCCL where there are two or
more GPUs. Each reproduces the notebook's numbers, then runs four strategies for the whole MLP and
rank 0 prints their collectives, bytes sent per rank, errors and times (`tpkernels.demo.strategies`).

`python -m tpkernels model ...` prints the performance model's table instead (`tpkernels.demo.model_table`).
"""
import argparse
import os
import sys
import tempfile

import torch
import torch.multiprocessing as mp

from tpkernels.demo.strategies import DTYPES, rank_main


def parse_args(argv=None):
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    parser = argparse.ArgumentParser(prog="python -m tpkernels", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: one rank per GPU on NCCL with 2 or more GPUs, else CPU ranks on gloo")
    parser.add_argument("--world-size", type=int, default=None, help="ranks (default: the GPUs, or 2 on CPU)")
    parser.add_argument("--tokens", type=int, default=64, help="M, the rows of x")
    parser.add_argument("--in-features", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--out-features", type=int, default=None, help="default: in-features")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--repeat", type=int, default=5, help="timed runs per strategy")
    parser.add_argument("--timeout", type=int, default=300, help="seconds before a stuck collective fails")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if gpus >= 2 else "cpu"
    if args.world_size is None:
        args.world_size = gpus if args.device == "cuda" else 2
    if args.device == "cuda" and args.world_size > gpus:
        parser.error(f"--world-size {args.world_size} needs that many GPUs; this machine has {gpus}")
    if args.world_size < 1:
        parser.error("--world-size must be at least 1")
    for name in ("in_features", "hidden"):
        if getattr(args, name) < args.world_size:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)} is smaller than the {args.world_size} "
                         f"ranks that share it")
    return args


def main(args):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(rank_main, args=(args.world_size, os.path.join(tmp, "init"), args.device, args),
                 nprocs=args.world_size, join=True)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["model"]:  # the performance model: no ranks to spawn
        from tpkernels.demo import model_table

        sys.exit(model_table.main(sys.argv[2:]))
    arguments = parse_args()
    if arguments.device == "cpu" and "TRITON_INTERPRET" not in os.environ:
        # triton reads the switch as it decorates the kernels, which importing tpkernels already did:
        # start again with it set, so that CPU ranks run the Triton kernels rather than eager.
        os.execve(sys.executable, [sys.executable, "-m", "tpkernels", *sys.argv[1:]],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    sys.exit(main(arguments))
