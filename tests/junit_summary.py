"""One line for a JUnit file of the GPU tests: device, torch, triton, git sha, passed / failed / skipped and
seconds, for `tests/results/` (benchmarks/gpu.sh writes it beside the JUnit file).

    python tests/junit_summary.py OUT/junit-gpu.xml
"""
import subprocess
import sys
import xml.etree.ElementTree as ElementTree


def summary(path):
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    count = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    seconds = sum(float(s.get("time", 0)) for s in suites)
    passed = count["tests"] - count["failures"] - count["errors"] - count["skipped"]
    import torch
    import triton

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return (f"{device} | torch {torch.__version__} | triton {triton.__version__} | git {sha or '?'} | "
            f"{passed} passed, {count['failures'] + count['errors']} failed, {count['skipped']} skipped | "
            f"{seconds:.0f} s")


if __name__ == "__main__":
    print(summary(sys.argv[1]))
