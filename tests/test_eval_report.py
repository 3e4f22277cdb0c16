"""`wan-grpo eval` (numbers recomputed from the saved videos, base-vs-trained table) and `report`."""

import csv
import json

import numpy as np
import pytest

from wan_grpo.cli import main
from wan_grpo.grpo.metrics import read_metrics
from wan_grpo.rewards.builtin import brightness
from wan_grpo.video import read_mp4


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    held_out = root / "held_out.txt"
    held_out.write_text("a lighthouse at night\na field of tulips\n")
    save_dir = root / "run"
    assert main(["train", "--task", "tiny", "--num_generations", "4", "--batch_size", "5", "--max_steps", "6",
                 "--num_epochs", "10", "--lora_rank", "8", "--learning_rate", "3e-2", "--eval_interval", "3",
                 "--eval_prompts", str(held_out), "--sample_interval", "3", "--tensorboard", "false",
                 "--save_dir", str(save_dir)]) == 0
    return root, save_dir


def test_eval_numbers_come_from_the_videos_and_compare_to_base(trained_run, tmp_path):
    root, run = trained_run
    prompts = root / "held_out.txt"
    base, trained = tmp_path / "base", tmp_path / "trained"
    assert main(["eval", "--task", "tiny", "--prompts", str(prompts), "--num_samples", "2",
                 "--save_dir", str(base)]) == 0
    assert main(["eval", "--task", "tiny", "--prompts", str(prompts), "--num_samples", "2", "--save_dir", str(trained),
                 "--lora", str(run / "checkpoint-6"), "--compare_to", str(base)]) == 0
    result = json.loads((trained / "eval.json").read_text())
    assert [(v["prompt_index"], v["seed"]) for v in result["videos"]] == [(0, 0), (0, 1), (1, 1000), (1, 1001)]
    assert "by_attribute" not in result  # the Shapes grammar's breakdown comes only with the shapes reward
    for v in result["videos"]:
        frames = read_mp4(trained / v["video"])
        assert frames.shape == (5, 64, 64, 3)
        assert v["brightness"] == pytest.approx(brightness(__import__("torch").from_numpy(frames)), abs=5e-3)
    values = [v["brightness"] for v in result["videos"]]
    summary = result["summary"]["brightness"]
    assert summary["mean"] == pytest.approx(np.mean(values))
    assert summary["stderr"] == pytest.approx(np.std(values, ddof=1) / 2)
    # two prompts of two videos: over prompts, the standard error of the two prompt means
    assert summary["prompts"] == 2
    prompt_means = [np.mean(values[:2]), np.mean(values[2:])]
    assert summary["prompt_stderr"] == pytest.approx(np.std(prompt_means, ddof=1) / 2**0.5)
    with (trained / "eval.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [float(r["brightness"]) for r in rows] == pytest.approx(values)
    table = json.loads((trained / "compare.json").read_text())["brightness"]
    base_values = [v["brightness"] for v in json.loads((base / "eval.json").read_text())["videos"]]
    assert table["base"] == pytest.approx(np.mean(base_values))
    assert table["delta"] == pytest.approx(np.mean(values) - np.mean(base_values))
    assert abs(table["delta"]) > 1e-4  # the LoRA changed the videos
    deltas = np.subtract(values, base_values)
    delta_means = [deltas[:2].mean(), deltas[2:].mean()]
    assert table["delta_prompt_stderr"] == pytest.approx(np.std(delta_means, ddof=1) / 2**0.5)
    assert (table["n"], table["prompts"]) == (4, 2)
    assert "| brightness |" in (trained / "compare.md").read_text()
    grid = read_mp4(trained / "compare" / "prompt_000.mp4")
    assert grid.shape == (5, 64, 128, 3)  # base | trained side by side


def test_eval_interval_logs_held_out_means(trained_run):
    _, run = trained_run
    rows = read_metrics(run)
    logged = [r["step"] for r in rows if "eval_brightness_mean" in r]
    assert logged == [3, 6]


def test_report_writes_plots_and_html(trained_run):
    _, run = trained_run
    assert main(["report", str(run)]) == 0
    import matplotlib.image

    for name in ("rewards", "eval", "policy", "gradients", "timing"):
        path = run / "report" / f"{name}.png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert matplotlib.image.imread(path).shape[0] > 100
    page = (run / "report" / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "../samples/step-000003.mp4" in page


def test_eval_and_report_bad_input(tmp_path, capsys):
    assert main(["eval", "--task", "tiny", "--lora", str(tmp_path / "nope"), "--save_dir", str(tmp_path / "e")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
    assert main(["train", "--task", "tiny", "--eval_interval", "2", "--save_dir", str(tmp_path / "t")]) == 2
    assert "needs --eval_prompts" in capsys.readouterr().err


def test_batched_eval_gives_the_one_at_a_time_scores(tmp_path):
    """--batch_size samples several videos per model call (the last batch padded); each video's score
    is the one-at-a-time score up to float rounding, in the same (prompt, seed) order and files."""
    rows = {}
    for b in (1, 4):
        out = tmp_path / f"b{b}"
        assert main(["eval", "--task", "tiny", "--reward", "brightness", "--num_samples", "3", "--batch_size", str(b),
                     "--save_dir", str(out)]) == 0
        rows[b] = json.loads((out / "eval.json").read_text())["videos"]
    assert len(rows[1]) == len(rows[4]) == 15  # five built-in prompts x 3 seeds; 15 = 3 batches of 4 + 3
    for one, batched in zip(rows[1], rows[4]):
        assert (one["prompt"], one["seed"], one["video"]) == (batched["prompt"], batched["seed"], batched["video"])
        assert batched["brightness"] == pytest.approx(one["brightness"], abs=1e-4)
    values = sorted(r["brightness"] for r in rows[1])
    assert min(b - a for a, b in zip(values, values[1:])) > 2e-4  # distinct videos: a mix-up would show


def test_prompt_stderr_against_the_cluster_sandwich_in_float64():
    """The error over prompts: the cluster-robust (sandwich) standard error of a mean, clusters = prompts."""
    from wan_grpo.evaluate import prompt_stderr, stderr

    rng = np.random.default_rng(0)
    prompts = [f"p{i}" for i in rng.integers(0, 6, size=40)]  # unequal videos per prompt
    effect = {p: rng.normal() for p in set(prompts)}
    values = [effect[p] + 0.3 * rng.normal() for p in prompts]  # videos of a prompt move together
    x, mean = np.asarray(values, dtype=np.float64), np.mean(values, dtype=np.float64)
    sums = [sum(x[i] - mean for i in range(len(x)) if prompts[i] == p) for p in sorted(set(prompts))]
    g = len(sums)
    want = np.sqrt(g / (g - 1) * sum(s * s for s in sums)) / len(x)
    assert prompt_stderr(values, prompts) == pytest.approx(want, rel=1e-12)
    assert prompt_stderr(values, prompts) > 1.5 * stderr(values)  # the per-video error understates it here
    # one video per prompt: the per-video error; equal videos per prompt: the error of the prompt means
    assert prompt_stderr(values, [str(i) for i in range(40)]) == pytest.approx(stderr(values), rel=1e-12)
    means = [np.mean(values[4 * k:4 * k + 4]) for k in range(10)]
    assert prompt_stderr(values, [str(i // 4) for i in range(40)]) == pytest.approx(stderr(means), rel=1e-12)
    assert prompt_stderr(values, ["one"] * 40) == 0.0
    with pytest.raises(ValueError):
        prompt_stderr(values, prompts[:-1])
