"""Train a small causal LM with 2-D parallelism, data parallel x tensor parallel, on PyTorch's own engine.

    torchrun --nproc-per-node 4 examples/train_2d.py --tp 2 --steps 20 \\
        --checkpoint-dir /tmp/ckpt                                 # CPU ranks on gloo: dp 2 x tp 2
    torchrun --nproc-per-node 2 examples/train_2d.py --tp 2 --steps 40 \\
        --checkpoint-dir /tmp/ckpt --resume                        # on with 2 ranks: tp 2 alone
    torchrun --nproc-per-node 8 examples/train_2d.py --cuda --tp 8    # a GPU per rank, NCCL
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \\
        examples/train_2d.py --cuda --tp 8                         # dp 2 (across nodes) x tp 8 (in a node)

The model is GPT-2's shape in miniature: token and position embeddings, blocks of pre-norm causal
self-attention and a GELU MLP, a final norm and a head. The MLPs are `tpkernels.TensorParallelMLP` on
mesh["tp"] (their parameters are DTensors: fc1 Shard(0), fc2 Shard(1), fc2's bias Replicate); the rest
is replicated over tp. Then FSDP2's `fully_shard` on mesh["dp"] goes over every block and the root,
tensor parallel first (torchtitan's order). Each dp rank trains on its slice of the global batch; the
batches are a function of the step, so a resumed run sees the same data. On CPU ranks the layers run
the CPU backend (oneDNN, or eager); TRITON_INTERPRET=1 would run the Triton kernels interpreted, slowly.

Checkpoints are torch.distributed.checkpoint (DCP) folders, DIR/step-000010, written every
--checkpoint-every steps and at the end: the model's and Adam's state through `get_state_dict`, one
piece per rank, which DCP reshards on load, so --resume continues at any world size and dp x tp.
"""
import argparse
import math
import os
import re
import shutil
import time

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh

import tpkernels


class Attention(nn.Module):
    """Causal self-attention, replicated on every tensor-parallel rank (tpkernels parallelizes MLPs)."""

    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        batch, length, dim = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, dim // self.heads).unbind(2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim))


class Block(nn.Module):
    def __init__(self, dim, heads, hidden, tp_mesh, device):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.mlp = tpkernels.TensorParallelMLP(dim, hidden, approximate="tanh", process_group=tp_mesh, device=device)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, vocab, length, dim, heads, hidden, layers, tp_mesh, device):
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(length, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, tp_mesh, device) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.tokens(ids) + self.positions(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def batch(step, rows, length, vocab, device):
    """The global batch of a step: rows of arithmetic sequences mod vocab (learnable: each token follows
    from the two before it), the same on every rank."""
    generator = torch.Generator().manual_seed(step)
    start = torch.randint(vocab, (rows, 1), generator=generator)
    stride = torch.randint(1, vocab, (rows, 1), generator=generator)
    return ((start + stride * torch.arange(length + 1)) % vocab).to(device)


def newest_checkpoint(folder):
    """(step, path) of the newest complete checkpoint in folder, or None."""
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
             if (m := re.fullmatch(r"step-(\d+)", name))] if os.path.isdir(folder) else []
    return max(found) if found else None


def save(model, opt, step, folder, rank):
    """A DCP checkpoint of the model and Adam at `step`: written beside, then moved into place by rank 0,
    so that a crash mid-write leaves the last complete one newest."""
    final = os.path.join(folder, f"step-{step:06d}")
    staging = final + ".partial"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)
    dist.barrier()
    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state, "step": torch.tensor(step)}, checkpoint_id=staging)
    dist.barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(staging, final)
    dist.barrier()
    return final


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="one GPU per rank (LOCAL_RANK) and NCCL")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (default: every rank); "
                        "the data-parallel size is the world size over it")
    parser.add_argument("--steps", type=int, default=40, help="train until this step")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in "
                        "--checkpoint-dir, at any world size")
    parser.add_argument("--batch", type=int, default=8, help="global batch, in sequences")
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    args = parser.parse_args()
    if args.resume and not args.checkpoint_dir:
        parser.error("--resume needs --checkpoint-dir")

    if args.cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)  # before anything touches the GPU: else every rank lands on GPU 0
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if args.cuda else "gloo")  # torchrun's environment says where and who
    rank, world = dist.get_rank(), dist.get_world_size()
    tp = args.tp or world
    if world % tp or args.batch % (world // tp):
        raise SystemExit(f"train_2d: {world} ranks do not split into tp={tp} x dp={world / tp:g} with a global "
                         f"batch of {args.batch} divisible by dp")
    dp = world // tp
    mesh = init_device_mesh(device.type, (dp, tp), mesh_dim_names=("dp", "tp"))

    torch.manual_seed(0)  # the same replicated weights on every rank; each MLP draws only its shards
    model = TinyLM(args.vocab, args.length, args.dim, 4, args.hidden, args.layers, mesh["tp"], device).to(device)
    if dp > 1:
        from torch.distributed.fsdp import fully_shard

        for block in model.blocks:
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)

    step = 0
    if args.resume:
        found = newest_checkpoint(args.checkpoint_dir)
        if found is None:
            raise SystemExit(f"train_2d: --resume, but {args.checkpoint_dir} holds no step-N checkpoint")
        model_state, optim_state = get_state_dict(model, opt)
        state = {"model": model_state, "optim": optim_state, "step": torch.tensor(0)}
        dcp.load(state, checkpoint_id=found[1])
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        step = int(state["step"])
        if rank == 0:
            print(f"resumed from {found[1]} (step {step}) on {world} ranks: dp {dp} x tp {tp}", flush=True)
    elif rank == 0:
        print(f"training on {world} ranks: dp {dp} x tp {tp}, {sum(p.numel() for p in model.parameters())} "
              f"parameters", flush=True)

    rows = args.batch // dp
    mine = slice(mesh["dp"].get_local_rank() * rows, (mesh["dp"].get_local_rank() + 1) * rows)
    start = time.perf_counter()
    while step < args.steps:
        ids = batch(step, args.batch, args.length, args.vocab, device)[mine]
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
        mean = loss.detach().clone()  # the global batch's: the same on the tp ranks, a share of it per dp rank
        dist.all_reduce(mean)
        if rank == 0:
            tokens = args.batch * args.length / (time.perf_counter() - start)
            print(f"step {step}/{args.steps} | loss {mean.item() / world:.4f} (chance {math.log(args.vocab):.2f}) | "
                  f"{tokens:.0f} tokens/s", flush=True)
        start = time.perf_counter()
        if args.checkpoint_dir and (step % args.checkpoint_every == 0 or step == args.steps):
            path = save(model, opt, step, args.checkpoint_dir, rank)
            if rank == 0:
                print(f"checkpoint {path}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
