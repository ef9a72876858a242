"""Checkpoints of tensor-parallel models, one shard per rank, in the dense model's safetensors layout.

`load_sharded(model, path)` reads a safetensors checkpoint (one file, or the `transformers` index of
files) into a parallelized model, each rank reading only its slices of the sharded weights (safetensors
slice reads: about 1/W of their bytes) and the other tensors whole. `save_sharded(model, path)` gathers
the dense weights and writes a checkpoint `transformers` loads. `empty_parameters()` builds a model
with its parameters on the meta device, so that no rank allocates the dense weights before loading.

For a ColumnParallelLinear of F output features on W ranks, rank r reads rows
`tensor_split(range(F), W)[r]` of the weight and bias; for a RowParallelLinear, those columns of the
weight and the whole bias. GPT-2's Conv1D weights are stored [in, out]: the slice is transposed.
"""
import contextlib
import json
import math
import os

import torch
from torch import nn

from tpkernels.distributed import get_rank, get_world_size
from tpkernels.nn import ColumnParallelLinear, RowParallelLinear

__all__ = ["empty_parameters", "load_sharded", "save_sharded"]


@contextlib.contextmanager
def empty_parameters():
    """Build models inside this block with their parameters on the meta device and their buffers real
    (rotary frequencies, masks: what a checkpoint does not hold), so that no rank allocates the dense
    weights; `parallelize` then `load_sharded` fill them, one shard per rank."""
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _sharded_layers(model):
    """{parameter name: (layer, "weight" or "bias")} for every tensor-parallel layer's parameters."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            prefix = f"{path}." if path else ""
            out[f"{prefix}weight"] = (module, "weight")
            if module.bias is not None:
                out[f"{prefix}bias"] = (module, "bias")
    return out


def _files(path):
    """{tensor name: file} of a safetensors checkpoint: a file, an index json, or a folder holding either."""
    if os.path.isdir(path):
        for name in ("model.safetensors.index.json", "model.safetensors"):
            if os.path.exists(os.path.join(path, name)):
                return _files(os.path.join(path, name))
        raise ValueError(f"load_sharded: {path} holds neither model.safetensors nor model.safetensors.index.json")
    if path.endswith(".json"):
        with open(path) as f:
            weight_map = json.load(f)["weight_map"]
        folder = os.path.dirname(path)
        return {name: os.path.join(folder, file) for name, file in weight_map.items()}
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return {name: path for name in f.keys()}


def shard_slice(layer, kind, shape):
    """The index into the checkpoint tensor (its own layout) that holds this rank's shard."""
    rows = slice(layer.shard_start, layer.shard_stop)
    if kind == "bias":
        return (rows,) if isinstance(layer, ColumnParallelLinear) else (slice(None),)
    # in the file: [out, in] for nn.Linear, [in, out] for Conv1D; columns split out, rows split in
    split_out = isinstance(layer, ColumnParallelLinear)
    if getattr(layer, "checkpoint_transposed", False):
        return (slice(None), rows) if split_out else (rows, slice(None))
    return (rows, slice(None)) if split_out else (slice(None), rows)


def _renamings(model):
    """transformers' renamings of checkpoint keys for this model (v5 renames some on load, GPT-NeoX's
    embed_out to lm_head, say), or none for other models and versions."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        if isinstance(model, PreTrainedModel):
            return [r for r in get_model_conversion_mapping(model) if isinstance(r, WeightRenaming)]
    except Exception:  # another transformers version, or none: names as they are
        pass
    return []


def _model_key(renamings, name):
    for renaming in renamings:
        try:
            name, _ = renaming.rename_source_key(name)
        except Exception:
            pass
    return name


@torch.no_grad()
def load_sharded(model, path, device=None):
    """Load a safetensors checkpoint of the dense model into a parallelized one, reading only this
    rank's slices of the sharded weights (no collective: each rank reads its own).

    Args:
        model: a model `parallelize` (or the modules) made tensor-parallel.
        path: a .safetensors file, a `transformers` index (model.safetensors.index.json), or a folder.
        device: where tensors go when the model's are on the meta device (default: the CPU).

    Returns:
        {"bytes_read", "sharded_bytes_read", "sharded_bytes_in_checkpoint", "tensors"}: what this rank read.
    """
    from safetensors import safe_open

    renamings = _renamings(model)
    checkpoint = _files(path)
    files = {_model_key(renamings, name): file for name, file in checkpoint.items()}
    checkpoint_names = {_model_key(renamings, name): name for name in checkpoint}
    sharded = _sharded_layers(model)
    state = model.state_dict(keep_vars=True)
    holders = {}  # every (module, attribute) that holds a tensor: tied ones are set together
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for attr, tensor in table.items():
                if tensor is not None:
                    holders.setdefault(id(tensor), []).append((table, attr))
    seen, missing = {}, []
    stats = dict(bytes_read=0, sharded_bytes_read=0, sharded_bytes_in_checkpoint=0, tensors=0)
    with contextlib.ExitStack() as files_open:
        handles = {}
        for name, target in state.items():
            if id(target) in seen:  # tied to a tensor loaded under another name
                continue
            if name not in files:
                missing.append(name)
                continue
            file = files[name]
            if file not in handles:
                handles[file] = files_open.enter_context(safe_open(file, framework="pt"))
            view = handles[file].get_slice(checkpoint_names[name])
            shape = view.get_shape()
            if name in sharded:
                layer, kind = sharded[name]
                value = view[shard_slice(layer, kind, shape)]
                if kind == "weight" and getattr(layer, "checkpoint_transposed", False):
                    value = value.t()
                stats["sharded_bytes_read"] += value.numel() * value.element_size()
                stats["sharded_bytes_in_checkpoint"] += math.prod(shape) * value.element_size()
            else:
                value = handles[file].get_tensor(checkpoint_names[name])
            if tuple(value.shape) != tuple(target.shape):
                raise ValueError(f"load_sharded: {name} is {tuple(shape)} in the checkpoint, which gives "
                                 f"{tuple(value.shape)} here, but the model's is {tuple(target.shape)}")
            stats["bytes_read"] += value.numel() * value.element_size()
            stats["tensors"] += 1
            _load_into(holders.get(id(target), []), target, value, device)
            seen[id(target)] = name
    missing = [n for n in missing if id(state[n]) not in seen]
    if missing:
        raise ValueError(f"load_sharded: the checkpoint {path} lacks {len(missing)} of the model's tensors: "
                         f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise ValueError(f"load_sharded: {', '.join(still_meta[:8])} are on the meta device and not in the "
                         f"checkpoint (buffers a model computes as it is built); build the model under "
                         f"tpkernels.empty_parameters(), which keeps buffers real")
    return stats


def _load_into(holders, target, value, device):
    if not target.is_meta:
        target.copy_(value)
        return
    value = value.to(device or "cpu", target.dtype)
    if isinstance(target, nn.Parameter):
        value = nn.Parameter(value, requires_grad=target.requires_grad)
    for table, attr in holders:  # a meta tensor is replaced, in every module that holds it
        table[attr] = value


@torch.no_grad()
def save_sharded(model, path, process_group=None):
    """Gather a parallelized model's dense weights and write them as one safetensors file (a collective:
    call it on every rank; rank 0 writes). Sharded weights go back to their original layout (Conv1D's
    [in, out] included) and tied tensors are written once, so `transformers` loads the folder (its
    config is written too when the model has one).

    Args:
        model: the parallelized model.
        path: a folder (model.safetensors is written in it) or a .safetensors file.
        process_group: the tensor-parallel group; None is the default group.

    Returns:
        The file written (on every rank).
    """
    from safetensors.torch import save_file

    file = path if path.endswith(".safetensors") else os.path.join(path, "model.safetensors")
    gathered = {}
    for path_, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            full = module.full_state_dict()
            if getattr(module, "checkpoint_transposed", False):
                full["weight"] = full["weight"].t()
            prefix = f"{path_}." if path_ else ""
            gathered.update({f"{prefix}{k}": v for k, v in full.items()})
    out, seen = {}, set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        out[name] = gathered.get(name, tensor).detach().cpu().contiguous()
    if get_rank(process_group) == 0:
        os.makedirs(os.path.dirname(os.path.abspath(file)), exist_ok=True)
        save_file(out, file, metadata={"format": "pt"})
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "save_pretrained") and not path.endswith(".safetensors"):
            config.save_pretrained(path)
    if get_world_size(process_group) > 1:
        import torch.distributed as dist

        dist.barrier(group=process_group)  # the file is whole before any rank reads it
    return file
