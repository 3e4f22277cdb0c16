"""Checkpoints: exported experts (diffusers formats), sharded training state (DCP), loop state.

Layout of ``SAVE_DIR/checkpoint-<step>/``:
  transformer/pytorch_lora_weights.safetensors   (LoRA; ``WanPipeline.load_lora_weights`` loads it)
  transformer_2/pytorch_lora_weights.safetensors (load with ``load_into_transformer_2=True``)
  transformer/ or transformer_2/ diffusers model folders (full fine-tuning)
  dcp/               trainable weights + optimizer via torch.distributed.checkpoint: resumable on
                     any number of processes (resharded on load)
  training_state.pt  LR schedule, RNG states, step, data position, counters

All ranks write their DCP shards into a temporary folder; rank 0 exports the gathered weights,
writes the loop state and renames the folder into place, so a checkpoint-<step> is complete.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from wan_grpo.distributed import all_reduce_sum, barrier
from wan_grpo.errors import UserError
from wan_grpo.models.denoiser import EXPERT_DIRS

STATE_FILE = "training_state.pt"
LORA_FILE = "pytorch_lora_weights.safetensors"
SHARDED = StateDictOptions(ignore_frozen_params=True, strict=False)
GATHERED = StateDictOptions(ignore_frozen_params=True, full_state_dict=True, cpu_offload=True)


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


def _export_expert(expert, weights: dict[str, torch.Tensor], folder: Path, *, lora: bool) -> None:
    """``weights``: the expert's gathered trainable tensors, keyed as in expert.state_dict()."""
    folder.mkdir(parents=True)
    if lora:
        from diffusers import WanPipeline
        from peft.utils import get_peft_model_state_dict

        metadata = expert.peft_config["default"].to_dict()
        metadata["target_modules"] = sorted(metadata["target_modules"])  # peft keeps a set: same bytes every run
        WanPipeline.save_lora_weights(
            folder,
            transformer_lora_layers=get_peft_model_state_dict(expert, state_dict=weights),
            transformer_lora_adapter_metadata=metadata,
        )
    else:
        expert.save_config(folder)
        save_file({k: v.contiguous() for k, v in weights.items()}, folder / "diffusion_pytorch_model.safetensors")


def _all_finite(policy) -> bool:
    bad = 0
    for params in policy.params.values():
        for p in params:
            local = p.to_local() if hasattr(p, "to_local") else p
            bad += int(not bool(torch.isfinite(local).all()))
    return int(all_reduce_sum(torch.tensor([bad]))[0]) == 0


def save_checkpoint(save_dir: str | Path, step: int, policy, state: dict, *, is_main: bool = True) -> Path:
    """Write checkpoint-<step> atomically (every rank calls this) and return its path."""
    if not _all_finite(policy):
        raise RuntimeError(f"refusing to save checkpoint {step}: non-finite weights")
    save_dir = Path(save_dir)
    final = save_dir / f"checkpoint-{step}"
    tmp = save_dir / f".checkpoint-{step}.tmp"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    modules = policy.modules()
    model_sd, optim_sd = get_state_dict(modules, policy.optimizer, options=SHARDED)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp / "dcp"))
    gathered = get_model_state_dict(modules, options=GATHERED)  # a collective: every rank joins
    if is_main:
        for idx, expert in policy.experts.items():
            prefix = f"{idx}."
            weights = {k[len(prefix):]: v for k, v in gathered.items() if k.startswith(prefix)}
            _export_expert(expert, weights, tmp / EXPERT_DIRS[idx], lora=policy.lora)
        payload = {**state, "step": step, "scheduler": policy.scheduler.state_dict(), "rng": rng_state(),
                   "lora": policy.lora, "experts": sorted(policy.experts)}
        torch.save(payload, tmp / STATE_FILE)
        if final.exists():
            old = save_dir / f".checkpoint-{step}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    barrier()
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


def check_resumable(path: Path, cfg) -> None:
    """One-line error, before any model loads, when ``cfg`` trains other parameters than ``path`` holds."""
    from wan_grpo.grpo.policy import expert_names, lora_targets

    saved = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False).get("config", {})
    checks = [("lora_rank", lambda c: int(c["lora_rank"])),
              ("train_experts", lambda c: sorted(expert_names(c["train_experts"])))]
    if cfg.lora_rank > 0 and saved.get("lora_rank", 0) > 0:
        checks += [("lora_alpha", lambda c: float(c["lora_alpha"])),
                   ("lora_target_modules", lambda c: lora_targets(c["lora_target_modules"]))]
    for flag, norm in checks:
        if flag in saved and norm(saved) != norm(vars(cfg)):
            raise UserError(f"--{flag} {getattr(cfg, flag)!r} differs from {path}'s {saved[flag]!r}; resume with "
                            f"--{flag} {saved[flag]} or start a new --save_dir")


def load_checkpoint(path: Path, policy) -> dict:
    """Restore trainable weights, optimizer, LR schedule and RNG on any number of processes."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    if state["lora"] != policy.lora or state["experts"] != sorted(policy.experts):
        raise UserError(f"{path} was saved with other --lora_rank/--train_experts settings; match them to resume")
    modules = policy.modules()
    model_sd, optim_sd = get_state_dict(modules, policy.optimizer, options=SHARDED)
    to_load = {"model": model_sd, "optim": optim_sd}
    dcp.load(to_load, checkpoint_id=str(path / "dcp"))
    set_state_dict(modules, policy.optimizer, model_state_dict=to_load["model"],
                   optim_state_dict=to_load["optim"], options=SHARDED)
    policy.scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return state
