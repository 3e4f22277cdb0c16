"""Load a Wan2.2 checkpoint directory: diffusers format (model_index.json at its root) or the
original Wan-AI release layout (see ``wan_grpo.models.original``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKLWan, WanTransformer3DModel

from wan_grpo.errors import UserError
from wan_grpo.models.components import WanComponents
from wan_grpo.models.files import read_json
from wan_grpo.models.original import (
    ORIGINAL_LAYOUT_HELP,
    describe_dir,
    expert_config,
    inspect_original,
    is_original_layout,
    load_expert,
    load_t5,
    load_vae,
)
from wan_grpo.specs import PRESETS, Expert, infer_task

WAN_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline")


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
    index = read_json(index_path)
    cls = index.get("_class_name")
    if cls not in WAN_PIPELINES:
        raise UserError(
            f"{root} holds a {cls!r} pipeline, not Wan2.2 ({' or '.join(WAN_PIPELINES)}); pass a Wan2.2 checkpoint"
        )
    for sub in ("vae",):
        if not (root / sub / "config.json").is_file():
            raise UserError(f"{root / sub} is missing or has no config.json; re-download the checkpoint")
    if not any((root / e.diffusers_dir / "config.json").is_file() for e in Expert):
        raise UserError(f"{root} has neither transformer/ nor transformer_2/ with a config.json; re-download it")
    return index


@dataclass(frozen=True)
class ModelInfo:
    """What settings are checked against, read from a checkpoint's config files (no weights)."""

    task: str  # the preset it most likely belongs to
    has_high: bool  # transformer (or the dense model)
    has_low: bool  # transformer_2
    boundary_ratio: float | None
    expand_timesteps: bool
    in_channels: int
    z_dim: int
    default_shift: float  # the scheduler config's (original layout: the official) shift
    num_train_timesteps: int = 1000


def checkpoint_info(ckpt_dir: str | Path) -> ModelInfo:
    """``ModelInfo`` of either layout, validating it as ``inspect_checkpoint`` does."""
    root = Path(ckpt_dir)
    index = inspect_checkpoint(root)
    task = infer_task(index)
    if index.get("_layout") == "original":
        first = expert_config(Path(next(iter(index["experts"].values()))))
        return ModelInfo(task=task, has_high="high" in index["experts"],
                         has_low="low" in index["experts"], boundary_ratio=index["boundary_ratio"],
                         expand_timesteps=index["expand_timesteps"], in_channels=int(first["in_dim"]),
                         z_dim=int(first["out_dim"]), default_shift=PRESETS[task].shift)
    present = [_has_expert(root, index, e) for e in Expert]
    expert_cfg = read_json(root / (Expert.HIGH if present[Expert.HIGH] else Expert.LOW).diffusers_dir / "config.json")
    scheduler_path = root / "scheduler" / "scheduler_config.json"
    scheduler = read_json(scheduler_path) if scheduler_path.is_file() else {}
    return ModelInfo(task=task, has_high=present[Expert.HIGH], has_low=present[Expert.LOW],
                     boundary_ratio=index.get("boundary_ratio"), expand_timesteps=bool(index.get("expand_timesteps")),
                     in_channels=int(expert_cfg["in_channels"]),
                     z_dim=int(read_json(root / "vae" / "config.json").get("z_dim", 16)),
                     default_shift=scheduler_shift(scheduler),
                     num_train_timesteps=int(scheduler.get("num_train_timesteps", 1000)))


def text_length(tokenizer_dir: Path) -> int:
    """Tokens per prompt embedding: 512 (Wan2.2's text_len) unless the tokenizer's config sets a smaller
    model_max_length (the Shapes model uses 16: its prompts are short and padding costs compute)."""
    path = tokenizer_dir / "tokenizer_config.json"
    limit = read_json(path).get("model_max_length", 512) if path.is_file() else 512
    return int(min(512, limit)) if isinstance(limit, (int, float)) and limit >= 1 else 512


def scheduler_shift(scheduler_config: dict) -> float:
    """UniPC configs carry flow_shift, FlowMatchEuler configs carry shift."""
    return float(scheduler_config.get("flow_shift", scheduler_config.get("shift", 5.0)))


def _has_expert(root: Path, index: dict, expert: Expert) -> bool:
    sub = expert.diffusers_dir
    return index.get(sub, [None, None])[0] is not None and (root / sub / "config.json").is_file()


def text_encoder_paths(ckpt_dir: str | Path) -> tuple[Path, Path]:
    """(tokenizer folder, text encoder folder or .pth) of a checkpoint in either layout."""
    index = inspect_checkpoint(ckpt_dir)
    if index.get("_layout") == "original":
        return Path(index["tokenizer"]), Path(index["text_encoder"])
    return Path(ckpt_dir) / "tokenizer", Path(ckpt_dir) / "text_encoder"


def load_tokenizer_and_encoder(ckpt_dir: str | Path, *, dtype: torch.dtype | None):
    """(tokenizer, UMT5 encoder) of a checkpoint in either layout: a diffusers folder or Wan's T5 .pth."""
    from transformers import AutoTokenizer, UMT5EncoderModel

    tokenizer_dir, encoder = text_encoder_paths(ckpt_dir)
    for path in (tokenizer_dir, encoder):
        if not path.exists():
            raise UserError(f"{path} is missing; download it from the checkpoint's repository")
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if encoder.is_file():
        return tokenizer, load_t5(encoder, dtype=dtype)
    return tokenizer, UMT5EncoderModel.from_pretrained(encoder, torch_dtype=dtype).eval()


def load_components(
    ckpt_dir: str | Path,
    *,
    dtype: torch.dtype | None = torch.float32,
    vae_dtype: torch.dtype | None = torch.float32,
    load_text_encoder: bool = True,
) -> WanComponents:
    """Load the experts, VAE, text encoder and tokenizer of a Wan2.2 directory (either layout).

    ``dtype`` applies to the experts and the text encoder; modules diffusers keeps in fp32
    (``_keep_in_fp32_modules``) stay fp32 in both layouts, as ``from_pretrained`` keeps them.
    """
    root = Path(ckpt_dir)
    index = inspect_checkpoint(root)
    text_encoder = tokenizer = None
    if load_text_encoder:
        tokenizer, text_encoder = load_tokenizer_and_encoder(root, dtype=dtype)
    if index.get("_layout") == "original":
        # The original layout states no boundary, shift or scheduler: they are the official ones.
        task = infer_task(index)
        experts = {name: load_expert(d, dtype=dtype) for name, d in index["experts"].items()}
        return WanComponents(
            transformer=experts.get("high"),
            transformer_2=experts.get("low"),
            vae=load_vae(index["vae"], dtype=vae_dtype),
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            boundary_ratio=index["boundary_ratio"],
            expand_timesteps=index["expand_timesteps"],
            scheduler_config={},
            default_shift=PRESETS[task].shift,
            source=str(root),
        )

    def expert(e: Expert):
        if not _has_expert(root, index, e):
            return None
        return WanTransformer3DModel.from_pretrained(root, subfolder=e.diffusers_dir, torch_dtype=dtype)

    scheduler_path = root / "scheduler" / "scheduler_config.json"
    scheduler_config = read_json(scheduler_path) if scheduler_path.is_file() else {}
    components = WanComponents(
        transformer=expert(Expert.HIGH),
        transformer_2=expert(Expert.LOW),
        vae=AutoencoderKLWan.from_pretrained(root, subfolder="vae", torch_dtype=vae_dtype).eval(),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        boundary_ratio=index.get("boundary_ratio"),
        expand_timesteps=bool(index.get("expand_timesteps", False)),
        scheduler_config=scheduler_config,
        default_shift=scheduler_shift(scheduler_config),
        source=str(root),
        text_len=text_length(root / "tokenizer"),
    )
    if components.transformer_2 is not None and components.boundary_ratio is None:
        raise UserError(f"{root}/model_index.json has transformer_2 but no boundary_ratio; add it (0.875 for T2V)")
    return components
