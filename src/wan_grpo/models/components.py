"""The parts of a Wan2.2 model that wan-grpo uses, however they were loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from wan_grpo.specs import Expert


@dataclass
class WanComponents:
    # ``transformer`` is the HIGH-noise expert (t >= boundary_ratio * num_train_timesteps), or the
    # only model of a dense checkpoint (TI2V-5B); ``transformer_2`` is the LOW-noise expert.
    transformer: WanTransformer3DModel | None
    transformer_2: WanTransformer3DModel | None
    vae: AutoencoderKLWan
    text_encoder: torch.nn.Module | None
    tokenizer: object | None
    boundary_ratio: float | None
    expand_timesteps: bool
    scheduler_config: dict = field(default_factory=dict)
    default_shift: float = 5.0
    source: str = ""
    text_setup: object | None = None  # runtime.TextSetup: --embedding_cache / --t5_cpu / deferred encoder load
    text_len: int = 512  # tokens per prompt embedding: Wan2.2's 512, or less when the tokenizer's config says so

    def expert(self, expert: Expert) -> WanTransformer3DModel | None:
        return getattr(self, expert.diffusers_dir)

    @property
    def experts(self) -> dict[str, WanTransformer3DModel]:
        """Experts present, by label: ``high`` (transformer) and ``low`` (transformer_2)."""
        return {e.label: m for e in Expert if (m := self.expert(e)) is not None}

    @property
    def presence(self) -> tuple[bool, bool]:
        """Which expert slots (transformer, transformer_2) hold a model."""
        return self.transformer is not None, self.transformer_2 is not None

    @property
    def any_transformer(self) -> WanTransformer3DModel:
        return self.transformer if self.transformer is not None else self.transformer_2

    @property
    def vae_scale_factor_spatial(self) -> int:
        return int(self.vae.config.scale_factor_spatial)

    @property
    def vae_scale_factor_temporal(self) -> int:
        return int(self.vae.config.scale_factor_temporal)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler_config.get("num_train_timesteps", 1000))

    def drop_text_encoder(self) -> None:
        """Free the text encoder once every prompt embedding is cached."""
        self.text_encoder = None
