"""``--init_lora PATH[,PATH2]``: start from an existing LoRA per expert (high-noise first).

A path is a checkpoint's expert folder, a diffusers LoRA file, or a ComfyUI/original-format file
(``diffusion_model.blocks.N.self_attn.q.lora_A.weight`` ..., converted by diffusers'
``WanPipeline.lora_state_dict``, which folds each layer's alpha / rank into the weights).

- ``--init_lora_mode fuse``: the LoRA is fused into the frozen expert before training starts (how a
  distilled few-step LoRA makes rollouts cheap); training then adds its own adapter or trains the
  fused weights.
- ``--init_lora_mode train``: the LoRA is the trainable adapter's initial value (same rank as
  --lora_rank; its scale alpha / rank is carried over whatever --lora_alpha is).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from wan_grpo.errors import UserError
from wan_grpo.models.files import LORA_FILE
from wan_grpo.specs import Expert


def init_lora_paths(spec: str | None, experts: list[Expert]) -> dict[Expert, Path]:
    """--init_lora as {expert: file}: one path for one trained expert, or high,low for two."""
    if not spec:
        return {}
    paths = [Path(p.strip()) for p in spec.split(",") if p.strip()]
    if len(paths) != len(experts):
        raise UserError(f"--init_lora names {len(paths)} LoRA(s) for {len(experts)} trained expert(s) "
                        f"({', '.join(e.label for e in experts)}); give one path per expert, high-noise first")
    return {expert: _lora_file(path) for expert, path in zip(experts, paths)}


def check_files(spec: str | None) -> None:
    """Before anything loads: every --init_lora path exists."""
    for part in (p.strip() for p in (spec or "").split(",") if p.strip()):
        _lora_file(Path(part))


def _lora_file(path: Path) -> Path:
    """The LoRA file a --init_lora path names: the file itself, or a folder's pytorch_lora_weights.safetensors."""
    file = path / LORA_FILE if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"--init_lora {path} does not exist or holds no {LORA_FILE}; pass a LoRA file or a "
                        "checkpoint's expert folder")
    return file


def read_lora(file: Path) -> tuple[dict[str, torch.Tensor], float]:
    """(state dict keyed as the expert's modules, e.g. blocks.0.attn1.to_q.lora_A.weight; LoRA scale)."""
    from diffusers import WanPipeline

    try:
        state, metadata = WanPipeline.lora_state_dict(str(file), return_lora_metadata=True)
    except Exception as exc:  # noqa: BLE001 - an unreadable or foreign file is the user's to fix
        raise UserError(f"--init_lora {file}: not a Wan LoRA diffusers can read ({str(exc).splitlines()[0]})") \
            from None
    state = {k.removeprefix("transformer."): v for k, v in state.items()}
    scale = 1.0  # original-format files arrive with alpha / rank folded into the weights
    if metadata:
        config = {k.split(".", 1)[-1]: v for k, v in (json.loads(metadata) if isinstance(metadata, str)
                                                         else metadata).items()}
        if "lora_alpha" in config and "r" in config:
            scale = float(config["lora_alpha"]) / float(config["r"])
    return state, scale


@torch.no_grad()
def fuse_into(expert, file: Path) -> None:
    """Fuse the LoRA in ``file`` into ``expert``'s weights and drop the adapter."""
    state, scale = read_lora(file)
    _check_targets(expert, state, file)
    # loaded without metadata, the adapter's alpha is its rank (scale 1): the file's scale goes into B
    state = {k: v * scale if ".lora_B." in k else v for k, v in state.items()}
    expert.load_lora_adapter({f"transformer.{k}": v for k, v in state.items()}, prefix="transformer",
                             adapter_name="init_lora")
    expert.fuse_lora(adapter_names=["init_lora"])
    expert.unload_lora()  # keeps the fused weights, removes the LoRA layers


@torch.no_grad()
def copy_into_adapter(expert, file: Path, *, rank: int, alpha: float) -> None:
    """Set the trainable ("default") adapter of ``expert`` to the LoRA in ``file``."""
    state, scale = read_lora(file)
    ours = alpha / rank
    seen = set()
    for name, module in expert.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        a, b = state.get(f"{name}.lora_A.weight"), state.get(f"{name}.lora_B.weight")
        if a is None or b is None:
            continue
        if a.shape[0] != rank:
            raise UserError(f"--init_lora {file} has rank {a.shape[0]}; train it with --lora_rank {a.shape[0]}")
        module.lora_A["default"].weight.copy_(a)
        module.lora_B["default"].weight.copy_(b * (scale / ours))
        seen.add(name)
    missing = {k.rsplit(".lora_", 1)[0] for k in state} - seen
    if missing:
        raise UserError(f"--init_lora {file} adapts {len(missing)} layer(s) the trainable LoRA does not, e.g. "
                        f"{sorted(missing)[0]}; match --lora_target_modules to it")


def _check_targets(expert, state: dict, file: Path) -> None:
    names = {n for n, _ in expert.named_modules()}
    unknown = sorted({k.rsplit(".lora_", 1)[0] for k in state} - names)
    if unknown:
        raise UserError(f"--init_lora {file} adapts layers this model does not have, e.g. {unknown[0]}; pass a LoRA "
                        "of this Wan2.2 model")
