"""The policy update: replay recorded transitions with the expert that produced them, PPO-clip.

Each micro-batch holds transitions of ONE expert, so gradients reach only the expert that owns
the step. Its loss (policy + KL) is summed into one backward. Each expert's losses are divided by
the number of its transitions in the optimizer step, so its gradient is their mean whatever the
batching, and whatever the other expert does.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from wan_grpo.distributed import DistInfo, all_reduce_sum
from wan_grpo.grpo import replay
from wan_grpo.grpo.loss import gaussian_kl, guard_step_weight, ppo_clip_loss, ratio_norm_log_ratio
from wan_grpo.sampling.rollout import Trajectory
from wan_grpo.seeding import TIMESTEPS, stream
from wan_grpo.specs import EXPERT_LABELS, EXPERTS, Expert

log = logging.getLogger("wan_grpo")


@dataclass
class UpdateStats:
    """One optimizer step. Means are over the step's trained transitions of every rank; NaN when the
    step was skipped for having nothing to train."""

    loss: float = math.nan
    ratio_mean: float = math.nan
    clipfrac: float = math.nan
    approx_kl: float = math.nan
    kl: float = math.nan
    grad_norm: dict[str, float] = field(default_factory=lambda: {n: 0.0 for n in EXPERT_LABELS})
    trained_steps: dict[str, int] = field(default_factory=lambda: {n: 0 for n in EXPERT_LABELS})
    lr: dict[str, float] = field(default_factory=dict)  # by trained expert: the rate this step used
    skipped: bool = False
    extra: dict[str, float] = field(default_factory=dict)  # an algorithm's own statistics (NFT's L+, L-, ...)


def select_transitions(traj: Trajectory, seeds: list[int], *, fraction: float, num_chunks: int,
                       experts: tuple[Expert, ...] = EXPERTS) -> torch.Tensor:
    """(M, 3) long rows (sample, step, chunk) for every local sample: ``select_steps`` over the
    trajectory's trainable (stochastic) steps."""
    return select_steps(traj.trainable, traj.experts, seeds, fraction=fraction, num_chunks=num_chunks,
                        experts=experts)


def select_steps(trainable: torch.Tensor, owners: torch.Tensor, seeds: list[int], *, fraction: float,
                 num_chunks: int, experts: tuple[Expert, ...] = EXPERTS) -> torch.Tensor:
    """(M, 3) long rows (sample, step, chunk) for every local sample, among the steps where
    ``trainable`` (T,) holds; ``owners`` (T,) is each step's expert.

    Per sample and per trained expert (``experts``), a random ``fraction`` of that expert's trainable
    steps (at least one), drawn from the sample's own seeded stream; the chosen steps (high expert's
    first) are dealt round-robin into ``num_chunks`` optimizer steps. Every sample gets the same
    number of steps per expert and per chunk, so ranks holding equally many samples run equally many
    passes through each expert. A frozen expert's steps are never selected.
    """
    rows = []
    for i, seed in enumerate(seeds):
        gen = stream(seed, TIMESTEPS)
        chosen = []
        for e in Expert:
            steps = torch.nonzero(trainable & (owners == e)).flatten()
            if len(steps) == 0:
                continue
            k = transitions_per_sample(len(steps), fraction)
            picked = steps[torch.randperm(len(steps), generator=gen)[:k]]  # drawn for both: same stream
            if e in experts:
                chosen.append(picked)
        if chosen:
            steps = torch.cat(chosen)
            chunk = torch.arange(len(steps)) % num_chunks
            rows.append(torch.stack([torch.full_like(steps, i), steps, chunk], dim=1))
    return torch.cat(rows) if rows else torch.zeros(0, 3, dtype=torch.long)


def transitions_per_sample(trainable_steps: int, fraction: float) -> int:
    """How many of an expert's ``trainable_steps`` one update replays per sample (0 when it has none)."""
    return 0 if trainable_steps == 0 else max(1, min(trainable_steps, round(fraction * trainable_steps)))


def _micro_batches(rows: torch.Tensor, experts: torch.Tensor, size: int):
    """Split rows (sample, step, ...) into micro-batches of one expert each, in (expert, step, sample) order."""
    owner = experts[rows[:, 1]]
    for e in Expert:
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
    dist: DistInfo,
    device: torch.device,
    progress=None,
    image=None,  # ImageCondition with N rows (image-conditioned models), or None
) -> list[UpdateStats]:
    """``cfg.optimizer_steps_per_rollout`` optimizer steps over the selected transitions.

    ``weights`` (N_local,) is 1 for trained samples and 0 for those best-of-n or zero-variance
    groups left out; weight-0 samples are still replayed when several ranks train (equal passes).
    Each expert's loss is the mean over ITS weighted transitions of all ranks, so an expert's
    gradient does not depend on how many steps the other expert owns or whether it trains; the
    objective is the sum of the two. FSDP averages gradients over ranks, so each rank scales its
    sums by world_size / that expert's global count. A step with no weighted transition is skipped
    (no optimizer or LR-schedule step) and reported as such.
    """
    step_weights = None
    if cfg.reweight_steps:  # GRPO-Guard: normalised to mean 1 over the trainable steps, so the loss keeps its scale
        w = guard_step_weight(traj.sigmas[:-1], traj.sigmas[1:], kind=traj.sde_type, noise_level=traj.noise_level,
                              sigma_max=traj.sigma_max)
        step_weights = w / w[traj.trainable].mean()

    def row_loss(expert, rows):
        s, t = rows[:, 0], rows[:, 1]
        unc = None if uncond is None else uncond[s.to(uncond.device)]
        img = None if image is None else image[s.to(image.latents.device)]
        out = replay.replay_transitions(denoiser, traj, s, t, cond[s.to(cond.device)], unc,
                                        expert=expert, device=device, image=img)
        old = traj.log_probs[s, t].to(device)
        log_ratio = None
        if cfg.ratio_norm:  # GRPO-Guard
            old_mean = traj.means[s.to(traj.means.device), t.to(traj.means.device)].to(device)
            log_ratio = ratio_norm_log_ratio(out.log_prob, old, out.mean, old_mean, out.std,
                                             None if img is None else img.generated)
        per_transition, st = ppo_clip_loss(out.log_prob, old, advantages[s].to(device), cfg.clip_range,
                                           log_ratio=log_ratio)
        if step_weights is not None:
            per_transition = per_transition * step_weights[t].to(device, per_transition.dtype)
        kl = torch.zeros_like(per_transition)
        if cfg.kl_coef > 0:
            with torch.no_grad(), policy.reference(denoiser) as ref_denoiser:
                ref = replay.replay_transitions(ref_denoiser, traj, s, t, cond[s.to(cond.device)], unc,
                                                expert=expert, device=device, image=img)
            kl = gaussian_kl(out.mean, ref.mean, out.std, None if img is None else img.generated)
        return per_transition + cfg.kl_coef * kl, {"ratio": st["ratio"], "clipfrac": st["clipfrac"],
                                                  "approx_kl": st["approx_kl"], "kl": kl.detach()}

    results = []
    for stats, means in optimizer_steps(policy, denoiser.placement, transitions, traj.experts, weights, cfg=cfg,
                                        dist=dist, row_loss=row_loss, progress=progress):
        if means:
            stats.ratio_mean, stats.clipfrac = means["ratio"], means["clipfrac"]
            stats.approx_kl, stats.kl = means["approx_kl"], means["kl"]
        results.append(stats)
    return results


def optimizer_steps(policy, placement, rows: torch.Tensor, owners: torch.Tensor, weights: torch.Tensor, *, cfg,
                    dist: DistInfo, row_loss, progress=None) -> list[tuple[UpdateStats, dict[str, float]]]:
    """``cfg.optimizer_steps_per_rollout`` optimizer steps over ``rows`` (sample, step, chunk, ...), chunk j
    in step j, in micro-batches of one expert each (``owners`` (T,) is each step's expert).

    ``row_loss(expert, batch) -> (loss (B,), {name: (B,) detached})`` is the algorithm's. Each expert's
    objective is the ``weights``-weighted mean of its rows over every rank; weight-0 rows are still run
    when several ranks train (equal passes), and a step with no weighted row is skipped. Returns each
    step's stats and the weighted means of the named terms (empty when skipped).
    """
    world, cp = dist.world_size, dist.cp_size  # CP peers hold the same samples: counts are divided by cp
    if world == 1:
        rows = rows[weights[rows[:, 0]] > 0]
    results = []
    for j in range(cfg.optimizer_steps_per_rollout):
        chunk = rows[rows[:, 2] == j]
        stats = UpdateStats()
        policy.optimizer.zero_grad(set_to_none=True)
        owner = owners[chunk[:, 1]]
        local = torch.stack([weights[chunk[:, 0]][owner == e].double().sum() for e in Expert])
        counts = all_reduce_sum(local) / cp  # one collective for both experts' global counts
        for e in Expert:
            stats.trained_steps[e.label] = int(round(float(counts[e])))
        if float(counts.sum()) == 0:  # nothing to train (all groups dropped): every rank agrees
            stats.skipped = True
            results.append((stats, {}))
            continue
        sums: dict[str, float] = {"loss": 0.0, "non_finite": 0.0}
        for expert, batch in _micro_batches(chunk, owners, cfg.train_batch_size):
            per_row, terms = row_loss(expert, batch)
            w = weights[batch[:, 0]].to(per_row.device, torch.float32)
            scale = world / max(float(counts[expert]), 1.0)  # 0 only when every w here is 0
            loss = (w * per_row).sum() * scale
            bad = not torch.isfinite(loss)
            if bad:  # keep going: every rank must run the same passes
                loss = loss.nan_to_num(0.0, 0.0, 0.0) * 0
            loss.backward()
            sums["loss"] += float(loss.detach() / world)
            sums["non_finite"] += bad
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float((w * value).sum())
            if progress is not None:
                progress(len(batch))
        # one collective for every statistic
        keys = sorted(sums)
        reduced = all_reduce_sum(torch.tensor([sums[k] for k in keys], dtype=torch.float64)) / cp
        sums = dict(zip(keys, reduced.tolist()))
        n = float(counts.sum())
        stats.loss = sums["loss"]
        stats.grad_norm.update(clip_gradients(policy, cfg.max_grad_norm))
        stats.lr = current_lrs(policy)
        stats.skipped = not finish_step(policy, placement, finite=sums["non_finite"] == 0 and all(
            math.isfinite(v) for v in stats.grad_norm.values()))
        results.append((stats, {k: v / n for k, v in sums.items() if k not in ("loss", "non_finite")}))
    return results


def clip_gradients(policy, max_grad_norm: float) -> dict[str, float]:
    """Clip each trained expert's gradient to ``max_grad_norm`` (0: no clipping); pre-clip norms by name."""
    norms = {}
    for idx, params in policy.params.items():
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else math.inf)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # DTensor under FSDP2
        norms[idx.label] = float(norm)
    return norms


def current_lrs(policy) -> dict[str, float]:
    """The learning rate each trained expert's next optimizer step uses, by expert name."""
    return {group["name"]: group["lr"] for group in policy.optimizer.param_groups}


def finish_step(policy, placement, *, finite: bool) -> bool:
    """Take the optimizer and LR-schedule step, or with a non-finite loss or gradient drop the
    gradients and leave weights and schedule alone. Returns whether the step was taken."""
    if not finite:
        log.warning("non-finite loss or gradient: optimizer step skipped, weights unchanged")
        policy.optimizer.zero_grad(set_to_none=True)
        return False
    _optimizer_step(policy, placement)
    policy.scheduler.step()
    return True


def _optimizer_step(policy, placement) -> None:
    """One AdamW step; under --offload_model expert by expert, each while it is on the device."""
    if placement is None or not placement.enabled:
        policy.optimizer.step()
        return
    for idx in policy.params:
        placement.activate(idx)
        others = [p for j, ps in policy.params.items() if j != idx for p in ps]
        stashed = [p.grad for p in others]
        for p in others:
            p.grad = None  # AdamW skips parameters without gradients
        policy.optimizer.step()
        for p, g in zip(others, stashed):
            p.grad = g
