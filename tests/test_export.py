"""wan-grpo export: a trained LoRA in ComfyUI's format (original Wan keys, alpha per layer) loads in
diffusers' WanPipeline and gives the same latents as the diffusers-format LoRA, for both experts."""

import pytest
import torch
from pipelines import pipeline_latents, tiny_pipeline
from safetensors.torch import load_file

from wan_grpo.cli import main


@pytest.fixture(scope="module")
def lora_checkpoint(tmp_path_factory, tiny_ckpt):
    save_dir = tmp_path_factory.mktemp("export") / "run"
    # alpha 8 != rank 4: a dropped or misread alpha changes the LoRA's scale
    assert main(["train", "--ckpt_dir", str(tiny_ckpt), "--reward", "brightness", "--size", "64*48",
                 "--frame_num", "5", "--sampling_steps", "8", "--sample_shift", "5", "--num_generations", "4",
                 "--max_steps", "2", "--lora_rank", "4", "--lora_alpha", "8", "--learning_rate", "5e-2",
                 "--tensorboard", "false", "--save_dir", str(save_dir)]) == 0
    return save_dir / "checkpoint-2"


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_comfyui_lora_gives_the_diffusers_loras_latents(tmp_path, tiny_ckpt, lora_checkpoint):
    out = tmp_path / "comfy"
    assert main(["export", "--checkpoint", str(lora_checkpoint), "--format", "comfyui", "--output", str(out)]) == 0
    high, low = out / "high_noise_model_lora.safetensors", out / "low_noise_model_lora.safetensors"
    state = load_file(high)
    assert all(k.startswith("diffusion_model.blocks.") for k in state)
    assert state["diffusion_model.blocks.0.self_attn.q.alpha"].item() == 8.0
    assert "diffusion_model.blocks.0.cross_attn.o.lora_B.weight" in state
    assert "diffusion_model.blocks.0.ffn.2.alpha" in state

    pipe = tiny_pipeline(tiny_ckpt)
    base = pipeline_latents(pipe, "A cat walking in snow")
    pipe.load_lora_weights(lora_checkpoint / "transformer", adapter_name="high")
    pipe.load_lora_weights(lora_checkpoint / "transformer_2", adapter_name="low", load_into_transformer_2=True)
    ours = pipeline_latents(pipe, "A cat walking in snow")

    comfy = tiny_pipeline(tiny_ckpt)
    comfy.load_lora_weights(str(high), adapter_name="high")
    comfy.load_lora_weights(str(low), adapter_name="low", load_into_transformer_2=True)
    theirs = pipeline_latents(comfy, "A cat walking in snow")
    assert rel(ours, base) > 1e-2  # the LoRAs matter
    assert rel(theirs, ours) <= 1e-4


def test_merged_export_is_base_plus_lora(tmp_path, tiny_ckpt, lora_checkpoint):
    """The whole pipeline with both LoRAs fused in: loaded by WanPipeline.from_pretrained, the same latents
    as the base with the LoRAs loaded (the run's --ckpt_dir is found in the checkpoint), and a model card."""
    from diffusers import WanPipeline

    out = tmp_path / "merged"
    assert main(["export", "--checkpoint", str(lora_checkpoint), "--format", "merged", "--output", str(out)]) == 0
    pipe = tiny_pipeline(tiny_ckpt)
    pipe.load_lora_weights(lora_checkpoint / "transformer", adapter_name="high")
    pipe.load_lora_weights(lora_checkpoint / "transformer_2", adapter_name="low", load_into_transformer_2=True)
    with_lora = pipeline_latents(pipe, "A cat walking in snow")
    merged = WanPipeline.from_pretrained(out)
    assert not merged.transformer.peft_config if hasattr(merged.transformer, "peft_config") else True
    merged.scheduler = pipe.scheduler
    merged.set_progress_bar_config(disable=True)
    assert rel(pipeline_latents(merged, "A cat walking in snow"), with_lora) <= 1e-4
    card = (out / "README.md").read_text()
    assert "step 2" in card and str(tiny_ckpt) in card and "from_pretrained" in card


def test_diffusers_export_copies_the_expert_folders(tmp_path, lora_checkpoint):
    out = tmp_path / "diffusers"
    assert main(["export", "--checkpoint", str(lora_checkpoint), "--format", "diffusers", "--output", str(out)]) == 0
    for sub in ("transformer", "transformer_2"):
        a = load_file(out / sub / "pytorch_lora_weights.safetensors")
        b = load_file(lora_checkpoint / sub / "pytorch_lora_weights.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_errors_are_one_line(tmp_path, capsys, lora_checkpoint):
    (tmp_path / "full").mkdir()
    assert main(["export", "--checkpoint", str(tmp_path / "nope"), "--output", str(tmp_path / "o1")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("keep me")
    assert main(["export", "--checkpoint", str(lora_checkpoint), "--output", str(tmp_path / "taken")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert (tmp_path / "taken" / "x").read_text() == "keep me"


# ----------------------------------------------------------------------------- --init_lora


def build(tiny_ckpt, **overrides):
    """The run's model with its policy built from a TrainConfig (as train's set-up does)."""
    from wan_grpo.grpo.config import TrainConfig
    from wan_grpo.grpo.policy import build_policy
    from wan_grpo.runtime import load_model

    cfg = TrainConfig(**{"ckpt_dir": str(tiny_ckpt), "reward": "brightness", "lora_rank": 4, "lora_alpha": 8.0,
                         **overrides})
    components, cfg, device, _ = load_model(cfg, load_text_encoder=False)
    return components, build_policy(components, cfg, device=device)


def forward(model):
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(2, 16, 2, 6, 8, generator=g), torch.randn(2, 12, 32, generator=g)
    with torch.no_grad():
        return model(hidden_states=x, timestep=torch.tensor([900.0, 300.0]), encoder_hidden_states=ctx,
                     return_dict=False)[0]


@pytest.fixture(scope="module")
def comfy_files(tmp_path_factory, lora_checkpoint):
    out = tmp_path_factory.mktemp("comfy") / "out"
    assert main(["export", "--checkpoint", str(lora_checkpoint), "--format", "comfyui", "--output", str(out)]) == 0
    return out / "high_noise_model_lora.safetensors", out / "low_noise_model_lora.safetensors"


@pytest.mark.parametrize("source", ["comfyui", "diffusers"])
def test_init_lora_reproduces_the_loras_outputs_before_the_first_update(tiny_ckpt, lora_checkpoint, comfy_files,
                                                                        source):
    files = comfy_files if source == "comfyui" else (lora_checkpoint / "transformer", lora_checkpoint / "transformer_2")
    # a different --lora_alpha: the file's own scale is carried over
    components, policy = build(tiny_ckpt, init_lora=",".join(map(str, files)), lora_alpha=16.0)
    reference = tiny_pipeline(tiny_ckpt)
    reference.load_lora_weights(lora_checkpoint / "transformer", adapter_name="high")
    reference.load_lora_weights(lora_checkpoint / "transformer_2", adapter_name="low", load_into_transformer_2=True)
    for sub in ("transformer", "transformer_2"):
        ours, theirs = forward(getattr(components, sub)), forward(getattr(reference, sub))
        assert rel(ours, theirs) <= 1e-5
        assert rel(theirs, forward(getattr(tiny_pipeline(tiny_ckpt), sub))) > 1e-3  # the LoRA matters
    assert policy.params  # the initialised adapters are what trains


def test_init_lora_fuse_mode_makes_the_frozen_weights_base_plus_lora(tiny_ckpt, lora_checkpoint, comfy_files):
    components, policy = build(tiny_ckpt, init_lora=",".join(map(str, comfy_files)), init_lora_mode="fuse")
    fused = tiny_pipeline(tiny_ckpt)
    fused.load_lora_weights(lora_checkpoint / "transformer", adapter_name="high")
    fused.load_lora_weights(lora_checkpoint / "transformer_2", adapter_name="low", load_into_transformer_2=True)
    fused.fuse_lora(components=["transformer"], adapter_names=["high"])
    fused.fuse_lora(components=["transformer_2"], adapter_names=["low"])
    fused.unload_lora_weights()
    for sub in ("transformer", "transformer_2"):
        model = getattr(components, sub)
        frozen = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
        expected = getattr(fused, sub).state_dict()
        assert frozen.keys() == expected.keys()
        assert max((frozen[k] - expected[k]).abs().max().item() for k in expected) <= 1e-6
        # the new trainable adapter starts at zero: outputs are base + LoRA
        assert rel(forward(model), forward(getattr(fused, sub))) <= 1e-5


def test_init_lora_errors_are_one_line(tmp_path, capsys, tiny_ckpt):
    argv = ["train", "--ckpt_dir", str(tiny_ckpt), "--reward", "brightness", "--save_dir", str(tmp_path / "r")]
    assert main([*argv, "--init_lora", str(tmp_path / "missing.safetensors")]) == 2
    assert "--init_lora" in capsys.readouterr().err and not (tmp_path / "r").exists()


def test_shapes_model_card_says_how_to_call_the_pipeline(tmp_path):
    """The Shapes model needs 16-token prompts in WanPipeline, and num_frames one fewer when its VAE does not
    compress time (WanPipeline then adds one); test_sample_parity checks the shipped base's call."""
    import shutil

    from wan_grpo.model_card import model_card
    from wan_grpo.tasks.shapes import BASE_DIR, VAE_WARM_START

    shapes = model_card({"task": "shapes", "lora_rank": 16, "ckpt_dir": str(BASE_DIR)}, 10)
    assert "max_sequence_length=16" in shapes and "num_frames=9" in shapes and "one frame fewer" not in shapes
    shutil.copytree(BASE_DIR / "tokenizer", tmp_path / "tokenizer")
    (tmp_path / "vae").mkdir()
    shutil.copy(VAE_WARM_START / "config.json", tmp_path / "vae")  # the previous base's: no time compression
    older = model_card({"task": "shapes", "lora_rank": 16, "ckpt_dir": str(tmp_path)}, 10)
    assert "num_frames=8" in older and "one frame fewer" in older
    assert "max_sequence_length" not in model_card({"task": "t2v-A14B", "lora_rank": 16, "ckpt_dir": "base"}, 10)
