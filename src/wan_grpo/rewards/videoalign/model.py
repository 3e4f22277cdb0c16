"""VideoReward's network: Qwen2-VL with a linear reward head read at three special tokens.

The released model ran the text model with 1-D positions (transformers 4.45 called it with
``position_ids=None``), not Qwen2-VL's 3-D M-RoPE positions; ``rewards`` passes those 1-D
positions explicitly, broadcast to [3, B, L], so newer transformers cannot switch them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import Qwen2VLForConditionalGeneration

REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")  # order in the prompt = output order


class VideoRewardModel(Qwen2VLForConditionalGeneration):
    """Qwen2-VL plus ``rm_head`` (hidden -> output_dim, no bias), as VideoAlign trained it."""

    def __init__(self, config, output_dim: int = 1):
        super().__init__(config)
        self.output_dim = output_dim
        self.rm_head = nn.Linear(config.text_config.hidden_size, output_dim, bias=False)
        self.reward_token_ids: tuple[int, ...] = ()

    def rewards(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values_videos: torch.Tensor,
                video_grid_thw: torch.Tensor) -> torch.Tensor:
        """(B, 3) raw rewards in the order VQ, MQ, TA."""
        if len(self.reward_token_ids) != 3:
            raise RuntimeError("reward_token_ids are not set; load the model with load_videoreward")
        embeds = self.get_input_embeddings()(input_ids)
        video = self.model.get_video_features(pixel_values_videos, video_grid_thw).pooler_output
        video = torch.cat(list(video)).to(embeds.dtype)
        video_mask = (input_ids == self.config.video_token_id).unsqueeze(-1).expand_as(embeds)
        if int(video_mask[..., 0].sum()) != video.shape[0]:
            raise ValueError(f"{int(video_mask[..., 0].sum())} video tokens for {video.shape[0]} video features")
        embeds = embeds.masked_scatter(video_mask, video)
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).view(1, 1, length).expand(3, batch, length)
        hidden = self.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask,
                                           position_ids=positions, use_cache=False).last_hidden_state
        is_reward = torch.isin(input_ids, torch.tensor(self.reward_token_ids, device=input_ids.device))
        counts = is_reward.sum(dim=1)
        if bool((counts != 3).any()):
            raise ValueError(f"each sequence needs exactly 3 reward tokens, got {counts.tolist()}; a prompt must not "
                             "contain the text of a reward token")
        logits = self.rm_head(hidden[is_reward]).view(batch, 3, self.output_dim)
        if self.output_dim == 1:
            return logits[..., 0]
        if self.output_dim == 3:  # one head per attribute: VQ from head 0 at the VQ token, ...
            return logits.diagonal(dim1=1, dim2=2)
        raise ValueError(f"output_dim {self.output_dim} is not 1 or 3")
