"""`wan-grpo sft`: flow-matching loss and timestep density, expert routing, learning, LoRA export, resume."""

import logging

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from pipelines import pipeline_latents, tiny_pipeline
from safetensors.torch import load_file

from wan_grpo.cli import main
from wan_grpo.grpo.metrics import read_metrics
from wan_grpo.sft.loss import flow_matching_loss, noised, sample_timesteps, shift_sigma, unshift_sigma
from wan_grpo.video import write_mp4

TINY = ["--task", "tiny", "--size", "64*64", "--frame_num", "9", "--tensorboard", "false", "--log_interval", "0"]
SHAPES = [*TINY, "--dataset", "shapes:1", "--videos_per_prompt", "1", "--batch_size", "8", "--train_batch_size", "4"]
TIMING = {"step_seconds"}


def sft(tmp_path, name, *args):
    save_dir = tmp_path / name
    assert main(["sft", "--save_dir", str(save_dir), *args]) == 0
    return save_dir, [{k: v for k, v in r.items() if k not in TIMING} for r in read_metrics(save_dir)]


def test_timestep_density_matches_the_schedule_shift():
    # shifting uniform sigmas is what FlowMatchEulerDiscreteScheduler does to its schedule
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)
    scheduler.set_timesteps(10)
    # diffusers spaces the unshifted sigmas evenly from 1 down to its (already shifted) sigma_min
    u = torch.linspace(1.0, float(shift_sigma(torch.tensor(0.001, dtype=torch.float64), 5.0)), 10,
                       dtype=torch.float64)
    torch.testing.assert_close(shift_sigma(u, 5.0).float(), scheduler.sigmas[:-1].float(), rtol=1e-5, atol=1e-6)
    assert unshift_sigma(float(shift_sigma(torch.tensor(0.3, dtype=torch.float64), 5.0)), 5.0) == pytest.approx(0.3)
    # the empirical CDF of the draws is the shifted density's: P(t < x) = unshift(x)
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    t = sample_timesteps(gens, shift=5.0).double()
    for x in (0.3, 0.6, 0.875):
        assert float((t < x).double().mean()) == pytest.approx(unshift_sigma(x, 5.0), abs=0.03)
    high = sample_timesteps(gens[:500], shift=5.0, lo=0.875, hi=1.0)
    assert bool((high >= 0.875).all() and (high < 1.0).all())


def test_flow_matching_loss_against_a_float64_hand_computation():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 1, 2, 2, generator=g), torch.randn(3, 2, 1, 2, 2, generator=g)
    t = torch.tensor([0.1, 0.5, 0.9])
    x_t = noised(x0, noise, t)
    assert torch.allclose(x_t[1], 0.5 * x0[1] + 0.5 * noise[1])
    v = torch.randn(3, 2, 1, 2, 2, generator=g)
    want = [sum(float(v[b].double().flatten()[i] - (noise[b] - x0[b]).double().flatten()[i]) ** 2
                for i in range(8)) / 8 for b in range(3)]
    assert flow_matching_loss(v, x0, noise).tolist() == pytest.approx(want, rel=1e-6)
    assert flow_matching_loss(noise - x0, x0, noise).abs().max() == 0  # the exact velocity costs nothing


def test_weighted_flow_matching_loss_against_a_float64_hand_computation():
    g = torch.Generator().manual_seed(0)
    v, x0, noise = (torch.randn(2, 3, 2, 2, 2, generator=g) for _ in range(3))
    w = torch.rand(2, 2, 2, 2, generator=g) + 0.1  # (B, F', H', W'): one weight per latent position
    err = (v.double() - (noise - x0).double()) ** 2  # (B, C, F', H', W')
    want = [float((err[b].mean(0) * w[b].double()).sum() / w[b].double().sum()) for b in range(2)]
    assert flow_matching_loss(v, x0, noise, w).tolist() == pytest.approx(want, rel=1e-6)
    ones = torch.ones(2, 2, 2, 2)
    assert flow_matching_loss(v, x0, noise, ones).tolist() == pytest.approx(flow_matching_loss(v, x0, noise).tolist())


def test_edge_weights_against_a_float64_loop_and_on_a_rendered_square():
    from wan_grpo.sft.loss import edge_weights
    from wan_grpo.tasks.shapes.world import parse, render

    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, size=(1, 5, 4, 4, 3), dtype=np.uint8)  # 5 frames -> 1 + 4/2 latent frames
    x = video[0].astype(np.float64).mean(-1) / 255
    e = np.zeros((5, 2, 2))
    for f in range(5):
        for i in range(4):
            for j in range(4):
                dx = abs(x[f, i, j + 1] - x[f, i, j]) if j < 3 else 0
                dy = abs(x[f, i + 1, j] - x[f, i, j]) if i < 3 else 0
                e[f, i // 2, j // 2] += (dx + dy) / 4
    e = np.stack([e[0], e[1:3].mean(0), e[3:5].mean(0)])
    want = 1 + 0.5 * e / e.mean()
    got = edge_weights(torch.from_numpy(video), time_stride=2, space_stride=2, strength=0.5)
    assert got.shape == (1, 3, 2, 2) and np.allclose(got[0].double().numpy(), want, rtol=1e-5)

    flat = np.full((1, 9, 64, 64, 3), 30, dtype=np.uint8)
    assert torch.equal(edge_weights(torch.from_numpy(flat), time_stride=4, space_stride=8, strength=2.0),
                       torch.ones(1, 3, 8, 8))
    square = render(parse("a red square moving left"), 1)[None]
    w = edge_weights(torch.from_numpy(square), time_stride=4, space_stride=8, strength=1.0)[0]
    assert w.mean() == pytest.approx(2.0)
    # the outline's cells weigh more; the background and the square's flat inside weigh 1
    assert (w > 1).sum() < 0.2 * w.numel() and w.max() > 5 and (w == 1).sum() > 0.8 * w.numel()


@pytest.mark.parametrize("edge_weight", ["0", "1"])
def test_loss_falls_on_shapes(tmp_path, edge_weight):
    _, rows = sft(tmp_path, "fall", *SHAPES, "--max_steps", "30", "--lora_rank", "0", "--learning_rate", "2e-3",
                  "--edge_weight", edge_weight)
    first, last = sum(r["loss"] for r in rows[:5]) / 5, sum(r["loss"] for r in rows[-5:]) / 5
    assert last < 0.85 * first, (first, last)
    assert all(r["samples_high"] + r["samples_low"] == 8 for r in rows)


def test_a_frame_count_the_vae_cannot_take_is_a_one_line_error(tmp_path, capsys):
    data = tmp_path / "videos"
    for i in range(2):
        write_mp4(data / f"clip{i}.mp4", np.zeros((6, 64, 64, 3), dtype=np.uint8), fps=8)
    (data / "captions.txt").write_text("a\nb\n")
    for edge_weight in ("0", "1"):  # trained silently before, and edge weights need whole latent frames
        assert main(["sft", *TINY[:4], "--frame_num", "6", "--dataset", str(data), "--edge_weight", edge_weight,
                     "--save_dir", str(tmp_path / "run"), "--max_steps", "1"]) != 0
        assert "--frame_num 6 is not 4k+1; use e.g. 5" in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_edge_weight_changes_the_loss_and_nothing_else(tmp_path):
    _, plain = sft(tmp_path, "plain", *SHAPES, "--max_steps", "1", "--lora_rank", "0")
    _, edges = sft(tmp_path, "edges", *SHAPES, "--max_steps", "1", "--lora_rank", "0", "--edge_weight", "1")
    assert edges[0]["loss"] != pytest.approx(plain[0]["loss"], rel=1e-3)
    same = ("samples_high", "samples_low", "lr_high", "lr_low")
    assert [edges[0][k] for k in same] == [plain[0][k] for k in same]


@pytest.mark.parametrize("lo,hi,moved", [(0.9, 1.0, "transformer"), (0.0, 0.8, "transformer_2")])
def test_a_sample_trains_only_the_expert_that_owns_its_noise_level(tiny_components, lo, hi, moved):
    import copy

    from wan_grpo.grpo.policy import build_policy
    from wan_grpo.models.denoiser import MoEDenoiser
    from wan_grpo.sft.config import SFTConfig
    from wan_grpo.sft.trainer import sft_step

    c = copy.deepcopy(tiny_components)
    cfg = SFTConfig(task="tiny", lora_rank=0, learning_rate=1e-3, sample_shift=5.0, caption_dropout=0.0)
    policy = build_policy(c, cfg, device=torch.device("cpu"))
    before = {n: {k: v.clone() for k, v in getattr(c, n).state_dict().items()}
              for n in ("transformer", "transformer_2")}
    denoiser = MoEDenoiser(c, guidance_scale=1.0)
    x0 = torch.randn(4, 16, 1, 4, 4)

    class Cache:
        def get(self, prompts):
            return torch.randn(len(prompts), 512, 32, generator=torch.Generator().manual_seed(1))

    out = sft_step(denoiser, policy, x0, ["a", "b", "c", "d"], Cache(), Cache().get([""]), cfg=cfg, step=0, lo=lo,
                   hi=hi, device=torch.device("cpu"))
    other = "transformer_2" if moved == "transformer" else "transformer"
    name, other_name = ("high", "low") if moved == "transformer" else ("low", "high")
    assert out[f"samples_{name}"] == 4 and out[f"samples_{other_name}"] == 0
    assert out[f"grad_norm_{name}"] > 0 and out[f"grad_norm_{other_name}"] == 0
    changed = lambda n: any(not torch.equal(v, before[n][k]) for k, v in getattr(c, n).state_dict().items())  # noqa
    assert changed(moved) and not changed(other)


def test_lora_loads_into_wan_pipeline_for_both_experts(tmp_path, tiny_ckpt):
    # a folder of mp4s with a captions.txt, trained on the two-expert diffusers folder
    data = tmp_path / "videos"
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        write_mp4(data / f"clip{i}.mp4", torch.randint(0, 255, (5, 48, 64, 3), generator=g, dtype=torch.uint8).numpy(),
                  fps=8)
    (data / "captions.txt").write_text("a red kite\na blue boat\na green hill\na white cloud\n")
    save_dir, rows = sft(tmp_path, "lora", "--ckpt_dir", str(tiny_ckpt), "--dataset", str(data), "--size", "64*48",
                         "--frame_num", "5", "--lora_rank", "4", "--learning_rate", "5e-2", "--max_steps", "3",
                         "--batch_size", "4", "--tensorboard", "false", "--sample_shift", "5")
    assert len(rows) == 3
    ckpt = save_dir / "checkpoint-3"

    def run(pipe):
        return pipeline_latents(pipe, "a red kite", steps=6)

    pipe = tiny_pipeline(tiny_ckpt)
    base = run(pipe)
    pipe.load_lora_weights(ckpt / "transformer", adapter_name="high")
    pipe.load_lora_weights(ckpt / "transformer_2", adapter_name="low", load_into_transformer_2=True)
    both = run(pipe)
    assert "high" in pipe.transformer.peft_config and "low" in pipe.transformer_2.peft_config
    assert (both - base).abs().max() > 1e-4
    lora = load_file(ckpt / "transformer_2" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_resume_is_exact(tmp_path, capsys, caplog, mode):
    args = [*SHAPES, *(["--lora_rank", "4", "--learning_rate", "1e-2"] if mode == "lora" else
                       ["--lora_rank", "0", "--learning_rate", "1e-3"])]
    _, straight = sft(tmp_path, "straight", *args, "--max_steps", "4")
    sft(tmp_path, "part", *args, "--max_steps", "2")
    if mode == "lora":  # other training data: refused before anything loads or is written
        assert main(["sft", "--save_dir", str(tmp_path / "part"), *args, "--videos_per_prompt", "2", "--max_steps",
                     "4", "--resume", "auto"]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "not the 50 (in that order)" in err[0] and "start a new --save_dir" in err[0], err
        assert sorted(c.name for c in (tmp_path / "part").glob("checkpoint-*")) == ["checkpoint-2"]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="wan_grpo"):
        part_dir, resumed = sft(tmp_path, "part", *args, "--max_steps", "4", "--resume", "auto")
    assert "not trained with" not in caplog.text  # the same settings: no warning of changed ones
    assert resumed == straight
    name = "pytorch_lora_weights.safetensors" if mode == "lora" else "diffusion_pytorch_model.safetensors"
    for sub in ("transformer", "transformer_2"):
        a = load_file(tmp_path / "straight" / "checkpoint-4" / sub / name)
        b = load_file(part_dir / "checkpoint-4" / sub / name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_sft_input(tmp_path, capsys):
    for args, needle in [([], "--dataset is required"),
                         (["--dataset", str(tmp_path / "none")], "is not a folder"),
                         (["--dataset", "shapes:3"], "use shapes, shapes:1 or shapes:2"),
                         (["--dataset", "shapes", "--caption_dropout", "1.5"], "--caption_dropout 1.5: must be")]:
        assert main(["sft", *TINY, "--save_dir", str(tmp_path / "x"), *args]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and needle in err[0], err


def test_high_noise_share_moves_samples_between_experts_only(tmp_path, capsys, caplog):
    from wan_grpo.sft.loss import expert_balanced_timesteps

    gens = [torch.Generator().manual_seed(i) for i in range(2000)]
    t = expert_balanced_timesteps(gens, shift=3.0, boundary=0.875, high_share=0.5)
    high, low = t[:1000].double(), t[1000:].double()
    assert bool((high >= 0.875).all() and (high < 1).all() and (low < 0.875).all() and (low >= 0).all())
    # within each range, the shifted density restricted to it: P(t < x | range) from the unshifted CDF
    u_b = unshift_sigma(0.875, 3.0)
    for x in (0.2, 0.5, 0.8):
        assert float((low < x).double().mean()) == pytest.approx(unshift_sigma(x, 3.0) / u_b, abs=0.04)
    assert float((high < 0.95).double().mean()) == pytest.approx(
        (unshift_sigma(0.95, 3.0) - u_b) / (1 - u_b), abs=0.04)
    _, rows = sft(tmp_path, "share", *SHAPES, "--max_steps", "3", "--lora_rank", "0", "--high_noise_share", "0.25")
    assert [(r["samples_high"], r["samples_low"]) for r in rows] == [(2, 6)] * 3
    assert main(["sft", "--save_dir", str(tmp_path / "one"), *SHAPES, "--max_steps", "1", "--train_experts", "high",
                 "--high_noise_share", "0.5"]) == 2
    assert "--high_noise_share" in capsys.readouterr().err
    with caplog.at_level(logging.INFO, logger="wan_grpo"):  # the log names only the experts that trained
        sft(tmp_path, "high", *SHAPES, "--max_steps", "1", "--train_experts", "high", "--log_interval", "1")
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step 1 "))
    assert "high" in line and "low" not in line and "nan" not in line, line


def test_gradient_checkpointing_changes_no_bit_of_a_shapes_sft_run(tmp_path):
    """The Shapes model trains without gradient checkpointing by default (a third faster per step); on CPU the
    recomputed activations are the same numbers, so losses and weights equal a run with it, bit for bit:
    make shapes-base still rebuilds the base the shipped build made with checkpointing on."""
    args = ["--task", "shapes", "--device", "cpu", "--dataset", "shapes:1", "--videos_per_prompt", "1",
            "--batch_size", "8", "--train_batch_size", "8", "--lora_rank", "0", "--learning_rate", "1e-3",
            "--max_steps", "3", "--tensorboard", "false", "--log_interval", "0", "--caption_dropout", "0.1"]
    runs = {flag: sft(tmp_path, f"ckpt-{flag}", *args, "--gradient_checkpointing", flag) for flag in ("true", "false")}
    (on, on_rows), (off, off_rows) = runs["true"], runs["false"]
    from wan_grpo.tasks.shapes import BASE_DIR

    assert len(on_rows) == 3 and [r["loss"] for r in on_rows] == [r["loss"] for r in off_rows]
    for expert in ("transformer", "transformer_2"):
        a, b = (load_file(d / "checkpoint-3" / expert / "diffusion_pytorch_model.safetensors") for d in (on, off))
        assert all(torch.equal(a[k], b[k]) for k in a), expert
        start = load_file(BASE_DIR / expert / "diffusion_pytorch_model.safetensors")
        assert not all(torch.equal(start[k], b[k]) for k in start), expert  # the steps did move it


def test_max_steps_decides_the_length_and_a_shorter_num_epochs_warns(tmp_path, caplog):
    """sft ended silently where a given --num_epochs came before --max_steps; it now warns, as train does."""
    with caplog.at_level(logging.WARNING, logger="wan_grpo"):
        _, rows = sft(tmp_path, "steps", *SHAPES, "--max_steps", "9")  # 50 prompts, batch 8: 7 steps a pass
    assert [r["step"] for r in rows][-1] == 9
    assert not any("--num_epochs" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.WARNING, logger="wan_grpo"):
        _, rows = sft(tmp_path, "epochs", *SHAPES, "--max_steps", "9", "--num_epochs", "1")
    assert [r["step"] for r in rows][-1] == 7
    assert any("--num_epochs 1 (7 steps per pass) ends this run at step 7, before --max_steps 9; drop --num_epochs"
               in r.getMessage() for r in caplog.records)
