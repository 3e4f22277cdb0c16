"""Load a Wan2.2 checkpoint directory: diffusers format (model_index.json at its root) or the
original Wan-AI release layout (see ``wan_grpo.models.original``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from wan_grpo.errors import UserError
from wan_grpo.models.components import WanComponents
from wan_grpo.models.original import (
    ORIGINAL_LAYOUT_HELP,
    describe_dir,
    inspect_original,
    is_original_layout,
    load_original_components,
)

WAN_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline")
HIGH_NOISE_DIR, LOW_NOISE_DIR = "transformer", "transformer_2"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}; re-download that file") from exc


def inspect_checkpoint(ckpt_dir: str | Path) -> dict:
    """Validate the layout and return model_index.json, with a fix-naming error for anything else.

    For the original Wan-AI layout the returned dict is built by ``inspect_original`` and carries
    ``_layout: "original"`` besides the model_index.json fields that matter here.
    """
    root = Path(ckpt_dir)
    if not root.is_dir():
        raise UserError(f"--ckpt_dir {root} does not exist; pass the folder that holds model_index.json")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        if is_original_layout(root):
            return inspect_original(root)
        raise UserError(
            f"{root} is not a Wan2.2 checkpoint (no model_index.json). Expected the diffusers layout "
            "(model_index.json, transformer/ and/or transformer_2/, vae/, text_encoder/, tokenizer/) or "
            f"{ORIGINAL_LAYOUT_HELP}; found: {describe_dir(root)}; pass a diffusers-format Wan2.2 folder "
            "or an original-layout one"
        )
    index = _read_json(index_path)
    cls = index.get("_class_name")
    if cls not in WAN_PIPELINES:
        raise UserError(
            f"{root} holds a {cls!r} pipeline, not Wan2.2 ({' or '.join(WAN_PIPELINES)}); pass a Wan2.2 checkpoint"
        )
    for sub in ("vae",):
        if not (root / sub / "config.json").is_file():
            raise UserError(f"{root / sub} is missing or has no config.json; re-download the checkpoint")
    if not any((root / d / "config.json").is_file() for d in (HIGH_NOISE_DIR, LOW_NOISE_DIR)):
        raise UserError(f"{root} has neither transformer/ nor transformer_2/ with a config.json; re-download it")
    return index


def load_components(
    ckpt_dir: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    load_text_encoder: bool = True,
) -> WanComponents:
    """Load the experts, VAE, text encoder and tokenizer of a Wan2.2 directory (either layout)."""
    root = Path(ckpt_dir)
    index = inspect_checkpoint(root)
    if index.get("_layout") == "original":
        return load_original_components(
            root, dtype=dtype, vae_dtype=vae_dtype, load_text_encoder=load_text_encoder, layout=index
        )

    def expert(sub: str):
        if index.get(sub, [None, None])[0] is None or not (root / sub / "config.json").is_file():
            return None
        return WanTransformer3DModel.from_pretrained(root, subfolder=sub, torch_dtype=dtype)

    text_encoder = tokenizer = None
    if load_text_encoder:
        from wan_grpo.models.text import load_tokenizer_and_encoder

        tokenizer, text_encoder = load_tokenizer_and_encoder(root / "tokenizer", root / "text_encoder", dtype=dtype)

    scheduler_path = root / "scheduler" / "scheduler_config.json"
    scheduler_config = _read_json(scheduler_path) if scheduler_path.is_file() else {}
    # UniPC configs carry flow_shift, FlowMatchEuler configs carry shift.
    default_shift = float(scheduler_config.get("flow_shift", scheduler_config.get("shift", 5.0)))

    components = WanComponents(
        transformer=expert(HIGH_NOISE_DIR),
        transformer_2=expert(LOW_NOISE_DIR),
        vae=AutoencoderKLWan.from_pretrained(root, subfolder="vae", torch_dtype=vae_dtype).eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        boundary_ratio=index.get("boundary_ratio"),
        expand_timesteps=bool(index.get("expand_timesteps", False)),
        scheduler_config=scheduler_config,
        default_shift=default_shift,
        source=str(root),
    )
    if components.transformer_2 is not None and components.boundary_ratio is None:
        raise UserError(f"{root}/model_index.json has transformer_2 but no boundary_ratio; add it (0.875 for T2V)")
    return components
