"""Score in-memory videos with VideoReward: official preprocessing and prompt, batched forward."""

from __future__ import annotations

import hashlib
from importlib import resources

import torch

from wan_grpo.errors import UserError
from wan_grpo.rewards.videoalign.loading import VideoReward
from wan_grpo.rewards.videoalign.preprocess import FRAME_FACTOR, MAX_PIXELS, MERGE, preprocess_video

PROMPT_SHA256 = "fdb6309bac618dd0c8b1b589d3a0970a974f7856eecbb355a190b2dce54af700"
COMPONENTS = ("VQ", "MQ", "TA")


def _asset(name: str) -> str:
    return resources.files("wan_grpo.rewards.videoalign").joinpath("assets", name).read_text(encoding="utf-8")


def detailed_special_template() -> str:
    text = _asset("detailed_special_prompt.txt")
    if hashlib.sha256(text.encode()).hexdigest() != PROMPT_SHA256:
        raise RuntimeError("the bundled VideoAlign prompt differs from the official one; reinstall wan-grpo")
    return text


def build_prompt(prompt: str, template: str) -> str:
    """The 'detailed_special' rubric with the user's text prompt before the TA block."""
    return template.replace("{text_prompt}", prompt)


class VideoAlignReward:
    """The ``videoalign`` reward: components VQ, MQ, TA (normalised with inference_config unless raw)."""

    name = "videoalign"
    components = COMPONENTS

    def __init__(self, reward: VideoReward, *, raw: bool = False, batch_size: int = 4):
        self.model, self.tokenizer = reward.model, reward.tokenizer
        self.raw, self.batch_size = raw, max(1, batch_size)
        self.norm = None if raw or not reward.inference_config else reward.inference_config
        self.max_pixels = int(reward.data_config.get("max_frame_pixels") or MAX_PIXELS)
        self.sample_fps = float(reward.data_config.get("fps") or 2.0)
        self.template = detailed_special_template()
        self.chat_template = _asset("qwen2vl_chat_template.jinja")
        self.video_token = self.model.config.video_token_id

    def encode(self, video: torch.Tensor, prompt: str, fps: float) -> dict[str, torch.Tensor]:
        """One video and prompt -> input_ids with the video tokens expanded, pixel patches, grid."""
        pixels, grid = preprocess_video(video, fps, max_pixels=self.max_pixels, sample_fps=self.sample_fps)
        messages = [{"role": "user", "content": [{"type": "video"},
                                                 {"type": "text", "text": build_prompt(prompt, self.template)}]}]
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=True)
        ids = self.tokenizer(text)["input_ids"]
        where = [i for i, t in enumerate(ids) if t == self.video_token]
        if len(where) != 1:
            raise ValueError(f"the chat text has {len(where)} video placeholders, expected 1; a prompt must not "
                             "contain '<|video_pad|>'")
        n = int(grid.prod()) // MERGE**2
        ids = ids[:where[0]] + [self.video_token] * n + ids[where[0] + 1:]
        return {"input_ids": torch.tensor(ids), "pixels": pixels, "grid": grid}

    def collate(self, items: list[dict]) -> dict[str, torch.Tensor]:
        """Right-pad with the pad token (as the official processor call)."""
        length = max(len(it["input_ids"]) for it in items)
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(items), length), pad, dtype=torch.long)
        mask = torch.zeros((len(items), length), dtype=torch.long)
        for i, it in enumerate(items):
            ids[i, :len(it["input_ids"])] = it["input_ids"]
            mask[i, :len(it["input_ids"])] = 1
        return {"input_ids": ids, "attention_mask": mask,
                "pixel_values_videos": torch.cat([it["pixels"] for it in items]),
                "video_grid_thw": torch.stack([it["grid"] for it in items])}

    @torch.no_grad()
    def raw_scores(self, videos: list[torch.Tensor], prompts: list[str], *, fps: float) -> torch.Tensor:
        """(N, 3) float32 unnormalised VQ, MQ, TA."""
        if len(videos) != len(prompts):
            raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
        device, dtype = self.model.device, self.model.dtype
        out = []
        for start in range(0, len(videos), self.batch_size):
            items = [self.encode(v, p, fps) for v, p in zip(videos[start:start + self.batch_size],
                                                            prompts[start:start + self.batch_size])]
            batch = self.collate(items)
            batch = {k: v.to(device) for k, v in batch.items()}
            batch["pixel_values_videos"] = batch["pixel_values_videos"].to(dtype)
            out.append(self.model.rewards(**batch).float().cpu())
        return torch.cat(out)

    def __call__(self, videos: list[torch.Tensor], prompts: list[str], *, fps: float) -> dict[str, torch.Tensor]:
        short = min(len(v) for v in videos)
        if short < FRAME_FACTOR:
            raise UserError(f"VideoAlign scores videos of at least {FRAME_FACTOR} frames, got one of {short}; "
                            "use --frame_num 5 or more")
        scores = self.raw_scores(videos, prompts, fps=fps)
        out = {}
        for j, name in enumerate(COMPONENTS):
            values = scores[:, j]
            if self.norm is not None:
                values = (values - self.norm[f"{name}_mean"]) / self.norm[f"{name}_std"]
            out[name] = values
        return out
