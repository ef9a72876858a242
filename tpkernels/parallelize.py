"""Tensor parallelism for a model you already have, and its checkpoints one shard per rank.

`parallelize(model)` finds each GELU MLP block (Linear in -> hidden, GELU, Linear hidden -> out, in one
module or split across two sibling modules) and swaps, in place, its first Linear for a
ColumnParallelLinear with the GELU fused, the activation for an identity and its second Linear for a
RowParallelLinear. Per rank, for W ranks and hidden width F (F_r = the r-th `tensor_split` size):

    fc1 [F, K] -> ColumnParallelLinear  weight_shard_n [F_r, K]   h_r = gelu(x @ W1_r.T + b1_r)
    act        -> identity (GELU runs in fc1's epilogue)
    fc2 [N, F] -> RowParallelLinear     weight_shard_k [N, F_r]   y = all-reduce(h_r @ W2_r.T) + b2, b2 once

The block's own forward still runs (its dropout, residual, norms), so a replacement is exact only if
the forward does what the search assumed: each one is proved on a probe input before it is kept (the
new block's output within the 2x-eager rule of an fp64 copy of the old one, on every rank alike), and
undone otherwise. GPT-2's `Conv1D` (weight stored [in, out]) is handled; its checkpoint layout is kept.

`load_sharded(model, path)` reads a safetensors checkpoint (one file, or the `transformers` index of
files) into a parallelized model, each rank reading only its slices of the sharded weights (safetensors
slice reads) and the other tensors whole; `save_sharded(model, path)` gathers the dense weights and
writes a checkpoint `transformers` loads.
"""
import contextlib
import copy
import dataclasses
import fnmatch
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from tpkernels.distributed import get_rank, get_world_size
from tpkernels.nn import ColumnParallelLinear, RowParallelLinear

__all__ = ["ParallelizeReport", "empty_parameters", "load_sharded", "parallelize", "save_sharded"]

# A probe's tolerance beyond 2x eager's error, relative to the reference's magnitude (as the tests' atol).
_PROBE_ATOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-10}


@dataclasses.dataclass
class ParallelizeReport:
    """What `parallelize` did: one dict per block it replaced, and one per candidate it left alone."""

    replaced: list = dataclasses.field(default_factory=list)
    left_alone: list = dataclasses.field(default_factory=list)

    def __str__(self):
        lines = [f"parallelize: {len(self.replaced)} MLP blocks replaced, {len(self.left_alone)} left alone"]
        for r in self.replaced:
            lines.append(f"  replaced   {r['block']}: {r['fc1']} -> {r['act']} ({'exact' if r['gelu'] == 'none' else 'tanh'} "
                         f"GELU, fused) -> {r['fc2']}, hidden {r['hidden']} split {r['split']}")
        for r in self.left_alone:
            lines.append(f"  left alone {r['block']}: {r['reason']}")
        return "\n".join(lines)


def _is_conv1d(module):
    # transformers.pytorch_utils.Conv1D: y = x @ weight + bias, weight [in, out]; found by shape, not import
    return (type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 2 and getattr(module, "nf", None) == module.weight.shape[1])


def _features(module):
    """(in, out) of an nn.Linear or a Conv1D, else None."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if _is_conv1d(module):
        return module.weight.shape[0], module.weight.shape[1]
    return None


def _as_linear(module):
    """An nn.Linear view of an nn.Linear or a Conv1D (its weight transposed, no copy)."""
    if isinstance(module, nn.Linear):
        return module
    linear = nn.Linear(*_features(module), bias=module.bias is not None, device="meta", dtype=module.weight.dtype)
    linear.weight = nn.Parameter(module.weight.detach().t(), requires_grad=module.weight.requires_grad)
    if module.bias is not None:
        linear.bias = nn.Parameter(module.bias.detach(), requires_grad=module.bias.requires_grad)
    return linear


def _gelu_form(act):
    """"none" or "tanh" when act computes that GELU on a probe, else None."""
    if not callable(act) or isinstance(act, (nn.Linear, torch.Tensor)) or _is_conv1d(act):
        return None
    t = torch.linspace(-6, 6, 97)
    try:
        with torch.no_grad():
            out = act(t)
    except Exception:
        return None
    if not isinstance(out, torch.Tensor) or out.shape != t.shape:
        return None
    for form in ("none", "tanh"):
        if torch.allclose(out.float(), F.gelu(t, approximate=form), atol=1e-5, rtol=1e-5):
            return form
    return None


def _get(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def _set(root, path, value):
    owner, _, name = path.rpartition(".")
    owner = _get(root, owner) if owner else root
    if isinstance(value, nn.Module) or name in owner._modules:
        owner._modules[name] = value
    else:
        setattr(owner, name, value)


def _identity(x):
    return x


def _activation_names(module):
    """Attribute names of module that could be its activation: parameterless child modules and callable
    attributes."""
    names = [name for name, child in module.named_children()
             if _features(child) is None and next(child.parameters(), None) is None]
    names += [name for name, value in vars(module).items()
              if not name.startswith("_") and callable(value) and not isinstance(value, (nn.Module, type))]
    return names


def _elementwise(act):
    """Whether act maps a probe vector to another of its shape, the same way twice, and not to itself
    (an activation, not an identity or a dropout)."""
    if isinstance(act, nn.modules.dropout._DropoutNd):
        return False
    t = torch.linspace(-6, 6, 97)
    try:
        with torch.no_grad():
            out, again = act(t), act(t)
    except Exception:
        return False
    return (isinstance(out, torch.Tensor) and out.shape == t.shape and torch.equal(out, again)
            and not torch.equal(out, t))


def _activations(module):
    """module's activation attributes, GELU ones first: the others make candidates left alone, and say why."""
    names = _activation_names(module)
    gelus = [n for n in names if _gelu_form(getattr(module, n)) is not None]
    return gelus + [n for n in names if n not in gelus and _elementwise(getattr(module, n))]


def _candidates(model):
    """(block path, fc1 path, act path, fc2 path) found by structure, fc paths relative to the block."""
    found, used = [], set()
    for block_path, block in model.named_modules():
        children = dict(block.named_children())
        linears = [(name, child) for name, child in children.items() if _features(child)]
        # fc1, act and fc2 in one module, fc1 registered before fc2, each Linear in one block at most
        acts = _activations(block) if len(linears) >= 2 else []
        for i, (name1, fc1) in enumerate(linears):
            for name2, fc2 in linears[i + 1:]:
                if (acts and _features(fc1)[1] == _features(fc2)[0] and id(fc1) not in used
                        and id(fc2) not in used):
                    found.append((block_path, name1, acts[0], name2))
                    used.update((id(fc1), id(fc2)))
        # split across two siblings: one holds fc1 and the activation, the next holds fc2
        for (first, a), (second, b) in zip(list(children.items()), list(children.items())[1:]):
            inner1 = {n: c for n, c in a.named_children() if _features(c)}
            inner2 = {n: c for n, c in b.named_children() if _features(c)}
            acts = _activations(a)
            if len(inner1) == 1 and len(inner2) == 1 and acts:
                (n1, fc1), (n2, fc2) = next(iter(inner1.items())), next(iter(inner2.items()))
                if _features(fc1)[1] == _features(fc2)[0] and id(fc1) not in used and id(fc2) not in used:
                    found.append((block_path, f"{first}.{n1}", f"{first}.{acts[0]}", f"{second}.{n2}"))
                    used.update((id(fc1), id(fc2)))
    return found


def _flatten(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return [t for item in out for t in _flatten(item)]
    return []


def _probe(block, x):
    was_training = block.training
    block.eval()
    try:
        with torch.no_grad():
            return _flatten(block(x))
    finally:
        block.train(was_training)


def _agree(ok, process_group):
    """Every rank's verdict, combined: True only if all ranks passed (a collective)."""
    if get_world_size(process_group) == 1:
        return ok
    import torch.distributed as dist

    on_gpu = dist.get_backend(process_group) == "nccl"
    flag = torch.tensor([1 if ok else 0], device=torch.cuda.current_device() if on_gpu else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=process_group)
    return bool(flag.item())


def _plan_candidates(model, plan):
    found = []
    for pattern, names in plan.items():
        if not (isinstance(names, (tuple, list)) and len(names) == 3):
            raise ValueError(f"parallelize: plan[{pattern!r}] must be (fc1, act, fc2) attribute names, got {names!r}")
        matches = [path for path, _ in model.named_modules() if fnmatch.fnmatchcase(path, pattern)]
        if not matches:
            raise ValueError(f"parallelize: plan pattern {pattern!r} matches no module of the model")
        found += [(path, *names) for path in matches]
    return found


def parallelize(model, process_group=None, *, plan=None, sequence_parallel=False, reduce_dtype=None,
                backend="auto", probe_tokens=5):
    """Replace, in place, each GELU MLP block of `model` with the fused tensor-parallel layers.

    Call it on every rank, with the same dense model on each (same weights). Each candidate is proved on
    a probe input before it is kept (a collective per candidate), so every rank keeps the same ones.

    Args:
        model: an nn.Module (a `transformers` model, a timm ViT, your own).
        process_group: the tensor-parallel group; None is the default group.
        plan: {module path pattern (fnmatch): (fc1, act, fc2)} attribute paths relative to each matched
            module, e.g. {"transformer.h.*.mlp": ("c_fc", "act", "c_proj")}, instead of the search.
        sequence_parallel: must be False: a sequence-parallel block would hand sequence shards to the
            model's own norms and residuals, which expect whole sequences.
        reduce_dtype: None or torch.float32, as RowParallelLinear's.
        backend: the kernels' backend, as the modules'.
        probe_tokens: tokens of the probe input.

    Returns:
        A `ParallelizeReport`: the blocks replaced, and the candidates left alone with the reason.
    """
    if sequence_parallel:
        raise ValueError("parallelize: sequence_parallel=True is not supported: the model's own norms, "
                         "residuals and attention between the MLP blocks would receive sequence shards; use "
                         "TensorParallelMLP(sequence_parallel=True) in a model written for it")
    if not isinstance(model, nn.Module):
        raise TypeError(f"parallelize takes an nn.Module, got {type(model).__name__}")
    report = ParallelizeReport()
    world = get_world_size(process_group)
    candidates = _plan_candidates(model, plan) if plan is not None else _candidates(model)
    for index, (block_path, fc1_path, act_path, fc2_path) in enumerate(candidates):
        block = _get(model, block_path) if block_path else model
        entry = dict(block=block_path or "(model)", fc1=fc1_path, act=act_path, fc2=fc2_path)
        try:
            fc1, act, fc2 = (_get(block, p) for p in (fc1_path, act_path, fc2_path))
        except AttributeError as error:
            report.left_alone.append(dict(entry, reason=f"no such attribute: {error}"))
            continue
        reason = _check_candidate(fc1, act, fc2, world)
        if reason:
            report.left_alone.append(dict(entry, reason=reason))
            continue
        form = _gelu_form(act)
        options = dict(process_group=process_group, backend=backend)
        # A block on the meta device is proved on a CPU copy with random weights: the probe tests what its
        # forward does, which does not depend on the values.
        on_meta = any(p.is_meta for p in block.parameters())
        probe_block = _materialized(block, index) if on_meta else block
        paths = (fc1_path, act_path, fc2_path)
        verdict, originals = _prove(probe_block, paths, form, reduce_dtype, options, probe_tokens, index)
        if not _agree(verdict is None, process_group):
            for path, value in zip(paths, originals or ()):
                _set(probe_block, path, value)  # undone on every rank, whichever rank's probe failed
            report.left_alone.append(dict(entry, reason=verdict or "the probe's output changed on another rank"))
            continue
        if on_meta:
            _replace(block, (fc1_path, act_path, fc2_path), form, reduce_dtype, options)
        hidden = _features(fc1)[1]
        report.replaced.append(dict(entry, gelu=form, hidden=hidden, split=f"{hidden} over {world} ranks"))
    return report


def _materialized(block, seed):
    """A copy of block whose meta tensors are random CPU ones (the real ones, buffers say, are kept)."""
    copy_ = copy.deepcopy(block)
    generator = torch.Generator().manual_seed(1000 + seed)
    for module in copy_.modules():
        for table in (module._parameters, module._buffers):
            for name, tensor in table.items():
                if tensor is None or not tensor.is_meta:
                    continue
                value = (torch.randn(tensor.shape, generator=generator) * 0.05).to(tensor.dtype)
                if not tensor.is_floating_point():
                    value = torch.zeros(tensor.shape, dtype=tensor.dtype)
                table[name] = nn.Parameter(value, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else value
    return copy_


def _replace(block, paths, form, reduce_dtype, options):
    """Swap fc1, act and fc2 of block for the tensor-parallel layers; returns the originals."""
    fc1_path, act_path, fc2_path = paths
    originals = [_get(block, p) for p in paths]
    fc1, act, fc2 = originals
    column = ColumnParallelLinear.from_linear(_as_linear(fc1), activation="gelu" if form == "none" else "gelu_tanh",
                                              **options)
    row = RowParallelLinear.from_linear(_as_linear(fc2), reduce_dtype=reduce_dtype, **options)
    column.checkpoint_transposed, row.checkpoint_transposed = _is_conv1d(fc1), _is_conv1d(fc2)
    for layer, original in ((column, fc1), (row, fc2)):
        for param in layer.parameters():
            param.requires_grad_(original.weight.requires_grad)
    _set(block, fc1_path, column)
    _set(block, act_path, nn.Identity() if isinstance(act, nn.Module) else _identity)
    _set(block, fc2_path, row)
    return originals


def _prove(block, paths, form, reduce_dtype, options, probe_tokens, seed):
    """Replace in block and compare its output on a probe with the old block's and an fp64 copy's.
    Returns (None when the replacement holds, else why not; the replaced originals or None)."""
    fc1 = _get(block, paths[0])
    weight = fc1.weight
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(1, probe_tokens, _features(fc1)[0], generator=generator).to(weight.device, weight.dtype)
    try:
        before = _probe(block, x)
        reference = _probe(copy.deepcopy(block).double(), x.double())
    except Exception as error:  # alike on every rank: the same model, the same probe
        return f"its forward failed on a probe input of shape {tuple(x.shape)}: {type(error).__name__}: {error}", None
    originals = _replace(block, paths, form, reduce_dtype, options)
    try:
        verdict = _compare(_probe(block, x), before, reference)
    except Exception as error:
        verdict = f"the replaced forward failed: {type(error).__name__}: {error}"
    if verdict is not None:
        verdict = f"the probe's output changed: {verdict}"
    return verdict, originals


def _check_candidate(fc1, act, fc2, world):
    f1, f2 = _features(fc1), _features(fc2)
    if f1 is None or f2 is None:
        return "fc1 and fc2 must be nn.Linear or Conv1D"
    if f1[1] != f2[0]:
        return f"fc1 has {f1[1]} outputs but fc2 takes {f2[0]} inputs"
    if _gelu_form(act) is None:
        return f"the activation ({type(act).__name__}) is not GELU (exact or tanh) on a probe"
    if f1[1] < world:
        return f"hidden width {f1[1]} is smaller than the {world} ranks"
    if fc1.weight.dtype != fc2.weight.dtype or fc1.weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"weights are {fc1.weight.dtype} and {fc2.weight.dtype}; the kernels take float32, float16 or bfloat16"
    return None


def _compare(after, before, reference):
    """None when every output of the new block is within 2x the old block's error against fp64, else why."""
    if len(after) != len(before):
        return f"{len(after)} outputs, expected {len(before)}"
    for index, (new, old, ref) in enumerate(zip(after, before, reference)):
        if new.shape != old.shape:
            return f"output {index} has shape {tuple(new.shape)}, expected {tuple(old.shape)}"
        if not new.is_floating_point():
            if not torch.equal(new, old):
                return f"output {index} differs"
            continue
        ref = ref.double()
        err = (new.double() - ref).abs().max().item() if new.numel() else 0.0
        eager = (old.double() - ref).abs().max().item() if old.numel() else 0.0
        limit = 2 * eager + _PROBE_ATOL.get(old.dtype, 1e-4) * max(1.0, ref.abs().max().item() if ref.numel() else 0)
        if not err <= limit:
            return f"output {index}: max error {err:.3e} against fp64, over 2 x eager's ({eager:.3e}) + atol"
    return None


# ---------------------------------------------------------------------------------------------------
# Checkpoints


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


def _slice_of(layer, kind, shape):
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
    handles = {}
    try:
        for name, target in state.items():
            if id(target) in seen:  # tied to a tensor loaded under another name
                continue
            if name not in files:
                missing.append(name)
                continue
            file = files[name]
            if file not in handles:
                handles[file] = safe_open(file, framework="pt").__enter__()
            view = handles[file].get_slice(checkpoint_names[name])
            shape = view.get_shape()
            if name in sharded:
                layer, kind = sharded[name]
                value = view[_slice_of(layer, kind, shape)]
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
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
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
