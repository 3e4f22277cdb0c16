"""UMT5 prompt embeddings, computed once per distinct prompt and cached.

Tokenisation, cleaning, truncation and zero-padding follow diffusers' WanPipeline exactly, so
a cached embedding is the one the pipeline would have computed.
"""

from __future__ import annotations

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

TEXT_LEN = 512  # Wan2.2's text_len; WanPipeline.__call__'s max_sequence_length default


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str], *, max_sequence_length: int = TEXT_LEN) -> torch.Tensor:
    """(N, max_sequence_length, text_dim): embeddings zeroed past each prompt's own length."""
    cleaned = [prompt_clean(p) for p in prompts]
    tokens = tokenizer(
        cleaned,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    device = next(text_encoder.parameters()).device
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    hidden = text_encoder(ids, mask).last_hidden_state
    lengths = mask.gt(0).sum(dim=1)
    keep = torch.arange(max_sequence_length, device=device)[None, :] < lengths[:, None]
    return hidden * keep[..., None].to(hidden.dtype)


class PromptEmbeddingCache:
    """Prompt -> embedding (1, L, D), on ``device`` in ``dtype``; encodes each text at most once."""

    def __init__(self, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_sequence_length: int = TEXT_LEN):
        self.device, self.dtype, self.max_sequence_length = torch.device(device), dtype, max_sequence_length
        self._cache: dict[str, torch.Tensor] = {}

    def __contains__(self, prompt: str) -> bool:
        return prompt in self._cache

    def __len__(self) -> int:
        return len(self._cache)

    def add(self, prompts: list[str], tokenizer, text_encoder, *, batch_size: int = 8) -> None:
        missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if missing and text_encoder is None:
            raise RuntimeError("the text encoder was already freed; add every prompt before dropping it")
        for i in range(0, len(missing), batch_size):
            chunk = missing[i : i + batch_size]
            embeds = encode_prompts(tokenizer, text_encoder, chunk, max_sequence_length=self.max_sequence_length)
            for prompt, e in zip(chunk, embeds):
                self._cache[prompt] = e[None].to(self.device, self.dtype)

    def get(self, prompts: list[str]) -> torch.Tensor:
        """(N, L, D) for a list of already-added prompts."""
        try:
            return torch.cat([self._cache[p] for p in prompts])
        except KeyError as exc:
            raise KeyError(f"prompt not encoded: {exc.args[0]!r}") from None
