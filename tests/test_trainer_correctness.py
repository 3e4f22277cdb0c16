"""Trainer correctness: frozen experts, logged learning rates, the KL reference, empty optimizer steps,
--max_steps, resume with another LoRA shape, and the small ones (issue: seven defects of a sweep)."""

import argparse

import pytest
import torch
from safetensors.torch import load_file, save_file

from wan_grpo.cli import main
from wan_grpo.config import SampleConfig, build_config
from wan_grpo.errors import UserError
from wan_grpo.evaluate import EvalConfig
from wan_grpo.grpo import checkpoint, trainer, update
from wan_grpo.grpo.config import TrainConfig
from wan_grpo.grpo.metrics import read_metrics
from wan_grpo.models import tiny
from wan_grpo.sft.config import SFTConfig

FAST = ["--task", "tiny", "--num_generations", "4", "--tensorboard", "false", "--log_interval", "0",
        "--num_epochs", "10"]


def train(tmp_path, name, *args):
    save_dir = tmp_path / name
    assert main(["train", *FAST, "--save_dir", str(save_dir), *args]) == 0
    return save_dir, read_metrics(save_dir)


def one_line_error(capsys, argv, monkeypatch=None) -> str:
    """Run a command that must fail up front: exit 2, one 'wan-grpo: error' line, no model loaded."""
    if monkeypatch is not None:
        def no_model(*a, **k):
            raise AssertionError("the model was loaded before the input was checked")
        monkeypatch.setattr(trainer, "load_model", no_model)
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("wan-grpo: error: "), err
    return err[0]


# ----------------------------------------------------------------------------- 1. frozen experts


def capture_gradients(monkeypatch) -> list[dict[int, list[torch.Tensor]]]:
    """Each optimizer step's gradients, per trained expert, as the optimizer sees them."""
    seen = []
    real = update._optimizer_step

    def recording(policy, placement):
        seen.append({i: [p.grad.detach().clone() for p in ps] for i, ps in policy.params.items()})
        return real(policy, placement)

    monkeypatch.setattr(update, "_optimizer_step", recording)
    return seen


@pytest.mark.parametrize("expert,idx", [("high", 0), ("low", 1)])
def test_one_trained_expert_has_ratio_one_and_the_gradient_of_the_two_expert_run(tmp_path, monkeypatch, expert, idx):
    args = ("--max_steps", "1", "--lora_rank", "0", "--learning_rate", "1e-3", "--max_grad_norm", "0")
    grads = capture_gradients(monkeypatch)
    _, one = train(tmp_path, "one", *args, "--train_experts", expert)
    _, both = train(tmp_path, "both", *args, "--train_experts", "both")
    assert abs(one[0]["ratio_mean"] - 1) <= 1e-6  # 0.375 / 0.625 when frozen steps were counted
    other = "low" if expert == "high" else "high"
    assert one[0][f"trained_steps_{other}"] == 0 and one[0][f"trained_steps_{expert}"] > 0
    assert one[0][f"trained_steps_{expert}"] == both[0][f"trained_steps_{expert}"]
    assert one[0][f"grad_norm_{expert}"] == pytest.approx(both[0][f"grad_norm_{expert}"], rel=1e-6)
    alone, together = grads[0][idx], grads[1][idx]
    assert list(grads[0]) == [idx] and sorted(grads[1]) == [0, 1]
    for a, b in zip(alone, together):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-12)


def test_original_layout_window_on_one_expert_is_not_diluted(tmp_path):
    from test_original_layout import build_a14b, save_both

    save_both(build_a14b(), tmp_path / "diffusers", tmp_path / "original", "t2v")
    _, rows = train(tmp_path, "win", "--ckpt_dir", str(tmp_path / "original"), "--task", "t2v-A14B",
                    "--size", "32*32", "--frame_num", "5", "--sampling_steps", "8", "--sde_window", "4:8",
                    "--train_experts", "low", "--lora_rank", "4", "--max_steps", "2", "--reward", "brightness")
    assert all(abs(r["ratio_mean"] - 1) <= 1e-6 for r in rows[:1])  # 0.25 before
    assert all(r["trained_steps_high"] == 0 and r["trained_steps_low"] > 0 for r in rows)


# ----------------------------------------------------------------------------- 2. logged rates


def test_logged_rate_is_the_rate_each_expert_moved_by(tmp_path):
    lr, lr2 = 1e-3, 4e-4
    save_dir, rows = train(tmp_path, "lr", "--max_steps", "3", "--lora_rank", "0", "--learning_rate", str(lr),
                           "--learning_rate_2", str(lr2), "--warmup_steps", "4", "--weight_decay", "0",
                           "--max_grad_norm", "0", "--save_interval", "1")
    # warmup: step s uses lr * s / 4; logged as used (before the schedule advances), named by expert
    for s, row in enumerate(rows, 1):
        assert row["lr_high"] == pytest.approx(lr * s / 4, rel=1e-12)
        assert row["lr_low"] == pytest.approx(lr2 * s / 4, rel=1e-12)
    # Adam's first step moves each weight by lr * |g| / (|g| + eps): just under lr where |g| >> eps
    init = tiny.build_tiny_components(0)
    for sub, model, key in (("transformer", init.transformer, "lr_high"),
                            ("transformer_2", init.transformer_2, "lr_low")):
        after = load_file(save_dir / "checkpoint-1" / sub / "diffusion_pytorch_model.safetensors")
        before = model.state_dict()
        moved = torch.cat([(after[k].double() - before[k].double()).abs().flatten() for k in after])
        assert moved.max().item() == pytest.approx(rows[0][key], rel=1e-3), sub


def test_one_expert_logs_only_its_own_rate(tmp_path):
    _, rows = train(tmp_path, "low", "--max_steps", "1", "--lora_rank", "2", "--train_experts", "low",
                    "--learning_rate", "1e-3", "--learning_rate_2", "5e-4")
    assert rows[0]["lr_low"] == 5e-4 and "lr_high" not in rows[0]


# ----------------------------------------------------------------------------- 3. KL reference dtype


def test_bf16_full_fine_tuning_kl_is_zero_at_step_one(tmp_path):
    _, rows = train(tmp_path, "bf16", "--dtype", "bf16", "--lora_rank", "0", "--kl_coef", "0.1",
                    "--learning_rate", "1e-2", "--max_steps", "2")
    assert rows[0]["kl"] == 0.0  # 2.4e-5 when the reference kept the bf16 load dtype
    assert rows[1]["kl"] > 0


# ----------------------------------------------------------------------------- 4. nothing to train


def test_several_optimizer_steps_each_train_something(tmp_path):
    _, rows = train(tmp_path, "k3", "--optimizer_steps_per_rollout", "3", "--timestep_fraction", "0.5",
                    "--max_steps", "3", "--lora_rank", "2")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["trained_steps_high"] + r["trained_steps_low"] > 0 for r in rows)
    assert all(r["ratio_mean"] is not None and r["ratio_mean"] > 0.9 for r in rows)
    assert rows[-1]["skipped_updates"] == 0


def test_steps_with_nothing_to_train_are_skipped_and_counted(tmp_path):
    plugin = "reward_plugins:constant"
    save_dir, rows = train(tmp_path, "flat", "--reward", plugin, "--drop_zero_std_groups", "--max_steps", "2",
                           "--lora_rank", "0", "--learning_rate", "1e-2", "--warmup_steps", "5")
    assert [r["skipped_updates"] for r in rows] == [1, 2]
    assert all(r["ratio_mean"] is None and r["trained_steps_high"] == r["trained_steps_low"] == 0 for r in rows)
    assert all(r["lr_high"] is None for r in rows)  # no step was taken
    state = torch.load(save_dir / "checkpoint-2" / "training_state.pt", weights_only=False)
    assert state["scheduler"]["last_epoch"] == 0  # the LR schedule did not advance
    before = tiny.build_tiny_components(0).transformer.state_dict()
    after = load_file(save_dir / "checkpoint-2" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in after)


@pytest.mark.parametrize("args,needle", [
    (["--noise_level", "0"], "--noise_level 0 makes every step deterministic"),
    (["--optimizer_steps_per_rollout", "8", "--timestep_fraction", "0.5"],
     "--optimizer_steps_per_rollout 8 needs at least 8 replayed steps per sample"),
    # only fixes that reach k are named: 8 steps in all, 3 of them the high-noise expert's
    (["--optimizer_steps_per_rollout", "99", "--train_experts", "high"],
     "the steps of --train_experts high (3 high-noise and 5 low-noise of 8 steps are stochastic) gives 3; "
     "lower --optimizer_steps_per_rollout to at most 3 (dividing --max_steps)"),
    (["--optimizer_steps_per_rollout", "6", "--train_experts", "high"],
     "gives 3; train both experts or lower --optimizer_steps_per_rollout to at most 3"),
    (["--optimizer_steps_per_rollout", "8", "--timestep_fraction", "0.5"],
     "gives 4; raise --timestep_fraction or lower --optimizer_steps_per_rollout to at most 4"),
    (["--train_experts", "high", "--sde_window", "4:8"], "--train_experts high owns none of the stochastic steps"),
    (["--max_steps", "3", "--optimizer_steps_per_rollout", "2"], "use 2 or 4"),
    (["--train_experts", "foo"], "use high, low, both or high,low"),
])
def test_impossible_settings_fail_before_the_model_loads(tmp_path, capsys, monkeypatch, args, needle):
    err = one_line_error(capsys, ["train", *FAST, "--save_dir", str(tmp_path / "x"), *args], monkeypatch)
    assert needle in err


# ----------------------------------------------------------------------------- 5. --max_steps


@pytest.mark.parametrize("k", [1, 2, 3])
def test_max_steps_ends_at_exactly_that_step(tmp_path, k):
    save_dir, rows = train(tmp_path, f"k{k}", "--max_steps", "6", "--optimizer_steps_per_rollout", str(k),
                           "--lora_rank", "2", "--sampling_steps", "6")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert sorted(p.name for p in save_dir.glob("checkpoint-*")) == ["checkpoint-6"]


# ----------------------------------------------------------------------------- 6. resume, other LoRA shape


@pytest.mark.parametrize("flag,value,saved", [
    ("--lora_rank", "2", "4"),
    ("--lora_alpha", "8", "64.0"),
    ("--lora_target_modules", "to_q,to_k", "'to_q,to_k,to_v'"),
    ("--lora_rank", "0", "4"),
    ("--train_experts", "low", "'high,low'"),
])
def test_resume_with_another_lora_shape_is_one_line_error(tmp_path, capsys, monkeypatch, flag, value, saved):
    base = ["--max_steps", "1", "--lora_rank", "4", "--lora_target_modules", "to_q,to_k,to_v"]
    save_dir, _ = train(tmp_path, "run", *base)
    before = {p: p.stat().st_mtime_ns for p in save_dir.rglob("*") if p.is_file()}
    args = [*base, "--max_steps", "2", flag, value, "--resume", "auto"]
    err = one_line_error(capsys, ["train", *FAST, "--save_dir", str(save_dir), *args], monkeypatch)
    assert f"{flag} " in err and saved in err and "checkpoint-1" in err, err
    assert before == {p: p.stat().st_mtime_ns for p in save_dir.rglob("*") if p.is_file()}  # nothing touched


def test_resume_with_same_targets_in_another_order_is_fine(tmp_path):
    base = ["--lora_rank", "2", "--lora_target_modules", "to_q,to_k"]
    save_dir, _ = train(tmp_path, "run", *base, "--max_steps", "1")
    _, rows = train(tmp_path, "run", "--lora_rank", "2", "--lora_target_modules", "to_k, to_q", "--max_steps", "2",
                    "--resume", "auto")
    assert [r["step"] for r in rows] == [1, 2]


def test_resume_warns_of_every_changed_setting_and_refuses_another_step_count(tmp_path, capsys, monkeypatch, caplog):
    """A changed default (e.g. --task shapes's kl_coef) would otherwise continue a run silently as another one."""
    base = ["--lora_rank", "2", "--optimizer_steps_per_rollout", "2", "--sampling_steps", "6"]
    save_dir, _ = train(tmp_path, "run", *base, "--max_steps", "2")
    with caplog.at_level("WARNING", logger="wan_grpo"):  # the same settings, other placement and stop: silent
        train(tmp_path, "run", *base, "--max_steps", "4", "--resume", "auto", "--decode_batch_size", "1")
    assert "not trained with" not in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="wan_grpo"):
        _, rows = train(tmp_path, "run", *base, "--max_steps", "6", "--resume", "auto", "--kl_coef", "0.5",
                        "--learning_rate", "1e-4")
    warned = [r.getMessage() for r in caplog.records if "not trained with" in r.getMessage()]
    assert len(warned) == 1 and "checkpoint-4" in warned[0], warned
    assert "kl_coef 0.5 (it had 0.0), learning_rate 0.0001 (it had 8e-06)" in warned[0]
    assert warned[0].endswith("pass --kl_coef 0.0 --learning_rate 8e-06")
    assert [r["step"] for r in rows] == list(range(1, 7))  # a warning: the run goes on
    before = {p: p.stat().st_mtime_ns for p in save_dir.rglob("*") if p.is_file()}
    args = ["--lora_rank", "2", "--optimizer_steps_per_rollout", "1", "--sampling_steps", "6", "--max_steps", "8",
            "--resume", "auto"]
    err = one_line_error(capsys, ["train", *FAST, "--save_dir", str(save_dir), *args], monkeypatch)
    assert "--optimizer_steps_per_rollout 1 differs from" in err and "resume with --optimizer_steps_per_rollout 2" \
        in err, err
    err = one_line_error(capsys, ["sft", "--task", "tiny", "--dataset", "shapes:1", "--save_dir", str(save_dir),
                                  "--resume", "auto"])
    assert "is a wan-grpo train checkpoint, not sft's; resume it with wan-grpo train" in err, err
    assert before == {p: p.stat().st_mtime_ns for p in save_dir.rglob("*") if p.is_file()}  # nothing touched


def test_resume_hint_gives_back_saved_values_a_shell_can_take():
    changed = {"negative_prompt": ("blurry, low quality", ""), "learning_rate_2": (None, 1e-4), "kl_coef": (0.0, 1.0)}
    assert checkpoint._restoring_flags(changed) == ("--negative_prompt 'blurry, low quality' --kl_coef 0.0 and "
                                                    "`learning_rate_2: null` in a --config file")
    assert checkpoint.changed_settings({"seed": 1, "save_dir": "a", "old_key": 1}, {"seed": 2, "save_dir": "b"}) \
        == {"seed": (1, 2)}
    assert checkpoint.changed_settings({"size": "832*480"}, {"size": "480*832"}) == {"size": ("832*480", "480*832")}


@pytest.mark.parametrize("cls", [TrainConfig, SFTConfig, EvalConfig, SampleConfig], ids=lambda c: c.__name__)
def test_a_size_has_one_spelling_once_parsed(cls, tmp_path):
    """--size 832x480 and a YAML 832 X 480 become 832*480 when the config is read, so a resume, an eval's
    --compare_to and the model card all see one spelling; a size that is not W*H, or has a side that is not
    positive, is a one-line error there, before any model loads."""
    assert build_config(cls, argparse.Namespace(size="832x480")).size == "832*480"
    (tmp_path / "c.yaml").write_text("size: 832 X 480\n")
    assert build_config(cls, argparse.Namespace(), config_file=str(tmp_path / "c.yaml")).size == "832*480"
    assert build_config(cls, argparse.Namespace()).size is None  # unset stays the preset's
    with pytest.raises(UserError, match=r"--size '832' is not W\*H; write it as e\.g\. 832\*480"):
        build_config(cls, argparse.Namespace(size="832"))
    for bad in ("0x64", "-64*64"):
        with pytest.raises(UserError, match="has a side that is not positive; write it as e.g. 832"):
            build_config(cls, argparse.Namespace(size=bad))


# ----------------------------------------------------------------------------- 7. small ones


def test_an_embedding_with_zero_tokens_is_cached_and_read_back(tmp_path):
    from wan_grpo.models.text import EmbeddingDiskCache

    disk = EmbeddingDiskCache(tmp_path, "id", max_sequence_length=16)
    disk.save("", torch.zeros(0, 8))  # a tokenizer without an end token gives "" no tokens
    back = disk.load("")
    assert back is not None and back.shape == (16, 8) and not back.any()
    save_file({"embedding": torch.zeros(3)}, str(disk.path("bad")))
    assert disk.load("bad") is None  # a malformed entry is still refused


def test_train_experts_both_is_accepted(tmp_path):
    _, rows = train(tmp_path, "both", "--max_steps", "1", "--lora_rank", "2", "--train_experts", "both")
    assert rows[0]["trained_steps_high"] > 0 and rows[0]["trained_steps_low"] > 0


# ----------------------------------------------------------------------------- bad input, up front


def test_bad_inputs_are_one_line_errors_before_any_work(tmp_path, capsys, monkeypatch):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("un caf\xe9 au lait\n".encode("latin-1"))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (["--prompts", str(latin1)], "is not UTF-8"),
        (["--save_dir", str(a_file)], "is a file"),
        (["--max_steps", "-3"], "--max_steps -3: must be >= 0"),
        (["--learning_rate", "nan"], "--learning_rate nan: must be a finite number > 0"),
        (["--learning_rate", "inf"], "--learning_rate inf: must be a finite number > 0"),
        (["--seed", "99999999999999999999"], "--seed 99999999999999999999: must be >= 0"),
        (["--noise_level", "5"], "--noise_level 5: must be >= 0 and <= 1"),
        (["--sample_shift", "0"], "--sample_shift 0: must be > 0"),
        (["--guidance_scale", "nan"], "--guidance_scale nan: must be a finite number"),
        (["--clip_range", "-1"], "--clip_range -1: must be > 0"),
        (["--timestep_fraction", "1.5"], "--timestep_fraction 1.5: must be > 0 and <= 1"),
        (["--lora_target_modules", " , "], "--lora_target_modules ' , ' names no module"),
        (["--sampling_steps", "0"], "--sampling_steps 0: must be >= 1"),
        (["--frame_num", "0"], "--frame_num 0: must be >= 1"),
        (["--fps", "-5"], "--fps -5: must be > 0"),
    ]
    for args, needle in cases:
        save = [] if "--save_dir" in args else ["--save_dir", str(tmp_path / "never")]
        err = one_line_error(capsys, ["train", *FAST, *save, *args], monkeypatch)
        assert needle in err, (args, err)
    assert not (tmp_path / "never").exists()
    assert a_file.read_text() == "x"
