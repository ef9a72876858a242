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
import shutil
import tempfile

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
    """{tensor name: file} of a safetensors checkpoint: a file, an index json, or a folder holding either.
    A missing or unreadable index, or a file it names that is not there, is a ValueError naming it."""
    if os.path.isdir(path):
        for name in ("model.safetensors.index.json", "model.safetensors"):
            if os.path.exists(os.path.join(path, name)):
                return _files(os.path.join(path, name))
        raise ValueError(f"load_sharded: {path} holds neither model.safetensors nor model.safetensors.index.json")
    if not os.path.exists(path):
        raise ValueError(f"load_sharded: {path} does not exist")
    if path.endswith(".json"):
        try:
            with open(path) as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"load_sharded: the index {path} cannot be read ({type(error).__name__}: {error}); "
                             f"it is not a transformers index (a JSON object with a weight_map)") from None
        folder = os.path.dirname(path)
        files = {name: os.path.join(folder, file) for name, file in weight_map.items()}
        absent = sorted({file for file in files.values() if not os.path.exists(file)})
        if absent:
            names = sorted(name for name, file in files.items() if file == absent[0])
            raise ValueError(f"load_sharded: the index {path} names {len(absent)} file(s) that are not there: "
                             f"{', '.join(absent[:4])} (holding {', '.join(names[:4])}{' ...' if len(names) > 4 else ''})")
        return files
    with _open(path) as f:
        return {name: path for name in f.keys()}


@contextlib.contextmanager
def _open(file):
    """safetensors' safe_open, with a file it cannot read (truncated, corrupt header) as a ValueError."""
    from safetensors import safe_open

    try:
        handle = safe_open(file, framework="pt")
    except Exception as error:  # SafetensorError, OSError
        raise ValueError(f"load_sharded: {file} cannot be read as safetensors ({error}): it is truncated, "
                         f"corrupt or not a safetensors file") from None
    with handle as f:
        yield f


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


# safetensors' dtype names, as get_slice(...).get_dtype() gives them.
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _sliced_shape(shape, index):
    """The shape `tensor[index]` has, for a tensor of `shape` and an index of slices."""
    index = tuple(index) + (slice(None),) * (len(shape) - len(index))
    return tuple(len(range(*part.indices(size))) for part, size in zip(index, shape))


@torch.no_grad()
def load_sharded(model, path, device=None):
    """Load a safetensors checkpoint of the dense model into a parallelized one, reading only this
    rank's slices of the sharded weights (no collective: each rank reads its own).

    Everything is checked before any parameter changes: a file that is missing, truncated or corrupt, a
    tensor the model needs that the checkpoint lacks, and a tensor of the wrong shape or kind of dtype
    (floating-point tensors are cast to the model's floating dtype, as transformers does; any other
    mismatch is refused) are a ValueError naming the file and the tensor. Each rank checks every tensor's
    header, so every rank raises alike. An I/O error while the data is then read may leave the model part
    loaded.

    Args:
        model: a model `parallelize` (or the modules) made tensor-parallel.
        path: a .safetensors file, a `transformers` index (model.safetensors.index.json), or a folder.
        device: where tensors go when the model's are on the meta device (default: the CPU).

    Returns:
        {"bytes_read", "sharded_bytes_read", "sharded_bytes_in_checkpoint", "tensors"}: what this rank read.
    """
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
    stats = dict(bytes_read=0, sharded_bytes_read=0, sharded_bytes_in_checkpoint=0, tensors=0)
    with contextlib.ExitStack() as files_open:
        handles = {}

        def handle(file):
            if file not in handles:
                handles[file] = files_open.enter_context(_open(file))
            return handles[file]

        # First every check, on the headers alone; then the reads and copies.
        plan, seen, missing = [], {}, []
        for name, target in state.items():
            if id(target) in seen:  # tied to a tensor loaded under another name
                continue
            if name not in files:
                missing.append(name)
                continue
            file, stored = files[name], checkpoint_names[name]
            try:
                view = handle(file).get_slice(stored)
            except ValueError:
                raise
            except Exception as error:  # the index names a tensor its file lacks
                raise ValueError(f"load_sharded: {file} has no tensor {stored} ({error}), which the index "
                                 f"names") from None
            shape, dtype_name = tuple(view.get_shape()), view.get_dtype()
            index = None
            if name in sharded:
                layer, kind = sharded[name]
                index = shard_slice(layer, kind, shape)
            got = _sliced_shape(shape, index) if index is not None else shape
            transposed = index is not None and kind == "weight" and getattr(layer, "checkpoint_transposed", False)
            if transposed:
                got = got[::-1]
            if got != tuple(target.shape):
                raise ValueError(f"load_sharded: {stored} in {file} is {shape}, which gives {got} here, but the "
                                 f"model's {name} is {tuple(target.shape)}")
            dtype = _DTYPES.get(dtype_name)
            if dtype is None or (dtype != target.dtype and not (dtype.is_floating_point and target.dtype.is_floating_point)):
                raise ValueError(f"load_sharded: {stored} in {file} is {dtype_name}, but the model's {name} is "
                                 f"{target.dtype}; only floating-point tensors are cast")
            plan.append((name, target, file, stored, index, transposed, shape))
            seen[id(target)] = name
        missing = [n for n in missing if id(state[n]) not in seen]
        if missing:
            raise ValueError(f"load_sharded: the checkpoint {path} lacks {len(missing)} of the model's tensors: "
                             f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
                      if t.is_meta and id(t) not in seen]
        if still_meta:
            raise ValueError(f"load_sharded: {', '.join(still_meta[:8])} are on the meta device and not in the "
                             f"checkpoint (buffers a model computes as it is built); build the model under "
                             f"tpkernels.empty_parameters(), which keeps buffers real")
        for name, target, file, stored, index, transposed, shape in plan:
            if index is not None:
                value = handle(file).get_slice(stored)[index]
                if transposed:
                    value = value.t()
                stats["sharded_bytes_read"] += value.numel() * value.element_size()
                stats["sharded_bytes_in_checkpoint"] += math.prod(shape) * value.element_size()
            else:
                value = handle(file).get_tensor(stored)
            stats["bytes_read"] += value.numel() * value.element_size()
            stats["tensors"] += 1
            _load_into(holders.get(id(target), []), target, value, device)
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

    Nothing is lost on a failure: rank 0 writes into a temporary folder beside `path`, reads the file's
    header back, and only then moves it into place, replacing an existing checkpoint as a whole (other
    files in the folder, a tokenizer say, are carried into the new one; an old sharded checkpoint's
    files are not). If the write fails, the temporary is removed, `path` is as it was, and every rank
    raises a RuntimeError.

    Args:
        model: the parallelized model.
        path: a folder (model.safetensors is written in it) or a .safetensors file.
        process_group: the tensor-parallel group; None is the default group.

    Returns:
        The file written (on every rank).
    """
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
    error = None
    if get_rank(process_group) == 0:
        try:
            _write_atomically(path, file, out, getattr(model, "config", None))
        except Exception as failure:  # reported on every rank below
            error = f"{type(failure).__name__}: {failure}"
    if get_world_size(process_group) > 1:
        import torch.distributed as dist

        # Rank 0's outcome reaches every rank (instead of a barrier a failed rank 0 would never reach),
        # after the checkpoint is whole.
        outcome = [error]
        dist.broadcast_object_list(outcome, src=dist.get_global_rank(process_group or dist.group.WORLD, 0),
                                   group=process_group)
        error = outcome[0]
    if error is not None:
        raise RuntimeError(f"save_sharded: writing {path} failed on rank 0 ({error}); what was at {path} "
                           f"before is as it was, and nothing of the new checkpoint is left")
    return file


def _write_atomically(path, file, tensors, config):
    """Write the checkpoint beside `path` (a temporary folder, or a temporary file for a .safetensors path),
    check it, then move it into place: an existing checkpoint is untouched until the new one is whole,
    then replaced as a whole. On any failure the temporary is removed and the error raised."""
    from safetensors.torch import save_file

    target = os.path.abspath(path)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    single = path.endswith(".safetensors")
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.saving-", dir=parent)
    try:
        staged = os.path.join(staging, os.path.basename(file) if single else "model.safetensors")
        save_file(tensors, staged, metadata={"format": "pt"})
        if config is not None and hasattr(config, "save_pretrained") and not single:
            config.save_pretrained(staging)
        _check_written(staged, tensors)
        if single:
            os.replace(staged, target)  # atomic on one filesystem
            shutil.rmtree(staging)
            return
        if os.path.isdir(target):  # the old folder moves aside, the new one in, then the old one goes
            _carry_over(target, staging)
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(target, old)
            os.replace(staging, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _is_checkpoint_file(name):
    return name == "model.safetensors.index.json" or (name.startswith("model") and name.endswith(".safetensors"))


def _carry_over(old, new):
    """Files in the old folder that are not the checkpoint's own (a tokenizer, say) go into the new one,
    as hard links where the filesystem allows, so that replacing the folder loses nothing else."""
    for name in os.listdir(old):
        source, destination = os.path.join(old, name), os.path.join(new, name)
        if _is_checkpoint_file(name) or os.path.exists(destination):
            continue
        if os.path.isdir(source):
            shutil.copytree(source, destination, copy_function=_link_or_copy)
        else:
            _link_or_copy(source, destination)


def _link_or_copy(source, destination):
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def _check_written(file, tensors):
    """The file just written holds every tensor with its shape and dtype (a short write or a full disk
    that did not raise would fail here)."""
    with _open(file) as f:
        names = set(f.keys())
        if names != set(tensors):
            raise OSError(f"{file} holds {len(names)} tensors, {len(tensors)} were written")
        for name, tensor in tensors.items():
            if tuple(f.get_slice(name).get_shape()) != tuple(tensor.shape):
                raise OSError(f"{file}: {name} reads back as {f.get_slice(name).get_shape()}, "
                              f"{tuple(tensor.shape)} was written")
