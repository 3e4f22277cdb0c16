"""Load Wan2.2 checkpoints in the ORIGINAL release layout into the diffusers/transformers classes.

The original layout (as the Wan-AI repos ship it, read by the official Wan-Video/Wan2.2 code):

    T2V-A14B / I2V-A14B                       TI2V-5B
    high_noise_model/  config.json + shards   config.json + shards (at the root)
    low_noise_model/   config.json + shards   Wan2.2_VAE.pth
    Wan2.1_VAE.pth                            models_t5_umt5-xxl-enc-bf16.pth
    models_t5_umt5-xxl-enc-bf16.pth           google/umt5-xxl/  (tokenizer)
    google/umt5-xxl/   (tokenizer)

Shards are ``diffusion_pytorch_model-*.safetensors`` (fp32) with an index json. The expert
``config.json`` holds only the official fields (dim, ffn_dim, num_heads, ...); the rest of the DiT
architecture, the T5 and VAE architectures, the latent tables, the MoE boundary and the sampling
shift are hard-coded in the official code, so they are hard-coded here or read off tensor shapes.

Every weight load is strict: a missing, unexpected or mis-shaped tensor is a ``UserError``.
Experts are streamed one shard at a time into a model whose parameters live on the meta device,
so a full second copy of an expert is never held in memory.
"""

from wan_grpo.models.original.dit import load_expert, transformer_config
from wan_grpo.models.original.layout import (
    ORIGINAL_LAYOUT_HELP,
    describe_dir,
    expert_config,
    inspect_original,
    is_original_layout,
)
from wan_grpo.models.original.t5 import load_t5
from wan_grpo.models.original.vae import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, load_vae

__all__ = [
    "ORIGINAL_LAYOUT_HELP", "WAN22_LATENTS_MEAN", "WAN22_LATENTS_STD", "describe_dir", "expert_config",
    "inspect_original", "is_original_layout", "load_expert", "load_t5", "load_vae", "transformer_config",
]
