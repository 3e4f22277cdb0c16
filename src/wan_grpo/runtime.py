"""Turn a ModelConfig into a loaded model on a device, with preset defaults filled in."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

import torch

from wan_grpo.errors import UserError
from wan_grpo.models.denoiser import expert_for_timestep
from wan_grpo.models.files import cast_keeping_fp32
from wan_grpo.models.kernels import check_attention_backend, check_compile, compile_blocks, set_attention_backend
from wan_grpo.models.loading import checkpoint_info, load_components, load_tokenizer_and_encoder, text_encoder_paths
from wan_grpo.models.text import EmbeddingDiskCache, PromptEmbeddingCache, files_identity, module_identity
from wan_grpo.models.tiny import build_tiny_components, tiny_info
from wan_grpo.sampling.schedule import MULTISTEP, flow_match_schedule, multistep_scheduler
from wan_grpo.specs import PRESETS
from wan_grpo.tasks.shapes import base_dir as shapes_base_dir

log = logging.getLogger("wan_grpo")

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def device_memory(device: torch.device) -> float | None:
    """Total memory of an accelerator in bytes; None for the CPU (batch sizes then keep their defaults)."""
    return float(torch.cuda.get_device_properties(device).total_memory) if device.type == "cuda" else None


def resolve_device(name: str, *, flag: str = "--device") -> torch.device:
    """auto, cpu, cuda or cuda:N; anything else, or CUDA on a machine without it, is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UserError(f"{flag} {name!r}: use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag} {name} asked for CUDA but none is available; use {flag} cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"{flag} {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def resolve_precision(name: str | None, device: torch.device) -> str:
    """--mixed_precision, or its default: bf16 on CUDA, fp32 elsewhere."""
    return name or ("bf16" if device.type == "cuda" else "fp32")


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The dtype forward passes autocast to under a resolved --mixed_precision (None: no autocast)."""
    return torch.bfloat16 if precision == "bf16" else None


def resolve_dtype(name: str, device: torch.device, precision: str | None = None) -> torch.dtype:
    """--dtype of the frozen weights; auto follows --mixed_precision."""
    if name == "auto":
        return torch.bfloat16 if resolve_precision(precision, device) == "bf16" else torch.float32
    return DTYPES[name]


@dataclass
class TextSetup:
    """How encode_all gets the prompt embeddings; load_model attaches one as ``components.text_setup``."""

    embedding_cache: str | None = None
    t5_cpu: bool = False
    identity: str = ""  # what the embeddings depend on besides the prompt (part of the --embedding_cache key)
    load: Callable | None = None  # () -> (tokenizer, text_encoder) when load_model deferred loading them


def describe_task(info) -> str:
    experts = "two experts" if info.has_high and info.has_low else "one dense model"
    return f"{info.task}: {experts}, {info.in_channels} input channels, {info.z_dim}-channel latents"


def resolve_config(cfg):
    """(cfg with every unset (None) field filled from the preset, ModelInfo), reading config files only.

    Runs before any weights load, so settings can be checked against the model up front.
    """

    task = cfg.task
    if cfg.ckpt_dir is None and task == "shapes":  # the Shapes model ships inside the package
        cfg = dataclasses.replace(cfg, ckpt_dir=str(shapes_base_dir()))
    if cfg.ckpt_dir is None:
        if task not in (None, "tiny"):
            raise UserError(f"--task {task} needs --ckpt_dir pointing at its checkpoint (diffusers or original layout)")
        info = tiny_info()
    else:
        if task == "tiny":
            raise UserError("--task tiny builds its own model; drop --ckpt_dir or pass the checkpoint's task")
        info = checkpoint_info(cfg.ckpt_dir)
        if task is not None and task != info.task:
            raise UserError(f"--task {task} does not match {cfg.ckpt_dir} ({describe_task(info)}); pass --task "
                            f"{info.task} or drop --task")
    task = info.task
    preset = PRESETS[task]
    shift = cfg.sample_shift
    if shift is None:
        # An explicit --task preset uses the official shift; otherwise the checkpoint's scheduler
        # config decides (diffusers-format A14B repos ship 3.0, not the official 12.0 / 5.0).
        shift = preset.shift if cfg.task is not None else info.default_shift
        if info.default_shift != preset.shift:
            if cfg.task is not None:
                log.info("shift %g: the official %s value (the checkpoint's scheduler config says %g; "
                         "--sample_shift overrides)", shift, task, info.default_shift)
            else:
                log.warning("shift %g from the checkpoint's scheduler config, not the official %g of %s; pass "
                            "--task %s or --sample_shift for the official expert split", shift, preset.shift,
                            task, task)
    unset = lambda value, default: default if value is None else value  # noqa: E731 (0 is a value, not "unset")
    filled = dataclasses.replace(
        cfg,
        task=task,
        size=unset(cfg.size, preset.size),
        frame_num=unset(cfg.frame_num, preset.frame_num),
        fps=unset(cfg.fps, preset.fps),
        sampling_steps=unset(cfg.sampling_steps, preset.sampling_steps),
        sample_shift=shift,
        guidance_scale=unset(cfg.guidance_scale, preset.guidance_scale),
        guidance_scale_2=(
            cfg.guidance_scale_2
            if cfg.guidance_scale_2 is not None
            else (preset.guidance_scale_2 if cfg.guidance_scale is None else cfg.guidance_scale)
        ),
    )
    return filled, info


def with_precision(cfg):
    """``cfg`` with --mixed_precision's default filled for its --device: what a run saves in its checkpoints, so
    the trainers fill it before comparing a checkpoint's config with theirs."""
    return dataclasses.replace(cfg, mixed_precision=resolve_precision(cfg.mixed_precision, resolve_device(cfg.device)))


def load_model(cfg, *, load_text_encoder: bool = True):
    """(components, cfg with every None default filled, device, dtype). The models stay on CPU until placed."""

    device = resolve_device(cfg.device)
    cfg = with_precision(cfg)
    dtype = resolve_dtype(cfg.dtype, device, cfg.mixed_precision)
    check_attention_backend(cfg.attention_backend)
    check_compile(cfg.compile, device.type)
    cfg, _ = resolve_config(cfg)
    if cfg.ckpt_dir is None:
        components = build_tiny_components(0)  # the model is fixed; --seed drives sampling
        for expert in components.experts.values():
            cast_keeping_fp32(expert, dtype)
    else:
        # With --embedding_cache the text encoder loads on the first uncached prompt: a run whose
        # prompts are all cached never reads the 11 GB UMT5.
        lazy = load_text_encoder and cfg.embedding_cache is not None
        components = load_components(cfg.ckpt_dir, dtype=dtype, load_text_encoder=load_text_encoder and not lazy)
    components.text_setup = _text_setup(cfg, components, dtype)
    if cfg.vae_tiling:
        components.vae.enable_tiling()
    if cfg.vae_slicing:
        components.vae.enable_slicing()
    experts = list(components.experts.values())
    set_attention_backend(experts, cfg.attention_backend)
    if cfg.compile:
        compile_blocks(experts)
    return components, cfg, device, dtype


def place(components, device: torch.device, *, offload_experts: bool = False) -> None:
    """Move every loaded module to ``device``; with ``offload_experts`` the experts stay on CPU."""
    experts = () if offload_experts else (components.transformer, components.transformer_2)
    for module in (*experts, components.vae, components.text_encoder):
        if module is not None:
            module.to(device)


def _text_setup(cfg, components, dtype: torch.dtype) -> TextSetup:
    from functools import partial


    setup = TextSetup(embedding_cache=cfg.embedding_cache, t5_cpu=cfg.t5_cpu)
    if cfg.embedding_cache is None:
        return setup
    if cfg.ckpt_dir is None:  # the built-in tiny model: its encoder is in memory (and always fp32)
        setup.identity = "module:" + module_identity(components.text_encoder, components.tokenizer)
    else:
        setup.identity = f"files:{files_identity(list(text_encoder_paths(cfg.ckpt_dir)))}:{dtype}"
        if components.text_encoder is None:
            setup.load = partial(load_tokenizer_and_encoder, cfg.ckpt_dir, dtype=dtype)
    return setup


def text_encoder_device(device: torch.device, t5_cpu: bool) -> torch.device:
    """--t5_cpu runs the text encoder on CPU (the official t5_cpu) whatever ``device`` is."""
    return torch.device("cpu") if t5_cpu else device


def encode_all(components, prompts: list[str], negative_prompt: str, *, device, dtype):
    """Cache the embeddings of every prompt and the negative prompt, then free the text encoder.

    With --embedding_cache, prompts found on disk are not encoded (and with all of them found the
    text encoder is neither loaded, when load_model deferred it, nor moved); new ones are written.
    """

    setup = components.text_setup or TextSetup()
    encoder_device = text_encoder_device(device, setup.t5_cpu)
    cache = PromptEmbeddingCache(device=device, dtype=dtype, max_sequence_length=components.text_len)
    wanted = list(prompts) + [negative_prompt]
    disk = None
    if setup.embedding_cache is not None:
        # CPU and GPU kernels round differently: an entry is reused only on the device type that made it.
        disk = EmbeddingDiskCache(setup.embedding_cache, f"{setup.identity}:{encoder_device.type}",
                                  max_sequence_length=cache.max_sequence_length)
        missing = cache.add_from_disk(wanted, disk)
        log.info("prompt embeddings: %d of %d from %s", len(cache), len(cache) + len(missing), setup.embedding_cache)
    else:
        missing = wanted
    if missing:
        if components.text_encoder is None and setup.load is not None:
            components.tokenizer, components.text_encoder = setup.load()
        if components.text_encoder is not None:
            components.text_encoder.to(encoder_device)
        cache.add(missing, components.tokenizer, components.text_encoder, disk=disk)
    components.drop_text_encoder()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return cache


def describe_split(components, *, steps: int, shift: float, solver: str = "sde") -> str:
    """'shift S: H high-noise + L low-noise steps' for the schedule ``solver`` uses."""

    if components.boundary_ratio is None:
        return f"shift {shift:g}: {steps} steps on the single expert"
    if solver in MULTISTEP:
        scheduler = multistep_scheduler(solver, shift=shift, base_config=components.scheduler_config)
        scheduler.set_timesteps(steps)
        timesteps = scheduler.timesteps
    else:
        timesteps = flow_match_schedule(steps, shift=shift,
                                        num_train_timesteps=components.num_train_timesteps).timesteps
    high = sum(expert_for_timestep(float(t), boundary_ratio=components.boundary_ratio,
                                   num_train_timesteps=components.num_train_timesteps) == 0 for t in timesteps)
    return (f"{solver} shift {shift:g}: {high} high-noise + {len(timesteps) - high} low-noise steps "
            f"(boundary {components.boundary_ratio})")
