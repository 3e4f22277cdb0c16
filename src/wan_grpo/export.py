"""``wan-grpo export``: a train or sft checkpoint's LoRA in the format Wan users load.

``--format comfyui`` writes one safetensors file per trained expert in the original Wan key names
(``diffusion_model.blocks.N.self_attn.q.lora_A.weight``, ``...lora_B.weight`` and a ``...alpha``
scalar per layer, LoRA scale = alpha / rank), the format ComfyUI reads and diffusers'
``WanPipeline.load_lora_weights`` converts: ``high_noise_model_lora.safetensors`` for the
high-noise expert (``transformer``) and ``low_noise_model_lora.safetensors`` for the low-noise one
(``transformer_2``), named as the original checkpoint's expert folders. ``--format diffusers``
copies the checkpoint's diffusers-format expert folders. ``--format merged`` writes the whole
pipeline (diffusers layout, loadable by ``DiffusionPipeline.from_pretrained``) with the LoRA fused
into (or the full weights put in) each trained expert. Every export gets a model card (README.md).
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from wan_grpo.config import opt
from wan_grpo.errors import UserError
from wan_grpo.grpo.checkpoint import STATE_FILE, check_trained_checkpoint
from wan_grpo.model_card import model_card
from wan_grpo.models.files import LORA_FILE
from wan_grpo.specs import Expert

# diffusers module name inside a block -> the original WanModel's
_BLOCK_MODULES = {
    **{f"attn1.{d}": f"self_attn.{o}" for d, o in zip(("to_q", "to_k", "to_v", "to_out.0"), "qkvo")},
    **{f"attn2.{d}": f"cross_attn.{o}" for d, o in zip(("to_q", "to_k", "to_v", "to_out.0"), "qkvo")},
    "attn2.add_k_proj": "cross_attn.k_img", "attn2.add_v_proj": "cross_attn.v_img",
    "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2",
}
_KEY = re.compile(r"(?:transformer\.)?blocks\.(\d+)\.(.+)\.(lora_A|lora_B)\.weight")


@dataclass
class ExportConfig:
    checkpoint: str | None = opt(None, "A train or sft checkpoint folder (checkpoint-<step>).")
    format: str = opt("comfyui", "comfyui (original Wan key names, one file per expert, as ComfyUI and diffusers' "
                                 "load_lora_weights read them), diffusers (the expert folders as saved) or merged "
                                 "(the whole pipeline with the training fused into its experts).",
                      choices=("comfyui", "diffusers", "merged"))
    output: str | None = opt(None, "New folder for the exported files.")
    ckpt_dir: str | None = opt(None, "merged: the base model folder (diffusers layout). Default: the run's "
                                     "--ckpt_dir.")


def lora_alpha(path: Path) -> float:
    """The LoRA alpha a diffusers-format LoRA file was trained with (its adapter metadata)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        raise UserError(f"{path} carries no LoRA metadata (lora_alpha); export a checkpoint written by wan-grpo")
    config = {k.split(".", 1)[-1]: v for k, v in json.loads(raw).items()}
    if config.get("use_rslora") or config.get("alpha_pattern") or config.get("rank_pattern"):
        raise UserError(f"{path}: rsLoRA or per-layer ranks/alphas have no ComfyUI form; export --format diffusers")
    return float(config["lora_alpha"])


def to_original_keys(state: dict[str, torch.Tensor], alpha: float, *, source: Path) -> dict[str, torch.Tensor]:
    """diffusers LoRA tensors of one expert -> the original Wan names with an alpha per layer."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        match = _KEY.fullmatch(key)
        module = None if match is None else _BLOCK_MODULES.get(match[2])
        if module is None:
            raise UserError(f"{source}: the LoRA layer {key} has no ComfyUI name (only the blocks' attention and "
                            "feed-forward layers do); export --format diffusers, or train with the default "
                            "--lora_target_modules")
        prefix = f"diffusion_model.blocks.{match[1]}.{module}"
        out[f"{prefix}.{match[3]}.weight"] = tensor.contiguous()
        out[f"{prefix}.alpha"] = torch.tensor(alpha, dtype=tensor.dtype)
    return out


def export_comfyui(checkpoint: Path, output: Path) -> list[Path]:
    written = []
    for expert in Expert:
        lora = checkpoint / expert.diffusers_dir / LORA_FILE
        if not lora.is_file():
            if (checkpoint / expert.diffusers_dir).is_dir():
                raise UserError(f"{checkpoint / expert.diffusers_dir} holds full weights, not a LoRA; export "
                                "--format diffusers")
            continue
        with safe_open(str(lora), framework="pt") as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
        path = output / f"{expert.original_dir}_lora.safetensors"
        save_file(to_original_keys(state, lora_alpha(lora), source=lora), str(path),
                  metadata={"format": "pt", "wan_grpo_expert": expert.label})
        written.append(path)
    return written


def run_config(checkpoint: Path) -> dict:
    """The resolved config of the run that wrote ``checkpoint`` (saved in its training state)."""
    state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=False)
    return dict(state.get("config", {}))


def export_merged(checkpoint: Path, base: str | None, output: Path) -> list[str]:
    """The base pipeline with each trained expert's LoRA fused in (or its full weights put in), saved whole."""
    from diffusers import DiffusionPipeline, WanTransformer3DModel

    if not base or not (Path(base) / "model_index.json").is_file():
        raise UserError(f"--format merged needs the base model in the diffusers layout (got {base!r}); pass "
                        "--ckpt_dir, converting an original-layout folder first with wan-grpo convert")
    pipe = DiffusionPipeline.from_pretrained(base)
    adapters = []
    for expert in Expert:
        folder = checkpoint / expert.diffusers_dir
        if (folder / LORA_FILE).is_file():
            pipe.load_lora_weights(str(folder), adapter_name=expert.label,
                                   load_into_transformer_2=expert is Expert.LOW)
            adapters.append(expert)
        elif (folder / "config.json").is_file():
            model = getattr(pipe, expert.diffusers_dir)
            model.load_state_dict(WanTransformer3DModel.from_pretrained(folder).state_dict())
    for expert in adapters:
        pipe.fuse_lora(components=[expert.diffusers_dir], adapter_names=[expert.label])
    if adapters:
        pipe.unload_lora_weights()
    pipe.save_pretrained(str(output))
    return sorted(p.name + ("/" if p.is_dir() else "") for p in output.iterdir())


def run_export(cfg: ExportConfig) -> Path:
    if not cfg.checkpoint or not cfg.output:
        raise UserError("export needs --checkpoint CHECKPOINT_DIR and --output NEW_DIR")
    checkpoint = check_trained_checkpoint(cfg.checkpoint)
    output = Path(cfg.output)
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"--output {output} already exists and is not an empty folder; pass a new folder")
    if not any((checkpoint / e.diffusers_dir).is_dir() for e in Expert):
        raise UserError(f"{checkpoint} has no transformer/ or transformer_2/ folder; pass checkpoint-<step>")
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        config = run_config(checkpoint)
        if cfg.format == "comfyui":
            names = [p.name for p in export_comfyui(checkpoint, tmp)]
        elif cfg.format == "merged":
            names = export_merged(checkpoint, cfg.ckpt_dir or config.get("ckpt_dir"), tmp)
        else:
            names = []
            for expert in Expert:
                if (checkpoint / expert.diffusers_dir).is_dir():
                    shutil.copytree(checkpoint / expert.diffusers_dir, tmp / expert.diffusers_dir)
                    names.append(expert.diffusers_dir)
        step = int(checkpoint.name.rpartition("-")[2]) if checkpoint.name.rpartition("-")[2].isdigit() else 0
        (tmp / "README.md").write_text(model_card(config, step, kind=cfg.format, files=names))
        if output.exists():
            output.rmdir()
        tmp.rename(output)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"exported {', '.join(names)} to {output}")
    return output
