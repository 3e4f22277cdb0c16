"""Original Wan2.2 release layout: loading, parity with the diffusers layout, conversion, errors.

The fixtures write the same tiny random weights twice: once with ``WanPipeline.save_pretrained``
(diffusers layout) and once in the original layout with Wan's own names. The diffusers -> Wan
names below are written from the official module structure (Wan-Video/Wan2.2 wan/modules/model.py,
t5.py, vae2_1.py, vae2_2.py), independently of the loader's tables, and the key sets they produce
are checked against hand-written official names, so a wrong mapping in the loader cannot hide
behind the same mistake in the fixture.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanPipeline,
    WanTransformer3DModel,
)
from safetensors.torch import load_file, save_file
from transformers import UMT5Config, UMT5EncoderModel

from wan_grpo.cli import main
from wan_grpo.convert import convert
from wan_grpo.errors import UserError
from wan_grpo.models.components import WanComponents
from wan_grpo.models.loading import inspect_checkpoint, load_components
from wan_grpo.models.original import WAN22_LATENTS_MEAN, WAN22_LATENTS_STD, is_original_layout
from wan_grpo.models.tiny import tiny_tokenizer
from wan_grpo.specs import infer_task

TEXT_DIM = 32
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
VAE21_NRB, VAE22_NRB = 2, 1  # Wan2.1 must be the released 2; Wan2.2 uses 1 to exercise shape inference

# ----------------------------------------------------------------------------- tiny models


def _perturb(module: torch.nn.Module, seed: int) -> None:
    """Make every tensor distinct (norm weights are ones and biases zeros at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def tiny_dit(seed: int, *, in_channels: int = 16, num_layers: int = 2) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    m = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=in_channels, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=40, num_layers=num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
    )
    _perturb(m, seed)
    return m.eval()


def tiny_t5(vocab: int, seed: int, *, num_layers: int = 2) -> UMT5EncoderModel:
    torch.manual_seed(seed)
    # d_kv * heads (24) != d_model (32), as dim_attn may differ from dim in the official T5.
    m = UMT5EncoderModel(UMT5Config(
        vocab_size=vocab, d_model=TEXT_DIM, d_kv=6, d_ff=48, num_layers=num_layers, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    ))
    _perturb(m, seed)
    with torch.no_grad():  # the release T5 is bf16: keep only bf16-representable values
        for p in m.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return m.eval()


def tiny_vae21(seed: int) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    m = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=VAE21_NRB,
                         temperal_downsample=[False, True, True])
    _perturb(m, seed)
    return m.eval()


def tiny_vae22(seed: int) -> AutoencoderKLWan:
    torch.manual_seed(seed)
    m = AutoencoderKLWan(
        base_dim=4, decoder_base_dim=6, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=VAE22_NRB,
        temperal_downsample=[False, True, True], is_residual=True, in_channels=12, out_channels=12,
        patch_size=2, scale_factor_temporal=4, scale_factor_spatial=16,
        latents_mean=list(WAN22_LATENTS_MEAN), latents_std=list(WAN22_LATENTS_STD),
    )
    _perturb(m, seed)
    return m.eval()


# ----------------------------------------------------------------------------- diffusers -> Wan names
# Written from the official modules: WanModel (patch_embedding, text_embedding = Seq(Linear, GELU,
# Linear), time_embedding = Seq(Linear, SiLU, Linear), time_projection = Seq(SiLU, Linear), blocks.N
# = WanAttentionBlock(norm1, self_attn, norm3 (affine cross-attn norm), cross_attn, norm2, ffn =
# Seq(Linear, GELU, Linear), modulation), head = Head(norm, head, modulation)).

DIT_TO_WAN = [
    (r"patch_embedding\.(weight|bias)", r"patch_embedding.\1"),
    (r"condition_embedder\.text_embedder\.linear_1\.(weight|bias)", r"text_embedding.0.\1"),
    (r"condition_embedder\.text_embedder\.linear_2\.(weight|bias)", r"text_embedding.2.\1"),
    (r"condition_embedder\.time_embedder\.linear_1\.(weight|bias)", r"time_embedding.0.\1"),
    (r"condition_embedder\.time_embedder\.linear_2\.(weight|bias)", r"time_embedding.2.\1"),
    (r"condition_embedder\.time_proj\.(weight|bias)", r"time_projection.1.\1"),
    (r"blocks\.(\d+)\.attn1\.to_(q|k|v)\.(weight|bias)", r"blocks.\1.self_attn.\2.\3"),
    (r"blocks\.(\d+)\.attn1\.to_out\.0\.(weight|bias)", r"blocks.\1.self_attn.o.\2"),
    (r"blocks\.(\d+)\.attn1\.norm_(q|k)\.weight", r"blocks.\1.self_attn.norm_\2.weight"),
    (r"blocks\.(\d+)\.attn2\.to_(q|k|v)\.(weight|bias)", r"blocks.\1.cross_attn.\2.\3"),
    (r"blocks\.(\d+)\.attn2\.to_out\.0\.(weight|bias)", r"blocks.\1.cross_attn.o.\2"),
    (r"blocks\.(\d+)\.attn2\.norm_(q|k)\.weight", r"blocks.\1.cross_attn.norm_\2.weight"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"blocks.\1.norm3.\2"),
    (r"blocks\.(\d+)\.ffn\.net\.0\.proj\.(weight|bias)", r"blocks.\1.ffn.0.\2"),
    (r"blocks\.(\d+)\.ffn\.net\.2\.(weight|bias)", r"blocks.\1.ffn.2.\2"),
    (r"blocks\.(\d+)\.scale_shift_table", r"blocks.\1.modulation"),
    (r"scale_shift_table", r"head.modulation"),
    (r"proj_out\.(weight|bias)", r"head.head.\1"),
]

# T5Encoder (t5.py, shared_pos=False): token_embedding, blocks.N = T5SelfAttention(norm1, attn =
# T5Attention(q, k, v, o), norm2, ffn = T5FeedForward(gate = Seq(Linear, GELU), fc1, fc2),
# pos_embedding = T5RelativeEmbedding(embedding)), norm.
T5_TO_WAN = [
    (r"shared\.weight", r"token_embedding.weight"),
    (r"encoder\.embed_tokens\.weight", None),  # the same (tied) embedding
    (r"encoder\.final_layer_norm\.weight", r"norm.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"blocks.\1.norm1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v|o)\.weight", r"blocks.\1.attn.\2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
     r"blocks.\1.pos_embedding.embedding.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"blocks.\1.norm2.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_0\.weight", r"blocks.\1.ffn.gate.0.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wi_1\.weight", r"blocks.\1.ffn.fc1.weight"),
    (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.wo\.weight", r"blocks.\1.ffn.fc2.weight"),
]


def _rename(state: dict, table) -> dict:
    out = {}
    for k, v in state.items():
        for pattern, template in table:
            m = re.fullmatch(pattern, k)
            if m:
                if template is not None:
                    out[m.expand(template)] = v.detach().clone().contiguous()
                break
        else:
            raise AssertionError(f"fixture has no Wan name for {k}")
    return out


# ResidualBlock.residual = Seq(RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d)
RES_LEAF = {
    "norm1.gamma": "residual.0.gamma", "conv1.weight": "residual.2.weight", "conv1.bias": "residual.2.bias",
    "norm2.gamma": "residual.3.gamma", "conv2.weight": "residual.6.weight", "conv2.bias": "residual.6.bias",
    "conv_shortcut.weight": "shortcut.weight", "conv_shortcut.bias": "shortcut.bias",
}


def vae_to_wan(state: dict, *, nrb: int, wan22: bool) -> dict:
    """Encoder3d/Decoder3d: conv1, downsamples/upsamples, middle = (res, attn, res), head = (norm, SiLU, conv).

    Wan2.1 lists every stage's blocks flat (nrb residual blocks + a resample per encoder stage,
    nrb + 1 + a resample per decoder stage); Wan2.2 nests them as ``downsamples.i.downsamples.j``.
    """
    out = {}
    for k, v in state.items():
        v = v.detach().clone().contiguous()
        if m := re.fullmatch(r"(post_quant_conv|quant_conv)\.(weight|bias)", k):
            new = f"{'conv1' if m.group(1) == 'quant_conv' else 'conv2'}.{m.group(2)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_in\.(.+)", k):
            new = f"{m.group(1)}.conv1.{m.group(2)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.norm_out\.gamma", k):
            new = f"{m.group(1)}.head.0.gamma"
        elif m := re.fullmatch(r"(encoder|decoder)\.conv_out\.(.+)", k):
            new = f"{m.group(1)}.head.2.{m.group(2)}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(.+)", k):
            new = f"{m.group(1)}.middle.{2 * int(m.group(2))}.{RES_LEAF[m.group(3)]}"
        elif m := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", k):
            new = f"{m.group(1)}.middle.1.{m.group(2)}"
        elif not wan22 and (m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(.+)", k)):
            leaf = m.group(2)
            new = f"encoder.downsamples.{m.group(1)}.{RES_LEAF.get(leaf, leaf)}"
        elif not wan22 and (m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k)):
            new = f"decoder.upsamples.{int(m.group(1)) * (nrb + 2) + int(m.group(2))}.{RES_LEAF[m.group(3)]}"
        elif not wan22 and (m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)", k)):
            new = f"decoder.upsamples.{int(m.group(1)) * (nrb + 2) + nrb + 1}.{m.group(2)}"
        elif wan22 and (m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k)):
            new = f"encoder.downsamples.{m.group(1)}.downsamples.{m.group(2)}.{RES_LEAF[m.group(3)]}"
        elif wan22 and (m := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsampler\.(.+)", k)):
            new = f"encoder.downsamples.{m.group(1)}.downsamples.{nrb}.{m.group(2)}"
        elif wan22 and (m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", k)):
            new = f"decoder.upsamples.{m.group(1)}.upsamples.{m.group(2)}.{RES_LEAF[m.group(3)]}"
        elif wan22 and (m := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsampler\.(.+)", k)):
            new = f"decoder.upsamples.{m.group(1)}.upsamples.{nrb + 1}.{m.group(2)}"
        else:
            raise AssertionError(f"fixture has no Wan name for {k}")
        out[new] = v
    return out


def official_vae_keys(*, dim: int, dec_dim: int, dim_mult, nrb: int, temporal, wan22: bool) -> set[str]:
    """Every parameter name the official WanVAE_ (vae2_1.py / vae2_2.py) __init__ creates."""
    def res(p, i, o):
        ks = [p + s for s in ("residual.0.gamma", "residual.2.weight", "residual.2.bias", "residual.3.gamma",
                              "residual.6.weight", "residual.6.bias")]
        return ks + ([p + "shortcut.weight", p + "shortcut.bias"] if i != o else [])

    def attn(p):
        return [p + s for s in ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")]

    def resample(p, t):
        temporal = [p + "time_conv.weight", p + "time_conv.bias"] if t else []
        return [p + "resample.1.weight", p + "resample.1.bias"] + temporal

    keys = ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "encoder.conv1.weight", "encoder.conv1.bias"]
    dims = [dim * u for u in [1] + list(dim_mult)]
    flat = 0
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        down = i != len(dim_mult) - 1
        for j in range(nrb):
            p = f"encoder.downsamples.{i}.downsamples.{j}." if wan22 else f"encoder.downsamples.{flat}."
            keys += res(p, a if j == 0 else b, b)
            flat += 1
        if down:
            p = f"encoder.downsamples.{i}.downsamples.{nrb}." if wan22 else f"encoder.downsamples.{flat}."
            keys += resample(p, temporal[i])
            flat += 1
    out = dims[-1]
    keys += res("encoder.middle.0.", out, out) + attn("encoder.middle.1.") + res("encoder.middle.2.", out, out)
    keys += ["encoder.head.0.gamma", "encoder.head.2.weight", "encoder.head.2.bias"]

    ddims = [dec_dim * u for u in [dim_mult[-1]] + list(dim_mult)[::-1]]
    keys += ["decoder.conv1.weight", "decoder.conv1.bias"]
    keys += res("decoder.middle.0.", ddims[0], ddims[0]) + attn("decoder.middle.1.")
    keys += res("decoder.middle.2.", ddims[0], ddims[0])
    up_t = list(temporal)[::-1]
    flat = 0
    for i, (a, b) in enumerate(zip(ddims[:-1], ddims[1:])):
        up = i != len(dim_mult) - 1
        if not wan22 and i in (1, 2, 3):
            a = a // 2  # Wan2.1's upsample convs halve the channels
        for j in range(nrb + 1):
            p = f"decoder.upsamples.{i}.upsamples.{j}." if wan22 else f"decoder.upsamples.{flat}."
            keys += res(p, a if j == 0 else b, b)
            flat += 1
        if up:
            p = f"decoder.upsamples.{i}.upsamples.{nrb + 1}." if wan22 else f"decoder.upsamples.{flat}."
            keys += resample(p, up_t[i])
            flat += 1
    keys += ["decoder.head.0.gamma", "decoder.head.2.weight", "decoder.head.2.bias"]
    assert len(keys) == len(set(keys))
    return set(keys)


# ----------------------------------------------------------------------------- writers


def write_expert(d, model: WanTransformer3DModel, model_type: str, n_shards: int = 2) -> None:
    d.mkdir(parents=True, exist_ok=True)
    state = _rename(model.state_dict(), DIT_TO_WAN)
    keys = sorted(state)
    weight_map = {}
    for i in range(n_shards):
        name = f"diffusion_pytorch_model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        chunk = keys[i::n_shards]
        save_file({k: state[k].float() for k in chunk}, str(d / name))
        weight_map.update(dict.fromkeys(chunk, name))
    total = sum(t.numel() * 4 for t in state.values())
    (d / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    c = model.config
    (d / "config.json").write_text(json.dumps({  # only the fields the official release has
        "_class_name": "WanModel", "dim": c.num_attention_heads * c.attention_head_dim, "eps": c.eps,
        "ffn_dim": c.ffn_dim, "freq_dim": c.freq_dim, "in_dim": c.in_channels, "model_type": model_type,
        "num_heads": c.num_attention_heads, "num_layers": c.num_layers, "out_dim": c.out_channels, "text_len": 512,
    }, indent=2))


def write_t5(path, model: UMT5EncoderModel) -> None:
    torch.save({k: v.to(torch.bfloat16) for k, v in _rename(model.state_dict(), T5_TO_WAN).items()}, path)


def write_vae(path, vae: AutoencoderKLWan, *, wan22: bool) -> None:
    torch.save(vae_to_wan(vae.state_dict(), nrb=vae.config.num_res_blocks, wan22=wan22), path)


def build_a14b(seed: int = 0) -> WanComponents:
    tok = tiny_tokenizer()
    return WanComponents(
        transformer=tiny_dit(seed + 1), transformer_2=tiny_dit(seed + 2), vae=tiny_vae21(seed + 3),
        text_encoder=tiny_t5(len(tok), seed + 4), tokenizer=tok, boundary_ratio=0.875, expand_timesteps=False,
    )


def build_ti2v(seed: int = 10) -> WanComponents:
    tok = tiny_tokenizer()
    return WanComponents(
        transformer=tiny_dit(seed + 1, in_channels=48), transformer_2=None, vae=tiny_vae22(seed + 3),
        text_encoder=tiny_t5(len(tok), seed + 4), tokenizer=tok, boundary_ratio=None, expand_timesteps=True,
    )


def save_both(c: WanComponents, diff_dir, orig_dir, model_type: str) -> None:
    WanPipeline(
        tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=c.transformer,
        transformer_2=c.transformer_2, boundary_ratio=c.boundary_ratio, expand_timesteps=c.expand_timesteps,
    ).save_pretrained(str(diff_dir))
    orig_dir.mkdir(parents=True)
    if c.transformer_2 is not None:
        write_expert(orig_dir / "high_noise_model", c.transformer, model_type)
        write_expert(orig_dir / "low_noise_model", c.transformer_2, model_type, n_shards=3)
    else:
        write_expert(orig_dir, c.transformer, model_type)
    write_t5(orig_dir / T5_FILE, c.text_encoder)
    wan22 = c.vae.config.is_residual
    write_vae(orig_dir / ("Wan2.2_VAE.pth" if wan22 else "Wan2.1_VAE.pth"), c.vae, wan22=wan22)
    c.tokenizer.save_pretrained(str(orig_dir / "google" / "umt5-xxl"))


@pytest.fixture(scope="module")
def a14b(tmp_path_factory):
    base = tmp_path_factory.mktemp("orig-a14b")
    save_both(build_a14b(), base / "diffusers", base / "original", "t2v")
    return base / "diffusers", base / "original"


@pytest.fixture(scope="module")
def ti2v(tmp_path_factory):
    base = tmp_path_factory.mktemp("orig-ti2v")
    save_both(build_ti2v(), base / "diffusers", base / "original", "ti2v")
    return base / "diffusers", base / "original"


# ----------------------------------------------------------------------------- helpers


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def assert_same_config(a, b, ignore=()) -> None:
    ca = {k: v for k, v in dict(a.config).items() if not k.startswith("_") and k not in ignore}
    cb = {k: v for k, v in dict(b.config).items() if not k.startswith("_") and k not in ignore}
    def norm(d):
        return json.loads(json.dumps(d, default=str))  # tuples vs lists

    assert norm(ca) == norm(cb)


def run_latents(c: WanComponents, *, size=32, steps=4, scheduler=None) -> torch.Tensor:
    pipe = WanPipeline(
        tokenizer=c.tokenizer, text_encoder=c.text_encoder, vae=c.vae,
        scheduler=scheduler or FlowMatchEulerDiscreteScheduler(shift=5.0), transformer=c.transformer,
        transformer_2=c.transformer_2, boundary_ratio=c.boundary_ratio, expand_timesteps=c.expand_timesteps,
    )
    return pipe(
        prompt="a red fox in the snow", negative_prompt="blurry", height=size, width=size, num_frames=5,
        num_inference_steps=steps, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
        output_type="latent", max_sequence_length=16,
    ).frames


# ----------------------------------------------------------------------------- names (non-circular)

DIT_1_LAYER = {
    "patch_embedding.weight", "patch_embedding.bias",
    "text_embedding.0.weight", "text_embedding.0.bias", "text_embedding.2.weight", "text_embedding.2.bias",
    "time_embedding.0.weight", "time_embedding.0.bias", "time_embedding.2.weight", "time_embedding.2.bias",
    "time_projection.1.weight", "time_projection.1.bias",
    "blocks.0.modulation",
    "blocks.0.self_attn.q.weight", "blocks.0.self_attn.q.bias", "blocks.0.self_attn.k.weight",
    "blocks.0.self_attn.k.bias", "blocks.0.self_attn.v.weight", "blocks.0.self_attn.v.bias",
    "blocks.0.self_attn.o.weight", "blocks.0.self_attn.o.bias",
    "blocks.0.self_attn.norm_q.weight", "blocks.0.self_attn.norm_k.weight",
    "blocks.0.norm3.weight", "blocks.0.norm3.bias",
    "blocks.0.cross_attn.q.weight", "blocks.0.cross_attn.q.bias", "blocks.0.cross_attn.k.weight",
    "blocks.0.cross_attn.k.bias", "blocks.0.cross_attn.v.weight", "blocks.0.cross_attn.v.bias",
    "blocks.0.cross_attn.o.weight", "blocks.0.cross_attn.o.bias",
    "blocks.0.cross_attn.norm_q.weight", "blocks.0.cross_attn.norm_k.weight",
    "blocks.0.ffn.0.weight", "blocks.0.ffn.0.bias", "blocks.0.ffn.2.weight", "blocks.0.ffn.2.bias",
    "head.head.weight", "head.head.bias", "head.modulation",
}

T5_1_LAYER = {
    "token_embedding.weight", "blocks.0.norm1.weight", "blocks.0.attn.q.weight", "blocks.0.attn.k.weight",
    "blocks.0.attn.v.weight", "blocks.0.attn.o.weight", "blocks.0.pos_embedding.embedding.weight",
    "blocks.0.norm2.weight", "blocks.0.ffn.gate.0.weight", "blocks.0.ffn.fc1.weight", "blocks.0.ffn.fc2.weight",
    "norm.weight",
}


def test_fixture_writes_the_official_names():
    dit = tiny_dit(0, num_layers=1)
    wan = _rename(dit.state_dict(), DIT_TO_WAN)
    assert set(wan) == DIT_1_LAYER
    # shapes as the official modules have them (modulation (1, 6, dim), head.modulation (1, 2, dim))
    assert wan["blocks.0.modulation"].shape == (1, 6, 24) and wan["head.modulation"].shape == (1, 2, 24)
    assert wan["head.head.weight"].shape == (16 * 4, 24) and wan["patch_embedding.weight"].shape == (24, 16, 1, 2, 2)

    t5 = _rename(tiny_t5(50, 0, num_layers=1).state_dict(), T5_TO_WAN)
    assert set(t5) == T5_1_LAYER
    assert t5["blocks.0.pos_embedding.embedding.weight"].shape == (8, 4)  # [num_buckets, num_heads]
    assert t5["blocks.0.attn.q.weight"].shape == (24, TEXT_DIM)  # [dim_attn, dim]

    v21 = tiny_vae21(0)
    keys21 = set(vae_to_wan(v21.state_dict(), nrb=VAE21_NRB, wan22=False))
    assert keys21 == official_vae_keys(dim=4, dec_dim=4, dim_mult=[1, 2, 4, 4], nrb=2,
                                       temporal=[False, True, True], wan22=False)
    # Hand-checked against vae2_1.py: the only decoder shortcut is upsamples.4 (192 -> 384 at full
    # size), upsample3d at flat 3 and 7, upsample2d at 11; the encoder's first temporal downsample is 5.
    assert {"decoder.upsamples.4.shortcut.weight", "decoder.upsamples.3.time_conv.weight",
            "decoder.upsamples.7.time_conv.weight", "decoder.upsamples.11.resample.1.weight",
            "encoder.downsamples.5.time_conv.weight", "encoder.downsamples.3.shortcut.weight"} <= keys21
    assert not {"decoder.upsamples.11.time_conv.weight", "encoder.downsamples.2.time_conv.weight",
                "decoder.upsamples.8.shortcut.weight"} & keys21

    v22 = tiny_vae22(0)
    keys22 = set(vae_to_wan(v22.state_dict(), nrb=VAE22_NRB, wan22=True))
    assert keys22 == official_vae_keys(dim=4, dec_dim=6, dim_mult=[1, 2, 4, 4], nrb=VAE22_NRB,
                                       temporal=[False, True, True], wan22=True)
    assert {"encoder.downsamples.0.downsamples.1.resample.1.weight",
            "encoder.downsamples.1.downsamples.1.time_conv.weight",
            "decoder.upsamples.0.upsamples.2.time_conv.weight", "decoder.upsamples.2.upsamples.0.shortcut.weight",
            "decoder.upsamples.3.upsamples.1.residual.6.bias"} <= keys22


# ----------------------------------------------------------------------------- A14B


def test_a14b_layout_detected(a14b):
    diff_dir, orig_dir = a14b
    assert is_original_layout(orig_dir) and not is_original_layout(diff_dir)
    index = inspect_checkpoint(orig_dir)
    assert index["_layout"] == "original" and index["model_type"] == "t2v"
    assert infer_task(index) == "t2v-A14B" and index["boundary_ratio"] == 0.875
    shards = sorted(p.name for p in (orig_dir / "low_noise_model").glob("*.safetensors"))
    assert len(shards) == 3 and len(list((orig_dir / "high_noise_model").glob("*.safetensors"))) == 2
    assert {t.dtype for t in load_file(str(orig_dir / "low_noise_model" / shards[0])).values()} == {torch.float32}
    assert next(iter(torch.load(orig_dir / T5_FILE, weights_only=True).values())).dtype == torch.bfloat16


def test_a14b_weights_configs_and_latents_match_diffusers_layout(a14b):
    diff_dir, orig_dir = a14b
    ref, got = load_components(diff_dir), load_components(orig_dir)
    for name in ("transformer", "transformer_2", "vae", "text_encoder"):
        assert_same_weights(getattr(ref, name), getattr(got, name))
    assert_same_config(ref.transformer, got.transformer)
    assert_same_config(ref.transformer_2, got.transformer_2)
    assert_same_config(ref.vae, got.vae)
    tc, gc = ref.text_encoder.config, got.text_encoder.config
    for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads", "relative_attention_num_buckets",
                  "relative_attention_max_distance", "feed_forward_proj", "dense_act_fn", "is_gated_act",
                  "layer_norm_epsilon"):
        assert getattr(tc, field) == getattr(gc, field), field
    assert gc.dense_act_fn == "gelu_new" and gc.d_kv * gc.num_heads == 24
    assert got.text_encoder.shared.weight is got.text_encoder.encoder.embed_tokens.weight
    assert got.boundary_ratio == 0.875 and not got.expand_timesteps and got.default_shift == 12.0
    assert got.tokenizer("a red fox").input_ids == ref.tokenizer("a red fox").input_ids
    assert not got.transformer.training and not got.vae.training

    a, b = run_latents(ref), run_latents(got)
    assert a.shape == (1, 16, 2, 4, 4)
    assert (a - b).abs().max().item() <= 1e-5


def test_bf16_load_keeps_the_same_fp32_modules_as_from_pretrained(a14b):
    diff_dir, orig_dir = a14b
    ref = load_components(diff_dir, dtype=torch.bfloat16)
    got = load_components(orig_dir, dtype=torch.bfloat16)
    for name in ("transformer", "text_encoder"):
        want = {k: v.dtype for k, v in getattr(ref, name).state_dict().items()}
        have = {k: v.dtype for k, v in getattr(got, name).state_dict().items()}
        assert want == have, name
    assert got.transformer.scale_shift_table.dtype == torch.float32  # _keep_in_fp32_modules
    assert got.transformer.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16


def test_a14b_without_text_encoder_needs_no_t5(a14b, tmp_path):
    _, orig_dir = a14b
    d = tmp_path / "no-t5"
    shutil.copytree(orig_dir, d)
    (d / T5_FILE).unlink()
    c = load_components(d, load_text_encoder=False)
    assert c.text_encoder is None and c.tokenizer is None and c.transformer_2 is not None
    with pytest.raises(UserError, match=re.escape(T5_FILE)):
        load_components(d)


# ----------------------------------------------------------------------------- TI2V-5B


def test_ti2v_weights_decode_and_latents_match(ti2v):
    diff_dir, orig_dir = ti2v
    index = inspect_checkpoint(orig_dir)
    assert infer_task(index) == "ti2v-5B" and index["expand_timesteps"] and index["boundary_ratio"] is None
    ref, got = load_components(diff_dir), load_components(orig_dir)
    assert got.transformer_2 is None and got.expand_timesteps and got.default_shift == 5.0
    for name in ("transformer", "vae", "text_encoder"):
        assert_same_weights(getattr(ref, name), getattr(got, name))
    assert_same_config(ref.transformer, got.transformer)
    assert_same_config(ref.vae, got.vae)
    vc = got.vae.config
    assert (vc.z_dim, vc.is_residual, vc.patch_size, vc.in_channels, vc.out_channels) == (48, True, 2, 12, 12)
    assert (vc.scale_factor_spatial, vc.scale_factor_temporal, vc.base_dim, vc.decoder_base_dim) == (16, 4, 4, 6)
    assert vc.num_res_blocks == VAE22_NRB and list(vc.temperal_downsample) == [False, True, True]
    # the table hard-coded in the official vae2_2.py (first/last entries)
    assert len(vc.latents_mean) == 48 and vc.latents_mean[:3] == [-0.2289, -0.0052, -0.1323]
    assert vc.latents_mean[-1] == -0.0667 and vc.latents_std[0] == 0.4765 and vc.latents_std[-1] == 0.7744

    z = torch.randn(1, 48, 2, 2, 2, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        da, db = ref.vae.decode(z).sample, got.vae.decode(z).sample
    assert da.shape == (1, 3, 5, 32, 32)
    assert (da - db).abs().max().item() <= 1e-6

    a, b = run_latents(ref, size=64, steps=3), run_latents(got, size=64, steps=3)
    assert a.shape == (1, 48, 2, 4, 4)
    assert (a - b).abs().max().item() <= 1e-5


# ----------------------------------------------------------------------------- convert


def test_convert_writes_a_loadable_diffusers_layout(a14b, tmp_path):
    diff_dir, orig_dir = a14b
    out = convert(orig_dir, tmp_path / "converted", dtype="fp32")
    assert (out / "model_index.json").is_file() and not list(tmp_path.glob("converted.tmp-*"))
    pipe = WanPipeline.from_pretrained(str(out))
    assert isinstance(pipe.scheduler, UniPCMultistepScheduler)
    sc = pipe.scheduler.config
    got = (sc.flow_shift, sc.prediction_type, sc.use_flow_sigmas, sc.num_train_timesteps)
    assert got == (12.0, "flow_prediction", True, 1000)
    assert pipe.config.boundary_ratio == 0.875 and pipe.transformer_2 is not None

    ref = load_components(diff_dir)
    conv = load_components(out)
    for name in ("transformer", "transformer_2", "vae", "text_encoder"):
        assert_same_weights(getattr(ref, name), getattr(conv, name))
    assert conv.default_shift == 12.0
    def sched():
        return UniPCMultistepScheduler.from_config(sc)

    a = run_latents(ref, scheduler=sched())
    kw = dict(prompt="a red fox in the snow", negative_prompt="blurry", height=32, width=32, num_frames=5,
              num_inference_steps=4, guidance_scale=3.0, output_type="latent", max_sequence_length=16)
    b = pipe(generator=torch.Generator().manual_seed(0), **kw).frames
    assert (a - b).abs().max().item() <= 1e-5

    # Without a dtype the stored dtypes are kept (fp32 experts, bf16 T5); a non-empty output is refused.
    kept = tmp_path / "kept"  # through the CLI: wan-grpo convert --ckpt_dir ORIG --output DIR
    assert main(["convert", "--ckpt_dir", str(orig_dir), "--output", str(kept)]) == 0
    te = json.loads((kept / "text_encoder" / "config.json").read_text())
    assert te.get("dtype", te.get("torch_dtype")) == "bfloat16"
    shard = next((kept / "transformer").glob("*.safetensors"))
    assert load_file(str(shard))["patch_embedding.weight"].dtype == torch.float32
    with pytest.raises(UserError, match="not an empty folder; remove it or pass a new --output"):
        convert(orig_dir, kept)
    assert main(["convert", "--ckpt_dir", str(orig_dir), "--output", str(kept)]) == 2
    with pytest.raises(UserError, match="already in the diffusers layout"):
        convert(diff_dir, tmp_path / "again")


def test_convert_ti2v(ti2v, tmp_path):
    _, orig_dir = ti2v
    out = convert(orig_dir, tmp_path / "ti2v-diffusers", dtype="fp32")
    pipe = WanPipeline.from_pretrained(str(out))
    assert pipe.config.expand_timesteps and pipe.transformer_2 is None and pipe.scheduler.config.flow_shift == 5.0
    assert pipe.vae.config.z_dim == 48 and pipe.vae.config.is_residual


# ----------------------------------------------------------------------------- errors


def test_neither_layout_lists_expected_and_found(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    (tmp_path / "weights").mkdir()
    with pytest.raises(UserError) as e:
        inspect_checkpoint(tmp_path)
    msg = str(e.value)
    assert "no model_index.json" in msg and "pass a diffusers-format" in msg
    assert "model_index.json, transformer/" in msg and "high_noise_model/ + low_noise_model/" in msg
    assert "Wan2.1_VAE.pth or Wan2.2_VAE.pth" in msg and "found: notes.txt, weights/" in msg
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="found: an empty folder"):
        load_components(empty)
    with pytest.raises(UserError, match="not an original-layout Wan2.2 checkpoint"):
        convert(tmp_path, tmp_path.parent / "out-neither")


def test_incomplete_original_layout_names_what_is_missing(tmp_path):
    (tmp_path / "high_noise_model").mkdir()
    with pytest.raises(UserError) as e:
        inspect_checkpoint(tmp_path)
    msg = str(e.value)
    assert "original Wan2.2 layout" in msg and "low_noise_model/" in msg and "high_noise_model/config.json" in msg


def test_missing_low_noise_shard_is_named(a14b, tmp_path):
    _, orig_dir = a14b
    d = tmp_path / "broken"
    shutil.copytree(orig_dir, d)
    victim = d / "low_noise_model" / "diffusion_pytorch_model-00002-of-00003.safetensors"
    victim.unlink()
    for call in (inspect_checkpoint, load_components):
        with pytest.raises(UserError, match=re.escape(str(victim))):
            call(d)


def test_missing_vae_is_named(a14b, tmp_path):
    _, orig_dir = a14b
    d = tmp_path / "no-vae"
    shutil.copytree(orig_dir, d)
    (d / "Wan2.1_VAE.pth").unlink()
    with pytest.raises(UserError, match="has no Wan2.1_VAE.pth"):
        load_components(d)


def _edit_shard(d, edit) -> None:
    shard = d / "high_noise_model" / "diffusion_pytorch_model-00001-of-00002.safetensors"
    state = load_file(str(shard))
    edit(state)
    save_file(state, str(shard))


def test_unexpected_missing_and_misshaped_keys_are_errors(a14b, tmp_path):
    _, orig_dir = a14b
    d = tmp_path / "extra"
    shutil.copytree(orig_dir, d)
    _edit_shard(d, lambda s: s.__setitem__("blocks.0.self_attn.extra.weight", torch.zeros(2)))
    with pytest.raises(UserError, match=r"unexpected key\(s\): blocks\.0\.self_attn\.extra\.weight"):
        load_components(d)

    d = tmp_path / "missing"
    shutil.copytree(orig_dir, d)
    shard = d / "high_noise_model" / "diffusion_pytorch_model-00001-of-00002.safetensors"
    victim = next(k for k in load_file(str(shard)) if k.startswith("head."))
    _edit_shard(d, lambda s: s.pop(victim))
    with pytest.raises(UserError, match=r"missing key\(s\)"):
        load_components(d)

    d = tmp_path / "shape"
    shutil.copytree(orig_dir, d)
    _edit_shard(d, lambda s: s.__setitem__(victim, torch.zeros(3, 3)))
    with pytest.raises(UserError, match="wrong shape"):
        load_components(d)

    d = tmp_path / "t5"
    shutil.copytree(orig_dir, d)
    sd = torch.load(d / T5_FILE, weights_only=True)
    sd["blocks.0.attn.extra.weight"] = torch.zeros(2)
    torch.save(sd, d / T5_FILE)
    with pytest.raises(UserError, match=r"blocks\.0\.attn\.extra\.weight"):
        load_components(d)

    d = tmp_path / "vae"
    shutil.copytree(orig_dir, d)
    sd = torch.load(d / "Wan2.1_VAE.pth", weights_only=True)
    sd["decoder.middle.1.extra"] = torch.zeros(2)
    torch.save(sd, d / "Wan2.1_VAE.pth")
    with pytest.raises(UserError, match=r"decoder\.middle\.1\.extra"):
        load_components(d, load_text_encoder=False)


# ----------------------------------------------------------------------------- T5 numerics


def _official_t5_forward(sd: dict, ids: torch.Tensor, mask: torch.Tensor, *, max_dist: int = 128, eps: float = 1e-6):
    """The official T5Encoder computation (t5.py), written out: per-layer relative bias with
    bidirectional log buckets (max_dist 128), unscaled attention, T5 RMS norm, fc2(fc1(x) * gelu_tanh(gate(x)))."""
    import math

    import torch.nn.functional as F

    sd = {k: v.float() for k, v in sd.items()}
    b, n = ids.shape
    x = sd["token_embedding.weight"][ids]
    def norm(t, w):
        return w * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps))

    num_buckets, heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
    rel = torch.arange(n)[None, :] - torch.arange(n)[:, None]  # key - query
    half = num_buckets // 2
    buckets = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    large = exact + (torch.log(rel.float().clamp(min=1) / exact) / math.log(max_dist / exact) * (half - exact)).long()
    buckets = buckets + torch.where(rel < exact, rel, large.clamp(max=half - 1))
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(layers):
        p = f"blocks.{i}."
        h = norm(x, sd[p + "norm1.weight"])
        q, k, v = (h @ sd[p + f"attn.{c}.weight"].T for c in "qkv")
        q, k, v = (t.view(b, n, heads, -1) for t in (q, k, v))
        bias = sd[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)[None]
        bias = bias.masked_fill(mask.view(b, 1, 1, n) == 0, torch.finfo(x.dtype).min)
        attn = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k) + bias, dim=-1)
        x = x + torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, n, -1) @ sd[p + "attn.o.weight"].T
        h = norm(x, sd[p + "norm2.weight"])
        gate = F.gelu(h @ sd[p + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + ((h @ sd[p + "ffn.fc1.weight"].T) * gate) @ sd[p + "ffn.fc2.weight"].T
    return norm(x, sd["norm.weight"])


def test_loaded_t5_computes_what_the_official_encoder_computes(a14b):
    _, orig_dir = a14b
    c = load_components(orig_dir)
    tok = c.tokenizer(["a red fox jumps over the lazy dog in deep snow", "hi"], padding="max_length",
                      max_length=40, truncation=True, return_tensors="pt")
    with torch.no_grad():
        got = c.text_encoder(tok.input_ids, attention_mask=tok.attention_mask).last_hidden_state
    want = _official_t5_forward(torch.load(orig_dir / T5_FILE, weights_only=True), tok.input_ids, tok.attention_mask)
    assert tok.attention_mask.sum(1).tolist()[0] > 16  # long enough to reach the log-spaced buckets
    assert (got - want).abs().max().item() <= 1e-4


def test_wan_grpo_sample_runs_on_the_original_layout(a14b, tmp_path):
    """End to end through the CLI (inspect -> preset -> load -> wan_grpo's sampler): same latents."""
    from wan_grpo.cli import main

    def run(ckpt, name):
        out = tmp_path / f"{name}.safetensors"
        rc = main(["sample", "--ckpt_dir", str(ckpt), "--prompt", "a red fox", "--seed", "3",
                   "--sampling_steps", "4", "--size", "32*32", "--frame_num", "5", "--sample_shift", "5.0",
                   "--sample_solver", "euler", "--output", str(tmp_path / f"{name}.mp4"), "--save_latents", str(out)])
        assert rc == 0
        return load_file(str(out))["latents"]

    diff_dir, orig_dir = a14b
    a, b = run(diff_dir, "diffusers"), run(orig_dir, "original")
    assert (a - b).abs().max().item() <= 1e-5


def test_i2v_config_selects_the_i2v_boundary_shift_and_pipeline(a14b, tmp_path):
    _, orig_dir = a14b
    d = tmp_path / "i2v"
    shutil.copytree(orig_dir, d)
    for sub in ("high_noise_model", "low_noise_model"):
        cfg = json.loads((d / sub / "config.json").read_text())
        (d / sub / "config.json").write_text(json.dumps({**cfg, "model_type": "i2v"}))
    index = inspect_checkpoint(d)
    assert infer_task(index) == "i2v-A14B" and index["boundary_ratio"] == 0.9
    c = load_components(d, load_text_encoder=False)
    assert c.boundary_ratio == 0.9 and c.default_shift == 5.0 and not c.expand_timesteps
    out = convert(d, tmp_path / "i2v-diffusers")
    mi = json.loads((out / "model_index.json").read_text())
    assert mi["_class_name"] == "WanImageToVideoPipeline" and mi["boundary_ratio"] == 0.9
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["flow_shift"] == 5.0
    # one expert claiming another model type is refused
    cfg = json.loads((d / "low_noise_model" / "config.json").read_text())
    (d / "low_noise_model" / "config.json").write_text(json.dumps({**cfg, "model_type": "t2v"}))
    with pytest.raises(UserError, match="disagree on model_type"):
        inspect_checkpoint(d)
