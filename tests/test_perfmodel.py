"""The performance model: the alpha-beta collectives, the pipelined overlap, the break-even M, the CLI."""
import dataclasses
import subprocess
import sys

import pytest

from tpkernels import perfmodel
from tpkernels.demo import model_table

NVLINK = perfmodel.MACHINES["h100-nvlink"]


def test_collectives_follow_the_bus_bandwidth_convention():
    assert perfmodel.all_reduce_time(1 << 30, 1, NVLINK) == 0.0
    t = perfmodel.all_reduce_time(1 << 30, 8, NVLINK)
    assert t == pytest.approx(NVLINK.latency + (1 << 30) * 2 * 7 / 8 / NVLINK.bus_bandwidth)


def test_one_chunk_is_no_overlap_and_world_1_has_no_communication():
    p = perfmodel.predict(4096, 8192, 28672, 8, NVLINK, chunks=1)
    assert p["forward_overlap"] == pytest.approx(p["forward"]) and p["step_overlap"] == pytest.approx(p["step"])
    alone = perfmodel.predict(4096, 8192, 28672, 1, NVLINK)
    assert alone["communication_share"] == 0 and alone["step_overlap"] == alone["step"]
    # four backward GEMMs for two forward ones: the step is about three forwards when compute-bound
    assert alone["step"] == pytest.approx(3 * alone["forward"], rel=0.01)


def test_overlap_loses_at_small_m_and_pays_at_large_m():
    small = perfmodel.predict(16, 8192, 28672, 8, NVLINK)
    large = perfmodel.predict(16384, 8192, 28672, 8, NVLINK)
    assert small["step_overlap"] > small["step"], "chunk latencies and launches dominate a small step"
    assert large["step_overlap"] < large["step"]
    even = perfmodel.break_even_m(8192, 28672, 8, NVLINK)
    assert even is not None and 16 < even <= 16384
    below = perfmodel.predict(even // 2, 8192, 28672, 8, NVLINK)
    assert below["step_overlap"] >= below["step"]
    assert perfmodel.break_even_m(8192, 28672, 1, NVLINK) is None
    # a slower network shifts the balance: more of the step is communication
    ib = perfmodel.predict(4096, 8192, 28672, 8, perfmodel.MACHINES["h100-ib"])
    assert ib["communication_share"] > perfmodel.predict(4096, 8192, 28672, 8, NVLINK)["communication_share"]


def test_measured_gemm_times_scale_the_roofline():
    base = perfmodel.predict(4096, 8192, 28672, 2, NVLINK)
    shard = 28672 // 2
    roof = perfmodel.gemm_time(4096, shard, 8192, NVLINK) + perfmodel.gemm_time(4096, 8192, shard, NVLINK)
    slow = perfmodel.predict(4096, 8192, 28672, 2, NVLINK, gemm_times={"column": roof, "row": roof})
    comm = 2 * perfmodel.all_reduce_time(4096 * 8192 * 2, 2, NVLINK)
    assert slow["step"] - comm == pytest.approx(2 * (base["step"] - comm))


def test_the_command_line_prints_the_table():
    result = subprocess.run([sys.executable, "-m", "tpkernels", "model", "--hidden", "8192", "--ffn", "28672",
                             "--tokens", "4096", "--world-size", "1", "2", "4", "8"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "2", "4", "8"]
    assert "overlap pays from M" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "tpkernels", "model", "--world-size", "0"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0 and "--world-size [0]" in bad.stderr


def test_overrides():
    fast = dataclasses.replace(NVLINK, bus_bandwidth=NVLINK.bus_bandwidth * 10)
    assert perfmodel.predict(4096, 8192, 28672, 8, fast)["step"] < perfmodel.predict(4096, 8192, 28672, 8, NVLINK)["step"]


def test_strategy_times_follow_latency_and_bytes():
    machine = perfmodel.MACHINES["h100-nvlink"]
    # one rank: nothing to communicate, (c) and (d) are the same two GEMMs
    one = perfmodel.strategy_times(64, 1024, 4096, 1024, 1, machine)
    assert one["c"] == one["d"]
    # few tokens: latency-bound, so one collective beats two whatever the bytes
    few = perfmodel.strategy_times(17, 128, 100, 128, 3, machine)
    assert few["c"] < min(few["a"], few["b"], few["d"])
    assert few["a"] - few["c"] > 0.9 * machine.latency
    # many tokens, hidden < out: (a)'s two gathers take less bus time than (c)'s all-reduce, so its lead
    # in collectives shrinks as M grows
    M, H, N, W = 1 << 16, 100, 128, 3
    gathers = perfmodel.gather_time(M * H * 2, W, machine) + perfmodel.gather_time(M * N * 2, W, machine)
    assert gathers - machine.latency < perfmodel.all_reduce_time(M * N * 2, W, machine)
    # (d)'s all-gather [M, K] and reduce-scatter [M, N] move what (c)'s all-reduce [M, N] does when K == N,
    # plus one latency
    big = perfmodel.strategy_times(8192, 4096, 16384, 4096, 8, machine)
    assert abs((big["d"] - big["c"]) - machine.latency) < 1e-9


def test_the_gated_mlp_has_a_column_stage_twice_as_wide_and_fusion_saves_its_elementwise_pass():
    """Gated: the column stage is gate and up (2 F_r wide), so its GEMMs cost what a plain MLP's of twice the
    hidden width would; fused, it saves the unfused path's [g | u] round trip and its second launch."""
    plain = perfmodel.predict(4096, 4096, 14336, 8, NVLINK)
    gated = perfmodel.predict(4096, 4096, 14336, 8, NVLINK, gated=True)
    column = perfmodel.gemm_time(4096, 1792, 4096, NVLINK)
    assert gated["forward"] == pytest.approx(plain["forward"] + column, rel=1e-3)
    for tokens in (1, 64, 4096):
        times = perfmodel.gated_column_times(tokens, 4096, 14336, 8, NVLINK)
        assert times["fused"] < times["unfused"]
    decode = perfmodel.gated_column_times(1, 4096, 14336, 8, NVLINK)
    # M = 1: the weights' streaming (2 x 1792 x 4096 bf16 at 3.35 TB/s) is the fused time
    assert decode["fused"] == pytest.approx(2 * 1792 * 4096 * 2 / NVLINK.memory_bandwidth, rel=0.01)
    assert "gated column stage" in model_table.table(1, 4096, 14336, [8], NVLINK, gated=True)
