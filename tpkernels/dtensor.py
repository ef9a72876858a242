"""Tensor-parallel parameters held as DTensors on the tensor-parallel mesh, so that PyTorch's engine sees them.

torch.distributed.checkpoint (DCP) keeps one copy of a plain tensor that every rank holds under one name:
plain shards would come back as one rank's shard on every rank. A DTensor says how it is sharded, so DCP
saves each rank's piece at its global offset and reshards on load, the optimizer's state (Adam's moments)
is made in the same layout, and `fully_shard(mesh=mesh["dp"])` (FSDP2) goes on top. This is torchtitan's
route; the kernels run on the local tensor.

Per rank, W ranks, rank r, `shard` = `torch.chunk`'s layout (DTensor's `Shard`):

    ColumnParallelLinear  weight [N_r, K]  Shard(0)    bias [N_r]  Shard(0)
    RowParallelLinear     weight [N, K_r]  Shard(1)    bias [N]    Replicate()  (added once, by rank 0)

Without torch.distributed initialised there is no mesh and parameters are plain tensors (one process:
nothing to collapse).
"""
import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.graph import increment_version
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from tpkernels.distributed import group_of

__all__ = ["DTensor", "is_dtensor", "local", "locals_of", "mesh_of", "parameter", "placement"]

_meshes = {}  # (group, device type) -> the DeviceMesh made for it, so that every layer shares one


def mesh_of(process_group, device):
    """The 1-D DeviceMesh a layer's DTensors live on: the one given, or one over the ProcessGroup (None:
    the default group): a CUDA mesh for an NCCL group (whatever device the layer is built on, so that a
    layer built on the CPU and moved by `.cuda()` keeps a mesh of its kind), else `device`'s type; None
    when torch.distributed is not initialised."""
    if isinstance(process_group, DeviceMesh):
        group_of(process_group)  # checks that it is 1-D
        return process_group
    if not dist.is_available() or not dist.is_initialized():
        return None
    group = group_of(process_group) or dist.group.WORLD
    device = torch.device(device) if device is not None else torch.get_default_device()
    if dist.get_backend(group) == "nccl":
        kind = "cuda"
    else:  # gloo: CPU tensors, or CUDA ones (a meta device is a placeholder until the values arrive)
        kind = "cpu" if device.type == "meta" else device.type
    key = (group, kind)
    if key not in _meshes:
        _meshes[key] = DeviceMesh.from_group(group, kind)
    return _meshes[key]


def placement(shard_dim, kind):
    """The placement of a layer's weight or bias: Shard(0) for a column layer's, Shard(1) for a row
    weight, Replicate for a row bias."""
    if kind == "bias":
        return Shard(0) if shard_dim == 0 else Replicate()
    return Shard(shard_dim)


def parameter(local_tensor, mesh, place, shape, requires_grad=True):
    """nn.Parameter over this rank's `local_tensor` of a tensor of global `shape`: a DTensor on `mesh` with
    `place`, or the tensor itself without a mesh. No collective: every rank's piece must already be its
    `shard` of the global tensor."""
    if mesh is None:
        return nn.Parameter(local_tensor, requires_grad=requires_grad)
    shape = torch.Size(shape)
    stride = tuple(torch.empty(shape, device="meta").stride())
    value = DTensor.from_local(local_tensor, mesh, [place], run_check=False, shape=shape, stride=stride)
    return nn.Parameter(value, requires_grad=requires_grad)


def is_dtensor(t):
    return isinstance(t, DTensor)


def local(t):
    """The local tensor the kernels run on. Without autograd to record (no_grad, inference, or a tensor
    that needs no gradient) it is the DTensor's own local tensor, at no host cost (`to_local()` is an
    autograd function of microseconds, paid per layer on every decode step); else `to_local()`, so that
    the gradient reaches the DTensor parameter in its placement. Plain tensors pass through.

    An in-place op on a DTensor (an optimizer step, `copy_`) moves the DTensor's version counter but not
    its local tensor's, which every cache keyed by version reads (fp8's quantized weights, the CPU's
    packed weights): the local tensor's counter is moved here to catch up first."""
    if type(t) is not DTensor and not isinstance(t, DTensor):  # the exact type first: isinstance costs more
        return t
    return _local(t, torch.compiler.is_compiling(), torch.is_grad_enabled())


def locals_of(*tensors):
    """`local` of each tensor (None passes through), the mode read once for all: a layer's hot path."""
    compiling, grad = torch.compiler.is_compiling(), torch.is_grad_enabled()
    out = []
    for t in tensors:
        out.append(_local(t, compiling, grad) if type(t) is DTensor or isinstance(t, DTensor) else t)
    return out


def _local(t, compiling, grad):
    if compiling:
        return t.to_local()
    inner = t._local_tensor
    version = t._version
    if getattr(t, "_tpkernels_version", 0) != version:
        if not inner.is_inference():
            increment_version(inner)
        t._tpkernels_version = version
    if grad and t.requires_grad:
        return t.to_local()
    return inner
