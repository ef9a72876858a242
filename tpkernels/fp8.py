"""FP8 for the tensor-parallel layers: per-tensor scales, delayed scaling, the fused epilogues, forward and backward.

Per-rank shapes and scales (W ranks, rank r; q(t, s) = saturate(t * s) in e4m3, s_inv = 1 / s):

    column   x [M, K] -> x_q = q(x, s_x)                      s_x delayed (x is replicated: the same history,
                                                              so the same scale, on every rank)
             w_q = q(W1_r, s_w1)                              current scaling: s_w1 = 448 / max |W1_r|, once per
                                                              weight version (each optimizer step)
             h = act(x_q @ w_q.T * s_x_inv * s_w1_inv + b1)   one kernel: the scales, bias and GELU in the
                                                              epilogue on the fp32 accumulator
    MLP      h_q = q(h, s_h), amax_h = max |h|                the same kernel's epilogue: one atomic max per tile;
                                                              s_h is per rank (h_r is read only by rank r's row
                                                              GEMM), so no collective is needed
    row      partial = h_q @ w2_q.T * s_h_inv * s_w2_inv (+ b2 on rank 0), fp32 or 16-bit, all-reduced as now

Delayed scaling (TransformerEngine's DelayedScaling): each forward first runs one update kernel
(`kernels.fp8._scale_update_kernel`), scale = fmax / amax / 2^margin from the amax history (its max, or
the newest entry; fmax = 448 for e4m3, 57344 for e5m2), then moves the history down a row; that step's
kernels, forward and backward, raise row 0 to their amax.
The history, scale and scale_inv are buffers of `FP8Scaling`, saved by `state_dict` as the group's most
conservative state (see `FP8Scaling`).

Backward (`FP8Recipe.backward`): "fp8" (the default, as TransformerEngine's) runs the four GEMMs in fp8,
the gradients in e5m2 with their own delayed scales (dY's and dZ's histories), the operands laid out
K-major as Hopper's fp8 wgmma wants them (transposed copies of the e4m3 weights the forward used, made
by the backward, and of the saved e4m3 activations):

    dY_q = q5(dY, s_dy)
    dZ = (dY_q @ W2_q) * gelu'(z)           one GEMM, the dGELU in its epilogue, dZ in x's dtype
    db1 = sum(dZ), db2 = sum(dY)            from the unquantized gradients
    dZ_q = q5(dZ, s_dz)
    dX = dZ_q @ W1_q                        dgrad
    dW1 = dZ_q.T @ x_q, dW2 = dY_q.T @ h_q  wgrad, in the weights' dtype

"master" is the straight-through gradient in the master weights' dtype on the existing fused backward
ops (with h the dequantized h_q the forward used). Both treat the quantizers as identity.

The gated MLP (`fp8_glu_mlp_shard`) is the same with W1 = [gate_r; up_r] [2F_r, K], quantized as one tensor
(one scale: the gated kernel reads gate and up as one operand), h = act(g) * u quantized in the gated
kernel's epilogue, and dZ = [dG | dU] from the dH GEMM's gated epilogue.
"""
from dataclasses import dataclass

import torch
from torch import nn

# custom_ops registers the backward ops the "master" backward calls
from tpkernels import custom_ops, custom_ops_fp8, launch, ops, reference  # noqa: F401
from tpkernels.distributed import get_world_size
from tpkernels.custom_ops_gated import adjacent
from tpkernels.kernels import IDENTITY

__all__ = ["FP8Recipe", "FP8Scaling", "fp8_glu_mlp_shard", "fp8_linear", "fp8_mlp_shard", "quantize"]

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
FP8_MAX = reference.FP8_MAX
_ALGOS = ("max", "most_recent")
_BACKWARDS = ("fp8", "master")
# The scaled tensors of each layer kind and their formats: activations e4m3, gradients e5m2.
LINEAR_TENSORS = {"x": E4M3, "dy": E5M2}
MLP_TENSORS = {"x": E4M3, "h": E4M3, "dy": E5M2, "dz": E5M2}


@dataclass(frozen=True)
class FP8Recipe:
    """How a layer scales its fp8 tensors (delayed scaling, as TransformerEngine's DelayedScaling).

    Args:
        margin: scale = 448 / amax / 2^margin: headroom, in powers of two, for amax growing between steps.
        amax_history_len: how many steps of amax the scale looks back over.
        amax_compute_algo: "max" (the history's largest) or "most_recent" (the last step's).
        backward: "fp8" (the GEMMs of the backward in fp8, gradients in e5m2) or "master" (the backward
            in the master weights' dtype).
        cache_weights: keep each weight's e4m3 copy across steps, made again only when the weight's
            version counter moves (optimizer steps, copy_, load_state_dict). Off (the default), each step
            quantizes the weights once, at its first forward, and the backward reuses that copy: a write
            through `.data` (EMA updates, loading code) moves no version counter, and a cache would
            then keep the old weights silently. Turn it on for inference on fixed weights (decode then
            reads only the e4m3 copy).
    """

    margin: int = 0
    amax_history_len: int = 16
    amax_compute_algo: str = "max"
    backward: str = "fp8"
    cache_weights: bool = False

    def __post_init__(self):
        if not isinstance(self.margin, int) or isinstance(self.margin, bool) or self.margin < 0:
            raise ValueError(f"FP8Recipe: margin must be an int >= 0, got {self.margin!r}")
        if (not isinstance(self.amax_history_len, int) or isinstance(self.amax_history_len, bool)
                or not 1 <= self.amax_history_len <= 1024):
            raise ValueError(f"FP8Recipe: amax_history_len must be an int from 1 to 1024, got {self.amax_history_len!r}")
        if self.amax_compute_algo not in _ALGOS:
            raise ValueError(f"FP8Recipe: amax_compute_algo must be 'max' or 'most_recent', got {self.amax_compute_algo!r}")
        if self.backward not in _BACKWARDS:
            raise ValueError(f"FP8Recipe: backward must be 'fp8' or 'master', got {self.backward!r}")
        if not isinstance(self.cache_weights, bool):
            raise TypeError(f"FP8Recipe: cache_weights must be True or False, got {self.cache_weights!r}")


# fp8 tensor cores (e4m3 and e5m2 operands): Ada (sm_89) and Hopper (sm_90) on.
FP8_MIN_CAPABILITY = (8, 9)


def check_device(name, device):
    """A clear error, before any launch, for fp8 on a CUDA device without fp8 tensor cores (below sm_89),
    where the kernels would fail to compile."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        capability = launch.device_capability(index)
        if tuple(capability) < FP8_MIN_CAPABILITY:
            raise ValueError(f"{name}: fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); "
                             f"{torch.cuda.get_device_name(index)} is sm_{capability[0]}{capability[1]}. "
                             f"Pass fp8=None to run in the weights' dtype")


def check_recipe(name, fp8, backend):
    """fp8 as a layer option: None or an FP8Recipe, with a backend that runs it ("auto", "triton", "eager")."""
    if fp8 is None:
        return
    if not isinstance(fp8, FP8Recipe):
        raise TypeError(f"{name}: fp8 must be None or a tpkernels.FP8Recipe, got {type(fp8).__name__}")
    if backend not in ("auto", "triton", "eager"):
        raise ValueError(f"{name}: fp8 runs on the 'triton' kernels (or 'eager', the unfused torch._scaled_mm path), "
                         f"not backend={backend!r}; use backend='auto'")


class FP8Scaling(nn.Module):
    """The delayed-scaling state of a layer's fp8 activations, and its quantized weights.

    Buffers (per rank: a row-parallel input and the MLP's h are rank-local):
        amax_history [amax_history_len, n]   row 0 the current step's amax
        scale [n], scale_inv [n]             the scales this step quantizes with, and their inverses

    `state_dict()` saves the most conservative state of all ranks, the same on every rank: the
    history's elementwise max over the ranks, the smallest scale and the largest scale_inv (a collective
    over the default group: call it on every rank, as torch.distributed.checkpoint's get_state_dict
    does; keep_vars=True returns the live buffers without one). Identical tensors under one name are
    what torch.distributed.checkpoint keeps once, so a checkpoint loads at any world size; a rank-local
    history (h's, a row input's) resumes as the group's max, which bounds every rank's amax.

    Args:
        recipe: an FP8Recipe.
        tensors: {name: fp8 dtype} of the n scaled tensors (`LINEAR_TENSORS`, `MLP_TENSORS`).
        device: where the buffers live (moved with the module; a forward on another device resets them).
    """

    def __init__(self, recipe, tensors, device=None):
        super().__init__()
        self.recipe = recipe
        self.tensors = tuple(tensors)
        self.formats = dict(tensors)
        device = None if device is None or torch.device(device).type == "meta" else device
        self.register_buffer("amax_history", torch.zeros(recipe.amax_history_len, len(self.tensors), device=device))
        self.register_buffer("scale", torch.ones(len(self.tensors), device=device))
        self.register_buffer("scale_inv", torch.ones(len(self.tensors), device=device))
        self.register_buffer("fmax", torch.tensor([FP8_MAX[self.formats[t]] for t in self.tensors], device=device),
                             persistent=False)
        self._weights = {}
        self._slots = {}  # name -> (the buffers, their views): `slot`
        self._handle = custom_ops_fp8.register(self)  # how a backward reaches the gradients' scales

    def extra_repr(self):
        return f"tensors={self.tensors}, recipe={self.recipe}"

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if keep_vars or get_world_size(None) == 1:
            return
        import torch.distributed as dist

        history = self.amax_history.detach()
        # One all-reduce (max) for all three: min(scale) = -max(-scale). Over every rank, not the
        # tensor-parallel group alone: under dp x tp each data-parallel replica's history differs too,
        # and DCP keeps one copy of a plain tensor. On the device the default group's backend takes.
        packed = torch.cat([history.flatten(), self.scale_inv.detach(), -self.scale.detach()]).float()
        if dist.get_backend() == "nccl":
            packed = packed.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)
        packed = packed.to(history.device)
        count = self.scale.numel()
        destination[prefix + "amax_history"] = packed[:history.numel()].view(history.shape).clone()
        destination[prefix + "scale_inv"] = packed[history.numel():history.numel() + count].clone()
        destination[prefix + "scale"] = -packed[history.numel() + count:]

    def _reset(self, device):
        self.amax_history = torch.zeros(self.amax_history.shape, device=device)
        self.scale = torch.ones(self.scale.shape, device=device)
        self.scale_inv = torch.ones(self.scale_inv.shape, device=device)
        self.fmax = self.fmax.to(device)

    def update(self, device):
        """Start a step: scales from the amax history, then the history moved down a row (one launch);
        without `recipe.cache_weights`, the weights are quantized again at this step's first use.

        A forward that runs inside a backward pass is activation checkpointing's recompute (torch's
        `checkpoint`, reentrant or not, recomputes from the unpack of a saved tensor): it must quantize
        as the original forward did, so the step is not started again, and the history does not advance
        twice per step."""
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            return  # (compiled, the op checks it when it runs)
        check_device("fp8", device)  # before the scale update's launch
        if not self.recipe.cache_weights:
            self._weights.clear()
        if device.type == "cuda" and device.index is None:  # "cuda" is the current device: compare like with like
            device = torch.device("cuda", torch.cuda.current_device())
        if self.amax_history.device != device:
            self._reset(device)
        recipe = self.recipe
        custom_ops_fp8.run("fp8_scale_update", self.amax_history, self.scale, self.scale_inv, self.fmax,
                           recipe.margin, recipe.amax_compute_algo == "most_recent")

    def slot(self, name):
        """(scale, scale_inv, amax) of one tensor: one-element views of the buffers, made once per buffer
        (a decode step reads four of them per layer)."""
        buffers = (self.scale, self.scale_inv, self.amax_history)
        if torch.compiler.is_compiling():
            return self._views(name, *buffers)
        # Keyed by the buffers and their storage: a move may swap a buffer's storage in place (`.data =`, as
        # FSDP2 moves buffers), which would leave views of the old storage.
        key = tuple((b, b.data_ptr()) for b in buffers)
        cached = self._slots.get(name)
        if cached is None or any(a is not b or p != q for (a, p), (b, q) in zip(cached[0], key)):
            cached = self._slots[name] = (key, self._views(name, *buffers))
        return cached[1]

    def __getstate__(self):  # a copy (deepcopy, pickle) makes its own views of its own buffers
        return dict(super().__getstate__(), _slots={})

    def __setstate__(self, state):  # and has a handle of its own
        super().__setstate__(state)
        self._handle = custom_ops_fp8.register(self)

    def grad_slot(self, name):
        """(handle, name): how a backward reaches the scale and amax of gradient tensor `name` as they are
        when it runs (`custom_ops_fp8.quantize_grad_impl`)."""
        return self._handle, name

    def _views(self, name, scale, scale_inv, history):
        i = self.tensors.index(name)
        return scale[i:i + 1], scale_inv[i:i + 1], history[0, i:i + 1]

    def weight(self, name, weight, backend, sources=None):
        """(w_q, scale_inv): the weight quantized with current scaling (448 / max |w|), made again when the
        weight changed (its version: an optimizer step or a copy_ bumps it) or moved, and at every step's
        first use unless `recipe.cache_weights` (`update` empties the cache). `sources`: the tensors `weight`
        was made from (the gated MLP's gate and up, concatenated when they are not one buffer), whose
        addresses and versions key the cache instead of the made tensor's. Under torch.compile the weight
        is quantized in the graph at every call: the cache's keys are not traceable."""
        if torch.compiler.is_compiling():
            return _quantize_weight(weight, backend)
        key = tuple((t.data_ptr(), t._version) for t in (sources or (weight,))) + (
            weight.dtype, weight.shape, weight.device, backend)
        cached = self._weights.get(name)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        with torch.no_grad():
            w_q, scale_inv = _quantize_weight(weight, backend)
        self._weights[name] = (key, w_q, scale_inv)
        return w_q, scale_inv


def _quantize_weight(weight, backend):
    """(w_q, scale_inv): the weight in e4m3 with current scaling, 448 / max |w|."""
    if weight.numel():  # max |w| from the extremes, without materialising |w| (a copy of the weight)
        low, high = torch.aminmax(weight.detach())
        amax = torch.maximum(-low, high).float()
    else:
        amax = torch.zeros((), device=weight.device)
    scale = torch.where(amax > 0, FP8_MAX[E4M3] / torch.where(amax > 0, amax, 1.0), 1.0).reshape(1)
    scale = scale.clamp(max=torch.finfo(torch.float32).max)  # a subnormal amax overflows to inf
    return quantize(weight.detach(), scale, backend=backend), 1.0 / scale


def quantize(t, scale, amax=None, *, dtype=E4M3, backend="auto"):
    """saturate(t * scale) in `dtype` (e4m3 or e5m2), for a 2-D t; `amax` (a one-element fp32 tensor), if
    given, is raised to max |t|. One pass on the Triton kernels, torch ops elsewhere (the ops
    `tpkernels::fp8_quantize` and `fp8_quantize_amax`)."""
    if amax is None:
        return custom_ops_fp8.run("fp8_quantize", t, scale, dtype, backend != "eager")
    return custom_ops_fp8.run("fp8_quantize_amax", t, scale, amax, dtype, backend != "eager")


def _linear_q(x_q, x_scale_inv, w_q, w_scale_inv, bias, activation, out_dtype, preact_dtype, out_scale, amax, backend,
              gated=False):
    """(act(x_q @ w_q.T * x_scale_inv * w_scale_inv + bias) in out_dtype (fp8: times out_scale, saturated),
    the pre-activation in `preact_dtype`, or an empty tensor for None); amax, if given, is raised to
    max |act(...)|. `gated`: w_q [2F, K] and bias [2F] hold [gate; up], the pre-activation is [M, 2F], and
    the output is act(g) * u, [M, F]. The op `tpkernels::fp8_linear`."""
    return custom_ops_fp8.run("fp8_linear", x_q, x_scale_inv, w_q, w_scale_inv, bias, activation, out_dtype,
                              preact_dtype, out_scale, amax, gated, backend != "eager")


def _gemm_q(a_q, a_scale_inv, b_q, b_scale_inv, out_dtype, backend, z=None, grad_activation=IDENTITY, gated=False):
    """(a_q @ b_q) * a_scale_inv * b_scale_inv (* act'(z)) in out_dtype, for fp8 views a_q [M, K] (row-major)
    and b_q [K, N] (column-major: K-major, as fp8 wgmma and torch._scaled_mm read it). `gated`: z is [g | u]
    and the result [dG | dU], both [M, 2N], from the product dH (`reference.glu_backward`). The op
    `tpkernels::fp8_gemm`."""
    return custom_ops_fp8.run("fp8_gemm", a_q, a_scale_inv, b_q, b_scale_inv, z, grad_activation, gated,
                              out_dtype, backend != "eager")


def _transposed(t):
    """t.T made contiguous: a saved fp8 activation, or a weight, laid out K-major for a GEMM (a pass over
    1-byte elements)."""
    return t.t().contiguous()


def _snapshot(t):
    """A copy of a scale buffer's view, for a backward to read as the forward saw it (the next forward's update
    rewrites the buffer). The op `tpkernels::fp8_snapshot`: compiled, a `clone()` of the buffer may be elided
    once the update is made in place, and the backward would read the next step's scale."""
    return custom_ops_fp8.run("fp8_snapshot", t)


def _quantize_grad(t, slot, backend):
    """(t in e5m2, its scale_inv): a gradient quantized with the scale of `slot` (`FP8Scaling.grad_slot`) as it
    is now, its amax raised. The op `tpkernels::fp8_quantize_grad`."""
    return custom_ops_fp8.run("fp8_quantize_grad", t, *slot, E5M2, backend != "eager")


def _fp8_dgrad_wgrad(dz, dz_slot, x_q, x_scale_inv, w_q, w_scale_inv, needs, dtype, backend):
    """The fp8 backward of one linear y = x @ W.T, given dZ (the gradient at its output, in a 16-bit or
    fp32 dtype) and the forward's e4m3 x and W: (dX, dW) in `dtype` (the weight's) where `needs` = (need_dx, need_dw),
    else None. dZ is quantized to e5m2 once, with `dz_slot`'s scale (`FP8Scaling.grad_slot`)."""
    need_dx, need_dw = needs
    dz_q, dz_scale_inv = _quantize_grad(dz, dz_slot, backend)
    dx = dw = None
    if need_dx:  # dX = dZ @ W: B = W [N, K], read K-major from its transposed copy W.T [K, N]
        dx = _gemm_q(dz_q, dz_scale_inv, _transposed(w_q).t(), w_scale_inv, dtype, backend)
    if need_dw:  # dW = dZ.T @ x: A = dZ.T [N, M] and B = x [M, K], both K-major (K = M, the tokens)
        dw = _gemm_q(_transposed(dz_q), dz_scale_inv, _transposed(x_q).t(), x_scale_inv, dtype, backend)
    return dx, dw


def _fp8_row_backward(grad, dy_slot, h_q, h_scale_inv, w2_q, w2_scale_inv, need_dw2, need_db2, dtype, backend,
                      z=None, grad_activation=IDENTITY, gated=False, need_dz=True):
    """The fp8 backward of the MLP's row stage partial = h @ W2.T (+ b2): (dZ, dW2, db2), each None where not
    needed. dY is quantized to e5m2 once; dZ = (dY @ W2) * act'(z) comes from the GEMM's epilogue (gated:
    z = [g | u] and dZ = [dG | dU]), in z's dtype; dW2 and db2 in `dtype` (the weight's)."""
    db2 = grad.sum(0, dtype=torch.float32).to(dtype) if need_db2 else None
    dy_q, dy_scale_inv = _quantize_grad(grad, dy_slot, backend)
    dw2 = dz = None
    if need_dw2:  # dW2 = dY.T @ h: both K-major (K = M, the tokens)
        dw2 = _gemm_q(_transposed(dy_q), dy_scale_inv, _transposed(h_q).t(), h_scale_inv, dtype, backend)
    if need_dz:  # B = W2 [N, H_r], read K-major from its transposed copy W2.T
        dz = _gemm_q(dy_q, dy_scale_inv, _transposed(w2_q).t(), w2_scale_inv, z.dtype, backend, z=z,
                     grad_activation=grad_activation, gated=gated)
    return dz, dw2, db2


def _column_sums(dz, need, dtype):
    return dz.sum(0, dtype=torch.float32).to(dtype) if need else None


# The autograd functions below take only tensors and plain values (the scales as (scale, scale_inv, amax)
# views of the layer's buffers, the e4m3 weights made by the caller), and call only ops: torch.compile
# traces them whole. The scales the backward quantizes its gradients with are read when it runs, through the
# layer's handle (`FP8Scaling.grad_slot`): the next step's update rewrites them, maybe before this backward
# (gradient accumulation, pipeline schedules), and a compiled backward may hold only what the forward saved.
# Those of the forward's x and h are saved as copies.


class _FP8Linear(torch.autograd.Function):
    """out = act(q(x) @ q(W).T + b) (+ b only where `owner`); the backward as the recipe says."""

    @staticmethod
    def forward(ctx, x, weight, bias, w_q, w_scale_inv, x_slot, dy_slot, activation, owner, out_dtype, backend,
                fp8_backward):
        scale, scale_inv, amax = x_slot
        x_q = quantize(x, scale, amax, backend=backend)
        need_grad = any(ctx.needs_input_grad[:3])
        keep = need_grad and activation != IDENTITY
        out, preact = _linear_q(x_q, scale_inv, w_q, w_scale_inv, bias if owner else None, activation, out_dtype,
                                x.dtype if keep else None, None, None, backend)
        ctx.fp8_backward = fp8_backward
        if need_grad:
            if fp8_backward:
                ctx.save_for_backward(x_q, _snapshot(scale_inv), w_q, w_scale_inv, preact)
            else:
                ctx.save_for_backward(x, weight, preact)
        ctx.activation, ctx.dy_slot, ctx.backend, ctx.dtype = activation, dy_slot, backend, weight.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        need_dx, need_dw, need_db = ctx.needs_input_grad[:3]
        grad = grad.contiguous()
        if not ctx.fp8_backward:
            x, weight, preact = ctx.saved_tensors
            dx, dw, db = torch.ops.tpkernels.fused_linear_backward(grad, x, weight, preact, ctx.activation,
                                                                    need_dx, need_dw, need_db)
        else:
            x_q, x_scale_inv, w_q, w_scale_inv, preact = ctx.saved_tensors
            if ctx.activation == IDENTITY:
                dz, db = grad, _column_sums(grad, need_db, ctx.dtype)
            else:  # db from the same pass
                dz, db = custom_ops_fp8.run("fp8_dgelu", grad, preact, ctx.activation, need_db, ctx.backend != "eager")
                db = db.to(ctx.dtype) if need_db else None
            dx, dw = _fp8_dgrad_wgrad(dz, ctx.dy_slot, x_q, x_scale_inv, w_q, w_scale_inv, (need_dx, need_dw),
                                      ctx.dtype, ctx.backend)
        return (dx if need_dx else None, dw if need_dw else None, db if need_db else None) + (None,) * 9


class _FP8MLP(torch.autograd.Function):
    """partial = q(act(q(x) @ q(W1).T + b1)) @ q(W2).T (+ b2 where `owner`): h leaves the column kernel
    in e4m3 and is read in e4m3 by the row kernel. The backward as the recipe says."""

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, w1_q, w1_scale_inv, w2_q, w2_scale_inv, slots, activation, owner, out_dtype,
                backend, fp8_backward):
        (x_scale, x_scale_inv, x_amax), (h_scale, h_scale_inv, h_amax) = slots[:2]
        x_q = quantize(x, x_scale, x_amax, backend=backend)
        need_grad = any(ctx.needs_input_grad[:5])
        h_q, z = _linear_q(x_q, x_scale_inv, w1_q, w1_scale_inv, b1, activation, E4M3, x.dtype if need_grad else None,
                           h_scale, h_amax, backend)
        out, _ = _linear_q(h_q, h_scale_inv, w2_q, w2_scale_inv, b2 if owner else None, IDENTITY, out_dtype, None,
                           None, None, backend)
        ctx.fp8_backward = fp8_backward
        if need_grad:
            saved = (x_q, _snapshot(x_scale_inv), w1_q, w1_scale_inv, w2_q) if fp8_backward else (x, w1, w2)
            ctx.save_for_backward(*saved, w2_scale_inv, h_q, _snapshot(h_scale_inv), z)
        ctx.activation, ctx.slots, ctx.backend, ctx.dtype = activation, slots, backend, w1.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        needs = list(ctx.needs_input_grad[:5])
        need_dx, need_dw1, need_db1, need_dw2, need_db2 = needs
        grad = grad.contiguous()
        rest = (None,) * 10
        if not ctx.fp8_backward:
            x, w1, w2, _, h_q, h_scale_inv, z = ctx.saved_tensors
            h = (h_q.float() * h_scale_inv).to(x.dtype)  # the h the forward's row GEMM read
            grads = torch.ops.tpkernels.mlp_shard_backward(grad, x, w1, w2, h, z, ctx.activation, needs, False)
            return (*(g if need else None for g, need in zip(grads, needs)), *rest)
        x_q, x_scale_inv, w1_q, w1_scale_inv, w2_q, w2_scale_inv, h_q, h_scale_inv, z = ctx.saved_tensors
        dz, dw2, db2 = _fp8_row_backward(grad, ctx.slots[2], h_q, h_scale_inv, w2_q, w2_scale_inv, need_dw2, need_db2,
                                         ctx.dtype, ctx.backend, z=z, grad_activation=ctx.activation,
                                         need_dz=need_dx or need_dw1 or need_db1)
        dx = dw1 = db1 = None
        if dz is not None:
            db1 = _column_sums(dz, need_db1, ctx.dtype)
            dx, dw1 = _fp8_dgrad_wgrad(dz, ctx.slots[3], x_q, x_scale_inv, w1_q, w1_scale_inv, (need_dx, need_dw1),
                                       ctx.dtype, ctx.backend)
        return (dx, dw1, db1, dw2, db2, *rest)


def _merged(gate, up):
    """[gate; up] as one tensor: a view where up lies right after gate in memory (`adjacent`), else a copy
    (always under torch.compile, which cannot trace the addresses)."""
    if not torch.compiler.is_compiling() and adjacent(gate, up):
        return gate.as_strided((2 * gate.shape[0], *gate.shape[1:]), gate.stride())
    return torch.cat([gate, up])


class _FP8GatedMLP(torch.autograd.Function):
    """partial = q(act(x_q @ Wg_q.T + bg) * (x_q @ Wu_q.T + bu)) @ q(W2).T (+ b2 where `owner`): gate and up
    quantized as one [2F, K] tensor (w1_q), h leaving the gated kernel in e4m3. The backward as the recipe
    says."""

    @staticmethod
    def forward(ctx, x, gate, up, gate_bias, up_bias, w2, b2, w1_q, w1_scale_inv, w2_q, w2_scale_inv, slots,
                activation, owner, out_dtype, backend, fp8_backward):
        (x_scale, x_scale_inv, x_amax), (h_scale, h_scale_inv, h_amax) = slots[:2]
        x_q = quantize(x, x_scale, x_amax, backend=backend)
        b1 = None if gate_bias is None else _merged(gate_bias, up_bias)
        need_grad = any(ctx.needs_input_grad[:7])
        h_q, gu = _linear_q(x_q, x_scale_inv, w1_q, w1_scale_inv, b1, activation, E4M3,
                            x.dtype if need_grad else None, h_scale, h_amax, backend, gated=True)
        out, _ = _linear_q(h_q, h_scale_inv, w2_q, w2_scale_inv, b2 if owner else None, IDENTITY, out_dtype, None,
                           None, None, backend)
        ctx.fp8_backward = fp8_backward
        if need_grad:
            saved = (x_q, _snapshot(x_scale_inv), w1_q, w1_scale_inv, w2_q) if fp8_backward else (x, gate, up, w2)
            ctx.save_for_backward(*saved, w2_scale_inv, h_q, _snapshot(h_scale_inv), gu)
        ctx.activation, ctx.slots, ctx.backend = activation, slots, backend
        ctx.features, ctx.dtype = gate.shape[0], gate.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        need_dx, need_dg, need_du, need_dbg, need_dbu, need_dw2, need_db2 = ctx.needs_input_grad[:7]
        features = ctx.features
        grad = grad.contiguous()
        if not ctx.fp8_backward:
            x, gate, up, w2, _, h_q, h_scale_inv, gu = ctx.saved_tensors
            h = (h_q.float() * h_scale_inv).to(x.dtype)  # the h the forward's row GEMM read
            needs = [need_dx, need_dg or need_du, need_dbg or need_dbu, need_dw2, need_db2]
            dx, dw, db, dw2, db2 = torch.ops.tpkernels.glu_mlp_shard_backward(grad, x, gate, up, w2, h, gu,
                                                                            ctx.activation, needs)
        else:
            x_q, x_scale_inv, w1_q, w1_scale_inv, w2_q, w2_scale_inv, h_q, h_scale_inv, gu = ctx.saved_tensors
            # [dG | dU] from the epilogue of dH = dY @ W2
            dgu, dw2, db2 = _fp8_row_backward(grad, ctx.slots[2], h_q, h_scale_inv, w2_q, w2_scale_inv, need_dw2,
                                              need_db2, ctx.dtype, ctx.backend, z=gu, grad_activation=ctx.activation, gated=True,
                                              need_dz=need_dx or need_dg or need_du or need_dbg or need_dbu)
            dx = dw = db = None
            if dgu is not None:
                db = _column_sums(dgu, need_dbg or need_dbu, ctx.dtype)
                dx, dw = _fp8_dgrad_wgrad(dgu, ctx.slots[3], x_q, x_scale_inv, w1_q, w1_scale_inv,
                                          (need_dx, need_dg or need_du), ctx.dtype, ctx.backend)
        dg, du = (None, None) if dw is None else (dw[:features], dw[features:])
        dbg, dbu = (None, None) if db is None else (db[:features], db[features:])
        return (dx if need_dx else None, dg if need_dg else None, du if need_du else None, dbg if need_dbg else None,
                dbu if need_dbu else None, dw2 if need_dw2 else None, db2 if need_db2 else None) + (None,) * 10


def _mlp_slots(scaling):
    """The (scale, scale_inv, amax) of x and h, and the backward's ways to dY's and dZ's (`grad_slot`)."""
    return scaling.slot("x"), scaling.slot("h"), scaling.grad_slot("dy"), scaling.grad_slot("dz")


def _check_out_dtype(name, x, out_dtype):
    if out_dtype not in (None, x.dtype, torch.float32):
        raise TypeError(f"{name}: out_dtype is {out_dtype}; use None (x's dtype, {x.dtype}) or torch.float32")


def fp8_linear(x, weight, bias, scaling, *, name="w", activation=IDENTITY, owner=True, out_dtype=None,
               backend="auto"):
    """act(x @ weight.T + b) with x and the weight in e4m3: x [..., K], weight [N, K] -> [..., N].

    The caller checks shapes and runs `scaling.update` once per step, before the first call.

    Args:
        scaling: the layer's FP8Scaling, with a tensor "x".
        name: the weight's name in scaling's cache.
        activation: the kernels' code (IDENTITY, GELU, GELU_TANH).
        owner: add the bias (a row-parallel layer: rank 0 only).
        out_dtype: None (x's dtype) or torch.float32 (fp32 partials).
        backend: "auto" or "triton" (the kernels where they run, else the eager path), "eager" (the
            unfused path: torch._scaled_mm, then the epilogue in torch ops).
    """
    ops._check_linear("fp8_linear", x, weight, bias)
    _check_out_dtype("fp8_linear", x, out_dtype)
    check_device("fp8_linear", x.device)
    rows = x.reshape(x.shape[:-1].numel(), x.shape[-1])  # an empty shard's x too
    w_q, w_scale_inv = scaling.weight(name, weight, backend)
    out = _FP8Linear.apply(rows, weight, bias, w_q, w_scale_inv, scaling.slot("x"), scaling.grad_slot("dy"), activation,
                           owner, out_dtype or x.dtype, backend, scaling.recipe.backward == "fp8")
    return out.view(*x.shape[:-1], weight.shape[0])


def fp8_mlp_shard(x, w1, b1, w2, b2, scaling, *, activation, owner=True, out_dtype=None, backend="auto"):
    """The MLP's per-rank partial with fp8 x, h and weights: x [..., K], w1 [H_r, K], w2 [N, H_r] -> [..., N].

    Args as `fp8_linear`; scaling has tensors "x" and "h".
    """
    ops._check_linear("fp8_mlp_shard", x, w1, b1)
    ops._check_linear("fp8_mlp_shard", x.new_empty((0, w1.shape[0])), w2, b2)  # w2, b2 against the hidden width
    _check_out_dtype("fp8_mlp_shard", x, out_dtype)
    check_device("fp8_mlp_shard", x.device)
    rows = x.reshape(x.shape[:-1].numel(), x.shape[-1])  # an empty shard's x too
    out = _FP8MLP.apply(rows, w1, b1, w2, b2, *scaling.weight("w1", w1, backend), *scaling.weight("w2", w2, backend),
                        _mlp_slots(scaling), activation, owner, out_dtype or x.dtype, backend,
                        scaling.recipe.backward == "fp8")
    return out.view(*x.shape[:-1], w2.shape[0])


def fp8_glu_mlp_shard(x, gate, up, gate_bias, up_bias, w2, b2, scaling, *, activation, owner=True, out_dtype=None,
                      backend="auto"):
    """The gated MLP's per-rank partial with fp8 x, h and weights: x [..., K], gate and up [F_r, K], w2 [N, F_r]
    -> [..., N]. Gate and up share one scale (quantized as one [2F_r, K] tensor).

    Args as `fp8_mlp_shard`; activation is "silu", "gelu" or "gelu_tanh" (or the kernels' code: SILU, GELU,
    GELU_TANH).
    """
    if isinstance(activation, str):
        activation = ops._gated_activation("fp8_glu_mlp_shard", activation)
    if activation not in ops.GATED_ACTIVATIONS.values() or isinstance(activation, bool):
        raise ValueError(f"fp8_glu_mlp_shard: activation must be one of {', '.join(map(repr, ops.GATED_ACTIVATIONS))} "
                         f"or their codes {sorted(ops.GATED_ACTIVATIONS.values())}, got {activation!r}")
    ops._check_gated("fp8_glu_mlp_shard", x, gate, up, gate_bias, up_bias)
    ops._check_linear("fp8_glu_mlp_shard", x.new_empty((0, gate.shape[0])), w2, b2)
    _check_out_dtype("fp8_glu_mlp_shard", x, out_dtype)
    check_device("fp8_glu_mlp_shard", x.device)
    rows = x.reshape(x.shape[:-1].numel(), x.shape[-1])
    w1 = _merged(gate, up)
    w1_q, w1_scale_inv = scaling.weight("w1", w1, backend, sources=(gate, up))
    out = _FP8GatedMLP.apply(rows, gate, up, gate_bias, up_bias, w2, b2, w1_q, w1_scale_inv,
                             *scaling.weight("w2", w2, backend), _mlp_slots(scaling), activation, owner,
                             out_dtype or x.dtype, backend, scaling.recipe.backward == "fp8")
    return out.view(*x.shape[:-1], w2.shape[0])
