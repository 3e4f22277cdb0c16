"""A tiny random VideoReward in the released layout, for tests and the score demo.

``base/`` is a Qwen2-VL folder as the hub ships Qwen2-VL-2B-Instruct: flat config.json, weights
in the transformers-4.45 key names (``model.layers.*``, ``visual.*``), a byte-level BPE tokenizer
with Qwen's special tokens, preprocessor_config.json and the chat template. ``videoreward/`` has
model_config.json with the official fields and ``checkpoint-1/model.pth``: the full PEFT state
dict (LoRA r 8 unmerged, non-zero B) in 4.45 names, whose non-LoRA weights differ from the base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, PreTrainedTokenizerFast

from wan_grpo.rewards.videoalign.loading import PEFT_PREFIX, lora_targets
from wan_grpo.rewards.videoalign.model import REWARD_TOKENS, VideoRewardModel
from wan_grpo.rewards.videoalign.preprocess import CLIP_MEAN, CLIP_STD, MAX_PIXELS, MIN_PIXELS
from wan_grpo.rewards.videoalign.scorer import _asset

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
INFERENCE_CONFIG = {"VQ_mean": 3.6757, "VQ_std": 2.2476, "MQ_mean": 1.1646, "MQ_std": 1.3811,
                    "TA_mean": 2.8105, "TA_std": 2.5121}
LORA_R, LORA_ALPHA = 8, 16


def _tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    corpus = [_asset("detailed_special_prompt.txt"), "a cat running on the grass. a red car at night."]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=32768)
    fast.add_special_tokens({"additional_special_tokens": list(QWEN_SPECIALS)})
    fast.eos_token, fast.pad_token = "<|im_end|>", "<|endoftext|>"
    return fast


def _flat_config(tok: PreTrainedTokenizerFast) -> dict:
    ids = dict(zip(QWEN_SPECIALS, tok.convert_tokens_to_ids(list(QWEN_SPECIALS))))
    return {
        "architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl",
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 1, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "max_position_embeddings": 32768, "max_window_layers": 2, "sliding_window": 32768,
        "use_sliding_window": False, "attention_dropout": 0.0, "initializer_range": 0.2,
        "vocab_size": len(tok) + 40,  # like the hub's 151936 rows for 151657 tokens: resize shrinks it
        "tie_word_embeddings": True, "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"], "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"], "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "torch_dtype": "bfloat16", "use_cache": True,
        "vision_config": {"depth": 2, "embed_dim": 16, "mlp_ratio": 2, "num_heads": 2, "in_chans": 3,
                          "hidden_size": 32, "patch_size": 14, "spatial_merge_size": 2, "spatial_patch_size": 14,
                          "temporal_patch_size": 2},
    }


def to_legacy_keys(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """transformers >= 4.52 names -> the 4.45 names the hub weights and VideoReward's model.pth use."""
    out = {}
    for key, value in state.items():
        rest = key[len(prefix):]
        if rest.startswith("model.visual."):
            rest = rest[len("model."):]
        elif rest.startswith("model.language_model."):
            rest = "model." + rest[len("model.language_model."):]
        out[prefix + rest] = value.detach().clone().contiguous()
    return out


def model_config_json(base_name: str) -> dict:
    """model_config.json with the released VideoReward's fields and values."""
    return {
        "data_config": {"meta_data": "", "data_dir": "", "max_frame_pixels": MAX_PIXELS, "num_frames": None,
                        "fps": 2.0, "p_shuffle_frames": 0.0, "p_color_jitter": 0.0, "eval_dim": ["VQ", "MQ", "TA"],
                        "prompt_template_type": "detailed_special", "add_noise": False, "sample_type": "uniform",
                        "use_tied_data": True},
        "model_config": {"model_name_or_path": base_name, "model_revision": "main", "output_dim": 1,
                         "use_special_tokens": True, "freeze_vision_tower": False, "freeze_llm": False,
                         "tune_merger": True, "torch_dtype": "bfloat16", "trust_remote_code": False,
                         "attn_implementation": "flash_attention_2", "load_in_8bit": False, "load_in_4bit": False,
                         "bnb_4bit_quant_type": "nf4", "use_bnb_nested_quant": False, "reward_token": "special",
                         "loss_type": "regular"},
        "peft_lora_config": {"lora_enable": True, "vision_lora": False, "lora_r": LORA_R, "lora_alpha": LORA_ALPHA,
                             "lora_dropout": 0.05, "lora_target_modules": None,
                             "lora_namespan_exclude": ["lm_head", "rm_head", "embed_tokens", "visual"],
                             "lora_modules_to_save": None, "lora_task_type": "CAUSAL_LM", "use_rslora": False,
                             "num_lora_modules": -1},
        "inference_config": dict(INFERENCE_CONFIG),
    }


def save_tiny_videoreward(root: str | Path, *, seed: int = 0, base_name: str = "Qwen/Qwen2-VL-2B-Instruct",
                          return_model: bool = False):
    """Write ``root/base`` and ``root/videoreward``; returns (videoreward_dir, base_dir[, peft model]).

    With ``return_model`` the in-memory PEFT model (LoRA unmerged, transformers' own classes) is
    returned too, as an independent reference for the loader and scorer.
    """
    from peft import LoraConfig, get_peft_model

    root = Path(root)
    base, reward = root / "base", root / "videoreward"
    base.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tok = _tokenizer()
        tok.save_pretrained(base)
        tok_cfg = json.loads((base / "tokenizer_config.json").read_text())
        tok_cfg.update(tokenizer_class="Qwen2Tokenizer", chat_template=_asset("qwen2vl_chat_template.jinja"))
        (base / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
        (base / "config.json").write_text(json.dumps(_flat_config(tok), indent=2))
        (base / "preprocessor_config.json").write_text(json.dumps({
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor",
            "min_pixels": MIN_PIXELS, "max_pixels": 12845056, "patch_size": 14, "temporal_patch_size": 2,
            "merge_size": 2, "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD),
            "do_rescale": True, "do_normalize": True, "do_resize": True, "do_convert_rgb": True}, indent=2))
        (base / "chat_template.json").write_text(json.dumps({"chat_template": _asset("qwen2vl_chat_template.jinja")}))

        model = VideoRewardModel(AutoConfig.from_pretrained(base), output_dim=1).float()
        base_state = {k: v for k, v in model.state_dict().items() if not k.startswith(("rm_head", "lm_head"))}
        save_file(to_legacy_keys(base_state), str(base / "model.safetensors"), metadata={"format": "pt"})

        # VideoAlign trains everything but the frozen LLM base layers: move all weights off the base.
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        tok.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
        model.resize_token_embeddings(len(tok))
        peft_model = get_peft_model(model, LoraConfig(
            target_modules=lora_targets(model, ["lm_head", "rm_head", "embed_tokens", "visual"]), r=LORA_R,
            lora_alpha=LORA_ALPHA, lora_dropout=0.05, task_type="CAUSAL_LM", bias="none"))
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn_like(p))
        peft_model.eval()
        ckpt = reward / "checkpoint-1"
        ckpt.mkdir(parents=True, exist_ok=True)
        torch.save(to_legacy_keys(peft_model.state_dict(), PEFT_PREFIX), ckpt / "model.pth")
    (reward / "model_config.json").write_text(json.dumps(model_config_json(base_name), indent=2))
    model.reward_token_ids = tuple(tok.convert_tokens_to_ids(list(REWARD_TOKENS)))
    return (reward, base, peft_model) if return_model else (reward, base)
