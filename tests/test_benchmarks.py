"""Every benchmark runs in smoke mode (tiny sizes, nothing recorded): the scripts stay working."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize("script", ["rollout.py", "train_step.py", "memory.py", "scaling.py", "videoalign.py",
                                    "shapes_learning.py", "shapes_motion.py", "shapes_self_teach.py", "sft_step.py",
                                    "shapes_robust_decoder.py", "shapes_sdedit.py", "shapes_vae_squares.py",
                                    "vae_decode.py", "gpu_check.py"])
def test_benchmark_smoke(script):
    docs = BENCH.parent / "docs" / "benchmarks.md"
    before = docs.read_text()
    out = subprocess.run([sys.executable, str(BENCH / script), "--smoke"], capture_output=True, text=True,
                         timeout=120, cwd=BENCH.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "|---|" in out.stdout
    assert docs.read_text() == before  # smoke mode records nothing


def test_record_appends_only_when_asked(tmp_path, monkeypatch, capsys):
    """A full run without --record only prints, so a probe leaves docs/benchmarks.md as it was."""
    monkeypatch.syspath_prepend(str(BENCH))
    import _common

    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n")
    monkeypatch.setattr(_common, "DOCS", docs)
    lines = ["| a | b |", "|---|---|", "| 1 | 2 |"]
    for smoke, record in ((False, False), (True, True)):
        _common.record("Probe", _common.torch.device("cpu"), lines, argparse.Namespace(smoke=smoke, record=record))
        assert docs.read_text() == "# Benchmarks\n"
    _common.record("Probe", _common.torch.device("cpu"), lines, argparse.Namespace(smoke=False, record=True))
    text = docs.read_text()
    assert text.startswith("# Benchmarks\n\n### Probe (") and "| 1 | 2 |" in text and "Machine: " in text
    assert capsys.readouterr().out.count("| 1 | 2 |") == 3  # printed every time


def test_robust_decoder_edge_mask_marks_a_squares_outline(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import torch
    from shapes_robust_decoder import edge_mask

    x = -torch.ones(1, 3, 2, 16, 16)
    x[:, 0, :, 4:12, 4:12] = 1  # a red 8 x 8 square on a dark clip
    mask = edge_mask(x)[0, 0, 0]
    assert mask.shape == (16, 16) and set(mask.unique().tolist()) == {0.0, 1.0}
    assert mask[7, 7] == 0 and mask[0, 0] == 0  # the flat inside and the background
    assert mask[4, 4] == 1 and mask[3, 3] == 1 and mask[11, 8] == 1  # corners and edges, a pixel either side


def test_robust_decoder_restamps_the_copied_build_card(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCH))
    import json

    from shapes_robust_decoder import restamp_card

    (tmp_path / "build.json").write_text(json.dumps({"vae_round_trip": {"level1": {"psnr_db": 30.0}}, "patch": 2}))
    new = {"level1": {"psnr_db": 31.5, "verifier_accuracy": 0.97},
           "level2": {"psnr_db": 32.0, "verifier_accuracy": 1.0}}
    restamp_card(tmp_path, new, {"steps": 600, "edge_weight": 8.0})
    card = json.loads((tmp_path / "build.json").read_text())
    assert card == {"vae_round_trip": new, "patch": 2, "decoder_finetune": {"steps": 600, "edge_weight": 8.0}}
