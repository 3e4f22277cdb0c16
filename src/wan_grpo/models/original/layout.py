"""Detect and validate the original Wan2.2 layout (file names, expert configs, shards), reading no weights."""

from __future__ import annotations

import json
from pathlib import Path

from wan_grpo.errors import UserError
from wan_grpo.models.files import read_json
from wan_grpo.specs import ARCHITECTURES, PRESETS, TASK_OF_MODEL_TYPE, VAE21_FILE, VAE22_FILE, Expert

T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
SHARD_GLOB = "diffusion_pytorch_model*.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
BOTH_EXPERTS = " and ".join(f"{e.original_dir}/" for e in Expert)
EXPERT_CONFIG_FIELDS = (
    "dim", "eps", "ffn_dim", "freq_dim", "in_dim", "model_type", "num_heads", "num_layers", "out_dim", "text_len",
)

ORIGINAL_LAYOUT_HELP = (
    "the original layout (high_noise_model/ + low_noise_model/ each with config.json and "
    f"diffusion_pytorch_model-*.safetensors, or config.json + shards at the root for TI2V-5B; "
    f"{VAE21_FILE} or {VAE22_FILE}; {T5_FILE}; {TOKENIZER_DIR}/)"
)


def _is_wan_model_config(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("_class_name") == "WanModel"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def is_original_layout(root: str | Path) -> bool:
    """True when ``root`` (without model_index.json) carries any file of the original Wan2.2 layout."""
    root = Path(root)
    if not root.is_dir() or (root / "model_index.json").is_file():
        return False
    return (
        (root / Expert.HIGH.original_dir).is_dir()
        or (root / Expert.LOW.original_dir).is_dir()
        or _is_wan_model_config(root / "config.json")
        or any(root.glob("Wan2.*_VAE.pth"))
        or any(root.glob("models_t5_*.pth"))
    )


def describe_dir(root: Path, limit: int = 12) -> str:
    """Top-level entries of ``root`` for error messages ('an empty folder' when there are none)."""
    try:
        entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    except OSError:
        return "nothing readable"
    if not entries:
        return "an empty folder"
    more = f" (+{len(entries) - limit} more)" if len(entries) > limit else ""
    return ", ".join(entries[:limit]) + more


def shard_files(expert_dir: Path) -> tuple[list[Path], list[str]]:
    """(shard files, problems). The index json, when present, decides which files must exist."""
    index_path = expert_dir / INDEX_FILE
    if index_path.is_file():
        index = read_json(index_path)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            return [], [f"{index_path} has no weight_map"]
        names = sorted(set(weight_map.values()))
        missing = [str(expert_dir / n) for n in names if not (expert_dir / n).is_file()]
        return [expert_dir / n for n in names], missing
    shards = sorted(expert_dir.glob(SHARD_GLOB))
    if not shards:
        return [], [f"{expert_dir / 'diffusion_pytorch_model-*.safetensors'}"]
    return shards, []


def expert_config(expert_dir: Path) -> dict:
    path = expert_dir / "config.json"
    cfg = read_json(path)
    if cfg.get("_class_name") not in (None, "WanModel"):
        raise UserError(f"{path} describes a {cfg.get('_class_name')!r}, not a Wan2.2 WanModel expert")
    absent = [f for f in EXPERT_CONFIG_FIELDS if f not in cfg]
    if absent:
        raise UserError(f"{path} lacks {', '.join(absent)}; re-download it from the Wan-AI repository")
    if cfg["model_type"] not in TASK_OF_MODEL_TYPE:
        raise UserError(
            f"{path} has model_type {cfg['model_type']!r}; this loader knows {', '.join(TASK_OF_MODEL_TYPE)} "
            "(Wan2.2 T2V/I2V/TI2V)"
        )
    if cfg["dim"] % cfg["num_heads"]:
        raise UserError(f"{path}: dim {cfg['dim']} is not divisible by num_heads {cfg['num_heads']}")
    return cfg


def inspect_original(root: str | Path) -> dict:
    """Validate an original-layout folder and describe it like a model_index.json.

    The returned dict has ``_class_name``, ``boundary_ratio`` and ``expand_timesteps`` as a diffusers
    model_index.json would (so ``specs.infer_task`` works on it), plus ``_layout: "original"``,
    ``model_type`` and the paths of the experts, VAE, T5 and tokenizer. Every missing file is
    listed in one UserError.
    """
    root = Path(root)
    missing: list[str] = []
    experts: dict[str, str] = {}
    configs: dict[str, dict] = {}
    if (root / Expert.HIGH.original_dir).is_dir() or (root / Expert.LOW.original_dir).is_dir():
        for name, sub in (("high", Expert.HIGH.original_dir), ("low", Expert.LOW.original_dir)):
            d = root / sub
            if not d.is_dir():
                missing.append(f"{sub}/")
                continue
            if not (d / "config.json").is_file():
                missing.append(f"{sub}/config.json")
            _, problems = shard_files(d)
            missing += problems
            experts[name] = str(d)
    elif (root / "config.json").is_file():
        _, problems = shard_files(root)
        missing += problems
        experts["high"] = str(root)  # the dense TI2V-5B model is the pipeline's ``transformer``
    else:
        missing.append(f"{BOTH_EXPERTS} (A14B) or config.json + shards (TI2V-5B)")
    if missing:
        raise UserError(
            f"{root} looks like the original Wan2.2 layout but is incomplete: missing {'; '.join(missing)} "
            f"(found: {describe_dir(root)}); re-download the checkpoint"
        )
    for name, d in experts.items():
        configs[name] = expert_config(Path(d))
    types = {c["model_type"] for c in configs.values()}
    if len(types) != 1:
        raise UserError(f"{root}: the experts disagree on model_type ({', '.join(sorted(types))}); re-download")
    model_type = types.pop()
    if model_type == "ti2v" and len(experts) != 1:
        raise UserError(f"{root}: model_type ti2v is a single dense model, but {BOTH_EXPERTS} exist")
    if model_type != "ti2v" and len(experts) != 2:
        raise UserError(
            f"{root}: model_type {model_type} needs {BOTH_EXPERTS}, found config.json at the root"
        )
    task = TASK_OF_MODEL_TYPE[model_type]
    arch, preset = ARCHITECTURES[task], PRESETS[task]
    vae = root / arch.vae_file
    if not vae.is_file():
        raise UserError(
            f"{root} (original Wan2.2 layout, model_type {model_type}) has no {arch.vae_file} "
            f"(found: {describe_dir(root)}); download it from the same Wan-AI repository"
        )
    return {
        "_class_name": arch.pipeline,
        "_layout": "original",
        "model_type": model_type,
        "boundary_ratio": preset.boundary_ratio,
        "expand_timesteps": model_type == "ti2v",
        "experts": experts,
        "vae": str(vae),
        "text_encoder": str(root / T5_FILE),
        "tokenizer": str(root / TOKENIZER_DIR),
    }
