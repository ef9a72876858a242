"""Tensor parallelism for a model you already have, and its checkpoints one shard per rank.

`parallelize(model)` finds each GELU MLP block (Linear in -> hidden, GELU, Linear hidden -> out, in one
module or split across two sibling modules) and swaps, in place, its first Linear for a
ColumnParallelLinear with the GELU fused, the activation for an identity and its second Linear for a
RowParallelLinear. Per rank, for W ranks and hidden width F (F_r = rank r's `torch.chunk` size):

    fc1 [F, K] -> ColumnParallelLinear  weight_shard_n [F_r, K]   h_r = gelu(x @ W1_r.T + b1_r)
    act        -> identity (GELU runs in fc1's epilogue)
    fc2 [N, F] -> RowParallelLinear     weight_shard_k [N, F_r]   y = all-reduce(h_r @ W2_r.T) + b2, b2 once

The block's own forward still runs (its dropout, residual, norms), so a replacement is exact only if
the forward does what the search assumed: each one is proved on a probe input before it is kept (the
new block's output within the 2x-eager rule of an fp64 copy of the old one, on every rank alike), and
undone otherwise. GPT-2's `Conv1D` (weight stored [in, out]) is handled; its checkpoint layout is kept
(`checkpoint_transposed`), which `tpkernels.checkpoint` reads and writes.

Gated blocks (Llama, Mistral, Qwen2, Gemma, Phi-3, and any of their form) are found by structure too: a
module with two Linears of the same shape K -> F (gate and up, in either order) or one K -> 2F (a merged
[gate; up], Phi-3's gate_up_proj, in either half order), a Linear F -> N (down), and an activation that is
SiLU, GELU or tanh GELU on a probe. Such a block is replaced whole, by a `TensorParallelGatedMLP` with the
block's names for its layers, and only when the probe proves it: a block that sums instead of multiplying,
or permutes up's features, is left alone. Per rank: gate and up [F_r, K] (the same features of both),
down [N, F_r], one all-reduce.
"""
import copy
import dataclasses
import fnmatch

import torch
import torch.nn.functional as F
from torch import nn

from tpkernels.distributed import get_world_size, group_of
from tpkernels.fp8 import check_recipe
from tpkernels.nn import ColumnParallelLinear, RowParallelLinear, TensorParallelGatedMLP

__all__ = ["ParallelizeReport", "parallelize"]

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
            if r.get("gated"):
                lines.append(f"  replaced   {r['block']} whole: {r['act']}({r['gate']}) * {r['up']} -> {r['down']} "
                             f"(gated {r['activation']}, fused), hidden {r['hidden']} split {r['split']}")
                continue
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


_PROBE_POINTS = torch.linspace(-6, 6, 97)


def _on_probe(act):
    """act applied to _PROBE_POINTS in fp32, or None when act is not an elementwise callable of them."""
    if not callable(act) or isinstance(act, (nn.Linear, torch.Tensor)) or _is_conv1d(act):
        return None
    try:
        with torch.no_grad():
            out = act(_PROBE_POINTS)
    except Exception:
        return None
    if not isinstance(out, torch.Tensor) or out.shape != _PROBE_POINTS.shape:
        return None
    return out.float()


def _gelu_form(act):
    """"none" or "tanh" when act computes that GELU on a probe, else None."""
    out = _on_probe(act)
    for form in ("none", "tanh") if out is not None else ():
        if torch.allclose(out, F.gelu(_PROBE_POINTS, approximate=form), atol=1e-5, rtol=1e-5):
            return form
    return None


def _gated_form(act):
    """"silu", "gelu" or "gelu_tanh" when act computes that activation on a probe, else None."""
    form = _gelu_form(act)
    if form is not None:
        return "gelu" if form == "none" else "gelu_tanh"
    out = _on_probe(act)
    if out is not None and torch.allclose(out, F.silu(_PROBE_POINTS), atol=1e-5, rtol=1e-5):
        return "silu"
    return None


def _extra_children(block, names):
    """block's children other than `names` that do something: its replacement would drop them (a dropout
    with p > 0, a norm). Identities and dropouts of p = 0 do nothing."""
    return [n for n, child in block.named_children()
            if n not in names and not isinstance(child, nn.Identity)
            and not (isinstance(child, nn.modules.dropout._DropoutNd) and child.p == 0)]


def _gated_candidates(model):
    """[(orders, extras)]: for every module shaped like a gated MLP (nn.Linear children gate and up K -> F and
    down F -> N, or a merged K -> 2F, and a gated activation), its readings (block path, gate, up, down, act,
    merged) (merged=True: gate and up are the merged Linear's name and the order of its halves), each (gate,
    up) order one; the probe keeps the one the block computes. `extras`: the block's other children that do
    something (`_extra_children`)."""
    found = []
    for block_path, block in model.named_modules():
        if not block_path:
            continue  # the model itself is not replaced
        linears = {name: child for name, child in block.named_children() if isinstance(child, nn.Linear)}
        acts = [n for n in _activation_names(block) if _gated_form(getattr(block, n)) is not None]
        if not acts or not 2 <= len(linears) <= 3:
            continue
        act = acts[0]
        orders = []
        for down_name, down in linears.items():
            rest = {n: c for n, c in linears.items() if n != down_name}
            shapes = {(c.in_features, c.out_features) for c in rest.values()}
            if len(rest) == 2 and len(shapes) == 1 and next(iter(shapes))[1] == down.in_features:
                a, b = rest
                orders += [(block_path, a, b, down_name, act, False), (block_path, b, a, down_name, act, False)]
            elif len(rest) == 1:
                (name, merged), = rest.items()
                if merged.out_features == 2 * down.in_features and merged.out_features > 0:
                    orders += [(block_path, name, "gate first", down_name, act, True),
                               (block_path, name, "up first", down_name, act, True)]
        if orders:
            found.append((orders, _extra_children(block, [*linears, *acts])))
    return found


def _get(root, path):
    """The child module or attribute (an activation may be a plain function) at a dotted path."""
    owner, _, name = path.rpartition(".")
    return getattr(root.get_submodule(owner), name)


def _set(root, path, value):
    owner, _, name = path.rpartition(".")
    owner = root.get_submodule(owner)
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

    group = group_of(process_group)
    on_gpu = dist.get_backend(group) == "nccl"
    flag = torch.tensor([1 if ok else 0], device=torch.cuda.current_device() if on_gpu else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
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
                backend="auto", probe_tokens=5, fp8=None):
    """Replace, in place, each GELU MLP block of `model` with the fused tensor-parallel layers.

    Call it on every rank, with the same dense model on each (same weights). Each candidate is proved on
    a probe input before it is kept (a collective per candidate), so every rank keeps the same ones.

    Args:
        model: an nn.Module (a `transformers` model, a timm ViT, your own).
        process_group: the tensor-parallel group: a ProcessGroup, a 1-D DeviceMesh (`mesh["tp"]`, as
            torchtitan's `apply_tp` takes; then `fully_shard(..., mesh=mesh["dp"])` goes on top), or None,
            the default group.
        plan: {module path pattern (fnmatch): (fc1, act, fc2)} attribute paths relative to each matched
            module, e.g. {"transformer.h.*.mlp": ("c_fc", "act", "c_proj")}, instead of the search.
        sequence_parallel: must be False: a sequence-parallel block would hand sequence shards to the
            model's own norms and residuals, which expect whole sequences.
        reduce_dtype: None or torch.float32, as RowParallelLinear's.
        backend: the kernels' backend, as the modules'.
        probe_tokens: tokens of the probe input.
        fp8: None, or a `tpkernels.FP8Recipe` for the layers kept (`ColumnParallelLinear.use_fp8`). The probe
            proves each block in the weights' dtype first: it checks that the block is a GELU MLP, which
            fp8 rounding would blur.

    Returns:
        A `ParallelizeReport`: the blocks replaced, and the candidates left alone with the reason.
    """
    if sequence_parallel:
        raise ValueError("parallelize: sequence_parallel=True is not supported: the model's own norms, "
                         "residuals and attention between the MLP blocks would receive sequence shards; use "
                         "TensorParallelMLP(sequence_parallel=True) in a model written for it")
    if not isinstance(model, nn.Module):
        raise TypeError(f"parallelize takes an nn.Module, got {type(model).__name__}")
    check_recipe("parallelize", fp8, backend)
    report = ParallelizeReport()
    world = get_world_size(process_group)
    gated = set()  # blocks the gated search decided on, replaced or left alone: not GELU candidates too
    pending = {}  # blocks that may be GELU MLPs after all (fc2 twice fc1's input reads as a merged gate_up)
    if plan is None:
        for orders, extras in _gated_candidates(model):
            block_path = orders[0][0]
            # a merged-only reading with a GELU activation may be a plain GELU MLP: the GELU search decides
            maybe_gelu = all(o[5] for o in orders) and _gelu_form(_get(model, f"{block_path}.{orders[0][4]}")) is not None
            if extras:
                if not maybe_gelu:
                    gated.add(block_path)
                    report.left_alone.append(dict(block=block_path, reason=(
                        f"a gated MLP that also holds {', '.join(extras)}: replaced whole, it would lose them "
                        f"(its dropout, say), and half of it would not be the whole")))
                continue
            replaced, reason = _replace_gated(model, orders, process_group, reduce_dtype, backend, probe_tokens,
                                              report, world)
            if replaced is not None:
                gated.add(block_path)
                if fp8 is not None:
                    replaced.use_fp8(fp8)  # proved in the weights' dtype first, as the GELU blocks are
            elif maybe_gelu:
                pending[block_path] = reason
            else:
                gated.add(block_path)
                report.left_alone.append(dict(block=block_path, reason=reason))
    candidates = _plan_candidates(model, plan) if plan is not None else [
        c for c in _candidates(model) if c[0] not in gated]
    for index, (block_path, fc1_path, act_path, fc2_path) in enumerate(candidates):
        block = _get(model, block_path) if block_path else model
        entry = dict(block=block_path or "(model)", fc1=fc1_path, act=act_path, fc2=fc2_path)
        try:
            fc1, act, fc2 = (_get(block, p) for p in (fc1_path, act_path, fc2_path))
        except AttributeError as error:
            report.left_alone.append(dict(entry, reason=f"no such attribute: {error}"))
            continue
        reason = _check_candidate(fc1, act, fc2)
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
        if fp8 is not None:
            for path in (fc1_path, fc2_path):
                _get(block, path).use_fp8(fp8)
        hidden = _features(fc1)[1]
        report.replaced.append(dict(entry, gelu=form, hidden=hidden, split=f"{hidden} over {world} ranks"))
    decided = {r["block"] for r in report.replaced + report.left_alone}
    report.left_alone += [dict(block=b, reason=reason) for b, reason in pending.items() if b not in decided]
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


def _check_candidate(fc1, act, fc2):
    f1, f2 = _features(fc1), _features(fc2)
    if f1 is None or f2 is None:
        return "fc1 and fc2 must be nn.Linear or Conv1D"
    if f1[1] != f2[0]:
        return f"fc1 has {f1[1]} outputs but fc2 takes {f2[0]} inputs"
    if _gelu_form(act) is None:
        return f"the activation ({type(act).__name__}) is not GELU (exact or tanh) on a probe"
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


def _gated_block(block, order, process_group, reduce_dtype, backend):
    """The TensorParallelGatedMLP for one (gate, up, down, act, merged) reading of block."""
    _, gate_name, up_name, down_name, act_name, merged = order
    down = getattr(block, down_name)
    options = dict(activation=_gated_form(getattr(block, act_name)), reduce_dtype=reduce_dtype,
                   process_group=process_group, backend=backend)
    if merged:
        return TensorParallelGatedMLP.from_merged(getattr(block, gate_name), down, name=gate_name,
                                                  up_first=up_name == "up first", **options)
    return TensorParallelGatedMLP.from_dense(getattr(block, gate_name), getattr(block, up_name), down, **options)


def _replace_gated(model, orders, process_group, reduce_dtype, backend, probe_tokens, report, world):
    """Replace one gated block whole with the first reading of it (`orders`) that the probe proves on every
    rank: (the replacement, None); else (None, why not)."""
    block_path = orders[0][0]
    block = model.get_submodule(block_path)
    if any(p.is_meta for p in block.parameters()):
        probe_block = _materialized(block, len(report.replaced) + len(report.left_alone))
    else:
        probe_block = block
    first = getattr(probe_block, orders[0][1])
    weight = first.weight
    generator = torch.Generator().manual_seed(len(report.replaced))
    x = torch.randn(1, probe_tokens, first.in_features, generator=generator).to(weight.device, weight.dtype)
    reasons = []
    try:
        before = _probe(probe_block, x)
        reference = _probe(copy.deepcopy(probe_block).double(), x.double())
    except Exception as error:
        before = None
        reasons.append(f"its forward failed on a probe input of shape {tuple(x.shape)}: {type(error).__name__}: {error}")
    for order in orders if before is not None else ():
        try:
            candidate = _gated_block(probe_block, order, process_group, reduce_dtype, backend)
            verdict = _compare(_probe(candidate, x), before, reference)
        except Exception as error:
            verdict = f"the replaced forward failed: {type(error).__name__}: {error}"
        if _agree(verdict is None, process_group):
            replacement = candidate if probe_block is block else _gated_block(block, order, process_group,
                                                                             reduce_dtype, backend)
            model.set_submodule(block_path, replacement)
            _, gate, up, down, act, merged = order
            if merged:
                gate, up = (f"{gate} (gate half)", f"{gate} (up half)")
            hidden = replacement.gate_proj.out_features
            report.replaced.append(dict(block=block_path, gated=True, gate=gate, up=up, down=down, act=act,
                                        activation=replacement.activation, hidden=hidden,
                                        split=f"{hidden} over {world} ranks"))
            return replacement, None
        reasons.append(verdict or "the probe's output changed on another rank")
    return None, "a gated look-alike the probe refused: " + reasons[-1]
