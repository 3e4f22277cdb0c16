"""Official Wan2.2 sampling settings per model (Wan-Video/Wan2.2 wan/configs), and those of our two
small models: the random tiny model and the Shapes model."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Preset:
    size: str
    frame_num: int
    fps: int
    sampling_steps: int
    shift: float  # the official shift; a diffusers checkpoint's scheduler config wins unless --sample_shift
    guidance_scale: float  # high-noise expert (transformer)
    guidance_scale_2: float  # low-noise expert (transformer_2)


PRESETS = {
    "tiny": Preset("64*64", 5, 8, 8, 5.0, 4.0, 3.0),
    "shapes": Preset("64*64", 9, 8, 10, 3.0, 4.0, 4.0),
    "t2v-A14B": Preset("1280*720", 81, 16, 40, 12.0, 4.0, 3.0),
    "i2v-A14B": Preset("1280*720", 81, 16, 40, 5.0, 3.5, 3.5),
    "ti2v-5B": Preset("1280*704", 121, 24, 50, 5.0, 5.0, 5.0),
}


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
