"""The flag and input edges of issue 13: each is one line on stderr naming the flag or file, exit 2,
before any model loads where the input is known up front, and nothing half-written left behind."""

import json
import math

import numpy as np
import pytest
from test_cli_errors import run_cli

from wan_grpo.cli import main
from wan_grpo.grpo.metrics import read_metrics
from wan_grpo.report import write_report
from wan_grpo.video import write_mp4


def one_line(capsys, args) -> str:
    rc, err = run_cli(capsys, args)
    assert rc == 2 and len(err) == 1, (rc, err)
    return err[0]


@pytest.mark.parametrize("args,needle", [
    (["--frame_num", "0"], "--frame_num"),
    (["--sampling_steps", "0"], "--sampling_steps"),
    (["--fps", "0"], "--fps"),
    (["--fps", "-5"], "--fps"),
    (["--noise_level", "5"], "--noise_level"),
    (["--noise_level", "-0.1"], "--noise_level"),
    (["--sample_shift", "0"], "--sample_shift"),
    (["--sample_shift", "nan"], "--sample_shift"),
    (["--guidance_scale", "nan"], "--guidance_scale"),
    (["--seed", "99999999999999999999"], "--seed"),
    (["--device", "tpu"], "--device"),
    (["--device", "mps"], "--device"),
])
def test_sample_flags_are_checked_before_anything_runs(capsys, tmp_path, args, needle):
    out = tmp_path / "x.mp4"
    err = one_line(capsys, ["sample", "--task", "tiny", "--output", str(out), *args])
    assert needle in err
    assert not list(tmp_path.iterdir())


def test_sample_outputs_and_images_are_checked_up_front(capsys, tmp_path):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    assert "--output" in one_line(capsys, ["sample", "--task", "tiny", "--output", str(folder)])
    assert "--save_latents" in one_line(capsys, ["sample", "--task", "tiny", "--output", str(tmp_path / "v.mp4"),
                                                 "--save_latents", str(folder)])
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    assert "--image" in one_line(capsys, ["sample", "--task", "tiny", "--output", str(tmp_path / "v.mp4"),
                                          "--image", str(not_image)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_folder", "notes.png"]  # no temp files


def test_score_edges(capsys, tmp_path):
    videos = tmp_path / "videos"
    (videos / "sub").mkdir(parents=True)
    # no videos at all, with a .txt or a .jsonl of captions
    (videos / "p.txt").write_text("")
    assert "holds no .mp4" in one_line(capsys, ["score", "--videos", str(videos), "--prompts", str(videos / "p.txt"),
                                                "--reward", "shapes"])
    (videos / "p.jsonl").write_text("")
    assert "no videos" in one_line(capsys, ["score", "--videos", str(videos), "--prompts",
                                            str(videos / "p.jsonl"), "--reward", "shapes"])
    # a 1-frame video for VideoAlign
    write_mp4(tmp_path / "still.mp4", np.zeros((1, 32, 32, 3), np.uint8), fps=8)
    err = one_line(capsys, ["score", "--video", str(tmp_path / "still.mp4"), "--prompt", "x"])
    assert "at least 2 frames" in err
    # a NaN component prints null (JSON), hidden temp files are not counted, subfolders are kept
    from wan_grpo.tasks.shapes.world import parse, render

    level2 = "a red circle above a blue square"
    write_mp4(videos / "a.mp4", render(parse(level2), 0), fps=8)
    write_mp4(videos / "sub" / "b.mp4", render(parse(level2), 1), fps=8)
    (videos / ".tmp-c.mp4").write_bytes(b"half written")
    assert main(["score", "--video", str(videos / "a.mp4"), "--prompt", level2, "--reward", "shapes"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["motion"] is None and printed["accuracy"] == 1.0
    (videos / "p.txt").write_text(level2 + "\n")  # one mp4 at the top level: the hidden one is not counted
    assert main(["score", "--videos", str(videos), "--prompts", str(videos / "p.txt"), "--reward", "shapes"]) == 0
    (videos / "p.jsonl").write_text(json.dumps({"video": "sub/b.mp4", "prompt": level2}) + "\n")
    out = tmp_path / "scores.csv"
    assert main(["score", "--videos", str(videos), "--prompts", str(videos / "p.jsonl"), "--reward", "shapes",
                 "--output", str(out)]) == 0
    assert out.read_text().splitlines()[1].startswith("sub/b.mp4,")


def _metrics(folder, rows, tail=""):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return folder


def test_report_means_skip_null_rows_and_torn_lines(tmp_path, caplog, capsys):
    rows = [{"step": 1, "reward_mean": None}, {"step": 2, "reward_mean": 0.5}, {"step": 3, "reward_mean": 0.5},
            {"step": 4, "reward_mean": 0.7}, {"step": 5, "reward_mean": 0.9}]
    run = _metrics(tmp_path / "run", rows, tail='{"step": 6, "rew')
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4, 5]
    assert "torn last line" in caplog.text
    write_report(run)
    page = (run / "report" / "index.html").read_text()
    assert "first 2 scored steps 0.5000, last 2 scored steps 0.8000" in page
    quiet = _metrics(tmp_path / "quiet", [{"step": 1, "loss": 0.1}, {"step": 2, "loss": 0.2}])
    write_report(quiet)
    assert "too few to compare" in (quiet / "report" / "index.html").read_text()
    _metrics(tmp_path / "bad", [{"step": 1}, {"loss": 0.2}, {"step": 3}])
    assert "has no integer 'step'" in one_line(capsys, ["report", str(tmp_path / "bad")])
    _metrics(tmp_path / "torn_middle", [{"step": 1}], tail='{"step": 2, "lo\n{"step": 3}\n')
    assert ":2 is not a JSON object" in one_line(capsys, ["report", str(tmp_path / "torn_middle")])


@pytest.mark.parametrize("args,needle", [
    (["--train_experts", "foo"], "--train_experts"),
    (["--train_experts", ""], "--train_experts"),
    (["--lora_rank", "-4"], "--lora_rank"),
    (["--train_batch_size", "-1"], "--train_batch_size"),
    (["--size", "1*1"], "--size"),
    (["--size", "840*480"], "--size"),
    (["--frame_num", "80"], "--frame_num"),
    (["--lora_target_modules", "no_such_layer"], "--lora_target_modules"),
])
def test_plan_validates_its_input(capsys, args, needle):
    assert needle in one_line(capsys, ["plan", "--task", "t2v-A14B", *args])


def test_plan_counts_each_expert_once(capsys):
    assert main(["plan", "--task", "t2v-A14B", "--train_experts", "high,high"]) == 0
    assert "1 expert(s) trained" in capsys.readouterr().out


def test_plan_reads_the_checkpoint_config(tiny_ckpt, capsys):
    assert main(["plan", "--ckpt_dir", str(tiny_ckpt)]) == 0
    out = capsys.readouterr().out
    big = main(["plan", "--task", "t2v-A14B"])
    assert big == 0 and out != capsys.readouterr().out  # the tiny folder's parameters, not A14B's
    assert "does not match" in one_line(capsys, ["plan", "--ckpt_dir", str(tiny_ckpt), "--task", "ti2v-5B"])


def test_eval_compare_to_refuses_runs_it_cannot_pair(tmp_path, capsys):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("a red circle\n")
    b.write_text("a blue square\n")
    common = ["eval", "--task", "tiny", "--size", "32*32", "--frame_num", "5", "--sampling_steps", "2",
              "--reward", "brightness"]
    assert main([*common, "--prompts", str(a), "--save_dir", str(tmp_path / "base")]) == 0
    err = one_line(capsys, [*common, "--prompts", str(b), "--compare_to", str(tmp_path / "base"),
                            "--save_dir", str(tmp_path / "other")])
    assert "shares no (prompt, seed)" in err
    err = one_line(capsys, [*common[:3], "--size", "48*32", *common[5:], "--prompts", str(a),
                            "--compare_to", str(tmp_path / "base"), "--save_dir", str(tmp_path / "wide")])
    assert "size" in err and "48*32" in err
    err = one_line(capsys, [*common[:-1], "colorfulness", "--prompts", str(a), "--compare_to", str(tmp_path / "base"),
                            "--save_dir", str(tmp_path / "contrast")])
    assert "--reward" in err
    assert not (tmp_path / "other" / "compare.json").exists()


def test_nan_is_never_a_silent_default():
    from wan_grpo.config import SampleConfig, check_ranges
    from wan_grpo.errors import UserError

    cfg = SampleConfig(task="tiny", guidance_scale=math.nan)
    with pytest.raises(UserError, match="--guidance_scale"):
        check_ranges(cfg)


def test_train_reads_the_plan_of_its_own_checkpoint(tiny_ckpt, tmp_path):
    """A folder whose preset is not an official architecture (the Shapes model's) trains: the start-up
    memory estimate reads the folder's config instead of refusing the task."""
    import shutil

    from wan_grpo.specs import TASK_KEY

    folder = tmp_path / "model"
    shutil.copytree(tiny_ckpt, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, TASK_KEY: "shapes"}))
    assert main(["train", "--ckpt_dir", str(folder), "--reward", "brightness", "--prompts", "shapes:1:val",
                 "--size", "32*32", "--sampling_steps", "2", "--num_generations", "2", "--batch_size", "1",
                 "--max_steps", "1", "--tensorboard", "false", "--save_dir", str(tmp_path / "run")]) == 0


def test_reward_device_and_eval_images_are_checked(tmp_path, capsys):
    import torch

    from wan_grpo.tasks.shapes.world import parse, render

    video = tmp_path / "v.mp4"
    write_mp4(video, render(parse("a red circle moving left"), 0), fps=8)
    if not torch.cuda.is_available():
        from wan_grpo.rewards.videoalign.tiny import save_tiny_videoreward

        reward_dir, base = save_tiny_videoreward(tmp_path / "va")
        err = one_line(capsys, ["score", "--video", str(video), "--prompt", "x", "--reward_model_path",
                                str(reward_dir), "--videoalign_base", str(base), "--reward_device", "cuda"])
        assert "--reward_device" in err
    not_image = tmp_path / "photo.jpg"
    not_image.write_bytes(b"\x00" * 64)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "a cat", "image": str(not_image)}) + "\n")
    err = one_line(capsys, ["eval", "--task", "tiny", "--prompts", str(prompts), "--save_dir", str(tmp_path / "e")])
    assert "p.jsonl:1" in err and "image" in err
    assert not (tmp_path / "e").exists()
