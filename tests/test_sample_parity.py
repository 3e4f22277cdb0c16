"""`wan-grpo sample` against diffusers' own WanPipeline on the tiny model saved in diffusers format."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanPipeline
from safetensors.torch import load_file

from wan_grpo.cli import main
from wan_grpo.models.denoiser import expert_for_timestep
from wan_grpo.sampling.schedule import flow_match_schedule

PROMPT, NEGATIVE = "A red fox running through fresh snow", "blurry, low quality"
STEPS, SHIFT, G1, G2, SEED = 8, 5.0, 4.0, 3.0, 42


def run_ours(tmp_path, ckpt, solver, extra=(), g1=G1, g2=G2):
    out = tmp_path / f"{solver}.safetensors"
    rc = main(["sample", "--ckpt_dir", str(ckpt), "--prompt", PROMPT, "--negative_prompt", NEGATIVE,
               "--seed", str(SEED), "--sampling_steps", str(STEPS), "--size", "64*48", "--frame_num", "5",
               "--guidance_scale", str(g1), "--guidance_scale_2", str(g2), "--sample_shift", str(SHIFT),
               "--sample_solver", solver, "--output", str(tmp_path / f"{solver}.mp4"),
               "--save_latents", str(out), *extra])
    assert rc == 0
    assert (tmp_path / f"{solver}.mp4").stat().st_size > 0
    return load_file(out)["latents"]


def run_diffusers(ckpt, scheduler, g1=G1, g2=G2):
    pipe = WanPipeline.from_pretrained(ckpt, torch_dtype=torch.float32)
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, height=48, width=64, num_frames=5,
                num_inference_steps=STEPS, guidance_scale=g1, guidance_scale_2=g2,
                generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").frames


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_schedule_crosses_expert_boundary():
    timesteps = flow_match_schedule(STEPS, shift=SHIFT).timesteps
    experts = {expert_for_timestep(float(t), boundary_ratio=0.875) for t in timesteps}
    assert experts == {0, 1}, "the parity tests must exercise both experts"


def scheduler_for(solver):
    """The Wan pipeline's scheduler for each solver, configured as diffusers does for Wan."""
    if solver == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    if solver == "dpm++":
        return DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT,
                                           algorithm_type="dpmsolver++", solver_order=2)
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=SHIFT)


@pytest.mark.parametrize("solver", ["euler", "unipc", "dpm++"])
def test_matches_diffusers_wan_pipeline(tmp_path, tiny_ckpt, solver):
    ours = run_ours(tmp_path, tiny_ckpt, solver)
    theirs = run_diffusers(tiny_ckpt, scheduler_for(solver))
    assert ours.shape == theirs.shape == (1, 16, 2, 6, 8)
    assert rel_err(ours, theirs) <= 1e-4
    # A wrong guidance scale or a swapped expert is far outside that tolerance.
    pipe_other = run_ours(tmp_path, tiny_ckpt, solver, extra=("--guidance_scale_2", str(G1)))
    assert rel_err(pipe_other, theirs) > 1e-3


def test_dpm_differs_from_unipc(tmp_path, tiny_ckpt):
    """Different solvers, same model: the dpm++ parity above is not UniPC passing for it."""
    assert rel_err(run_ours(tmp_path, tiny_ckpt, "dpm++"), run_ours(tmp_path, tiny_ckpt, "unipc")) > 1e-3


@pytest.mark.parametrize("solver", ["euler", "unipc"])
@pytest.mark.parametrize("g1,g2", [(1.0, 3.0), (4.0, 0.5), (1.0, 1.0)])
def test_guidance_combinations_match_diffusers(tmp_path, tiny_ckpt, solver, g1, g2):
    """diffusers decides CFG once, from guidance_scale > 1, for both experts (1.5e-3 apart before)."""
    ours = run_ours(tmp_path, tiny_ckpt, solver, g1=g1, g2=g2)
    theirs = run_diffusers(tiny_ckpt, scheduler_for(solver), g1=g1, g2=g2)
    assert rel_err(ours, theirs) <= 1e-4


def test_sde_with_zero_noise_equals_euler(tmp_path, tiny_ckpt):
    euler = run_ours(tmp_path, tiny_ckpt, "euler")
    sde = run_ours(tmp_path, tiny_ckpt, "sde", extra=("--noise_level", "0"))
    torch.testing.assert_close(sde, euler, rtol=1e-6, atol=1e-6)
    noisy = run_ours(tmp_path, tiny_ckpt, "sde", extra=("--noise_level", "0.7"))
    assert rel_err(noisy, euler) > 1e-2


def test_expert_split_per_shift(tiny_components):
    import copy

    from wan_grpo.runtime import describe_split

    c = copy.copy(tiny_components)
    # 40 UniPC steps at shift 12 give the high-noise expert 26 steps, at shift 3 only 13
    assert "26 high-noise + 14 low-noise" in describe_split(c, steps=40, shift=12.0, solver="unipc")
    assert "13 high-noise + 27 low-noise" in describe_split(c, steps=40, shift=3.0, solver="unipc")
    # the Euler/SDE schedule (FlowMatchEulerDiscreteScheduler) ends at a smaller sigma: one step fewer
    assert "25 high-noise + 15 low-noise" in describe_split(c, steps=40, shift=12.0, solver="sde")


def test_shapes_base_matches_diffusers_with_its_text_length(tmp_path):
    """The shipped Shapes base in diffusers: 16-token prompts (its tokenizer's model_max_length); its VAE
    compresses time 4x, so 9 frames are 3 latent frames. With WanPipeline's default of 512 tokens the
    zero padding dilutes cross-attention: another model."""
    from wan_grpo.tasks.shapes import BASE_DIR

    prompt, out = "a red circle moving right", tmp_path / "shapes.safetensors"
    assert main(["sample", "--ckpt_dir", str(BASE_DIR), "--prompt", prompt, "--seed", str(SEED), "--sampling_steps",
                 "10", "--output", str(tmp_path / "shapes.mp4"), "--save_latents", str(out)]) == 0
    ours = load_file(out)["latents"]
    pipe = WanPipeline.from_pretrained(BASE_DIR)
    pipe.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe.set_progress_bar_config(disable=True)

    def diffusers_latents(**extra):
        return pipe(prompt=prompt, negative_prompt="", height=64, width=64, num_frames=9, num_inference_steps=10,
                    guidance_scale=4.0, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent",
                    **extra).frames

    theirs = diffusers_latents(max_sequence_length=16)
    assert ours.shape == theirs.shape == (1, 16, 3, 8, 8)
    assert rel_err(ours, theirs) <= 1e-4
    assert rel_err(diffusers_latents(), theirs) > 0.1
