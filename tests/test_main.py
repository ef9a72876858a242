"""The main job and the torchrun example, run as a user runs them."""
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def _run(*command):
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def test_main_job_answers_the_seed_question_on_two_ranks():
    out = _run(sys.executable, "-m", "tpkernels", "--repeat", "1", "--tokens", "8", "--in-features", "16",
               "--hidden", "48")
    assert "2 ranks on gloo, running the Triton kernels under the interpreter" in out
    for line in ("column-wise match", "GELU on partial sums: mismatch, as the notebook says", "column -> row match",
                 "same rows exact; consecutive pieces wrong, as the math says"):
        assert line in out
    # the notebook's printed numbers
    for numbers in ("[ 0.5324,  0.2612,  0.0106,  0.7086]", "[ 0.4549,  0.2409,  0.0150,  0.5894]",
                    "[ 0.1601, -0.0207,  0.0361, -0.1454]", "[ 0.5498,  0.3071, -0.1691,  1.1577]"):
        assert numbers in out
    # the table: (c) one all-reduce of [8, 16] fp32 partials, 2 (W-1)/W x 512 bytes = 512 sent per rank
    row_c = next(line for line in out.splitlines()
                 if line.strip().startswith("(c) column (GELU fused)") and not line.endswith("..."))
    assert row_c.split()[-7:-5] == ["1", "512"], row_c
    # (d), sequence parallel: all-gather [4, 16] and reduce-scatter [8, 16] fp32: 256 + 256 bytes, and
    # each rank keeps half of the output
    row_d = next(line for line in out.splitlines()
                 if line.strip().startswith("(d) all-gather") and not line.endswith("..."))
    assert row_d.split()[-7:-4] == ["2", "512", "512"] and row_d.split()[-4] == "256", row_d
    # hidden (48) > out (16) = in: (c) and (d) send the fewest bytes, (c) in the fewest collectives, and the
    # model picks it
    assert "Fewest bytes: (c) (d). Fewest collectives: (c). Fastest by the model: (c)." in out
    assert "Here (a) sends fewer bytes" not in out


def test_main_job_says_when_strategy_a_sends_fewer_bytes():
    """hidden < out: (a) moves fewer bytes than (c); the text says so, and lets the latency term decide."""
    out = _run(sys.executable, "-m", "tpkernels", "--repeat", "1", "--tokens", "17", "--in-features", "32",
               "--hidden", "8", "--world-size", "3", "--dtype", "bfloat16")
    assert "Fewest bytes: (a). Fewest collectives: (c)." in out
    assert "Here (a) sends fewer bytes" in out and "whenever hidden (8) < out (32)" in out


def test_torchrun_example_trains_like_the_dense_model():
    out = _run(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "examples/tp_mlp.py",
               "--steps", "2")
    assert "step 1: loss" in out and "largest difference between the trained weights" in out


def test_parallelize_example_loads_a_checkpoint_shard_by_shard(tmp_path):
    import pytest

    pytest.importorskip("transformers")
    out = _run(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "examples/parallelize_hf.py",
               "--family", "gpt_neox", "--checkpoint", str(tmp_path / "checkpoint"))
    assert "parallelize: 2 MLP blocks replaced, 0 left alone" in out
    assert "logits over 2 ranks, float32: max error" in out


def test_train_2d_example_on_4_ranks_resumes_on_2(tmp_path):
    """dp 2 x tp 2 (FSDP2 over the tensor-parallel MLPs) trains and writes DCP checkpoints; tp 2 alone
    resumes from the newest. On CPU ranks without the interpreter, as its docstring runs it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    small = ["--dim", "32", "--hidden", "72", "--layers", "1", "--checkpoint-dir", str(tmp_path),
             "--checkpoint-every", "3"]

    def train(ranks, *args):
        result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks),
                                 "examples/train_2d.py", "--tp", "2", *small, *args], cwd=ROOT, env=env,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{ranks} ranks failed:\n{result.stdout}\n{result.stderr}"
        return result.stdout

    out = train(4, "--steps", "4")
    assert "training on 4 ranks: dp 2 x tp 2" in out and "step 4/4 | loss" in out
    assert sorted(os.listdir(tmp_path)) == ["step-000003", "step-000004"]
    out = train(2, "--steps", "6", "--resume")
    assert f"resumed from {tmp_path / 'step-000004'} (step 4) on 2 ranks: dp 1 x tp 2" in out
    assert "step 5/6" in out and "step 6/6 | loss" in out and "step 4/" not in out
    assert sorted(os.listdir(tmp_path)) == ["step-000003", "step-000004", "step-000006"]
