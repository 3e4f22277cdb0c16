"""A tiny random-weight Wan2.2 (two experts), built with the real diffusers/transformers classes.

It runs on CPU in seconds and saves in the real diffusers layout, so every code path that loads
a released checkpoint is exercised by the tests and the demo.
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from wan_grpo.models.components import WanComponents
from wan_grpo.models.loading import ModelInfo
from wan_grpo.models.original import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD
from wan_grpo.specs import PRESETS

TINY_TEXT_DIM = 32
TINY_BOUNDARY_RATIO = PRESETS["tiny"].boundary_ratio
TINY_SHIFT = PRESETS["tiny"].shift


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: every prompt (any script) gets distinct ids; </s> appended like T5."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def _tiny_transformer(in_channels: int = 16, out_channels: int = 16) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=TINY_TEXT_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )


VARIANTS = ("t2v", "i2v", "ti2v")


def build_tiny_components(seed: int = 0, *, two_experts: bool = True, variant: str = "t2v") -> WanComponents:
    """Seeded tiny Wan2.2 look-alike: ``t2v`` (T2V-A14B: two experts, Wan2.1 VAE), ``i2v``
    (I2V-A14B: in_channels 36, boundary 0.9) or ``ti2v`` (TI2V-5B: one dense expert over 48-channel
    Wan2.2-VAE latents, expand_timesteps)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny variant {variant!r}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = tiny_tokenizer()
        text_encoder = UMT5EncoderModel(
            UMT5Config(
                vocab_size=len(tokenizer),
                d_model=TINY_TEXT_DIM,
                d_kv=8,
                d_ff=64,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=32,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        ).eval()
        if variant == "ti2v":

            vae = AutoencoderKLWan(
                base_dim=8, z_dim=48, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
                is_residual=True, in_channels=12, out_channels=12, patch_size=2, scale_factor_temporal=4,
                scale_factor_spatial=16, latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD),
            ).eval()
        else:
            vae = AutoencoderKLWan(
                base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
            ).eval()
        # A random decoder averages latent changes away (mean luma moves ~1e-3 per unit latent shift);
        # a 10x output layer makes frame statistics respond to the latents, so the demo can learn.
        with torch.no_grad():
            vae.decoder.conv_out.weight.mul_(10.0)
        channels = {"t2v": (16, 16), "i2v": (36, 16), "ti2v": (48, 48)}[variant]
        transformer = _tiny_transformer(*channels)
        transformer_2 = _tiny_transformer(*channels) if two_experts and variant != "ti2v" else None
    return WanComponents(
        transformer=transformer,
        transformer_2=transformer_2,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        boundary_ratio=(0.9 if variant == "i2v" else TINY_BOUNDARY_RATIO) if transformer_2 is not None else None,
        expand_timesteps=variant == "ti2v",
        scheduler_config=dict(FlowMatchEulerDiscreteScheduler(shift=TINY_SHIFT).config),
        default_shift=TINY_SHIFT,
        source="tiny",
    )


def tiny_info():
    """The built-in tiny model's ModelInfo (what ``resolve_config`` checks settings against)."""

    return ModelInfo(task="tiny", has_high=True, has_low=True, boundary_ratio=TINY_BOUNDARY_RATIO,
                     expand_timesteps=False, in_channels=16, z_dim=16, default_shift=TINY_SHIFT)


def save_tiny_pipeline(path, seed: int = 0, *, boundary_ratio: float = TINY_BOUNDARY_RATIO) -> None:
    """Write the tiny model as a diffusers-format directory via ``WanPipeline.save_pretrained``."""
    from diffusers import WanPipeline

    c = build_tiny_components(seed)
    pipe = WanPipeline(
        tokenizer=c.tokenizer,
        text_encoder=c.text_encoder,
        vae=c.vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=TINY_SHIFT),
        transformer=c.transformer,
        transformer_2=c.transformer_2,
        boundary_ratio=boundary_ratio,
    )
    pipe.save_pretrained(str(path))
