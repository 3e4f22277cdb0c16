"""``wan-grpo train``: rollout -> rewards -> group advantages -> the algorithm's update -> checkpoint.

The algorithm (grpo/algorithms.py) is Flow-GRPO by default, or DiffusionNFT (``--algorithm nft``).

How the GRPO path departs from the papers it draws on (say it, nanochat-style):
- SDE: Flow-GRPO's flow SDE by default (``--sde_type dance|cps`` for DanceGRPO's or CPS); the
  log-prob is the exact Gaussian density in float32, MEAN-reduced over latent elements.
- Advantages: per group and per reward component, population std + 1e-4, combined by weights,
  clipped to +-adv_clip_max. Best-of-n selects within each group (DanceGRPO), not globally.
- Loss: PPO-clip, mean over (sample, step) transitions, one backward per micro-batch; each
  transition's gradient goes only to the expert that produced it. Optional KL to the reference
  (LoRA: adapters off) on the SDE means, ||mu - mu_ref||^2 / (2 std^2); no entropy bonus.
- Deterministic steps (Euler outside ``--sde_window``, std 0) are never trained.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from wan_grpo.config import parse_size
from wan_grpo.distributed import (
    DistInfo,
    all_reduce_min,
    cleanup,
    context_parallel,
    gather_samples,
    init_distributed,
)
from wan_grpo.errors import UserError
from wan_grpo.evaluate import generate_and_score, summarize
from wan_grpo.grpo.advantages import best_of_n, group_advantages
from wan_grpo.grpo.algorithms import ALGORITHMS, Rollout
from wan_grpo.grpo.checkpoint import (
    check_resumable,
    check_same_prompts,
    load_checkpoint,
    prepare_save_dir,
    prompts_record,
    resolve_resume,
    save_checkpoint,
)
from wan_grpo.grpo.checks import check_schedule, parse_window, validate
from wan_grpo.grpo.config import DEFAULT_EPOCHS, TrainConfig
from wan_grpo.grpo.data import PromptOrder, load_prompt_records
from wan_grpo.grpo.metrics import log_row, metrics_writer, print_summary
from wan_grpo.grpo.policy import Policy, build_policy
from wan_grpo.grpo.preemption import Preempted, StopRequests
from wan_grpo.grpo.update import UpdateStats
from wan_grpo.models.denoiser import MoEDenoiser
from wan_grpo.models.kernels import check_context_parallel
from wan_grpo.models.offload import ExpertPlacement, move_optimizer_state
from wan_grpo.models.vae import decode_latents
from wan_grpo.plan import resolve_batch_sizes, train_estimate
from wan_grpo.rewards import RewardSet, build_rewards, check_reward_flags
from wan_grpo.runtime import (
    autocast_dtype,
    describe_split,
    device_memory,
    encode_all,
    load_model,
    place,
    resolve_config,
    resolve_device,
    with_precision,
)
from wan_grpo.sampling.conditioning import check_prompt_images, encode_images
from wan_grpo.sampling.rollout import SamplerConfig, latent_shape
from wan_grpo.seeding import sample_seed, seed_everything
from wan_grpo.specs import EXPERT_LABELS, PRESETS, default_reward
from wan_grpo.video import write_mp4

log = logging.getLogger("wan_grpo")


@dataclass
class Run:
    cfg: TrainConfig
    components: object
    denoiser: MoEDenoiser
    policy: Policy
    cache: object
    rewards: RewardSet
    sampler: SamplerConfig
    shape_one: tuple[int, ...]
    order: PromptOrder
    rollouts: int  # the run's length (total_rollouts), resumed or not
    device: torch.device
    save_dir: Path
    counters: dict
    dist: DistInfo
    eval_prompts: list[str]
    images: list[str | None]  # per prompt (image-to-video models), else all None
    eval_images: list[str | None]
    resume: Path | None  # the checkpoint to continue from
    algorithm: object  # grpo/algorithms.py: GRPO or NFT
    last_sample: tuple[Path, str] | None = None  # the latest sample video written (path, prompt), for W&B

    def local_slice(self, total: int) -> slice:
        per = total // self.dist.dp_size  # context-parallel peers share their slot's samples
        return slice(self.dist.dp_rank * per, (self.dist.dp_rank + 1) * per)


def _bar(total, desc, *, main: bool = True):
    return tqdm(total=total, desc=desc, leave=False, disable=None if main else True, dynamic_ncols=True)


def grpo_rollout_step(run: Run, r: int) -> list[dict]:
    """One rollout and its optimizer steps; returns one metrics row per optimizer step."""
    cfg, main = run.cfg, run.dist.is_main
    t0 = time.perf_counter()
    batch, videos = _rollout(run, r)
    t1 = time.perf_counter()
    scores = _score(run, batch, videos, r)
    adv, keep = _advantages(run, scores)
    t2 = time.perf_counter()
    if scores.finite and bool(torch.isfinite(adv.values).all()):
        for e in run.policy.experts.values():
            e.train()
        mine = run.local_slice(len(keep))
        with _bar(None, "train", main=main) as bar:
            updates = run.algorithm.update(run, batch, adv.values[mine], keep[mine], rollout_index=r,
                                           progress=bar.update)
    else:
        log.warning("non-finite rewards or advantages at rollout %d: update skipped, weights unchanged", r + 1)
        updates = [UpdateStats(skipped=True) for _ in range(cfg.optimizer_steps_per_rollout)]
    run.counters["skipped_updates"] += sum(u.skipped for u in updates)
    t3 = time.perf_counter()
    if main and cfg.sample_interval and (r + 1) % cfg.sample_interval == 0:
        _write_sample(run, r, videos[0], batch.prompts[0])
    timings = {"rollout_seconds": t1 - t0, "reward_seconds": t2 - t1, "train_seconds": t3 - t2}
    return _metrics_rows(run, r, scores, adv, keep, updates, timings)


def _rollout(run: Run, r: int) -> tuple[Rollout, list[torch.Tensor]]:
    """Sample this rank's share of the rollout's groups (seeds by global sample index) and decode them."""
    cfg, n = run.cfg, run.cfg.num_generations
    picked = run.order.batch_indices(r)
    prompts = [run.order.prompts[i] for i in picked]
    neg = run.cache.get([cfg.negative_prompt])
    seeds = [sample_seed(cfg.seed, r, g) for g in range(len(prompts) * n)]
    noise_seeds = [seeds[g - g % n] for g in range(len(seeds))] if cfg.share_noise else list(seeds)
    sample_prompts = [p for p in prompts for _ in range(n)]
    mine = run.local_slice(len(seeds))  # this rank's global samples
    cond = run.cache.get(sample_prompts[mine])
    image = None
    if run.images[0] is not None:  # one VAE encode per prompt of the rollout, shared by its group
        width, height = parse_size(cfg.size)
        per_prompt = encode_images(run.components, [run.images[i] for i in picked], width=width, height=height,
                                   frame_num=cfg.frame_num, device=run.device)
        image = per_prompt[torch.arange(len(seeds)) // n][mine]
    for e in run.policy.experts.values():
        e.eval()
    with _bar(len(seeds[mine]), "rollout", main=run.dist.is_main) as bar:
        final, traj = run.algorithm.sample(run, cond, neg, seeds=seeds[mine], noise_seeds=noise_seeds[mine],
                                           image=image, progress=bar.update)
    # the conditioning frame is kept exactly
    final = final if image is None else image.keep_generated(final.float())
    decode_batch = cfg.decode_batch_size or PRESETS[cfg.task].decode_batch_size
    videos = list(decode_latents(run.components.vae, final, micro_batch=decode_batch))
    batch = Rollout(prompts=prompts, sample_prompts=sample_prompts[mine], seeds=seeds[mine], cond=cond, negative=neg,
                    image=image, final_latents=final, trajectory=traj)
    return batch, videos


@dataclass
class Scores:
    components: dict[str, torch.Tensor]  # every reward component of every global sample
    scored: torch.Tensor  # (groups,) bool: every sample of the group has a finite score
    total: torch.Tensor  # weighted total reward of the scored samples

    @property
    def finite(self) -> bool:
        return bool(self.scored.any())


def _score(run: Run, batch: Rollout, videos: list[torch.Tensor], r: int) -> Scores:
    cfg, n = run.cfg, run.cfg.num_generations
    with _bar(len(run.rewards.entries), "reward", main=run.dist.is_main) as bar:
        local = run.rewards(videos, batch.sample_prompts, fps=cfg.fps)
        components = {k: gather_samples(v.to(run.device), run.dist.cp_size).cpu() for k, v in local.items()}
        bar.update(len(run.rewards.entries))
    # A sample without a finite score (e.g. a reward-server batch that failed after its retries)
    # takes its whole group out of the update: no made-up score ever reaches the advantages.
    scored = torch.stack([torch.isfinite(components[c]) for c in run.rewards.weighted]).all(0).view(-1, n).all(1)
    if not bool(scored.all()):
        run.counters["unscored_groups"] += int((~scored).sum())
        log.warning("rollout %d: %d of %d groups have no finite reward and are left out of the update", r + 1,
                    int((~scored).sum()), len(scored))
    total = run.rewards.total(components)[scored.repeat_interleave(n)]
    return Scores(components=components, scored=scored, total=total)


def _advantages(run: Run, scores: Scores):
    cfg, n = run.cfg, run.cfg.num_generations
    adv = group_advantages(scores.components, run.rewards.coefs, group_size=n, global_std=cfg.global_std,
                           drop_zero_std_groups=cfg.drop_zero_std_groups, clip_max=cfg.adv_clip_max,
                           valid_groups=scores.scored)
    run.counters["dropped_groups"] += adv.dropped_groups
    return adv, adv.keep & best_of_n(adv.values, n, cfg.best_of_n)


def _write_sample(run: Run, r: int, video: torch.Tensor, prompt: str) -> None:
    path = run.save_dir / "samples" / f"step-{(r + 1) * run.cfg.optimizer_steps_per_rollout:06d}.mp4"
    write_mp4(path, video.numpy(), fps=run.cfg.fps)
    run.last_sample = (path, prompt)
    with (run.save_dir / "samples" / "prompts.txt").open("a", encoding="utf-8") as f:
        f.write(f"{path.name}\t{prompt}\n")


def _metrics_rows(run: Run, r: int, scores: Scores, adv, keep, updates: list[UpdateStats], timings: dict) -> list:
    cfg, k = run.cfg, run.cfg.optimizer_steps_per_rollout
    scored_samples = scores.scored.repeat_interleave(cfg.num_generations)
    total = scores.total
    base = {
        "rollout": r + 1,
        "epoch": run.order.epoch_of(r),
        "reward_mean": float(total.mean()) if len(total) else math.nan,
        "reward_std": float(total.std(unbiased=False)) if len(total) else math.nan,
        **{f"reward_{c}_mean": float(v[scored_samples].nanmean()) if scores.finite else math.nan
           for c, v in scores.components.items()},
        "advantage_abs_mean": float(adv.values[keep].abs().mean()) if keep.any() else 0.0,
        "kept_samples": int(keep.sum()),
        **timings,
    }
    if run.eval_prompts and cfg.eval_interval and (r + 1) % cfg.eval_interval == 0:
        base.update(evaluate_policy(run))
    rows = []
    for j, u in enumerate(updates):
        rows.append({
            "step": r * k + j + 1, **base, "loss": u.loss, "ratio_mean": u.ratio_mean, "clipfrac": u.clipfrac,
            "approx_kl": u.approx_kl, "kl": u.kl,
            **{f"grad_norm_{name}": u.grad_norm[name] for name in EXPERT_LABELS},
            **{f"trained_steps_{name}": u.trained_steps[name] for name in EXPERT_LABELS},
            **{f"lr_{e.label}": u.lr.get(e.label, math.nan) for e in run.policy.experts},
            **u.extra,
            "skipped_updates": run.counters["skipped_updates"],
            "dropped_groups": run.counters["dropped_groups"],
            "unscored_groups": run.counters["unscored_groups"],
        })
    return rows


def evaluate_policy(run: Run) -> dict:
    """Mean of every reward component over the held-out prompts, sampled deterministically."""

    for e in run.policy.experts.values():
        e.eval()
    rows = generate_and_score(run.components, run.denoiser, run.cache, run.rewards, run.eval_prompts, run.cfg,
                              images=run.eval_images,
                              solver="unipc", num_samples=1, device=run.device, video_dir=None)
    names = [c for c in rows[0] if c in run.rewards.coefs] if rows else []
    return {f"eval_{c}_mean": s["mean"] for c, s in summarize(rows, names).items()}


def setup(cfg: TrainConfig) -> Run:
    validate(cfg)
    seed_everything(cfg.seed)
    save_dir = prepare_save_dir(cfg.save_dir, create=False)
    prompts, images = load_prompt_records(cfg.prompts, training=True)
    eval_prompts, eval_images = load_prompt_records(cfg.eval_prompts, flag="--eval_prompts") if cfg.eval_interval \
        else ([], [])
    cfg, model_info = resolve_config(cfg)
    sampler = SamplerConfig(solver=cfg.rollout_solver, steps=cfg.sampling_steps, shift=cfg.sample_shift,
                            sde_type=cfg.sde_type, noise_level=cfg.noise_level, sde_window=parse_window(cfg.sde_window))
    check_schedule(cfg, model_info, sampler)
    check_reward_flags(cfg, default=default_reward(cfg.task))
    resume = resolve_resume(cfg.resume, save_dir)
    if resume is not None:
        check_same_prompts(check_resumable(resume, with_precision(cfg)), prompts, "--prompts", resume)

    device = resolve_device(cfg.device)
    context_parallel.check_device(cfg.ulysses_size, world_size=int(os.environ.get("WORLD_SIZE", 1)),
                                  device_type=device.type)
    check_context_parallel(cfg.attention_backend, cfg.ulysses_size)
    info = init_distributed(device_type=device.type, need_group=cfg.dit_fsdp, cp_size=cfg.ulysses_size)
    if info.world_size > 1 and not cfg.dit_fsdp:
        raise UserError(f"{info.world_size} processes need --dit_fsdp (gradients are synchronised by FSDP2)")
    if info.world_size > 1 and device.type == "cuda":
        cfg = dataclasses.replace(cfg, device=f"cuda:{info.local_rank}")
    if not info.is_main:
        log.setLevel(logging.WARNING)
    total = cfg.batch_size * cfg.num_generations
    if total % info.dp_size:
        raise UserError(f"--batch_size x --num_generations = {total} samples do not split over {info.dp_size} "
                        "processes; make it a multiple of the process count")
    components, cfg, device, dtype = load_model(cfg)
    memory = device_memory(device) if cfg.task != "tiny" else None  # tiny: no architecture to estimate
    if memory is not None and info.world_size > 1:  # every rank must choose the same sizes (FSDP collectives)
        memory = float(all_reduce_min(torch.tensor([memory], dtype=torch.float64, device=device))[0])
    cfg, chosen = resolve_batch_sizes(cfg, nproc=info.world_size if cfg.dit_fsdp else 1, device_memory=memory)
    if chosen and memory is not None:
        log.info("batch sizes chosen for %.0f GiB per process by plan's estimate: %s", memory / 2**30,
                 ", ".join(f"--{k} {v}" for k, v in chosen.items()))
    rewards = build_rewards(cfg, default=default_reward(cfg.task), device=device,
                            drop_failed=True)
    check_prompt_images(components, images, "--prompts")
    check_prompt_images(components, eval_images, "--eval_prompts")
    width, height = parse_size(cfg.size)
    shape_one = latent_shape(components, width=width, height=height, frame_num=cfg.frame_num)
    patch = components.any_transformer.config.patch_size
    context_parallel.check_model(cfg.ulysses_size, heads=components.any_transformer.config.num_attention_heads,
                                 tokens=(shape_one[2] // patch[0]) * (shape_one[3] // patch[1])
                                 * (shape_one[4] // patch[2]))
    if info.is_main:
        prepare_save_dir(save_dir)
        (save_dir / "config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    # The text encoder runs once per distinct prompt and is freed (so --t5_fsdp has nothing to shard).
    log.info("schedule: %s", describe_split(components, steps=cfg.sampling_steps, shift=cfg.sample_shift))
    if cfg.task != "tiny":  # the official architecture's estimate (wan-grpo plan), before anything is placed

        log.info("estimated accelerator memory per process:\n%s",
                 "\n".join(train_estimate(cfg, nproc=info.world_size if cfg.dit_fsdp else 1)))
    cache = encode_all(components, prompts + eval_prompts, cfg.negative_prompt, device=device, dtype=dtype)
    place(components, device, offload_experts=cfg.offload_model)
    order = PromptOrder(prompts, batch_size=cfg.batch_size, seed=cfg.seed)
    rollouts = total_rollouts(cfg, order)
    policy = build_policy(components, cfg, device=device, fsdp=cfg.dit_fsdp, reference=cfg.kl_coef > 0,
                          total_steps=rollouts * cfg.optimizer_steps_per_rollout)
    if cfg.algorithm == "nft":
        policy.keep_old_copy()  # the sampling policy; a resumed run loads its saved values
    if cfg.ulysses_size > 1:
        context_parallel.enable(list(components.experts.values()), cp_size=cfg.ulysses_size, device_type=device.type)
        log.info("Ulysses: each video's tokens split over %d ranks; %d data-parallel slots", cfg.ulysses_size,
                 info.dp_size)
    denoiser = MoEDenoiser(components, guidance_scale=cfg.guidance_scale, guidance_scale_2=cfg.guidance_scale_2,
                           autocast_dtype=autocast_dtype(cfg.mixed_precision))
    if cfg.offload_model:
        denoiser.placement = ExpertPlacement((components.transformer, components.transformer_2), device=device,
                                             enabled=True)
        denoiser.placement.on_move.append(lambda module, dev: move_optimizer_state(policy.optimizer, module, dev))
    return Run(cfg=cfg, components=components, denoiser=denoiser, policy=policy, cache=cache, rewards=rewards,
               sampler=sampler, shape_one=shape_one, order=order, rollouts=rollouts, device=device, save_dir=save_dir,
               counters={"skipped_updates": 0, "dropped_groups": 0, "unscored_groups": 0},
               dist=info, eval_prompts=eval_prompts, images=images, eval_images=eval_images,
               resume=resume, algorithm=ALGORITHMS[cfg.algorithm]())


def total_rollouts(cfg: TrainConfig, order: PromptOrder) -> int:
    """The run's rollouts: --max_steps' (validate(): a multiple of the steps per rollout) unless --num_epochs
    passes over the prompts end it sooner; without either, DEFAULT_EPOCHS passes."""
    return order.run_length(num_epochs=cfg.num_epochs, limit=cfg.max_steps // cfg.optimizer_steps_per_rollout,
                            default_epochs=DEFAULT_EPOCHS)


def train(cfg: TrainConfig, *, stop: StopRequests | None = None) -> Path:
    """Run GRPO; a stop signal (``stop``, see grpo/preemption.py) ends it with a checkpoint and ``Preempted``."""
    try:
        with stop or StopRequests() as stop:  # installed first: a signal during start-up stops cleanly too
            return _loop(setup(cfg), stop)
    finally:
        cleanup()


def _loop(run: Run, stop: StopRequests) -> Path:
    cfg, main = run.cfg, run.dist.is_main
    k = cfg.optimizer_steps_per_rollout
    start = 0
    if run.resume is not None:
        state = load_checkpoint(run.resume, run.policy)
        start = state["rollout"]
        run.counters.update(state["counters"])
        log.info("resumed from %s (step %d)", run.resume, state["step"])
    total = run.rollouts
    if main and (warning := run.order.epochs_end_first(num_epochs=cfg.num_epochs, total=total, max_steps=cfg.max_steps,
                                                        steps_per_batch=cfg.optimizer_steps_per_rollout)):
        log.warning(warning)
    metrics = metrics_writer(cfg, run.save_dir, resume_step=start * k) if main else None
    solver = run.sampler.solver if run.sampler.solver != "sde" else f"SDE ({cfg.sde_type})"
    log.info("%s on %s: %d prompts, %d rollouts x %d optimizer steps, %d videos per prompt, %d %s steps, "
             "%d process(es)", cfg.algorithm.upper(), cfg.task, len(run.order.prompts), total, k, cfg.num_generations,
             cfg.sampling_steps, solver, run.dist.world_size)
    saved_at = start * k if run.resume is not None else None  # the step whose checkpoint is on disk
    try:
        for r in tqdm(range(start, total), desc="GRPO", initial=start, total=total, disable=None if main else True):
            if stop.agreed():  # every rank stops before the same rollout, after the last one's steps
                path = run.save_dir / f"checkpoint-{r * k}"
                if saved_at != r * k:
                    path = save_checkpoint(run.save_dir, r * k, run.policy, _state(run, r), is_main=main,
                                           keep=cfg.keep_checkpoints)
                raise Preempted(stop.name, path)
            rows = grpo_rollout_step(run, r)
            _test_pause()
            for row in rows if main else ():
                metrics.write(row)
            if main and run.last_sample is not None:
                metrics.write_video(*run.last_sample, step=rows[-1]["step"])
                run.last_sample = None
            step = rows[-1]["step"]
            if cfg.log_interval and (r + 1) % cfg.log_interval == 0:
                log_row(rows[-1], nft=cfg.algorithm == "nft")
            if (cfg.save_interval and (r + 1) * k // cfg.save_interval > r * k // cfg.save_interval) or r + 1 == total:
                save_checkpoint(run.save_dir, step, run.policy, _state(run, r + 1), is_main=main,
                                keep=cfg.keep_checkpoints)
                saved_at = step
        if total > start:
            log.info("checkpoint: %s", run.save_dir / f"checkpoint-{total * k}")
    finally:
        if metrics is not None:
            metrics.close()
    if main:
        print_summary(run.save_dir)
        print(f"metrics: {run.save_dir / 'metrics.jsonl'}  (TensorBoard: {run.save_dir / 'tb'})")
        if cfg.sample_interval:
            print(f"samples: {run.save_dir / 'samples'}")
    return run.save_dir


STEP_DELAY_ENV = "WAN_GRPO_TEST_STEP_DELAY"  # tests only: seconds to pause after each rollout


def _test_pause() -> None:
    delay = float(os.environ.get(STEP_DELAY_ENV, "0") or 0)
    if delay > 0:
        time.sleep(delay)


def _state(run: Run, rollouts_done: int) -> dict:
    return {"rollout": rollouts_done, "epoch": run.order.epoch_of(rollouts_done), "counters": dict(run.counters),
            "config": dataclasses.asdict(run.cfg), "prompts": prompts_record(run.order.prompts)}
