"""VideoReward loading and scoring on a tiny random checkpoint in the released layout."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from wan_grpo.errors import UserError
from wan_grpo.rewards.videoalign.loading import PEFT_PREFIX, load_videoreward
from wan_grpo.rewards.videoalign.scorer import VideoAlignReward
from wan_grpo.rewards.videoalign.tiny import INFERENCE_CONFIG, LORA_ALPHA, LORA_R, save_tiny_videoreward


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    return save_tiny_videoreward(tmp_path_factory.mktemp("videoreward"), return_model=True)


@pytest.fixture(scope="module")
def reward(released):
    reward_dir, base, _ = released
    return VideoAlignReward(load_videoreward(reward_dir, base=str(base)), batch_size=4)


def _videos(n=3, frames=9, size=(64, 80), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (frames, *size, 3), generator=g, dtype=torch.uint8) for _ in range(n)]


PROMPTS = ["a cat running on the grass", "a red car at night", "a cat"]


def test_fixture_is_in_the_released_layout(released):
    reward_dir, base, _ = released
    base_keys = load_file(base / "model.safetensors").keys()
    assert any(k.startswith("model.layers.0.") for k in base_keys)  # transformers-4.45 names
    assert any(k.startswith("visual.blocks.0.") for k in base_keys)
    assert not any("language_model" in k for k in base_keys)
    state = torch.load(reward_dir / "checkpoint-1" / "model.pth", weights_only=True)
    assert f"{PEFT_PREFIX}model.layers.0.self_attn.q_proj.base_layer.weight" in state
    assert f"{PEFT_PREFIX}visual.patch_embed.proj.weight" in state
    assert state[f"{PEFT_PREFIX}rm_head.weight"].shape == (1, 32)
    lora_b = [v for k, v in state.items() if "lora_B.default" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    assert not any("lora" in k for k in state if ".visual." in k)  # no LoRA in the vision tower


def test_loaded_model_matches_unmerged_peft_reference(released, reward):
    """Our merged model + 1-D positions == transformers' own Qwen2VLModel on the unmerged PEFT model."""
    _, _, peft_model = released
    videos = _videos()
    items = [reward.encode(v, p, 8) for v, p in zip(videos, PROMPTS)]
    batch = reward.collate(items)
    inner = peft_model.base_model.model
    ids = batch["input_ids"]
    positions = torch.arange(ids.shape[1]).view(1, 1, -1).expand(3, ids.shape[0], -1)
    with torch.no_grad():
        hidden = inner.model(input_ids=ids, attention_mask=batch["attention_mask"],
                             pixel_values_videos=batch["pixel_values_videos"],
                             video_grid_thw=batch["video_grid_thw"], position_ids=positions).last_hidden_state
        logits = inner.rm_head(hidden)[..., 0]
    special = torch.isin(ids, torch.tensor(inner.reward_token_ids))
    expected = logits[special].view(len(videos), 3)
    got = reward.raw_scores(videos, PROMPTS, fps=8)
    assert torch.allclose(got, expected, atol=1e-5), (got, expected)


def test_weights_come_from_model_pth_not_the_base(released, reward):
    reward_dir, base, _ = released
    base_w = load_file(base / "model.safetensors")["visual.patch_embed.proj.weight"]
    ckpt_w = torch.load(reward_dir / "checkpoint-1" / "model.pth", weights_only=True)[
        f"{PEFT_PREFIX}visual.patch_embed.proj.weight"]
    loaded = reward.model.model.visual.patch_embed.proj.weight
    assert torch.equal(loaded, ckpt_w) and not torch.allclose(loaded, base_w)
    assert reward.model.get_input_embeddings().weight.shape[0] == len(reward.tokenizer)
    assert reward.model.lm_head.weight.data_ptr() == reward.model.get_input_embeddings().weight.data_ptr()


def test_scores_are_deterministic_batched_and_sensitive(reward):
    videos = _videos()
    a = reward(videos, PROMPTS, fps=8)
    b = reward(videos, PROMPTS, fps=8)
    assert set(a) == {"VQ", "MQ", "TA"} and all(torch.equal(a[k], b[k]) for k in a)
    one_by_one = {k: torch.cat([reward([v], [p], fps=8)[k] for v, p in zip(videos, PROMPTS)]) for k in a}
    for k in a:
        assert torch.allclose(a[k], one_by_one[k], atol=1e-5)
    # A different video changes every component.
    other = reward([_videos(1, seed=7)[0]], [PROMPTS[0]], fps=8)
    assert all(abs(float(other[k][0] - a[k][0])) > 1e-6 for k in a)
    # The text prompt sits after the VQ and MQ tokens: under causal attention it changes TA only.
    swapped = reward([videos[0]], ["a completely different prompt about boats"], fps=8)
    assert float(swapped["VQ"][0]) == pytest.approx(float(a["VQ"][0]), abs=1e-6)
    assert float(swapped["MQ"][0]) == pytest.approx(float(a["MQ"][0]), abs=1e-6)
    assert abs(float(swapped["TA"][0] - a["TA"][0])) > 1e-6


def test_normalisation_uses_inference_config(released, reward):
    reward_dir, base, _ = released
    raw = VideoAlignReward(load_videoreward(reward_dir, base=str(base)), raw=True)
    videos = _videos(2)
    r, n = raw(videos, PROMPTS[:2], fps=8), reward(videos, PROMPTS[:2], fps=8)
    for k in ("VQ", "MQ", "TA"):
        expected = (r[k] - INFERENCE_CONFIG[f"{k}_mean"]) / INFERENCE_CONFIG[f"{k}_std"]
        assert torch.allclose(n[k], expected, atol=1e-6)


def test_fallback_adapter_files_merge_lora_into_base_weights(released, tmp_path):
    """adapter_model.safetensors + non_lora_state_dict.pth: LLM base layers come from the base."""
    reward_dir, base, _ = released
    root = tmp_path / "fallback"
    shutil.copytree(reward_dir, root, ignore=shutil.ignore_patterns("model.pth"))
    state = torch.load(reward_dir / "checkpoint-1" / "model.pth", weights_only=True)
    adapter = {k.replace(".default", ""): v for k, v in state.items() if ".lora_" in k}
    non_lora = {k: v for k, v in state.items() if ".lora_" not in k and ".base_layer." not in k}
    save_file(adapter, str(root / "checkpoint-1" / "adapter_model.safetensors"))
    torch.save(non_lora, root / "checkpoint-1" / "non_lora_state_dict.pth")
    loaded = load_videoreward(root, base=str(base)).model
    name = "model.layers.1.mlp.down_proj"
    a = state[f"{PEFT_PREFIX}{name}.lora_A.default.weight"]
    b = state[f"{PEFT_PREFIX}{name}.lora_B.default.weight"]
    base_w = load_file(base / "model.safetensors")[f"{name}.weight"]
    expected = base_w + (LORA_ALPHA / LORA_R) * b @ a
    got = loaded.model.language_model.layers[1].mlp.down_proj.weight
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(loaded.rm_head.weight, state[f"{PEFT_PREFIX}rm_head.weight"])


def test_bad_inputs_give_one_line_errors(released, tmp_path):
    reward_dir, base, _ = released
    with pytest.raises(UserError, match="--videoalign_base"):
        load_videoreward(reward_dir)  # model_name_or_path is a hub id; there is no hub here
    with pytest.raises(UserError, match="model_config.json"):
        load_videoreward(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(reward_dir, broken)
    state = torch.load(broken / "checkpoint-1" / "model.pth", weights_only=True)
    state.pop(f"{PEFT_PREFIX}model.layers.0.mlp.up_proj.lora_B.default.weight")
    torch.save(state, broken / "checkpoint-1" / "model.pth")
    with pytest.raises(UserError, match="missing.*up_proj"):
        load_videoreward(broken, base=str(base))
    cfg = json.loads((reward_dir / "model_config.json").read_text())
    cfg["data_config"]["prompt_template_type"] = "simple"
    other = tmp_path / "other"
    shutil.copytree(reward_dir, other)
    (other / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="detailed_special"):
        load_videoreward(other, base=str(base))
    cfg = json.loads((reward_dir / "model_config.json").read_text())
    cfg["data_config"]["num_frames"] = 8
    (other / "model_config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="num_frames"):
        load_videoreward(other, base=str(base))
