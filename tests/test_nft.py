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


def test_with_r_and_beta_one_the_gradient_is_the_flow_matching_gradient_scaled():
    """r = 1, b = 1: v+ = v, so the loss is c * ||x_t - t v - x0||^2 / w with w the detached mean |error|,
    and x_t - t v - x0 = -t (v - (noise - x0)): the gradient is sft's flow-matching gradient on the same
    x_t times c t^2 / w, per sample, at any v (not only at the old policy)."""
    from wan_grpo.sft.loss import flow_matching_loss

    g = torch.Generator().manual_seed(2)
    x0, noise, v_old = (torch.randn(SHAPE, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.9, 0.5, 0.2], dtype=torch.float64)
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    v = torch.randn(SHAPE, generator=g, dtype=torch.float64, requires_grad=True)
    c = 5.0
    nft_loss(v, v_old, x_t, x0, t, torch.ones(3, dtype=torch.float64), beta=1.0, clip_max=c).loss.sum().backward()
    u = v.detach().clone().requires_grad_(True)
    flow_matching_loss(u, x0, noise).sum().backward()  # sft's loss (float32 inside)
    w = (x_t - t.view(-1, 1, 1, 1, 1) * v.detach() - x0).abs().mean(dim=(1, 2, 3, 4))
    for b in range(3):
        torch.testing.assert_close(v.grad[b], (c * t[b] ** 2 / w[b]) * u.grad[b].double(), rtol=1e-5, atol=1e-9)
    assert v.grad.abs().sum() > 0


def test_reward_weight_and_decay_schedules():
    adv = torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 10.0])
    assert reward_weight(adv, 5.0).tolist() == [0.0, 0.0, 0.5, 0.75, 1.0, 1.0]
    assert [old_decay(k, 0) for k in (0, 100)] == [0.0, 0.0]
    assert [old_decay(k, 1) for k in (0, 100, 1000)] == pytest.approx([0.0, 0.1, 0.5])
    assert [old_decay(k, 2) for k in (0, 75, 175, 10_000)] == pytest.approx([0.0, 0.0, 0.75, 0.999])


def _nft_parts(tiny_components):
    import copy

    from wan_grpo.grpo.config import TrainConfig
    from wan_grpo.grpo.policy import build_policy
    from wan_grpo.models.denoiser import MoEDenoiser

    c = copy.deepcopy(tiny_components)
    cfg = TrainConfig(task="tiny", algorithm="nft", lora_rank=0, learning_rate=1e-3, timestep_fraction=1.0,
                      train_batch_size=8)
    policy = build_policy(c, cfg, device=torch.device("cpu"))
    policy.keep_old_copy()
    return c, cfg, policy, MoEDenoiser(c, guidance_scale=1.0)


@pytest.mark.parametrize("levels", ["high", "low", "both"])
def test_nft_update_trains_each_noise_level_with_the_expert_that_owns_it(tiny_components, levels):
    """The update's owners are sampling's routing (denoiser.expert_index): levels at or above the boundary
    move only `transformer`, those below only `transformer_2`, and every row is counted for its owner."""
    from wan_grpo.distributed import DistInfo
    from wan_grpo.grpo.nft_update import nft_update
    from wan_grpo.sampling.schedule import flow_match_schedule

    c, cfg, policy, denoiser = _nft_parts(tiny_components)
    schedule = flow_match_schedule(6, shift=5.0)
    owners = torch.tensor([denoiser.expert_index(float(t)) for t in schedule.timesteps], dtype=torch.long)
    keep = {"high": owners == 0, "low": owners == 1, "both": torch.ones_like(owners, dtype=torch.bool)}[levels]
    assert keep.any() and (levels != "both" or (owners == 0).any() and (owners == 1).any())
    timesteps, owners = schedule.timesteps[keep], owners[keep]
    sigmas = torch.cat([schedule.sigmas[:-1][keep], torch.zeros(1)])
    before = {name: {k: v.clone() for k, v in getattr(c, name).state_dict().items()}
              for name in ("transformer", "transformer_2")}
    n = 4
    cond = torch.randn(n, 512, 32, generator=torch.Generator().manual_seed(1))
    x0 = torch.randn(n, 16, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    [stats] = nft_update(denoiser, policy, x0, list(range(n)), torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.ones(n),
                         cond, timesteps=timesteps, sigmas=sigmas, owners=owners, cfg=cfg, dist=DistInfo(),
                         device=torch.device("cpu"))
    changed = {name: any(not torch.equal(v, before[name][k]) for k, v in getattr(c, name).state_dict().items())
               for name in before}
    for label, name, slot in (("high", "transformer", 0), ("low", "transformer_2", 1)):
        rows = n * int((owners == slot).sum())
        assert stats.trained_steps[label] == rows
        assert changed[name] == (rows > 0) and (stats.grad_norm[label] > 0) == (rows > 0)


def test_soft_update_of_the_old_policy_matches_its_formula(tiny_components):
    """old <- d old + (1 - d) new, parameter by parameter; old_weights() swaps the old values in and puts the
    current ones back bit for bit."""
    _, _, policy, _ = _nft_parts(tiny_components)
    params = dict(policy.trained_named_parameters())
    old = {k: v.clone() for k, v in policy.old.items()}
    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    new = {k: p.detach().clone() for k, p in params.items()}
    policy.soft_update_old(0.3)
    for k in params:
        torch.testing.assert_close(policy.old[k].double(), 0.3 * old[k].double() + 0.7 * new[k].double(),
                                   rtol=1e-6, atol=1e-6)
    with policy.old_weights():
        assert all(torch.equal(p, policy.old[k]) for k, p in params.items())
    assert all(torch.equal(p, new[k]) for k, p in params.items())
    policy.soft_update_old(0.0)  # DiffusionNFT's decay type 0: the old policy is the new one
    assert all(torch.equal(policy.old[k], new[k]) for k in params)


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


def test_log_line_shows_nft_its_policy_drift_and_grpo_its_ratio(caplog):
    from wan_grpo.grpo.metrics import log_row

    common = {"step": 3, "reward_mean": 0.5, "reward_std": 0.1, "loss": 0.2, "grad_norm_high": 1.0,
              "grad_norm_low": 2.0, "rollout_seconds": 1.0, "reward_seconds": 0.1, "train_seconds": 0.5}
    with caplog.at_level("INFO", logger="wan_grpo"):
        log_row({**common, "ratio_mean": float("nan"), "clipfrac": float("nan"), "old_deviation": 0.00123}, nft=True)
        log_row({**common, "ratio_mean": float("nan"), "clipfrac": float("nan")}, nft=True)  # a skipped update
        log_row({**common, "ratio_mean": 1.000002, "clipfrac": 0.25})
    nft, skipped, grpo = (r.getMessage() for r in caplog.records[-3:])
    assert "old_dev 0.00123" in nft and "nan" not in nft and "ratio" not in nft
    assert "old_dev nan" in skipped and "ratio" not in skipped
    assert "ratio 1.000002  clip 0.250" in grpo and "old_dev" not in grpo


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
def test_nft_resume_is_exact(tmp_path, tiny_ckpt, lora, caplog):
    """The old policy samples the next rollout, so it is part of the saved state: a resumed run equals the
    straight one bit for bit (LoRA on a checkpoint folder, and full fine-tuning)."""
    mode = ["--ckpt_dir", str(tiny_ckpt), "--reward", "brightness", "--size", "64*48", "--frame_num", "5",
            "--sampling_steps", "6", "--lora_rank", "4", "--learning_rate", "5e-2"] if lora \
        else ["--lora_rank", "0", "--learning_rate", "1e-2"]
    common = (*mode, "--nft_decay_type", "1", "--timestep_fraction", "0.5")
    full_dir, full = train(tmp_path, "full", *common, "--max_steps", "3")
    part_dir, _ = train(tmp_path, "part", *common, "--max_steps", "2")
    with caplog.at_level("WARNING", logger="wan_grpo"):
        _, resumed = train(tmp_path, "part", *common, "--max_steps", "3", "--resume", "auto")
    assert "not trained with" not in caplog.text  # what a model loader resolves is the same on resume
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
