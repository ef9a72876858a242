"""Run a function on N ranks: spawned processes, file:// init, timeouts, stragglers killed, tracebacks and
results (pickled bytes) sent back to the parent. Ranks run gloo on CPU tensors by default; `RANKS` adds
the setups a GPU runner tests on one GPU: gloo over CUDA tensors (2 to 4 ranks, the default device set to
CUDA in each rank, so the scenarios' modules and tensors live there) and NCCL at world size 1. And `run_python`, for code that needs a
fresh interpreter (triton reads TRITON_INTERPRET once, as it decorates the kernels)."""
import datetime
import functools
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import time
import traceback

import torch.multiprocessing as mp


def _worker(fn, rank, world_size, init_file, timeout, results, args, backend="gloo", device="cpu"):
    import torch
    import torch.distributed as dist

    try:
        if device == "cuda":  # every rank on the one GPU (gloo), or the one rank (NCCL)
            torch.cuda.set_device(rank % torch.cuda.device_count())
            torch.set_default_device("cuda")
            # One tile for every launch, as the GPU tests pin: each rank would otherwise autotune (and
            # compile every config) on its own.
            from tpkernels import MatmulConfig, settings

            settings.PINNED_CONFIG.set(MatmulConfig(64, 64, 32, num_warps=4, num_stages=3))
        dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=timeout))
        try:
            value = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:  # everything goes home, KeyboardInterrupt included
        results.put((rank, False, traceback.format_exc()))


def run_ranks(fn, world_size, *args, timeout=300, collective_timeout=60, backend="gloo", device="cpu"):
    """fn(rank, world_size, *args) on `world_size` processes; returns their results, by rank.

    `backend` and `device`: the process group's backend, and where the ranks' tensors live by default
    ("cuda": `torch.set_default_device` in each rank).

    A rank's exception is raised here as a RuntimeError carrying its traceback; a rank that does not
    report within `timeout` seconds, or dies without reporting, raises TimeoutError / RuntimeError.
    Collectives time out after `collective_timeout` seconds, so a mismatch cannot hang a rank forever.
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        procs = [
            ctx.Process(target=_worker, args=(fn, rank, world_size, init_file, collective_timeout, results, args,
                                              backend, device), daemon=True)
            for rank in range(world_size)
        ]
        for p in procs:
            p.start()
        values, errors = {}, {}
        first_error_at = None
        deadline = time.monotonic() + timeout
        try:
            while len(values) + len(errors) < world_size:
                if first_error_at is not None and time.monotonic() > first_error_at + 5:
                    break  # the other ranks are probably stuck in a collective the failed one left
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(values) - set(errors))
                    raise TimeoutError(f"ranks {missing} of {world_size} did not finish within {timeout} s")
                try:
                    rank, ok, payload = results.get(timeout=0.5)
                except queue.Empty:
                    dead = [r for r, p in enumerate(procs)
                            if r not in values and r not in errors and p.exitcode not in (None, 0)]
                    if dead:
                        raise RuntimeError(f"ranks {dead} died without reporting (exit codes "
                                           f"{[procs[r].exitcode for r in dead]})") from None
                    continue
                if ok:
                    values[rank] = pickle.loads(payload)
                else:
                    if first_error_at is None:
                        first_error_at = time.monotonic()
                    errors[rank] = payload
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
                p.join()
    if errors:
        raise RuntimeError("\n".join(f"--- rank {r} of {world_size} ---\n{tb}" for r, tb in sorted(errors.items())))
    return [values[r] for r in range(world_size)]


def _run_scenarios(rank, world_size, scenarios):
    outcomes = {}
    for scenario in scenarios:
        try:
            outcomes[scenario.__name__] = (True, scenario(rank, world_size))
        except Exception:
            outcomes[scenario.__name__] = (False, traceback.format_exc())
    return outcomes


def run_scenarios(scenarios, world_size, **kwargs):
    """Run every scenario(rank, world_size) in one spawn; {name: (ok, value or traceback)} per rank.

    One spawn serves many tests: starting a rank (torch, triton) costs seconds, a scenario far less.
    """
    return run_ranks(_run_scenarios, world_size, list(scenarios), **kwargs)


def rank_setups(world_sizes, cuda_world_sizes=(2, 3, 4)):
    """pytest params (backend, device, world size) for a rank test: gloo on CPU tensors at `world_sizes`,
    and, marked `gpu`, gloo on CUDA tensors at `cuda_world_sizes` and NCCL at world size 1 (NCCL cannot
    put two ranks on one GPU). Ids name all three: gloo-cpu-2, gloo-cuda-2, nccl-1."""
    import pytest

    setups = [pytest.param(("gloo", "cpu", w), id=f"gloo-cpu-{w}") for w in world_sizes]
    setups += [pytest.param(("gloo", "cuda", w), id=f"gloo-cuda-{w}", marks=pytest.mark.gpu) for w in cuda_world_sizes]
    setups.append(pytest.param(("nccl", "cuda", 1), id="nccl-1", marks=pytest.mark.gpu))
    return setups


def scenario_outcomes(scenarios):
    """setup -> every rank's outcomes of `scenarios` (`run_scenarios`), for setups (backend, device, world size)
    from `rank_setups`: one spawn per setup, cached, whose scenarios each test then reads (`check_scenario`)."""
    @functools.cache
    def outcomes(setup):
        backend, device, world_size = setup
        return run_scenarios(scenarios, world_size, backend=backend, device=device)

    return outcomes


def check_scenario(outcomes, name):
    """Fail with the first failing rank's traceback; return every rank's value."""
    import pytest

    for rank, by_name in enumerate(outcomes):
        ok, value = by_name[name]
        if not ok:
            pytest.fail(f"rank {rank} of {len(outcomes)}:\n{value}", pytrace=False)
    return [by_name[name][1] for by_name in outcomes]


def run_python(code, *, interpret=False, timeout=120):
    """Run `code` in a new Python process, with TRITON_INTERPRET=1 only if `interpret`; returns its stdout,
    stripped, after checking that it exited 0 (else the assertion shows the end of its stderr)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.strip()
