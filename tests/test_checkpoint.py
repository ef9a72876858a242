"""Checkpoint failures (`tpkernels/checkpoint.py`), on one rank: a load checks every file and tensor before
it changes any parameter, and refuses a truncated or corrupt file, a file the index names that is not
there, a tensor of the wrong shape or kind of dtype, each with a ValueError naming the file and tensor; a
save that fails leaves the old checkpoint byte for byte, loadable, and no temporary behind; a save streams
one tensor at a time to rank 0 into transformers' sharded files. The multi-rank save and load of real
models are in test_parallelize.py."""
import json
import os

import pytest
import torch
from torch import nn

import tpkernels
from tpkernels import checkpoint_files
from tpkernels.checkpoint import load_sharded, save_sharded
from tpkernels.dtensor import local

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
    """A write that fails part way (the second file of a sharded save, or the one file, is half written,
    then the disk is full): the old checkpoint is there byte for byte and loads, a file beside it (a
    tokenizer) too, and no temporary is left; a later save that succeeds replaces the checkpoint and
    keeps the tokenizer."""
    path = tmp_path / "ckpt" if target == "folder" else tmp_path / "ckpt.safetensors"
    save_sharded(_model(0), str(path))
    model_file = path / "model.safetensors" if target == "folder" else path
    if target == "folder":
        (path / "tokenizer.json").write_text("{}")
    old_bytes = model_file.read_bytes()
    real_write = checkpoint_files.write_tensor
    failing_file = "model-00002-of-00002" if target == "folder" else "ckpt.safetensors"

    def fail_part_way(f, tensor):
        if failing_file in f.name:
            f.write(b"\0" * (tensor.numel() * tensor.element_size() // 2))
            raise OSError(28, "No space left on device")
        real_write(f, tensor)

    monkeypatch.setattr(checkpoint_files, "write_tensor", fail_part_way)
    options = dict(max_shard_size=500) if target == "folder" else {}  # two files: 432 and 416 bytes
    with pytest.raises(RuntimeError, match=r"writing .* failed on rank 0 \(OSError.*No space left.*is as it was"):
        save_sharded(_model(2), str(path), **options)
    assert model_file.read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary left
    model = _model(1)
    load_sharded(model, str(path))
    assert _unchanged(model, _snapshot(_model(0)))
    monkeypatch.setattr(checkpoint_files, "write_tensor", real_write)
    written = save_sharded(_model(2), str(path), **options)
    load_sharded(model, str(path))
    assert _unchanged(model, _snapshot(_model(2))) and sorted(os.listdir(tmp_path)) == [path.name]
    if target == "folder":
        assert (path / "tokenizer.json").read_text() == "{}"
        assert sorted(os.listdir(path)) == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                                            "model.safetensors.index.json", "tokenizer.json"], written


def test_a_short_write_that_did_not_raise_is_caught(tmp_path, monkeypatch):
    """Each file's size and header are checked before the move: a file missing bytes never replaces the old one."""
    save_sharded(_model(0), str(tmp_path))
    old_bytes = (tmp_path / "model.safetensors").read_bytes()
    real_write = checkpoint_files.write_tensor
    monkeypatch.setattr(checkpoint_files, "write_tensor", lambda f, t: real_write(f, t) if t.dim() == 2 else None)
    with pytest.raises(RuntimeError, match=r"model\.safetensors is 1072 bytes, its header says 1152"):
        save_sharded(_model(2), str(tmp_path))
    assert (tmp_path / "model.safetensors").read_bytes() == old_bytes


def test_sharded_files_follow_transformers_layout(tmp_path):
    """max_shard_size splits the checkpoint into transformers' files and index, in order, a tensor larger
    than the limit alone in its file; they load back, and sizes parse as transformers writes them."""
    model = _model(0)
    written = save_sharded(model, str(tmp_path / "a"), max_shard_size=400)  # 384 + 48 > 400: four files
    names = [os.path.basename(f) for f in written["files"]]
    assert names == [f"model-0000{i}-of-00004.safetensors" for i in range(1, 5)]
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == {"0.weight": names[0], "0.bias": names[1], "2.weight": names[2], "2.bias": names[3]}
    assert index["metadata"]["total_size"] == (96 + 12 + 96 + 8) * 4
    for file in written["files"]:
        assert os.path.getsize(file) <= 400 + 200  # the tensors' bytes, and a header
    fresh = _model(1)
    load_sharded(fresh, str(tmp_path / "a"))
    assert _unchanged(fresh, _snapshot(model))
    assert written["tensors"] == 4 and written["bytes_gathered"] == 0  # one rank: nothing moves
    assert checkpoint_files.parse_size("5GB") == 5 * 10**9 and checkpoint_files.parse_size("500MiB") == 500 * 2**20
    assert checkpoint_files.parse_size(1234) == 1234 and checkpoint_files.parse_size("1.5KB") == 1500
    for bad in ("5 parsecs", 0, -3, "GB"):
        with pytest.raises(ValueError, match="max_shard_size"):
            save_sharded(model, str(tmp_path / "b"), max_shard_size=bad)
    with pytest.raises(ValueError, match=r"is one file, but .* need 4 files"):
        save_sharded(model, str(tmp_path / "c.safetensors"), max_shard_size=400)
    assert sorted(os.listdir(tmp_path)) == ["a"]


def _failing_save_on_ranks(rank, world_size, folder):
    """Rank 0's write of the second file fails; every rank must raise, none wait in a collective, the old
    checkpoint stays."""
    from tpkernels import checkpoint_files as module

    real_write = module.write_tensor

    def disk_full(f, tensor):
        if "model-00002" in f.name:
            raise OSError(28, "No space left on device")
        real_write(f, tensor)

    module.write_tensor = disk_full  # a spawned process of its own: nothing to restore
    model = _model(2)
    try:
        save_sharded(model, folder, max_shard_size=500)
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


def _failing_shard_on_rank_1(rank, world_size, folder):
    """Rank 1 cannot produce its shard of the second sharded tensor (a device copy failing, say)."""
    from tpkernels import checkpoint as module

    real_wire, calls = module._Gather._wire, []

    def failing(self, t):
        calls.append(t)
        if self.rank == 1 and len(calls) == 2:
            raise RuntimeError("device copy failed")
        return real_wire(self, t)

    module._Gather._wire = failing  # a spawned process of its own: nothing to restore
    try:
        save_sharded(_model(2), folder, max_shard_size=500)
    except RuntimeError as error:
        return str(error)
    return None


@pytest.mark.parametrize("world_size", [2, 3])
def test_a_failure_on_another_rank_raises_on_every_rank(tmp_path, world_size):
    """A rank other than 0 failing mid-save was a hang (rank 0 waiting for its shard); now every rank
    raises, naming the rank, and the old checkpoint stays."""
    from spawn import run_ranks

    folder = tmp_path / "ckpt"
    save_sharded(_model(0), str(folder))
    old_bytes = (folder / "model.safetensors").read_bytes()
    errors = run_ranks(_failing_shard_on_rank_1, world_size, str(folder), timeout=240, collective_timeout=60)
    assert all(e is not None and "failed on rank 1" in e and "device copy failed" in e for e in errors), errors
    assert (folder / "model.safetensors").read_bytes() == old_bytes
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_a_save_is_flushed_to_disk_before_and_after_its_move(tmp_path, monkeypatch):
    """Every file and the staging folder are fsynced before the move into place, the parent after it."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("replace", str(a), str(b))) or real_replace(a, b))
    save_sharded(_model(0), str(tmp_path / "ckpt"), max_shard_size=500)
    moves = [i for i, e in enumerate(events) if e[0] == "replace"]
    synced_before = {e[1] for e in events[:moves[0]] if e[0] == "fsync"}
    staging = events[moves[0]][1]
    assert staging in synced_before and len([p for p in synced_before if p.startswith(staging + "/")]) >= 3
    assert ("fsync", str(tmp_path)) in events[moves[-1]:]


def _streaming_save(rank, world_size, folder):
    """A model whose dense weights are several times max_shard_size: each is a file of its own, gathered
    to rank 0 alone; what each rank held at once and sent, by its own count."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 200), nn.GELU(), nn.Linear(200, 64))
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    tpkernels.parallelize(model)
    shards = {name: local(p).numel() * p.element_size() for name, p in model.named_parameters()}
    written = save_sharded(model, folder, max_shard_size=64 * 200 * 4 // 4)
    return dict(written, shards=shards, dense=dense)


@pytest.mark.parametrize("world_size", [2, 3])
def test_save_streams_one_tensor_at_a_time_to_rank_0(tmp_path, world_size):
    from spawn import run_ranks

    folder = tmp_path / "ckpt"
    results = run_ranks(_streaming_save, world_size, str(folder), timeout=240, collective_timeout=60)
    dense = results[0]["dense"]
    largest_dense = max(t.numel() * t.element_size() for t in dense.values())
    largest_shard = max(max(r["shards"].values()) for r in results)
    assert len(results[0]["files"]) == 4  # each weight alone (12800 bytes > the 3200 limit), each bias alone
    assert results[0]["peak_bytes"] <= largest_dense + largest_shard
    for rank, result in enumerate(results[1:], 1):
        assert result["peak_bytes"] <= largest_shard, (rank, result["peak_bytes"])
        sent = sum(b for name, b in result["shards"].items() if name != "2.bias")  # the row bias is replicated
        assert result["bytes_gathered"] == sent, (rank, result)
    assert results[0]["bytes_gathered"] == sum(r["bytes_gathered"] for r in results[1:])
    fresh = nn.Sequential(nn.Linear(64, 200), nn.GELU(), nn.Linear(200, 64))
    fresh.load_state_dict(safetensors_torch.load_file(results[0]["files"][0]) | {
        k: v for f in results[0]["files"][1:] for k, v in safetensors_torch.load_file(f).items()})
    for name, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, dense[name]), name


def test_fp8_scaling_state_is_neither_saved_nor_required(tmp_path):
    """A layer's fp8 amax history and scales are per rank, not the dense model's: a save leaves them out
    (transformers loads the folder without unexpected keys) and a load keeps the model's own."""
    recipe = tpkernels.FP8Recipe()
    model = _model(0)
    for layer in (model[0], model[2]):
        layer.use_fp8(recipe)
    save_sharded(model, str(tmp_path))
    assert sorted(safetensors_torch.load_file(str(tmp_path / "model.safetensors"))) == \
        ["0.bias", "0.weight", "2.bias", "2.weight"]
    fresh = _model(1)
    fresh[0].use_fp8(recipe)
    fresh[0].fp8_scaling.scale.fill_(7.0)
    load_sharded(fresh, str(tmp_path))
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in _snapshot(_model(0)).items())
    assert fresh[0].fp8_scaling.scale.tolist() == [7.0, 7.0]  # x and dy: untouched
