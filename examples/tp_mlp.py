"""Train a TensorParallelMLP across processes started by torchrun, checking it against the dense model.

    TRITON_INTERPRET=1 torchrun --nproc-per-node 2 examples/tp_mlp.py              # CPU ranks on gloo
    torchrun --nproc-per-node 8 examples/tp_mlp.py --cuda                          # a GPU per rank, NCCL
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 examples/tp_mlp.py --cuda                       # 16 ranks on 2 nodes

Every rank builds the same dense MLP (same seed), keeps its shards with `TensorParallelMLP.from_dense`,
and takes a few SGD steps on the same batches; the dense model takes the same steps on every rank, and
the script fails unless the two agree. TensorParallelMLP uses the default group here; to keep tensor
parallelism inside a node, pass `process_group=torch.distributed.new_group(ranks_of_this_node)`.
"""
import argparse
import os

import torch
import torch.distributed as dist

import tpkernels
from tpkernels.reference import MLP


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="one GPU per rank (LOCAL_RANK) and NCCL")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--features", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args()

    if args.cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if args.cuda else "gloo")  # torchrun's environment says where and who
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same dense model on every rank
    dense = MLP(args.features, args.hidden, device=device)
    tp = tpkernels.TensorParallelMLP.from_dense(dense.fc1, dense.fc2)
    tp_opt = torch.optim.SGD(tp.parameters(), lr=0.05)
    dense_opt = torch.optim.SGD(dense.parameters(), lr=0.05)
    for step in range(args.steps):
        generator = torch.Generator(device=device).manual_seed(step)  # the same batch on every rank
        x = torch.randn(args.tokens, args.features, device=device, generator=generator)
        target = torch.randn(args.tokens, args.features, device=device, generator=generator)
        for model, opt in ((tp, tp_opt), (dense, dense_opt)):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), target)
            loss.backward()
            opt.step()
            if model is tp:
                tp_loss = loss.item()
                if step == 0:  # the first step tuned every kernel: from now on all ranks run rank 0's tiles
                    tpkernels.sync_autotuning()
        if rank == 0:
            print(f"step {step}: loss {tp_loss:.6f} (tensor-parallel over {world} ranks), {loss.item():.6f} (dense)",
                  flush=True)
    full = tp.full_state_dict()  # gathers the shards: every rank calls it
    worst = max((full[k] - v).abs().max().item() for k, v in dense.state_dict().items())
    if rank == 0:
        print(f"largest difference between the trained weights: {worst:.2e}")
    dist.barrier()  # no rank tears its group down while another still talks to it
    dist.destroy_process_group()
    if worst > 1e-4:
        raise SystemExit(f"rank {rank}: the tensor-parallel model drifted from the dense one by {worst:.2e}")


if __name__ == "__main__":
    main()
