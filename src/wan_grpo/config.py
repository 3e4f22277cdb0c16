"""Typed configs. Each field is a CLI flag (``--name``) and a YAML key (``name``) with one help text.

Flags override the YAML file given with ``--config``; unknown keys are an error that names the
closest valid key. ``None`` defaults are filled from the model preset (see specs.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from wan_grpo.errors import UserError

BOUNDS = {"gt": (">", lambda v, b: v > b), "ge": (">=", lambda v, b: v >= b),
          "lt": ("<", lambda v, b: v < b), "le": ("<=", lambda v, b: v <= b)}


def opt(default, help: str, *, choices=None, type=None, **bounds):
    """A config field. ``bounds`` (gt, ge, lt, le) declare its valid range; ``check_ranges`` enforces
    them (and finiteness for every float) and the help text states them."""
    meta = {"help": help}
    if choices is not None:
        meta["choices"] = choices
    if type is not None:
        meta["type"] = type
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"unknown bounds {unknown}")
    if bounds:
        meta["bounds"] = bounds
    return field(default=default, metadata=meta)


def range_text(f: dataclasses.Field) -> str:
    """'> 0', '>= 1 and <= 8', or '' for a field without declared bounds."""
    return " and ".join(f"{BOUNDS[k][0]} {_num(v)}" for k, v in f.metadata.get("bounds", {}).items())


def _num(v) -> str:
    return str(v) if isinstance(v, int) else f"{v:g}"


def help_text(f: dataclasses.Field) -> str:
    """The field's help, with its valid range when it declares one."""
    rng = range_text(f)
    return f"{f.metadata.get('help', '')}" + (f" Range: {rng}." if rng else "")


def check_ranges(config) -> None:
    """One-line UserError for the first field outside its declared range, or a non-finite float."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if value is None or isinstance(value, (bool, str)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            rng = range_text(f)
            raise UserError(f"--{f.name} {value}: must be a finite number" + (f" {rng}" if rng else ""))
        for kind, bound in f.metadata.get("bounds", {}).items():
            if not BOUNDS[kind][1](value, bound):
                raise UserError(f"--{f.name} {_num(value)}: must be {range_text(f)}")


TASKS = ("tiny", "shapes", "t2v-A14B", "i2v-A14B", "ti2v-5B")


PRECISION_HELP = ("bf16: frozen weights bf16 (diffusers' _keep_in_fp32_modules stay fp32, but FSDP2 gathers a "
                  "block's parameters in bf16), forward passes under bf16 autocast, trained weights, optimizer state, "
                  "SDE arithmetic and log-probs fp32, FSDP2 reducing gradients in fp32, VideoAlign in bf16; fp32: "
                  "everything fp32. On any device. Default: bf16 on CUDA, fp32 on CPU.")


@dataclass
class ModelConfig:
    task: str | None = opt(None, "Model preset: tiny (random weights, for tests), shapes (the small pretrained "
                                 "Shapes model, shipped; make shapes-base rebuilds it; given explicitly, train then "
                                 "defaults to its measured setting: nft on both experts, full fine-tuning, lr 1e-4, "
                                 "6 optimizer steps per rollout of 8 prompts x 8 videos with 2 noise draws each, "
                                 "a KL to the base at weight 1, and on level-2 prompts alone the reward "
                                 "accuracy=1,shape=1,fill=1), t2v-A14B, i2v-A14B or "
                                 "ti2v-5B. "
                                 "Default: tiny "
                                 "without --ckpt_dir, else inferred from the checkpoint.", choices=TASKS)
    ckpt_dir: str | None = opt(None, "Wan2.2 checkpoint folder: diffusers layout (model_index.json) or the "
                                     "original Wan-AI layout (auto-detected).")
    device: str = opt("auto", "auto (cuda if available, else cpu), cpu, cuda or cuda:N.")
    dtype: str = opt("auto", "Frozen weights dtype: auto (bf16 under --mixed_precision bf16, else fp32), bf16, "
                             "fp16 or fp32.", choices=("auto", "bf16", "fp16", "fp32"))
    mixed_precision: str | None = opt(None, PRECISION_HELP, choices=("bf16", "fp32"))
    seed: int = opt(0, "Random seed: decides the initial noise (as diffusers' WanPipeline with "
                       "Generator('cpu').manual_seed), SDE noise, trained timesteps, LoRA initialisation and data "
                       "order, on any number of processes.", ge=0, lt=2**32)
    size: str | None = opt(None, "Video size W*H, e.g. 832*480 (832x480 is read as that). Default: the preset's.")
    frame_num: int | None = opt(None, "Frames per video (4k+1). Default: the preset's.", ge=1)
    fps: int | None = opt(None, "Frames per second of written videos. Default: the preset's.", gt=0)
    sampling_steps: int | None = opt(None, "Denoising steps. Default: the preset's.", ge=1)
    sample_shift: float | None = opt(None, "Flow shift of the sigma schedule. Default: the official value of an "
                                            "explicit --task preset, else the checkpoint's scheduler config.", gt=0)
    guidance_scale: float | None = opt(None, "CFG scale of the high-noise expert (transformer). Default: preset.", ge=0)
    guidance_scale_2: float | None = opt(None, "CFG scale of the low-noise expert (transformer_2). Default: "
                                                "preset, else --guidance_scale.", ge=0)
    negative_prompt: str = opt("", "Negative prompt for CFG (diffusers' default: empty).")
    sde_type: str = opt("flow", "SDE of stochastic steps: flow (Flow-GRPO), dance (DanceGRPO), cps.",
                        choices=("flow", "dance", "cps"))
    noise_level: float = opt(0.7, "SDE noise level a (Flow-GRPO 0.7; DanceGRPO eta ~0.25-0.3).", ge=0, le=1)
    embedding_cache: str | None = opt(None, "Folder of prompt embeddings on disk (one safetensors file per prompt, "
                                            "keyed by the text encoder's files, dtype and device type): new prompts "
                                            "are added, and a run whose prompts are all there never loads the text "
                                            "encoder. Safe to share between runs and processes.")
    t5_cpu: bool = opt(False, "Run the UMT5 text encoder on CPU (the official t5_cpu); the embeddings then move to "
                              "--device. Saves ~11 GB of accelerator memory while encoding.")
    vae_tiling: bool = opt(False, "VAE decodes (and encodes conditioning images) in overlapping spatial tiles "
                                  "(diffusers' enable_tiling: 256 px tiles, 192 px stride) to cut its memory; pixels "
                                  "near seams differ slightly.")
    vae_slicing: bool = opt(False, "VAE decodes a batch one video at a time (diffusers' enable_slicing), whatever "
                                   "--decode_batch_size.")
    attention_backend: str | None = opt(None, "Attention kernel of the experts, through diffusers' attention "
                                              "dispatcher: native, flash, flash_hub, sage, flex, _native_cudnn, ... "
                                              "(a missing package is an error before the model loads). Default: "
                                              "diffusers' (PyTorch SDPA).")
    compile: bool = opt(False, "torch.compile each transformer block (regional, diffusers' compile_repeated_blocks): "
                               "compile time is one block's. On CPU it needs a C++ compiler.")


LORA_HELP = ("A train or sft checkpoint folder (checkpoint-<step>) whose LoRA or full weights are applied to the "
             "experts it contains.")


@dataclass
class SampleConfig(ModelConfig):
    prompt: str = opt("A cat walking in snow", "Text prompt.")
    lora: str | None = opt(None, LORA_HELP)
    sample_solver: str = opt("unipc", "unipc (as WanPipeline), dpm++ (DPM-Solver++ 2M, as the official "
                                      "--sample_solver dpm++), euler (ODE) or sde (stochastic).",
                             choices=("unipc", "dpm++", "euler", "sde"))
    image: str | None = opt(None, "Conditioning image (first frame): required by I2V-A14B, optional for TI2V-5B "
                                  "(image mode); resized to --size as diffusers' WanImageToVideoPipeline does.")
    output: str = opt("sample.mp4", "Output mp4 path.")
    save_latents: str | None = opt(None, "Also write the final latents (before VAE decode) to this "
                                         ".safetensors file under the key 'latents'.")


def _field_type(f: dataclasses.Field, hints: dict):
    if "type" in f.metadata:
        return f.metadata["type"]
    hint = hints[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    return base


def _parse_bool(text: str) -> bool:
    low = str(text).lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def add_config_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """One ``--name`` flag per field; defaults are left unset so the YAML file can fill them."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = _field_type(f, hints)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        # argparse %-formats help strings: a literal % ("90% of it") must be doubled
        kwargs = {"help": f"{help_text(f)} (default: {default})".replace("%", "%%"), "default": argparse.SUPPRESS}
        if kind is bool:
            kwargs.update(type=_parse_bool, nargs="?", const=True, metavar="BOOL")
        else:
            kwargs["type"] = kind
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        parser.add_argument(f"--{f.name}", **kwargs)


def _check_keys(cls, keys, origin: str) -> None:
    names = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"did you mean {close[0]!r}?" if close else "see wan-grpo --help for the valid keys"
            raise UserError(f"unknown config key {key!r} in {origin}; {hint}")


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"--config {p} does not exist; pass a YAML file of flag names and values")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"--config {p} is not valid YAML ({exc.__class__.__name__}); fix the file") from exc
    if not isinstance(data, dict):
        raise UserError(f"--config {p} must be a mapping of flag names to values")
    return data


def build_config(cls, namespace: argparse.Namespace, *, config_file: str | None = None):
    """Dataclass from defaults < the given --task's defaults (``cls.TASK_DEFAULTS``) < YAML file < flags.

    ``cls.TASK_DEFAULTS`` maps a task to a function of the values given (file and flags, read) that returns
    that task's defaults."""
    values: dict = {}
    if config_file:
        data = load_yaml(config_file)
        _check_keys(cls, data, config_file)
        values.update(data)
    flags = {k: v for k, v in vars(namespace).items() if k not in ("command", "config")}
    _check_keys(cls, flags, "the command line")
    values.update(flags)
    values = _coerced(cls, values)  # so a task's defaults see read values; a bad --task is refused here
    task_defaults = getattr(cls, "TASK_DEFAULTS", {}).get(values.get("task"))
    for key, value in _coerced(cls, task_defaults(values) if task_defaults else {}).items():
        values.setdefault(key, value)
    config = cls(**values)
    check_ranges(config)
    return config


def _coerced(cls, values: dict) -> dict:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in values.items():  # a YAML `key: null` or `key:`; only fields whose default may be None take it
        if v is None and k in fields and type(None) not in typing.get_args(hints[k]):
            raise UserError(f"{k}: null is not a {_field_type(fields[k], hints).__name__}; give a value or delete "
                            "the key to keep the default")
    values = {k: _coerce(fields[k], hints, v) if k in fields and v is not None else v for k, v in values.items()}
    if "size" in fields and values.get("size") is not None:  # one spelling everywhere a size is compared or shown
        values["size"] = "{}*{}".format(*parse_size(values["size"]))
    return values


def _coerce(f, hints, value):
    kind = _field_type(f, hints)
    choices = f.metadata.get("choices")
    try:
        if kind is bool and not isinstance(value, bool):
            value = _parse_bool(value)
        elif kind in (int, float, str) and not isinstance(value, kind):
            value = kind(value)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        raise UserError(f"{f.name}: cannot read {value!r} as {kind.__name__}; fix that value") from exc
    if choices is not None and value not in choices:
        raise UserError(f"{f.name}: {value!r} is not one of {', '.join(map(str, choices))}")
    return value


def parse_size(size: str) -> tuple[int, int]:
    """'W*H' -> (width, height)."""
    try:
        w, h = (int(x) for x in str(size).lower().replace("x", "*").split("*"))
    except ValueError:
        raise UserError(f"--size {size!r} is not W*H; write it as e.g. 832*480") from None
    if w <= 0 or h <= 0:
        raise UserError(f"--size {size!r} has a side that is not positive; write it as e.g. 832*480")
    return w, h
