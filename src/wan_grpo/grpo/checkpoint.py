"""Checkpoints: trained experts (LoRA in diffusers' format, or full diffusers folders) + training state.

Layout of ``SAVE_DIR/checkpoint-<step>/``:
  transformer/pytorch_lora_weights.safetensors   (LoRA; ``WanPipeline.load_lora_weights`` loads it)
  transformer_2/pytorch_lora_weights.safetensors (load with ``load_into_transformer_2=True``)
  transformer/ or transformer_2/ diffusers model folders (full fine-tuning)
  training_state.pt  optimizer, LR schedule, RNG states, step, data position, counters

A checkpoint is written to a temporary folder and renamed into place, so a folder named
checkpoint-<step> is always complete.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from wan_grpo.errors import UserError

EXPERT_DIRS = ("transformer", "transformer_2")
STATE_FILE = "training_state.pt"
LORA_FILE = "pytorch_lora_weights.safetensors"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_expert(expert, folder: Path, *, lora: bool) -> None:
    if lora:
        from diffusers import WanPipeline
        from peft.utils import get_peft_model_state_dict

        folder.mkdir(parents=True)
        WanPipeline.save_lora_weights(
            folder,
            transformer_lora_layers=get_peft_model_state_dict(expert),
            transformer_lora_adapter_metadata=expert.peft_config["default"].to_dict(),
        )
    else:
        expert.save_pretrained(folder, safe_serialization=True)


def save_checkpoint(save_dir: str | Path, step: int, policy, state: dict) -> Path:
    """Write checkpoint-<step> atomically and return its path."""
    for idx, params in policy.params.items():
        if not all(torch.isfinite(p).all() for p in params):
            raise RuntimeError(f"refusing to save checkpoint {step}: non-finite weights in {EXPERT_DIRS[idx]}")
    save_dir = Path(save_dir)
    final = save_dir / f"checkpoint-{step}"
    tmp = save_dir / f".checkpoint-{step}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for idx, expert in policy.experts.items():
        _save_expert(expert, tmp / EXPERT_DIRS[idx], lora=policy.lora)
    payload = {
        **state,
        "step": step,
        "optimizer": policy.optimizer.state_dict(),
        "scheduler": policy.scheduler.state_dict(),
        "rng": rng_state(),
        "lora": policy.lora,
        "experts": sorted(policy.experts),
    }
    torch.save(payload, tmp / STATE_FILE)
    if final.exists():
        old = save_dir / f".checkpoint-{step}.old{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    return final


def latest_checkpoint(save_dir: str | Path) -> Path | None:
    found = []
    for p in Path(save_dir).glob("checkpoint-*"):
        m = re.fullmatch(r"checkpoint-(\d+)", p.name)
        if m and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def resolve_resume(resume: str | None, save_dir: str | Path) -> Path | None:
    if not resume:
        return None
    if resume == "auto":
        return latest_checkpoint(save_dir)
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise UserError(f"--resume {path} is not a complete checkpoint (no {STATE_FILE}); pass checkpoint-<step> "
                        "or --resume auto")
    return path


def load_expert_weights(expert, folder: Path, *, lora: bool) -> None:
    if lora:
        from peft.utils import set_peft_model_state_dict

        state = load_file(folder / LORA_FILE)
        state = {k.removeprefix("transformer."): v for k, v in state.items()}
        result = set_peft_model_state_dict(expert, state)
        if getattr(result, "unexpected_keys", None):
            raise UserError(f"{folder / LORA_FILE} does not match --lora_rank/--lora_target_modules of this run")
    else:
        from diffusers import WanTransformer3DModel

        loaded = WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.float32)
        expert.load_state_dict(loaded.state_dict())


def load_checkpoint(path: Path, policy) -> dict:
    """Restore weights, optimizer, LR schedule and RNG; return the saved state dict."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if state["lora"] != policy.lora or state["experts"] != sorted(policy.experts):
        raise UserError(f"{path} was saved with other --lora_rank/--train_experts settings; match them to resume")
    for idx, expert in policy.experts.items():
        load_expert_weights(expert, path / EXPERT_DIRS[idx], lora=policy.lora)
    policy.optimizer.load_state_dict(state["optimizer"])
    policy.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
