"""Which flow shift a run uses: an explicit preset's official value, else the checkpoint's."""

import argparse
import json
import logging
import shutil
from pathlib import Path

import pytest

from wan_grpo.config import SampleConfig, add_config_arguments, build_config
from wan_grpo.errors import UserError
from wan_grpo.grpo.config import TrainConfig
from wan_grpo.runtime import load_model
from wan_grpo.tasks.shapes import LEVEL2_SHAPES_COEFS, TRAIN_DEFAULTS
from wan_grpo.tasks.shapes.verifier import DEFAULT_COEFS


def _train_config(*argv, config_file=None) -> TrainConfig:
    """The TrainConfig that `wan-grpo train` builds from these flags (and config file)."""
    parser = argparse.ArgumentParser()
    add_config_arguments(parser, TrainConfig)
    return build_config(TrainConfig, parser.parse_args(list(argv)), config_file=config_file)


def test_explicit_preset_keeps_the_official_shift_over_the_scheduler_config(tiny_ckpt, tmp_path, caplog):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_ckpt, ckpt)
    sched = ckpt / "scheduler" / "scheduler_config.json"
    cfg = json.loads(sched.read_text())
    cfg["shift"] = 3.0  # as the diffusers-format A14B repos ship (their UniPC says flow_shift 3.0)
    sched.write_text(json.dumps(cfg))
    caplog.set_level(logging.INFO, logger="wan_grpo")
    _, filled, _, _ = load_model(SampleConfig(ckpt_dir=str(ckpt), task="t2v-A14B"), load_text_encoder=False)
    assert filled.sample_shift == 12.0
    assert "official t2v-A14B value (the checkpoint's scheduler config says 3" in caplog.text
    caplog.clear()
    _, filled, _, _ = load_model(SampleConfig(ckpt_dir=str(ckpt)), load_text_encoder=False)
    assert filled.task == "t2v-A14B" and filled.sample_shift == 3.0
    assert "not the official 12 of t2v-A14B" in caplog.text
    _, filled, _, _ = load_model(SampleConfig(ckpt_dir=str(ckpt), task="t2v-A14B", sample_shift=7.0),
                                 load_text_encoder=False)
    assert filled.sample_shift == 7.0


def test_task_shapes_brings_its_measured_training_setting_below_config_files_and_flags(tmp_path):
    """train --task shapes defaults to the Shapes setting (nft-k6-d2-kl1); a config file or flag still wins, another
    task (or a task only inferred from --ckpt_dir) keeps the generic defaults, and the demo's config, which
    sets none of those keys, trains exactly that setting."""
    config = _train_config
    shapes = config("--task", "shapes")
    assert {k: getattr(shapes, k) for k in TRAIN_DEFAULTS} == TRAIN_DEFAULTS
    generic = config()
    assert generic.algorithm == "grpo" and generic.lora_rank == 32 and generic.batch_size == 1
    assert config("--task", "tiny").algorithm == "grpo"
    assert config("--ckpt_dir", "somewhere").algorithm == "grpo"  # inferred tasks bring nothing: explicit only
    flagged = config("--task", "shapes", "--algorithm", "grpo", "--lora_rank", "8")
    assert (flagged.algorithm, flagged.lora_rank, flagged.learning_rate) == ("grpo", 8, 1e-4)
    assert (flagged.nft_noise_draws, flagged.kl_coef) == (1, 0.0)  # NFT's draws and KL weight: left out, not refused
    (tmp_path / "g.yaml").write_text("task: shapes\nalgorithm: grpo\n")
    assert config(config_file=str(tmp_path / "g.yaml")).nft_noise_draws == 1
    with pytest.raises(UserError, match="--nft_noise_draws is for --algorithm nft"):  # asked for: still refused
        config("--task", "shapes", "--algorithm", "grpo", "--nft_noise_draws", "2")
    with pytest.raises(UserError, match="or --kl_coef 0"):  # the KL's full reference copy is not sharded
        config("--task", "shapes", "--dit_fsdp", "true")
    assert config("--task", "shapes", "--dit_fsdp", "true", "--kl_coef", "0").kl_coef == 0
    with pytest.raises(UserError, match="or --kl_coef 0"):
        config("--task", "shapes", "--offload_model", "true", "--algorithm", "grpo", "--kl_coef", "1")
    assert config("--task", "shapes", "--offload_model", "true", "--algorithm", "grpo").kl_coef == 0  # as before
    (tmp_path / "c.yaml").write_text("task: shapes\nlearning_rate: 3.0e-4\n")
    from_file = config(config_file=str(tmp_path / "c.yaml"))
    assert from_file.learning_rate == 3e-4 and from_file.algorithm == "nft"
    assert config("--learning_rate", "5e-4", config_file=str(tmp_path / "c.yaml")).learning_rate == 5e-4
    (tmp_path / "bad.yaml").write_text("task: [shapes]\n")  # not a name: the one-line error it always was
    with pytest.raises(UserError, match="task"):
        config(config_file=str(tmp_path / "bad.yaml"))
    demo = Path(__file__).resolve().parents[1] / "configs" / "shapes-demo.yaml"
    demo_cfg = config(config_file=str(demo))
    assert {k: getattr(demo_cfg, k) for k in TRAIN_DEFAULTS} == TRAIN_DEFAULTS and demo_cfg.max_steps == 72


def test_task_shapes_trains_level2_prompts_on_graded_shape_and_level1_or_mixed_on_accuracy(tmp_path):
    """On level-2 prompts alone (the shipped list or a file) the shapes reward's default adds the graded shape
    checks; level 1, both levels, a flag or config value, GRPO, another reward and a reward server keep what
    they had, and a prompt file that cannot be read still gets its own one-line error when loaded."""
    config = _train_config
    assert config("--task", "shapes", "--prompts", "shapes:2:train").shapes_coefs == LEVEL2_SHAPES_COEFS
    level2 = tmp_path / "l2.txt"
    level2.write_text("a red circle above a blue square\na green triangle left of a white circle\n")
    assert config("--task", "shapes", "--prompts", str(level2)).shapes_coefs == LEVEL2_SHAPES_COEFS
    mixed = tmp_path / "mixed.txt"
    mixed.write_text(level2.read_text() + "a red circle moving left\n")
    for prompts in ("shapes:1:train", "shapes:train", str(mixed), str(tmp_path / "missing.txt")):
        assert config("--task", "shapes", "--prompts", prompts).shapes_coefs == DEFAULT_COEFS, prompts
    assert config("--task", "shapes").shapes_coefs == DEFAULT_COEFS  # the built-in prompts: not Shapes ones
    for extra in (["--shapes_coefs", "accuracy=1"], ["--algorithm", "grpo"], ["--reward", "brightness"],
                  ["--reward_url", "http://127.0.0.1:1"]):
        assert config("--task", "shapes", "--prompts", "shapes:2:train", *extra).shapes_coefs == DEFAULT_COEFS, extra
    assert config("--task", "shapes", "--prompts", "shapes:2:train", "--reward", "shapes:1,brightness:0.5"
                  ).shapes_coefs == LEVEL2_SHAPES_COEFS
    # an empty --reward means the task's reward to the trainer (shapes), so here too
    assert config("--task", "shapes", "--prompts", "shapes:2:train", "--reward", "").shapes_coefs == LEVEL2_SHAPES_COEFS
    (tmp_path / "c.yaml").write_text("task: shapes\nprompts: shapes:2:val\nshapes_coefs: accuracy=1,partial=1\n")
    assert config(config_file=str(tmp_path / "c.yaml")).shapes_coefs == "accuracy=1,partial=1"
    assert config("--prompts", "shapes:2:train").shapes_coefs == DEFAULT_COEFS  # no explicit --task: generic


def test_the_shapes_default_is_the_setting_the_learning_benchmark_measured(monkeypatch):
    """benchmarks/shapes_learning.py's nft-k6-d2-kl1 (its flags on a generic config) is TRAIN_DEFAULTS, and its
    nft-k6-d2-kl1-shape is what --task shapes trains on level-2 prompts, so the numbers in docs/benchmarks.md
    are those of what --task shapes trains."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import shapes_learning

    flags = [*shapes_learning.COMMON, *shapes_learning.SETTINGS["nft-k6-d2-kl1"]]
    measured = _train_config(*flags)  # no --task: the generic defaults below
    assert {k: getattr(measured, k) for k in TRAIN_DEFAULTS} == TRAIN_DEFAULTS
    training = {f[2:] for f in flags if f.startswith("--")} - {"tensorboard", "log_interval"}  # logging only
    assert training == set(TRAIN_DEFAULTS)  # and nothing the benchmark sets is missing from the defaults
    graded = _train_config(*shapes_learning.COMMON, *shapes_learning.SETTINGS["nft-k6-d2-kl1-shape"])
    level2 = _train_config("--task", "shapes", "--prompts", "shapes:2:train")
    assert {k: getattr(graded, k) for k in [*TRAIN_DEFAULTS, "shapes_coefs"]} == \
        {k: getattr(level2, k) for k in [*TRAIN_DEFAULTS, "shapes_coefs"]}
