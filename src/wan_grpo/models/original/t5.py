"""The official T5 (``models_t5_umt5-xxl-enc-bf16.pth``) -> transformers' UMT5EncoderModel."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from wan_grpo.errors import UserError
from wan_grpo.models.original.state_dict import assign, cast, check_keys, empty, no_meta_left, rename_unique, torch_load

# The official T5 (wan/modules/t5.py): T5RelativeEmbedding(max_dist=128), T5LayerNorm eps 1e-6,
# gated FFN ``fc2(fc1(x) * GELU_tanh(gate.0(x)))``.
T5_MAX_DISTANCE = 128
T5_LAYER_NORM_EPS = 1e-6

_T5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # GELU(tanh) branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def t5_key_to_transformers(key: str) -> str | None:
    """Official T5Encoder name -> transformers UMT5EncoderModel name (None: not a UMT5 encoder key)."""
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m and m.group(2) in _T5_BLOCK:
        return f"encoder.block.{m.group(1)}.{_T5_BLOCK[m.group(2)]}"
    return None


def t5_config(sd: dict, source: Path):
    """UMT5Config from tensor shapes (umt5-xxl: 4096 / 64 heads x 64 / 10240 / 24 layers / 32 buckets)."""
    from transformers import UMT5Config

    try:
        vocab, d_model = sd["token_embedding.weight"].shape
        num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
        inner = sd["blocks.0.attn.q.weight"].shape[0]
        d_ff = sd["blocks.0.ffn.fc1.weight"].shape[0]
    except KeyError as exc:
        raise UserError(
            f"{source} is not the UMT5-XXL encoder of the original Wan2.2 layout (no {exc.args[0]}); re-download it"
        ) from exc
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if inner % num_heads or layers != set(range(len(layers))):
        raise UserError(f"{source}: inconsistent T5 shapes (attention {inner} over {num_heads} heads, "
                        f"layers {sorted(layers)})")
    return UMT5Config(
        vocab_size=int(vocab),
        d_model=int(d_model),
        d_kv=int(inner // num_heads),
        d_ff=int(d_ff),
        num_layers=len(layers),
        num_heads=int(num_heads),
        relative_attention_num_buckets=int(num_buckets),
        relative_attention_max_distance=T5_MAX_DISTANCE,
        feed_forward_proj="gated-gelu",  # dense_act_fn gelu_new = tanh GELU, as the official GELU()
        layer_norm_epsilon=T5_LAYER_NORM_EPS,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=True,
        architectures=["UMT5EncoderModel"],
    )


def load_t5(path: str | Path, *, dtype: torch.dtype | None = torch.float32):
    """UMT5EncoderModel from the official ``models_t5_umt5-xxl-enc-bf16.pth``."""
    from transformers import UMT5EncoderModel

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing; download {path.name} from the same Wan-AI repository")
    sd = torch_load(path)
    config = t5_config(sd, path)
    names = rename_unique(sd, t5_key_to_transformers, path, "UMT5 text encoder")
    model = empty(UMT5EncoderModel, config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = ("encoder.embed_tokens.weight",)  # tied to shared.weight (the official token_embedding)
    found = {k: (o, tuple(sd[o].shape)) for k, o in names.items()}
    check_keys(path, "UMT5 text encoder", expected, found, optional=tied)
    keep = []
    if dtype == torch.float16:
        keep += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        keep += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    state = {k: cast(k, sd[o], dtype, keep) for k, o in names.items()}
    del sd
    assign(model, state, what="text encoder", source=path)
    del state
    model.tie_weights()
    no_meta_left(model, path, "text encoder")
    return model.eval()
