"""Bound launches, the hot path: after a launch key's first call (the full path in `launch`), later
calls of the key go straight to the compiled kernel's launcher with the arguments that first call
computed. The split-K kernel's workspace, which every split-K call takes, is `workspace`'s.

A launch key (`launch_key`) holds everything the first call's choices and triton's specialization read:
device, dtypes, shapes, strides, the low bits of every pointer, the epilogue, the block's kernel and
config settings, TF32, and whether the residual is c itself.
"""
import torch
from triton import knobs
from triton.tools.tensor_descriptor import TensorDescriptor

from tpkernels.kernels import INTERPRETED
from tpkernels.workspace import splitk_workspace
from tpkernels.settings import MATMUL_KERNEL, PINNED_CONFIG, RECORDED, SPLITK_ORDER

__all__ = ["BOUND", "Bound", "BoundElementwise", "BoundTMA", "bind", "bind_elementwise", "elementwise_key", "launch_key"]


# Launch key -> Bound: a bound launch is exactly what the full path would launch again for its key.
BOUND = {}
BOUND_LIMIT = 4096  # past this many keys (say, many distinct prefill lengths) the table starts over


def _operand_key(t):
    return None if t is None else (t.dtype, t.stride(), t.data_ptr() & 15)


def launch_key(a, b, b_shape, b_stride, c, bias, residual, preact, z, activation, grad_activation, scales=None):
    """What a launch's choices depend on: device, dtypes, shapes, strides, the low bits of every pointer
    (triton specializes on 16-byte alignment), the epilogue, the block's kernel and config settings, TF32,
    and whether the residual is c itself. 64-bit offsets follow from shapes and strides; the bias is
    always contiguous (the callers make it so)."""
    return (a.device, a.dtype, b.dtype, c.dtype, a.shape, b_shape, a.stride(), b_stride, c.stride(),
            a.data_ptr() & 15, b.data_ptr() & 15, c.data_ptr() & 15,
            None if bias is None else (bias.dtype, bias.data_ptr() & 15),
            None if residual is None else (_operand_key(residual),
                                           residual.untyped_storage().data_ptr() == c.untyped_storage().data_ptr()),
            _operand_key(preact), _operand_key(z), activation, grad_activation, MATMUL_KERNEL.get(),
            PINNED_CONFIG.get(), SPLITK_ORDER.get(), a.is_cuda and allow_tf32(),
            None if scales is None else tuple(None if s is None else s.data_ptr() & 15 for s in scales))


def allow_tf32():
    """torch.backends.cuda.matmul.allow_tf32, read without its wrapper (once per call on the hot path)."""
    getter = getattr(torch._C, "_get_cublas_allow_tf32", None)
    return getter() if getter is not None else torch.backends.cuda.matmul.allow_tf32


class _InterpretedLauncher:
    """A compiled launcher's call signature over an interpreted kernel: what the bound path calls on the
    CPU under TRITON_INTERPRET=1."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __call__(self, grid_0, grid_1, grid_2, stream, function, packed_metadata, launch_metadata, enter_hook,
                 exit_hook, *args):
        self.kernel[(grid_0, grid_1, grid_2)](*args)


class Bound:
    """One launch key's kernel: its launcher, grid, and every argument that is not an operand (sizes,
    strides, constexprs), in the kernel's order."""

    __slots__ = ("compiled", "launcher", "function", "packed_metadata", "grid", "tail", "device", "device_index",
                 "workspace", "record")

    def __init__(self, compiled, launcher, device, grid, tail, workspace, record):
        self.compiled = compiled
        self.launcher = launcher
        self.function = None if compiled is None else compiled.function
        self.packed_metadata = None if compiled is None else compiled.packed_metadata
        self.grid = (*grid, 1, 1)[:3]
        self.tail = tail
        self.device = device
        self.device_index = device.index if device.type == "cuda" else None
        self.workspace = workspace
        self.record = record

    def __call__(self, a, b, c, bias, residual, preact, z, scales=None, *, c_tensor=None):
        filler = c if c_tensor is None else c_tensor  # absent epilogue operands are passed as c (a tensor)
        operands = (a, b, c, filler if bias is None else bias, filler if residual is None else residual,
                    filler if preact is None else preact, filler if z is None else z)
        if scales is None:
            operands += (filler,) * 4
        else:
            operands += tuple(filler if s is None else s for s in scales)
        if self.workspace is None:
            return self._run(operands)
        return self._run(operands, lambda stream: splitk_workspace(self.device, *self.workspace, stream=stream))

    def _run(self, operands, more=None):
        """Launch with `operands` (then `more(stream)`'s, then the tail) on the current stream of the launch's
        device, made current for the call where another is; recorded as the first call was."""
        if self.device_index is None:
            stream = 0
        elif torch._C._cuda_getDevice() != self.device_index:
            with torch.cuda.device(self.device_index):
                return self._run(operands, more)
        else:
            stream = torch._C._cuda_getCurrentRawStream(self.device_index)
        args = operands + (() if more is None else more(stream)) + self.tail
        enter_hook = knobs.runtime.launch_enter_hook
        # A profiler's hooks (proton) get triton's launch metadata; with none installed, it is never read.
        metadata = None
        if self.compiled is not None and enter_hook is not None and getattr(enter_hook, "calls", True):
            metadata = self.compiled.launch_metadata(self.grid, stream, *args)
        self.launcher(*self.grid, stream, self.function, self.packed_metadata, metadata, enter_hook,
                      knobs.runtime.launch_exit_hook, *args)
        launches = RECORDED.get()
        if launches is not None:
            launches.append(self.record)


class BoundTMA(Bound):
    """A bound launch of the persistent TMA kernel: its first three arguments are descriptors of a, b and
    c. Their shapes, strides and block shapes are the first call's (the key fixes the views, the first
    call's config the blocks); each call makes them over its own operands, since a descriptor holds its
    tensor (a cached one would keep a freed model's weight, or an old activation, alive). Only the data
    pointer of the tensor passed is read, so b may be the weight itself or its transposed view."""

    __slots__ = ("layouts",)

    def __init__(self, compiled, launcher, device, grid, tail, record, descriptors):
        super().__init__(compiled, launcher, device, grid, tail, None, record)
        self.layouts = tuple((list(d.shape), list(d.strides), list(d.block_shape)) for d in descriptors)

    def __call__(self, a, b, c, bias, residual, preact, z, scales=None):
        a_layout, b_layout, c_layout = self.layouts
        return Bound.__call__(self, TensorDescriptor(a, *a_layout), TensorDescriptor(b, *b_layout),
                              TensorDescriptor(c, *c_layout), bias, residual, preact, z, scales, c_tensor=c)


def _launcher(kernel, compiled):
    """(what a bound launch calls, the compiled kernel): the compiled kernel's own launcher, or under the
    interpreter a call of the kernel; (None, None) where nothing was compiled to bind."""
    if INTERPRETED:
        return _InterpretedLauncher(kernel), None
    if compiled is None or not hasattr(compiled, "packed_metadata"):
        return None, None
    return compiled.run, compiled


def bind(kernel, compiled, device, grid, args, meta, config, record, workspace=None, descriptors=None):
    """The bound launch of a first call, or None where there is nothing to bind (a stubbed kernel).
    `descriptors`: for the TMA kernel, the first call's descriptors of a, b and c."""
    names = getattr(kernel, "arg_names", None)
    if names is None:  # a stand-in for the kernel (a test's spy): nothing to bind
        return None
    operands = 13 if workspace is not None else 11
    values = dict(zip(names, args), **meta, **config.kwargs())
    tail = tuple(values[name] for name in names[operands:])
    launcher, compiled = _launcher(kernel, compiled)
    if launcher is None:
        return None
    if descriptors is not None:
        return BoundTMA(compiled, launcher, device, grid, tail, record, descriptors)
    return Bound(compiled, launcher, device, grid, tail, workspace, record)


class BoundElementwise(Bound):
    """A bound launch of a one-config kernel beside the GEMMs (the dGELU pass, fp8's quantize and scale
    update): its tensor operands first, then the sizes, strides and constexprs its key fixes."""

    __slots__ = ()

    def __call__(self, *tensors):
        self._run(tensors)


def elementwise_key(kernel, device, grid, tensors, scalars, meta):
    """What a one-config kernel's launch depends on: the kernel, device and grid, every tensor's dtype,
    strides and pointer alignment, and the scalars and constexprs."""
    return (kernel, device, grid, tuple(_operand_key(t) for t in tensors), scalars, tuple(meta.items()))


def bind_elementwise(kernel, compiled, device, grid, tensors, scalars, meta, record):
    """The bound launch of a one-config kernel's first call, or None where there is nothing to bind."""
    names = getattr(kernel, "arg_names", None)
    if names is None:
        return None
    values = dict(zip(names, tensors + scalars), **meta)
    tail = tuple(values[name] for name in names[len(tensors):])
    launcher, compiled = _launcher(kernel, compiled)
    if launcher is None:
        return None
    return BoundElementwise(compiled, launcher, device, grid, tail, None, record)
