"""The layers inside PyTorch's distributed engine (`tpkernels/dtensor.py`): DTensor parameters on the
tensor-parallel mesh, so that torch.distributed.checkpoint (DCP) saves at one world size and loads at
another, the model and Adam's state exactly, then trains on as the dense model does; FSDP2 on the dp
dimension over the layers on tp (dp 2 x tp 2), its checkpoint resumed on dp 2 x tp 2 and on tp 2 alone;
a parallelized transformers model through DCP; a DeviceMesh wherever a process group is taken; and the
fp8 scaling state saved as the group's max. The net holds a gated MLP too: its gate and up are each their
own Shard(0) DTensor, so a resharded checkpoint pairs every gate feature with its own up feature.

Every phase runs in its own spawn (a world size is a set of processes), the checkpoint in a folder the
test owns; the dense model trains in the test process on the same data."""
import os

import pytest
import torch
from torch import nn

from spawn import run_ranks
from tpkernels import ColumnParallelLinear, FP8Recipe, RowParallelLinear, TensorParallelGatedMLP, TensorParallelMLP
from tpkernels import distributed as tpd
from tpkernels.dtensor import local

IN, HIDDEN, MID, OUT = 6, 10, 9, 6  # 10 and 9 split unevenly over 3 and 4 ranks (torch.chunk: 4, 4, 2)
GATED = 7  # the gated MLP's hidden width: 3, 3, 1 on 3 ranks
ROWS = 8  # the global batch
LR = 1e-2


class Net(nn.Module):
    """Every layer kind: the MLP (one op for both shards), the gated MLP, then a column layer with GELU and a
    row layer."""

    def __init__(self, process_group=None, device=None, fp8=None):
        super().__init__()
        options = dict(process_group=process_group, device=device)
        self.mlp = TensorParallelMLP(IN, HIDDEN, OUT, **options, fp8=fp8)
        self.gated = TensorParallelGatedMLP(OUT, GATED, OUT, bias=True, **options)
        self.up = ColumnParallelLinear(OUT, MID, activation="gelu", **options)
        self.down = RowParallelLinear(MID, OUT, **options)

    def forward(self, x):
        return self.down(self.up(self.gated(self.mlp(x))))


def _dense():
    from tpkernels import reference

    torch.manual_seed(0)
    mlp = reference.MLP(IN, HIDDEN, OUT)
    gated = reference.GatedMLP(OUT, GATED, OUT, bias=True)
    return nn.ModuleDict(dict(mlp=mlp, gated=gated, up=nn.Linear(OUT, MID), down=nn.Linear(MID, OUT)))


def _dense_forward(dense, x):
    h = dense["gated"](dense["mlp"](x))
    return dense["down"](torch.nn.functional.gelu(dense["up"](h)))


def _batch(step, device="cpu"):
    generator = torch.Generator().manual_seed(100 + step)  # the same on every rank
    x = torch.randn(ROWS, IN, generator=generator)
    target = torch.randn(ROWS, OUT, generator=generator)
    return x.to(device), target.to(device)


def _loss(y, target):
    return ((y - target) ** 2).sum() / ROWS


def _dense_run(steps):
    """The dense model after `steps` Adam steps on the global batches: {name: tensor}."""
    dense = _dense()
    opt = torch.optim.Adam(dense.parameters(), lr=LR)
    for step in range(steps):
        x, target = _batch(step)
        opt.zero_grad()
        _loss(_dense_forward(dense, x), target).backward()
        opt.step()
    return {k: v.detach().clone() for k, v in dense.state_dict().items()}


def _full(model):
    """The dense state dict of a Net (a collective): fc names as the dense ModuleDict's."""
    state = {f"mlp.{k}": v for k, v in model.mlp.full_state_dict().items()}
    state.update({f"gated.{k}": v for k, v in model.gated.full_state_dict().items()})
    for name in ("up", "down"):
        state.update({f"{name}.{k}": v for k, v in getattr(model, name).full_state_dict().items()})
    return {k: v.detach().cpu() for k, v in state.items()}  # copies: full_state_dict's own


def _full_optimizer(model, opt):
    """Adam's moments of every parameter, gathered dense (a collective), by parameter name."""
    out = {}
    for name, param in model.named_parameters():
        for key in ("exp_avg", "exp_avg_sq"):
            value = opt.state[param][key]
            out[f"{name}.{key}"] = (value.full_tensor() if hasattr(value, "full_tensor") else value).cpu()
        out[f"{name}.step"] = opt.state[param]["step"].cpu()
    return out


def _train(model, opt, first, last, device):
    for step in range(first, last):
        x, target = _batch(step, device)
        opt.zero_grad()
        _loss(model(x), target).backward()
        opt.step()


def _build(device, mesh_shape=None):
    """(model, optimizer, tp mesh or None): a Net on the default group, or on mesh["tp"] of a 2-D mesh
    with FSDP2 over mesh["dp"] (torchtitan's order: tensor parallel first)."""
    torch.manual_seed(0)
    if mesh_shape is None:
        model = Net(device=device)
        return model, torch.optim.Adam(model.parameters(), lr=LR), None
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device, mesh_shape, mesh_dim_names=("dp", "tp"))
    model = Net(process_group=mesh["tp"], device=device)
    for layer in (model.mlp, model.gated, model.up, model.down):
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model, torch.optim.Adam(model.parameters(), lr=LR), mesh


def _dp_rows(mesh):
    """This rank's rows of the global batch: its dp slice, the same on every tp rank."""
    if mesh is None:
        return slice(None)
    dp, rank = mesh["dp"].size(), mesh["dp"].get_local_rank()
    return slice(rank * ROWS // dp, (rank + 1) * ROWS // dp)


def _train_dp(model, opt, first, last, device, mesh):
    rows = _dp_rows(mesh)
    for step in range(first, last):
        x, target = _batch(step, device)
        opt.zero_grad()
        y = model(x[rows])
        # FSDP2 averages the gradients over dp: each dp rank's loss is its rows' share of the mean
        (((y - target[rows]) ** 2).sum() / (ROWS if mesh is None else ROWS // mesh["dp"].size())).backward()
        opt.step()


def _state(model, opt):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    return {"model": model_state, "optim": optim_state}


def phase(rank, world, folder, device, mesh_shape, load, steps_before, steps_after):
    """Build, then load the checkpoint in `folder` (if `load`, checking it against the dense copy the
    saving phase wrote), train, save a new checkpoint and its dense copy. Returns the dense state after."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model, opt, mesh = _build(device, mesh_shape)
    if load:
        # get_state_dict makes Adam's state (a step on zero gradients) so that the loaded moments have a
        # place; the load then overwrites all of it, its step count included
        state = _state(model, opt)
        for key, value in state["model"].items():
            assert type(value).__name__ == "DTensor", f"{key} is a {type(value).__name__}: DCP would keep one copy"
        dcp.load(state, checkpoint_id=os.path.join(folder, "dcp"))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
        saved = torch.load(os.path.join(folder, "dense.pt"))
        for what, got in (("model", _full(model)), ("optim", _full_optimizer(model, opt))):
            for key, value in saved[what].items():
                assert torch.equal(got[key], value), f"{key} after the load differs from the save: " \
                    f"{(got[key].double() - value.double()).abs().max().item()}"
    if mesh is not None:  # the dense checkpoint's gather assumes tensor-parallel pieces: refused, with the way
        import tpkernels

        with pytest.raises(ValueError, match="2-D mesh .* torch.distributed.checkpoint"):
            tpkernels.save_sharded(model, os.path.join(folder, "hf"))
    _train_dp(model, opt, steps_before, steps_before + steps_after, device, mesh)
    dcp.save(_state(model, opt), checkpoint_id=os.path.join(folder, "dcp"))
    dense = {"model": _full(model), "optim": _full_optimizer(model, opt)}
    if rank == 0:
        torch.save(dense, os.path.join(folder, "dense.pt"))
    torch.distributed.barrier()
    return dense["model"]


def _check_against_dense(got, steps, what):
    for key, expected in _dense_run(steps).items():
        torch.testing.assert_close(got[key], expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{what}: {key}: {m}")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_dcp_reshards_the_model_and_adam_2_to_3_to_1(tmp_path, device):
    # 2 ranks train 2 steps and save; 3 ranks load (exactly what was saved: weights and Adam's moments),
    # train 2 more and save; 1 rank loads and trains 2 more: the dense model's 6 steps throughout
    for world, load, first in ((2, False, 0), (3, True, 2), (1, True, 4)):
        got = run_ranks(phase, world, str(tmp_path), device, None, load, first, 2)
        for other in got[1:]:
            assert all(torch.equal(other[k], v) for k, v in got[0].items())
        _check_against_dense(got[0], first + 2, f"{world} ranks, steps {first} to {first + 2}")


def test_fsdp2_over_tensor_parallel_trains_as_dense_and_resumes_on_2x2_and_tp_2(tmp_path):
    # dp 2 x tp 2 trains 3 Adam steps, each dp rank on its half of the global batch, and saves
    got = run_ranks(phase, 4, str(tmp_path), "cpu", (2, 2), False, 0, 3)
    _check_against_dense(got[0], 3, "dp 2 x tp 2")
    # resumed on dp 2 x tp 2 (the load checked exactly), one more step
    got = run_ranks(phase, 4, str(tmp_path), "cpu", (2, 2), True, 3, 1)
    _check_against_dense(got[0], 4, "dp 2 x tp 2 resumed")
    # and on tp 2 alone, without FSDP, one more step
    got = run_ranks(phase, 2, str(tmp_path), "cpu", None, True, 4, 1)
    _check_against_dense(got[0], 5, "tp 2 resumed")


def meshes_and_fp8(rank, world, folder):
    """A 1-D DeviceMesh wherever a process group goes, and fp8 scaling state saved as the group's max."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh

    import tpkernels

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(IN, HIDDEN), nn.GELU(), nn.Linear(HIDDEN, OUT))
    by_group = TensorParallelMLP.from_dense(dense[0], dense[2])
    by_mesh = TensorParallelMLP.from_dense(dense[0], dense[2], process_group=mesh)
    assert by_mesh.fc1.weight.device_mesh is mesh  # the mesh given, kept (FSDP2 finds its parent)
    x = torch.randn(3, IN, generator=torch.Generator().manual_seed(1))
    assert torch.equal(by_mesh(x), by_group(x))
    report = tpkernels.parallelize(dense, mesh["tp"])
    assert len(report.replaced) == 1 and dense[0].weight.device_mesh is mesh
    tpkernels.save_sharded(dense, os.path.join(folder, "hf"), mesh)
    with pytest.raises(ValueError, match="a 1-D DeviceMesh"):
        TensorParallelMLP(IN, HIDDEN, process_group=init_device_mesh("cpu", (1, world)))

    # fp8: each rank's h differs, so its amax does; the state dict holds the group's max on every rank
    # (plain tensors, the same everywhere: what DCP keeps once), and a load at another size takes it
    mlp = TensorParallelMLP(IN, HIDDEN, OUT, fp8=FP8Recipe(amax_history_len=4))
    for step in range(2):
        mlp(torch.randn(4, IN, generator=torch.Generator().manual_seed(step))).sum().backward()
    live = mlp.fp8_scaling.amax_history.clone()
    state = mlp.state_dict()
    history = state["fp8_scaling.amax_history"]
    gathered = [torch.empty_like(live) for _ in range(world)]
    torch.distributed.all_gather(gathered, live)
    assert torch.equal(history, torch.stack(gathered).amax(0)) and torch.equal(mlp.fp8_scaling.amax_history, live)
    assert torch.equal(state["fp8_scaling.scale"], torch.stack(
        [s for s in _all(mlp.fp8_scaling.scale, world)]).amin(0))
    dcp.save({"model": state}, checkpoint_id=os.path.join(folder, "fp8"))
    return history


def _all(t, world):
    out = [torch.empty_like(t) for _ in range(world)]
    torch.distributed.all_gather(out, t)
    return out


def fp8_load(rank, world, folder, history):
    import torch.distributed.checkpoint as dcp

    mlp = TensorParallelMLP(IN, HIDDEN, OUT, fp8=FP8Recipe(amax_history_len=4))
    state = {"model": mlp.state_dict()}
    dcp.load(state, checkpoint_id=os.path.join(folder, "fp8"))
    mlp.load_state_dict(state["model"])
    assert torch.equal(mlp.fp8_scaling.amax_history, history)
    return "ok"


def test_device_mesh_everywhere_and_fp8_state_through_dcp(tmp_path):
    histories = run_ranks(meshes_and_fp8, 2, str(tmp_path))
    assert torch.equal(histories[0], histories[1]) and histories[0].abs().sum() > 0
    assert run_ranks(fp8_load, 3, str(tmp_path), histories[0]) == ["ok"] * 3


def transformers_phase(rank, world, folder, save):
    """A parallelized GPT-2 through DCP: saved at one world size, loaded at another, equal to the dense."""
    import torch.distributed.checkpoint as dcp
    import transformers
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    import tpkernels

    config = transformers.GPT2Config(n_embd=16, n_layer=2, n_head=2, n_inner=40, vocab_size=50, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0 if save else 1)  # the loading side starts from other weights
    model = transformers.GPT2LMHeadModel(config)
    dense_logits = model(input_ids=torch.arange(12).view(2, 6)).logits
    report = tpkernels.parallelize(model)
    assert len(report.replaced) == 2, report
    state = get_model_state_dict(model)
    sharded = [k for k, v in state.items() if type(v).__name__ == "DTensor"]
    assert len(sharded) == 2 * 4, sharded  # c_fc and c_proj weight and bias, in two blocks
    if save:
        dcp.save(state, checkpoint_id=os.path.join(folder, "gpt2"))
        return dense_logits
    dcp.load(state, checkpoint_id=os.path.join(folder, "gpt2"))
    set_model_state_dict(model, state)
    return model(input_ids=torch.arange(12).view(2, 6)).logits.detach()


def test_a_parallelized_transformers_model_through_dcp(tmp_path):
    pytest.importorskip("transformers")
    saved = run_ranks(transformers_phase, 2, str(tmp_path), True)
    loaded = run_ranks(transformers_phase, 3, str(tmp_path), False)
    for logits in loaded:
        torch.testing.assert_close(logits, saved[0].detach(), rtol=1e-5, atol=1e-5)


def test_shards_follow_dtensor_layout():
    assert tpd.shard_sizes(HIDDEN, 3) == [4, 4, 2] and tpd.shard_sizes(MID, 4) == [3, 3, 3, 0]
    layer = ColumnParallelLinear(IN, HIDDEN)  # no torch.distributed: plain parameters, one process
    assert type(layer.weight) is nn.Parameter and local(layer.weight) is layer.weight
