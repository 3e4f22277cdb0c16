"""``wan-grpo sft``: supervised flow-matching fine-tuning of one or both Wan2.2 experts.

Each optimizer step takes ``--batch_size`` videos (a per-epoch shuffle seeded by --seed), draws for
each a noise level t from the shifted schedule (restricted to the trained experts' range) and fresh
noise from the video's own seeded stream, and regresses the velocity at x_t on eps - x0. A sample
at t >= boundary trains ``transformer``, else ``transformer_2``: the routing of sampling, through
the same MoEDenoiser. Each expert's loss is the mean over its own samples (as in ``train``). VAE
latents are encoded once at start-up; prompt embeddings once per distinct caption. Checkpoints,
exact resume, metrics.jsonl and TensorBoard are those of ``train``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from wan_grpo.config import check_ranges, parse_size
from wan_grpo.distributed import cleanup, init_distributed
from wan_grpo.errors import UserError
from wan_grpo.grpo.checkpoint import (
    check_resumable,
    check_same_prompts,
    load_checkpoint,
    prepare_save_dir,
    prompts_record,
    resolve_resume,
    save_checkpoint,
)
from wan_grpo.grpo.data import PromptOrder
from wan_grpo.grpo.init_lora import check_files
from wan_grpo.grpo.metrics import metrics_writer, report_targets
from wan_grpo.grpo.policy import build_policy, expert_names, lora_targets, train_expert_indices
from wan_grpo.grpo.preemption import Preempted, StopRequests
from wan_grpo.grpo.update import clip_gradients, current_lrs, finish_step
from wan_grpo.models.denoiser import MoEDenoiser
from wan_grpo.models.offload import ExpertPlacement, move_optimizer_state
from wan_grpo.models.vae import encode_videos
from wan_grpo.runtime import autocast_dtype, encode_all, load_model, place, resolve_config, with_precision
from wan_grpo.sampling.rollout import validate_video_size
from wan_grpo.seeding import TRAIN_NOISE, sample_seed, seed_everything, stream
from wan_grpo.sft.config import SFTConfig
from wan_grpo.sft.data import load_dataset
from wan_grpo.sft.loss import edge_weights, expert_balanced_timesteps, flow_matching_loss, noised, sample_timesteps
from wan_grpo.specs import Expert

log = logging.getLogger("wan_grpo")


def validate(cfg: SFTConfig) -> None:
    check_ranges(cfg)
    check_files(cfg.init_lora)
    report_targets(cfg.report_to)
    if not cfg.dataset:
        raise UserError("--dataset is required: a folder of .mp4 files with captions, or shapes[:1|2]")
    expert_names(cfg.train_experts)
    if cfg.lora_rank > 0:
        lora_targets(cfg.lora_target_modules)
    prepare_save_dir(cfg.save_dir, create=False)


def trained_range(trained: list[int], boundary_ratio: float | None) -> tuple[float, float]:
    """[lo, hi) of noise levels owned by the trained experts (all of (0, 1) on a dense model)."""
    if boundary_ratio is None or len(trained) == 2:
        return 0.0, 1.0
    return (boundary_ratio, 1.0) if trained == [Expert.HIGH] else (0.0, boundary_ratio)


def run_sft(cfg: SFTConfig, *, stop: StopRequests | None = None) -> Path:
    try:
        with stop or StopRequests() as stop:  # a stop signal ends the run with a checkpoint and Preempted
            return _run(cfg, stop)
    finally:
        cleanup()


def _run(cfg: SFTConfig, stop: StopRequests) -> Path:
    validate(cfg)
    seed_everything(cfg.seed)
    cfg, info = resolve_config(cfg)
    trained = train_expert_indices(cfg.train_experts, (info.has_high, info.has_low))
    if cfg.high_noise_share is not None and len(trained) != 2:
        raise UserError("--high_noise_share splits batches between two trained experts; this run trains "
                        f"{', '.join(e.label for e in trained)}: drop the flag")
    save_dir = Path(cfg.save_dir)
    resume = resolve_resume(cfg.resume, save_dir)
    record = check_resumable(resume, with_precision(cfg)) if resume is not None else None
    dist = init_distributed(device_type="cpu", need_group=cfg.dit_fsdp)
    if dist.world_size > 1:
        raise UserError("wan-grpo sft runs on one process; launch it without torchrun")
    width, height = parse_size(cfg.size)
    prompts, videos = load_dataset(cfg.dataset, cfg.captions, width=width, height=height, frame_num=cfg.frame_num,
                                   seed=cfg.seed, videos_per_prompt=cfg.videos_per_prompt)
    if resume is not None:
        check_same_prompts(record, prompts, "--dataset", resume)
    components, cfg, device, dtype = load_model(cfg)
    validate_video_size(components, width=width, height=height, frame_num=cfg.frame_num)
    cache = encode_all(components, sorted(set(prompts)), cfg.negative_prompt, device=device, dtype=dtype)
    place(components, device, offload_experts=cfg.offload_model)
    t0 = time.perf_counter()
    latents = encode_videos(components.vae, torch.from_numpy(videos))  # once: (N, z, F', H', W')
    log.info("encoded %d videos to latents %s in %.1fs", len(latents), tuple(latents.shape[1:]),
             time.perf_counter() - t0)
    weights = None
    if cfg.edge_weight > 0:
        per_chunk = max(1, (64 << 20) // max(1, videos[0].nbytes))  # ~64 MB of frames at a time: real videos are large
        weights = torch.cat([edge_weights(torch.from_numpy(videos[i:i + per_chunk]), strength=cfg.edge_weight,
                                          time_stride=components.vae_scale_factor_temporal,
                                          space_stride=components.vae_scale_factor_spatial)
                             for i in range(0, len(videos), per_chunk)])
    del videos
    order = PromptOrder(list(range(len(latents))), batch_size=cfg.batch_size, seed=cfg.seed)
    total = order.run_length(num_epochs=cfg.num_epochs, limit=cfg.max_steps, default_epochs=1)
    if warning := order.epochs_end_first(num_epochs=cfg.num_epochs, total=total, max_steps=cfg.max_steps,
                                         batch_name="step"):
        log.warning(warning)
    policy = build_policy(components, cfg, device=device, fsdp=cfg.dit_fsdp, total_steps=total)
    denoiser = MoEDenoiser(components, guidance_scale=1.0,
                           autocast_dtype=autocast_dtype(cfg.mixed_precision))
    if cfg.offload_model:

        denoiser.placement = ExpertPlacement((components.transformer, components.transformer_2), device=device,
                                             enabled=True)
        denoiser.placement.on_move.append(lambda module, dev: move_optimizer_state(policy.optimizer, module, dev))
    prepare_save_dir(save_dir)
    (save_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    start = 0
    if resume is not None:
        start = load_checkpoint(resume, policy)["step"]
        log.info("resumed from %s (step %d)", resume, start)
    lo, hi = trained_range(trained, components.boundary_ratio)
    log.info("SFT on %d videos (%d captions), %d steps of %d, noise levels [%.3f, %.3f) at shift %g, training %s",
             len(latents), len(set(prompts)), total, cfg.batch_size, lo, hi, cfg.sample_shift,
             ", ".join(e.label for e in trained))
    metrics = metrics_writer(cfg, save_dir, resume_step=start)
    neg = cache.get([cfg.negative_prompt])
    saved_at = start if resume is not None else None
    try:
        for step in tqdm(range(start, total), desc="SFT", initial=start, total=total, disable=None):
            if stop.agreed():
                path = save_dir / f"checkpoint-{step}"
                if saved_at != step:
                    path = save_checkpoint(save_dir, step, policy, _state(cfg, step, prompts),
                                           keep=cfg.keep_checkpoints)
                raise Preempted(stop.name, path)
            t_start = time.perf_counter()
            picked = order.batch_indices(step)
            row = sft_step(denoiser, policy, latents[picked], [prompts[i] for i in picked], cache, neg, cfg=cfg,
                           step=step, lo=lo, hi=hi, device=device,
                           weight=None if weights is None else weights[picked])
            row = {"step": step + 1, "epoch": order.epoch_of(step), **row,
                   "step_seconds": time.perf_counter() - t_start}
            metrics.write(row)
            if cfg.log_interval and (step + 1) % cfg.log_interval == 0:
                per_expert = ", ".join(f"{e.label} {row[f'loss_{e.label}']:.4f}" for e in Expert
                                       if row[f"samples_{e.label}"])  # an expert without samples has no loss
                log.info("step %d  loss %.4f (%s)", step + 1, row["loss"], per_expert)
            if (cfg.save_interval and (step + 1) % cfg.save_interval == 0) or step + 1 == total:
                save_checkpoint(save_dir, step + 1, policy, _state(cfg, step + 1, prompts), keep=cfg.keep_checkpoints)
                saved_at = step + 1
        if total > start:
            log.info("checkpoint: %s", save_dir / f"checkpoint-{total}")
    finally:
        metrics.close()
    print(f"metrics: {save_dir / 'metrics.jsonl'}  checkpoint: {save_dir / f'checkpoint-{total}'}")
    return save_dir


def _state(cfg, steps_done: int, captions: list[str]) -> dict:
    return {"rollout": steps_done, "counters": {}, "config": dataclasses.asdict(cfg),
            "prompts": prompts_record(captions)}


def sft_step(denoiser, policy, x0: torch.Tensor, captions: list[str], cache, neg: torch.Tensor, *, cfg, step: int,
             lo: float, hi: float, device, weight: torch.Tensor | None = None) -> dict:
    """One optimizer step on a batch of clean latents ``x0`` (B, z, F', H', W'), its positions weighted
    by ``weight`` (B, F', H', W') if given; returns its metrics."""
    gens = [stream(sample_seed(cfg.seed, step, j), TRAIN_NOISE) for j in range(len(x0))]
    if cfg.high_noise_share is None:
        t = sample_timesteps(gens, shift=cfg.sample_shift, lo=lo, hi=hi)  # (B,)
    else:
        t = expert_balanced_timesteps(gens, shift=cfg.sample_shift, boundary=denoiser.boundary_ratio,
                                      high_share=cfg.high_noise_share)
    noise = torch.cat([torch.randn((1, *x0.shape[1:]), generator=g) for g in gens])
    dropped = [bool(torch.rand(1, generator=g) < cfg.caption_dropout) for g in gens]
    cond = torch.cat([neg if d else cache.get([c]) for c, d in zip(captions, dropped)])
    x_t = noised(x0, noise, t)
    timesteps = t * denoiser.num_train_timesteps
    owner = torch.tensor([denoiser.expert_index(float(ts)) for ts in timesteps])
    policy.optimizer.zero_grad(set_to_none=True)
    out = {"loss": 0.0}
    finite = True
    for e in Expert:
        name = e.label
        rows = torch.nonzero(owner == e).flatten() if e in policy.experts else torch.zeros(0, dtype=torch.long)
        out[f"samples_{name}"] = len(rows)
        out[f"loss_{name}"] = math.nan
        if len(rows) == 0:
            continue
        total = 0.0
        for chunk in rows.split(cfg.train_batch_size):
            v = denoiser.predict_velocity(x_t[chunk].to(device), timesteps[chunk].to(device), cond[chunk], None,
                                          expert=e)
            per_sample = flow_matching_loss(v, x0[chunk].to(device), noise[chunk].to(device),
                                            None if weight is None else weight[chunk])
            loss = per_sample.sum() / len(rows)
            loss.backward()
            total += float(loss.detach())
        out[f"loss_{name}"] = total
        out["loss"] += total
        finite = finite and math.isfinite(total)
    norms = clip_gradients(policy, cfg.max_grad_norm)
    out.update({f"grad_norm_{k}": v for k, v in norms.items()})
    out.update({f"lr_{k}": v for k, v in current_lrs(policy).items()})
    out["skipped"] = not finish_step(policy, denoiser.placement,
                                     finite=finite and all(math.isfinite(v) for v in norms.values()))
    return out
