"""README.md model cards for checkpoints and exports: what was trained, from what, how, and how to load it."""

from __future__ import annotations


def _rewards(cfg: dict) -> str:
    reward = cfg.get("reward") or "the task's default"
    if "videoalign" in str(reward):
        return f"{reward} (VQ {cfg.get('vq_coef')}, MQ {cfg.get('mq_coef')}, TA {cfg.get('ta_coef')})"
    return str(reward)


def model_card(cfg: dict, step: int, *, kind: str = "checkpoint", files: list[str] | None = None,
               evaluation: dict | None = None) -> str:
    """``cfg``: the run's resolved config (a train or sft config as a dict); ``kind``: checkpoint, or an
    export format (diffusers, comfyui, merged)."""
    algorithm = cfg.get("algorithm", "sft" if "dataset" in cfg else "grpo")
    lora = int(cfg.get("lora_rank", 0)) > 0
    mode = f"LoRA rank {cfg.get('lora_rank')}, alpha {cfg.get('lora_alpha')}" if lora else "full fine-tuning"
    lines = [
        f"# Wan2.2 {algorithm.upper()} {kind} (wan-grpo, step {step})",
        "",
        f"- Base model: `{cfg.get('ckpt_dir') or 'the built-in tiny model'}` (task `{cfg.get('task')}`)",
        f"- Experts trained: {cfg.get('train_experts')}; {mode}; learning rate {cfg.get('learning_rate')}"
        + (f" (low-noise expert {cfg['learning_rate_2']})" if cfg.get("learning_rate_2") else ""),
    ]
    if algorithm == "sft":
        lines.append(f"- Data: `{cfg.get('dataset')}`; flow-matching loss on the sampler's shifted noise levels")
    else:
        lines += [f"- Algorithm: {algorithm}; reward: {_rewards(cfg)}; prompts: `{cfg.get('prompts')}`",
                  f"- Rollouts: {cfg.get('batch_size')} prompts x {cfg.get('num_generations')} videos, "
                  f"{cfg.get('sampling_steps')} steps, shift {cfg.get('sample_shift')}, guidance "
                  f"{cfg.get('guidance_scale')}/{cfg.get('guidance_scale_2')}"
                  + (f", SDE {cfg.get('sde_type')} noise {cfg.get('noise_level')}" if algorithm == "grpo" else
                     f", solver {cfg.get('sample_solver') or 'unipc'}, beta {cfg.get('nft_beta')}")]
    lines.append(f"- Size: {cfg.get('size')} x {cfg.get('frame_num')} frames; seed {cfg.get('seed')}")
    if evaluation:
        lines += ["", "## Evaluation", "", *(f"- {name}: {value}" for name, value in evaluation.items())]
    lines += ["", "## Files", ""]
    lines += [f"- `{f}`" for f in files or []]
    lines += ["", "## Load it", ""]
    if kind == "comfyui":
        lines += ["ComfyUI: load `high_noise_model_lora.safetensors` on the high-noise model and "
                  "`low_noise_model_lora.safetensors` on the low-noise model with a LoRA loader. diffusers "
                  "reads them too:", "",
                  "```python", "pipe.load_lora_weights('high_noise_model_lora.safetensors', adapter_name='high')",
                  "pipe.load_lora_weights('low_noise_model_lora.safetensors', adapter_name='low', "
                  "load_into_transformer_2=True)", "```"]
    elif kind == "merged":
        lines += ["```python", "from diffusers import DiffusionPipeline",
                  "pipe = DiffusionPipeline.from_pretrained('THIS_FOLDER')", "```"]
    elif lora:
        lines += ["```python", f"pipe = WanPipeline.from_pretrained('{cfg.get('ckpt_dir') or 'BASE'}')",
                  "pipe.load_lora_weights('transformer', adapter_name='high')",
                  "pipe.load_lora_weights('transformer_2', adapter_name='low', load_into_transformer_2=True)",
                  "```", "", "For ComfyUI: `wan-grpo export --checkpoint THIS_FOLDER --format comfyui --output DIR`."]
    else:
        lines += ["```python", "from diffusers import WanTransformer3DModel",
                  "pipe.transformer = WanTransformer3DModel.from_pretrained('THIS_FOLDER', subfolder='transformer')",
                  "```", "", "Or `wan-grpo sample --ckpt_dir BASE --lora THIS_FOLDER`."]
    if cfg.get("task") == "shapes" and kind != "comfyui":
        lines += ["", _shapes_pipeline_call(cfg)]
    return "\n".join(lines) + "\n"


def _shapes_pipeline_call(cfg: dict) -> str:
    """WanPipeline's call for a Shapes run: the base tokenizer's prompt length (WanPipeline pads to 512
    tokens otherwise), one frame fewer when its VAE does not compress time, and the run's sampler settings
    (the preset's where unset)."""
    from pathlib import Path

    from wan_grpo.config import parse_size
    from wan_grpo.models.files import read_json
    from wan_grpo.models.loading import text_length
    from wan_grpo.specs import PRESETS

    preset = PRESETS["shapes"]

    def setting(name: str, default):
        return cfg.get(name) or default

    width, height = parse_size(setting("size", preset.size))
    ckpt = Path(str(cfg.get("ckpt_dir")))
    text_len = text_length(ckpt / "tokenizer")
    frames, fewer = int(setting("frame_num", preset.frame_num)), ""
    vae = ckpt / "vae" / "config.json"
    if vae.is_file() and read_json(vae).get("scale_factor_temporal") == 1:
        frames -= 1
        fewer = " and one frame fewer (WanPipeline adds one when the VAE has no temporal compression)"
    return (f"Call the pipeline with the Shapes model's prompt length{fewer}, with the run's sampler settings: "
            f"`pipe(prompt, height={height}, width={width}, num_frames={frames}, "
            f"max_sequence_length={text_len}, num_inference_steps={setting('sampling_steps', preset.sampling_steps)}, "
            f"guidance_scale={setting('guidance_scale', preset.guidance_scale)}, "
            f"guidance_scale_2={setting('guidance_scale_2', preset.guidance_scale_2)})` after `pipe.scheduler = "
            "UniPCMultistepScheduler(prediction_type='flow_prediction', use_flow_sigmas=True, "
            f"flow_shift={setting('sample_shift', preset.shift)})`.")
