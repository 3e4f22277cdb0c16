"""Checks of ``train`` settings that need no weights: the settings alone (``validate``, before any
process group or file), then against the checkpoint's expert split (``check_schedule``, config
files only). Each failure is a one-line UserError naming the fix."""

from __future__ import annotations

import dataclasses
import logging
from functools import partial

import torch

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
    """Checks before any process group or model: the files settings name, report targets and the parsed
    forms of text settings. Ranges and cross-field checks run when the config is made (__post_init__)."""
    check_files(cfg.init_lora)
    report_targets(cfg.report_to)
    parse_window(cfg.sde_window)
    expert_names(cfg.train_experts)
    if cfg.lora_rank > 0:
        lora_targets(cfg.lora_target_modules)


def check_schedule(cfg: TrainConfig, info, sampler: SamplerConfig) -> None:
    """Settings against the model's expert split, from config files only (before weights load)."""
    trained = train_expert_indices(cfg.train_experts, (info.has_high, info.has_low))
    plan = plan_steps(sampler, partial(route, boundary_ratio=info.boundary_ratio,
                                       num_train_timesteps=info.num_train_timesteps,
                                       present=(info.has_high, info.has_low)))
    kind = "stochastic"
    if cfg.algorithm == "nft":  # NFT trains on the noise levels of every step, whatever the solver
        plan = dataclasses.replace(plan, stochastic=torch.ones_like(plan.stochastic))
        kind = "trained"
    steps = {e: int((plan.stochastic & (plan.experts == e)).sum()) for e in Expert}
    owned = {e: steps[e] for e in trained}

    def replayed(experts, fraction: float) -> int:
        return sum(transitions_per_sample(steps[e], fraction) for e in experts)

    per_sample = replayed(trained, cfg.timestep_fraction)
    split = describe_steps(plan, kind)
    if per_sample == 0:
        raise UserError(f"--train_experts {cfg.train_experts} owns none of the {kind} steps ({split}); widen "
                        "--sde_window, change --sample_shift or train the other expert")
    for e, n in owned.items():
        if n == 0:
            log.warning("the %s expert owns none of the trainable steps (%s); it gets no updates", e.label,
                        split)
    k = cfg.optimizer_steps_per_rollout
    if per_sample < k:
        # only fixes that reach k: a larger fraction (at most 1), both experts, or fewer optimizer steps
        both = train_expert_indices("both", (info.has_high, info.has_low))
        fixes = ["raise --timestep_fraction"] if replayed(trained, 1.0) >= k else []
        if len(trained) < len(both) and replayed(both, cfg.timestep_fraction) >= k:
            fixes += ["train both experts"]
        fixes += [f"lower --optimizer_steps_per_rollout to at most {per_sample} (dividing --max_steps)"]
        raise UserError(f"--optimizer_steps_per_rollout {k} needs at least {k} replayed steps per sample, but "
                        f"--timestep_fraction {cfg.timestep_fraction:g} of the steps of --train_experts "
                        f"{cfg.train_experts} ({split}) gives {per_sample}; {', '.join(fixes[:-1])}"
                        f"{' or ' if len(fixes) > 1 else ''}{fixes[-1]}")


def describe_steps(plan, kind: str) -> str:
    counts = [int((plan.stochastic & (plan.experts == e)).sum()) for e in Expert]
    return f"{counts[0]} high-noise and {counts[1]} low-noise of {len(plan.timesteps)} steps are {kind}"
