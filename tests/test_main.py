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
    for line in ("column-wise match", "GELU on partial sums: mismatch, as the notebook says", "column -> row match"):
        assert line in out
    # the notebook's printed numbers
    for numbers in ("[ 0.5324,  0.2612,  0.0106,  0.7086]", "[ 0.4549,  0.2409,  0.0150,  0.5894]",
                    "[ 0.1601, -0.0207,  0.0361, -0.1454]", "[ 0.5498,  0.3071, -0.1691,  1.1577]"):
        assert numbers in out
    # the table: (c) one all-reduce of [8, 16] fp32 partials, 2 (W-1)/W x 512 bytes = 512 sent per rank
    row_c = next(line for line in out.splitlines()
                 if line.strip().startswith("(c) column (GELU fused)") and not line.endswith("..."))
    assert row_c.split()[-5:-3] == ["1", "512"], row_c
    assert "Winner: (c)" in out


def test_torchrun_example_trains_like_the_dense_model():
    out = _run(sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "examples/tp_mlp.py",
               "--steps", "2")
    assert "step 1: loss" in out and "largest difference between the trained weights" in out
