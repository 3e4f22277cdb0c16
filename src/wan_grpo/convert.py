"""Convert an original-layout Wan2.2 checkpoint (Wan-AI release) to the diffusers layout.

The output is what ``WanPipeline.save_pretrained`` (``WanImageToVideoPipeline`` for I2V) writes:
model_index.json, transformer/ (+ transformer_2/ for A14B), vae/, text_encoder/, tokenizer/ and a
scheduler/ holding UniPC in flow-prediction mode with the official shift (T2V 12.0, I2V/TI2V 5.0),
not the 3.0 that the diffusers-format Wan-AI repos ship for A14B.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from wan_grpo.config import opt
from wan_grpo.errors import UserError
from wan_grpo.models.loading import load_components
from wan_grpo.models.original import ORIGINAL_LAYOUT_HELP, describe_dir, inspect_original, is_original_layout
from wan_grpo.runtime import DTYPES as DTYPE_NAMES  # "bf16" | "fp16" | "fp32"
from wan_grpo.specs import PRESETS, infer_task

log = logging.getLogger("wan_grpo")


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPE_NAMES:
        return DTYPE_NAMES[dtype]
    raise UserError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPE_NAMES)} (or leave it unset to keep the "
                    "stored dtypes)")


def _check_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(
            f"--output {output} already exists and is not an empty folder; remove it or pass a new --output path"
        )


def convert(
    ckpt_dir: str | Path,
    output: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    max_shard_size: str = "5GB",
) -> Path:
    """Write the diffusers layout of the original-layout checkpoint ``ckpt_dir`` to ``output``.

    ``dtype`` casts the experts and the text encoder (``None``: keep the stored dtypes, i.e. fp32
    experts and the bf16 T5; the VAE always stays fp32). Modules diffusers keeps in fp32 stay fp32.
    Peak memory is about the size of every component in that dtype (pass ``"bf16"`` to halve it
    for the A14B experts). The folder is written to ``<output>.tmp-XXXX`` beside it and renamed
    into place only when complete; an existing non-empty ``output`` is refused.
    Returns ``output``.
    """
    from diffusers import UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline


    root, output = Path(ckpt_dir), Path(output)
    dtype = _resolve_dtype(dtype)
    if not root.is_dir():
        raise UserError(f"--ckpt_dir {root} does not exist; pass the original-layout Wan2.2 folder")
    if (root / "model_index.json").is_file():
        raise UserError(f"{root} is already in the diffusers layout (model_index.json); pass it as --ckpt_dir directly")
    if not is_original_layout(root):

        raise UserError(
            f"{root} is not an original-layout Wan2.2 checkpoint: expected {ORIGINAL_LAYOUT_HELP}; "
            f"found: {describe_dir(root)}; pass the folder downloaded from a Wan-AI/Wan2.2-* repository"
        )
    if output.resolve() == root.resolve():
        raise UserError("--output must differ from --ckpt_dir; pass a new folder")
    _check_output(output)
    layout = inspect_original(root)  # validates every file before anything heavy is loaded

    components = load_components(root, dtype=dtype, vae_dtype=torch.float32, load_text_encoder=True)
    model_type = layout["model_type"]
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=1000,
        flow_shift=PRESETS[infer_task(layout)].shift,
    )
    cls = WanImageToVideoPipeline if model_type == "i2v" else WanPipeline
    pipe = cls(
        tokenizer=components.tokenizer,
        text_encoder=components.text_encoder,
        vae=components.vae,
        scheduler=scheduler,
        transformer=components.transformer,
        transformer_2=components.transformer_2,
        boundary_ratio=components.boundary_ratio,
        expand_timesteps=components.expand_timesteps,
    )

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{output.name}.tmp-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would survive the rename
    try:
        pipe.save_pretrained(str(tmp), safe_serialization=True, max_shard_size=max_shard_size)
        _check_output(output)  # nothing appeared there while we were writing
        if output.exists():
            output.rmdir()  # an empty folder: replace it
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote the diffusers layout of %s (%s) to %s", root, model_type, output)
    return output


@dataclass
class ConvertConfig:
    ckpt_dir: str | None = opt(None, "Original-layout Wan2.2 folder (high_noise_model/, low_noise_model/ or root "
                                     "shards, models_t5_umt5-xxl-enc-bf16.pth, Wan2.*_VAE.pth, google/umt5-xxl/).")
    output: str | None = opt(None, "New folder for the diffusers layout (written atomically).")
    dtype: str | None = opt(None, "Cast experts and text encoder to bf16, fp16 or fp32 (default: keep the stored "
                                  "dtypes; the VAE stays fp32).", choices=("bf16", "fp16", "fp32"))


def run_convert(cfg: ConvertConfig) -> Path:
    if not cfg.ckpt_dir or not cfg.output:
        raise UserError("convert needs --ckpt_dir ORIGINAL_DIR and --output NEW_DIR")
    return convert(cfg.ckpt_dir, cfg.output, dtype=cfg.dtype)
