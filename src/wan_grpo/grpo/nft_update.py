"""The DiffusionNFT update: train on the forward process of the rollout's clean samples.

For each kept sample, a ``--timestep_fraction`` of the sampling schedule's noise levels owned by
the trained experts is drawn from the sample's seeded stream, each with ``--nft_noise_draws`` fresh
noises from the same stream, so the result does not depend on the process count. The expert that
owns a level (the boundary routing of sampling) predicts v from the prompt alone (no CFG); the old
policy's v_old (and, with --kl_coef, the reference's) are computed first, for all rows at once,
with the old weights swapped in. Each expert's loss is the weighted mean over its rows of every
rank, as in the GRPO update (grpo/update.py), whose micro-batching, clipping and optimizer step it
shares.
"""

from __future__ import annotations

import torch

from wan_grpo.distributed import DistInfo
from wan_grpo.grpo.nft import nft_loss, reward_weight
from wan_grpo.grpo.update import UpdateStats, _micro_batches, optimizer_steps, select_steps
from wan_grpo.seeding import TRAIN_NOISE, stream
from wan_grpo.sft.loss import noised


def draw_noise(rows: torch.Tensor, seeds: list[int], shape: tuple[int, ...]) -> torch.Tensor:
    """(M, *shape) noise: row k's from its sample's TRAIN_NOISE stream, in the rows' order."""
    gens: dict[int, torch.Generator] = {}
    out = torch.empty(len(rows), *shape)
    for k, sample in enumerate(rows[:, 0].tolist()):
        gen = gens.setdefault(sample, stream(seeds[sample], TRAIN_NOISE))
        out[k] = torch.randn(shape, generator=gen)
    return out


@torch.no_grad()
def _predict_all(denoiser, rows, x_t, cond, *, timesteps, owners, size: int, device, image=None) -> torch.Tensor:
    """Velocities (without grad) for every row, in micro-batches of one expert each."""
    out = torch.empty_like(x_t)
    for expert, batch in _micro_batches(rows, owners, size):
        s, k = batch[:, 0], batch[:, 3]
        img = None if image is None else image[s.to(image.latents.device)]
        out[k] = denoiser.predict_velocity(x_t[k].to(device), timesteps[batch[:, 1]].to(device),
                                           cond[s.to(cond.device)], None, expert=expert, image=img,
                                           use_cfg=False).to(out.device)
    return out


def nft_update(
    denoiser,
    policy,
    x0: torch.Tensor,  # (N, C, F, H, W) clean samples of the old policy, float32
    seeds: list[int],  # (N,) the samples' seeds
    advantages: torch.Tensor,  # (N,)
    weights: torch.Tensor,  # (N,) 1 trained, 0 left out
    cond: torch.Tensor,  # (N, L, D)
    *,
    timesteps: torch.Tensor,  # (T,) the sampling schedule's
    sigmas: torch.Tensor,  # (T + 1,)
    owners: torch.Tensor,  # (T,) the expert of each step
    cfg,
    dist: DistInfo,
    device: torch.device,
    progress=None,
    image=None,
) -> list[UpdateStats]:
    k = cfg.optimizer_steps_per_rollout
    rows = select_steps(torch.ones(len(timesteps), dtype=torch.bool), owners, seeds, fraction=cfg.timestep_fraction,
                        num_chunks=k, experts=tuple(policy.experts))
    rows = rows.repeat_interleave(cfg.nft_noise_draws, dim=0)  # each copy draws its own noise below
    rows = torch.cat([rows, torch.arange(len(rows))[:, None]], dim=1)  # (sample, step, chunk, row)
    noise = draw_noise(rows, seeds, tuple(x0.shape[1:]))
    if dist.world_size == 1:  # (optimizer_steps drops them too; here they would cost old-policy passes)
        rows = rows[weights[rows[:, 0]] > 0]
    x_t = torch.zeros_like(noise)
    x_t[rows[:, 3]] = noised(x0[rows[:, 0]].cpu(), noise[rows[:, 3]], sigmas[rows[:, 1]])
    size = cfg.train_batch_size
    predict = dict(timesteps=timesteps, owners=owners, size=size, device=device, image=image)
    with policy.old_weights():
        v_old = _predict_all(denoiser, rows, x_t, cond, **predict)
    v_ref = None
    if cfg.kl_coef > 0:
        with policy.reference(denoiser) as ref:
            v_ref = _predict_all(ref, rows, x_t, cond, **predict)
    r = reward_weight(advantages, cfg.adv_clip_max)

    def row_loss(expert, batch):
        s, row = batch[:, 0], batch[:, 3]
        img = None if image is None else image[s.to(image.latents.device)]
        v = denoiser.predict_velocity(x_t[row].to(device), timesteps[batch[:, 1]].to(device),
                                      cond[s.to(cond.device)], None, expert=expert, image=img, use_cfg=False)
        out = nft_loss(v, v_old[row].to(device), x_t[row].to(device), x0[s].to(device),
                       sigmas[batch[:, 1]].to(device), r[s].to(device), beta=cfg.nft_beta, clip_max=cfg.adv_clip_max)
        kl = torch.zeros_like(out.loss)
        if v_ref is not None:
            kl = ((v - v_ref[row].to(device)) ** 2).mean(dim=tuple(range(1, v.dim())))
        return out.loss + cfg.kl_coef * kl, {"loss_positive": out.positive, "loss_negative": out.negative,
                                            "old_deviation": out.old_deviation, "kl": kl.detach()}

    results = []
    for stats, means in optimizer_steps(policy, denoiser.placement, rows, owners, weights, cfg=cfg, dist=dist,
                                        row_loss=row_loss, progress=progress):
        if means:
            stats.kl = means.pop("kl")
            stats.extra = means
        results.append(stats)
    return results
