"""The test suite's own budget, checked on the CPU: the GPU cases it collects are counted in one place
(conftest.GPU_TESTS). Adding or parametrising a `gpu` test changes the count, and this test asks the
change to say so."""
import os
import subprocess
import sys

from conftest import GPU_TESTS

ROOT = os.path.join(os.path.dirname(__file__), os.pardir)


def test_gpu_cases_are_counted_in_one_place():
    result = subprocess.run([sys.executable, "-m", "pytest", "tests", "-m", "gpu", "--collect-only", "-q",
                             "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (summary,) = [line for line in result.stdout.splitlines() if " collected" in line]
    collected = int(summary.split("/")[0].split()[0])
    assert collected == GPU_TESTS, (f"`pytest tests -m gpu` collects {collected} tests; conftest.GPU_TESTS says "
                                    f"{GPU_TESTS}: update it (the GPU suite must finish in a few minutes)")


def test_junit_summary_is_one_line_with_the_counts(tmp_path):
    """The line gpu.sh commits under tests/results/ beside a GPU run's JUnit file."""
    from junit_summary import summary

    report = tmp_path / "junit.xml"
    report.write_text('<testsuites><testsuite name="pytest" errors="1" failures="2" skipped="3" tests="20" '
                      'time="61.4"></testsuite></testsuites>')
    line = summary(str(report))
    assert "\n" not in line and "| 14 passed, 3 failed, 3 skipped | 61 s" in line and "torch " in line
