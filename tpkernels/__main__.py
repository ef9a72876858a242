"""`python -m tpkernels`: the seed notebook's question, answered through the fused kernels.

    y = gelu(X @ W1) @ W2     (the notebook's layout; nn.Linear's weight is W.T)

Column-wise, W1 split by output features: gelu commutes with the concatenation, so each shard
applies it alone. Row-wise, W2 split by input features: the partial sums must be added before any
nonlinearity. Column, GELU, row, then one sum: the one-collective path.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F


def _backend(device):
    from tpkernels.kernels import INTERPRETED

    if device.type == "cuda":
        return "Triton kernels on CUDA"
    if INTERPRETED:
        return "Triton kernels under the interpreter (TRITON_INTERPRET=1)"
    return "the eager reference (set TRITON_INTERPRET=1 to run the Triton kernels on the CPU)"


def _show(label, t):
    rows = ["[" + ", ".join(f"{v:7.4f}" for v in row) + "]" for row in t.tolist()]
    print(f"  {label:<44} " + ("\n  " + " " * 45).join(rows))


def seed_notebook(device):
    """The notebook's three cells, with its numbers from torch.manual_seed(42), two shards in one process."""
    import tpkernels

    torch.manual_seed(42)
    X = torch.randn(2, 4)
    W = torch.randn(4, 4)
    X, W = X.to(device), W.to(device)
    baseline = F.gelu(X @ W)
    print("Column-wise: W split by output features, GELU applied per shard")
    _show("baseline gelu(X @ W)", baseline)
    shards = torch.tensor_split(W.t(), 2, dim=0)  # nn.Linear layout: split weight rows = W's columns
    column = torch.cat([tpkernels.linear_gelu(X, w) for w in shards], dim=1)
    _show("cat(linear_gelu(X, W_r))", column)
    column_ok = torch.allclose(column, baseline, rtol=1e-5, atol=1e-5)
    print(f"  column-wise {'match' if column_ok else 'MISMATCH'}\n")

    print("Row-wise: X and W split along the inner dim, partial sums added")
    x_shards = torch.tensor_split(X, 2, dim=1)
    w_shards = torch.tensor_split(W.t(), 2, dim=1)
    gelu_then_sum = sum(tpkernels.linear_gelu(x, w) for x, w in zip(x_shards, w_shards))
    sum_then_gelu = F.gelu(sum(tpkernels.linear_partial(x, w) for x, w in zip(x_shards, w_shards)))
    _show("sum(gelu(X_r @ W_r))  (GELU on partials)", gelu_then_sum)
    _show("gelu(sum(X_r @ W_r))", sum_then_gelu)
    row_mismatch = not torch.allclose(gelu_then_sum, sum_then_gelu, rtol=1e-5, atol=1e-5)
    print(f"  row-wise {'mismatch, as the notebook says' if row_mismatch else 'MATCH (unexpected)'}\n")

    print("Column then row: gelu(X @ W1) @ W2 with one sum at the end")
    # The notebook's last cell ran twice before its output was saved: draw its inputs twice.
    for _ in range(2):
        X, W1, W2 = torch.randn(2, 4), torch.randn(4, 4), torch.randn(4, 4)
    X, W1, W2 = X.to(device), W1.to(device), W2.to(device)
    baseline = F.gelu(X @ W1) @ W2
    _show("baseline", baseline)
    w1_shards = torch.tensor_split(W1.t(), 2, dim=0)
    w2_shards = torch.tensor_split(W2.t(), 2, dim=1)
    partials = [tpkernels.linear_partial(tpkernels.linear_gelu(X, w1), w2) for w1, w2 in zip(w1_shards, w2_shards)]
    column_row = sum(partials)
    _show("sum(linear_partial(linear_gelu(X, W1_r), W2_r))", column_row)
    column_row_ok = torch.allclose(column_row, baseline, rtol=1e-5, atol=1e-5)
    print(f"  column -> row {'match' if column_row_ok else 'MISMATCH'}\n")
    return column_ok and row_mismatch and column_row_ok


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tpkernels", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    print(f"tpkernels: running {_backend(device)}\n")
    ok = seed_notebook(device)
    print("The one-collective path: column (no communication) -> GELU -> row -> one all-reduce.")
    return 0 if ok else 1


if __name__ == "__main__":
    if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
        # triton reads the switch as it decorates the kernels, which importing tpkernels already did:
        # start again with it set, so that the CPU runs the Triton kernels rather than eager.
        os.execve(sys.executable, [sys.executable, "-m", "tpkernels", *sys.argv[1:]],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    sys.exit(main())
