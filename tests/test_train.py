"""`wan-grpo train` on the tiny model: learning, on-policy ratios, expert routing, LoRA export, resume."""

import json
import logging
from pathlib import Path

import pytest
import torch
from pipelines import pipeline_latents, tiny_pipeline
from safetensors.torch import load_file

from wan_grpo.cli import main
from wan_grpo.grpo import replay
from wan_grpo.grpo.metrics import read_metrics
from wan_grpo.rewards import builtin

FAST = ["--task", "tiny", "--num_generations", "4", "--tensorboard", "false", "--log_interval", "0"]


def train(tmp_path, name, *args):
    save_dir = tmp_path / name
    assert main(["train", *FAST, "--save_dir", str(save_dir), *args]) == 0
    return save_dir, read_metrics(save_dir)


@pytest.mark.slow
def test_demo_config_raises_reward(tmp_path):
    save_dir = tmp_path / "demo"
    config = Path(__file__).resolve().parents[1] / "configs" / "tiny-demo.yaml"
    assert main(["train", "--config", str(config), "--save_dir", str(save_dir),
                 "--tensorboard", "false", "--log_interval", "0", "--sample_interval", "20"]) == 0
    rows = read_metrics(save_dir)
    assert [r["step"] for r in rows] == list(range(1, 41))
    first = sum(r["reward_mean"] for r in rows[:10]) / 10
    last = sum(r["reward_mean"] for r in rows[-10:]) / 10
    within_group_std = sum(r["reward_std"] for r in rows[:10]) / 10
    assert last - first > 0.015, (first, last)  # measured +0.027, about 10x the reward std
    assert last - first > 5 * within_group_std
    for key in ("reward_brightness_mean", "advantage_abs_mean", "loss", "ratio_mean", "clipfrac", "approx_kl",
                "grad_norm_high", "grad_norm_low", "trained_steps_high", "trained_steps_low", "lr_high", "lr_low",
                "rollout_seconds", "reward_seconds", "train_seconds"):
        assert key in rows[0]
    assert (save_dir / "samples" / "step-000020.mp4").stat().st_size > 0
    assert (save_dir / "checkpoint-20" / "transformer" / "config.json").is_file()
    assert (save_dir / "checkpoint-40" / "transformer_2" / "diffusion_pytorch_model.safetensors").is_file()
    assert "lora_rank: 0" in (save_dir / "config.yaml").read_text()


def test_ratio_is_one_on_policy_and_moves_off_policy(tmp_path):
    _, rows = train(tmp_path, "k1", "--max_steps", "3", "--lora_rank", "0", "--learning_rate", "1e-2")
    assert all(abs(r["ratio_mean"] - 1) <= 1e-6 and r["clipfrac"] == 0 for r in rows)
    assert all(r["trained_steps_high"] > 0 and r["trained_steps_low"] > 0 for r in rows)
    _, rows = train(tmp_path, "k4", "--max_steps", "8", "--lora_rank", "0", "--learning_rate", "1e-2",
                    "--optimizer_steps_per_rollout", "4")
    assert [r["step"] for r in rows] == list(range(1, 9))
    firsts = [r for r in rows if (r["step"] - 1) % 4 == 0]
    laters = [r for r in rows if (r["step"] - 1) % 4 != 0]
    assert all(abs(r["ratio_mean"] - 1) <= 1e-6 for r in firsts)
    assert max(abs(r["ratio_mean"] - 1) for r in laters) > 1e-5
    assert max(r["clipfrac"] for r in laters) > 0


def test_gradients_reach_only_the_expert_that_owns_the_step(tmp_path, monkeypatch):
    current = {}
    events = []
    original = replay.replay_transitions

    def recording_replay(denoiser, traj, sample_idx, step_idx, *args, **kwargs):
        current["t"] = traj.timesteps[step_idx].clone()
        if not current.get("hooked"):
            for name, model in (("transformer", denoiser.experts[0]), ("transformer_2", denoiser.experts[1])):
                for p in model.parameters():
                    if p.requires_grad:
                        p.register_hook(lambda g, name=name: events.append((name, current["t"].clone())))
            current["hooked"] = True
        return original(denoiser, traj, sample_idx, step_idx, *args, **kwargs)

    monkeypatch.setattr(replay, "replay_transitions", recording_replay)
    from wan_grpo.models import tiny

    before = tiny.build_tiny_components(0)
    save_dir, rows = train(tmp_path, "hooks", "--max_steps", "2", "--lora_rank", "0", "--learning_rate", "1e-3",
                           "--train_batch_size", "3")
    assert {n for n, _ in events} == {"transformer", "transformer_2"}
    for name, t in events:
        assert ((t >= 875).all() if name == "transformer" else (t < 875).all()), (name, t)
    # both experts' weights changed
    for sub, model in (("transformer", before.transformer), ("transformer_2", before.transformer_2)):
        trained = load_file(save_dir / "checkpoint-2" / sub / "diffusion_pytorch_model.safetensors")
        changed = [k for k, v in model.state_dict().items() if not torch.equal(v, trained[k])]
        assert len(changed) > 0.9 * len(trained), sub


def test_one_expert_frozen_gets_no_updates(tmp_path):
    save_dir, rows = train(tmp_path, "low", "--max_steps", "1", "--train_experts", "low", "--lora_rank", "2")
    assert rows[0]["trained_steps_high"] == 0 and rows[0]["trained_steps_low"] > 0
    assert rows[0]["grad_norm_high"] == 0
    assert not (save_dir / "checkpoint-1" / "transformer").exists()


def test_warns_when_an_expert_owns_no_trainable_step(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="wan_grpo"):
        train(tmp_path, "win", "--max_steps", "1", "--sde_window", "5:8", "--lora_rank", "2")
    assert "high expert owns none of the trainable steps" in caplog.text


def test_lora_loads_into_diffusers_pipeline(tmp_path, tiny_ckpt):
    save_dir = tmp_path / "lora"
    assert main(["train", "--ckpt_dir", str(tiny_ckpt), "--reward", "brightness", "--size", "64*48",
                 "--frame_num", "5", "--sampling_steps", "8", "--sample_shift", "5", "--num_generations", "4",
                 "--max_steps", "2", "--lora_rank", "4", "--learning_rate", "5e-2", "--tensorboard", "false",
                 "--save_dir", str(save_dir)]) == 0
    ckpt = save_dir / "checkpoint-2"

    def run(pipe):
        return pipeline_latents(pipe, "A cat walking in snow")

    pipe = tiny_pipeline(tiny_ckpt)
    base = run(pipe)
    pipe.load_lora_weights(ckpt / "transformer", adapter_name="high")
    high_only = run(pipe)
    pipe.load_lora_weights(ckpt / "transformer_2", adapter_name="low", load_into_transformer_2=True)
    both = run(pipe)
    assert "high" in pipe.transformer.peft_config and "low" in pipe.transformer_2.peft_config
    assert (high_only - base).abs().max() > 1e-4
    assert (both - high_only).abs().max() > 1e-4
    # `wan-grpo sample --lora` with the same checkpoint gives diffusers' latents: a wrong LoRA alpha or
    # scale would move them by about the LoRA's own effect, which is far above the tolerance.
    out = tmp_path / "ours.safetensors"
    assert main(["sample", "--ckpt_dir", str(tiny_ckpt), "--lora", str(ckpt), "--prompt", "A cat walking in snow",
                 "--negative_prompt", "", "--seed", "0", "--sampling_steps", "8", "--sample_shift", "5",
                 "--size", "64*48", "--frame_num", "5", "--guidance_scale", "4", "--guidance_scale_2", "3",
                 "--sample_solver", "euler", "--output", str(tmp_path / "ours.mp4"), "--save_latents", str(out)]) == 0
    ours = load_file(out)["latents"]
    rel = lambda a, b: float((a - b).norm() / b.norm())  # noqa: E731
    assert rel(both, base) > 1e-2
    assert rel(ours, both) <= 1e-4
    state = torch.load(ckpt / "training_state.pt", weights_only=False)
    assert state["step"] == 2 and state["lora"] and "scheduler" in state and "rng" in state
    assert (ckpt / "dcp" / ".metadata").is_file()  # sharded weights + optimizer


def test_resume_reproduces_uninterrupted_run(tmp_path, capsys):
    common = ("--max_steps", "4", "--lora_rank", "0", "--learning_rate", "1e-2", "--num_epochs", "10")
    full_dir, full = train(tmp_path, "full", *common)
    part_dir, _ = train(tmp_path, "part", *common[2:], "--max_steps", "2")
    other = tmp_path / "other.txt"  # the run's batches come from its prompt list: another one cannot resume it
    other.write_text("A cat walking in snow\nA dog running on a beach\n")
    assert main(["train", *FAST, "--save_dir", str(part_dir), *common, "--prompts", str(other),
                 "--resume", "auto"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wan-grpo")]
    assert len(err) == 1 and "--prompts now gives 2 prompts, not the 5" in err[0], err
    assert sorted(c.name for c in part_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    # a leftover temp folder (a crash mid-save) is ignored by --resume auto
    (part_dir / ".checkpoint-3.tmp999").mkdir()
    _, resumed = train(tmp_path, "part", *common, "--resume", "auto")
    _assert_same_run(full_dir, full, part_dir, resumed, step=4)


def test_resume_when_an_expert_has_had_no_gradient(tmp_path):
    """--sde_window 0:1 trains only the first (high-noise) step, so transformer_2 has no optimizer state
    when the checkpoint is written; resuming must not expect one (it raised 'Missing key ... step')."""
    common = ("--lora_rank", "0", "--learning_rate", "1e-2", "--num_epochs", "10", "--sde_window", "0:1")
    full_dir, full = train(tmp_path, "full", *common, "--max_steps", "2", "--save_interval", "1")
    low = [load_file(full_dir / f"checkpoint-{n}" / "transformer_2" / "diffusion_pytorch_model.safetensors")
           for n in (1, 2)]
    assert all(torch.equal(low[0][k], low[1][k]) for k in low[0])  # the premise: no gradient reached it
    part_dir, _ = train(tmp_path, "part", *common, "--max_steps", "1")
    _, resumed = train(tmp_path, "part", *common, "--max_steps", "2", "--resume", "auto")
    _assert_same_run(full_dir, full, part_dir, resumed, step=2)


def test_load_sharded_leaves_a_parameter_without_gradient_stateless(tmp_path):
    """After the resume, the expert that had no gradient starts Adam from scratch when one arrives, exactly
    as the uninterrupted run does (a zero placeholder state would carry step 1 and change its update)."""
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from wan_grpo.grpo.checkpoint import SHARDED, load_sharded

    def make():
        torch.manual_seed(0)
        experts = nn.ModuleDict({"high": nn.Linear(3, 3), "low": nn.Linear(3, 3)})
        return experts, torch.optim.AdamW(experts.parameters(), lr=0.1, weight_decay=0.01)

    def step(experts, optimizer, both):
        x = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
        loss = experts["high"](x).sum() + (experts["low"](x).sum() if both else 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    straight, straight_opt = make()
    step(straight, straight_opt, both=False)  # only "high" has state when the checkpoint is written
    model_sd, optim_sd = get_state_dict(straight, straight_opt, options=SHARDED)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
    resumed, resumed_opt = make()
    model_sd, optim_sd = get_state_dict(resumed, resumed_opt, options=SHARDED)
    load_sharded(resumed, resumed_opt, {"model": model_sd, "optim": optim_sd}, tmp_path)
    assert len(resumed_opt.state) == len(straight_opt.state) == 2  # high's weight and bias
    for experts, optimizer in ((straight, straight_opt), (resumed, resumed_opt)):
        step(experts, optimizer, both=True)
    assert all(torch.equal(a, b) for a, b in zip(straight.parameters(), resumed.parameters()))


def _assert_same_run(full_dir, full, part_dir, resumed, *, step):
    timing = {"rollout_seconds", "reward_seconds", "train_seconds"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(resumed) == strip(full)
    for sub in ("transformer", "transformer_2"):
        a = load_file(full_dir / f"checkpoint-{step}" / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(part_dir / f"checkpoint-{step}" / sub / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_non_finite_reward_skips_update(tmp_path, monkeypatch, caplog):
    calls = {"n": 0}

    def flaky(video):
        calls["n"] += 1
        return float("nan") if 5 <= calls["n"] <= 8 else builtin.brightness(video)  # rollout 2 of 3

    monkeypatch.setitem(builtin.BUILTIN, "brightness", flaky)
    with caplog.at_level(logging.WARNING, logger="wan_grpo"):
        save_dir, rows = train(tmp_path, "nan", "--max_steps", "3", "--lora_rank", "0", "--learning_rate", "1e-2",
                               "--save_interval", "1")
    assert "non-finite rewards" in caplog.text
    assert [r["skipped_updates"] for r in rows] == [0, 1, 1]
    assert rows[1]["loss"] is None and rows[1]["reward_mean"] is None
    w1 = load_file(save_dir / "checkpoint-1" / "transformer" / "diffusion_pytorch_model.safetensors")
    w2 = load_file(save_dir / "checkpoint-2" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(w1[k], w2[k]) and torch.isfinite(w2[k]).all() for k in w1)
    json.dumps(rows)  # strictly valid JSON rows


@pytest.mark.parametrize("args,needle", [
    (["--prompts", "/no/such.txt"], "does not exist"),
    (["--reward", "aesthetics"], "unknown reward 'aesthetics'"),
    (["--best_of_n", "3"], "must be even"),
    (["--num_generations", "1"], "--num_generations 1: must be >= 2"),
    (["--sde_window", "3"], "is not START:END"),
    (["--train_experts", "middle"], "use high, low, both or high,low"),
])
def test_bad_train_input(tmp_path, capsys, args, needle):
    rc = main(["train", *FAST, "--save_dir", str(tmp_path / "bad"), *args])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("wan-grpo")]
    assert rc == 2 and len(err) == 1 and needle in err[0], err


def test_empty_prompt_file_and_bad_config_key(tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert main(["train", *FAST, "--prompts", str(empty)]) == 2
    assert "holds no prompts" in capsys.readouterr().err
    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rat: 0.1\n")
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'learning_rat'" in err and "did you mean 'learning_rate'?" in err
    # a YAML null (`key: null` or `key:`) is refused for a key that takes no None, not passed on to crash later
    for text in ("learning_rate: null\n", "learning_rate:\n"):
        cfg.write_text(text)
        assert main(["train", *FAST, "--config", str(cfg), "--save_dir", str(tmp_path / "null")]) == 2
        err = capsys.readouterr().err
        assert "learning_rate: null is not a float; give a value or delete the key" in err, err
    assert not (tmp_path / "null").exists()


def test_config_file_and_flag_precedence(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("max_steps: 1\nnum_generations: 3\nlora_rank: 2\nsave_dir: IGNORED\n")
    save_dir = tmp_path / "cfg"
    assert main(["train", "--config", str(cfg), "--save_dir", str(save_dir), "--tensorboard", "false"]) == 0
    written = (save_dir / "config.yaml").read_text()
    assert "num_generations: 3" in written and "lora_rank: 2" in written
    assert len(read_metrics(save_dir)) == 1
    # a run's own config.yaml (its None-valued keys written as null) is a valid --config
    assert "init_lora: null" in written
    again = tmp_path / "again"
    assert main(["train", "--config", str(save_dir / "config.yaml"), "--save_dir", str(again)]) == 0
    assert (again / "config.yaml").read_text().replace(str(again), str(save_dir)) == written


@pytest.mark.parametrize("lora", ["0", "4"])
def test_kl_to_reference_starts_at_zero_then_grows(tmp_path, lora):
    _, rows = train(tmp_path, f"kl{lora}", "--max_steps", "3", "--lora_rank", lora, "--learning_rate", "2e-2",
                    "--kl_coef", "0.5", "--gradient_checkpointing", "true")
    assert rows[0]["kl"] == 0.0  # the policy is the reference before its first update
    assert rows[1]["kl"] > 0 and rows[2]["kl"] > 0


def test_jsonl_prompts_and_micro_batch_invariance(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a red kite over a beach"}\n\n{"prompt": "a slow river at dawn"}\n')
    args = ("--prompts", str(prompts), "--max_steps", "1", "--lora_rank", "0", "--learning_rate", "1e-2")
    a_dir, a = train(tmp_path, "mb1", *args, "--train_batch_size", "1")
    b_dir, b = train(tmp_path, "mb16", *args, "--train_batch_size", "16")
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], abs=1e-7)  # a sum of ~0 (mean-zero advantages)
    assert a[0]["grad_norm_low"] == pytest.approx(b[0]["grad_norm_low"], rel=1e-4)
    assert a[0]["grad_norm_high"] == pytest.approx(b[0]["grad_norm_high"], rel=1e-4)
    from wan_grpo.models import tiny

    init = tiny.build_tiny_components(0)
    for sub, model in (("transformer", init.transformer), ("transformer_2", init.transformer_2)):
        wa = load_file(a_dir / "checkpoint-1" / sub / "diffusion_pytorch_model.safetensors")
        wb = load_file(b_dir / "checkpoint-1" / sub / "diffusion_pytorch_model.safetensors")
        w0 = model.state_dict()
        da = torch.cat([(wa[k] - w0[k]).flatten() for k in wa])
        db = torch.cat([(wb[k] - w0[k]).flatten() for k in wa])
        # Adam's first step is ~lr * g / (|g| + eps): weights with |g| near eps amplify float reordering,
        # so compare the whole update, not its worst element.
        assert (da - db).norm() / da.norm() < 1e-3, sub  # measured 4e-5 and 1.7e-4
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    assert main(["train", *FAST, "--prompts", str(bad)]) == 2


def test_non_finite_loss_skips_optimizer_step(tmp_path, monkeypatch, caplog):
    from wan_grpo.grpo import update

    real = update.ppo_clip_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real(*args, **kwargs)
        return (loss * float("inf") if calls["n"] == 1 else loss), stats

    monkeypatch.setattr(update, "ppo_clip_loss", poisoned)
    with caplog.at_level(logging.WARNING, logger="wan_grpo"):
        save_dir, rows = train(tmp_path, "nanloss", "--max_steps", "2", "--lora_rank", "0",
                               "--learning_rate", "1e-2", "--save_interval", "1")
    assert "non-finite loss or gradient" in caplog.text
    assert [r["skipped_updates"] for r in rows] == [1, 1]
    from wan_grpo.models import tiny

    initial = tiny.build_tiny_components(0).transformer.state_dict()
    w1 = load_file(save_dir / "checkpoint-1" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(initial[k], w1[k]) for k in w1)


def test_offload_model_keeps_one_expert_resident_and_changes_nothing(tmp_path, monkeypatch):
    from wan_grpo.grpo import trainer
    from wan_grpo.models.offload import ExpertPlacement

    made = []

    class Recording(ExpertPlacement):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(trainer, "ExpertPlacement", Recording)
    args = ("--max_steps", "2", "--lora_rank", "0", "--learning_rate", "1e-2")
    off_dir, off = train(tmp_path, "offload", *args, "--offload_model")
    on_dir, on = train(tmp_path, "resident", *args)
    (placement,) = made
    assert placement.max_resident() == 1
    loads = [idx for action, idx in placement.history if action == "load"]
    assert set(loads) == {0, 1} and len(loads) > 4  # rollout, replay and optimizer steps all switch
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith("_seconds")} for r in rows]  # noqa: E731
    assert strip(off) == strip(on)
    for sub in ("transformer", "transformer_2"):
        a = load_file(off_dir / "checkpoint-2" / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(on_dir / "checkpoint-2" / sub / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_max_steps_decides_the_length_unless_num_epochs_is_given(tmp_path, caplog):
    """train's --num_epochs defaulted to 5 and silently ended runs before --max_steps; without it the run
    now takes --max_steps, and with both the one that ends it first is named in a warning."""
    one = tmp_path / "one.txt"
    one.write_text("A cat walking in snow\n")  # one rollout per epoch
    common = ("--prompts", str(one), "--lora_rank", "0", "--learning_rate", "1e-2")
    _, rows = train(tmp_path, "steps", *common, "--max_steps", "7")
    assert [r["step"] for r in rows] == list(range(1, 8))  # past the old default's 5 epochs
    with caplog.at_level(logging.WARNING, logger="wan_grpo"):
        _, rows = train(tmp_path, "epochs", *common, "--max_steps", "7", "--num_epochs", "2")
    assert [r["step"] for r in rows] == [1, 2]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("--num_epochs 2 (1 rollout per pass) ends this run at step 2, before --max_steps 7" in m for m in warned)
    _, rows = train(tmp_path, "neither", *common, "--optimizer_steps_per_rollout", "2")
    assert [r["step"] for r in rows] == list(range(1, 11))  # 5 epochs of 1 rollout x 2 steps


def test_run_length_of_a_prompt_order():
    """The rule train (rollouts) and sft (steps) share: the limit, unless epochs given end the run sooner."""
    from wan_grpo.grpo.data import PromptOrder

    order = PromptOrder(["a", "b", "c"], batch_size=2, seed=0)  # 2 batches a pass
    assert order.run_length(num_epochs=None, limit=7, default_epochs=5) == 7
    assert order.run_length(num_epochs=None, limit=0, default_epochs=5) == 10  # 0: no limit
    assert order.run_length(num_epochs=2, limit=7, default_epochs=5) == 4
    assert order.run_length(num_epochs=9, limit=7, default_epochs=5) == 7
    assert order.run_length(num_epochs=3, limit=0, default_epochs=1) == 6
    # and the warning both log when given epochs end the run first
    assert order.epochs_end_first(num_epochs=1, total=2, max_steps=12, steps_per_batch=3) == (
        "--num_epochs 1 (2 rollouts per pass) ends this run at step 6, before --max_steps 12; drop --num_epochs to run "
        "to --max_steps")
    assert order.epochs_end_first(num_epochs=2, total=4, max_steps=12, steps_per_batch=3) is None  # 12 >= 12
    assert order.epochs_end_first(num_epochs=2, total=4, max_steps=0) is None  # no --max_steps
    assert order.epochs_end_first(num_epochs=2, total=4, max_steps=7, batch_name="step") == (
        "--num_epochs 2 (2 steps per pass) ends this run at step 4, before --max_steps 7; drop --num_epochs to run "
        "to --max_steps")
