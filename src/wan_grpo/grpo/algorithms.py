"""The two training algorithms behind one small interface: how a rollout samples, and how its scored
samples update the policy. The trainer's loop (grpo/trainer.py) is the same for both.

- ``GRPO`` (Flow-GRPO): SDE rollouts that record every transition and its log-prob; PPO-clip on
  replayed transitions (grpo/update.py).
- ``NFT`` (DiffusionNFT): the old policy samples with any solver and only the clean latents are
  kept; the update trains on their forward process (grpo/nft_update.py), then the old policy
  moves toward the new one (grpo/nft.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from wan_grpo.grpo.nft import old_decay
from wan_grpo.grpo.nft_update import nft_update
from wan_grpo.grpo.update import UpdateStats, policy_update, select_transitions
from wan_grpo.sampling.rollout import Trajectory, plan_steps, rollout_groups, sample_groups


@dataclass
class Rollout:
    """One rollout's samples on this rank: what the update needs."""

    prompts: list[str]  # this rollout's prompts (one per group)
    sample_prompts: list[str]  # this rank's samples' prompts
    seeds: list[int]  # this rank's samples' seeds
    cond: torch.Tensor  # (N, L, D)
    negative: torch.Tensor  # (1, L, D)
    image: object | None  # ImageCondition with N rows, or None
    final_latents: torch.Tensor  # (N, C, F, H, W)
    trajectory: Trajectory | None = None  # GRPO only


class GRPO:
    name = "grpo"

    def sample(self, run, cond, negative, *, seeds, noise_seeds, image, progress):
        cfg = run.cfg
        traj = rollout_groups(
            run.denoiser, cond, negative, latent_shape_one=run.shape_one, seeds=seeds, noise_seeds=noise_seeds,
            config=run.sampler, micro_batch=cfg.rollout_batch_size,
            storage_dtype=torch.bfloat16 if cfg.trajectory_dtype == "bf16" else torch.float32,
            storage_device="cpu" if cfg.trajectory_on_cpu else None, progress=progress, image=image,
            record_means=cfg.ratio_norm)
        return traj.final_latents, traj

    def update(self, run, batch: Rollout, advantages, keep, *, rollout_index: int, progress) -> list[UpdateStats]:
        cfg = run.cfg
        transitions = select_transitions(batch.trajectory, batch.seeds, fraction=cfg.timestep_fraction,
                                         num_chunks=cfg.optimizer_steps_per_rollout,
                                         experts=tuple(run.policy.experts))
        uncond = batch.negative.expand(len(batch.cond), -1, -1)
        return policy_update(run.denoiser, run.policy, batch.trajectory, advantages, keep.float(), transitions,
                             batch.cond, uncond, cfg=cfg, dist=run.dist, device=run.device, progress=progress,
                             image=batch.image)


class NFT:
    name = "nft"

    def sample(self, run, cond, negative, *, seeds, noise_seeds, image, progress):
        with run.policy.old_weights():  # the old policy samples
            x0 = sample_groups(run.denoiser, cond, negative, latent_shape_one=run.shape_one, seeds=seeds,
                               noise_seeds=noise_seeds, config=run.sampler,
                               scheduler_config=run.components.scheduler_config,
                               micro_batch=run.cfg.rollout_batch_size, progress=progress, image=image)
        return x0, None

    def update(self, run, batch: Rollout, advantages, keep, *, rollout_index: int, progress) -> list[UpdateStats]:
        cfg = run.cfg
        plan = plan_steps(run.sampler, run.denoiser.expert_index)
        x0 = batch.final_latents.float()
        updates = nft_update(run.denoiser, run.policy, x0, batch.seeds, advantages, keep.float(), batch.cond,
                             timesteps=plan.timesteps, sigmas=plan.sigmas, owners=plan.experts, cfg=cfg,
                             dist=run.dist, device=run.device, progress=progress, image=batch.image)
        decay = old_decay((rollout_index + 1) * cfg.optimizer_steps_per_rollout, cfg.nft_decay_type)
        run.policy.soft_update_old(decay)
        for u in updates:
            u.extra["old_decay"] = decay
        return updates


ALGORITHMS = {"grpo": GRPO, "nft": NFT}
