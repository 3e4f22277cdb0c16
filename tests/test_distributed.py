"""torchrun + FSDP2 (gloo, CPU): the same results on 1 and 2 processes, resume across world sizes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from wan_grpo.cli import main
from wan_grpo.grpo.metrics import read_metrics

COMMON = ["--task", "tiny", "--num_generations", "4", "--lora_rank", "0", "--learning_rate", "1e-4",
          "--num_epochs", "10", "--tensorboard", "false", "--dit_fsdp", "true"]
TIMING = {"rollout_seconds", "reward_seconds", "train_seconds"}


def torchrun(*args, nproc=2, timeout=240, cpu_context_parallel=False):
    # cpu_context_parallel: run the CLI through the test shim that lets diffusers' Ulysses run on CPU
    entry = [str(Path(__file__).with_name("cpu_context_parallel.py"))] if cpu_context_parallel else ["-m", "wan_grpo"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           *entry, "train", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)  # a hang fails, never blocks CI
    return out.returncode, out.stdout + out.stderr


def weights(ckpt, sub):
    return load_file(ckpt / sub / "diffusion_pytorch_model.safetensors")


def assert_same_rows(a, b, *, tol=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ra.keys() - TIMING:
            va, vb = ra[key], rb[key]
            if isinstance(va, float):
                assert va == pytest.approx(vb, rel=tol, abs=tol), (ra["step"], key, va, vb)
            else:
                assert va == vb, (ra["step"], key)


@pytest.fixture(scope="module")
def two_proc_run(tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("dist") / "two"
    rc, log = torchrun(*COMMON, "--max_steps", "3", "--save_interval", "1", "--save_dir", str(save_dir))
    assert rc == 0, log[-3000:]
    return save_dir


def test_two_processes_equal_one_process(tmp_path, two_proc_run):
    one = tmp_path / "one"
    assert main(["train", *COMMON, "--max_steps", "3", "--save_interval", "1", "--save_dir", str(one)]) == 0
    rows_2, rows_1 = read_metrics(two_proc_run), read_metrics(one)
    assert len(rows_2) == 3
    assert [r["reward_mean"] for r in rows_2] == pytest.approx([r["reward_mean"] for r in rows_1], abs=1e-6)
    assert all(r["trained_steps_high"] > 0 and r["trained_steps_low"] > 0 for r in rows_2)
    from wan_grpo.models.tiny import build_tiny_components

    init = build_tiny_components(0)
    initial = {"transformer": init.transformer.state_dict(), "transformer_2": init.transformer_2.state_dict()}
    for sub in ("transformer", "transformer_2"):
        a, b = weights(two_proc_run / "checkpoint-1", sub), weights(one / "checkpoint-1", sub)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
        assert any(not torch.equal(a[k], initial[sub][k]) for k in a), f"{sub} was not trained"


def test_resume_across_world_sizes(tmp_path, two_proc_run):
    full = tmp_path / "full"
    assert main(["train", *COMMON, "--max_steps", "4", "--save_dir", str(full)]) == 0
    reference = read_metrics(full)

    # stopped on 2 processes at step 2 (checkpoint-2 of the shared run), resumed on 1
    resumed_on_1 = tmp_path / "r1"
    assert main(["train", *COMMON, "--max_steps", "4", "--save_dir", str(resumed_on_1),
                 "--resume", str(two_proc_run / "checkpoint-2")]) == 0
    assert_same_rows(read_metrics(resumed_on_1), reference[2:])

    # stopped on 1 process at step 2, resumed on 2
    part = tmp_path / "part"
    assert main(["train", *COMMON, "--max_steps", "2", "--save_dir", str(part)]) == 0
    rc, log = torchrun(*COMMON, "--max_steps", "4", "--save_dir", str(part), "--resume", "auto")
    assert rc == 0, log[-3000:]
    assert_same_rows(read_metrics(part), reference)
    for sub in ("transformer", "transformer_2"):
        a, b = weights(part / "checkpoint-4", sub), weights(full / "checkpoint-4", sub)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_nft_on_two_processes_equals_one_process(tmp_path):
    """DiffusionNFT under FSDP2 (the old policy sharded like the weights, LoRA with gradient checkpointing
    and a KL term, two optimizer steps per rollout): the same rewards and weights as one process."""
    args = ["--task", "tiny", "--algorithm", "nft", "--dit_fsdp", "--num_generations", "2", "--batch_size", "2",
            "--max_steps", "4", "--optimizer_steps_per_rollout", "2", "--lora_rank", "4", "--learning_rate", "1e-3",
            "--gradient_checkpointing", "--kl_coef", "0.1", "--timestep_fraction", "0.5", "--tensorboard", "false"]
    rc, log = torchrun(*args, "--save_dir", str(tmp_path / "two"))
    assert rc == 0, log[-3000:]
    assert main(["train", *args, "--save_dir", str(tmp_path / "one")]) == 0
    rows_2, rows_1 = read_metrics(tmp_path / "two"), read_metrics(tmp_path / "one")
    assert [r["reward_mean"] for r in rows_2] == pytest.approx([r["reward_mean"] for r in rows_1], abs=1e-6)
    assert [r["loss_positive"] for r in rows_2] == pytest.approx([r["loss_positive"] for r in rows_1], rel=1e-4)
    assert rows_2[-1]["kl"] > 0 and rows_2[-1]["old_deviation"] > 0
    for key in ("grad_norm_high", "grad_norm_low"):
        assert [r[key] for r in rows_2] == pytest.approx([r[key] for r in rows_1], rel=1e-4)
    for sub in ("transformer", "transformer_2"):
        name = "pytorch_lora_weights.safetensors"
        a = load_file(tmp_path / "two" / "checkpoint-4" / sub / name)
        b = load_file(tmp_path / "one" / "checkpoint-4" / sub / name)
        diff = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5 / sum((b[k] ** 2).sum() for k in b) ** 0.5
        assert diff <= 2e-5  # float reordering across processes (measured 8e-7 and 5e-6), as for GRPO


def test_uneven_split_is_rejected_up_front(tmp_path):
    rc, log = torchrun(*COMMON, "--num_generations", "3", "--save_dir", str(tmp_path / "x"), timeout=120)
    assert rc != 0
    assert "3 samples do not split over 2 processes" in log


def test_several_processes_need_fsdp(tmp_path):
    rc, log = torchrun("--task", "tiny", "--num_generations", "2", "--save_dir", str(tmp_path / "y"), timeout=120)
    assert rc != 0 and "need --dit_fsdp" in log


def test_lora_gradient_checkpointing_kl_and_several_optimizer_steps_under_fsdp(tmp_path):
    save_dir = tmp_path / "lora"
    rc, log = torchrun("--task", "tiny", "--dit_fsdp", "--num_generations", "2", "--batch_size", "2",
                       "--max_steps", "4", "--optimizer_steps_per_rollout", "2", "--lora_rank", "4",
                       "--learning_rate", "2e-2", "--gradient_checkpointing", "--kl_coef", "0.1",
                       "--tensorboard", "false", "--save_dir", str(save_dir))
    assert rc == 0, log[-3000:]
    rows = read_metrics(save_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["kl"] == 0 and rows[-1]["kl"] > 0
    assert abs(rows[0]["ratio_mean"] - 1) <= 1e-6 and abs(rows[1]["ratio_mean"] - 1) > 1e-7
    for sub in ("transformer", "transformer_2"):
        lora = load_file(save_dir / "checkpoint-4" / sub / "pytorch_lora_weights.safetensors")
        assert lora and all(k.startswith("transformer.") and "lora_" in k for k in lora)
        assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)


def test_single_process_fsdp_leaves_the_environment_alone(tmp_path):
    import os

    before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    assert main(["train", *COMMON, "--max_steps", "1", "--save_dir", str(tmp_path / "env")]) == 0
    assert {k: os.environ.get(k) for k in before} == before
    assert not torch.distributed.is_initialized()


def test_ulysses_splits_each_video_and_keeps_outputs_and_gradients(tmp_path):
    """diffusers' context parallelism under our FSDP2, over gloo (the CPU test switch)."""
    import os

    env = {**os.environ, "WAN_GRPO_CPU_CONTEXT_PARALLEL": "1"}
    script = Path(__file__).with_name("cp_check.py")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script)], capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert "OK tokens per rank 16 of 32" in out.stdout


def test_ulysses_training_equals_one_process(tmp_path, monkeypatch):
    """2 processes as one context-parallel group (--ulysses_size 2) == 1 process: same rewards,
    gradient norms and weights."""
    monkeypatch.setenv("WAN_GRPO_CPU_CONTEXT_PARALLEL", "1")
    args = [*COMMON, "--max_steps", "2", "--save_interval", "1"]
    rc, log = torchrun(*args, "--ulysses_size", "2", "--save_dir", str(tmp_path / "cp"), cpu_context_parallel=True)
    assert rc == 0, log[-3000:]
    assert "Ulysses: each video's tokens split over 2 ranks" in log
    assert main(["train", *args, "--save_dir", str(tmp_path / "one")]) == 0
    rows_cp, rows_1 = read_metrics(tmp_path / "cp"), read_metrics(tmp_path / "one")
    for a, b in zip(rows_cp, rows_1):
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], abs=1e-6)
        for key in ("grad_norm_high", "grad_norm_low", "kept_samples", "trained_steps_high", "trained_steps_low"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    for sub in ("transformer", "transformer_2"):
        a, b = weights(tmp_path / "cp" / "checkpoint-2", sub), weights(tmp_path / "one" / "checkpoint-2", sub)
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5


def test_ulysses_is_refused_on_cpu(capsys):
    assert main(["train", "--task", "tiny", "--ulysses_size", "2"]) == 2
    assert "needs CUDA" in capsys.readouterr().err


def test_resume_on_two_processes_when_an_expert_has_had_no_gradient(tmp_path):
    """--sde_window 0:1 never reaches transformer_2, so the sharded checkpoint holds no optimizer state for it;
    stopped and resumed on 2 processes, the run equals one straight run on 1 process."""
    args = [*COMMON, "--sde_window", "0:1", "--learning_rate", "1e-2"]
    straight = tmp_path / "straight"
    assert main(["train", *args, "--max_steps", "2", "--save_interval", "1", "--save_dir", str(straight)]) == 0
    assert all(r["trained_steps_low"] == 0 and r["trained_steps_high"] > 0 for r in read_metrics(straight))
    part = tmp_path / "part"
    for steps, extra in (("1", ()), ("2", ("--resume", "auto"))):
        rc, log = torchrun(*args, "--max_steps", steps, "--save_dir", str(part), *extra)
        assert rc == 0, log[-3000:]
    assert_same_rows(read_metrics(part), read_metrics(straight))
    a, b = weights(part / "checkpoint-2", "transformer_2"), weights(straight / "checkpoint-2", "transformer_2")
    assert all(torch.equal(a[k], b[k]) for k in a)  # never trained, on either run
    a, b = weights(part / "checkpoint-2", "transformer"), weights(straight / "checkpoint-2", "transformer")
    before = weights(straight / "checkpoint-1", "transformer")
    norm = lambda d: sum((v.double() ** 2).sum() for v in d) ** 0.5  # noqa: E731
    # the second step's update, matched to float reordering across processes (a lost Adam state misses by ~1)
    assert norm(a[k] - b[k] for k in a) <= 1e-3 * norm(b[k] - before[k] for k in b)
