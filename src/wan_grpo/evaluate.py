"""``wan-grpo eval``: deterministic sampling on a prompt set, every video scored, base-vs-trained tables.

Seeds are per prompt (``seed + 1000 * prompt_index + k``), so a base model and a trained one are
compared on the same initial noise. Sampling is deterministic (UniPC, or Euler).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import logging
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from wan_grpo.config import LORA_HELP, ModelConfig, opt, parse_size
from wan_grpo.errors import UserError
from wan_grpo.grpo.checkpoint import apply_checkpoint, check_trained_checkpoint
from wan_grpo.grpo.data import load_prompt_records
from wan_grpo.models.denoiser import MoEDenoiser
from wan_grpo.models.vae import decode_latents
from wan_grpo.rewards import build_rewards, check_reward_flags
from wan_grpo.rewards.config import RewardConfig
from wan_grpo.runtime import autocast_dtype, encode_all, load_model, place, resolve_config, resolve_device
from wan_grpo.sampling.conditioning import check_prompt_images, encode_images
from wan_grpo.sampling.rollout import SamplerConfig, initial_noise, latent_shape, rollout, sample_multistep
from wan_grpo.sampling.schedule import MULTISTEP
from wan_grpo.seeding import seed_everything
from wan_grpo.specs import PRESETS, default_reward
from wan_grpo.tasks.shapes.breakdown import by_attribute, format_breakdown
from wan_grpo.video import read_mp4, write_mp4

log = logging.getLogger("wan_grpo")


@dataclass
class EvalConfig(RewardConfig, ModelConfig):
    prompts: str | None = opt(None, "Evaluation prompts (.txt or .jsonl). Default: the five built-in prompts of train.")
    lora: str | None = opt(None, LORA_HELP)
    save_dir: str = opt("./eval", "Output folder: eval.json, eval.csv, videos/, and compare files.")
    num_samples: int = opt(1, "Videos per prompt (seeds seed + 1000 * prompt_index + k).", ge=1)
    eval_solver: str = opt("unipc", "Deterministic solver: unipc, dpm++ or euler.", choices=("unipc", "dpm++", "euler"))
    compare_to: str | None = opt(None, "An earlier eval folder (e.g. of the base model) to compare against.")
    batch_size: int | None = opt(None, "Videos sampled per model call (a short last batch is padded, so scores do "
                                       "not depend on it beyond float rounding). Default: the preset's decode "
                                       "batch (1; 16 for shapes).", ge=1)


def stderr(values: list[float]) -> float:
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else 0.0


def prompt_stderr(values: Sequence[float], prompts: Sequence[Hashable]) -> float:
    """Standard error of the mean of ``values`` with the videos of one prompt as a cluster (the sandwich
    estimate with its G / (G - 1) correction): the error of a claim about prompts, which is what held-out
    prompts are for. Videos of one prompt move together, so with several per prompt ``stderr`` is too small;
    with one video per prompt the two are equal, and with equal videos per prompt this is the standard error
    of the per-prompt means. A cluster is one value of ``prompts`` (eval passes the prompt text). 0 with
    fewer than two prompts, as ``stderr`` with fewer than two videos."""
    groups = {}
    mean = float(np.mean(values)) if values else 0.0
    for v, p in zip(values, prompts, strict=True):
        groups[p] = groups.get(p, 0.0) + (v - mean)
    g = len(groups)
    if g < 2:
        return 0.0
    return float(math.sqrt(g / (g - 1) * sum(s * s for s in groups.values())) / len(values))


def spread(values: Sequence[float], prompts: Sequence[Hashable]) -> tuple[float, float, float]:
    """Mean (NaN without values), its standard error over videos, and over prompts."""
    return float(np.mean(values)) if values else math.nan, stderr(values), prompt_stderr(values, prompts)


def summarize(rows: list[dict], components: list[str]) -> dict:
    """Mean, standard error (over videos, and over prompts: ``prompt_stderr``), and the counts of videos and
    prompts of each component over the videos it applies to (NaN: not)."""
    out = {}
    for c in components:
        used = [r for r in rows if r[c] is not None and math.isfinite(r[c])]
        values, prompts = [r[c] for r in used], [r["prompt"] for r in used]
        mean, error, prompt_error = spread(values, prompts)
        out[c] = {"mean": mean, "stderr": error, "prompt_stderr": prompt_error, "n": len(values),
                  "prompts": len(set(prompts))}
    return out


@torch.no_grad()
def generate_and_score(components, denoiser, cache, rewards, prompts: list[str], cfg, *, solver: str,
                       num_samples: int, device, video_dir: Path | None, images: list | None = None,
                       batch_size: int = 1, decode_batch_size: int = 1) -> list[dict]:
    """One row per video: prompt, prompt_index, seed, video file, and every reward component.

    Videos are sampled ``batch_size`` at a time in (prompt, seed) order; a short last batch is padded
    with copies, so every model call has the same shape and a video never depends on its batch-mates
    (a batch of prompts with and without a conditioning image is split at the change)."""
    width, height = parse_size(cfg.size)
    shape = latent_shape(components, width=width, height=height, frame_num=cfg.frame_num)
    sampler = SamplerConfig(solver=solver, steps=cfg.sampling_steps, shift=cfg.sample_shift)
    uncond = cache.get([cfg.negative_prompt])
    has_image = [bool(images) and images[i] is not None for i in range(len(prompts))]
    jobs = [(i, k, cfg.seed + 1000 * i + k) for i in range(len(prompts)) for k in range(num_samples)]
    batch_size = max(1, min(batch_size, len(jobs)))
    rows = []
    start = 0
    while start < len(jobs):
        first = has_image[jobs[start][0]]
        chunk = list(itertools.takewhile(lambda j, f=first: has_image[j[0]] == f, jobs[start:start + batch_size]))
        start += len(chunk)
        padded = chunk + [chunk[-1]] * (batch_size - len(chunk))
        noise = torch.cat([initial_noise(shape, generator=torch.Generator("cpu").manual_seed(seed), device=device)
                           for _, _, seed in padded])
        cond = torch.cat([cache.get([prompts[i]]) for i, _, _ in padded])
        neg = uncond.expand(len(padded), -1, -1)
        image = None
        if has_image[chunk[0][0]]:
            image = encode_images(components, [images[i] for i, _, _ in padded], width=width, height=height,
                                  frame_num=cfg.frame_num, device=device)
        if sampler.solver in MULTISTEP:
            latents = sample_multistep(denoiser, noise, cond, neg, config=sampler,
                                       scheduler_config=components.scheduler_config, image=image)
        else:
            latents, _ = rollout(denoiser, noise, cond, neg, config=sampler, record=False, image=image)
        videos = decode_latents(components.vae, latents[:len(chunk)], micro_batch=decode_batch_size)
        batch_prompts = [prompts[i] for i, _, _ in chunk]
        scores = rewards(list(videos), batch_prompts, fps=cfg.fps)
        for n, (i, k, seed) in enumerate(chunk):
            row = {"prompt": prompts[i], "prompt_index": i, "seed": seed}
            if video_dir is not None:
                path = write_mp4(video_dir / f"p{i:03d}_s{k:02d}.mp4", videos[n].numpy(), fps=cfg.fps)
                row["video"] = str(path.relative_to(video_dir.parent))
            row.update({c: float(v[n]) if math.isfinite(float(v[n])) else None for c, v in scores.items()})
            rows.append(row)
    return rows


def run_eval(cfg: EvalConfig) -> Path:
    # every input is checked before the model loads
    out = Path(cfg.save_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"--save_dir {out} is a file; pass a folder")
    prompts, images = load_prompt_records(cfg.prompts)
    base = json.loads(_eval_json(cfg.compare_to).read_text()) if cfg.compare_to else None
    if cfg.lora:
        check_trained_checkpoint(cfg.lora)
    resolve_device(cfg.device)
    cfg, _ = resolve_config(cfg)  # reads config files only; the task decides the default reward
    check_reward_flags(cfg, default=default_reward(cfg.task))
    seed_everything(cfg.seed)  # reward plug-ins and libraries that draw from the global RNGs
    components, cfg, device, dtype = load_model(cfg)
    rewards = build_rewards(cfg, default=default_reward(cfg.task), device=device)
    check_prompt_images(components, images, "--prompts")
    if cfg.lora:
        log.info("applied %s from %s", ", ".join(apply_checkpoint(components, cfg.lora)), cfg.lora)
    cache = encode_all(components, prompts, cfg.negative_prompt, device=device, dtype=dtype)
    place(components, device)
    denoiser = MoEDenoiser(components, guidance_scale=cfg.guidance_scale, guidance_scale_2=cfg.guidance_scale_2,
                           autocast_dtype=autocast_dtype(cfg.mixed_precision))
    decode = PRESETS[cfg.task].decode_batch_size
    rows = generate_and_score(components, denoiser, cache, rewards, prompts, cfg, solver=cfg.eval_solver,
                              num_samples=cfg.num_samples, device=device, video_dir=out / "videos", images=images,
                              batch_size=cfg.batch_size or decode, decode_batch_size=decode)
    names = list(rewards.coefs)
    result = {"config": dataclasses.asdict(cfg), "components": names, "videos": rows,
              "summary": summarize(rows, names)}
    breakdown = by_attribute(rows)  # empty unless the videos have an accuracy and Shapes prompts
    if breakdown:
        result["by_attribute"] = breakdown
    (out / "eval.json").write_text(json.dumps(result, indent=2))
    with (out / "eval.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["prompt_index", "seed", "prompt", "video", *names])
        writer.writeheader()
        writer.writerows(rows)
    for c, s in result["summary"].items():
        print(f"{c}: {s['mean']:.4f} +- {s['stderr']:.4f} (n={s['n']}; +- {s['prompt_stderr']:.4f} over "
              f"{s['prompts']} prompts)")
    if "by_attribute" in result:
        print("accuracy by " + "\naccuracy by ".join(format_breakdown(result["by_attribute"])))
    if base is not None:
        compare(base, result, out, base_dir=Path(cfg.compare_to), fps=cfg.fps)
    print(f"eval: {out / 'eval.json'}, {out / 'eval.csv'}")
    return out


def _eval_json(folder: str | Path) -> Path:
    path = Path(folder) / "eval.json"
    if not path.is_file():
        raise UserError(f"--compare_to {folder} has no eval.json; pass the save_dir of an earlier wan-grpo eval")
    return path


COMPARABLE = ("size", "frame_num", "sampling_steps", "sample_shift", "guidance_scale", "guidance_scale_2",
              "negative_prompt", "eval_solver")


def check_comparable(base: dict, trained: dict) -> None:
    """One-line error when two evals cannot be paired video by video."""
    for key in COMPARABLE:
        a, b = base["config"].get(key), trained["config"].get(key)
        if a != b:
            raise UserError(f"--compare_to was sampled with {key} {a!r}, this eval with {b!r}; rerun one of them with "
                            "the same settings")
    if not set(trained["components"]) & set(base["components"]):
        raise UserError(f"--compare_to scored {', '.join(base['components'])}, this eval "
                        f"{', '.join(trained['components'])}; use the same --reward")


def compare(base: dict, trained: dict, out: Path, *, base_dir: Path, fps: int, grid_rows: int = 4) -> dict:
    """Paired per-video deltas per component (videos matched by prompt text and seed), a markdown
    table, a side-by-side mp4 per prompt and ``compare/grid.mp4`` (base | trained, a row per prompt)."""

    check_comparable(base, trained)
    key = lambda r: (r["prompt"], r["seed"])  # noqa: E731
    base_rows = {key(r): r for r in base["videos"]}
    pairs = [(base_rows[key(r)], r) for r in trained["videos"] if key(r) in base_rows]
    if not pairs:
        raise UserError("--compare_to shares no (prompt, seed) with this eval; use the same prompts and --seed")
    table = {}
    for c in trained["components"]:
        if c not in base["components"]:
            continue
        both = [(b[c], t[c], t["prompt"]) for b, t in pairs if b.get(c) is not None and t.get(c) is not None]
        if not both:
            continue
        prompts = [p for _, _, p in both]
        table[c] = {}
        for name, values in (("base", [b for b, _, _ in both]), ("trained", [t for _, t, _ in both]),
                             ("delta", [t - b for b, t, _ in both])):
            table[c][name], table[c][f"{name}_stderr"], table[c][f"{name}_prompt_stderr"] = spread(values, prompts)
        table[c].update(n=len(both), prompts=len(set(prompts)))
    lines = ["| component | base | trained | delta (paired) | delta +- over prompts | videos | prompts |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {c} | {v['base']:.4f} +- {v['base_stderr']:.4f} | {v['trained']:.4f} +- {v['trained_stderr']:.4f} | "
              f"{v['delta']:+.4f} +- {v['delta_stderr']:.4f} | {v['delta_prompt_stderr']:.4f} | {v['n']} | "
              f"{v['prompts']} |" for c, v in table.items()]
    (out / "compare.md").write_text("\n".join(lines) + "\n")
    (out / "compare.json").write_text(json.dumps(table, indent=2))
    print("\n".join(lines))
    seen, rows = set(), []
    for b, t in pairs:
        if b["prompt"] in seen or "video" not in b or "video" not in t:
            continue
        seen.add(b["prompt"])
        left, right = read_mp4(base_dir / b["video"]), read_mp4(out / t["video"])
        n = min(len(left), len(right))
        side = np.concatenate([left[:n], right[:n]], axis=2)
        write_mp4(out / "compare" / f"prompt_{t['prompt_index']:03d}.mp4", side, fps=fps)
        if len(rows) < grid_rows:
            rows.append(side)
    if rows:
        n = min(len(r) for r in rows)
        write_mp4(out / "compare" / "grid.mp4", np.concatenate([r[:n] for r in rows], axis=1), fps=fps)
    return table
