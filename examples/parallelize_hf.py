"""Parallelize a Hugging Face model and load its checkpoint one shard per rank, under torchrun.

    TRITON_INTERPRET=1 torchrun --nproc-per-node 2 examples/parallelize_hf.py               # CPU, gloo
    torchrun --nproc-per-node 8 examples/parallelize_hf.py --cuda --dtype bfloat16          # GPUs, NCCL

Rank 0 builds a small model from a config (no download: random weights under a fixed seed) and saves
it as a dense safetensors checkpoint, the `transformers` layout. Then every rank builds the same model
with its parameters on the meta device (`tpkernels.empty_parameters`: no dense weight anywhere),
replaces its GELU MLP blocks with the fused tensor-parallel layers (`tpkernels.parallelize`), reads
only its shards of the checkpoint (`tpkernels.load_sharded`) and checks its logits against the dense
model's, by the 2x-eager rule against fp64. Needs `transformers` and `safetensors`.
"""
import argparse
import os
import tempfile

import torch
import torch.distributed as dist

import tpkernels

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def build(family, layers):
    import transformers as t

    quiet = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    if family == "gpt2":  # Conv1D layers, tanh GELU
        return t.GPT2LMHeadModel, t.GPT2Config(n_embd=64, n_layer=layers, n_head=4, n_inner=200, vocab_size=128,
                                               n_positions=64, **quiet)
    if family == "gpt_neox":
        return t.GPTNeoXForCausalLM, t.GPTNeoXConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                                     intermediate_size=200, vocab_size=128,
                                                     max_position_embeddings=64, **quiet)
    return t.BertForMaskedLM, t.BertConfig(hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                                           intermediate_size=200, vocab_size=128, max_position_embeddings=64, **quiet)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="one GPU per rank (LOCAL_RANK) and NCCL")
    parser.add_argument("--family", choices=["gpt2", "gpt_neox", "bert"], default="gpt2")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32")
    parser.add_argument("--checkpoint", help="folder for the dense checkpoint (default: a temporary one)")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    if args.cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if args.cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cls, config = build(args.family, args.layers)

    folder = args.checkpoint or os.path.join(tempfile.gettempdir(), f"tpkernels-example-{args.family}")
    torch.manual_seed(0)
    dense = cls(config).to(device, dtype).eval()
    if rank == 0:
        dense.save_pretrained(folder)  # the dense checkpoint a user starts from
    dist.barrier()

    with tpkernels.empty_parameters():
        model = cls(config).to(dtype)
    report = tpkernels.parallelize(model)
    stats = tpkernels.load_sharded(model, folder, device=device)
    model.to(device).eval()
    if rank == 0:
        print(report, flush=True)
    print(f"rank {rank}: read {stats['bytes_read']:,} bytes, {stats['sharded_bytes_read']:,} of the "
          f"{stats['sharded_bytes_in_checkpoint']:,} bytes of sharded weights", flush=True)

    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        eager = dense(input_ids=ids).logits
        reference = dense.double()(input_ids=ids).logits
    err = (logits.double() - reference).abs().max().item()
    eager_err = (eager.double() - reference).abs().max().item()
    limit = 2 * eager_err + ATOL[dtype] * max(1.0, reference.abs().max().item())
    dist.barrier()
    if rank == 0:
        print(f"logits over {world} ranks, {args.dtype}: max error {err:.3e} against fp64 "
              f"(eager {args.dtype}: {eager_err:.3e}; limit {limit:.3e})", flush=True)
    dist.destroy_process_group()
    if not err <= limit:
        raise SystemExit(f"rank {rank}: the parallelized model's logits are off by {err:.3e} > {limit:.3e}")


if __name__ == "__main__":
    main()
