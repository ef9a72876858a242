"""The launch path itself: bound launches (the hot path after a key's first call), what tells launch keys
apart, precompiling, and the kernel choice's rule and table."""
import json
import os

import pytest
import torch

import tpkernels
from numerics import DEVICES, assert_close_to_ref, fp64, linear_inputs
from tpkernels import MatmulConfig, bound, launch, pin_config, reference
from tpkernels.kernels import GELU


def _first_launches(monkeypatch):
    calls = []
    first = launch._first_launch

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return first(*args, **kwargs)

    monkeypatch.setattr(launch, "_first_launch", spy)
    return calls


@pytest.mark.parametrize("device", DEVICES)
def test_a_key_launches_in_full_once_then_bound(device, monkeypatch):
    """The second call of a key skips the full path and runs the same kernel, bit for bit, into a fresh
    output; its launch is recorded as the first one was."""
    calls = _first_launches(monkeypatch)
    x, w, b = linear_inputs((5,), 40, 24, torch.float32, device)
    if not launch.runs_triton(x):  # said, not passed: a return here asserted nothing
        pytest.skip("this call does not run the Triton kernels here (no GPU and no TRITON_INTERPRET=1)")
    with launch.record_launches() as launches:
        first = tpkernels.linear_gelu(x, w, b)
        again = tpkernels.linear_gelu(x, w, b)
    assert len(calls) == 1 and len(bound.BOUND) == 1
    assert launches[0] == launches[1] and launches[0].startswith("pointer")
    assert torch.equal(first, again) and first.data_ptr() != again.data_ptr()
    assert_close_to_ref(again, reference.linear_gelu(x, w, b), reference.linear_gelu(*fp64(x, w, b)))


@pytest.mark.parametrize("device", DEVICES)
def test_the_one_config_kernels_launch_bound_after_their_first_call(device, monkeypatch):
    """fp8's quantize and scale update and the dGELU pass: a key's first call takes the full JIT path and
    binds; the second runs the bound launch, bit for bit, recorded as the first."""
    from tpkernels import fp8

    x = torch.randn(40, 72, device=device)
    if not launch.runs_triton(x):
        pytest.skip("this call does not run the Triton kernels here (no GPU and no TRITON_INTERPRET=1)")
    binds = []
    bind = bound.bind_elementwise
    monkeypatch.setattr(bound, "bind_elementwise", lambda kernel, *a: binds.append(kernel.__name__) or bind(kernel, *a))
    z = torch.randn(40, 72, device=device)
    scaling = fp8.FP8Scaling(tpkernels.FP8Recipe(amax_history_len=4), fp8.MLP_TENSORS, device)
    history = torch.rand(4, 4, device=device) + 0.5

    def calls():
        scaling.amax_history.copy_(history)
        scale, _, amax = scaling.slot("x")
        with launch.record_launches() as launches:
            scaling.update(torch.device(device))
            q = fp8.quantize(x, scale, amax)
            dz, db = launch.dgelu(x, z, GELU, True)
        return [q.view(torch.uint8), dz, db, scaling.amax_history.clone(), scaling.scale.clone()], launches

    first, first_launches = calls()
    assert sorted(binds) == ["_dgelu_kernel", "_quantize_kernel", "_scale_update_kernel"]
    assert len(bound.BOUND) == 3 and all(isinstance(b, bound.BoundElementwise) for b in bound.BOUND.values())
    again, again_launches = calls()
    assert len(binds) == 3 and len(bound.BOUND) == 3, binds
    assert again_launches == first_launches and len(first_launches) == 3, first_launches
    for got, expected in zip(again, first):
        assert torch.equal(got, expected)
    assert first[0].data_ptr() != again[0].data_ptr()
    assert torch.equal(first[4][0], 448 / history[:, 0].max())


@pytest.mark.parametrize("device", DEVICES)
def test_what_tells_launch_keys_apart(device, monkeypatch):
    """Alignment, strides, dtype, the epilogue, the pinned config and the kernel choice each make a new
    key (a full launch); each result is right."""
    x, w, b = linear_inputs((6,), 48, 20, torch.float32, device)
    if not launch.runs_triton(x):
        pytest.skip("CPU tensors run eager without the interpreter")
    calls = _first_launches(monkeypatch)
    base = torch.randn(6 * 48 + 1, device=device)
    variants = [
        lambda: tpkernels.linear_gelu(x, w, b),
        lambda: tpkernels.linear_gelu(base[1:].view(6, 48), w, b),  # 4 bytes off: not 16-byte aligned
        lambda: tpkernels.linear_gelu(x.t().contiguous().t(), w, b),  # column-major x
        lambda: tpkernels.linear_gelu(x.half(), w.half(), b.half()),
        lambda: tpkernels.linear_gelu(x, w, b, approximate="tanh"),
        lambda: tpkernels.linear_gelu(x, w, None),
        lambda: tpkernels.linear_partial(x, w, b, out_dtype=torch.float32),
    ]
    for number, call in enumerate(variants, 1):
        call()
        call()
        assert len(calls) == number, f"variant {number} should be one new key"
    with pin_config(MatmulConfig(16, 16, 16, group_m=1)):
        tpkernels.linear_gelu(x, w, b)
    with launch.use_matmul_kernel("splitk"):
        out = tpkernels.linear_gelu(x, w, b)
    assert len(calls) == len(variants) + 2
    assert_close_to_ref(out, reference.linear_gelu(x, w, b), reference.linear_gelu(*fp64(x, w, b)))
    unaligned = base[1:].view(6, 48)
    out = tpkernels.linear_gelu(unaligned, w, b)
    assert_close_to_ref(out, reference.linear_gelu(unaligned, w, b), reference.linear_gelu(*fp64(unaligned, w, b)))


@pytest.mark.parametrize("device", DEVICES)
def test_precompiling_launches_nothing(device):
    """Inside `precompiling`, a launch compiles and leaves its output as it was: nothing bound, recorded
    or written, on every kernel."""
    x, w, _ = linear_inputs((3,), 40, 20, torch.float32, device)
    if not launch.runs_triton(x):
        pytest.skip("CPU tensors run eager without the interpreter")
    out = torch.full((3, 20), float("nan"), device=device)
    with launch.precompiling(), launch.record_launches() as launches:
        for kernel in ("pointer", "splitk", "tma"):
            with launch.use_matmul_kernel(kernel):
                launch.linear(x, w, out, activation=GELU)
                launch.linear(x.half(), w.half(), out.half(), activation=GELU)
        launch.dgelu(x, x, GELU, True)
    assert out.isnan().all() and launches == [] and not bound.BOUND
    launch.linear(x, w, out, activation=GELU)  # and after it, launches run again
    assert not out.isnan().any() and len(bound.BOUND) == 1
    out.fill_(float("nan"))
    with launch.precompiling():
        launch.linear(x, w, out, activation=GELU)  # a bound key launches nothing either
    assert out.isnan().all()


def test_kernel_rule_and_table():
    """The rule splits K for decode grids under one wave, takes TMA on Hopper above TMA_MIN_M rows, and the
    pointer kernel otherwise; the table, where it lists a shape, comes first."""
    assert launch.rule_kernel(1, 2048, 4096, 132, (9, 0), True) == "splitk"
    assert launch.rule_kernel(16, 4096, 4096, 132, (9, 0), True) == "splitk"
    assert launch.rule_kernel(4096, 4096, 4096, 132, (9, 0), True) == "tma"
    assert launch.rule_kernel(4096, 4096, 4096, 132, (9, 0), False) == "pointer"
    assert launch.rule_kernel(4096, 4096, 4096, 108, (8, 0), True) == "pointer"
    assert launch.rule_kernel(1, 2048, 256, 132, (9, 0), True) == "pointer"  # K too short to split
    path = os.path.join(os.path.dirname(launch.__file__), "kernel_table.json")
    with open(path) as f:
        table = json.load(f)
    assert {"source", "rule", "entries"} <= set(table)
    for entry in table["entries"]:
        assert set(entry) == {"layout", "dtype", "m_bucket", "n", "k", "kernel"}
        assert entry["kernel"] in ("pointer", "splitk", "tma")
    choices = dict(launch._KERNEL_CHOICES)
    try:
        launch._KERNEL_CHOICES[(3, "bfloat16", 16, 2048, 4096)] = "pointer"
        assert launch.table_kernel(3, torch.bfloat16, 9, 2048, 4096) == "pointer"  # 9 rows: the bucket of 16
        assert launch.table_kernel(3, torch.bfloat16, 17, 2048, 4096) is None
        assert launch.table_kernel(0, torch.bfloat16, 16, 2048, 4096) is None  # another layout
    finally:
        launch._KERNEL_CHOICES.clear()
        launch._KERNEL_CHOICES.update(choices)


def test_layout_code():
    a = torch.empty(4, 8)
    w = torch.empty(6, 8)
    assert launch.layout_code(a, w.t()) == 3  # the forward: x @ w.T
    assert launch.layout_code(a, torch.empty(8, 6)) == 0  # dX = dZ @ w
    assert launch.layout_code(a.t(), torch.empty(4, 6)) == 1  # dW = dZ.T @ x
    assert launch.layout_code(torch.empty(4, 16)[:, ::2], torch.empty(8, 6)) == 2


@pytest.mark.parametrize("device", DEVICES)
def test_the_tma_kernel_is_bound_with_descriptors_per_call(device, monkeypatch):
    """A TMA launch binds too: later calls make descriptors over their own operands (a new x each step)
    and give the first call's result bit for bit."""
    x, w, b = linear_inputs((40,), 32, 24, torch.float16, device)
    if not launch.runs_triton(x):
        pytest.skip("CPU tensors run eager without the interpreter")
    calls = _first_launches(monkeypatch)
    with launch.use_matmul_kernel("tma"), launch.record_launches() as launches:
        first = tpkernels.linear_gelu(x, w, b)
        entry, = bound.BOUND.values()
        assert isinstance(entry, bound.BoundTMA)
        again = tpkernels.linear_gelu(x.clone(), w, b)
        other = linear_inputs((40,), 32, 24, torch.float16, device)[0]
        third = tpkernels.linear_gelu(other, w, b)
    assert len(calls) == 1 and [line.split()[0] for line in launches] == ["tma"] * 3
    assert torch.equal(first, again)
    assert_close_to_ref(third, reference.linear_gelu(other, w, b), reference.linear_gelu(*fp64(other, w, b)))
