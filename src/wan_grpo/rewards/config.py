"""Reward flags, shared by ``train``, ``eval``, ``score`` and ``reward-server``."""

from __future__ import annotations

from dataclasses import dataclass

from wan_grpo.config import opt
from wan_grpo.tasks.shapes.verifier import DEFAULT_COEFS as DEFAULT_SHAPES_COEFS


@dataclass
class RewardConfig:
    reward: str | None = opt(None, "Rewards as NAME[:WEIGHT],...: brightness, colorfulness, smoothness, motion, "
                                   "videoalign, or a plug-in module.path:callable[:WEIGHT]. Default: brightness "
                                   "for --task tiny, else videoalign.")
    reward_model_path: str | None = opt(None, "VideoAlign (VideoReward) folder: model_config.json and "
                                              "checkpoint-*/.")
    videoalign_base: str | None = opt(None, "Local Qwen2-VL-2B-Instruct folder (default: model_config.json's "
                                            "model_name_or_path when it is a local folder).")
    vq_coef: float = opt(1.0, "VideoAlign visual-quality coefficient.")
    mq_coef: float = opt(0.0, "VideoAlign motion-quality coefficient.")
    ta_coef: float = opt(0.0, "VideoAlign text-alignment coefficient.")
    shapes_coefs: str = opt(DEFAULT_SHAPES_COEFS, "Shapes reward: trained components as NAME=WEIGHT,... over "
                                                  "accuracy, partial (mean of the colour, shape and motion or "
                                                  "relation checks), colour, shape, fill (graded shape), "
                                                  "fill_peak (graded shape, peaked at the rendered fill), clean; "
                                                  "each is normalised in its group, then weighted.")
    reward_raw: bool = opt(False, "VideoAlign: raw VQ/MQ/TA instead of normalised by the checkpoint's "
                                  "inference_config (DanceGRPO trains on normalised).")
    reward_device: str | None = opt(None, "Device of the reward model (default: the training device; bf16 on "
                                          "CUDA, fp32 on CPU).")
    reward_batch_size: int = opt(4, "Videos per reward-model forward pass.", ge=1)
    reward_url: str | None = opt(None, "Score with a running 'wan-grpo reward-server' at this URL instead of "
                                       "in-process (--reward then names nothing to load here).")
    reward_timeout: float = opt(600.0, "Seconds to wait for one reward-server request.", gt=0)
    reward_retries: int = opt(3, "Attempts per reward-server request; after the last, the groups of that "
                                 "batch are dropped from the update (counted in metrics).", ge=1)
    reward_token: str | None = opt(None, "Shared secret between reward-server and its clients (sent as a Bearer "
                                         "token; the server refuses requests without it). Default: the "
                                         "WAN_GRPO_REWARD_TOKEN environment variable, which keeps it out of "
                                         "process listings.")


@dataclass
class StandaloneRewardConfig(RewardConfig):
    """For the commands that load only a reward (``score``, ``reward-server``): its device and precision."""

    device: str = opt("auto", "Device of the reward model when --reward_device is unset: auto, cpu, cuda[:N].")
    mixed_precision: str | None = opt(None, "VideoAlign in bf16 or fp32. Default: bf16 on CUDA, fp32 on CPU.",
                                      choices=("bf16", "fp32"))
