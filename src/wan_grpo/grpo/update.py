"""The policy update: replay recorded transitions with the expert that produced them, PPO-clip.

Each micro-batch holds transitions of ONE expert, so gradients reach only the expert that owns
the step. Its loss (policy + KL) is summed into one backward. Losses are divided by the number
of transitions in the optimizer step, so the gradient is their mean whatever the batching.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from wan_grpo.grpo import replay
from wan_grpo.grpo.loss import gaussian_kl, ppo_clip_loss
from wan_grpo.models.denoiser import EXPERT_NAMES
from wan_grpo.distributed import all_reduce_sum, world_size
from wan_grpo.sampling.rollout import Trajectory
from wan_grpo.seeding import TIMESTEPS, stream

log = logging.getLogger("wan_grpo")


@dataclass
class UpdateStats:
    loss: float = 0.0
    ratio_mean: float = 0.0
    clipfrac: float = 0.0
    approx_kl: float = 0.0
    kl: float = 0.0
    grad_norm: dict[str, float] = field(default_factory=lambda: {n: 0.0 for n in EXPERT_NAMES})
    trained_steps: dict[str, int] = field(default_factory=lambda: {n: 0 for n in EXPERT_NAMES})
    skipped: bool = False


def select_transitions(traj: Trajectory, seeds: list[int], *, fraction: float, num_chunks: int) -> torch.Tensor:
    """(M, 3) long rows (sample, step, chunk) for every local sample.

    Per sample and per expert, a random ``fraction`` of that expert's trainable steps (at least one),
    drawn from the sample's own seeded stream, dealt round-robin into ``num_chunks`` optimizer
    steps. Every sample gets the same number of steps per expert and per chunk, so ranks holding
    equally many samples run equally many passes through each expert.
    """
    rows = []
    for i, seed in enumerate(seeds):
        gen = stream(seed, TIMESTEPS)
        for e in (0, 1):
            steps = torch.nonzero(traj.trainable & (traj.experts == e)).flatten()
            if len(steps) == 0:
                continue
            k = max(1, min(len(steps), round(fraction * len(steps))))
            chosen = steps[torch.randperm(len(steps), generator=gen)[:k]]
            chunk = torch.arange(k) % num_chunks
            rows.append(torch.stack([torch.full_like(chosen, i), chosen, chunk], dim=1))
    return torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.long)


def _micro_batches(rows: torch.Tensor, experts: torch.Tensor, size: int):
    """Split rows (sample, step, ...) into micro-batches of one expert each, in (expert, step, sample) order."""
    owner = experts[rows[:, 1]]
    for e in (0, 1):
        mine = rows[owner == e]
        mine = mine[torch.argsort(mine[:, 1] * 1_000_000 + mine[:, 0])]
        for start in range(0, len(mine), size):
            yield e, mine[start : start + size]


def policy_update(
    denoiser,
    policy,
    traj: Trajectory,
    advantages: torch.Tensor,  # (N,)
    weights: torch.Tensor,  # (N,) 1 trained, 0 left out
    transitions: torch.Tensor,  # (M, 3) rows (sample, step, chunk)
    cond: torch.Tensor,  # (N, L, D)
    uncond: torch.Tensor | None,  # (N, L, D)
    *,
    cfg,
    device: torch.device,
    progress=None,
    image=None,  # ImageCondition with N rows (image-conditioned models), or None
) -> list[UpdateStats]:
    """``cfg.optimizer_steps_per_rollout`` optimizer steps over the selected transitions.

    ``weights`` (N_local,) is 1 for trained samples and 0 for those best-of-n or zero-variance
    groups left out; weight-0 samples are still replayed when several ranks train (equal passes).
    Each step's loss is the mean over the weighted transitions of ALL ranks; FSDP averages
    gradients over ranks, so each rank scales its sum by world_size / global count.
    """
    k = max(1, cfg.optimizer_steps_per_rollout)
    world = world_size()
    cp = max(1, getattr(cfg, "ulysses_size", 1))  # ranks per context-parallel group
    if world == 1:
        transitions = transitions[weights[transitions[:, 0]] > 0]
    results = []
    for j in range(k):
        chunk = transitions[transitions[:, 2] == j]
        stats = UpdateStats()
        policy.optimizer.zero_grad(set_to_none=True)
        local_count = weights[chunk[:, 0]].sum() if len(chunk) else torch.zeros(())
        global_count = float(all_reduce_sum(local_count.float().reshape(1))) / cp
        scale = world / max(global_count, 1.0)
        # loss, ratio, clipfrac, approx_kl, kl, non-finite micro-batches, steps trained (high, low)
        sums = torch.zeros(8, dtype=torch.float64)
        for expert, rows in _micro_batches(chunk, traj.experts, max(1, cfg.train_batch_size)):
            if expert not in policy.experts:
                continue  # this expert is frozen: its steps carry no trainable parameters
            s, t = rows[:, 0], rows[:, 1]
            unc = None if uncond is None else uncond[s.to(uncond.device)]
            img = None if image is None else image[s.to(image.latents.device)]
            out = replay.replay_transitions(denoiser, traj, s, t, cond[s.to(cond.device)], unc,
                                            expert=expert, device=device, image=img)
            adv = advantages[s].to(device)
            w = weights[s].to(device, torch.float32)
            old = traj.log_probs[s, t].to(device)
            per_transition, st = ppo_clip_loss(out.log_prob, old, adv, cfg.clip_range)
            kl = torch.zeros_like(per_transition)
            if cfg.kl_coef > 0:
                with torch.no_grad(), policy.reference(denoiser) as ref_denoiser:
                    ref = replay.replay_transitions(ref_denoiser, traj, s, t, cond[s.to(cond.device)], unc,
                                                    expert=expert, device=device, image=img)
                kl = gaussian_kl(out.mean, ref.mean, out.std, None if img is None else img.generated)
            loss = (w * (per_transition + cfg.kl_coef * kl)).sum() * scale
            bad = not torch.isfinite(loss)
            if bad:  # keep going: every rank must run the same passes
                loss = loss.nan_to_num(0.0, 0.0, 0.0) * 0
            loss.backward()
            sums[:6] += torch.tensor([float(loss.detach()) / world, float((w * st["ratio"]).sum()),
                                      float((w * st["clipfrac"]).sum()), float((w * st["approx_kl"]).sum()),
                                      float((w * kl.detach()).sum()), float(bad)], dtype=torch.float64)
            sums[6 + expert] += float(w.sum())
            if progress is not None:
                progress(len(rows))
        sums = all_reduce_sum(sums) / cp  # one collective for every statistic; CP peers hold the same samples
        finite = bool(sums[5] == 0)
        for idx, name in enumerate(EXPERT_NAMES):
            stats.trained_steps[name] = int(sums[6 + idx])
        n = max(1.0, global_count)
        stats.loss = float(sums[0])
        stats.ratio_mean, stats.clipfrac = float(sums[1]) / n, float(sums[2]) / n
        stats.approx_kl, stats.kl = float(sums[3]) / n, float(sums[4]) / n
        for idx, params in policy.params.items():
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor under FSDP2
            stats.grad_norm[EXPERT_NAMES[idx]] = float(norm)
            finite = finite and bool(torch.isfinite(norm))
        if not finite:
            log.warning("non-finite loss or gradient: optimizer step skipped, weights unchanged")
            policy.optimizer.zero_grad(set_to_none=True)
            stats.skipped = True
        else:
            _optimizer_step(policy, denoiser.placement)
            policy.scheduler.step()
        results.append(stats)
    return results


def _optimizer_step(policy, placement) -> None:
    """One AdamW step; under --offload_model expert by expert, each while it is on the device."""
    if placement is None or not placement.enabled:
        policy.optimizer.step()
        return
    for idx, params in policy.params.items():
        placement.activate(idx)
        others = [p for j, ps in policy.params.items() if j != idx for p in ps]
        stashed = [p.grad for p in others]
        for p in others:
            p.grad = None  # AdamW skips parameters without gradients
        policy.optimizer.step()
        for p, g in zip(others, stashed):
            p.grad = g
