"""Checkpoints of tensor-parallel models, one shard per rank, in the dense model's safetensors layout.

`load_sharded(model, path)` reads a safetensors checkpoint (one file, or the `transformers` index of
files) into a parallelized model, each rank reading only its slices of the sharded weights (safetensors
slice reads: about 1/W of their bytes) and the other tensors whole. `save_sharded(model, path)` streams
the dense weights to rank 0 one tensor at a time and writes a checkpoint `transformers` loads (one file,
or files of at most `max_shard_size` and their index), atomically. `empty_parameters()` builds a model
with its parameters on the meta device, so that no rank allocates the dense weights before loading.

For a ColumnParallelLinear of F output features on W ranks, rank r reads rows
`shard(range(F), W, r)` (torch.chunk's layout, DTensor's Shard: the layout of the layers' DTensor
parameters and of torch.distributed.checkpoint's) of the weight and bias; for a RowParallelLinear, those
columns of the weight and the whole bias. GPT-2's Conv1D weights are stored [in, out]: the slice is
transposed. A gated MLP built from a merged gate_up weight (Phi-3's `gate_up_proj`, [gate; up]) keeps that
tensor in the checkpoint: rank r reads two slices of it, its gate rows and the same features' up rows F
rows further, and the save writes the merged tensor back. For checkpoints of training state (the optimizer's too) at any world size, use
torch.distributed.checkpoint with `get_state_dict`: the layers' parameters are DTensors.
"""
import contextlib
import dataclasses
import math
import os
import shutil

import torch
from torch import nn

from tpkernels import checkpoint_files
from tpkernels.distributed import get_rank, get_world_size, group_of, shard_range
from tpkernels.dtensor import local
from tpkernels.nn import ColumnParallelLinear, RowParallelLinear, TensorParallelGatedMLP

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


def _merged_parts(model):
    """{model name: (checkpoint name, row offset)} for the gate and up tensors of gated MLPs that a checkpoint
    holds as one merged [gate; up] tensor (`TensorParallelGatedMLP.checkpoint_merged`): the up half lies F
    rows (F: the hidden features) past the gate half ([up; gate] with `checkpoint_up_first`)."""
    parts = {}
    for path, module in model.named_modules():
        if isinstance(module, TensorParallelGatedMLP) and module.checkpoint_merged:
            prefix = f"{path}." if path else ""
            hidden = module.gate_proj.out_features
            for kind in ("weight", "bias"):
                if getattr(module.gate_proj, kind) is not None:
                    merged = f"{prefix}{module.checkpoint_merged}.{kind}"
                    gate, up = (hidden, 0) if module.checkpoint_up_first else (0, hidden)
                    parts[f"{prefix}gate_proj.{kind}"] = (merged, gate)
                    parts[f"{prefix}up_proj.{kind}"] = (merged, up)
    return parts


def _shifted(index, offset):
    """`index` (a tuple of slices) with its first slice moved `offset` rows on."""
    first = index[0]
    return (slice(first.start + offset, first.stop + offset),) + tuple(index[1:])


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
    checkpoint = checkpoint_files.read_index(path)
    files = {_model_key(renamings, name): file for name, file in checkpoint.items()}
    checkpoint_names = {_model_key(renamings, name): name for name in checkpoint}
    sharded = _sharded_layers(model)
    merged = _merged_parts(model)
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
                handles[file] = files_open.enter_context(checkpoint_files.open_file(file))
            return handles[file]

        # First every check, on the headers alone; then the reads and copies.
        plan, seen, missing = [], {}, []
        for name, target in state.items():
            if id(target) in seen:  # tied to a tensor loaded under another name
                continue
            key, offset = merged.get(name, (name, 0))
            if key not in files:
                if not _is_fp8_state(name):
                    missing.append(key)
                continue
            file, stored = files[key], checkpoint_names[key]
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
                if key != name:  # one half of a merged [gate; up] tensor
                    if shape[0] != 2 * layer.out_features:
                        raise ValueError(f"load_sharded: {stored} in {file} is {shape}, but the model's gate and "
                                         f"up hold {layer.out_features} features each: expected {2 * layer.out_features} rows")
                    index = _shifted(index, offset)
            got = _sliced_shape(shape, index) if index is not None else shape
            transposed = index is not None and kind == "weight" and getattr(layer, "checkpoint_transposed", False)
            if transposed:
                got = got[::-1]
            want = tuple(local(target).shape)  # a DTensor's local shard
            if got != want:
                raise ValueError(f"load_sharded: {stored} in {file} is {shape}, which gives {got} here, but the "
                                 f"model's {name} is {want} on this rank")
            dtype = checkpoint_files.DTYPES.get(dtype_name)
            if dtype is None or (dtype != target.dtype and not (dtype.is_floating_point and target.dtype.is_floating_point)):
                raise ValueError(f"load_sharded: {stored} in {file} is {dtype_name}, but the model's {name} is "
                                 f"{target.dtype}; only floating-point tensors are cast")
            plan.append((name, target, file, stored, index, transposed, shape, 1 if key == name else 2))
            seen[id(target)] = name
        missing = [n for n in missing if n not in state or id(state[n]) not in seen]
        if missing:
            raise ValueError(f"load_sharded: the checkpoint {path} lacks {len(missing)} of the model's tensors: "
                             f"{', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
        still_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()]
                      if t.is_meta and id(t) not in seen]
        if still_meta:
            raise ValueError(f"load_sharded: {', '.join(still_meta[:8])} are on the meta device and not in the "
                             f"checkpoint (buffers a model computes as it is built); build the model under "
                             f"tpkernels.empty_parameters(), which keeps buffers real")
        for name, target, file, stored, index, transposed, shape, halves in plan:
            if index is not None:
                value = handle(file).get_slice(stored)[index]
                if transposed:
                    value = value.t()
                stats["sharded_bytes_read"] += value.numel() * value.element_size()
                # a merged [gate; up] tensor is read as two halves: each counts its half of the bytes
                stats["sharded_bytes_in_checkpoint"] += math.prod(shape) * value.element_size() // halves
            else:
                value = handle(file).get_tensor(stored)
            stats["bytes_read"] += value.numel() * value.element_size()
            stats["tensors"] += 1
            if name in sharded:  # the layer holds its shard (a DTensor parameter where distributed)
                layer, kind = sharded[name]
                layer._assign(kind, value.to(device or "cpu", target.dtype) if target.is_meta else value)
            else:
                _load_into(holders.get(id(target), []), target, value, device)
    for module in model.modules():
        if isinstance(module, TensorParallelGatedMLP):
            module._pack()  # gate and up shards loaded as separate tensors: one buffer again
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


@dataclasses.dataclass
class _Entry:
    """One tensor of the checkpoint: its name, its shape and dtype in the file, and where it comes from
    (a sharded layer's parameter, gathered to rank 0 along `split_dim` of the file's layout; or a
    tensor rank 0 holds whole)."""

    name: str
    shape: tuple
    dtype: torch.dtype
    tensor: torch.Tensor
    transposed: bool = False
    split_dim: int = None  # None: not sharded
    sizes: tuple = ()  # each rank's extent along split_dim
    parts: tuple = ()  # a merged [gate; up] tensor: the entries of its halves, concatenated along dim 0

    @property
    def nbytes(self):
        return math.prod(self.shape) * self.dtype.itemsize


def _entries(model, world):
    """The checkpoint's tensors in state_dict order, tied tensors once: the same list on every rank."""
    sharded = _sharded_layers(model)
    merged = _merged_parts(model)
    entries, seen, halves = [], set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen or _is_fp8_state(name):
            continue
        seen.add(id(tensor))
        entry = _Entry(name, tuple(tensor.shape), tensor.dtype, tensor)
        if name in sharded:
            layer, kind = sharded[name]
            column = isinstance(layer, ColumnParallelLinear)
            if kind == "weight" or column:  # a row layer's bias is replicated: rank 0's is the tensor
                full = (layer.out_features, layer.in_features) if kind == "weight" else (layer.out_features,)
                split = 0 if column else 1
                entry.transposed = kind == "weight" and getattr(layer, "checkpoint_transposed", False)
                if entry.transposed:
                    full, split = full[::-1], 1 - split
                entry.shape, entry.split_dim = tuple(full), split
                features = layer.out_features if column else layer.in_features
                entry.sizes = tuple(b - a for a, b in (shard_range(features, world, r) for r in range(world)))
        if name in merged:  # written once, as the merged tensor, when its second half comes
            key = merged[name][0]
            halves.setdefault(key, []).append(entry)
            if len(halves[key]) < 2:
                continue
            first, second = sorted(halves[key], key=lambda e: merged[e.name][1])  # in the file's row order
            entry = _Entry(key, (first.shape[0] + second.shape[0], *first.shape[1:]), first.dtype, first.tensor,
                           parts=(first, second))
        entries.append(entry)
    return entries


def _is_fp8_state(name):
    """A layer's fp8 scaling state (`tpkernels.fp8.FP8Scaling`): per rank, not part of the dense model, so
    neither saved nor required on load."""
    return f".{name}".rpartition(".")[0].endswith(".fp8_scaling")


def _files_of(entries, limit):
    """Entries grouped into files of at most `limit` bytes, in order; a tensor over the limit alone."""
    files, current, size = [], [], 0
    for entry in entries:
        if current and size + entry.nbytes > limit:
            files.append(current)
            current, size = [], 0
        current.append(entry)
        size += entry.nbytes
    if current or not files:
        files.append(current)
    return files


class _Gather:
    """Moves each sharded tensor to rank 0 only (point to point: rank 0 receives each rank's shard into
    its place in the dense tensor), counting the bytes this rank moves and the most it holds at once."""

    def __init__(self, process_group):
        self.group = process_group
        self.rank, self.world = get_rank(process_group), get_world_size(process_group)
        self.bytes_gathered = 0
        self.peak_bytes = 0
        self.error = None  # this rank's first failure (ranks but 0: sending), reported to every rank at the end
        if self.world > 1:
            import torch.distributed as dist

            self.dist = dist
            self.nccl = dist.get_backend(process_group) == "nccl"
            self.root = dist.get_global_rank(process_group or dist.group.WORLD, 0)
            self.peers = [dist.get_global_rank(process_group or dist.group.WORLD, r) for r in range(self.world)]

    def _wire(self, t):
        return t if self.nccl else t.cpu()  # NCCL moves device tensors; gloo CPU ones

    def __call__(self, entry):
        """Rank 0: the entry's dense tensor (file layout, CPU, contiguous). Other ranks: None."""
        if entry.parts:
            pieces = [self(part) for part in entry.parts]
            return None if self.rank != 0 else torch.cat(pieces)
        local_tensor = local(entry.tensor.detach())
        if entry.transposed:
            local_tensor = local_tensor.t()
        if entry.split_dim is None or self.world == 1:
            if self.rank != 0:
                return None
            out = local_tensor.cpu().contiguous()
            self.peak_bytes = max(self.peak_bytes, out.numel() * out.element_size())
            return out
        if self.rank != 0:
            try:
                shard = self._wire(local_tensor).contiguous()
            except Exception as failure:
                # rank 0 is waiting for this shard: it gets zeros of its shape, so that nobody hangs,
                # and the failure is reported to every rank before anything is moved into place
                self.error = self.error or _described(failure)
                shard = torch.zeros(local_tensor.shape, dtype=entry.dtype,
                                    device=local_tensor.device if self.nccl else "cpu")
            nbytes = shard.numel() * shard.element_size()
            self.dist.send(shard, dst=self.root, group=self.group)
            self.bytes_gathered += nbytes
            self.peak_bytes = max(self.peak_bytes, nbytes)
            return None
        out = torch.empty(entry.shape, dtype=entry.dtype)
        held, start = out.numel() * out.element_size(), 0
        for r, size in enumerate(entry.sizes):
            place = out.narrow(entry.split_dim, start, size)
            start += size
            if r == 0:
                place.copy_(local_tensor)
                continue
            direct = place.is_contiguous() and not self.nccl
            buffer = place if direct else torch.empty(place.shape, dtype=entry.dtype,
                                                      device=local_tensor.device if self.nccl else "cpu")
            self.dist.recv(buffer, src=self.peers[r], group=self.group)
            if not direct:
                place.copy_(buffer)
                self.peak_bytes = max(self.peak_bytes, held + buffer.numel() * buffer.element_size())
            self.bytes_gathered += place.numel() * place.element_size()
        self.peak_bytes = max(self.peak_bytes, held)
        return out


def _described(failure):
    return f"{type(failure).__name__}: {failure}"


@torch.no_grad()
def save_sharded(model, path, process_group=None, *, max_shard_size="5GB"):
    """Write a parallelized model as the dense model's safetensors checkpoint, streaming one tensor at a
    time to rank 0 (a collective: call it on every rank; rank 0 writes).

    Each sharded weight is sent to rank 0 alone (no all-gather), written into the current file and
    freed, so rank 0 holds at most one dense tensor (plus one shard in flight) beyond the model, and
    the other ranks at most one shard. Files follow transformers' layout: `model.safetensors` when
    everything fits in `max_shard_size`, else `model-00001-of-0000N.safetensors` files of at most that
    size (a larger tensor alone in its file) and `model.safetensors.index.json`. Sharded weights go back
    to their original layout (Conv1D's [in, out] included), tied tensors are written once, and the
    model's config is written when it has one, so `from_pretrained` loads the folder.

    Nothing is lost on a failure: rank 0 writes into a temporary folder beside `path`, checks every
    file's header and size, and only then moves it into place, replacing an existing checkpoint as a
    whole (other files in the folder, a tokenizer say, are carried into the new one; the old checkpoint's
    own files are not). If a write fails, rank 0 still takes the other ranks' shards (so that none
    waits), removes the temporary, leaves `path` as it was, and every rank raises a RuntimeError. If
    another rank fails to produce a shard, it sends zeros in its place (so that none waits), every rank
    learns of it before rank 0 moves anything into place, and it goes the same way. Files and folders
    are flushed to the disk (fsync) before and after the move.

    Args:
        model: the parallelized model.
        path: a folder, or a .safetensors file (then everything must fit in one file).
        process_group: the tensor-parallel group (a ProcessGroup or a 1-D DeviceMesh); None is the default
            group.
        max_shard_size: bytes per file at most: an int, or transformers' notation ("5GB", "500MiB").

    Returns:
        {"files", "index", "tensors", "bytes_gathered", "peak_bytes"}: the paths written (on every rank),
        the tensor count, the bytes of sharded tensors this rank sent (rank 0: received), and the most
        bytes of gathered tensors it held at once.
    """
    limit = checkpoint_files.parse_size(max_shard_size)
    process_group = group_of(process_group)
    for name, (layer, kind) in _sharded_layers(model).items():
        param = getattr(layer, kind)
        if getattr(param, "device_mesh", None) is not None and param.device_mesh.ndim != 1:
            raise ValueError(f"save_sharded: {name} is sharded over a {param.device_mesh.ndim}-D mesh (FSDP2 over "
                             f"tensor parallel); save training state with torch.distributed.checkpoint, or a "
                             f"dense checkpoint from get_model_state_dict(..., options=StateDictOptions("
                             f"full_state_dict=True))")
    gather = _Gather(process_group)
    entries = _entries(model, gather.world)
    groups = _files_of(entries, limit)
    single = path.endswith(".safetensors")
    if single and len(groups) > 1:
        raise ValueError(f"save_sharded: {path} is one file, but the checkpoint's {sum(e.nbytes for e in entries)} "
                         f"bytes need {len(groups)} files of max_shard_size={max_shard_size!r}; give a folder")
    names = ([os.path.basename(path)] if single else ["model.safetensors"] if len(groups) == 1 else
             [f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)])
    folder = os.path.dirname(os.path.abspath(path)) if single else os.path.abspath(path)
    index = None if len(groups) == 1 else os.path.join(folder, "model.safetensors.index.json")
    error, staging = None, None
    if gather.rank == 0:
        try:
            staging = checkpoint_files.staging_folder(path)
        except Exception as failure:  # reported on every rank below, after the others' shards are taken
            error = _described(failure)
    for name, group in zip(names, groups):
        f = None
        try:
            if gather.rank == 0 and error is None:
                header, _ = checkpoint_files.header(group)
                f = open(os.path.join(staging, name), "wb")
                f.write(header)
        except Exception as failure:
            error = _described(failure)
        for entry in group:
            tensor = gather(entry)
            if f is not None and error is None:
                try:
                    checkpoint_files.write_tensor(f, tensor)
                except Exception as failure:
                    error = _described(failure)
            del tensor
        if f is not None:
            try:
                f.close()
            except Exception as failure:
                error = error or _described(failure)
    failed_rank = 0 if error is not None else None
    if gather.world > 1:
        # Every rank's failure (another rank's while it sent its shards) reaches rank 0 before anything
        # is moved into place.
        errors = [None] * gather.world
        gather.dist.all_gather_object(errors, error if gather.rank == 0 else gather.error, group=process_group)
        failed_rank = next((r for r, e in enumerate(errors) if e is not None), None)
        error = None if failed_rank is None else errors[failed_rank]
    if gather.rank == 0:
        try:
            if error is None:
                checkpoint_files.finish(path, staging, names, groups, index, getattr(model, "config", None))
        except Exception as failure:
            error, failed_rank = _described(failure), 0
        if error is not None and staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    if gather.world > 1:
        # Rank 0's outcome reaches every rank (instead of a barrier a failed rank 0 would never reach),
        # after the checkpoint is whole.
        outcome = [(error, failed_rank)]
        gather.dist.broadcast_object_list(outcome, src=gather.root, group=process_group)
        error, failed_rank = outcome[0]
    if error is not None:
        raise RuntimeError(f"save_sharded: writing {path} failed on rank {failed_rank} ({error}); what was at "
                           f"{path} before is as it was, and nothing of the new checkpoint is left")
    return dict(files=[os.path.join(folder, name) for name in names], index=index, tensors=len(entries),
                bytes_gathered=gather.bytes_gathered, peak_bytes=gather.peak_bytes)


