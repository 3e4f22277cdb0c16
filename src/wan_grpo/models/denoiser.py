"""The one place that turns (latents, t, prompt) into a velocity: expert routing plus CFG.

Rollout and training both call ``MoEDenoiser.predict_velocity``, so they cannot disagree on
which expert or which guidance scale a step used.
"""

from __future__ import annotations

import logging
from contextlib import nullcontext

import torch

from wan_grpo.specs import Expert

log = logging.getLogger("wan_grpo")


def expert_for_timestep(t: float, *, boundary_ratio: float | None, num_train_timesteps: int = 1000) -> Expert:
    """HIGH (``transformer``) when t >= boundary_ratio * num_train_timesteps, else LOW, as WanPipeline."""
    if boundary_ratio is None or float(t) >= boundary_ratio * num_train_timesteps:
        return Expert.HIGH
    return Expert.LOW


def route(t: float, *, boundary_ratio: float | None, num_train_timesteps: int, present: tuple[bool, bool]) -> Expert:
    """The expert slot that runs timestep ``t``: ``expert_for_timestep``, except that a dense
    checkpoint's one model answers for every t whichever slot holds it."""
    idx = expert_for_timestep(t, boundary_ratio=boundary_ratio, num_train_timesteps=num_train_timesteps)
    return idx if present[idx] else Expert(1 - idx)


class MoEDenoiser:
    """Routes each step to its expert and applies classifier-free guidance in one batched call."""

    def __init__(self, components, *, guidance_scale: float, guidance_scale_2: float | None = None,
                 autocast_dtype: torch.dtype | None = None):
        self.components = components
        self.experts = (components.transformer, components.transformer_2)
        self.boundary_ratio = components.boundary_ratio
        self.num_train_timesteps = components.num_train_timesteps
        self.expand_timesteps = components.expand_timesteps
        g2 = guidance_scale if guidance_scale_2 is None else guidance_scale_2
        self.guidance = (float(guidance_scale), float(g2))
        if self.guidance[Expert.HIGH] <= 1.0 < self.guidance[Expert.LOW] and components.transformer_2 is not None:
            log.warning("guidance_scale_2 %g is ignored: guidance_scale %g <= 1 turns CFG off for both experts "
                        "(as diffusers' WanPipeline)", self.guidance[Expert.LOW], self.guidance[Expert.HIGH])
        self.autocast_dtype = autocast_dtype
        self.placement = None  # an ExpertPlacement under --offload_model

    def expert_index(self, t: float) -> Expert:
        return route(t, boundary_ratio=self.boundary_ratio, num_train_timesteps=self.num_train_timesteps,
                     present=(self.experts[Expert.HIGH] is not None, self.experts[Expert.LOW] is not None))

    @property
    def uses_cfg(self) -> bool:
        """As diffusers' WanPipeline: CFG runs for BOTH experts when ``guidance_scale`` (the high-noise
        expert's) is > 1, and for neither otherwise; ``guidance_scale_2`` only weighs the low-noise
        expert's combination (so (1.0, 3.0) is no CFG at all and (4.0, 0.5) is CFG with 0.5)."""
        return self.guidance[Expert.HIGH] > 1.0

    def _timestep(self, t: torch.Tensor, latents: torch.Tensor, patch_size, image=None) -> torch.Tensor:
        if not self.expand_timesteps:
            return t
        if image is not None and image.kind == "first_frame":
            return image.timesteps(t, patch_size)
        # TI2V-5B: one timestep per token; with no conditioning image every token gets t.
        _, _, f, h, w = latents.shape
        seq_len = (f // patch_size[0]) * (h // patch_size[1]) * (w // patch_size[2])
        return t[:, None].expand(-1, seq_len)

    def predict_velocity(
        self,
        latents: torch.Tensor,
        t: float | torch.Tensor,
        prompt_embeds: torch.Tensor,
        negative_embeds: torch.Tensor | None,
        *,
        expert: int | None = None,
        image=None,
        use_cfg: bool | None = None,
    ) -> torch.Tensor:
        """Velocity (B, C, F, H, W) in float32. All B samples share one expert.

        ``t`` is a float or a (B,) tensor; cond and uncond run as one batch of 2B. ``image`` is an
        ImageCondition with B rows (I2V channels, or the TI2V kept first frame), or None.
        ``use_cfg`` False predicts from the prompt alone whatever the guidance scales (NFT training).
        """
        batch = latents.shape[0]
        t = torch.as_tensor(t, dtype=torch.float32, device=latents.device)
        if t.ndim == 0:
            t = t.expand(batch)
        if expert is None:
            expert = self.expert_index(float(t[0]))
        if self.placement is not None:
            self.placement.activate(expert)
        model = self.experts[expert]
        dtype = model.dtype
        x = (latents if image is None else image.model_input(latents)).to(dtype)
        cfg = self.uses_cfg if use_cfg is None else use_cfg
        if cfg:
            if negative_embeds is None:
                raise ValueError("guidance_scale > 1 needs negative prompt embeddings")
            x = torch.cat([x, x])
            context = torch.cat([prompt_embeds, negative_embeds])
            t_in = torch.cat([t, t])
        else:
            context, t_in = prompt_embeds, t
        autocast = (
            torch.autocast(device_type=latents.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else nullcontext()
        )
        with autocast:
            out = model(
                hidden_states=x,
                timestep=self._timestep(t_in, x, model.config.patch_size, image),
                encoder_hidden_states=context.to(dtype),
                return_dict=False,
            )[0]
        out = out.float()
        if cfg:
            cond, uncond = out.chunk(2)
            return uncond + self.guidance[expert] * (cond - uncond)
        return out
