"""The official VAEs (``Wan2.1_VAE.pth``, ``Wan2.2_VAE.pth``) -> diffusers' AutoencoderKLWan."""

from __future__ import annotations

import math
import re
from pathlib import Path

import torch

from wan_grpo.errors import UserError
from wan_grpo.models.original.state_dict import assign, cast, check_keys, empty, no_meta_left, rename_unique, torch_load

# Wan2_2_VAE latent normalisation (hard-coded in wan/modules/vae2_2.py). The Wan2.1 table is
# AutoencoderKLWan's default latents_mean/latents_std.
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]

_RES = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_ATTN = ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")
_RESAMPLE = ("resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")


def vae22_key_to_diffusers(key: str) -> str | None:
    """Official Wan2.2 VAE name -> AutoencoderKLWan(is_residual=True) name (None: unknown).

    Wan2.2 nests its stages: ``encoder.downsamples.i.downsamples.j`` (residual blocks, then the
    resample) and ``decoder.upsamples.i.upsamples.j``; diffusers calls them ``down_blocks.i.resnets.j``
    / ``down_blocks.i.downsampler`` and ``up_blocks.i.resnets.j`` / ``up_blocks.i.upsampler``.
    """
    m = re.fullmatch(r"conv([12])\.(weight|bias)", key)
    if m:
        return f"{'quant_conv' if m.group(1) == '1' else 'post_quant_conv'}.{m.group(2)}"
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        return None
    side, rest = m.groups()
    if m2 := re.fullmatch(r"conv1\.(weight|bias)", rest):
        return f"{side}.conv_in.{m2.group(1)}"
    if rest == "head.0.gamma":
        return f"{side}.norm_out.gamma"
    if m2 := re.fullmatch(r"head\.2\.(weight|bias)", rest):
        return f"{side}.conv_out.{m2.group(1)}"
    if m2 := re.fullmatch(r"middle\.([02])\.(.+)", rest):
        if m2.group(2) in _RES:
            return f"{side}.mid_block.resnets.{int(m2.group(1)) // 2}.{_RES[m2.group(2)]}"
        return None
    if m2 := re.fullmatch(r"middle\.1\.(.+)", rest):
        return f"{side}.mid_block.attentions.0.{m2.group(1)}" if m2.group(1) in _ATTN else None
    outer, inner, blocks, sampler = (
        ("downsamples", "downsamples", "down_blocks", "downsampler")
        if side == "encoder"
        else ("upsamples", "upsamples", "up_blocks", "upsampler")
    )
    if m2 := re.fullmatch(rf"{outer}\.(\d+)\.{inner}\.(\d+)\.(.+)", rest):
        i, j, leaf = m2.groups()
        if leaf in _RES:
            return f"{side}.{blocks}.{i}.resnets.{j}.{_RES[leaf]}"
        if leaf in _RESAMPLE:
            return f"{side}.{blocks}.{i}.{sampler}.{leaf}"
    return None


def _vae_shape(sd: dict, key: str, source: Path) -> torch.Size:
    if key not in sd:
        raise UserError(f"{source} is not a Wan VAE checkpoint (no {key}); re-download it")
    return sd[key].shape


def vae21_config(sd: dict, source: Path) -> dict:
    """AutoencoderKLWan config for a Wan2.1 VAE (flat ``encoder.downsamples.N``), from shapes."""
    base = _vae_shape(sd, "encoder.conv1.weight", source)[0]
    z_dim = _vae_shape(sd, "conv2.weight", source)[0]
    idx = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")})
    counts, mults, temporal, cur, out_dim = [], [], [], 0, None
    for i in idx:
        p = f"encoder.downsamples.{i}."
        if p + "residual.2.weight" in sd:
            cur += 1
            out_dim = sd[p + "residual.2.weight"].shape[0]
        elif p + "resample.1.weight" in sd and out_dim is not None:
            counts.append(cur)
            mults.append(out_dim // base)
            temporal.append(p + "time_conv.weight" in sd)
            cur = 0
        else:
            raise UserError(f"{source}: encoder.downsamples.{i} is neither a residual block nor a resample")
    counts.append(cur)
    mults.append((out_dim or base) // base)
    if len(set(counts)) != 1 or counts[0] == 0:
        raise UserError(f"{source}: uneven residual blocks per stage {counts}; not a Wan2.1 VAE")
    dec_base = _vae_shape(sd, "decoder.conv1.weight", source)[0] // mults[-1]
    if counts[0] != 2 or len(mults) != 4:
        # diffusers' convert_wan_vae_to_diffusers hard-codes the released decoder layout.
        raise UserError(
            f"{source}: {len(mults)} stages x {counts[0]} residual blocks; the Wan2.1 VAE key converter "
            "supports only the released architecture (4 stages x 2 residual blocks)"
        )
    if z_dim != 16:
        raise UserError(f"{source}: z_dim {z_dim}; the Wan2.1 VAE latent tables have 16 channels")
    return {
        "base_dim": int(base),
        "decoder_base_dim": None if dec_base == base else int(dec_base),
        "z_dim": int(z_dim),
        "dim_mult": [int(m) for m in mults],
        "num_res_blocks": int(counts[0]),
        "temperal_downsample": temporal,
        "scale_factor_temporal": 2 ** sum(temporal),
        "scale_factor_spatial": 2 ** (len(mults) - 1),
    }


def vae22_config(sd: dict, source: Path) -> dict:
    """AutoencoderKLWan config for a Wan2.2 VAE (nested stages, 12-channel patchified I/O), from shapes."""
    conv_in = _vae_shape(sd, "encoder.conv1.weight", source)
    base, in_channels = int(conv_in[0]), int(conv_in[1])
    z_dim = int(_vae_shape(sd, "conv2.weight", source)[0])
    out_channels = int(_vae_shape(sd, "decoder.head.2.weight", source)[0])
    stages = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")})
    if stages != list(range(len(stages))) or not stages:
        raise UserError(f"{source}: encoder stages {stages} are not 0..N; not a Wan2.2 VAE")
    mults = [
        int(_vae_shape(sd, f"encoder.downsamples.{i}.downsamples.0.residual.2.weight", source)[0]) // base
        for i in stages
    ]
    num_res = len(
        {k.split(".")[4] for k in sd if k.startswith("encoder.downsamples.0.downsamples.") and ".residual." in k}
    )
    temporal = [
        any(k.startswith(f"encoder.downsamples.{i}.downsamples.") and ".time_conv." in k for k in sd)
        for i in stages[:-1]
    ]
    dec_base = int(_vae_shape(sd, "decoder.conv1.weight", source)[0]) // mults[-1]
    patch = math.isqrt(in_channels // 3)
    if patch * patch * 3 != in_channels:
        raise UserError(f"{source}: {in_channels} input channels is not 3 x patch^2; not a Wan2.2 VAE")
    if z_dim != len(WAN22_LATENTS_MEAN):
        raise UserError(f"{source}: z_dim {z_dim}; the Wan2.2 VAE latent tables have {len(WAN22_LATENTS_MEAN)} "
                        "channels")
    return {
        "base_dim": base,
        "decoder_base_dim": dec_base,
        "z_dim": z_dim,
        "dim_mult": mults,
        "num_res_blocks": num_res,
        "temperal_downsample": temporal,
        "is_residual": True,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "patch_size": patch,
        "scale_factor_temporal": 2 ** sum(temporal),
        "scale_factor_spatial": 2 ** (len(stages) - 1) * patch,
        "latents_mean": list(WAN22_LATENTS_MEAN),
        "latents_std": list(WAN22_LATENTS_STD),
    }


def load_vae(path: str | Path, *, dtype: torch.dtype | None = torch.float32):
    """AutoencoderKLWan from ``Wan2.1_VAE.pth`` or ``Wan2.2_VAE.pth`` (told apart by structure)."""
    from diffusers import AutoencoderKLWan

    path = Path(path)
    sd = torch_load(path)
    nested = any(k.startswith("encoder.downsamples.0.downsamples.") for k in sd)
    if nested:
        config = vae22_config(sd, path)
        names = rename_unique(sd, vae22_key_to_diffusers, path, "Wan2.2 VAE")
    else:
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        config = vae21_config(sd, path)
        names = {new: orig for new, orig in convert_wan_vae_to_diffusers({k: k for k in sd}).items()}
    what = "Wan2.2 VAE" if nested else "Wan2.1 VAE"
    model = empty(AutoencoderKLWan, **config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(path, what, expected, {k: (o, tuple(sd[o].shape)) for k, o in names.items()})
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    state = {k: cast(k, sd[o], dtype, keep) for k, o in names.items()}
    del sd
    assign(model, state, what=what, source=path)
    no_meta_left(model, path, what)
    return model.eval()
