"""A tensor-parallel layer's share of `nn.Linear`'s initialisation, drawn without the dense weight.

Rank r's shard of a [out_features, in_features] weight is its `torch.chunk` slice (`distributed.shard`) along dim 0 (column) or 1 (row);
under the same `torch.manual_seed` on every rank, the shards equal slicing one dense CPU-initialised
`nn.Linear`, and no rank allocates the dense weight.
"""
import math

import torch

# Elements of the dense weight drawn at a time (whole rows) when a shard is initialised. The CPU
# generator's uniform_ draws one number per element, in order, so chunks of rows give nn.Linear's values
# exactly (tests/test_nn.py checks it for every dtype), and the dense weight never exists whole.
_INIT_CHUNK_ELEMENTS = 1 << 22


@torch.no_grad()
def init_linear_shard(in_features, out_features, bias, shard_dim, start, stop, device, dtype):
    """This rank's slice of the weight and bias `nn.Linear(in_features, out_features, bias)` would draw,
    without allocating the dense weight: the CPU generator draws it in chunks of rows (the order
    nn.Linear's kaiming_uniform_ and uniform_ use) and only the slice is kept, then moved to `device`.
    On the meta device nothing is drawn. Under the same torch.manual_seed on every rank, the shards are
    slices of one dense CPU-initialised nn.Linear, whatever the device."""
    dtype = dtype or torch.get_default_dtype()
    shape = (stop - start, in_features) if shard_dim == 0 else (out_features, stop - start)
    bias_shape = (stop - start,) if shard_dim == 0 else (out_features,)
    device = torch.device(device) if device is not None else torch.get_default_device()
    if device.type == "meta":
        return (torch.empty(shape, device="meta", dtype=dtype),
                torch.empty(bias_shape, device="meta", dtype=dtype) if bias else None)
    # nn.Linear's bounds, computed as torch.nn.init computes them (kaiming_uniform_ with a = sqrt(5) for
    # the weight, 1 / sqrt(fan_in) for the bias), so that even fp64 draws round alike
    weight_bound = math.sqrt(3.0) * (math.sqrt(2.0 / (1 + math.sqrt(5) ** 2)) / math.sqrt(in_features)) if in_features else 0
    bound = 1 / math.sqrt(in_features) if in_features > 0 else 0
    rows = max(1, _INIT_CHUNK_ELEMENTS // max(in_features, 1))
    kept = []
    for first in range(0, out_features, rows):
        block = torch.empty(min(rows, out_features - first), in_features, dtype=dtype, device="cpu")
        block.uniform_(-weight_bound, weight_bound)
        if shard_dim == 1:
            kept.append(block[:, start:stop].clone())
        elif first < stop and first + block.shape[0] > start:
            kept.append(block[max(start - first, 0):stop - first].clone())
    weight = torch.cat(kept) if kept else torch.empty(shape, dtype=dtype, device="cpu")
    full_bias = torch.empty(out_features, dtype=dtype, device="cpu").uniform_(-bound, bound) if bias else None
    if full_bias is not None and shard_dim == 0:
        full_bias = full_bias[start:stop].clone()
    return weight.to(device), None if full_bias is None else full_bias.to(device)
