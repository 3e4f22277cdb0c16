"""The facts of Wan2.2 in one table: the two experts, each model's sampling settings and
architecture, and those of our two small models (the random tiny model and the Shapes model).

Official values are hard-coded in Wan-Video/Wan2.2 ``wan/configs`` (sampling, boundary, shift) and
its model configs (architectures); they are written here in diffusers' WanTransformer3DModel terms.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Expert(IntEnum):
    """The two experts of an A14B model. The value indexes per-expert tensors and lists; a dense model
    (TI2V-5B) has only HIGH, its one ``transformer``."""

    HIGH = 0  # t >= boundary_ratio * num_train_timesteps
    LOW = 1

    @property
    def label(self) -> str:
        """The name users write (--train_experts high,low) and metrics carry (grad_norm_high)."""
        return ("high", "low")[self]

    @property
    def diffusers_dir(self) -> str:
        """The expert's folder (and WanPipeline attribute) in the diffusers layout."""
        return ("transformer", "transformer_2")[self]

    @property
    def original_dir(self) -> str:
        """The expert's folder in the original Wan-AI layout."""
        return ("high_noise_model", "low_noise_model")[self]

    @classmethod
    def from_label(cls, label: str) -> Expert:
        return {e.label: e for e in cls}[label]


EXPERTS = tuple(Expert)
EXPERT_LABELS = tuple(e.label for e in Expert)


@dataclass(frozen=True)
class Preset:
    """Sampling settings, and the facts a checkpoint's files do not state."""

    size: str
    frame_num: int
    fps: int
    sampling_steps: int
    shift: float  # the official shift; a diffusers checkpoint's scheduler config wins unless --sample_shift
    guidance_scale: float  # high-noise expert (transformer)
    guidance_scale_2: float  # low-noise expert (transformer_2)
    boundary_ratio: float | None  # None: a dense model
    decode_batch_size: int = 1  # videos per VAE decode call: one 720p video's decode is the memory peak


PRESETS = {
    "tiny": Preset("64*64", 5, 8, 8, 5.0, 4.0, 3.0, 0.875),
    "shapes": Preset("64*64", 9, 8, 10, 3.0, 4.0, 4.0, 0.875, decode_batch_size=16),
    "t2v-A14B": Preset("1280*720", 81, 16, 40, 12.0, 4.0, 3.0, 0.875),
    "i2v-A14B": Preset("1280*720", 81, 16, 40, 5.0, 3.5, 3.5, 0.900),
    "ti2v-5B": Preset("1280*704", 121, 24, 50, 5.0, 5.0, 5.0, None),
}


@dataclass(frozen=True)
class Architecture:
    """An official model: its DiT, how many experts, its VAE's stride, and its original layout."""

    model_type: str  # config.json "model_type" of the original layout
    num_attention_heads: int
    attention_head_dim: int
    in_channels: int
    out_channels: int
    ffn_dim: int
    num_layers: int
    experts: int
    vae_stride: tuple[int, int, int]  # (frames, height, width)
    vae_file: str  # the VAE's file in the original layout
    pipeline: str  # the diffusers pipeline class

    @property
    def vae_decode_features(self) -> tuple[int, int]:
        """(channels, pixels per output pixel) of the VAE decoder's widest full-resolution activation:
        Wan2.1's VAE ends at 96 channels after a 192-channel upsampling input; Wan2.2's (16x) at 160
        channels over 2x2-patchified pixels (320 before its last upsampling)."""
        return (320, 4) if self.vae_stride[1] == 16 else (192, 1)

    def dit_config(self) -> dict:
        """WanTransformer3DModel keyword arguments."""
        return dict(patch_size=(1, 2, 2), num_attention_heads=self.num_attention_heads,
                    attention_head_dim=self.attention_head_dim, in_channels=self.in_channels,
                    out_channels=self.out_channels, text_dim=4096, freq_dim=256, ffn_dim=self.ffn_dim,
                    num_layers=self.num_layers)


VAE21_FILE, VAE22_FILE = "Wan2.1_VAE.pth", "Wan2.2_VAE.pth"
ARCHITECTURES = {
    "t2v-A14B": Architecture("t2v", 40, 128, 16, 16, 13824, 40, 2, (4, 8, 8), VAE21_FILE, "WanPipeline"),
    "i2v-A14B": Architecture("i2v", 40, 128, 36, 16, 13824, 40, 2, (4, 8, 8), VAE21_FILE, "WanImageToVideoPipeline"),
    "ti2v-5B": Architecture("ti2v", 24, 128, 48, 48, 14336, 30, 1, (4, 16, 16), VAE22_FILE, "WanPipeline"),
}
TASK_OF_MODEL_TYPE = {arch.model_type: task for task, arch in ARCHITECTURES.items()}

TASK_KEY = "_wan_grpo_task"  # model_index.json key naming a wan-grpo model's preset (the Shapes model)


def infer_task(model_index: dict) -> str:
    """The preset a diffusers-format model_index.json most likely belongs to."""
    if model_index.get(TASK_KEY) in PRESETS:
        return model_index[TASK_KEY]
    if model_index.get("expand_timesteps"):
        return "ti2v-5B"
    if model_index.get("_class_name") == "WanImageToVideoPipeline":
        return "i2v-A14B"
    return "t2v-A14B"


def default_reward(task: str) -> str:
    """--reward when none is given: the Shapes verifier for shapes, brightness for the random tiny
    model (its videos are noise), VideoAlign for real checkpoints."""
    return {"tiny": "brightness", "shapes": "shapes"}.get(task, "videoalign")
