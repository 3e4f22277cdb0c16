"""Small helpers every loader shares: reading a config file, and diffusers' keep-in-fp32 rule."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from wan_grpo.errors import UserError

LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name for a saved LoRA adapter


def read_json(path: Path) -> dict:
    """A JSON file's content; an unreadable or malformed file is a UserError naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}; re-download that file") from exc


def keeps_fp32(name: str, keep) -> bool:
    """diffusers' rule (``load_model_dict_into_meta``): a parameter stays fp32 when one of the dotted
    parts of its name is a module named in ``_keep_in_fp32_modules``."""
    parts = name.split(".")
    return any(module in parts for module in keep)


def cast_keeping_fp32(model, dtype: torch.dtype) -> None:
    """Cast a loaded model to ``dtype`` in place, keeping its ``_keep_in_fp32_modules`` in float32."""
    if dtype == torch.float32:
        return
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
        if tensor.is_floating_point():
            tensor.data = tensor.data.to(torch.float32 if keeps_fp32(name, keep) else dtype)
