"""``wan-grpo score``: score mp4 files with any reward (VideoAlign by default) and print or save."""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from wan_grpo.config import opt
from wan_grpo.errors import UserError
from wan_grpo.rewards import build_rewards
from wan_grpo.rewards.config import RewardConfig
from wan_grpo.runtime import resolve_device
from wan_grpo.video import read_video

log = logging.getLogger("wan_grpo")


@dataclass
class ScoreConfig(RewardConfig):
    video: str | None = opt(None, "One mp4 to score (with --prompt); prints one JSON line.")
    prompt: str | None = opt(None, "The text prompt of --video.")
    videos: str | None = opt(None, "A folder of mp4s to score (with --prompts); writes a CSV.")
    prompts: str | None = opt(None, "For --videos: a .txt with one prompt per video in file-name order, or a "
                                    ".jsonl with 'video' (file name) and 'prompt' fields.")
    output: str | None = opt(None, "CSV path for --videos (default: VIDEOS/scores.csv).")
    device: str = opt("auto", "Device of the reward model when --reward_device is unset: auto, cpu, cuda[:N].")


def _pairs(cfg: ScoreConfig) -> list[tuple[Path, str]]:
    if cfg.video:
        if cfg.videos or cfg.prompt is None:
            raise UserError("--video needs --prompt (and no --videos); or score a folder with --videos and --prompts")
        return [(Path(cfg.video), cfg.prompt)]
    if not cfg.videos or not cfg.prompts:
        raise UserError("pass --video FILE.mp4 --prompt TEXT, or --videos DIR --prompts FILE")
    folder, prompt_file = Path(cfg.videos), Path(cfg.prompts)
    if not folder.is_dir():
        raise UserError(f"--videos {folder} is not a folder of mp4 files")
    if not prompt_file.is_file():
        raise UserError(f"--prompts {prompt_file} does not exist")
    files = sorted(folder.glob("*.mp4"))
    if prompt_file.suffix == ".jsonl":
        pairs = []
        for n, line in enumerate(prompt_file.read_text().splitlines(), 1):
            if line.strip():
                try:
                    row = json.loads(line)
                    pairs.append((folder / row["video"], row["prompt"]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise UserError(f"{prompt_file}:{n} needs a JSON object with 'video' and 'prompt'") from None
        return pairs
    prompts = [p.strip() for p in prompt_file.read_text().splitlines() if p.strip()]
    if len(prompts) != len(files):
        raise UserError(f"{folder} has {len(files)} mp4 files but {prompt_file} has {len(prompts)} prompts; give one "
                        "prompt per video in file-name order, or a .jsonl with 'video' and 'prompt'")
    return list(zip(files, prompts))


def _with_overall(scores: dict[str, float]) -> dict[str, float]:
    if all(k in scores for k in ("VQ", "MQ", "TA")):
        scores["Overall"] = scores["VQ"] + scores["MQ"] + scores["TA"]  # as the official inference
    return scores


def run_score(cfg: ScoreConfig) -> list[dict]:
    pairs = _pairs(cfg)
    for path, _ in pairs:
        if not path.is_file():
            raise UserError(f"{path} does not exist")
    rewards = build_rewards(cfg, default="videoalign", device=resolve_device(cfg.device))
    rows = []
    step = max(1, cfg.reward_batch_size)
    for start in range(0, len(pairs), step):  # one batched call per chunk of videos with one frame rate
        chunk = pairs[start:start + step]
        try:
            loaded = [read_video(path) for path, _ in chunk]
        except (ValueError, OSError) as exc:  # not a readable video
            raise UserError(f"cannot read a video: {exc}") from exc
        by_fps: dict[float, list[int]] = {}
        for i, (_, fps) in enumerate(loaded):
            by_fps.setdefault(fps, []).append(i)
        scores: dict[int, dict[str, float]] = {}
        for fps, idx in by_fps.items():
            values = rewards([torch.from_numpy(loaded[i][0]) for i in idx], [chunk[i][1] for i in idx], fps=fps)
            for j, i in enumerate(idx):
                scores[i] = _with_overall({k: float(v[j]) for k, v in values.items()})
        rows += [{"video": path.name, "prompt": prompt, **scores[i]} for i, (path, prompt) in enumerate(chunk)]
    if cfg.video:
        print(json.dumps({k: v for k, v in rows[0].items() if k not in ("video", "prompt")}))
        return rows
    out = Path(cfg.output) if cfg.output else Path(cfg.videos) / "scores.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out)
    log.info("scored %d videos -> %s", len(rows), out)
    return rows
