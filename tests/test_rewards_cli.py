"""Reward plumbing: plug-ins, `wan-grpo score`, the reward server, and train with VideoAlign."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wan_grpo.cli import main
from wan_grpo.errors import UserError
from wan_grpo.grpo.metrics import read_metrics
from wan_grpo.rewards import build_rewards, parse_reward_spec
from wan_grpo.rewards.config import RewardConfig
from wan_grpo.rewards.remote import RemoteReward, RewardServerError, decode_batch, encode_batch
from wan_grpo.rewards.videoalign.tiny import save_tiny_videoreward
from wan_grpo.video import write_mp4

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))  # reward_plugins


@pytest.fixture(scope="module")
def videoreward(tmp_path_factory):
    reward_dir, base = save_tiny_videoreward(tmp_path_factory.mktemp("va"))
    return reward_dir, base


def _videos(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (9, 48, 64, 3), generator=g, dtype=torch.uint8) for _ in range(n)]


def test_reward_spec_parses_builtins_weights_and_plugins():
    want = [("brightness", 0.5), ("reward_plugins:dark", 1.0)]
    assert parse_reward_spec("brightness:0.5, reward_plugins:dark") == want
    assert parse_reward_spec("reward_plugins:Pair:2") == [("reward_plugins:Pair", 2.0)]
    with pytest.raises(UserError, match="unknown reward 'brightnes'"):
        parse_reward_spec("brightnes")
    with pytest.raises(UserError, match="give a finite number"):
        parse_reward_spec("brightness:nan")
    with pytest.raises(UserError, match="cannot import"):
        build_rewards(RewardConfig(reward="no_such_module:fn"), default="brightness")
    with pytest.raises(UserError, match="has no 'nope'"):
        build_rewards(RewardConfig(reward="reward_plugins:nope"), default="brightness")


def test_plugins_combine_with_weights_and_log_each_component():
    rewards = build_rewards(RewardConfig(reward="brightness:2,reward_plugins:dark:0.5,reward_plugins:Pair"),
                            default="brightness")
    videos = _videos()
    out = rewards(videos, ["a", "abc"], fps=8)
    assert set(out) == {"brightness", "dark", "prompt_len", "frames"}
    assert out["prompt_len"].tolist() == [1.0, 3.0]
    assert torch.allclose(out["dark"], 1 - out["brightness"])
    assert rewards.coefs == {"brightness": 2.0, "dark": 0.5, "prompt_len": 1.0, "frames": 1.0}
    expected = 2 * out["brightness"] + 0.5 * out["dark"] + out["prompt_len"] + out["frames"]
    assert torch.allclose(rewards.total(out), expected)
    with pytest.raises(UserError, match="both produce a component named 'brightness'"):
        build_rewards(RewardConfig(reward="brightness,brightness"), default="brightness")(videos, ["a", "b"], fps=8)


def test_score_cli_one_video_and_a_folder(videoreward, tmp_path, capsys):
    reward_dir, base = videoreward
    folder = tmp_path / "videos"
    for i, v in enumerate(_videos(3)):
        write_mp4(folder / f"v{i}.mp4", v.numpy(), fps=8)
    common = ["--reward_model_path", str(reward_dir), "--videoalign_base", str(base), "--device", "cpu"]
    assert main(["score", "--reward", "videoalign", *common, "--video", str(folder / "v0.mp4"),
                 "--prompt", "a cat"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(line) == {"VQ", "MQ", "TA", "Overall"}
    assert line["Overall"] == pytest.approx(line["VQ"] + line["MQ"] + line["TA"])
    (tmp_path / "prompts.txt").write_text("a cat\na dog\na cat\n")
    assert main(["score", *common, "--videos", str(folder), "--prompts", str(tmp_path / "prompts.txt")]) == 0
    rows = (folder / "scores.csv").read_text().splitlines()
    assert rows[0] == "video,prompt,VQ,MQ,TA,Overall" and len(rows) == 4
    first = rows[1].split(",")
    assert first[:2] == ["v0.mp4", "a cat"] and float(first[2]) == pytest.approx(line["VQ"], abs=1e-5)
    (tmp_path / "short.txt").write_text("a cat\n")
    assert main(["score", *common, "--videos", str(folder), "--prompts", str(tmp_path / "short.txt")]) == 2
    assert "3 mp4 files but" in capsys.readouterr().err


def test_batch_encoding_round_trips():
    videos = _videos(3)
    got, prompts, fps = decode_batch(encode_batch(videos, ["x", "y", "z"], 16))
    assert prompts == ["x", "y", "z"] and fps == 16.0
    assert all(torch.equal(a, b) for a, b in zip(videos, got))


def _start_server(*args, env_extra=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "wan_grpo", "reward-server", "--port", "0", "--device", "cpu",
                             *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:
        if "listening on" in line:
            return proc, line.strip().rsplit(" ", 1)[-1]
    proc.wait(timeout=10)
    raise AssertionError(f"the reward server did not start (exit {proc.returncode})")


def test_reward_server_returns_in_process_scores(videoreward):
    reward_dir, base = videoreward
    cfg = RewardConfig(reward="videoalign", reward_model_path=str(reward_dir), videoalign_base=str(base),
                       mq_coef=0.5)
    proc, url = _start_server("--reward", "videoalign", "--reward_model_path", str(reward_dir),
                              "--videoalign_base", str(base), "--mq_coef", "0.5")
    try:
        remote = build_rewards(RewardConfig(reward_url=url), default="videoalign")
        local = build_rewards(cfg, default="videoalign")
        videos, prompts = _videos(3), ["a cat", "a red car", "a cat"]
        a, b = remote(videos, prompts, fps=8), local(videos, prompts, fps=8)
        assert set(a) == {"VQ", "MQ", "TA"}
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6)
        assert remote.coefs == local.coefs == {"VQ": 1.0, "MQ": 0.5, "TA": 0.0}
    finally:
        proc.kill()
        proc.wait()
    with pytest.raises(UserError, match="no reward server answers"):
        build_rewards(RewardConfig(reward_url=url), default="videoalign")


def test_killed_server_is_retried_then_its_groups_are_dropped(tmp_path):
    proc, url = _start_server("--reward", "reward_plugins:dies_on_second_call")
    try:
        save_dir = tmp_path / "run"
        assert main(["train", "--task", "tiny", "--num_generations", "2", "--batch_size", "2", "--max_steps", "3",
                     "--tensorboard", "false", "--log_interval", "0", "--reward_url", url, "--reward_retries", "2",
                     "--reward_timeout", "20", "--save_dir", str(save_dir)]) == 0
    finally:
        proc.kill()
        proc.wait()
    rows = read_metrics(save_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]  # the run continued to the end
    assert math.isfinite(rows[0]["reward_mean"]) and rows[0]["unscored_groups"] == 0
    assert rows[0]["reward_dies_on_second_call_mean"] > 0
    assert rows[1]["unscored_groups"] == 2 and rows[2]["unscored_groups"] == 4  # both groups, each step
    assert rows[1]["reward_mean"] is None and rows[2]["skipped_updates"] == 2  # NaN is logged as null
    assert (save_dir / "checkpoint-3").is_dir()


def test_a_failed_first_batch_is_dropped_too():
    """/health names the server's components, so a batch can be dropped before any batch succeeded."""
    proc, url = _start_server("--reward", "brightness:2")
    try:
        remote = RemoteReward(url, timeout=5, retries=2, backoff=0.01, drop_on_failure=True)
        remote.check()
        assert remote.components == ("brightness",) and remote.coefs == {"brightness": 2.0}
    finally:
        proc.kill()
        proc.wait()
    out = remote(_videos(2), ["a", "b"], fps=8)
    assert set(out) == {"brightness"} and bool(torch.isnan(out["brightness"]).all())
    assert remote.failed_batches == 1


def test_remote_failure_raises_outside_training():
    remote = RemoteReward("http://127.0.0.1:9", timeout=1, retries=2, backoff=0.01)
    with pytest.raises(RewardServerError, match="failed 2 times"):
        remote(_videos(1), ["a"], fps=8)


def test_train_with_videoalign_end_to_end(videoreward, tmp_path):
    reward_dir, base = videoreward
    save_dir = tmp_path / "va"
    assert main(["train", "--task", "tiny", "--num_generations", "2", "--max_steps", "2", "--tensorboard", "false",
                 "--log_interval", "0", "--reward", "videoalign", "--reward_model_path", str(reward_dir),
                 "--videoalign_base", str(base), "--vq_coef", "1", "--mq_coef", "1", "--ta_coef", "1",
                 "--save_dir", str(save_dir)]) == 0
    rows = read_metrics(save_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for k in ("VQ", "MQ", "TA"):
        assert math.isfinite(rows[0][f"reward_{k}_mean"])
    assert rows[0]["reward_mean"] == pytest.approx(sum(rows[0][f"reward_{k}_mean"] for k in ("VQ", "MQ", "TA")),
                                                   abs=1e-5)
    assert rows[0]["advantage_abs_mean"] > 0
