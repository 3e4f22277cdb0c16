"""``wan-grpo sft`` settings: the policy, optimizer and checkpoint fields of ``train``, plus data."""

from __future__ import annotations

from dataclasses import dataclass

from wan_grpo.config import opt
from wan_grpo.grpo.config import PolicyConfig


@dataclass
class SFTConfig(PolicyConfig):
    dataset: str | None = opt(None, "Training videos: a folder of .mp4 files with captions (see --captions), or "
                                    "shapes, shapes:1 or shapes:2 (the Shapes task's training prompts, rendered in "
                                    "memory).")
    captions: str | None = opt(None, "Captions of a video folder: .txt (one per video, in file-name order), .jsonl "
                                     "(video + prompt fields) or .csv (video,prompt columns). Default: the folder's "
                                     "captions.jsonl, captions.csv or captions.txt.")
    videos_per_prompt: int = opt(8, "--dataset shapes: rendered videos per training prompt (seeds from --seed); "
                                    "with both levels, level 1's 50 prompts are repeated to match level 2's 756.",
                                 ge=1)
    batch_size: int = opt(16, "Videos per optimizer step.", ge=1)
    train_batch_size: int = opt(16, "Videos per forward/backward micro-batch.", ge=1)
    num_epochs: int | None = opt(None, "Passes over the videos. Default: as many as --max_steps needs, else 1. "
                                       "Given with --max_steps, the run ends at whichever comes first (a warning "
                                       "says when it is --num_epochs).", ge=1)
    caption_dropout: float = opt(0.1, "Fraction of samples trained with the negative (empty) prompt, so the model "
                                      "also learns the unconditional velocity that CFG needs.", ge=0, le=1)
    edge_weight: float = opt(0.0, "Extra weight in the loss for the latent positions that encode edges: each "
                                  "position's squared error counts 1 + W * e / mean(e), e the mean pixel-gradient "
                                  "magnitude of the pixels and frames it encodes. 0 weighs every position alike.",
                             ge=0)
    high_noise_share: float | None = opt(None, "Share of each batch whose noise level is drawn in the high-noise "
                                               "expert's range (t >= boundary), the shifted density kept within "
                                               "each range; two-expert models with both experts trained. Default: "
                                               "the density's own share (0.3 at shift 3, boundary 0.875).",
                                         ge=0, le=1)
    save_dir: str = opt("./sft_checkpoints", "Run directory: metrics, checkpoints, config.yaml.")
