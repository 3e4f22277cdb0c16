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
from wan_grpo.sampling.rollout import Trajectory

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


def select_transitions(traj: Trajectory, keep: torch.Tensor, *, fraction: float,
                       generator: torch.Generator) -> torch.Tensor:
    """(M, 2) long rows (sample, step): a random ``fraction`` of each kept sample's trainable steps."""
    steps = torch.nonzero(traj.trainable).flatten()
    if len(steps) == 0:
        return torch.zeros(0, 2, dtype=torch.long)
    k = max(1, min(len(steps), round(fraction * len(steps))))
    rows = []
    for s in torch.nonzero(keep).flatten().tolist():
        chosen = steps[torch.randperm(len(steps), generator=generator)[:k]]
        rows.append(torch.stack([torch.full_like(chosen, s), chosen], dim=1))
    return torch.cat(rows) if rows else torch.zeros(0, 2, dtype=torch.long)


def _micro_batches(chunk: torch.Tensor, experts: torch.Tensor, size: int):
    """Split rows (sample, step) into micro-batches of one expert each, in (expert, step) order."""
    owner = experts[chunk[:, 1]]
    for e in owner.unique().tolist():
        rows = chunk[owner == e]
        rows = rows[torch.argsort(rows[:, 1] * 1_000_000 + rows[:, 0])]
        for start in range(0, len(rows), size):
            yield e, rows[start : start + size]


def policy_update(
    denoiser,
    policy,
    traj: Trajectory,
    advantages: torch.Tensor,  # (N,)
    transitions: torch.Tensor,  # (M, 2)
    cond: torch.Tensor,  # (N, L, D)
    uncond: torch.Tensor | None,  # (N, L, D)
    *,
    cfg,
    device: torch.device,
    generator: torch.Generator,
    progress=None,
) -> list[UpdateStats]:
    """``cfg.optimizer_steps_per_rollout`` optimizer steps over the shuffled transitions."""
    k = max(1, cfg.optimizer_steps_per_rollout)
    order = transitions[torch.randperm(len(transitions), generator=generator)]
    results = []
    for chunk in order.tensor_split(k) if len(order) else [order] * k:
        stats = UpdateStats()
        policy.optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "ratio": 0.0, "clipfrac": 0.0, "approx_kl": 0.0, "kl": 0.0}
        finite = True
        for expert, rows in _micro_batches(chunk, traj.experts, max(1, cfg.train_batch_size)):
            if expert not in policy.experts:
                continue  # this expert is frozen: its steps carry no trainable parameters
            s, t = rows[:, 0], rows[:, 1]
            unc = None if uncond is None else uncond[s.to(uncond.device)]
            out = replay.replay_transitions(denoiser, traj, s, t, cond[s.to(cond.device)], unc,
                                            expert=expert, device=device)
            adv = advantages[s].to(device)
            old = traj.log_probs[s, t].to(device)
            per_transition, st = ppo_clip_loss(out.log_prob, old, adv, cfg.clip_range)
            kl = torch.zeros_like(per_transition)
            if cfg.kl_coef > 0:
                with torch.no_grad(), policy.reference(denoiser) as ref_denoiser:
                    ref = replay.replay_transitions(ref_denoiser, traj, s, t, cond[s.to(cond.device)], unc,
                                                    expert=expert, device=device)
                kl = gaussian_kl(out.mean, ref.mean, out.std)
            loss = (per_transition + cfg.kl_coef * kl).sum() / len(chunk)
            if not torch.isfinite(loss):
                finite = False
                break
            loss.backward()
            sums["loss"] += float(loss.detach())
            sums["ratio"] += float(st["ratio"].sum())
            sums["clipfrac"] += float(st["clipfrac"].sum())
            sums["approx_kl"] += float(st["approx_kl"].sum())
            sums["kl"] += float(kl.detach().sum())
            stats.trained_steps[EXPERT_NAMES[expert]] += len(rows)
            if progress is not None:
                progress(len(rows))
        n = max(1, len(chunk))
        stats.loss = sums["loss"]
        stats.ratio_mean, stats.clipfrac = sums["ratio"] / n, sums["clipfrac"] / n
        stats.approx_kl, stats.kl = sums["approx_kl"] / n, sums["kl"] / n
        for idx, params in policy.params.items():
            max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
            stats.grad_norm[EXPERT_NAMES[idx]] = float(norm)
            finite = finite and bool(torch.isfinite(norm))
        if not finite:
            log.warning("non-finite loss or gradient: optimizer step skipped, weights unchanged")
            policy.optimizer.zero_grad(set_to_none=True)
            stats.skipped = True
        else:
            policy.optimizer.step()
            policy.scheduler.step()
        results.append(stats)
    return results
