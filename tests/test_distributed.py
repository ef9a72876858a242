"""Conjugate collectives on real gloo ranks: values, gradients, counts and bytes, the debug switch."""
import functools
import os

import pytest
import torch

from spawn import check_scenario, run_ranks, run_scenarios
from tpkernels import distributed as tpd
from tpkernels import autotune, launch, ops

WORLD_SIZES = [1, 2, 3, 4]
FEATURES = 11  # divides by none of the world sizes above but 1


@pytest.mark.parametrize("features", [1, 4, 7, 9, 13, 64])
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 8])
def test_shard_arithmetic_is_dtensor_layout(features, world_size):
    # DTensor's Shard: torch.chunk's pieces, then empty shards where chunk gives fewer pieces
    from torch.distributed.tensor import Shard

    parts = list(torch.chunk(torch.arange(features), world_size))
    parts += [torch.arange(0)] * (world_size - len(parts))
    assert tpd.shard_sizes(features, world_size) == [len(p) for p in parts]
    for rank, part in enumerate(parts):
        start, stop = tpd.shard_range(features, world_size, rank)
        assert torch.equal(torch.arange(features)[start:stop], part)
        assert torch.equal(tpd.shard(torch.arange(features), world_size, rank), part)
        assert tuple(Shard.local_shard_size_and_offset(features, world_size, rank)) == (stop - start, start) or \
            stop == start  # an empty shard's offset is not defined alike across torch versions


def _inputs(shape, seed):
    generator = torch.Generator().manual_seed(seed)  # the same on every rank
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def pairs(rank, world):
    start, stop = tpd.shard_range(FEATURES, world, rank)
    full = _inputs((2, 3, FEATURES), 0)
    grad_full = _inputs((2, 3, FEATURES), 1)
    per_rank = [_inputs((2, 3, FEATURES), 10 + r) for r in range(world)]  # what each rank holds
    expected_bwd = 0 if world == 1 else 1
    report = {}

    def run(fn, x, grad):
        x = x.clone().requires_grad_()
        with tpd.count_collectives() as fwd:
            y = fn(x)
        with tpd.count_collectives() as bwd:
            y.backward(grad)
        return y.detach(), x.grad, fwd, bwd

    # copy_to: identity forward, the sum of every rank's gradient backward
    y, dx, fwd, bwd = run(tpd.copy_to, full, per_rank[rank])
    assert torch.equal(y, full) and fwd.count() == 0 and bwd.count("all_reduce") == expected_bwd
    torch.testing.assert_close(dx, sum(per_rank))
    # reduce_from: the sum forward, identity backward
    y, dx, fwd, bwd = run(tpd.reduce_from, per_rank[rank], grad_full)
    torch.testing.assert_close(y, sum(per_rank))
    assert torch.equal(dx, grad_full) and fwd.count("all_reduce") == expected_bwd and bwd.count() == 0
    report["all_reduce_sent_bytes"] = fwd.sent_bytes
    # gather_from: uneven shards reassembled forward, this rank's slice backward
    y, dx, fwd, bwd = run(lambda s: tpd.gather_from(s, FEATURES), full[..., start:stop], grad_full)
    assert torch.equal(y, full) and fwd.count("all_gather") == expected_bwd and bwd.count() == 0
    assert torch.equal(dx, grad_full[..., start:stop])
    # scatter_to: this rank's slice forward, the gathered gradient backward
    y, dx, fwd, bwd = run(tpd.scatter_to, full, grad_full[..., start:stop])
    assert torch.equal(y, full[..., start:stop]) and fwd.count() == 0 and bwd.count("all_gather") == expected_bwd
    assert torch.equal(dx, grad_full)
    return report


def debug_switch(rank, world):
    if world == 1:
        return "bypassed"
    os.environ[tpd.DEBUG_ENV] = "1"
    try:
        with pytest.raises(ValueError, match=r"ranks' tensors differ.*rank 0: \(2, 5\) torch.float32.*rank 1: \(3, 5\)"):
            tpd.reduce_from(torch.ones(2 + rank, 5))
        same = tpd.reduce_from(torch.ones(2, 5))  # agreeing shapes pass the check and reduce
        assert torch.equal(same, torch.full((2, 5), float(world)))
    finally:
        del os.environ[tpd.DEBUG_ENV]
    return "raised"


@functools.cache
def _outcomes(world_size):
    return run_scenarios([pairs, debug_switch], world_size)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_conjugate_pairs_values_gradients_and_counts(world_size):
    reports = check_scenario(_outcomes(world_size), "pairs")
    payload = 2 * 3 * FEATURES * 8  # float64
    for report in reports:
        assert report["all_reduce_sent_bytes"] == 2 * (world_size - 1) * payload // world_size


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_debug_switch_names_mismatched_shapes_instead_of_hanging(world_size):
    check_scenario(_outcomes(world_size), "debug_switch")


def test_collectives_are_bypassed_without_a_process_group():
    x = torch.randn(3, 4, requires_grad=True)
    with tpd.count_collectives() as counts:
        for fn in (tpd.copy_to, tpd.reduce_from, tpd.scatter_to, lambda t: tpd.gather_from(t, 4)):
            assert fn(x) is x
    assert counts.count() == 0
    assert tpd.get_world_size() == 1 and tpd.get_rank() == 0


def autotune_sync(rank, world):
    tuner = launch.autotuner("pointer", (9, 0))
    tuner.cache.clear()
    # each rank "tuned" differently; rank 0 also has a shape the others never saw
    tuner.cache[("k1",)] = tuner.configs[rank]
    tuner.cache[("k2",)] = tuner.configs[(rank + 3) % len(tuner.configs)]
    if rank == 0:
        tuner.cache[("k3",)] = tuner.configs[5]
        # kernels only rank 0 ran, on a Blackwell capability (sm_100) and the TMA kernel: the other
        # ranks make those autotuners as they take rank 0's configs
        launch.autotuner("pointer", (10, 0)).cache[("k4",)] = launch.autotuner("pointer", (10, 0)).configs[1]
        launch.autotuner("tma", (9, 0)).cache[("k5",)] = launch.autotuner("tma", (9, 0)).configs[2]
    taken = ops.sync_autotuning()
    picked = {key: autotune.config_identity(config) for key, config in tuner.cache.items()}
    others = {kind: {key: autotune.config_identity(c) for key, c in launch.autotuner(*kind).cache.items()}
              for kind in (("pointer", (10, 0)), ("tma", (9, 0)))}
    return taken, picked, others


@pytest.mark.parametrize("world_size", [2, 3])
def test_sync_autotuning_gives_every_rank_rank_0s_configs(world_size):
    results = run_ranks(autotune_sync, world_size)
    configs = launch.autotuner("pointer", (9, 0)).configs
    expected = {("k1",): autotune.config_identity(configs[0]), ("k2",): autotune.config_identity(configs[3]),
                ("k3",): autotune.config_identity(configs[5])}
    sm100, tma = launch.autotuner("pointer", (10, 0)).configs, launch.autotuner("tma", (9, 0)).configs
    others = {("pointer", (10, 0)): {("k4",): autotune.config_identity(sm100[1])},
              ("tma", (9, 0)): {("k5",): autotune.config_identity(tma[2])}}
    for rank, (taken, picked, theirs) in enumerate(results):
        assert taken == 5, rank
        assert picked == expected, rank
        assert theirs == others, rank
    assert ops.sync_autotuning() == 0  # no process group: nothing to do
