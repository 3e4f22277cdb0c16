"""Preemption, crash safety and long runs: SIGTERM mid-run, kill -9 (also inside checkpoint writes),
damaged checkpoints, a full disk, --keep_checkpoints, and memory / open files over many steps."""

import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wan_grpo.cli import main
from wan_grpo.grpo.checkpoint import latest_checkpoint, resolve_resume
from wan_grpo.grpo.metrics import read_metrics
from wan_grpo.grpo.preemption import PREEMPTED_EXIT

RUN = ["--task", "tiny", "--num_generations", "2", "--batch_size", "2", "--sampling_steps", "4", "--size", "32*32",
       "--lora_rank", "4", "--learning_rate", "1e-2", "--tensorboard", "false", "--num_epochs", "50"]
TIMING = {"rollout_seconds", "reward_seconds", "train_seconds"}
STEPS = 6


def lora(ckpt: Path) -> dict:
    return {f"{sub}/{k}": v for sub in ("transformer", "transformer_2")
            for k, v in load_file(ckpt / sub / "pytorch_lora_weights.safetensors").items()}


def rows_of(save_dir) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(save_dir)]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("rel") / "straight"
    assert main(["train", *RUN, "--max_steps", str(STEPS), "--save_dir", str(save_dir)]) == 0
    return save_dir


def start_train(save_dir, *extra, env=None):
    cmd = [sys.executable, "-m", "wan_grpo", "train", *RUN, "--max_steps", str(STEPS), "--save_dir", str(save_dir),
           "--resume", "auto", *extra]
    env = {**(env or {}), "WAN_GRPO_TEST_STEP_DELAY": "0.3"}  # ~0.1 s steps would end before most signals
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **env})


def wait_for_training(proc, save_dir, timeout=120):
    """Until the loop runs (first metrics row written), or the process ended."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if (save_dir / "metrics.jsonl").is_file():
            return
        time.sleep(0.05)


def finish(save_dir) -> None:
    assert main(["train", *RUN, "--max_steps", str(STEPS), "--save_dir", str(save_dir), "--resume", "auto"]) == 0


def assert_same_as_straight(save_dir, straight) -> None:
    assert rows_of(save_dir) == rows_of(straight)
    a, b = lora(save_dir / f"checkpoint-{STEPS}"), lora(straight / f"checkpoint-{STEPS}")
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_sigterm_at_random_moments_stops_cleanly_and_resumes_exactly(tmp_path, straight):
    rng = random.Random(0)
    preempted = 0
    for trial in range(10):
        save_dir = tmp_path / f"t{trial}"
        proc = start_train(save_dir, "--save_interval", "100")
        wait_for_training(proc, save_dir)
        time.sleep(rng.uniform(0, 2))  # the run takes ~2.5 s from here
        sig = rng.choice([signal.SIGTERM, signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode in (0, PREEMPTED_EXIT), out[-2000:]
        if proc.returncode == PREEMPTED_EXIT:
            preempted += 1
            assert "resume with --resume auto" in out
        assert latest_checkpoint(save_dir) is not None  # every run leaves a checkpoint
        finish(save_dir)
        assert_same_as_straight(save_dir, straight)
    assert preempted >= 5  # most signals land before the last rollout


@pytest.mark.slow
def test_kill_9_at_random_moments_loses_at_most_the_work_since_the_last_checkpoint(tmp_path, straight):
    rng = random.Random(1)
    inside_writes = 0
    for trial in range(20):
        save_dir = tmp_path / f"k{trial}"
        slow = {"WAN_GRPO_TEST_CHECKPOINT_DELAY": "0.4"} if trial % 2 else {}
        for _ in range(3):  # kill it up to three times on the way
            proc = start_train(save_dir, "--save_interval", "1", env=slow)
            wait_for_training(proc, save_dir)
            time.sleep(rng.uniform(0, 3))
            if proc.poll() is None:
                inside_writes += any(save_dir.glob(".checkpoint-*.tmp"))
                proc.kill()
            proc.communicate(timeout=60)
        finish(save_dir)
        assert_same_as_straight(save_dir, straight)
    assert inside_writes >= 3  # some kills landed inside a checkpoint write


def _two_checkpoints(tmp_path) -> Path:
    save_dir = tmp_path / "two"
    assert main(["train", *RUN, "--max_steps", "2", "--save_interval", "1", "--save_dir", str(save_dir)]) == 0
    return save_dir


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog, damage):
    save_dir = _two_checkpoints(tmp_path)
    victim = next((save_dir / "checkpoint-2" / "dcp").glob("*.distcp"))
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        victim.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:
        victim.unlink()
    assert resolve_resume("auto", save_dir) == save_dir / "checkpoint-1"
    assert "skipping" in caplog.text and "checkpoint-2" in caplog.text
    with pytest.raises(Exception) as err:
        resolve_resume(str(save_dir / "checkpoint-2"), save_dir)
    assert "is damaged" in str(err.value)
    # and the run goes on from checkpoint-1
    assert main(["train", *RUN, "--max_steps", "3", "--save_dir", str(save_dir), "--resume", "auto"]) == 0
    assert [r["step"] for r in read_metrics(save_dir)] == [1, 2, 3]


@pytest.mark.parametrize("where", ["training_state", "dcp"])
def test_a_full_disk_is_one_line_and_leaves_the_earlier_checkpoint(tmp_path, monkeypatch, capsys, where):
    from torch.distributed.checkpoint.api import CheckpointException

    from wan_grpo.grpo import checkpoint

    save_dir = tmp_path / "full"
    no_space = OSError(28, "No space left on device")
    if where == "training_state":  # the loop state of the second checkpoint fails
        real = torch.save

        def full_disk(obj, f, *args, **kwargs):
            if isinstance(f, (str, os.PathLike)) and ".checkpoint-2.tmp" in str(f):
                raise no_space
            return real(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", full_disk)
    else:  # DCP's shards of the second checkpoint fail, after writing part of them (as DCP reports it)
        real = checkpoint.dcp.save

        def full_disk(state, *, checkpoint_id):
            if ".checkpoint-2.tmp" in str(checkpoint_id):
                Path(checkpoint_id).mkdir(parents=True)
                (Path(checkpoint_id) / "__0_0.distcp").write_bytes(b"partial")
                raise CheckpointException("write_data", {0: (no_space, traceback.extract_stack())})
            return real(state, checkpoint_id=checkpoint_id)

        monkeypatch.setattr(checkpoint.dcp, "save", full_disk)
    rc = main(["train", *RUN, "--max_steps", "3", "--save_interval", "1", "--save_dir", str(save_dir)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wan-grpo")]
    assert rc == 2 and len(err) == 1, err
    assert "No space left on device" in err[0] and "checkpoint-1 is intact" in err[0]
    assert not list(save_dir.glob(".checkpoint-*"))  # the partial write is gone
    assert resolve_resume("auto", save_dir) == save_dir / "checkpoint-1"


def test_keep_checkpoints_and_a_save_dir_under_a_file(tmp_path, capsys):
    save_dir = tmp_path / "keep"
    assert main(["train", *RUN, "--max_steps", "4", "--save_interval", "1", "--keep_checkpoints", "2",
                 "--save_dir", str(save_dir)]) == 0
    assert sorted(p.name for p in save_dir.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert main(["train", *RUN, "--max_steps", "1", "--save_dir", str(a_file / "run")]) == 2
    err = capsys.readouterr().err
    assert "--save_dir" in err and a_file.read_text() == "x"


@pytest.mark.slow
def test_300_steps_do_not_grow_memory_or_open_files(tmp_path):
    save_dir = tmp_path / "long"
    cmd = [sys.executable, "-m", "wan_grpo", "train", *RUN, "--num_epochs", "200", "--max_steps", "300",
           "--sample_interval", "5",
           "--tensorboard", "true", "--log_interval", "0", "--save_interval", "50", "--keep_checkpoints", "1",
           "--save_dir", str(save_dir)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = {}  # step -> (rss kB, open files)
    try:
        while proc.poll() is None:
            steps = len(read_metrics(save_dir)) if (save_dir / "metrics.jsonl").is_file() else 0
            try:
                status = Path(f"/proc/{proc.pid}/status").read_text()
                rss = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
                fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
            except (FileNotFoundError, StopIteration, ProcessLookupError):
                break
            samples.setdefault(steps, (rss, fds))
            time.sleep(0.1)
    finally:
        proc.wait(timeout=900)
    assert proc.returncode == 0
    early = [v for s, v in samples.items() if 50 <= s < 150]
    late = [v for s, v in samples.items() if s >= 250]
    assert early and late, sorted(samples)
    # peaks against peaks: a checkpoint write or a sample video briefly holds more
    rss_early, rss_late = max(r for r, _ in early), max(r for r, _ in late)
    assert rss_late < 1.05 * rss_early, (rss_early, rss_late)
    # a leak raises the floor; a file open at the moment of a sample (a checkpoint, a video) does not
    assert min(f for _, f in late) <= min(f for _, f in early), samples
    assert max(f for _, f in late) <= max(f for _, f in early) + 2, samples
