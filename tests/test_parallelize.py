"""parallelize, load_sharded and save_sharded on real `transformers` model code (GPT-2 with Conv1D,
GPT-NeoX, BERT with its MLP split across two sibling modules), built from small random configs, on 1 to
3 gloo ranks: logits, every parameter's gradient and one SGD step against the dense model, a save that
`transformers` loads, and a sharded load that reads about 1/W of the MLP weights. The gated families
(Llama, Mistral, Qwen2, Gemma, Phi-3 with its merged gate_up_proj) the same way, their blocks replaced
whole. Plus blocks the search must leave alone (gated look-alikes among them), and a plan."""
import copy
import os
import shutil
import tempfile

import pytest
import torch
from torch import nn

from numerics import assert_close_to_ref
from spawn import check_scenario, rank_setups, scenario_outcomes
from tpkernels import ColumnParallelLinear, RowParallelLinear, TensorParallelGatedMLP, empty_parameters, parallelize
from tpkernels import custom_ops_gated
from tpkernels.checkpoint import shard_slice, load_sharded, save_sharded
from tpkernels.dtensor import local

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

WORLD_SIZES = [1, 2, 3]
HIDDEN, FFN, LAYERS, VOCAB = 16, 40, 2, 50  # 40 splits unevenly over 3 ranks
LR = 0.1


def _families():
    t = transformers
    quiet = dict(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return {
        "gpt2": (t.GPT2LMHeadModel, t.GPT2Config(n_embd=HIDDEN, n_layer=LAYERS, n_head=2, n_inner=FFN,
                                                 vocab_size=VOCAB, n_positions=32, resid_pdrop=0.0,
                                                 embd_pdrop=0.0, attn_pdrop=0.0, **quiet)),
        "gpt_neox": (t.GPTNeoXForCausalLM, t.GPTNeoXConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                                           num_attention_heads=2, intermediate_size=FFN,
                                                           vocab_size=VOCAB, max_position_embeddings=32, **quiet)),
        "bert": (t.BertForMaskedLM, t.BertConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                                                 intermediate_size=FFN, vocab_size=VOCAB, max_position_embeddings=32,
                                                 hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **quiet)),
    }


def _gated_families():
    t = transformers
    common = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS, num_attention_heads=2,
                  num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=32, bos_token_id=0,
                  eos_token_id=0, pad_token_id=0)
    return {
        "llama": (t.LlamaForCausalLM, t.LlamaConfig(**common), "silu"),
        "mistral": (t.MistralForCausalLM, t.MistralConfig(**common), "silu"),
        "qwen2": (t.Qwen2ForCausalLM, t.Qwen2Config(**common), "silu"),
        "gemma": (t.GemmaForCausalLM, t.GemmaConfig(head_dim=8, **common), "gelu_tanh"),
        "phi3": (t.Phi3ForCausalLM, t.Phi3Config(**common), "silu"),
    }


def _logits(model, ids):
    return model(input_ids=ids).logits


def _layers(model):
    return {path: m for path, m in model.named_modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))}


def _dense_part(tp_model, name, dense_tensor):
    """The part of a dense model's tensor that tp_model's parameter `name` holds (its shard, in the
    tensor-parallel layer's [out, in] layout), or the whole tensor for a replicated one."""
    path, _, kind = name.rpartition(".")
    layer = _layers(tp_model).get(path)
    if layer is None:
        return dense_tensor
    part = dense_tensor[shard_slice(layer, kind, dense_tensor.shape)]
    return part.t() if kind == "weight" and layer.checkpoint_transposed else part


def _shared_dir(world, name):
    # the same folder on every rank: spawned by one parent
    return os.path.join(tempfile.gettempdir(), f"tpkernels-parallelize-{os.getppid()}-{world}-{name}")


def _logits_step(tp, dense, family, device, seed):
    """The parallelized model's logits against the dense one's and an fp64 copy's (the 2x-eager rule), then
    one backward of each with the same gradient; returns the fp64 copy and the input ids."""
    dense64 = copy.deepcopy(dense).double()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed), device="cpu").to(device)
    out, eager, ref = _logits(tp, ids), _logits(dense, ids), _logits(dense64, ids)
    assert_close_to_ref(out, eager, ref, f"{family} logits")
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1), device="cpu").to(device)
    out.backward(grad)
    eager.backward(grad)
    ref.backward(grad.double())
    return dense64, ids


def real_models(rank, world):
    torch.manual_seed(0)
    device = torch.get_default_device()  # CUDA in the gloo-cuda and nccl setups
    read = {}
    for family, (cls, config) in _families().items():
        torch.manual_seed(1)
        dense = cls(config)
        tp = copy.deepcopy(dense)
        report = parallelize(tp)
        assert len(report.replaced) == LAYERS and not report.left_alone, str(report)
        assert not any(isinstance(m, (nn.Linear,)) and m.out_features == FFN for m in tp.modules())
        dense64, ids = _logits_step(tp, dense, family, device, seed=2)
        models = (tp, dense, dense64)
        for what in ("grad", "after SGD"):
            if what == "after SGD":
                for model in models:
                    torch.optim.SGD(model.parameters(), lr=LR).step()
            params = [dict(m.named_parameters()) for m in models]
            assert params[0].keys() == params[1].keys()
            for name, p in params[0].items():
                pick = (lambda t: local(t.grad)) if what == "grad" else (lambda t: local(t.detach()))
                assert_close_to_ref(pick(p), _dense_part(tp, name, pick(params[1][name])),
                                    _dense_part(tp, name, pick(params[2][name])), f"{family} {name} {what}")
        # a dense checkpoint that transformers loads, then a sharded load into a model built on meta
        folder = _shared_dir(world, family)
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        # files of a third of the model at most: transformers' sharded layout, streamed to rank 0
        limit = sum(p.numel() * p.element_size() for p in dense.parameters()) // 3
        written = save_sharded(tp, folder, max_shard_size=limit)
        assert len(written["files"]) >= 3 and written["index"].endswith("model.safetensors.index.json"), written
        mine = sum(local(getattr(layer, kind)).numel() * getattr(layer, kind).element_size()
                   for layer in _layers(tp).values() for kind in ("weight", "bias")
                   if getattr(layer, kind) is not None and (kind == "weight" or isinstance(layer, ColumnParallelLinear)))
        if rank > 0:  # each rank sends its own shards of the sharded tensors, once, to rank 0 alone
            assert written["bytes_gathered"] == mine, (written, mine)
        else:  # the others' shards: about W - 1 of its own (shards differ by a row where W does not divide)
            assert abs(written["bytes_gathered"] - mine * (world - 1)) <= 0.3 * mine * (world - 1), (written, mine)
        with torch.no_grad():
            after = _logits(tp, ids)
        loaded = cls.from_pretrained(folder)
        for name, p in loaded.named_parameters():
            assert torch.equal(_dense_part(tp, name, p.detach().to(device)), local(dict(tp.named_parameters())[name].detach())), name
        with empty_parameters():  # no dense weight on any rank: parameters on meta, buffers real
            fresh = cls(config)
        assert all(p.is_meta for p in fresh.parameters())
        fresh_report = parallelize(fresh)
        assert len(fresh_report.replaced) == LAYERS, str(fresh_report)
        stats = load_sharded(fresh, folder, device=device)
        with torch.no_grad():
            torch.testing.assert_close(_logits(fresh, ids), after)
        shards = sum(local(p).numel() * p.element_size() for layer in _layers(fresh).values() for p in layer.parameters())
        assert stats["sharded_bytes_read"] == shards, stats
        if world > 1:  # about 1/W of the MLP weights: the row biases are whole on every rank
            assert stats["sharded_bytes_read"] < stats["sharded_bytes_in_checkpoint"] / world * 1.3, stats
        read[family] = (stats["sharded_bytes_read"], stats["sharded_bytes_in_checkpoint"])
        if world > 1:
            torch.distributed.barrier()  # every rank has read the checkpoint
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
    return read


def gated_models(rank, world):
    """Each gated family: every MLP block replaced whole (a true report), logits and the other parameters'
    gradients against the dense model, a save that `transformers` loads back to the dense weights (Phi-3's
    merged gate_up_proj included), and a sharded load into a model built on meta (Phi-3: two slice reads
    per rank of the merged tensor) that reads about 1/W of the sharded bytes."""
    device = torch.get_default_device()
    read = {}
    for family, (cls, config, activation) in _gated_families().items():
        torch.manual_seed(6)
        dense = cls(config)
        tp = copy.deepcopy(dense)
        report = parallelize(tp)
        assert len(report.replaced) == LAYERS and not report.left_alone, str(report)
        assert all(r["gated"] and r["activation"] == activation for r in report.replaced), str(report)
        blocks = [m for m in tp.modules() if isinstance(m, TensorParallelGatedMLP)]
        assert len(blocks) == LAYERS and not any(isinstance(m, nn.Linear) and FFN in (m.in_features, m.out_features)
                                                 for m in tp.modules()), "a block replaced in part"
        dense64, ids = _logits_step(tp, dense, family, device, seed=7)
        tp_params = dict(tp.named_parameters())
        for name, p in dense.named_parameters():
            if name in tp_params and ".mlp." not in name:  # the blocks' own: tests/test_gated.py
                assert_close_to_ref(tp_params[name].grad, p.grad, dict(dense64.named_parameters())[name].grad,
                                    f"{family} {name} grad")
        folder = _shared_dir(world, family)
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
        # files of a third of the model at most: an index and several files, the merged tensor whole in one
        written = save_sharded(tp, folder, max_shard_size=sum(p.numel() * p.element_size() for p in dense.parameters()) // 3)
        assert len(written["files"]) >= 3 and written["index"], written
        loaded = cls.from_pretrained(folder)
        dense_state = dense.state_dict()
        for name, value in loaded.state_dict().items():
            assert torch.equal(value, dense_state[name]), f"{family} {name} after save_sharded"
        with empty_parameters():
            fresh = cls(config)
        assert len(parallelize(fresh).replaced) == LAYERS
        stats = load_sharded(fresh, folder, device=device)
        assert all(isinstance(m, TensorParallelGatedMLP) and custom_ops_gated.adjacent(local(m.gate_proj.weight),
                                                                                     local(m.up_proj.weight))
                   for m in fresh.modules() if isinstance(m, TensorParallelGatedMLP))
        with torch.no_grad():
            torch.testing.assert_close(_logits(fresh, ids), _logits(tp, ids))
        if world > 1:
            assert stats["sharded_bytes_read"] < stats["sharded_bytes_in_checkpoint"] / world * 1.3, stats
            torch.distributed.barrier()
        read[family] = (stats["sharded_bytes_read"], stats["sharded_bytes_in_checkpoint"])
        if rank == 0:
            shutil.rmtree(folder, ignore_errors=True)
    return read


class _GatedLookAlike(nn.Module):
    """A gated block's shape whose forward is not act(gate) * up: a sum, or up's features permuted."""

    def __init__(self, kind):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(8, 12), nn.Linear(8, 12), nn.Linear(12, 8)
        self.act_fn, self.kind = nn.SiLU(), kind

    def forward(self, x):
        if self.kind == "sum":
            return self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x).flip(-1))


class _GatedWithDropout(_GatedLookAlike):
    """T5 v1.1's gated block: a dropout between the product and down. Replaced whole, it would lose it."""

    def __init__(self):
        super().__init__("product")
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return self.down_proj(self.dropout(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


class _WideGelu(nn.Module):
    """A plain GELU MLP whose output is twice its input: fc2 (32 -> 16) reads like a merged gate_up of down
    = fc1 (8 -> 32)'s input. The gated probe refuses it; the GELU search replaces it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 16)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def gated_look_alikes(rank, world):
    torch.manual_seed(9)
    model = nn.Sequential(_GatedLookAlike("sum"), _GatedLookAlike("permuted"), _GatedWithDropout())
    dense = copy.deepcopy(model)
    report = parallelize(model)
    reasons = {r["block"]: r["reason"] for r in report.left_alone}
    assert not report.replaced and sorted(reasons) == ["0", "1", "2"], str(report)
    assert "a gated look-alike the probe refused" in reasons["0"] and "the probe refused" in reasons["1"], str(report)
    assert "also holds dropout" in reasons["2"], str(report)
    assert all(isinstance(m, (nn.Linear, nn.SiLU, nn.Dropout)) for block in model for m in block.children())
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(10), device="cpu").to(torch.get_default_device())
    model.eval()
    dense.eval()
    torch.testing.assert_close(model(x), dense(x))
    wide = nn.Sequential(_WideGelu())
    dense = copy.deepcopy(wide)
    report = parallelize(wide)
    assert [r["block"] for r in report.replaced] == ["0"] and not report.left_alone, str(report)
    assert isinstance(wide[0].fc1, ColumnParallelLinear)
    assert_close_to_ref(wide(x), dense(x), copy.deepcopy(dense).double()(x.double()), "wide GELU MLP")
    return "ok"


class _TwoUses(nn.Module):
    """An MLP whose forward also uses fc1's output elsewhere: replacing fc1 would change it."""

    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8)

    def forward(self, x):
        h = self.fc1(x)
        return self.fc2(self.act(h)) + h.mean(-1, keepdim=True)


class _Relu(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 8)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class _Functional(nn.Module):
    """GELU as a function attribute, not a module."""

    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 12), nn.Linear(12, 8)
        self.gelu = torch.nn.functional.gelu

    def forward(self, x):
        return self.down(self.gelu(self.up(x)))


def left_alone_and_plans(rank, world):
    torch.manual_seed(4)
    model = nn.Sequential(_TwoUses(), _Relu(), _Functional())
    dense = copy.deepcopy(model)
    report = parallelize(model)
    reasons = {r["block"]: r["reason"] for r in report.left_alone}
    assert [r["block"] for r in report.replaced] == ["2"], str(report)
    assert "the probe's output changed" in reasons["0"], str(report)
    assert "(ReLU) is not GELU" in reasons["1"], str(report)
    assert isinstance(model[0].fc1, nn.Linear) and isinstance(model[1].fc1, nn.Linear)  # untouched
    assert isinstance(model[2].up, ColumnParallelLinear) and isinstance(model[2].down, RowParallelLinear)
    x = torch.randn(3, 8, generator=torch.Generator().manual_seed(5), device="cpu").to(torch.get_default_device())
    assert_close_to_ref(model(x), dense(x), copy.deepcopy(dense).double()(x.double()), "mixed model")
    # a plan instead of the search
    planned = nn.Sequential(_Functional(), _Functional())
    report = parallelize(planned, plan={"1": ("up", "gelu", "down")})
    assert [r["block"] for r in report.replaced] == ["1"] and isinstance(planned[0].up, nn.Linear), str(report)
    with pytest.raises(ValueError, match="plan pattern 'nothing.*' matches no module"):
        parallelize(planned, plan={"nothing.*": ("up", "gelu", "down")})
    with pytest.raises(ValueError, match="sequence_parallel=True is not supported"):
        parallelize(planned, sequence_parallel=True)
    return "ok"


# One spawn per setup runs every scenario (`spawn.scenario_outcomes`), and each test reads one scenario's
# outcome.
SCENARIOS = [real_models, left_alone_and_plans, gated_models, gated_look_alikes]
_outcomes = scenario_outcomes(SCENARIOS)  # one spawn per (backend, device, world size), cached


@pytest.mark.parametrize("setup", rank_setups(WORLD_SIZES, cuda_world_sizes=(2, 3)))
@pytest.mark.parametrize("scenario", [s.__name__ for s in SCENARIOS])
def test_parallelize_on_ranks(scenario, setup):
    world_size = setup[2]
    values = check_scenario(_outcomes(setup), scenario)
    if scenario in ("real_models", "gated_models"):  # together the ranks read each sharded checkpoint tensor once
        for family in values[0]:
            read = sum(v[family][0] for v in values)
            total = values[0][family][1]
            assert read >= total and read <= total * world_size, (family, read, total)
