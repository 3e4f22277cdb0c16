"""The DiT experts of the original layout: official config.json -> WanTransformer3DModel, streamed
one safetensors shard at a time (names through diffusers' own Wan converter)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from wan_grpo.errors import UserError
from wan_grpo.models.original.layout import expert_config, shard_files
from wan_grpo.models.original.state_dict import assign, cast, check_keys, empty, first, no_meta_left

log = logging.getLogger("wan_grpo")


def transformer_config(cfg: dict, text_dim: int = 4096) -> dict:
    """WanTransformer3DModel config from an official expert config.json.

    The official WanModel fixes patch (1, 2, 2), qk_norm (RMS over all heads), cross_attn_norm and
    text_dim 4096; Wan2.2 has no CLIP image branch (image_dim / added_kv_proj_dim None).
    """
    return {
        "patch_size": (1, 2, 2),
        "num_attention_heads": int(cfg["num_heads"]),
        "attention_head_dim": int(cfg["dim"]) // int(cfg["num_heads"]),
        "in_channels": int(cfg["in_dim"]),
        "out_channels": int(cfg["out_dim"]),
        "text_dim": int(text_dim),
        "freq_dim": int(cfg["freq_dim"]),
        "ffn_dim": int(cfg["ffn_dim"]),
        "num_layers": int(cfg["num_layers"]),
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "eps": float(cfg["eps"]),
        "image_dim": None,
        "added_kv_proj_dim": None,
        "rope_max_seq_len": 1024,
        "pos_embed_seq_len": None,
    }


def _dit_names(keys: list[str]) -> dict[str, str]:
    """{diffusers name: original name} through diffusers' own Wan converter (names only)."""
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers({k: k for k in keys})


def load_expert(expert_dir: str | Path, *, dtype: torch.dtype | None = torch.float32):
    """One WanTransformer3DModel from an original expert folder, streamed shard by shard."""
    from diffusers import WanTransformer3DModel
    from safetensors import safe_open

    expert_dir = Path(expert_dir)
    cfg = expert_config(expert_dir)
    shards, problems = shard_files(expert_dir)
    if problems:
        raise UserError(f"{expert_dir} is incomplete: missing {'; '.join(problems)}; re-download the checkpoint")

    # Pass 1: names and shapes only (no tensor data is read).
    per_shard: list[tuple[Path, dict[str, str]]] = []
    found: dict[str, tuple[str, tuple]] = {}
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"cannot read {shard}: {exc}; re-download that file") from exc
        names = _dit_names(list(shapes))
        dup = [orig for new, orig in names.items() if new in found]
        if dup:
            raise UserError(f"{shard}: key(s) {first(dup)} also appear in another shard; re-download the expert")
        for new, orig in names.items():
            found[new] = (orig, shapes[orig])
        per_shard.append((shard, names))

    text_key = "condition_embedder.text_embedder.linear_1.weight"
    text_dim = found[text_key][1][1] if text_key in found else 4096
    model = empty(WanTransformer3DModel, **transformer_config(cfg, text_dim))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    check_keys(expert_dir, "Wan2.2 DiT expert", expected, found)

    # Pass 2: one shard in memory at a time, assigned into the meta-initialised model.
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    for shard, names in per_shard:
        state = {}
        with safe_open(str(shard), framework="pt") as f:
            for new, orig in names.items():
                state[new] = cast(new, f.get_tensor(orig), dtype, keep)
        assign(model, state, what="DiT expert", source=shard)
        del state
    no_meta_left(model, expert_dir, "DiT expert")
    log.info("loaded %s (%d shard(s), %s)", expert_dir, len(shards), cfg["model_type"])
    return model.eval()
