"""Checks of ``train`` settings that need no weights: the settings alone (``validate``, before any
process group or file), then against the checkpoint's expert split (``check_schedule``, config
files only). Each failure is a one-line UserError naming the fix."""

from __future__ import annotations

import dataclasses
import logging
from functools import partial

import torch

from wan_grpo.config import check_ranges
from wan_grpo.errors import UserError
from wan_grpo.grpo.config import TrainConfig
from wan_grpo.grpo.init_lora import check_files
from wan_grpo.grpo.metrics import report_targets
from wan_grpo.grpo.policy import expert_names, lora_targets, train_expert_indices
from wan_grpo.grpo.update import transitions_per_sample
from wan_grpo.models.denoiser import route
from wan_grpo.sampling.rollout import SamplerConfig, plan_steps
from wan_grpo.specs import Expert

log = logging.getLogger("wan_grpo")


def parse_window(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        start, end = (int(x) for x in text.split(":"))
    except ValueError:
        raise UserError(f"--sde_window {text!r} is not START:END; write e.g. 0:8") from None
    return start, end


def validate(cfg: TrainConfig) -> None:
    """Checks that need nothing but the settings: before any process group, file or model."""
    check_ranges(cfg)
    check_files(cfg.init_lora)
    report_targets(cfg.report_to)
    if cfg.best_of_n and (cfg.best_of_n % 2 or cfg.best_of_n > cfg.num_generations):
        raise UserError(f"--best_of_n {cfg.best_of_n} must be even and <= --num_generations ({cfg.num_generations})")
    if cfg.algorithm == "grpo" and cfg.sample_solver not in (None, "sde"):
        raise UserError(f"--sample_solver {cfg.sample_solver}: GRPO needs the log-probs of SDE steps; use sde, or "
                        "--algorithm nft for any solver")
    if cfg.algorithm == "nft" and cfg.share_noise and rollout_solver(cfg) != "sde":
        raise UserError(f"--share_noise with the deterministic --sample_solver {rollout_solver(cfg)} makes every "
                        "video of a group the same; drop --share_noise")
    if cfg.algorithm == "nft" and cfg.offload_model:
        raise UserError("--offload_model is not supported with --algorithm nft yet; drop it or use --dit_fsdp")
    if cfg.algorithm != "grpo" and (cfg.ratio_norm or cfg.reweight_steps):
        raise UserError("--ratio_norm and --reweight_steps are GRPO-Guard options for --algorithm grpo; drop them")
    if cfg.reweight_steps and cfg.sde_type not in ("flow", "dance"):
        raise UserError(f"--reweight_steps has step weights for --sde_type flow and dance only (GRPO-Guard defines "
                        f"none for {cfg.sde_type}); use one of those or drop it")
    if cfg.noise_level == 0 and rollout_solver(cfg) == "sde" and cfg.algorithm == "grpo":
        raise UserError("--noise_level 0 makes every step deterministic, so nothing can be trained; use e.g. 0.7 "
                        "(flow) or 0.3 (dance)")
    k = cfg.optimizer_steps_per_rollout
    if cfg.max_steps % k:
        lower, upper = cfg.max_steps // k * k, (cfg.max_steps // k + 1) * k
        raise UserError(f"--max_steps {cfg.max_steps} is not a multiple of --optimizer_steps_per_rollout {k} (a "
                        f"rollout's optimizer steps are never split); use {lower or upper} or {upper}")
    parse_window(cfg.sde_window)
    expert_names(cfg.train_experts)
    if cfg.lora_rank > 0:
        lora_targets(cfg.lora_target_modules)
    if cfg.offload_model and (cfg.dit_fsdp or (cfg.kl_coef > 0 and cfg.lora_rank == 0)):
        raise UserError("--offload_model works without --dit_fsdp and, for KL, with LoRA; drop one of them")
    if cfg.dit_fsdp and cfg.kl_coef > 0 and cfg.lora_rank == 0:
        raise UserError("--kl_coef with full fine-tuning under --dit_fsdp is not supported; use LoRA (--lora_rank)")
    if cfg.eval_interval and not cfg.eval_prompts:
        raise UserError("--eval_interval needs --eval_prompts (a held-out prompt file)")


def rollout_solver(cfg: TrainConfig) -> str:
    """--sample_solver, or its default: sde for GRPO, unipc for NFT."""
    return cfg.sample_solver or ("sde" if cfg.algorithm == "grpo" else "unipc")


def check_schedule(cfg: TrainConfig, info, sampler: SamplerConfig) -> None:
    """Settings against the model's expert split, from config files only (before weights load)."""
    trained = train_expert_indices(cfg.train_experts, (info.has_high, info.has_low))
    plan = plan_steps(sampler, partial(route, boundary_ratio=info.boundary_ratio,
                                       num_train_timesteps=info.num_train_timesteps,
                                       present=(info.has_high, info.has_low)))
    if cfg.algorithm == "nft":  # NFT trains on the noise levels of every step, whatever the solver
        plan = dataclasses.replace(plan, stochastic=torch.ones_like(plan.stochastic))
    owned = {e: int((plan.stochastic & (plan.experts == e)).sum()) for e in trained}
    per_sample = sum(transitions_per_sample(n, cfg.timestep_fraction) for n in owned.values())
    split = describe_steps(plan)
    if per_sample == 0:
        raise UserError(f"--train_experts {cfg.train_experts} owns none of the stochastic steps ({split}); widen "
                        "--sde_window, change --sample_shift or train the other expert")
    for e, n in owned.items():
        if n == 0:
            log.warning("the %s expert owns none of the trainable steps (%s); it gets no updates", e.label,
                        split)
    k = cfg.optimizer_steps_per_rollout
    if per_sample < k:
        raise UserError(f"--optimizer_steps_per_rollout {k} needs at least {k} replayed steps per sample, but "
                        f"--timestep_fraction {cfg.timestep_fraction:g} of the trained experts' steps ({split}) gives "
                        f"{per_sample}; raise --timestep_fraction or lower --optimizer_steps_per_rollout")


def describe_steps(plan) -> str:
    counts = [int((plan.stochastic & (plan.experts == e)).sum()) for e in Expert]
    return f"{counts[0]} high-noise and {counts[1]} low-noise of {len(plan.timesteps)} steps are stochastic"
