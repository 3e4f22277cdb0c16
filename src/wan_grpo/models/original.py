"""Load Wan2.2 checkpoints in the ORIGINAL release layout into the diffusers/transformers classes.

The original layout (as the Wan-AI repos ship it, read by the official Wan-Video/Wan2.2 code):

    T2V-A14B / I2V-A14B                       TI2V-5B
    high_noise_model/  config.json + shards   config.json + shards (at the root)
    low_noise_model/   config.json + shards   Wan2.2_VAE.pth
    Wan2.1_VAE.pth                            models_t5_umt5-xxl-enc-bf16.pth
    models_t5_umt5-xxl-enc-bf16.pth           google/umt5-xxl/  (tokenizer)
    google/umt5-xxl/   (tokenizer)

Shards are ``diffusion_pytorch_model-*.safetensors`` (fp32) with an index json. The expert
``config.json`` holds only the official fields (dim, ffn_dim, num_heads, ...); the rest of the DiT
architecture, the T5 and VAE architectures, the latent tables, the MoE boundary and the sampling
shift are hard-coded in the official code, so they are hard-coded here or read off tensor shapes.

Every weight load is strict: a missing, unexpected or mis-shaped tensor is a ``UserError``.
Experts are streamed one shard at a time into a model whose parameters live on the meta device,
so a full second copy of an expert is never held in memory.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path

import torch

from wan_grpo.errors import UserError
from wan_grpo.models.components import WanComponents

log = logging.getLogger("wan_grpo")

HIGH_NOISE_DIR, LOW_NOISE_DIR = "high_noise_model", "low_noise_model"
T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
TOKENIZER_DIR = "google/umt5-xxl"
VAE21_FILE, VAE22_FILE = "Wan2.1_VAE.pth", "Wan2.2_VAE.pth"
SHARD_GLOB = "diffusion_pytorch_model*.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"
EXPERT_CONFIG_FIELDS = (
    "dim", "eps", "ffn_dim", "freq_dim", "in_dim", "model_type", "num_heads", "num_layers", "out_dim", "text_len",
)

# Hard-coded in Wan-Video/Wan2.2 wan/configs (boundary x 1000 timesteps, sample_shift).
OFFICIAL = {
    "t2v": {"boundary_ratio": 0.875, "shift": 12.0, "vae": VAE21_FILE, "pipeline": "WanPipeline"},
    "i2v": {"boundary_ratio": 0.900, "shift": 5.0, "vae": VAE21_FILE, "pipeline": "WanImageToVideoPipeline"},
    "ti2v": {"boundary_ratio": None, "shift": 5.0, "vae": VAE22_FILE, "pipeline": "WanPipeline"},
}

# Wan2_2_VAE latent normalisation (hard-coded in wan/modules/vae2_2.py). The Wan2.1 table is
# AutoencoderKLWan's default latents_mean/latents_std.
WAN22_LATENTS_MEAN = [
    -0.2289, -0.0052, -0.1323, -0.2339, -0.2799, 0.0174, 0.1838, 0.1557, -0.1382, 0.0542, 0.2813, 0.0891,
    0.1570, -0.0098, 0.0375, -0.1825, -0.2246, -0.1207, -0.0698, 0.5109, 0.2665, -0.2108, -0.2158, 0.2502,
    -0.2055, -0.0322, 0.1109, 0.1567, -0.0729, 0.0899, -0.2799, -0.1230, -0.0313, -0.1649, 0.0117, 0.0723,
    -0.2839, -0.2083, -0.0520, 0.3748, 0.0152, 0.1957, 0.1433, -0.2944, 0.3573, -0.0548, -0.1681, -0.0667,
]
WAN22_LATENTS_STD = [
    0.4765, 1.0364, 0.4514, 1.1677, 0.5313, 0.4990, 0.4818, 0.5013, 0.8158, 1.0344, 0.5894, 1.0901,
    0.6885, 0.6165, 0.8454, 0.4978, 0.5759, 0.3523, 0.7135, 0.6804, 0.5833, 1.4146, 0.8986, 0.5659,
    0.7069, 0.5338, 0.4889, 0.4917, 0.4069, 0.4999, 0.6866, 0.4093, 0.5709, 0.6065, 0.6415, 0.4944,
    0.5726, 1.2042, 0.5458, 1.6887, 0.3971, 1.0600, 0.3943, 0.5537, 0.5444, 0.4089, 0.7468, 0.7744,
]

# The official T5 (wan/modules/t5.py): T5RelativeEmbedding(max_dist=128), T5LayerNorm eps 1e-6,
# gated FFN ``fc2(fc1(x) * GELU_tanh(gate.0(x)))``.
T5_MAX_DISTANCE = 128
T5_LAYER_NORM_EPS = 1e-6

ORIGINAL_LAYOUT_HELP = (
    "the original layout (high_noise_model/ + low_noise_model/ each with config.json and "
    f"diffusion_pytorch_model-*.safetensors, or config.json + shards at the root for TI2V-5B; "
    f"{VAE21_FILE} or {VAE22_FILE}; {T5_FILE}; {TOKENIZER_DIR}/)"
)


# ----------------------------------------------------------------------------- detection


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}; re-download that file") from exc


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
        (root / HIGH_NOISE_DIR).is_dir()
        or (root / LOW_NOISE_DIR).is_dir()
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


def _shard_files(expert_dir: Path) -> tuple[list[Path], list[str]]:
    """(shard files, problems). The index json, when present, decides which files must exist."""
    index_path = expert_dir / INDEX_FILE
    if index_path.is_file():
        index = _read_json(index_path)
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


def _expert_config(expert_dir: Path) -> dict:
    path = expert_dir / "config.json"
    cfg = _read_json(path)
    if cfg.get("_class_name") not in (None, "WanModel"):
        raise UserError(f"{path} describes a {cfg.get('_class_name')!r}, not a Wan2.2 WanModel expert")
    absent = [f for f in EXPERT_CONFIG_FIELDS if f not in cfg]
    if absent:
        raise UserError(f"{path} lacks {', '.join(absent)}; re-download it from the Wan-AI repository")
    if cfg["model_type"] not in OFFICIAL:
        raise UserError(
            f"{path} has model_type {cfg['model_type']!r}; this loader knows {', '.join(OFFICIAL)} "
            "(Wan2.2 T2V/I2V/TI2V)"
        )
    if cfg["dim"] % cfg["num_heads"]:
        raise UserError(f"{path}: dim {cfg['dim']} is not divisible by num_heads {cfg['num_heads']}")
    return cfg


def inspect_original(root: str | Path) -> dict:
    """Validate an original-layout folder and describe it like a model_index.json.

    The returned dict has ``_class_name``, ``boundary_ratio`` and ``expand_timesteps`` as a diffusers
    model_index.json would (so ``presets.infer_task`` works on it), plus ``_layout: "original"``,
    ``model_type`` and the paths of the experts, VAE, T5 and tokenizer. Every missing file is
    listed in one UserError.
    """
    root = Path(root)
    missing: list[str] = []
    experts: dict[str, str] = {}
    configs: dict[str, dict] = {}
    if (root / HIGH_NOISE_DIR).is_dir() or (root / LOW_NOISE_DIR).is_dir():
        for name, sub in (("high", HIGH_NOISE_DIR), ("low", LOW_NOISE_DIR)):
            d = root / sub
            if not d.is_dir():
                missing.append(f"{sub}/")
                continue
            if not (d / "config.json").is_file():
                missing.append(f"{sub}/config.json")
            _, problems = _shard_files(d)
            missing += problems
            experts[name] = str(d)
    elif (root / "config.json").is_file():
        _, problems = _shard_files(root)
        missing += problems
        experts["high"] = str(root)  # the dense TI2V-5B model is the pipeline's ``transformer``
    else:
        missing.append(f"{HIGH_NOISE_DIR}/ and {LOW_NOISE_DIR}/ (A14B) or config.json + shards (TI2V-5B)")
    if missing:
        raise UserError(
            f"{root} looks like the original Wan2.2 layout but is incomplete: missing {'; '.join(missing)} "
            f"(found: {describe_dir(root)}); re-download the checkpoint"
        )
    for name, d in experts.items():
        configs[name] = _expert_config(Path(d))
    types = {c["model_type"] for c in configs.values()}
    if len(types) != 1:
        raise UserError(f"{root}: the experts disagree on model_type ({', '.join(sorted(types))}); re-download")
    model_type = types.pop()
    if model_type == "ti2v" and len(experts) != 1:
        raise UserError(f"{root}: model_type ti2v is a single dense model, but {HIGH_NOISE_DIR}/ and "
                        f"{LOW_NOISE_DIR}/ exist")
    if model_type != "ti2v" and len(experts) != 2:
        raise UserError(
            f"{root}: model_type {model_type} needs {HIGH_NOISE_DIR}/ and {LOW_NOISE_DIR}/, found config.json at "
            "the root"
        )
    official = OFFICIAL[model_type]
    vae = root / official["vae"]
    if not vae.is_file():
        raise UserError(
            f"{root} (original Wan2.2 layout, model_type {model_type}) has no {official['vae']} "
            f"(found: {describe_dir(root)}); download it from the same Wan-AI repository"
        )
    return {
        "_class_name": official["pipeline"],
        "_layout": "original",
        "model_type": model_type,
        "boundary_ratio": official["boundary_ratio"],
        "expand_timesteps": model_type == "ti2v",
        "experts": experts,
        "vae": str(vae),
        "text_encoder": str(root / T5_FILE),
        "tokenizer": str(root / TOKENIZER_DIR),
    }


# ----------------------------------------------------------------------------- shared helpers


def _keep_fp32(name: str, keep: list[str]) -> bool:
    # diffusers' rule: a keep-in-fp32 module name must be a component of the parameter's name.
    return any(m in name.split(".") for m in keep)


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype | None, keep: list[str]) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point():
        return tensor
    target = torch.float32 if _keep_fp32(name, keep) else dtype
    return tensor if tensor.dtype == target else tensor.to(target)


def _first(items, n: int = 5) -> str:
    items = list(items)
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more


def _check_keys(
    source: Path,
    what: str,
    expected: dict[str, torch.Size],
    found: dict[str, tuple[str, tuple]],
    *,
    optional: tuple[str, ...] = (),
) -> None:
    """Strict key/shape check. ``found`` maps target name -> (name in the file, shape)."""
    unexpected = [orig for k, (orig, _) in found.items() if k not in expected]
    missing = [k for k in expected if k not in found and k not in optional]
    if unexpected or missing:
        parts = []
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_first(unexpected)}")
        if missing:
            parts.append(f"{len(missing)} missing key(s) (diffusers names): {_first(missing)}")
        raise UserError(
            f"{source} does not match the {what} it should hold: {'; '.join(parts)}; "
            "re-download the file, or check that it belongs to this Wan2.2 checkpoint"
        )
    bad = [
        f"{orig} {list(shape)} (expected {list(expected[k])})"
        for k, (orig, shape) in found.items()
        if tuple(shape) != tuple(expected[k])
    ]
    if bad:
        raise UserError(
            f"{source}: {len(bad)} tensor(s) have the wrong shape for the {what} built from its config: "
            f"{_first(bad, 3)}; re-download the file or fix config.json"
        )


def _rename_unique(names, rename, source: Path, what: str) -> dict[str, str]:
    """{target name: original name}; an original name with no target is reported as unexpected."""
    out: dict[str, str] = {}
    unknown = []
    for k in names:
        new = rename(k)
        if new is None:
            unknown.append(k)
        elif new in out:
            raise UserError(f"{source}: {out[new]} and {k} both map to {new}; the file is not a Wan2.2 {what}")
        else:
            out[new] = k
    if unknown:
        raise UserError(
            f"{source} does not match the {what} it should hold: {len(unknown)} unexpected key(s): "
            f"{_first(unknown)}; re-download the file, or check that it belongs to this Wan2.2 checkpoint"
        )
    return out


def _torch_load(path: Path) -> dict:
    """A .pth state dict, memory-mapped when the file format allows it (never unpickles code)."""
    try:
        try:
            sd = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any read/unpickle failure is a bad file for the user
        raise UserError(f"cannot read {path}: {exc}; re-download that file") from exc
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a plain state dict of tensors; re-download that file")
    return sd


def _empty(cls_or_fn, *args, **kwargs):
    """Build a module with parameters on the meta device (buffers stay real: rope tables etc.)."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return cls_or_fn(*args, **kwargs)


def _assign(model: torch.nn.Module, state_dict: dict, *, what: str, source: Path) -> None:
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    if result.unexpected_keys:  # _check_keys ran first; this guards against a logic slip
        raise UserError(f"{source}: unexpected key(s) for the {what}: {_first(result.unexpected_keys)}")


def _no_meta_left(model: torch.nn.Module, source: Path, what: str) -> None:
    left = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if left:
        raise UserError(f"{source}: the {what} was not fully loaded; missing {_first(left)}; re-download it")


# ----------------------------------------------------------------------------- DiT experts


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
    cfg = _expert_config(expert_dir)
    shards, problems = _shard_files(expert_dir)
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
            raise UserError(f"{shard}: key(s) {_first(dup)} also appear in another shard; re-download the expert")
        for new, orig in names.items():
            found[new] = (orig, shapes[orig])
        per_shard.append((shard, names))

    text_key = "condition_embedder.text_embedder.linear_1.weight"
    text_dim = found[text_key][1][1] if text_key in found else 4096
    model = _empty(WanTransformer3DModel, **transformer_config(cfg, text_dim))
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_keys(expert_dir, "Wan2.2 DiT expert", expected, found)

    # Pass 2: one shard in memory at a time, assigned into the meta-initialised model.
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    for shard, names in per_shard:
        state = {}
        with safe_open(str(shard), framework="pt") as f:
            for new, orig in names.items():
                state[new] = _cast(new, f.get_tensor(orig), dtype, keep)
        _assign(model, state, what="DiT expert", source=shard)
        del state
    _no_meta_left(model, expert_dir, "DiT expert")
    log.info("loaded %s (%d shard(s), %s)", expert_dir, len(shards), cfg["model_type"])
    return model.eval()


# ----------------------------------------------------------------------------- T5 (UMT5 encoder)

_T5_BLOCK = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # GELU(tanh) branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}


def t5_key_to_transformers(key: str) -> str | None:
    """Official T5Encoder name -> transformers UMT5EncoderModel name (None: not a UMT5 encoder key)."""
    if key == "token_embedding.weight":
        return "shared.weight"
    if key == "norm.weight":
        return "encoder.final_layer_norm.weight"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
    if m and m.group(2) in _T5_BLOCK:
        return f"encoder.block.{m.group(1)}.{_T5_BLOCK[m.group(2)]}"
    return None


def t5_config(sd: dict, source: Path):
    """UMT5Config from tensor shapes (umt5-xxl: 4096 / 64 heads x 64 / 10240 / 24 layers / 32 buckets)."""
    from transformers import UMT5Config

    try:
        vocab, d_model = sd["token_embedding.weight"].shape
        num_buckets, num_heads = sd["blocks.0.pos_embedding.embedding.weight"].shape
        inner = sd["blocks.0.attn.q.weight"].shape[0]
        d_ff = sd["blocks.0.ffn.fc1.weight"].shape[0]
    except KeyError as exc:
        raise UserError(
            f"{source} is not the UMT5-XXL encoder of the original Wan2.2 layout (no {exc.args[0]}); re-download it"
        ) from exc
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    if inner % num_heads or layers != set(range(len(layers))):
        raise UserError(f"{source}: inconsistent T5 shapes (attention {inner} over {num_heads} heads, "
                        f"layers {sorted(layers)})")
    return UMT5Config(
        vocab_size=int(vocab),
        d_model=int(d_model),
        d_kv=int(inner // num_heads),
        d_ff=int(d_ff),
        num_layers=len(layers),
        num_heads=int(num_heads),
        relative_attention_num_buckets=int(num_buckets),
        relative_attention_max_distance=T5_MAX_DISTANCE,
        feed_forward_proj="gated-gelu",  # dense_act_fn gelu_new = tanh GELU, as the official GELU()
        layer_norm_epsilon=T5_LAYER_NORM_EPS,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tie_word_embeddings=True,
        architectures=["UMT5EncoderModel"],
    )


def load_t5(path: str | Path, *, dtype: torch.dtype | None = torch.float32):
    """UMT5EncoderModel from the official ``models_t5_umt5-xxl-enc-bf16.pth``."""
    from transformers import UMT5EncoderModel

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} is missing; download {path.name} from the same Wan-AI repository")
    sd = _torch_load(path)
    config = t5_config(sd, path)
    names = _rename_unique(sd, t5_key_to_transformers, path, "UMT5 text encoder")
    model = _empty(UMT5EncoderModel, config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    tied = ("encoder.embed_tokens.weight",)  # tied to shared.weight (the official token_embedding)
    found = {k: (o, tuple(sd[o].shape)) for k, o in names.items()}
    _check_keys(path, "UMT5 text encoder", expected, found, optional=tied)
    keep = []
    if dtype == torch.float16:
        keep += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        keep += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    state = {k: _cast(k, sd[o], dtype, keep) for k, o in names.items()}
    del sd
    _assign(model, state, what="text encoder", source=path)
    del state
    model.tie_weights()
    _no_meta_left(model, path, "text encoder")
    return model.eval()


# ----------------------------------------------------------------------------- VAE

_RES = {
    "residual.0.gamma": "norm1.gamma",
    "residual.2.weight": "conv1.weight",
    "residual.2.bias": "conv1.bias",
    "residual.3.gamma": "norm2.gamma",
    "residual.6.weight": "conv2.weight",
    "residual.6.bias": "conv2.bias",
    "shortcut.weight": "conv_shortcut.weight",
    "shortcut.bias": "conv_shortcut.bias",
}
_ATTN = ("norm.gamma", "to_qkv.weight", "to_qkv.bias", "proj.weight", "proj.bias")
_RESAMPLE = ("resample.1.weight", "resample.1.bias", "time_conv.weight", "time_conv.bias")


def vae22_key_to_diffusers(key: str) -> str | None:
    """Official Wan2.2 VAE name -> AutoencoderKLWan(is_residual=True) name (None: unknown).

    Wan2.2 nests its stages: ``encoder.downsamples.i.downsamples.j`` (residual blocks, then the
    resample) and ``decoder.upsamples.i.upsamples.j``; diffusers calls them ``down_blocks.i.resnets.j``
    / ``down_blocks.i.downsampler`` and ``up_blocks.i.resnets.j`` / ``up_blocks.i.upsampler``.
    """
    m = re.fullmatch(r"conv([12])\.(weight|bias)", key)
    if m:
        return f"{'quant_conv' if m.group(1) == '1' else 'post_quant_conv'}.{m.group(2)}"
    m = re.fullmatch(r"(encoder|decoder)\.(.+)", key)
    if not m:
        return None
    side, rest = m.groups()
    if m2 := re.fullmatch(r"conv1\.(weight|bias)", rest):
        return f"{side}.conv_in.{m2.group(1)}"
    if rest == "head.0.gamma":
        return f"{side}.norm_out.gamma"
    if m2 := re.fullmatch(r"head\.2\.(weight|bias)", rest):
        return f"{side}.conv_out.{m2.group(1)}"
    if m2 := re.fullmatch(r"middle\.([02])\.(.+)", rest):
        if m2.group(2) in _RES:
            return f"{side}.mid_block.resnets.{int(m2.group(1)) // 2}.{_RES[m2.group(2)]}"
        return None
    if m2 := re.fullmatch(r"middle\.1\.(.+)", rest):
        return f"{side}.mid_block.attentions.0.{m2.group(1)}" if m2.group(1) in _ATTN else None
    outer, inner, blocks, sampler = (
        ("downsamples", "downsamples", "down_blocks", "downsampler")
        if side == "encoder"
        else ("upsamples", "upsamples", "up_blocks", "upsampler")
    )
    if m2 := re.fullmatch(rf"{outer}\.(\d+)\.{inner}\.(\d+)\.(.+)", rest):
        i, j, leaf = m2.groups()
        if leaf in _RES:
            return f"{side}.{blocks}.{i}.resnets.{j}.{_RES[leaf]}"
        if leaf in _RESAMPLE:
            return f"{side}.{blocks}.{i}.{sampler}.{leaf}"
    return None


def _vae_shape(sd: dict, key: str, source: Path) -> torch.Size:
    if key not in sd:
        raise UserError(f"{source} is not a Wan VAE checkpoint (no {key}); re-download it")
    return sd[key].shape


def vae21_config(sd: dict, source: Path) -> dict:
    """AutoencoderKLWan config for a Wan2.1 VAE (flat ``encoder.downsamples.N``), from shapes."""
    base = _vae_shape(sd, "encoder.conv1.weight", source)[0]
    z_dim = _vae_shape(sd, "conv2.weight", source)[0]
    idx = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")})
    counts, mults, temporal, cur, out_dim = [], [], [], 0, None
    for i in idx:
        p = f"encoder.downsamples.{i}."
        if p + "residual.2.weight" in sd:
            cur += 1
            out_dim = sd[p + "residual.2.weight"].shape[0]
        elif p + "resample.1.weight" in sd and out_dim is not None:
            counts.append(cur)
            mults.append(out_dim // base)
            temporal.append(p + "time_conv.weight" in sd)
            cur = 0
        else:
            raise UserError(f"{source}: encoder.downsamples.{i} is neither a residual block nor a resample")
    counts.append(cur)
    mults.append((out_dim or base) // base)
    if len(set(counts)) != 1 or counts[0] == 0:
        raise UserError(f"{source}: uneven residual blocks per stage {counts}; not a Wan2.1 VAE")
    dec_base = _vae_shape(sd, "decoder.conv1.weight", source)[0] // mults[-1]
    if counts[0] != 2 or len(mults) != 4:
        # diffusers' convert_wan_vae_to_diffusers hard-codes the released decoder layout.
        raise UserError(
            f"{source}: {len(mults)} stages x {counts[0]} residual blocks; the Wan2.1 VAE key converter "
            "supports only the released architecture (4 stages x 2 residual blocks)"
        )
    if z_dim != 16:
        raise UserError(f"{source}: z_dim {z_dim}; the Wan2.1 VAE latent tables have 16 channels")
    return {
        "base_dim": int(base),
        "decoder_base_dim": None if dec_base == base else int(dec_base),
        "z_dim": int(z_dim),
        "dim_mult": [int(m) for m in mults],
        "num_res_blocks": int(counts[0]),
        "temperal_downsample": temporal,
        "scale_factor_temporal": 2 ** sum(temporal),
        "scale_factor_spatial": 2 ** (len(mults) - 1),
    }


def vae22_config(sd: dict, source: Path) -> dict:
    """AutoencoderKLWan config for a Wan2.2 VAE (nested stages, 12-channel patchified I/O), from shapes."""
    conv_in = _vae_shape(sd, "encoder.conv1.weight", source)
    base, in_channels = int(conv_in[0]), int(conv_in[1])
    z_dim = int(_vae_shape(sd, "conv2.weight", source)[0])
    out_channels = int(_vae_shape(sd, "decoder.head.2.weight", source)[0])
    stages = sorted({int(k.split(".")[2]) for k in sd if k.startswith("encoder.downsamples.")})
    if stages != list(range(len(stages))) or not stages:
        raise UserError(f"{source}: encoder stages {stages} are not 0..N; not a Wan2.2 VAE")
    mults = [
        int(_vae_shape(sd, f"encoder.downsamples.{i}.downsamples.0.residual.2.weight", source)[0]) // base
        for i in stages
    ]
    num_res = len(
        {k.split(".")[4] for k in sd if k.startswith("encoder.downsamples.0.downsamples.") and ".residual." in k}
    )
    temporal = [
        any(k.startswith(f"encoder.downsamples.{i}.downsamples.") and ".time_conv." in k for k in sd)
        for i in stages[:-1]
    ]
    dec_base = int(_vae_shape(sd, "decoder.conv1.weight", source)[0]) // mults[-1]
    patch = math.isqrt(in_channels // 3)
    if patch * patch * 3 != in_channels:
        raise UserError(f"{source}: {in_channels} input channels is not 3 x patch^2; not a Wan2.2 VAE")
    if z_dim != len(WAN22_LATENTS_MEAN):
        raise UserError(f"{source}: z_dim {z_dim}; the Wan2.2 VAE latent tables have {len(WAN22_LATENTS_MEAN)} "
                        "channels")
    return {
        "base_dim": base,
        "decoder_base_dim": dec_base,
        "z_dim": z_dim,
        "dim_mult": mults,
        "num_res_blocks": num_res,
        "temperal_downsample": temporal,
        "is_residual": True,
        "in_channels": in_channels,
        "out_channels": out_channels,
        "patch_size": patch,
        "scale_factor_temporal": 2 ** sum(temporal),
        "scale_factor_spatial": 2 ** (len(stages) - 1) * patch,
        "latents_mean": list(WAN22_LATENTS_MEAN),
        "latents_std": list(WAN22_LATENTS_STD),
    }


def load_vae(path: str | Path, *, dtype: torch.dtype | None = torch.float32):
    """AutoencoderKLWan from ``Wan2.1_VAE.pth`` or ``Wan2.2_VAE.pth`` (told apart by structure)."""
    from diffusers import AutoencoderKLWan

    path = Path(path)
    sd = _torch_load(path)
    nested = any(k.startswith("encoder.downsamples.0.downsamples.") for k in sd)
    if nested:
        config = vae22_config(sd, path)
        names = _rename_unique(sd, vae22_key_to_diffusers, path, "Wan2.2 VAE")
    else:
        from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

        config = vae21_config(sd, path)
        names = {new: orig for new, orig in convert_wan_vae_to_diffusers({k: k for k in sd}).items()}
    what = "Wan2.2 VAE" if nested else "Wan2.1 VAE"
    model = _empty(AutoencoderKLWan, **config)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_keys(path, what, expected, {k: (o, tuple(sd[o].shape)) for k, o in names.items()})
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    state = {k: _cast(k, sd[o], dtype, keep) for k, o in names.items()}
    del sd
    _assign(model, state, what=what, source=path)
    _no_meta_left(model, path, what)
    return model.eval()


# ----------------------------------------------------------------------------- all components


def load_original_components(
    ckpt_dir: str | Path,
    *,
    dtype: torch.dtype | None = torch.float32,
    vae_dtype: torch.dtype | None = torch.float32,
    load_text_encoder: bool = True,
    text_encoder_dtype: torch.dtype | None = None,
    layout: dict | None = None,
) -> WanComponents:
    """The same WanComponents as the diffusers loader, from an original-layout folder.

    ``dtype`` applies to the experts and (unless ``text_encoder_dtype`` is given) the text encoder;
    ``None`` keeps the stored dtypes (experts fp32, T5 bf16, VAE fp32). Modules diffusers keeps in
    fp32 (``_keep_in_fp32_modules``) stay fp32 as ``from_pretrained`` would keep them.
    """
    from transformers import AutoTokenizer

    root = Path(ckpt_dir)
    layout = layout or inspect_original(root)
    model_type = layout["model_type"]
    experts = {name: load_expert(d, dtype=dtype) for name, d in layout["experts"].items()}

    text_encoder = tokenizer = None
    if load_text_encoder:
        tok_dir = Path(layout["tokenizer"])
        if not tok_dir.is_dir():
            raise UserError(f"{tok_dir} is missing; download the {TOKENIZER_DIR} tokenizer folder of the Wan-AI "
                            "repository")
        tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
        te_dtype = dtype if text_encoder_dtype is None else text_encoder_dtype
        text_encoder = load_t5(layout["text_encoder"], dtype=te_dtype)

    official = OFFICIAL[model_type]
    return WanComponents(
        transformer=experts.get("high"),
        transformer_2=experts.get("low"),
        vae=load_vae(layout["vae"], dtype=vae_dtype),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        boundary_ratio=official["boundary_ratio"],
        expand_timesteps=model_type == "ti2v",
        scheduler_config={},
        default_shift=official["shift"],
        source=str(root),
    )
