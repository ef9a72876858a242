"""Checkpoint failures (`tpkernels/checkpoint.py`), on one rank: a load checks every file and tensor before
it changes any parameter, and refuses a truncated or corrupt file, a file the index names that is not
there, a tensor of the wrong shape or kind of dtype, each with a ValueError naming the file and tensor; a
save that fails leaves the old checkpoint byte for byte, loadable, and no temporary behind. The
multi-rank save and load of real models are in test_parallelize.py."""
import json
import os

import pytest
import torch
from torch import nn

import tpkernels
from tpkernels.checkpoint import load_sharded, save_sharded

safetensors_torch = pytest.importorskip("safetensors.torch")


def _model(seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))
    tpkernels.parallelize(model)
    return model


def _snapshot(model):
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def _unchanged(model, snapshot):
    return all(torch.equal(t, snapshot[name]) for name, t in model.state_dict().items())


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "ckpt"
    save_sharded(_model(0), str(folder))
    return folder


def test_a_save_loads_back(saved):
    model = _model(1)
    stats = load_sharded(model, str(saved))
    assert _unchanged(model, _snapshot(_model(0))) and stats["tensors"] == 4
    assert sorted(os.listdir(saved.parent)) == ["ckpt"]  # no temporary left beside it


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_a_damaged_file_is_refused_before_anything_changes(saved, damage):
    file = saved / "model.safetensors"
    size = file.stat().st_size
    if damage == "truncated":
        with open(file, "r+b") as f:
            f.truncate(size - 10)
    else:
        with open(file, "r+b") as f:
            f.write(b"\xff" * 8)
    model = _model(1)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"model\.safetensors cannot be read as safetensors.*truncated, corrupt"):
        load_sharded(model, str(saved))
    assert _unchanged(model, before)


def _write_index(folder, tensors_by_file):
    weight_map = {}
    for file, tensors in tensors_by_file.items():
        if tensors is not None:
            safetensors_torch.save_file(tensors, str(folder / file))
        weight_map.update({name: file for name in (tensors or {"2.bias": None})})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_a_file_the_index_names_must_be_there(tmp_path):
    state = _model(0).state_dict()
    _write_index(tmp_path, {"model-00001-of-00002.safetensors": {k: v for k, v in state.items() if k != "2.bias"},
                            "model-00002-of-00002.safetensors": None})
    model = _model(1)
    before = _snapshot(model)
    with pytest.raises(ValueError, match=r"names 1 file\(s\) that are not there: .*model-00002-of-00002"
                                         r"\.safetensors \(holding 2\.bias\)"):
        load_sharded(model, str(tmp_path))
    assert _unchanged(model, before)


@pytest.mark.parametrize("fault", ["shape", "dtype", "missing tensor"])
def test_a_wrong_tensor_is_refused_before_anything_changes(tmp_path, fault):
    """The fault sits in the last tensor the load reaches, so a load that copied as it went would have
    changed the others first."""
    state = {k: v.clone() for k, v in _model(0).state_dict().items()}
    if fault == "shape":
        state["2.bias"] = torch.randn(9)
    elif fault == "dtype":
        state["2.bias"] = torch.arange(8, dtype=torch.int32)
    else:
        del state["2.bias"]
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    model = _model(1)
    before = _snapshot(model)
    message = {"shape": r"2\.bias in .*model\.safetensors is \(9,\), which gives \(9,\) here, but the model's "
                        r"2\.bias is \(8,\)",
               "dtype": r"2\.bias in .*model\.safetensors is I32, but the model's 2\.bias is torch\.float32",
               "missing tensor": r"lacks 1 of the model's tensors: 2\.bias"}[fault]
    with pytest.raises(ValueError, match=message):
        load_sharded(model, str(tmp_path))
    assert _unchanged(model, before)


def test_floating_tensors_are_cast_as_transformers_does(tmp_path):
    state = {k: v.to(torch.bfloat16) for k, v in _model(0).state_dict().items()}
    safetensors_torch.save_file(state, str(tmp_path / "model.safetensors"))
    model = _model(1)
    load_sharded(model, str(tmp_path))
    assert all(torch.equal(t, state[name].float()) for name, t in model.state_dict().items())


@pytest.mark.parametrize("target", ["folder", "file"])
def test_a_failed_save_loses_nothing(tmp_path, target, monkeypatch):
    """A write that fails part way (here the file is half written, then the disk is full): the old
    checkpoint is there byte for byte and loads, a file beside it (a tokenizer) too, and no temporary is
    left; a later save that succeeds replaces the checkpoint and keeps the tokenizer."""
    path = tmp_path / "ckpt" if target == "folder" else tmp_path / "ckpt.safetensors"
    save_sharded(_model(0), str(path))
    model_file = path / "model.safetensors" if target == "folder" else path
    if target == "folder":
        (path / "tokenizer.json").write_text("{}")
    old_bytes = model_file.read_bytes()
    real_save = safetensors_torch.save_file

    def fail_part_way(tensors, file, metadata=None):
        real_save(tensors, file, metadata=metadata)
        with open(file, "r+b") as f:
            f.truncate(os.path.getsize(file) // 2)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_torch, "save_file", fail_part_way)
    with pytest.raises(RuntimeError, match=r"writing .* failed on rank 0 \(OSError.*No space left.*is as it was"):
        save_sharded(_model(2), str(path))
    assert model_file.read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary left
    model = _model(1)
    load_sharded(model, str(path))
    assert _unchanged(model, _snapshot(_model(0)))
    monkeypatch.setattr(safetensors_torch, "save_file", real_save)
    save_sharded(_model(2), str(path))
    load_sharded(model, str(path))
    assert _unchanged(model, _snapshot(_model(2))) and sorted(os.listdir(tmp_path)) == [path.name]
    if target == "folder":
        assert (path / "tokenizer.json").read_text() == "{}"


def test_a_short_write_that_did_not_raise_is_caught(tmp_path, monkeypatch):
    """The header is read back before the move: a file missing a tensor never replaces the old one."""
    save_sharded(_model(0), str(tmp_path))
    old_bytes = (tmp_path / "model.safetensors").read_bytes()
    real_save = safetensors_torch.save_file
    monkeypatch.setattr(safetensors_torch, "save_file",
                        lambda tensors, file, metadata=None: real_save(dict(list(tensors.items())[:-1]), file))
    with pytest.raises(RuntimeError, match="holds 3 tensors, 4 were written"):
        save_sharded(_model(2), str(tmp_path))
    assert (tmp_path / "model.safetensors").read_bytes() == old_bytes


def _failing_save_on_ranks(rank, world_size, folder):
    """Rank 0's write fails; every rank must raise, none wait in a collective, the old checkpoint stays."""
    import safetensors.torch

    def disk_full(tensors, file, metadata=None):
        raise OSError(28, "No space left on device")

    safetensors.torch.save_file = disk_full  # a spawned process of its own: nothing to restore
    model = _model(2)
    try:
        save_sharded(model, folder)
    except RuntimeError as error:
        return str(error)
    return None


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_failed_save_raises_on_every_rank(tmp_path, world_size):
    from spawn import run_ranks

    folder = tmp_path / "ckpt"
    save_sharded(_model(0), str(folder))
    old_bytes = (folder / "model.safetensors").read_bytes()
    errors = run_ranks(_failing_save_on_ranks, world_size, str(folder), timeout=240, collective_timeout=60)
    assert len(errors) == world_size
    assert all(e is not None and "failed on rank 0" in e and "No space left" in e for e in errors), errors
    assert (folder / "model.safetensors").read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
