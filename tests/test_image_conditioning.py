"""Image-to-video: I2V-A14B (36-channel input) and TI2V-5B image mode against WanImageToVideoPipeline,
and TI2V log-probs that leave the kept first frame out."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
from PIL import Image
from safetensors.torch import load_file

from wan_grpo.cli import main
from wan_grpo.grpo.replay import replay_transitions
from wan_grpo.models.denoiser import MoEDenoiser
from wan_grpo.models.text import PromptEmbeddingCache
from wan_grpo.models.tiny import build_tiny_components
from wan_grpo.sampling.conditioning import encode_images
from wan_grpo.sampling.rollout import SamplerConfig, initial_noise, latent_shape, rollout

PROMPT, NEGATIVE = "A red fox running through fresh snow", "blurry"
STEPS, SHIFT, SEED, W, H, F = 6, 5.0, 7, 64, 64, 5


def _image(w=80, h=60, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _pipe(c, scheduler):
    pipe = WanImageToVideoPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae, scheduler=scheduler,
                                   transformer=c.transformer, transformer_2=c.transformer_2,
                                   boundary_ratio=c.boundary_ratio, expand_timesteps=c.expand_timesteps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _theirs(c, scheduler, image, g1, g2):
    # Embeddings as WanPipeline computes them (checked in test_sample_parity); the I2V pipeline's
    # own prompt cleaning needs ftfy, which is not a dependency.
    cache = PromptEmbeddingCache()
    cache.add([PROMPT, NEGATIVE], c.tokenizer, c.text_encoder)
    return _pipe(c, scheduler)(image=image, prompt_embeds=cache.get([PROMPT]),
                               negative_prompt_embeds=cache.get([NEGATIVE]), height=H, width=W, num_frames=F,
                               num_inference_steps=STEPS, guidance_scale=g1,
                               guidance_scale_2=g2 if c.boundary_ratio is not None else None,
                               generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").frames


def _ours(c, image, g1, g2, solver="euler", record=False):
    cache = PromptEmbeddingCache()
    cache.add([PROMPT, NEGATIVE], c.tokenizer, c.text_encoder)
    denoiser = MoEDenoiser(c, guidance_scale=g1, guidance_scale_2=g2)
    cond = encode_images(c, [image], width=W, height=H, frame_num=F)
    noise = initial_noise(latent_shape(c, width=W, height=H, frame_num=F),
                          generator=torch.Generator("cpu").manual_seed(SEED), device="cpu")
    config = SamplerConfig(solver=solver, steps=STEPS, shift=SHIFT, noise_level=0.7)
    gen = torch.Generator().manual_seed(1)
    latents, traj = rollout(denoiser, noise, cache.get([PROMPT]), cache.get([NEGATIVE]), config=config,
                            generator=gen, record=record, image=cond)
    return latents, traj, denoiser, cond, cache


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def i2v():
    return build_tiny_components(3, variant="i2v")


@pytest.fixture(scope="module")
def ti2v():
    return build_tiny_components(4, variant="ti2v")


def test_i2v_matches_diffusers_image_to_video_pipeline(i2v):
    image = _image()
    ours, _, _, cond, _ = _ours(i2v, image, 3.5, 3.0)
    theirs = _theirs(i2v, FlowMatchEulerDiscreteScheduler(shift=SHIFT), image, 3.5, 3.0)
    assert cond.latents.shape == (1, 20, 2, 8, 8)  # 4 mask + 16 image-latent channels
    assert i2v.transformer.config.in_channels == 36
    assert ours.shape == theirs.shape == (1, 16, 2, 8, 8)
    assert rel_err(ours, theirs) <= 1e-4
    other, *_ = _ours(i2v, _image(seed=1), 3.5, 3.0)  # the image matters
    assert rel_err(other, theirs) > 1e-3


def test_ti2v_image_mode_matches_pipeline_and_keeps_the_first_frame(ti2v):
    image = _image()
    ours, _, _, cond, _ = _ours(ti2v, image, 5.0, 5.0)
    theirs = _theirs(ti2v, FlowMatchEulerDiscreteScheduler(shift=SHIFT), image, 5.0, 5.0)
    assert ours.shape == theirs.shape == (1, 48, 2, 4, 4)
    assert rel_err(ours, theirs) <= 1e-4
    assert torch.equal(ours[:, :, 0], cond.latents[:, :, 0])  # the image's latent, untouched


def test_ti2v_log_probs_ignore_the_conditioned_positions(ti2v):
    _, traj, denoiser, cond, cache = _ours(ti2v, _image(), 5.0, 5.0, solver="sde", record=True)
    assert bool(traj.trainable.any())
    # Every stored latent holds the image latent in the kept frame: it is never sampled.
    assert torch.equal(traj.latents[0, :, :, 0], cond.latents[0, :, 0].expand(STEPS + 1, -1, -1, -1))
    step = int(torch.nonzero(traj.trainable)[0])
    args = (torch.tensor([0]), torch.tensor([step]), cache.get([PROMPT]), cache.get([NEGATIVE]))
    replayed = replay_transitions(denoiser, traj, *args, expert=int(traj.experts[step]), device="cpu", image=cond)
    assert abs(float(replayed.log_prob[0] - traj.log_probs[0, step])) <= 1e-5  # on-policy ratio 1

    def log_prob_after(perturb):
        t2 = traj.__class__(**{**traj.__dict__, "latents": traj.latents.clone()})
        perturb(t2.latents[0, step + 1])
        return float(replay_transitions(denoiser, t2, *args, expert=int(traj.experts[step]), device="cpu",
                                        image=cond).log_prob[0])

    def first_frame(x):
        x[:, 0] += 5.0

    def generated(x):
        x[:, 1] += 0.5

    assert log_prob_after(first_frame) == pytest.approx(float(replayed.log_prob[0]), abs=1e-6)
    assert abs(log_prob_after(generated) - float(replayed.log_prob[0])) > 1e-2


def test_sample_cli_with_image_matches_the_pipeline(i2v, tmp_path):
    """`wan-grpo sample --image` on an I2V checkpoint saved in diffusers format (WanImageToVideoPipeline)."""
    ckpt = tmp_path / "i2v"
    _pipe(i2v, UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       flow_shift=SHIFT)).save_pretrained(str(ckpt))
    image_path = tmp_path / "first.png"
    _image().save(image_path)
    out = tmp_path / "lat.safetensors"
    common = ["sample", "--ckpt_dir", str(ckpt), "--prompt", PROMPT, "--negative_prompt", NEGATIVE, "--seed",
              str(SEED), "--sampling_steps", str(STEPS), "--size", f"{W}*{H}", "--frame_num", str(F),
              "--guidance_scale", "3.5", "--guidance_scale_2", "3.0", "--sample_shift", str(SHIFT),
              "--sample_solver", "unipc", "--output", str(tmp_path / "v.mp4")]
    assert main([*common, "--image", str(image_path), "--save_latents", str(out)]) == 0
    theirs = _theirs(i2v, UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                  flow_shift=SHIFT), _image(), 3.5, 3.0)
    assert rel_err(load_file(out)["latents"], theirs) <= 1e-4
    assert main(common) == 2  # an I2V model without --image: a one-line error


@pytest.mark.parametrize("variant", ["i2v", "ti2v"])
def test_train_on_jsonl_prompts_with_images(variant, i2v, ti2v, tmp_path):
    """`train` with a .jsonl whose lines carry 'image': on-policy ratio 1, both image modes."""

    from wan_grpo.grpo.metrics import read_metrics

    ckpt, prompts = _image_task(tmp_path, {"i2v": i2v, "ti2v": ti2v}[variant], variant)
    prompts.write_text('{"prompt": "a fox", "image": "img0.png"}\n{"prompt": "a boat", "image": "img1.png"}\n')
    save_dir = tmp_path / f"run-{variant}"
    common = ["train", "--ckpt_dir", str(ckpt), "--prompts", str(prompts), "--size", f"{W}*{H}", "--frame_num", "5",
              "--sampling_steps", "4", "--num_generations", "2", "--batch_size", "2", "--max_steps", "1",
              "--lora_rank", "0", "--guidance_scale", "1", "--guidance_scale_2", "1", "--tensorboard", "false",
              "--log_interval", "0", "--reward", "brightness"]
    assert main([*common, "--save_dir", str(save_dir)]) == 0
    row = read_metrics(save_dir)[0]
    assert abs(row["ratio_mean"] - 1) <= 1e-5 and row["kept_samples"] == 4
    if variant == "i2v":  # eval reads the same jsonl images; text-only prompts are a one-line error
        out = tmp_path / "eval"
        assert main(["eval", "--ckpt_dir", str(ckpt), "--prompts", str(prompts), "--size", f"{W}*{H}", "--frame_num",
                     "5", "--sampling_steps", "4", "--reward", "brightness", "--save_dir", str(out)]) == 0
        assert (out / "eval.csv").read_text().count("\n") == 3
        txt = tmp_path / "p.txt"
        txt.write_text("a fox\n")
        assert main([*common[:4], str(txt), *common[5:], "--save_dir", str(tmp_path / "bad")]) == 2


def test_ti2v_text_only_matches_wan_pipeline(ti2v):
    """TI2V-5B without an image: per-token timesteps (all t), as WanPipeline(expand_timesteps=True)."""
    from diffusers import WanPipeline

    cache = PromptEmbeddingCache()
    cache.add([PROMPT, NEGATIVE], ti2v.tokenizer, ti2v.text_encoder)
    pipe = WanPipeline(tokenizer=ti2v.tokenizer, text_encoder=ti2v.text_encoder, vae=ti2v.vae,
                       scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), transformer=ti2v.transformer,
                       expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt_embeds=cache.get([PROMPT]), negative_prompt_embeds=cache.get([NEGATIVE]), height=H, width=W,
                  num_frames=F, num_inference_steps=STEPS, guidance_scale=5.0,
                  generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").frames
    noise = initial_noise(latent_shape(ti2v, width=W, height=H, frame_num=F),
                          generator=torch.Generator("cpu").manual_seed(SEED), device="cpu")
    ours, _ = rollout(MoEDenoiser(ti2v, guidance_scale=5.0), noise, cache.get([PROMPT]), cache.get([NEGATIVE]),
                      config=SamplerConfig(solver="euler", steps=STEPS, shift=SHIFT), record=False)
    assert ours.shape == theirs.shape == (1, 48, 2, 4, 4)
    assert rel_err(ours, theirs) <= 1e-4


def test_batched_eval_of_image_prompts(tmp_path, ti2v):
    """TI2V-5B image prompts sampled several per call (each row its own image condition): every
    (prompt, seed) once, in order, with the scores of one-at-a-time eval."""
    import json

    ckpt, prompts = _image_task(tmp_path, ti2v, "ti2v")
    prompts.write_text('{"prompt": "a fox", "image": "img0.png"}\n{"prompt": "a boat", "image": "img1.png"}\n'
                       '{"prompt": "a cat", "image": "img0.png"}\n')
    rows = {}
    for b in (1, 4):
        out = tmp_path / f"eval{b}"
        assert main(["eval", "--ckpt_dir", str(ckpt), "--prompts", str(prompts), "--size", f"{W}*{H}", "--frame_num",
                     "5", "--sampling_steps", "4", "--num_samples", "2", "--batch_size", str(b), "--reward",
                     "brightness", "--save_dir", str(out)]) == 0
        rows[b] = json.loads((out / "eval.json").read_text())["videos"]
    assert [(r["prompt_index"], r["seed"]) for r in rows[4]] == [(i, 1000 * i + k) for i in range(3) for k in range(2)]
    for one, batched in zip(rows[1], rows[4]):
        assert batched["brightness"] == pytest.approx(one["brightness"], abs=1e-4)


def _image_task(tmp_path, c, variant):
    """The model saved in diffusers' layout, two conditioning images, and the path for a prompt file."""
    ckpt = tmp_path / variant
    if variant == "i2v":
        _pipe(c, FlowMatchEulerDiscreteScheduler(shift=SHIFT)).save_pretrained(str(ckpt))
    else:
        WanPipeline(tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae,
                    scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), transformer=c.transformer,
                    expand_timesteps=True).save_pretrained(str(ckpt))
    for k in range(2):
        _image(seed=k).save(tmp_path / f"img{k}.png")
    return ckpt, tmp_path / "prompts.jsonl"
