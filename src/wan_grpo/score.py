"""``wan-grpo score``: score mp4 files with any reward (VideoAlign by default) and print or save."""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from wan_grpo.config import opt
from wan_grpo.errors import UserError
from wan_grpo.rewards import build_rewards, reward_names
from wan_grpo.rewards.config import StandaloneRewardConfig
from wan_grpo.runtime import resolve_device
from wan_grpo.video import frame_count, mp4_files, read_video, video_caption_pairs

log = logging.getLogger("wan_grpo")


@dataclass
class ScoreConfig(StandaloneRewardConfig):
    video: str | None = opt(None, "One mp4 to score (with --prompt); prints one JSON line.")
    prompt: str | None = opt(None, "The text prompt of --video.")
    videos: str | None = opt(None, "A folder of mp4s to score (with --prompts); writes a CSV.")
    prompts: str | None = opt(None, "For --videos: a .txt with one prompt per video in file-name order (hidden "
                                    "files left out), or a .jsonl/.csv with 'video' (path relative to --videos) and "
                                    "'prompt' fields.")
    output: str | None = opt(None, "CSV path for --videos (default: VIDEOS/scores.csv).")


def _pairs(cfg: ScoreConfig) -> list[tuple[Path, str]]:
    if cfg.video:
        if cfg.videos or cfg.prompt is None:
            raise UserError("--video needs --prompt (and no --videos); or score a folder with --videos and --prompts")
        if not Path(cfg.video).is_file():
            raise UserError(f"--video {cfg.video} does not exist")
        return [(Path(cfg.video), cfg.prompt)]
    if not cfg.videos or not cfg.prompts:
        raise UserError("pass --video FILE.mp4 --prompt TEXT, or --videos DIR --prompts FILE")
    if not Path(cfg.videos).is_dir():
        raise UserError(f"--videos {cfg.videos} is not a folder of mp4 files")
    if not mp4_files(Path(cfg.videos)) and Path(cfg.prompts).suffix == ".txt":
        raise UserError(f"--videos {cfg.videos} holds no .mp4 files; pass the folder of the videos to score")
    return video_caption_pairs(cfg.videos, cfg.prompts, flag="--prompts")


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _relative(path: Path, folder: str | None) -> str:
    """The video's path as its caption file names it: relative to the folder, subfolders kept."""
    try:
        return str(path.relative_to(folder)) if folder else path.name
    except ValueError:
        return str(path)


def _with_overall(scores: dict[str, float | None]) -> dict[str, float | None]:
    if all(scores.get(k) is not None for k in ("VQ", "MQ", "TA")):
        scores["Overall"] = scores["VQ"] + scores["MQ"] + scores["TA"]  # as the official inference
    return scores


def run_score(cfg: ScoreConfig) -> list[dict]:
    pairs = _pairs(cfg)
    out = None if cfg.video else Path(cfg.output) if cfg.output else Path(cfg.videos) / "scores.csv"
    if out is not None and out.is_dir():
        raise UserError(f"--output {out} is a folder; name the CSV file to write")
    if "videoalign" in reward_names(cfg.reward, default="videoalign"):
        for path, _ in pairs:  # before the reward model loads
            try:
                frames = frame_count(path)
            except Exception as exc:  # PyAV raises many kinds for a file that is not a video
                raise UserError(f"cannot read {path} as a video ({exc}); re-encode it as mp4") from None
            if frames < 2:
                raise UserError(f"{path} has {frames} frame; VideoAlign scores videos of at least 2 frames")
    rewards = build_rewards(cfg, default="videoalign", device=resolve_device(cfg.device))
    rows = []
    step = max(1, cfg.reward_batch_size)
    for start in range(0, len(pairs), step):  # one batched call per chunk of videos with one frame rate
        chunk = pairs[start:start + step]
        loaded = []
        for path, _ in chunk:
            try:
                loaded.append(read_video(path))
            except Exception as exc:  # PyAV raises many kinds for a file that is not a video
                raise UserError(f"cannot read {path} as a video ({exc}); re-encode it as mp4") from None
        by_fps: dict[float, list[int]] = {}
        for i, (_, fps) in enumerate(loaded):
            by_fps.setdefault(fps, []).append(i)
        scores: dict[int, dict[str, float]] = {}
        for fps, idx in by_fps.items():
            values = rewards([torch.from_numpy(loaded[i][0]) for i in idx], [chunk[i][1] for i in idx], fps=fps)
            for j, i in enumerate(idx):
                scores[i] = _with_overall({k: _finite_or_none(float(v[j])) for k, v in values.items()})
        rows += [{"video": _relative(path, cfg.videos), "prompt": prompt, **scores[i]}
                 for i, (path, prompt) in enumerate(chunk)]
    if cfg.video:
        print(json.dumps({k: v for k, v in rows[0].items() if k not in ("video", "prompt")}))  # NaN -> null
        return rows
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(out)
    log.info("scored %d videos -> %s", len(rows), out)
    return rows
