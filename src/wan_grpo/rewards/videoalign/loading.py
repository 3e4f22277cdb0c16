"""Load a released VideoReward directory (model_config.json + checkpoint-*/) into a ready-to-score model.

Layout: ``model_config.json`` (data_config, model_config, peft_lora_config, inference_config) and
``checkpoint-<step>/`` holding either ``model.pth`` (the whole PEFT state dict, LoRA unmerged, in
transformers-4.45 key names) or ``adapter_model.safetensors`` + ``non_lora_state_dict.pth``. The
newest step is used. The Qwen2-VL-2B-Instruct base supplies the config, tokenizer and (for the
fallback files only) the weights the checkpoint does not carry.
"""

from __future__ import annotations

import ast
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wan_grpo.errors import UserError
from wan_grpo.rewards.videoalign.model import REWARD_TOKENS, VideoRewardModel

log = logging.getLogger("wan_grpo")
PEFT_PREFIX = "base_model.model."
SUPPORTED = {"prompt_template_type": "detailed_special", "reward_token": "special"}


@dataclass
class VideoReward:
    model: VideoRewardModel
    tokenizer: object
    inference_config: dict | None  # VQ_mean, VQ_std, ... for the official normalisation
    data_config: dict
    checkpoint: Path


def read_model_config(root: Path) -> dict:
    path = root / "model_config.json"
    if not path.is_file():
        raise UserError(f"{path} is missing; --reward_model_path must be the VideoReward folder that holds "
                        "model_config.json and checkpoint-*/")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); re-download it") from exc
    for section in ("data_config", "model_config", "peft_lora_config"):
        if not isinstance(cfg.get(section), dict):
            raise UserError(f"{path} has no {section!r} section; it is not a VideoReward model_config.json")
    data, model = cfg["data_config"], cfg["model_config"]
    if data.get("prompt_template_type") != SUPPORTED["prompt_template_type"] or \
            model.get("reward_token") != SUPPORTED["reward_token"] or not model.get("use_special_tokens"):
        raise UserError(f"{path}: only the released VideoReward setup is supported (prompt_template_type "
                        f"'detailed_special', reward_token 'special', use_special_tokens true)")
    if data.get("num_frames") is not None:
        raise UserError(f"{path}: data_config.num_frames {data['num_frames']!r} (a fixed frame count) is not "
                        "supported; the released VideoReward samples at data_config.fps (num_frames null)")
    if list(data.get("eval_dim", [])) != ["VQ", "MQ", "TA"]:
        raise UserError(f"{path}: data_config.eval_dim must be ['VQ', 'MQ', 'TA'], got {data.get('eval_dim')!r}")
    return cfg


def newest_checkpoint(root: Path) -> Path:
    steps = []
    for d in root.glob("checkpoint-*"):
        suffix = d.name.split("-", 1)[1]
        if d.is_dir() and suffix.isdigit():
            steps.append((int(suffix), d))
    if not steps:
        raise UserError(f"{root} has no checkpoint-<step>/ folder; download the VideoReward checkpoint into it")
    return max(steps)[1]


def resolve_base(model_config: dict, override: str | None) -> Path:
    """--videoalign_base, else model_config's model_name_or_path when it is a local folder."""
    name = override or model_config.get("model_name_or_path")
    path = Path(name) if name else None
    if path is None or not path.is_dir():
        raise UserError(
            f"the Qwen2-VL base {name!r} is not a local folder and there is no model hub here; download "
            "Qwen/Qwen2-VL-2B-Instruct (config, tokenizer, weights) and pass --videoalign_base PATH")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json; --videoalign_base must be a Qwen2-VL-2B-Instruct folder")
    return path


def to_current_keys(state: dict[str, torch.Tensor], prefix: str = PEFT_PREFIX) -> dict[str, torch.Tensor]:
    """transformers-4.45 Qwen2-VL names -> transformers >= 4.52 (model.visual / model.language_model)."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            raise UserError(f"unexpected key {key!r} in {'the VideoReward checkpoint' if prefix else 'the base'}; "
                            "it is not in the released layout")
        rest = key[len(prefix):]
        if rest.startswith("visual."):
            rest = "model." + rest
        elif rest.startswith("model.") and not rest.startswith(("model.visual.", "model.language_model.")):
            rest = "model.language_model." + rest[len("model."):]
        out[prefix + rest] = value
    return out


def load_base_weights(model: VideoRewardModel, base: Path) -> None:
    """The base's safetensors shards, one at a time, in either key layout; only rm_head may be missing.

    (transformers' from_pretrained on a subclass does not remap the hub's old names and would leave
    the LLM randomly initialised.)
    """
    from safetensors.torch import load_file

    shards = sorted(base.glob("*.safetensors"))
    if not shards:
        raise UserError(f"{base} has no *.safetensors weights; download Qwen2-VL-2B-Instruct completely")
    seen, unexpected = set(), set()
    for shard in shards:
        part = to_current_keys(load_file(shard), prefix="")
        result = model.load_state_dict(part, strict=False)
        unexpected |= set(result.unexpected_keys)
        seen |= set(part) - unexpected
        del part
    tied = getattr(model.config, "tie_word_embeddings", False)
    allowed = {"rm_head.weight"} | ({"lm_head.weight"} if tied else set())
    _check_keys(set(model.state_dict()) - seen - allowed, unexpected, str(base))


def _with_adapter_name(state: dict[str, torch.Tensor], name: str = "default") -> dict[str, torch.Tensor]:
    """PEFT's saved adapter files drop the adapter name: ``lora_A.weight`` -> ``lora_A.default.weight``."""
    out = {}
    for key, value in state.items():
        for part in ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"):
            key = key.replace(f".{part}.weight", f".{part}.{name}.weight")
            if key.endswith(f".{part}"):
                key = f"{key}.{name}"
        out[key] = value
    return out


def lora_targets(model: nn.Module, exclude: list[str], num_lora_modules: int = -1) -> list[str]:
    """VideoAlign's rule: every Linear/Embedding whose name contains none of ``exclude``."""
    names = [n for n, m in model.named_modules()
             if isinstance(m, (nn.Linear, nn.Embedding)) and not any(x in n for x in exclude)]
    return names[-num_lora_modules:] if num_lora_modules > 0 else names


def _check_keys(missing, unexpected, where: str) -> None:
    if missing or unexpected:
        raise UserError(f"{where} does not match VideoReward on this Qwen2-VL base: missing {sorted(missing)[:5]} "
                        f"({len(missing)}), unexpected {sorted(unexpected)[:5]} ({len(unexpected)}); check "
                        "--videoalign_base is Qwen2-VL-2B-Instruct and the checkpoint is complete")


def load_videoreward(model_path: str | Path, *, base: str | None = None, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> VideoReward:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoTokenizer

    root = Path(model_path)
    if not root.is_dir():
        raise UserError(f"--reward_model_path {root} does not exist; pass the downloaded VideoReward folder")
    cfg = read_model_config(root)
    ckpt = newest_checkpoint(root)
    base_path = resolve_base(cfg["model_config"], base)
    full = ckpt / "model.pth"
    adapter, non_lora = ckpt / "adapter_model.safetensors", ckpt / "non_lora_state_dict.pth"
    if not full.is_file() and not (adapter.is_file() and non_lora.is_file()):
        raise UserError(f"{ckpt} holds neither model.pth nor adapter_model.safetensors + non_lora_state_dict.pth; "
                        "re-download the checkpoint")

    tokenizer = AutoTokenizer.from_pretrained(base_path, padding_side="right")
    tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    output_dim = int(cfg["model_config"].get("output_dim", 1))
    if full.is_file():  # every weight comes from model.pth: build the architecture only
        model = VideoRewardModel(AutoConfig.from_pretrained(base_path), output_dim=output_dim).float()
    else:  # the fallback files carry the trained parts; the rest is the base's
        model = VideoRewardModel(AutoConfig.from_pretrained(base_path), output_dim=output_dim).float()
        load_base_weights(model, base_path)
    model.resize_token_embeddings(len(tokenizer))
    model.reward_token_ids = tuple(tokenizer.convert_tokens_to_ids(list(REWARD_TOKENS)))
    model.config.pad_token_id = tokenizer.pad_token_id

    peft_cfg = cfg["peft_lora_config"]
    if peft_cfg.get("lora_enable", True):
        exclude = peft_cfg.get("lora_namespan_exclude") or []
        exclude = list(ast.literal_eval(exclude) if isinstance(exclude, str) else exclude)
        if not peft_cfg.get("vision_lora", False) and "visual" not in exclude:
            exclude.append("visual")
        model = get_peft_model(model, LoraConfig(
            target_modules=lora_targets(model, exclude, int(peft_cfg.get("num_lora_modules", -1))),
            r=peft_cfg["lora_r"], lora_alpha=peft_cfg["lora_alpha"], lora_dropout=0.0,
            use_rslora=bool(peft_cfg.get("use_rslora", False)), bias="none",
            modules_to_save=peft_cfg.get("lora_modules_to_save")))

    if full.is_file():
        state = to_current_keys(torch.load(full, map_location="cpu", weights_only=True))
        embed = next((v for k, v in state.items() if k.endswith("embed_tokens.weight")), None)
        if embed is not None and embed.shape[0] != len(tokenizer):
            raise UserError(f"{full} has {embed.shape[0]} token embeddings but the tokenizer of {base_path} gives "
                            f"{len(tokenizer)} with the reward tokens; use the Qwen2-VL-2B-Instruct tokenizer")
        result = model.load_state_dict(state, strict=False)
        _check_keys(set(result.missing_keys), set(result.unexpected_keys), str(full))
    else:
        from safetensors.torch import load_file

        state = to_current_keys(_with_adapter_name(load_file(adapter)))
        state.update(to_current_keys(torch.load(non_lora, map_location="cpu", weights_only=True)))
        result = model.load_state_dict(state, strict=False)
        lora_missing = {k for k in result.missing_keys if ".lora_" in k}
        _check_keys(lora_missing, set(result.unexpected_keys), f"{adapter} + {non_lora.name}")

    if peft_cfg.get("lora_enable", True):
        model = model.merge_and_unload()  # in float32, before any cast to bf16
    model.requires_grad_(False).eval().to(device=device, dtype=dtype)
    log.info("VideoReward: %s (base %s) on %s in %s", ckpt, base_path, device, str(dtype).removeprefix("torch."))
    return VideoReward(model=model, tokenizer=tokenizer, inference_config=cfg.get("inference_config"),
                       data_config=cfg["data_config"], checkpoint=ckpt)
