"""DiffusionNFT (--algorithm nft): the loss against a float64 transcription and its gradient's meaning,
the old policy, and runs on the tiny model: metrics, experts, exact resume, the settings it refuses."""

import pytest
import torch
from safetensors.torch import load_file

from wan_grpo.cli import main
from wan_grpo.grpo.metrics import read_metrics
from wan_grpo.grpo.nft import nft_loss, old_decay, reward_weight

FAST = ["--algorithm", "nft", "--num_generations", "4", "--tensorboard", "false",
        "--log_interval", "0", "--num_epochs", "10"]
SHAPE = (3, 4, 2, 5, 6)


def train(tmp_path, name, *args):
    save_dir = tmp_path / name
    assert main(["train", *FAST, "--save_dir", str(save_dir), *args]) == 0
    return save_dir, read_metrics(save_dir)


def weights(ckpt, sub, lora=False):
    name = "pytorch_lora_weights.safetensors" if lora else "diffusion_pytorch_model.safetensors"
    return load_file(ckpt / sub / name)


# ----------------------------------------------------------------------------- the math


def reference_loss(v, v_old, x_t, x0, t, r, beta, c):
    """NVlabs/DiffusionNFT's formulas, one sample at a time, float64."""
    out = []
    for b in range(len(v)):
        pos = x_t[b] - t[b] * (beta * v[b] + (1 - beta) * v_old[b])
        neg = x_t[b] - t[b] * ((1 + beta) * v_old[b] - beta * v[b])
        lp = ((pos - x0[b]) ** 2).mean() / (pos - x0[b]).abs().mean().clamp_min(1e-5)
        ln = ((neg - x0[b]) ** 2).mean() / (neg - x0[b]).abs().mean().clamp_min(1e-5)
        out.append((r[b] * lp + (1 - r[b]) * ln) / beta * c)
    return torch.stack(out)


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    v, v_old, x0, eps = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(4))
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * eps
    return v, v_old, x_t, x0, t


@pytest.mark.parametrize("beta", [1.0, 0.1])
def test_loss_matches_the_reference_formulas(beta):
    v, v_old, x_t, x0, t = tensors()
    r = torch.tensor([1.0, 0.3, 0.0], dtype=torch.float64)
    out = nft_loss(v, v_old, x_t, x0, t, r, beta=beta, clip_max=5.0)
    torch.testing.assert_close(out.loss, reference_loss(v, v_old, x_t, x0, t, r, beta, 5.0), rtol=1e-12, atol=0)
    assert out.old_deviation.tolist() == pytest.approx(((v - v_old) ** 2).mean(dim=(1, 2, 3, 4)).tolist())


def test_at_the_old_policy_the_gradient_pulls_good_samples_in_and_pushes_bad_ones_out():
    """With v = v_old both implicit policies equal v_old, and d loss / d v = c (2r - 1) times the gradient
    of the weighted x0 error of v alone: r = 1 descends toward the sample, r = 0 ascends, r = 1/2 is 0."""
    _, v_old, x_t, x0, t = tensors(1)
    r = torch.tensor([1.0, 0.0, 0.5], dtype=torch.float64)
    v = v_old.clone().requires_grad_(True)
    nft_loss(v, v_old, x_t, x0, t, r, beta=0.7, clip_max=5.0).loss.sum().backward()
    u = v_old.clone().requires_grad_(True)
    err = x_t - t.view(-1, 1, 1, 1, 1) * u - x0
    weight = err.detach().abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    ((err**2) / weight).mean(dim=(1, 2, 3, 4)).sum().backward()
    for b, sign in enumerate((1.0, -1.0, 0.0)):
        torch.testing.assert_close(v.grad[b], 5.0 * sign * u.grad[b], rtol=1e-10, atol=1e-12)


def test_reward_weight_and_decay_schedules():
    adv = torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 10.0])
    assert reward_weight(adv, 5.0).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
    assert [old_decay(k, 0) for k in (0, 100)] == [0.0, 0.0]
    assert [old_decay(k, 1) for k in (0, 100, 1000)] == pytest.approx([0.0, 0.1, 0.5])
    assert [old_decay(k, 2) for k in (0, 75, 175, 10_000)] == pytest.approx([0.0, 0.0, 0.75, 0.999])


# ----------------------------------------------------------------------------- runs


def test_nft_run_logs_its_terms_and_trains_both_experts(tmp_path):
    save_dir, rows = train(tmp_path, "run", "--max_steps", "2", "--lora_rank", "0", "--learning_rate", "1e-3")
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("loss", "loss_positive", "loss_negative", "old_deviation", "old_decay"):
            assert row[key] == row[key], key  # finite (not NaN)
        assert row["trained_steps_high"] > 0 and row["trained_steps_low"] > 0
    assert rows[0]["old_deviation"] == 0  # the first update starts at the old policy
    assert rows[1]["old_deviation"] > 0  # old <- d old + (1 - d) new with d = 0.001 after step 1
    from wan_grpo.models.tiny import build_tiny_components

    init = build_tiny_components(0)
    for sub, model in (("transformer", init.transformer), ("transformer_2", init.transformer_2)):
        after = weights(save_dir / "checkpoint-2", sub)
        assert max((after[k] - v).abs().max().item() for k, v in model.state_dict().items()) > 0


def test_noise_draws_replay_each_level_with_fresh_noise(tmp_path):
    """--nft_noise_draws D trains every (sample, level) D times in the same optimizer step, each copy
    with its own noise from the sample's stream."""
    from wan_grpo.grpo.nft_update import draw_noise

    rows = torch.tensor([[0, 1], [0, 1], [1, 2], [1, 2]])
    noise = draw_noise(rows, [7, 8], (2, 3))
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise[2], noise[3])
    assert torch.equal(noise, draw_noise(rows, [7, 8], (2, 3)))
    args = ("--max_steps", "1", "--lora_rank", "0", "--timestep_fraction", "0.5")
    _, once = train(tmp_path, "once", *args)
    _, twice = train(tmp_path, "twice", *args, "--nft_noise_draws", "2")
    for expert in ("high", "low"):
        assert twice[0][f"trained_steps_{expert}"] == 2 * once[0][f"trained_steps_{expert}"] > 0
    assert twice[0]["loss"] != once[0]["loss"]


def test_nft_trains_only_the_chosen_expert(tmp_path):
    save_dir, rows = train(tmp_path, "high", "--max_steps", "1", "--lora_rank", "0", "--train_experts", "high")
    assert rows[0]["trained_steps_low"] == 0 and rows[0]["grad_norm_low"] == 0
    assert not (save_dir / "checkpoint-1" / "transformer_2").exists()


@pytest.mark.parametrize("lora", [False, True])
def test_nft_resume_is_exact(tmp_path, tiny_ckpt, lora):
    """The old policy samples the next rollout, so it is part of the saved state: a resumed run equals the
    straight one bit for bit (LoRA on a checkpoint folder, and full fine-tuning)."""
    mode = ["--ckpt_dir", str(tiny_ckpt), "--reward", "brightness", "--size", "64*48", "--frame_num", "5",
            "--sampling_steps", "6", "--lora_rank", "4", "--learning_rate", "5e-2"] if lora \
        else ["--lora_rank", "0", "--learning_rate", "1e-2"]
    common = (*mode, "--nft_decay_type", "1", "--timestep_fraction", "0.5")
    full_dir, full = train(tmp_path, "full", *common, "--max_steps", "3")
    part_dir, _ = train(tmp_path, "part", *common, "--max_steps", "2")
    _, resumed = train(tmp_path, "part", *common, "--max_steps", "3", "--resume", "auto")
    timing = {"rollout_seconds", "reward_seconds", "train_seconds"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(full)
    for sub in ("transformer", "transformer_2"):
        a, b = weights(full_dir / "checkpoint-3", sub, lora), weights(part_dir / "checkpoint-3", sub, lora)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_nft_checkpoint_does_not_resume_as_grpo(tmp_path, capsys):
    save_dir, _ = train(tmp_path, "run", "--max_steps", "1", "--lora_rank", "0")
    argv = ["train", *FAST, "--save_dir", str(save_dir), "--lora_rank", "0", "--max_steps", "2",
            "--resume", "auto", "--algorithm", "grpo"]
    assert main(argv) == 2
    assert "resume with --algorithm nft" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--algorithm", "grpo", "--sample_solver", "unipc"], "GRPO needs the log-probs of SDE steps"),
    (["--share_noise", "true"], "makes every video of a group the same"),
    (["--offload_model", "true"], "not supported with --algorithm nft"),
    (["--algorithm", "grpo", "--nft_noise_draws", "2"], "--nft_noise_draws is for --algorithm nft"),
])
def test_nft_settings_refused_up_front(tmp_path, capsys, argv, message):
    assert main(["train", *FAST, "--save_dir", str(tmp_path / "x"), *argv]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and message in err[0], err
