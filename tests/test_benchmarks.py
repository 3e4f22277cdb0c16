"""Every benchmark runs in smoke mode (tiny sizes, nothing recorded): the scripts stay working."""

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["rollout.py", "train_step.py", "memory.py", "scaling.py", "videoalign.py",
                                    "shapes_learning.py", "shapes_motion.py", "shapes_self_teach.py", "gpu_check.py"])
def test_benchmark_smoke(script):
    docs = BENCH.parent / "docs" / "benchmarks.md"
    before = docs.read_text()
    out = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], capture_output=True, text=True,
                         timeout=120, cwd=BENCH.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "|---|" in out.stdout
    assert docs.read_text() == before  # smoke mode records nothing
